//! The least-privilege roles of deploy/sql: the gateway runs as
//! edge_gateway, creates partitions and stores readings, and cannot drop,
//! delete or truncate what it does not own.

// A test (or bench) that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use edge_gateway::local::{mosquitto::Mosquitto, postgres::LocalPostgres};
use edge_payload::Format;
use std::process::Command;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_runs_with_least_privilege() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let admin = db(&pg.url()).await;
    admin
        .batch_execute(include_str!("../deploy/sql/roles.sql"))
        .await
        .expect("roles.sql");
    let gateway_url = pg.url().replace("postgres@", "edge_gateway@");
    let out = Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
        .args(["migrate", "--config", "/dev/null"])
        .env("GATEWAY_DATABASE_URL", &gateway_url)
        .output()
        .expect("migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    admin
        .batch_execute(include_str!("../deploy/sql/grants.sql"))
        .await
        .expect("grants.sql");

    // Late data (three days ago) needs a partition made on demand.
    let start_ms = now_ms() - 3 * 86_400_000;
    let gateway = Gateway::start(
        &broker.url(),
        &gateway_url,
        "[analytics]\nlateness_secs = 0.0\n",
    );
    let config = sim(&broker.url(), Format::SenmlCbor, 3, 200, start_ms);
    firmware_sim::run(&config, CancellationToken::new())
        .await
        .expect("sim");
    let client = db(&gateway_url).await;
    assert_landed(&client, &gateway, &config).await;

    for forbidden in [
        "DROP TABLE edge.alerts",
        "DELETE FROM edge.gateway_meta",
        "TRUNCATE edge.rollups_1m",
        "UPDATE edge.alerts SET rule = 'x'",
        "ALTER TABLE edge.device_watermarks ADD COLUMN x int",
    ] {
        let err = client.batch_execute(forbidden).await.expect_err(forbidden);
        let code = err.code().map(|c| c.code().to_string());
        assert_eq!(code.as_deref(), Some("42501"), "{forbidden}: {err:?}");
    }
}
