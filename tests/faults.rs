//! Nothing lost, nothing duplicated, whatever fails: the database, the
//! gateway process, the broker; duplicates, reordering and malformed input
//! on purpose. Real PostgreSQL and mosquitto; exact counts at the end.

// A test (or bench) that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use edge_gateway::local::{mosquitto::Mosquitto, postgres::LocalPostgres};
use edge_payload::Format;
use firmware_sim::{ExpectedReading, SimConfig};
use tokio_util::sync::CancellationToken;

fn paced(mut config: SimConfig, rate: f64, pack: usize) -> SimConfig {
    config.rate = rate;
    config.pack = pack;
    config
}

/// Blocking work (stopping a server) without stalling the test's runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_mid_run_loses_and_duplicates_nothing() {
    let mut pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let gateway = Gateway::start(&broker.url(), &pg.url(), "");
    let start_ms = now_ms() - 3_600_000;
    // 2 formats x 10 devices x 2,500 samples x 2 metrics = 100,000 readings
    // over about 40 s.
    let native = paced(
        sim(&broker.url(), Format::NativeCbor, 10, 2500, start_ms),
        62.5,
        5,
    );
    let senml = paced(
        sim(&broker.url(), Format::SenmlCbor, 10, 2500, start_ms),
        62.5,
        5,
    );
    let runs = [spawn_sim(&native), spawn_sim(&senml)];
    // Down a fifth of the way in; up again once the writers have retried
    // through a long outage: 14 failed attempts, backing off from 50 ms,
    // take the two writers past 6 s of retrying.
    wait_metric(&gateway, COMMITTED, 20_000.0, Duration::from_secs(60)).await;
    blocking(|| pg.stop());
    wait_metric(&gateway, FAILURES, 14.0, Duration::from_secs(90)).await;
    blocking(|| pg.restart()).expect("restart PostgreSQL");
    let mut readings = 0;
    for run in runs {
        readings += run.await.expect("sim").readings;
    }
    assert_eq!(readings, 100_000);
    let client = db(&pg.url()).await;
    assert_landed(&client, &gateway, &native).await;
    assert_landed(&client, &gateway, &senml).await;
    let written = gateway
        .metric("edge_gateway_spool_batches_written_total")
        .unwrap_or(0.0);
    assert!(
        written > 0.0,
        "the outage should have been spooled; log:\n{}",
        gateway.log()
    );
    let replayed = "edge_gateway_spool_batches_replayed_total";
    wait_metric_exactly(&gateway, replayed, written, Duration::from_secs(30)).await;
}

const COMMITTED: &str = "edge_gateway_readings_committed_total";
const SPOOLED: &str = "edge_gateway_spool_batches_written_total";
const FAILURES: &str = "edge_gateway_batch_failures_total";

/// SenML packs as another client writes them: one device, absolute times,
/// one pack per line for `mosquitto_pub -l`.
fn senml_lines(count: usize, base_s: i64) -> (Vec<String>, Vec<ExpectedReading>) {
    let mut lines = Vec::new();
    let mut expected = Vec::new();
    for i in 0..count {
        let t = base_s + i as i64;
        let (v, w) = (i as f64 * 0.5, i as f64 * 0.25);
        lines.push(format!(
            r#"[{{"bn":"ext:","bt":{t},"n":"temp","u":"Cel","v":{v}}},{{"n":"hum","u":"%RH","v":{w}}}]"#
        ));
        for (metric, value) in [("ext:temp", v), ("ext:hum", w)] {
            expected.push(ExpectedReading {
                device: "ext-0001".into(),
                metric: metric.into(),
                ts_ms: t * 1000,
                value,
            });
        }
    }
    (lines, expected)
}

