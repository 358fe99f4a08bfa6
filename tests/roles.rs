//! The gateway's database sessions: the least-privilege roles of
//! deploy/sql (the gateway runs as edge_gateway, creates partitions and
//! stores readings, and cannot drop, delete or truncate what it does not
//! own), and the settings its sessions ask for.

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

/// The gateway's sessions ask for their written pages to be flushed as they
/// go (`database.flush_after_kb`, as `backend_flush_after`), and the URL's
/// own options still apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_flush_their_writes_and_keep_the_urls_options() {
    use edge_gateway::sink::connection::{connect, Db};
    use edge_gateway::sink::settings::DatabaseConfig;
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let show = |client: tokio_postgres::Client, name: &'static str| async move {
        client
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_default()
    };
    let sep = if pg.url().contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}options=-c%20work_mem%3D7MB", pg.url());
    let settings = DatabaseConfig {
        url,
        ..DatabaseConfig::default()
    };
    let db = Db::new(&settings).expect("settings");
    let client = connect(&db).await.expect("connect");
    assert_eq!(show(client, "backend_flush_after").await, "2MB");
    let client = connect(&db).await.expect("connect");
    assert_eq!(show(client, "work_mem").await, "7MB");
    let off = Db::new(&DatabaseConfig {
        flush_after_kb: 0,
        ..settings
    })
    .expect("settings");
    let client = connect(&off).await.expect("connect");
    assert_eq!(show(client, "backend_flush_after").await, "0");
}
