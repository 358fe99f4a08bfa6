//! The spine end to end: simulated devices -> real broker -> gateway
//! process -> real PostgreSQL, checked reading by reading.

// A test (or bench) that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use edge_gateway::local::{broker, mosquitto::Mosquitto, postgres::LocalPostgres};
use edge_gateway::model::{days_from_civil, MICROS_PER_DAY};
use edge_payload::Format;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_formats_through_mosquitto_land_exactly_once() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let mut gateway = Gateway::start(&broker.url(), &pg.url(), "");
    four_formats(&broker.url(), &gateway, &pg.url()).await;
    assert!(
        gateway.stop(),
        "gateway did not exit cleanly on SIGTERM; log:\n{}",
        gateway.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_formats_through_embedded_broker_land_exactly_once() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = broker::start().expect("embedded rumqttd");
    let mut gateway = Gateway::start(
        &broker.url(edge_gateway::config::Protocol::V5),
        &pg.url(),
        "",
    );
    four_formats(
        &broker.url(edge_gateway::config::Protocol::V311),
        &gateway,
        &pg.url(),
    )
    .await;
    assert!(
        gateway.stop(),
        "gateway did not exit cleanly on SIGTERM; log:\n{}",
        gateway.log()
    );
}

/// With MQTT 3.1.1 and mosquitto's default window of 20 unacknowledged
/// messages, acks held until commit must not stall the gateway: batches are
/// also flushed on the interval, so every message gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_with_mosquitto_default_inflight_window() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start_with(&["max_inflight_messages 20"]).expect("mosquitto");
    let gateway = Gateway::start(&broker.url(), &pg.url(), "[mqtt]\nprotocol = \"3.1.1\"\n");
    let start_ms = now_ms() - 600_000;
    let config = sim(&broker.url(), Format::SenmlJson, 5, 200, start_ms);
    let summary = firmware_sim::run(&config, CancellationToken::new())
        .await
        .expect("sim");
    let client = db(&pg.url()).await;
    assert_landed(&client, &gateway, &config).await;
    assert_eq!(
        gateway.metric("edge_gateway_acks_sent_total"),
        Some(summary.messages as f64)
    );
}

/// Readings spanning three past days land in three daily partitions that
/// the gateway created itself (two of them on demand, for late data).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_days_land_in_three_partitions_created_by_the_gateway() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = broker::start().expect("embedded rumqttd");
    let client = db(&pg.url()).await;
    let gateway = Gateway::start(
        &broker.url(edge_gateway::config::Protocol::V5),
        &pg.url(),
        "",
    );

    let today = now_ms() * 1000 / MICROS_PER_DAY;
    // From 01:00 three days ago to 23:00 yesterday: days -3, -2 and -1.
    let first_ms = (today - 3) * 86_400_000 + 3_600_000;
    let last_ms = today * 86_400_000 - 3_600_000;
    let samples = 600u64;
    let mut config = sim(
        &broker.url(edge_gateway::config::Protocol::V311),
        Format::NativeJson,
        4,
        samples,
        first_ms,
    );
    config.step_ms = Some((last_ms - first_ms) / (samples as i64 - 1));
    config.pack = 20;

    let partition = |day: i64| {
        let (y, m, d) = edge_gateway::model::civil_from_days(day);
        assert_eq!(days_from_civil(y, m, d), day);
        format!("readings_p{y:04}{m:02}{d:02}")
    };
    let exists = |name: String| {
        let client = &client;
        async move {
            client
                .query_one(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = 'edge' AND tablename = $1",
                    &[&name],
                )
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(-1)
        }
    };
    assert_eq!(
        exists(partition(today - 3)).await,
        0,
        "day -3 must not exist before the data arrives"
    );
    assert_eq!(
        exists(partition(today - 2)).await,
        0,
        "day -2 must not exist before the data arrives"
    );

    let summary = firmware_sim::run(&config, CancellationToken::new())
        .await
        .expect("sim");
    let total = summary.readings as i64;
    assert_landed(&client, &gateway, &config).await;

    let rows = client
        .query(
            "SELECT tableoid::regclass::text, count(*) FROM edge.readings GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .expect("rows per partition");
    let per_partition: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want: Vec<String> = (1..=3)
        .rev()
        .map(|d| format!("edge.{}", partition(today - d)))
        .collect();
    assert_eq!(
        per_partition
            .iter()
            .map(|p| p.0.clone())
            .collect::<Vec<_>>(),
        want,
        "{per_partition:?}"
    );
    assert!(per_partition.iter().all(|p| p.1 > 0));
    assert_eq!(per_partition.iter().map(|p| p.1).sum::<i64>(), total);
}

