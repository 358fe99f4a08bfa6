//! The gateway on a Citus cluster (a coordinator and two workers, each a
//! throwaway PostgreSQL on its own port), unchanged: `migrate` distributes
//! the device tables by `device_id`, co-located; every reading lands
//! exactly once, each device's rows on one worker, also with a worker
//! stopped for 20 s and with the gateway SIGKILLed mid-run. Needs Citus
//! (`bash ../shared/citus/build.sh`): without it the tests fail saying so.

// A test (or bench) that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use edge_gateway::local::{citus::LocalCitus, mosquitto::Mosquitto};
use edge_gateway::model::MICROS_PER_DAY;
use edge_payload::Format;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

fn cluster() -> LocalCitus {
    LocalCitus::start(2, &[]).unwrap_or_else(|e| panic!("Citus cluster: {e}"))
}

/// Checks that every device's readings sit in exactly one shard of each
/// partition, on the worker `get_shard_id_for_distribution_column` names,
/// that both workers hold data, and that the device tables share one
/// co-location group.
async fn assert_each_device_on_one_worker(client: &Client, citus: &LocalCitus) {
    let partitions: Vec<String> = client
        .query(
            "SELECT inhrelid::regclass::text FROM pg_inherits WHERE inhparent = 'edge.readings'::regclass",
            &[],
        )
        .await
        .expect("partitions")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut nodes_of: HashMap<String, HashSet<i32>> = HashMap::new();
    let mut devices_seen = 0;
    for p in &partitions {
        let rows = client
            .query(
                "SELECT s.nodeport, r.result FROM run_command_on_shards($1::text::regclass, \
                 $$SELECT coalesce(string_agg(DISTINCT device_id, ','), '') FROM %s$$) r \
                 JOIN citus_shards s ON s.shardid = r.shardid",
                &[p],
            )
            .await
            .expect("rows per shard");
        for row in rows {
            let port: i32 = row.get(0);
            let devices: String = row.get(1);
            for device in devices.split(',').filter(|d| !d.is_empty()) {
                devices_seen += 1;
                nodes_of.entry(device.to_string()).or_default().insert(port);
                let expected: i32 = client
                    .query_one(
                        "SELECT nodeport FROM citus_shards WHERE shardid = get_shard_id_for_distribution_column($1::text::regclass, $2::text)",
                        &[p, &device],
                    )
                    .await
                    .expect("placement")
                    .get(0);
                assert_eq!(port, expected, "{device} in {p}");
            }
        }
    }
    assert!(devices_seen > 0, "no rows found in any shard");
    for (device, nodes) in &nodes_of {
        assert_eq!(nodes.len(), 1, "{device} spread over {nodes:?}");
    }
    let used: HashSet<i32> = nodes_of.values().flatten().copied().collect();
    let workers: HashSet<i32> = citus.workers.iter().map(|w| i32::from(w.port())).collect();
    assert_eq!(used, workers, "both workers hold devices");
    let groups: i64 = client
        .query_one(
            "SELECT count(DISTINCT colocationid) FROM pg_dist_partition WHERE logicalrelid::text = ANY($1)",
            &[&edge_gateway::sink::schema::DISTRIBUTED
                .iter()
                .map(|t| format!("edge.{t}"))
                .collect::<Vec<_>>()],
        )
        .await
        .expect("colocation")
        .get(0);
    assert_eq!(groups, 1, "device tables co-located");
}

/// Citus refused none of the gateway's alert, rollup or window rows (a
/// statement Citus does not support would be isolated and left out, and
/// only this counter would tell).
fn assert_nothing_refused(gateway: &Gateway) {
    assert_eq!(
        gateway.metric("edge_gateway_rows_rejected_total"),
        Some(0.0),
        "log:\n{}",
        gateway.log()
    );
}

/// 10 devices x 2,000 readings in each of the four formats through
/// mosquitto into the coordinator; each device on one worker; a partition
/// the gateway creates on demand for late data is distributed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_formats_land_exactly_once_each_device_on_one_worker() {
    let citus = cluster();
    let broker = Mosquitto::start().expect("mosquitto");
    let gateway = Gateway::start(&broker.url(), &citus.url(), "");
    let client = db(&citus.url()).await;
    let distributed: i64 = client
        .query_one(
            "SELECT count(*) FROM citus_tables WHERE citus_table_type = 'distributed' \
             AND table_name::text = ANY(ARRAY['edge.readings','edge.alerts','edge.rollups_1m','edge.device_watermarks','edge.message_ids'])",
            &[],
        )
        .await
        .expect("citus_tables")
        .get(0);
    assert_eq!(distributed, 5, "migrate distributed the device tables");
    four_formats(&broker.url(), &gateway, &citus.url()).await;
    assert_each_device_on_one_worker(&client, &citus).await;

    // Late data, five days back: its partition does not exist yet.
    let day = now_ms() * 1000 / MICROS_PER_DAY - 5;
    let (y, m, d) = edge_gateway::model::civil_from_days(day);
    let partition = format!("edge.readings_p{y:04}{m:02}{d:02}");
    let exists = "SELECT count(*) FROM pg_class WHERE oid = to_regclass($1)";
    let before: i64 = client
        .query_one(exists, &[&partition])
        .await
        .expect("exists")
        .get(0);
    assert_eq!(before, 0);
    let mut late = sim(
        &broker.url(),
        Format::NativeCbor,
        4,
        50,
        day * 86_400_000 + 3_600_000,
    );
    late.device_prefix = "late-".into();
    firmware_sim::run(&late, CancellationToken::new())
        .await
        .expect("sim");
    assert_landed(&client, &gateway, &late).await;
    let kind: String = client
        .query_one(
            "SELECT citus_table_type FROM citus_tables WHERE table_name = $1::text::regclass",
            &[&partition],
        )
        .await
        .expect("the new partition is a Citus table")
        .get(0);
    assert_eq!(kind, "distributed", "{partition}");
    assert_each_device_on_one_worker(&client, &citus).await;
    assert_nothing_refused(&gateway);
}

