//! Edge analytics end to end: a rule crossed by a real device's data gives
//! one raised and one cleared alert, in `edge.alerts`, on LISTEN, and on
//! the MQTT topic `alerts/<device>`; finished minutes land in rollups_1m.

// A test (or bench) that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use edge_gateway::local::{mosquitto::Mosquitto, postgres::LocalPostgres};

const RULES: &str = r#"
[analytics]
lateness_secs = 0.0
[[rules]]
name = "hot"
kind = "above"
metric = "temperature"
threshold = 30.0
clear = 28.0
"#;

/// Subscribes to `filter` and collects (topic, payload); returns once subscribed.
async fn collect_mqtt(port: u16, filter: &str) -> Arc<Mutex<Vec<(String, String)>>> {
    let mut options = rumqttc::MqttOptions::new("alert-listener", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
    client
        .subscribe(filter, rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let got = Arc::new(Mutex::new(Vec::new()));
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let sink = got.clone();
    tokio::spawn(async move {
        let _client = client;
        let mut subscribed = Some(subscribed_tx);
        while let Ok(event) = eventloop.poll().await {
            match event {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                    if let Some(tx) = subscribed.take() {
                        let _ = tx.send(());
                    }
                }
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push((
                        p.topic.clone(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    ));
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
        .await
        .expect("suback")
        .expect("suback");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_crossing_alerts_once_in_the_table_on_notify_and_on_mqtt() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let gateway = Gateway::start(&broker.url(), &pg.url(), RULES);
    let mqtt = collect_mqtt(broker.port(), "alerts/#").await;
    let (_listener, notes) = collect_notifications(&pg.url(), "edge_alerts").await;

    // 15 readings 10 s apart: 20 x5, 35 x5 (with noise inside the band), 20 x5.
    let start = (now_ms() / 60_000 - 10) * 60_000;
    let values = [
        20.0, 20.0, 20.0, 20.0, 20.0, 35.0, 29.0, 35.0, 36.0, 35.0, 20.0, 20.0, 20.0, 20.0, 20.0,
    ];
    // Reading i + 1 at start + (i + 1) * 10 s.
    publish_native(
        broker.port(),
        "boiler-1",
        1,
        start - 10_000,
        10_000,
        &values,
    );

    let client = db(&pg.url()).await;
    let n = wait_for_count(
        &client,
        "SELECT count(*) FROM edge.alerts",
        2,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(n, 2, "log:\n{}", gateway.log());
    let rows = client
        .query("SELECT device_id, metric, rule, state, value, (extract(epoch FROM time) * 1000)::int8, detail::text FROM edge.alerts ORDER BY time", &[])
        .await
        .expect("alerts");
    let got: Vec<(String, String, String, String, Option<f64>, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect();
    let at = |i: i64| start + i * 10_000;
    assert_eq!(
        got,
        vec![
            (
                "boiler-1".into(),
                "temperature".into(),
                "hot".into(),
                "raised".into(),
                Some(35.0),
                at(5)
            ),
            (
                "boiler-1".into(),
                "temperature".into(),
                "hot".into(),
                "cleared".into(),
                Some(20.0),
                at(10)
            ),
        ]
    );
    let detail: String = rows[0].get(6);
    assert!(detail.contains("window_60s"), "{detail}");

    eventually(Duration::from_secs(10), async || {
        (notes.lock().map(|n| n.len()).unwrap_or(0) >= 2
            && mqtt.lock().map(|m| m.len()).unwrap_or(0) >= 2)
            .then_some(())
    })
    .await;
    let notes = notes.lock().map(|n| n.clone()).unwrap_or_default();
    let mqtt = mqtt.lock().map(|m| m.clone()).unwrap_or_default();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert_eq!(mqtt.len(), 2, "{mqtt:?}");
    for (i, state) in ["raised", "cleared"].iter().enumerate() {
        let note: serde_json::Value =
            serde_json::from_str(&notes[i]).expect("NOTIFY payload is JSON");
        assert_eq!(
            (
                note["rule"].as_str(),
                note["state"].as_str(),
                note["device_id"].as_str()
            ),
            (Some("hot"), Some(*state), Some("boiler-1"))
        );
        assert_eq!(mqtt[i].0, "alerts/boiler-1");
        let published: serde_json::Value =
            serde_json::from_str(&mqtt[i].1).expect("MQTT payload is JSON");
        assert_eq!(published, note);
    }

    // Finished minutes: every reading before the last (open) minute.
    let last_bucket = at(14) / 60_000 * 60_000;
    let finished = (0..15).filter(|&i| at(i) < last_bucket).count() as i64;
    let rolled: i64 = client
        .query_one("SELECT coalesce(sum(count), 0)::int8 FROM edge.rollups_1m WHERE device_id = 'boiler-1'", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1);
    assert_eq!(rolled, finished);
    assert_eq!(gateway.metric("edge_gateway_alerts_total"), Some(2.0));
    let text = gateway.metrics();
    for state in ["raised", "cleared"] {
        let line = format!("edge_gateway_alerts_by_rule_total{{rule=\"hot\",state=\"{state}\"}} 1");
        assert!(text.contains(&line), "{line} not in\n{text}");
    }
}

/// Simulated devices with injected anomalies: the threshold rule sees
/// every spike exactly (one raise at the spike, one clear after), the
/// anomaly detector raises an alert at every spike and level shift, and
/// the alerts reach the table, LISTEN and the MQTT topic alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_anomalies_produce_the_expected_alerts() {
    use firmware_sim::AnomalyKind;
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    // Normal temperature stays below 21 + 4 + 0.5 + 6 * 0.3 = 27.3; a spike
    // adds 8 x 4 = 32, a shift 3 x 4 = 12 (so a shift stays below 40).
    let rules = format!(
        "{SPIKE_RULES}[[rules]]\nname = \"anomaly\"\nkind = \"anomaly\"\nmetric = \"temperature\"\nthreshold = 0.5\n"
    );
    let gateway = Gateway::start(&broker.url(), &pg.url(), &rules);
    let mqtt = collect_mqtt(broker.port(), "alerts/#").await;
    let (_listener, notes) = collect_notifications(&pg.url(), "edge_alerts").await;

    let start_ms = (now_ms() / 1000 - 7200) * 1000;
    let mut config = sim(
        &broker.url(),
        edge_payload::Format::NativeCbor,
        8,
        800,
        start_ms,
    );
    // One episode a device, after 160 normal readings: each is new to its
    // series (a repeat of one the series already had is not unusual to the
    // detector, see below).
    config.metrics = 1;
    config.anomalies = 1;
    config.anomaly_kinds = vec![AnomalyKind::Spike, AnomalyKind::Shift];
    config.anomaly_len = 40;
    let summary = firmware_sim::run(&config, tokio_util::sync::CancellationToken::new())
        .await
        .expect("sim");
    let client = db(&pg.url()).await;
    assert_landed(&client, &gateway, &config).await;

    let mut want = Vec::new();
    let mut episodes = Vec::new();
    for d in 0..config.devices {
        let device = firmware_sim::device_id(&config.device_prefix, d);
        for e in firmware_sim::episodes(&config, d) {
            let at = start_ms + e.start as i64 * 1000;
            if e.kind == AnomalyKind::Spike {
                want.push((device.clone(), "raised".to_string(), at));
                want.push((device.clone(), "cleared".to_string(), at + 1000));
            }
            episodes.push((device.clone(), e.kind, at));
        }
    }
    assert!(
        !want.is_empty() && episodes.len() > want.len() / 2,
        "the seed gives both kinds"
    );
    let mut got: Vec<(String, String, i64)> = client
        .query(
            "SELECT device_id, state, (extract(epoch FROM time) * 1000)::int8 FROM edge.alerts WHERE rule = 'spike'",
            &[],
        )
        .await
        .expect("spike alerts")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(
        got, want,
        "every spike alerts exactly once, nothing else does"
    );

    // The detector: every spike and shift raises an anomaly alert at most
    // 10 readings (10 s) after it starts; the delays are printed. A spike
    // or shift like one the series already had, inside the range seen so
    // far, is not unusual to the detector (see the README): a threshold
    // rule like `spike` above is what sees every repeat.
    let anomaly: Vec<(String, i64)> = client
        .query(
            "SELECT device_id, (extract(epoch FROM time) * 1000)::int8 FROM edge.alerts WHERE rule = 'anomaly' AND state = 'raised'",
            &[],
        )
        .await
        .expect("anomaly alerts")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut delays = Vec::new();
    for (device, kind, at) in &episodes {
        let delay = anomaly
            .iter()
            .filter(|(d, t)| d == device && (*at..=at + 10_000).contains(t))
            .map(|(_, t)| t - at)
            .min();
        eprintln!("detector: {kind:?} on {device} at {at}: alert after {delay:?} ms");
        delays.push((*kind, delay));
    }
    for kind in [AnomalyKind::Spike, AnomalyKind::Shift] {
        assert!(
            delays.iter().any(|(k, _)| *k == kind),
            "the seed gives a {kind:?}"
        );
    }
    assert!(
        delays.iter().all(|(_, d)| d.is_some()),
        "the detector catches every episode: {delays:?}"
    );

    let total: i64 = client
        .query_one("SELECT count(*) FROM edge.alerts", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1);
    eventually(Duration::from_secs(10), async || {
        (notes.lock().map(|n| n.len() as i64).unwrap_or(0) >= total
            && mqtt.lock().map(|m| m.len() as i64).unwrap_or(0) >= total)
            .then_some(())
    })
    .await;
    assert_eq!(notes.lock().map(|n| n.len() as i64).unwrap_or(-1), total);
    assert_eq!(mqtt.lock().map(|m| m.len() as i64).unwrap_or(-1), total);
    assert!(summary.readings > 0);
}

/// Publishes native JSON lines for one device with mosquitto_pub: reading
/// `first_seq + i` has value `values[i]` at `start_ms + (first_seq + i) * step_ms`.
fn publish_native(
    port: u16,
    device: &str,
    first_seq: usize,
    start_ms: i64,
    step_ms: i64,
    values: &[f64],
) {
    let lines: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            format!(
                r#"{{"seq":{},"ts":{},"m":{{"temperature":{v}}}}}"#,
                first_seq + i,
                start_ms + (first_seq + i) as i64 * step_ms
            )
        })
        .collect();
    mosquitto_pub(
        port,
        &format!("devices/{device}/telemetry"),
        &lines,
        Duration::ZERO,
        &[],
    );
}

/// Waits until `edge.alerts` has `n` rows, and fails the test otherwise.
async fn wait_for_alerts(client: &tokio_postgres::Client, n: i64) {
    let got = wait_for_count(
        client,
        "SELECT count(*) FROM edge.alerts",
        n,
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(got, n, "alerts so far: {:?}", alerts(client).await);
}

/// (rule, state, reason) of every alert, in time order.
async fn alerts(client: &tokio_postgres::Client) -> Vec<(String, String, String)> {
    client
        .query("SELECT rule, state, coalesce(detail->>'reason', '') FROM edge.alerts ORDER BY time, rule, state DESC", &[])
        .await
        .expect("alerts")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// SIGHUP reloads the rules without a restart and without dropping data: a
/// raised alert of a changed rule is cleared, the new rules apply at once,
/// and a config that does not validate is refused while the old rules stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_rules_without_dropping_data() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let mut gateway = Gateway::start(&broker.url(), &pg.url(), RULES);
    let client = db(&pg.url()).await;
    let start_ms = (now_ms() / 1000 - 3600) * 1000;

    publish_native(broker.port(), "boiler-2", 1, start_ms, 1000, &[20.0, 35.0]);
    wait_for_alerts(&client, 1).await;

    // "hot" moves to 50 and "cold" is new.
    gateway.rewrite_config(
        "[analytics]\nlateness_secs = 0.0\n\
         [[rules]]\nname = \"hot\"\nkind = \"above\"\nmetric = \"temperature\"\nthreshold = 50.0\n\
         [[rules]]\nname = \"cold\"\nkind = \"below\"\nmetric = \"temperature\"\nthreshold = 10.0\n",
    );
    gateway.signal("HUP");
    wait_for_alerts(&client, 2).await;
    publish_native(broker.port(), "boiler-2", 3, start_ms, 1000, &[40.0, 5.0]);
    wait_for_alerts(&client, 3).await;
    // In time order: readings are an hour old, the reload's clear is now.
    let got = alerts(&client).await;
    assert_eq!(got[0], ("hot".into(), "raised".into(), String::new()));
    assert_eq!(
        got[1],
        ("cold".into(), "raised".into(), String::new()),
        "40 is no longer hot, 5 is cold"
    );
    assert_eq!((got[2].0.as_str(), got[2].1.as_str()), ("hot", "cleared"));
    assert!(got[2].2.contains("changed or removed"), "{got:?}");

    // A broken file is refused; the gateway keeps running with its rules.
    gateway.write_raw_config("[[rules]]\nname = \"bad\"\nkind = \"above\"\n");
    gateway.signal("HUP");
    let refused = eventually(Duration::from_secs(10), async || {
        gateway.log().contains("config refused").then_some(())
    })
    .await;
    assert!(refused.is_some(), "log:\n{}", gateway.log());
    assert!(gateway.running(), "log:\n{}", gateway.log());
    publish_native(broker.port(), "boiler-2", 5, start_ms, 1000, &[60.0]);
    assert_eq!(
        wait_for_count(
            &client,
            "SELECT count(*) FROM edge.alerts",
            5,
            Duration::from_secs(20)
        )
        .await,
        5,
        "{:?}",
        alerts(&client).await
    );
    let stored = wait_for_count(
        &client,
        "SELECT count(*) FROM edge.readings",
        5,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(stored, 5, "no reading dropped across reloads");
}