/// A SenML pack published by mosquitto_pub (not our code) lands with the
/// names, times, units and values RFC 8428 resolution defines, through the
/// gateway speaking MQTT 3.1.1 to mosquitto with the shipped configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn senml_from_mosquitto_pub_resolves_per_rfc8428() {
    let mosquitto_pub = require_binary("mosquitto_pub", "mosquitto-clients");
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let gateway = Gateway::start(&broker.url(), &pg.url(), "[mqtt]\nprotocol = \"3.1.1\"\n");
    let client = db(&pg.url()).await;

    // RFC 8428 section 5.1.2's second example, moved to a recent base time
    // (the original 2010 one is far outside the retention window).
    let bt_ms = (now_ms() / 1000 - 120) * 1000 + 1; // whole seconds + 1 ms
    let bt = format!("{}.001", bt_ms / 1000);
    let pack = format!(
        r#"[{{"bn":"urn:dev:ow:10e2073a0108006:","bt":{bt},"bu":"A","bver":5,"n":"voltage","u":"V","v":120.1}},
            {{"n":"current","t":-5,"v":1.2}},{{"n":"current","t":-4,"v":1.3}},{{"n":"current","t":-3,"v":1.4}},
            {{"n":"current","t":-2,"v":1.5}},{{"n":"current","t":-1,"v":1.6}},{{"n":"current","v":1.7}},
            {{"n":"door","vs":"open"}},{{"n":"alarm","vb":true}},{{"n":"blob","vd":"AQID"}}]"#
    );
    let relative =
        r#"[{"bn":"rel/","n":"temp","u":"Cel","v":21.5,"t":-10},{"n":"energy","u":"J","s":42}]"#;
    let before = now_ms();
    for (device, message) in [("ext-1", pack.as_str()), ("ext-2", relative)] {
        let status = Command::new(&mosquitto_pub)
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &broker.port().to_string(),
                "-q",
                "1",
            ])
            .args(["-t", &format!("devices/{device}/telemetry"), "-m", message])
            .status()
            .expect("run mosquitto_pub");
        assert!(status.success());
    }
    let after = now_ms();
    let got = wait_for_count(
        &client,
        "SELECT count(*) FROM edge.readings",
        12,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(got, 12, "gateway log:\n{}", gateway.log());

    let rows = client
        .query(
            "SELECT device_id, metric, (extract(epoch from time) * 1000000)::bigint, value, unit, vs, vb, vd, sum \
             FROM edge.readings ORDER BY device_id, time, metric",
            &[],
        )
        .await
        .expect("query");
    type Row = (
        String,
        String,
        i64,
        Option<f64>,
        Option<String>,
        Option<String>,
        Option<bool>,
        Option<Vec<u8>>,
        Option<f64>,
    );
    let rows: Vec<Row> = rows
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get(6),
                r.get(7),
                r.get(8),
            )
        })
        .collect();
    let base = bt_ms * 1000;
    let name = "urn:dev:ow:10e2073a0108006:";
    let ext1: Vec<&Row> = rows.iter().filter(|r| r.0 == "ext-1").collect();
    let numeric: Vec<(String, i64, Option<f64>, Option<String>)> = ext1
        .iter()
        .filter(|r| r.3.is_some())
        .map(|r| (r.1.clone(), r.2, r.3, r.4.clone()))
        .collect();
    let mut want = vec![];
    for (back, v) in [(5, 1.2), (4, 1.3), (3, 1.4), (2, 1.5), (1, 1.6)] {
        want.push((
            format!("{name}current"),
            base - back * 1_000_000,
            Some(v),
            Some("A".to_string()),
        ));
    }
    want.push((format!("{name}current"), base, Some(1.7), Some("A".into())));
    want.push((
        format!("{name}voltage"),
        base,
        Some(120.1),
        Some("V".into()),
    ));
    assert_eq!(numeric, want);
    let find = |metric: &str| {
        ext1.iter()
            .find(|r| r.1 == format!("{name}{metric}"))
            .map(|r| (*r).clone())
    };
    let door = find("door").expect("door");
    assert_eq!(
        (door.2, door.3, door.5.as_deref(), door.4.as_deref()),
        (base, None, Some("open"), Some("A"))
    );
    assert_eq!(find("alarm").map(|r| r.6), Some(Some(true)));
    assert_eq!(find("blob").map(|r| r.7), Some(Some(vec![1, 2, 3])));

    // Relative time: resolved against the receive time.
    let temp = rows.iter().find(|r| r.1 == "rel/temp").expect("rel/temp");
    assert_eq!(
        (temp.0.as_str(), temp.3, temp.4.as_deref()),
        ("ext-2", Some(21.5), Some("Cel"))
    );
    assert!(
        temp.2 >= (before - 10_000 - 1000) * 1000 && temp.2 <= (after - 10_000 + 1000) * 1000,
        "relative time {} not within receive time - 10 s",
        temp.2
    );
    let energy = rows
        .iter()
        .find(|r| r.1 == "rel/energy")
        .expect("rel/energy");
    assert_eq!(
        (energy.3, energy.8, energy.4.as_deref()),
        (None, Some(42.0), Some("J"))
    );
}
