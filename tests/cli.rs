//! The command line as an operator meets it: check-config, bad config, migrate.

// A test (or bench) that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Output};

use edge_gateway::local::postgres::LocalPostgres;

fn gateway(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edge-gateway"));
    cmd.args(args)
        .env_remove("GATEWAY_MQTT_URL")
        .env_remove("GATEWAY_DATABASE_URL")
        .env_remove("GATEWAY_HTTP_ADDR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run edge-gateway")
}

fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, text).expect("write config");
    let path = path.display().to_string();
    (dir, path)
}

/// Runs `migrate` with `config` against `url` and asserts it succeeded.
fn migrate_ok(config: &str, url: &str) {
    let out = gateway(
        &["migrate", "--config", config],
        &[("GATEWAY_DATABASE_URL", url)],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The first (text) column of `sql` on the database at `url`.
fn column(url: &str, sql: &str) -> Vec<String> {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = common::db(url).await;
        client
            .query(sql, &[])
            .await
            .expect(sql)
            .iter()
            .map(|r| r.get(0))
            .collect()
    })
}

#[test]
fn check_config_prints_effective_config_without_secrets() {
    let (_dir, path) = config_file(
        "[database]\nurl = \"postgresql://gw:file-secret@db:5432/x\"\nbatch_rows = 5000\n",
    );
    let out = gateway(
        &["check-config", "--config", &path],
        &[
            ("GATEWAY_MQTT_URL", "mqtt://broker.example:1884"),
            ("GATEWAY_HTTP_ADDR", "127.0.0.1:9999"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("batch_rows = 5000"), "{text}");
    assert!(
        text.contains("mqtt://broker.example:1884"),
        "env override not applied: {text}"
    );
    assert!(text.contains("127.0.0.1:9999"), "{text}");
    assert!(
        text.contains("host=db port=5432 dbname=x user=gw"),
        "{text}"
    );
    assert!(
        !text.contains("postgresql://"),
        "a connection string was printed: {text}"
    );
    assert!(!text.contains("file-secret"), "{text}");

    let out = gateway(
        &["check-config", "--config", &path],
        &[("GATEWAY_DATABASE_URL", "postgresql://gw:env-secret@db2/y")],
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success());
    assert!(all.contains("db2") && !all.contains("env-secret"), "{all}");
}

#[test]
fn bad_config_names_the_key_and_the_reason() {
    for (text, needles) in [
        ("[database]\nbatch_rowz = 1\n", &["batch_rowz"][..]),
        (
            "[database]\nwriters = 0\n",
            &["database.writers", "1 to 64"],
        ),
        (
            "[mqtt]\ntopics = [\"devices/#\"]\n",
            &["mqtt.topics[0]", "'+'"],
        ),
        ("[mqtt]\nurl = \"http://x\"\n", &["mqtt.url", "mqtt://"]),
        (
            "[database]\npartition = \"weekly\"\n",
            &["partition", "weekly"],
        ),
    ] {
        let (_dir, path) = config_file(text);
        let out = gateway(&["check-config", "--config", &path], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text} accepted");
        for needle in needles {
            assert!(err.contains(needle), "{text}: {needle:?} not in {err}");
        }
    }
    let out = gateway(
        &["check-config", "--config", "/nonexistent/gateway.toml"],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/gateway.toml"));
}

#[test]
fn migrate_creates_schema_and_partitions() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let (_dir, path) = config_file("[database]\npartitions_ahead = 3\n");
    // Idempotent: a second run changes nothing and succeeds.
    migrate_ok(&path, &pg.url());
    migrate_ok(&path, &pg.url());
    let tables = column(
        &pg.url(),
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'edge' ORDER BY 1",
    );
    for t in [
        "alerts",
        "dead_letters",
        "device_watermarks",
        "rollups_1m",
        "message_ids",
        "applied_batches",
    ] {
        assert!(
            tables.contains(&t.to_string()),
            "{t} missing from {tables:?}"
        );
    }
    // Yesterday, today and three ahead.
    let partitions = tables
        .iter()
        .filter(|t| t.starts_with("readings_p"))
        .count();
    assert_eq!(partitions, 5, "{tables:?}");
}

#[test]
fn replay_scores_every_row_and_the_spike_highest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("in.csv");
    let output = dir.path().join("out.csv");
    let mut csv = String::from("timestamp,value\n");
    for i in 0..3000 {
        let v = if i == 2500 {
            80.0
        } else {
            20.0 + ((i * 37) % 10) as f64 * 0.1
        };
        csv.push_str(&format!(
            "2024-01-01 {:02}:{:02}:{:02},{v}\n",
            i / 3600,
            i / 60 % 60,
            i % 60
        ));
    }
    std::fs::write(&input, csv).expect("write input");
    let out = gateway(
        &[
            "replay",
            "--input",
            &input.display().to_string(),
            "--output",
            &output.display().to_string(),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&output).expect("output");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("timestamp,value,anomaly_score"));
    let rows: Vec<(String, f64)> = lines
        .map(|l| {
            let cols: Vec<&str> = l.split(',').collect();
            (cols[0].to_string(), cols[2].parse().expect("score"))
        })
        .collect();
    assert_eq!(rows.len(), 3000);
    assert!(rows.iter().all(|r| (0.0..=1.0).contains(&r.1)));
    let top = rows
        .iter()
        .enumerate()
        .max_by(|a, b| a.1 .1.total_cmp(&b.1 .1))
        .map(|(i, _)| i);
    assert_eq!(top, Some(2500), "the spike scores highest");
    assert_eq!(rows[2500].0, "2024-01-01 00:41:40");

    let bad = dir.path().join("bad.csv");
    std::fs::write(&bad, "timestamp,value\n2024-01-01 00:00:00,abc\n").expect("write");
    let out = gateway(
        &[
            "replay",
            "--input",
            &bad.display().to_string(),
            "--output",
            &output.display().to_string(),
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2"));
}

#[test]
fn migrate_creates_the_cdc_publication_when_asked() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let (_dir, path) = config_file("[database]\npublication = \"edge_cdc\"\n");
    migrate_ok(&path, &pg.url());
    let tables = column(
        &pg.url(),
        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = 'edge_cdc' ORDER BY 1",
    );
    assert_eq!(
        tables,
        vec!["edge.alerts".to_string(), "edge.readings".to_string()]
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    // An unreachable database makes `run` log retry warnings.
    let port = edge_gateway::local::free_port().expect("port");
    let (dir, path) = config_file(&format!(
        "[database]\nurl = \"postgresql://nobody@127.0.0.1:{port}/x\"\nretry_min_ms = 20\n[http]\naddr = \"\"\n"
    ));
    let log = dir.path().join("stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
        .args(["--log-format", "json", "run", "--config", &path])
        .env_remove("GATEWAY_DATABASE_URL")
        .env_remove("GATEWAY_HTTP_ADDR")
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("run");
    // Two retries logged, then stop it.
    let retried = common::eventually_blocking(std::time::Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.matches("database not ready; retrying").count() >= 2).then_some(())
    });
    assert!(retried.is_some(), "no retries logged");
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!lines.is_empty(), "no log lines");
    let retry = lines
        .iter()
        .find(|v| v["fields"]["message"].as_str() == Some("database not ready; retrying"))
        .unwrap_or_else(|| panic!("no retry warning in {text}"));
    assert_eq!(retry["level"].as_str(), Some("WARN"));
    assert!(retry["fields"]["retry_in_ms"].is_u64(), "{retry}");
}

/// `demo` as a new user runs it: alerts in the live line, then the table of
/// injected anomalies against the ground truth, every spike and level
/// shift caught.
#[test]
fn demo_shows_alerts_live_and_ends_with_the_detection_table() {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
        .args(["demo", "--seconds", "12", "--devices", "20"])
        .env("RUST_LOG", "error")
        .output()
        .expect("run demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines().any(|l| l.contains(" alerts  last: raised")),
        "no alert in the live line:\n{text}"
    );
    for kind in ["spike", "shift", "drift", "stuck", "dropout"] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(kind)),
            "no {kind} row:\n{text}"
        );
    }
    assert!(text.contains("false alarms:"), "{text}");
    assert!(
        text.contains("every injected spike and level shift raised an alert"),
        "{text}"
    );
    assert!(
        text.contains("every published reading is in PostgreSQL, none twice"),
        "{text}"
    );
}
