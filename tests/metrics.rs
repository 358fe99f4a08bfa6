//! `/metrics`, `/healthz` and `/readyz` during a run: the counters match
//! what was published and what PostgreSQL holds.

// A test (or bench) that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use edge_gateway::local::{mosquitto::Mosquitto, postgres::LocalPostgres};
use edge_payload::Format;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_what_was_published_and_committed() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let gateway = Gateway::start(&broker.url(), &pg.url(), "");
    assert_eq!(
        http_get(gateway.http_port, "/healthz").map(|r| r.0),
        Some(200)
    );
    assert_eq!(
        http_get(gateway.http_port, "/readyz").map(|r| r.0),
        Some(200)
    );
    assert_eq!(http_get(gateway.http_port, "/nope").map(|r| r.0), Some(404));

    let start_ms = now_ms() - 3_600_000;
    let mut config = sim(&broker.url(), Format::SenmlJson, 5, 300, start_ms);
    config.pack = 3;
    config.malformed_rate = 0.05;
    // Scrape while the run is going on: the text must always parse.
    let run = tokio::spawn({
        let config = config.clone();
        async move { firmware_sim::run(&config, CancellationToken::new()).await }
    });
    eventually(Duration::from_secs(120), async || {
        let text = gateway.metrics();
        assert!(
            text.lines()
                .all(|l| l.starts_with('#') || l.split_whitespace().count() == 2),
            "{text}"
        );
        run.is_finished().then_some(())
    })
    .await;
    let summary = run.await.expect("sim task").expect("sim");
    let client = db(&pg.url()).await;
    assert_landed(&client, &gateway, &config).await;

    eventually(Duration::from_secs(10), async || {
        (gateway.metric("edge_gateway_acks_sent_total")? >= summary.messages as f64).then_some(())
    })
    .await;
    let stored: i64 = client
        .query_one("SELECT count(*) FROM edge.readings", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1);
    let dead: i64 = client
        .query_one("SELECT count(*) FROM edge.dead_letters", &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1);
    let m = |name: &str| gateway.metric(name).unwrap_or(-1.0);
    assert_eq!(
        m("edge_gateway_messages_received_total"),
        summary.messages as f64
    );
    assert_eq!(
        m("edge_gateway_messages_committed_total"),
        summary.messages as f64
    );
    assert_eq!(m("edge_gateway_acks_sent_total"), summary.messages as f64);
    assert_eq!(m("edge_gateway_readings_committed_total"), stored as f64);
    assert_eq!(
        m("edge_gateway_readings_decoded_total"),
        summary.readings as f64
    );
    assert_eq!(stored as u64, summary.readings);
    assert_eq!(dead as u64, summary.malformed);
    let text = gateway.metrics();
    let dead_total: f64 = text
        .lines()
        .filter(|l| l.starts_with("edge_gateway_dead_letters_total{"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .sum();
    assert_eq!(dead_total, dead as f64);
    assert!(m("edge_gateway_batches_committed_total") >= 1.0);
    assert_eq!(m("edge_gateway_mqtt_connected"), 1.0);
    assert_eq!(m("edge_gateway_db_connected"), 1.0);
    assert!(text.contains("edge_gateway_copy_seconds_bucket{le=\"+Inf\"}"));
    // One reading-to-commit sample per committed message with rows.
    assert_eq!(
        m("edge_gateway_reading_to_commit_seconds_count"),
        (summary.messages - summary.malformed) as f64
    );
    assert!(text.contains("edge_gateway_ring_occupancy{shard=\"0\"}"));
    assert!(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .all(|l| l.starts_with("edge_gateway_")));
}