/// Feeds `lines` to `mosquitto_pub -l` (one message per line, QoS 1) over
/// about `over`, in a thread.
fn publish_lines(
    port: u16,
    topic: &str,
    lines: Vec<String>,
    over: Duration,
) -> std::thread::JoinHandle<()> {
    let topic = topic.to_string();
    let pause = over / lines.len().max(1) as u32;
    std::thread::spawn(move || {
        mosquitto_pub(
            port,
            &topic,
            &lines,
            pause,
            &["-i", "ext-publisher", "--disable-clean-session"],
        );
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_with_sigkill_and_restarted_stores_everything_once() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let mut gateway = Gateway::start(&broker.url(), &pg.url(), "");
    let start_ms = now_ms() - 3_600_000;
    let native = paced(
        sim(&broker.url(), Format::NativeJson, 10, 1000, start_ms),
        100.0,
        1,
    );
    let run = spawn_sim(&native);
    let (lines, senml_expected) = senml_lines(1000, start_ms / 1000);
    let publisher = publish_lines(
        broker.port(),
        "devices/ext-0001/telemetry",
        lines,
        Duration::from_secs(8),
    );

    // Killed a third of the way in, mid-stream, and started again.
    wait_metric(&gateway, COMMITTED, 6_000.0, Duration::from_secs(60)).await;
    gateway.kill();
    blocking(|| gateway.spawn());

    run.await.expect("sim");
    blocking(|| publisher.join()).expect("mosquitto_pub thread");
    let client = db(&pg.url()).await;
    assert_landed(&client, &gateway, &native).await;
    let got = wait_for_count(
        &client,
        "SELECT count(*) FROM edge.readings WHERE device_id = 'ext-0001'",
        senml_expected.len() as i64,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(got, senml_expected.len() as i64, "log:\n{}", gateway.log());
    caught_up(&gateway, 0).await;
    assert_exactly(&client, "ext-", &senml_expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarted_mid_run_gateway_reconnects_and_loses_nothing() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let mut broker = Mosquitto::start().expect("mosquitto");
    let gateway = Gateway::start(&broker.url(), &pg.url(), "");
    let start_ms = now_ms() - 3_600_000;
    let mut config = paced(
        sim(&broker.url(), Format::SenmlJson, 10, 600, start_ms),
        100.0,
        1,
    );
    config.persistent = true;
    let run = spawn_sim(&config);
    // Restarted a third of the way in.
    wait_metric(&gateway, COMMITTED, 4_000.0, Duration::from_secs(60)).await;
    blocking(|| broker.restart()).expect("restart mosquitto");
    run.await.expect("sim");
    let client = db(&pg.url()).await;
    assert_landed(&client, &gateway, &config).await;
    assert!(
        gateway
            .metric("edge_gateway_mqtt_reconnects_total")
            .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(gateway.metric("edge_gateway_mqtt_connected"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_and_out_of_order_messages_make_no_duplicate_rows() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let gateway = Gateway::start(&broker.url(), &pg.url(), "");
    let start_ms = now_ms() - 3_600_000;
    let mut sent = 0;
    let mut configs = Vec::new();
    for format in [Format::NativeJson, Format::SenmlCbor] {
        let mut config = sim(&broker.url(), format, 5, 400, start_ms);
        config.duplicate_rate = 0.2;
        config.reorder_rate = 0.2;
        let summary = firmware_sim::run(&config, CancellationToken::new())
            .await
            .expect("sim");
        assert!(summary.duplicates > 0 && summary.reordered > 0);
        sent += summary.duplicates;
        configs.push(config);
    }
    let client = db(&pg.url()).await;
    for config in &configs {
        assert_landed(&client, &gateway, config).await;
    }
    assert_eq!(
        gateway.metric("edge_gateway_duplicates_total"),
        Some(sent as f64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_malformed_all_good_readings_stored_every_bad_one_dead_lettered() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let gateway = Gateway::start(&broker.url(), &pg.url(), "");
    let start_ms = now_ms() - 3_600_000;
    let mut malformed = 0;
    let mut configs = Vec::new();
    for format in Format::ALL {
        let mut config = sim(&broker.url(), format, 5, 200, start_ms);
        config.malformed_rate = 0.1;
        let summary = firmware_sim::run(&config, CancellationToken::new())
            .await
            .expect("sim");
        malformed += summary.malformed as i64;
        configs.push(config);
    }
    assert!(malformed > 200, "about 10% of 4,000 messages: {malformed}");
    let client = db(&pg.url()).await;
    for config in &configs {
        assert_landed(&client, &gateway, config).await;
    }
    let dead = wait_for_count(
        &client,
        "SELECT count(*) FROM edge.dead_letters",
        malformed,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(dead, malformed);
    let reasons: Vec<String> = client
        .query(
            "SELECT DISTINCT reason FROM edge.dead_letters ORDER BY 1",
            &[],
        )
        .await
        .expect("reasons")
        .iter()
        .map(|r| r.get(0))
        .collect();
    for reason in &reasons {
        assert!(
            [
                "malformed_json",
                "malformed_cbor",
                "invalid_native",
                "invalid_senml",
                "unknown_shape"
            ]
            .contains(&reason.as_str()),
            "{reason}"
        );
    }
    assert!(reasons.len() >= 3, "{reasons:?}");
    let empty: i64 = client
        .query_one(
            "SELECT count(*) FROM edge.dead_letters WHERE length(payload) = 0 OR error = ''",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1);
    assert_eq!(empty, 0, "dead letters keep the payload and the error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_within_the_deadline_and_the_rest_resumes() {
    let mut pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let extra = "[pipeline]\nshutdown_timeout_secs = 5\n";
    let mut gateway = Gateway::start(&broker.url(), &pg.url(), extra);
    let start_ms = now_ms() - 3_600_000;

    // Database up: drain, commit, ack, exit.
    let first = paced(
        sim(&broker.url(), Format::NativeCbor, 10, 800, start_ms),
        100.0,
        1,
    );
    let run = spawn_sim(&first);
    wait_metric(&gateway, COMMITTED, 4_000.0, Duration::from_secs(60)).await;
    let t = Instant::now();
    assert!(
        blocking(|| gateway.terminate(Duration::from_secs(8))),
        "no clean exit; log:\n{}",
        gateway.log()
    );
    let took = t.elapsed();
    assert!(took < Duration::from_secs(7), "exit took {took:?}");
    blocking(|| gateway.spawn());
    run.await.expect("sim");
    let client = db(&pg.url()).await;
    assert_landed(&client, &gateway, &first).await;

    // Database down: what cannot be committed goes to the spool, and the
    // exit still comes within the deadline.
    let mut second = paced(
        sim(&broker.url(), Format::SenmlCbor, 10, 300, start_ms),
        100.0,
        1,
    );
    second.client_id = "sim-second".into();
    let run = spawn_sim(&second);
    // Second run a third of the way in, then the database goes; the
    // gateway spools.
    let base = gateway.metric(COMMITTED).unwrap_or(0.0);
    wait_metric(&gateway, COMMITTED, base + 2_000.0, Duration::from_secs(60)).await;
    blocking(|| pg.stop());
    wait_metric(&gateway, SPOOLED, 1.0, Duration::from_secs(60)).await;
    let t = Instant::now();
    assert!(
        blocking(|| gateway.terminate(Duration::from_secs(8))),
        "no clean exit; log:\n{}",
        gateway.log()
    );
    assert!(
        t.elapsed() < Duration::from_secs(7),
        "exit took {:?}",
        t.elapsed()
    );
    let spooled = std::fs::read_dir(gateway.spool_dir().join("writer-0"))
        .into_iter()
        .chain(std::fs::read_dir(gateway.spool_dir().join("writer-1")))
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .count();
    assert!(spooled > 0, "nothing was spooled; log:\n{}", gateway.log());
    run.await.expect("sim");
    blocking(|| pg.restart()).expect("restart PostgreSQL");
    blocking(|| gateway.spawn());
    let client = db(&pg.url()).await;
    assert_landed(&client, &gateway, &first).await;
    assert_landed(&client, &gateway, &second).await;
}

/// A row PostgreSQL rejects for good (here a CHECK constraint an operator
/// added) does not block the pipeline: only its message becomes a dead
/// letter, everything else in its batch is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_database_rejects_become_dead_letters_without_blocking() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let gateway = Gateway::start(&broker.url(), &pg.url(), "");
    let client = db(&pg.url()).await;
    client
        .batch_execute("ALTER TABLE edge.readings ADD CONSTRAINT plausible CHECK (value IS NULL OR value < 1000)")
        .await
        .expect("add constraint");
    let ts = now_ms() - 60_000;
    let mut lines = Vec::new();
    for i in 0..200 {
        let value = if i % 10 == 3 { 5000.0 } else { i as f64 };
        lines.push(format!(
            r#"{{"seq":{},"ts":{},"m":{{"level":{value}}}}}"#,
            i + 1,
            ts + i
        ));
    }
    blocking(|| {
        mosquitto_pub(
            broker.port(),
            "devices/tank-1/telemetry",
            &lines,
            Duration::ZERO,
            &[],
        )
    });
    let stored = wait_for_count(
        &client,
        "SELECT count(*) FROM edge.readings",
        180,
        Duration::from_secs(30),
    )
    .await;
    let dead = wait_for_count(
        &client,
        "SELECT count(*) FROM edge.dead_letters WHERE reason = 'rejected_by_database'",
        20,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!((stored, dead), (180, 20), "log:\n{}", gateway.log());
    let max: f64 = client
        .query_one("SELECT max(value) FROM edge.readings", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1.0);
    assert_eq!(max, 199.0);
    let error: String = client
        .query_one("SELECT error FROM edge.dead_letters LIMIT 1", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or_default();
    assert!(error.contains("plausible"), "{error}");
}

/// A full spool stops intake instead of dropping: with a tiny spool and
/// the database down, messages wait at the broker; when the database
/// returns, every one lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_stops_intake_and_loses_nothing() {
    let mut pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let max_bytes = 256 * 1024;
    let extra = format!(
        "[spool]\nmax_bytes = {max_bytes}\nsegment_bytes = 32768\n[database]\nbatch_rows = 200\n"
    );
    let gateway = Gateway::start(&broker.url(), &pg.url(), &extra);
    blocking(|| pg.stop());
    let start_ms = now_ms() - 3_600_000;
    let config = sim(&broker.url(), Format::NativeCbor, 10, 3000, start_ms);
    let summary = firmware_sim::run(&config, CancellationToken::new())
        .await
        .expect("sim");
    // The spool fills, then intake stops: the broker's whole window (MQTT 5
    // receive maximum, 1,024) is in flight, neither committed nor spooled.
    let in_flight = "edge_gateway_messages_in_flight";
    wait_metric(&gateway, in_flight, 1024.0, Duration::from_secs(60)).await;
    let received = gateway
        .metric("edge_gateway_messages_received_total")
        .unwrap_or(0.0);
    let spool_bytes = gateway.metric("edge_gateway_spool_bytes").unwrap_or(0.0);
    assert!(
        spool_bytes > 0.0 && spool_bytes <= max_bytes as f64,
        "spool bytes {spool_bytes}"
    );
    assert!(
        received < summary.messages as f64,
        "intake should have stopped with the spool full: received {received} of {}",
        summary.messages
    );
    blocking(|| pg.restart()).expect("restart PostgreSQL");
    let client = db(&pg.url()).await;
    assert_landed(&client, &gateway, &config).await;
}

/// Database failover under load: a multi-host URL with
/// target_session_attrs=read-write; the primary is demoted (read-only, its
/// sessions ended, as Patroni does) and the gateway moves to the new primary.
/// Every reading is in exactly one of the two, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_failover_to_a_new_primary_under_load() {
    let old = LocalPostgres::start().expect("throwaway PostgreSQL");
    let new = LocalPostgres::start().expect("second PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    // The new primary has the schema, as a promoted replica would.
    let new_client = db(&new.url()).await;
    new_client
        .batch_execute(&edge_gateway::sink::schema::ddl("edge"))
        .await
        .expect("schema on the new primary");
    let url = format!(
        "postgresql://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        old.port(),
        new.port()
    );
    let gateway = Gateway::start(&broker.url(), &url, "");
    let start_ms = now_ms() - 3_600_000;
    let config = paced(
        sim(&broker.url(), Format::NativeCbor, 10, 600, start_ms),
        100.0,
        1,
    );
    let run = spawn_sim(&config);
    wait_metric(&gateway, COMMITTED, 4_000.0, Duration::from_secs(60)).await;
    let old_client = db(&old.url()).await;
    for step in [
        "ALTER SYSTEM SET default_transaction_read_only = on",
        "SELECT pg_reload_conf()",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'edge-gateway' AND pid <> pg_backend_pid()",
    ] {
        old_client
            .simple_query(step)
            .await
            .expect("demote the old primary");
    }
    run.await.expect("sim");

    let expected = firmware_sim::expected_readings(&config, start_ms);
    let count = "SELECT count(*) FROM edge.readings";
    let counts = async || {
        let a = old_client
            .query_one(count, &[])
            .await
            .map_or(-1, |r| r.get::<_, i64>(0));
        let b = new_client
            .query_one(count, &[])
            .await
            .map_or(-1, |r| r.get::<_, i64>(0));
        (a, b)
    };
    eventually(Duration::from_secs(60), async || {
        let (a, b) = counts().await;
        (a + b >= expected.len() as i64).then_some(())
    })
    .await;
    let (a, b) = counts().await;
    assert_eq!(
        a + b,
        expected.len() as i64,
        "old {a} + new {b}; log:\n{}",
        gateway.log()
    );
    assert!(a > 0 && b > 0, "both primaries took part: old {a}, new {b}");
    // Exactly once across both: no key twice, every expected key present.
    let keys = "SELECT device_id, metric, (extract(epoch from time) * 1000)::int8, value FROM edge.readings";
    let mut seen = std::collections::HashSet::new();
    for client in [&old_client, &new_client] {
        for row in client.query(keys, &[]).await.expect("rows") {
            let key: (String, String, i64) = (row.get(0), row.get(1), row.get(2));
            assert!(seen.insert(key.clone()), "duplicate {key:?}");
        }
    }
    for e in &expected {
        assert!(
            seen.contains(&(e.device.clone(), e.metric.clone(), e.ts_ms)),
            "missing {e:?}"
        );
    }
}
