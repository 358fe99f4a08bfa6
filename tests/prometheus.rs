//! The shipped alert rules (`deploy/prometheus/alerts.yml`) in a real
//! Prometheus scraping a real gateway: the database-down, no-input and
//! dead-letter alerts fire when their cause is there and resolve when it is
//! gone, read back from Prometheus's HTTP API.
//!
//! Time is scaled: the shipped `prometheus.yml` with 1 s scrape and
//! evaluation intervals, and every duration of the rules (`for:` and range
//! selectors) read in seconds instead of minutes, so a rule's logic is the
//! shipped one and a 15-minute window lasts 15 s.

// A test that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use edge_gateway::local::{free_port, mosquitto::Mosquitto, postgres::LocalPostgres, probe};
use edge_payload::Format;
use tokio_util::sync::CancellationToken;

/// A throwaway Prometheus with the shipped config and scaled rules.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        probe::terminate(&mut self.child, Duration::from_secs(10));
    }
}

/// The rules with minutes read as seconds (and an hour as a minute): every
/// duration (digits and a unit, standing alone) in `for:` and in range
/// selectors.
fn scaled_rules(text: &str) -> String {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let starts = c.is_ascii_digit() && !text[..i].chars().next_back().is_some_and(word);
        if !starts {
            out.push(c);
            continue;
        }
        let end = text[i..]
            .find(|c: char| !c.is_ascii_digit())
            .map_or(text.len(), |n| i + n);
        let digits = &text[i..end];
        let unit = text[end..].chars().next();
        let alone = !text[end..].chars().nth(1).is_some_and(word);
        let scaled = match (unit, alone) {
            (Some('m'), true) => Some(format!("{digits}s")),
            (Some('h'), true) => Some(format!("{}s", digits.parse::<u64>().unwrap_or(1) * 60)),
            _ => None,
        };
        let skip = match scaled {
            Some(s) => {
                out.push_str(&s);
                digits.len()
            }
            None => {
                out.push_str(digits);
                digits.len() - 1
            }
        };
        for _ in 0..skip {
            chars.next();
        }
    }
    out
}

impl Prometheus {
    /// Starts Prometheus scraping the gateway's `/metrics` on `target_port`.
    fn start(target_port: u16) -> Prometheus {
        assert!(
            Command::new("prometheus").arg("--version").output().is_ok(),
            "prometheus not found: install it (Debian: apt-get install prometheus)"
        );
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
        let dir = tempfile::tempdir().expect("temp dir");
        let rules = std::fs::read_to_string(deploy.join("alerts.yml")).expect("alerts.yml");
        let rules_path = dir.path().join("alerts.yml");
        std::fs::write(&rules_path, scaled_rules(&rules)).expect("write rules");
        let shipped =
            std::fs::read_to_string(deploy.join("prometheus.yml")).expect("prometheus.yml");
        let config = shipped
            .replace("scrape_interval: 10s", "scrape_interval: 1s")
            .replace("evaluation_interval: 10s", "evaluation_interval: 1s")
            .replace(
                "/etc/prometheus/alerts.yml",
                &rules_path.display().to_string(),
            )
            .replace("gateway:9187", &format!("127.0.0.1:{target_port}"));
        assert!(
            config.contains(&format!("127.0.0.1:{target_port}")) && config.contains("1s"),
            "the shipped prometheus.yml changed shape:\n{shipped}"
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let port = free_port().expect("port");
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus {
            child,
            port,
            _dir: dir,
        };
        let ready = eventually_blocking(Duration::from_secs(30), || {
            (probe::http_get(port, "/-/ready")?.0 == 200).then_some(())
        });
        assert!(ready.is_some(), "prometheus not ready");
        prometheus
    }

    /// The state of alert `name` ("firing", "pending"), or `None` when it is
    /// not active.
    fn alert_state(&self, name: &str) -> Option<String> {
        let (_, body) = probe::http_get(self.port, "/api/v1/alerts")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .and_then(|a| a["state"].as_str().map(String::from))
    }

    /// Waits until alert `name` is firing.
    async fn fires(&self, name: &str) {
        let firing = eventually(Duration::from_secs(90), async || {
            (self.alert_state(name).as_deref() == Some("firing")).then_some(())
        })
        .await;
        assert!(firing.is_some(), "{name} never fired");
    }

    /// Waits until alert `name` is no longer active.
    async fn resolves(&self, name: &str) {
        let resolved = eventually(Duration::from_secs(90), async || {
            self.alert_state(name).is_none().then_some(())
        })
        .await;
        assert!(resolved.is_some(), "{name} never resolved");
    }
}

/// Simulated devices publishing until stopped, `malformed` of the messages
/// malformed.
fn devices(
    broker: &str,
    prefix: &str,
    malformed: f64,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let mut config = sim(broker, Format::NativeCbor, 5, 1, now_ms());
    config.rate = 10.0;
    config.pack = 1;
    config.malformed_rate = malformed;
    config.device_prefix = prefix.into();
    config.client_id = format!("sim-{prefix}");
    spawn_sim_until_stopped(&config)
}

#[test]
fn durations_are_scaled_from_minutes_to_seconds() {
    assert_eq!(
        scaled_rules(
            "rate(x_total[15m]) == 0\n        for: 5m\n increase(y[1h]) > 0 metric_2m_total 10ms"
        ),
        "rate(x_total[15s]) == 0\n        for: 5s\n increase(y[60s]) > 0 metric_2m_total 10ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_no_input_and_dead_letters_fire_and_resolve() {
    let mut pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let gateway = Gateway::start(&broker.url(), &pg.url(), "");
    let prometheus = Prometheus::start(gateway.http_port);

    // Input flowing, all of it good: no alert.
    let (stop, task) = devices(&broker.url(), "good-", 0.0);
    wait_metric(
        &gateway,
        "edge_gateway_readings_committed_total",
        200.0,
        Duration::from_secs(30),
    )
    .await;

    // The database goes away: EdgeGatewayDatabaseDown, then back.
    tokio::task::block_in_place(|| pg.stop());
    prometheus.fires("EdgeGatewayDatabaseDown").await;
    tokio::task::block_in_place(|| pg.restart()).expect("restart PostgreSQL");
    prometheus.resolves("EdgeGatewayDatabaseDown").await;

    // A tenth of the messages malformed: EdgeGatewayDeadLettersRising.
    let (bad_stop, bad_task) = devices(&broker.url(), "bad-", 0.1);
    prometheus.fires("EdgeGatewayDeadLettersRising").await;
    bad_stop.cancel();
    bad_task.await.expect("bad devices");
    prometheus.resolves("EdgeGatewayDeadLettersRising").await;

    // Input stops: EdgeGatewayNoInput; it resumes: resolved.
    stop.cancel();
    task.await.expect("devices");
    prometheus.fires("EdgeGatewayNoInput").await;
    let (stop, task) = devices(&broker.url(), "again-", 0.0);
    prometheus.resolves("EdgeGatewayNoInput").await;
    stop.cancel();
    task.await.expect("devices");
    assert_eq!(prometheus.alert_state("EdgeGatewayDatabaseDown"), None);
}