/// A worker stopped mid-run until the writers have retried for several
/// seconds: batches touching it fail, are spooled and replayed; nothing
/// lost, nothing duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_down_mid_run_loses_and_duplicates_nothing() {
    let mut citus = cluster();
    let broker = Mosquitto::start().expect("mosquitto");
    let gateway = Gateway::start(&broker.url(), &citus.url(), "");
    let start_ms = now_ms() - 3_600_000;
    let mut runs = Vec::new();
    let mut configs = Vec::new();
    for format in [Format::NativeCbor, Format::SenmlCbor] {
        let mut config = sim(&broker.url(), format, 10, 2000, start_ms);
        config.rate = 50.0;
        config.pack = 5;
        runs.push(spawn_sim(&config));
        configs.push(config);
    }
    // Down a fifth of the way in; up again after 12 failed attempts (the
    // writers back off from 50 ms: several seconds of outage).
    let committed = "edge_gateway_readings_committed_total";
    wait_metric(&gateway, committed, 16_000.0, Duration::from_secs(60)).await;
    tokio::task::block_in_place(|| citus.workers[0].stop());
    let failures = "edge_gateway_batch_failures_total";
    wait_metric(&gateway, failures, 12.0, Duration::from_secs(90)).await;
    tokio::task::block_in_place(|| citus.workers[0].restart()).expect("restart the worker");
    for run in runs {
        assert_eq!(run.await.expect("sim").readings, 40_000);
    }
    let client = db(&citus.url()).await;
    for config in &configs {
        assert_landed(&client, &gateway, config).await;
    }
    assert!(
        gateway
            .metric("edge_gateway_batch_failures_total")
            .unwrap_or(0.0)
            > 0.0,
        "the outage should have failed batches; log:\n{}",
        gateway.log()
    );
    let dead: i64 = client
        .query_one("SELECT count(*) FROM edge.dead_letters", &[])
        .await
        .expect("dead letters")
        .get(0);
    assert_eq!(dead, 0, "an unreachable worker is not the data's fault");
    assert_nothing_refused(&gateway);
    assert_each_device_on_one_worker(&client, &citus).await;
}

/// The gateway SIGKILLed mid-run and restarted: what it committed on the
/// workers and had not acknowledged is redelivered and recognised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_sigkilled_mid_run_stores_everything_once() {
    let citus = cluster();
    let broker = Mosquitto::start().expect("mosquitto");
    let mut gateway = Gateway::start(&broker.url(), &citus.url(), "");
    let start_ms = now_ms() - 3_600_000;
    let mut runs = Vec::new();
    let mut configs = Vec::new();
    for format in [Format::NativeJson, Format::SenmlJson] {
        let mut config = sim(&broker.url(), format, 10, 1000, start_ms);
        config.rate = 100.0;
        runs.push(spawn_sim(&config));
        configs.push(config);
    }
    // Killed a third of the way in.
    let committed = "edge_gateway_readings_committed_total";
    wait_metric(&gateway, committed, 12_000.0, Duration::from_secs(60)).await;
    gateway.kill();
    tokio::task::block_in_place(|| gateway.spawn());
    for run in runs {
        assert_eq!(run.await.expect("sim").readings, 20_000);
    }
    let client = db(&citus.url()).await;
    for config in &configs {
        assert_landed(&client, &gateway, config).await;
    }
    assert_nothing_refused(&gateway);
}

/// Two gateways with topic shards write to the coordinator; each commits
/// its own shard's readings and alerts, and every alert's NOTIFY reaches a
/// listener on the coordinator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_with_topic_shards_and_notify_on_the_coordinator() {
    let citus = cluster();
    let broker = Mosquitto::start().expect("mosquitto");
    let (_listener, notices) = collect_notifications(&citus.url(), "edge_alerts").await;
    let (gateways, alerts) = two_gateways_split_the_fleet(&broker.url(), &citus.url()).await;
    assert!(alerts > 0, "spikes raised alerts");
    eventually(Duration::from_secs(10), async || {
        (notices.lock().map_or(0, |n| n.len()) as i64 >= alerts).then_some(())
    })
    .await;
    assert_eq!(notices.lock().map_or(0, |n| n.len()) as i64, alerts);
    for gateway in &gateways {
        assert_nothing_refused(gateway);
    }
}
