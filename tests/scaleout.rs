//! Scale-out by topic sharding: two gateways on one broker split the fleet;
//! every reading is stored once and each device's alerts come from the one
//! instance that owns its shard.

mod common;

use common::*;
use edge_gateway::local::{mosquitto::Mosquitto, postgres::LocalPostgres};
use edge_payload::Format;
use firmware_sim::AnomalyKind;
use tokio_util::sync::CancellationToken;

const RULES: &str = r#"
[analytics]
lateness_secs = 0.0
[[rules]]
name = "spike"
kind = "above"
metric = "temperature"
threshold = 40.0
clear = 38.0
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_split_the_fleet_by_topic_shard() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let gateways: Vec<Gateway> = (0..2)
        .map(|shard| {
            let extra = format!("[mqtt]\ntopics = [\"devices/s{shard}/+/telemetry\"]\n{RULES}");
            Gateway::start(&broker.url(), &pg.url(), &extra)
        })
        .collect();

    let start_ms = (now_ms() / 1000 - 7200) * 1000;
    let mut config = sim(&broker.url(), Format::NativeCbor, 10, 600, start_ms);
    config.metrics = 1;
    config.topic = "devices/{shard}/{device}/telemetry".into();
    config.topic_shards = 2;
    config.anomalies = 3;
    config.anomaly_kinds = vec![AnomalyKind::Spike];
    let summary = firmware_sim::run(&config, CancellationToken::new())
        .await
        .expect("sim");
    let client = db(&pg.url()).await;
    assert_landed(&client, &gateways[0], &config).await;

    // What each shard should have: its devices' readings and spike alerts.
    let mut readings = [0u64; 2];
    let mut alerts = [0u64; 2];
    for d in 0..config.devices {
        let device = firmware_sim::device_id(&config.device_prefix, d);
        let shard = firmware_sim::topic_shard(&device, 2);
        readings[shard] += config.count.unwrap_or(0);
        alerts[shard] += 2 * firmware_sim::episodes(&config, d).len() as u64;
    }
    assert!(
        readings[0] > 0 && readings[1] > 0,
        "both shards have devices"
    );
    assert_eq!(readings[0] + readings[1], summary.readings);
    for (shard, gateway) in gateways.iter().enumerate() {
        assert_eq!(
            gateway.metric("edge_gateway_readings_committed_total"),
            Some(readings[shard] as f64),
            "gateway {shard}"
        );
        assert_eq!(
            gateway.metric("edge_gateway_alerts_total"),
            Some(alerts[shard] as f64),
            "gateway {shard}"
        );
    }
    let stored_alerts: i64 = client
        .query_one("SELECT count(*) FROM edge.alerts", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1);
    assert_eq!(stored_alerts as u64, alerts[0] + alerts[1]);
}
