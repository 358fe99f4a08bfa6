//! `edge-gateway top` against a gateway under load: in a real terminal
//! (tmux: `new-session -d`, `send-keys`, `capture-pane`) the live figures
//! move and an injected spike's alert appears, `q` quits and leaves the
//! terminal usable; `--plain` without a terminal prints a line a second.

// A test that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use edge_gateway::local::{mosquitto::Mosquitto, postgres::LocalPostgres};
use edge_payload::Format;
use tokio_util::sync::CancellationToken;

/// A detached tmux session running a shell, killed when dropped.
struct Tmux {
    name: String,
}

impl Tmux {
    fn start(name: &str) -> Tmux {
        assert!(
            Command::new("tmux").arg("-V").output().is_ok(),
            "tmux not found: install it (Debian: apt-get install tmux)"
        );
        let status = Command::new("tmux")
            .args(["new-session", "-d", "-s", name, "-x", "150", "-y", "45"])
            .args(["bash", "--norc", "--noprofile"])
            .env("TERM", "xterm-256color")
            .status()
            .expect("tmux new-session");
        assert!(status.success(), "tmux new-session failed");
        Tmux { name: name.into() }
    }

    fn send(&self, keys: &[&str]) {
        let status = Command::new("tmux")
            .args(["send-keys", "-t", &self.name])
            .args(keys)
            .status()
            .expect("tmux send-keys");
        assert!(status.success());
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.name])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether the pane shows the alternate screen (a full-screen program).
    fn alternate_on(&self) -> bool {
        let out = Command::new("tmux")
            .args(["display-message", "-p", "-t", &self.name, "#{alternate_on}"])
            .output()
            .expect("tmux display-message");
        String::from_utf8_lossy(&out.stdout).trim() == "1"
    }

    async fn shows(&self, what: &str, check: impl Fn(&str) -> bool) -> String {
        let screen = eventually(Duration::from_secs(60), async || {
            let screen = self.screen();
            check(&screen).then_some(screen)
        })
        .await;
        screen.unwrap_or_else(|| panic!("{what} never on the screen:\n{}", self.screen()))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .status();
    }
}

/// The number on the screen line that starts (after the border) with `label`.
fn figure(screen: &str, label: &str) -> Option<f64> {
    let line = screen.lines().find(|l| l.contains(label))?;
    let after = &line[line.find(label)? + label.len()..];
    after
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .find(|s| !s.is_empty())?
        .parse()
        .ok()
}

/// Devices publishing until stopped.
fn load(broker: &str) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let mut config = sim(broker, Format::NativeCbor, 10, 1, now_ms());
    config.rate = 20.0;
    config.pack = 2;
    spawn_sim_until_stopped(&config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_live_figures_and_alerts_and_q_leaves_the_terminal_usable() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let gateway = Gateway::start(&broker.url(), &pg.url(), SPIKE_RULES);
    let (stop, task) = load(&broker.url());

    let tmux = Tmux::start(&format!("edge-top-{}", gateway.http_port));
    let command = format!(
        "{} top --url http://127.0.0.1:{}",
        env!("CARGO_BIN_EXE_edge-gateway"),
        gateway.http_port
    );
    tmux.send(&[&command, "Enter"]);

    // Live figures: a committed rate above zero, and totals that move.
    let committed = "readings committed";
    let first = tmux
        .shows("a committed rate", |s| {
            figure(s, "committed, readings/s").is_some_and(|v| v > 0.0)
        })
        .await;
    let total = figure(&first, committed).unwrap_or(0.0);
    tmux.shows("the committed total moving", |s| {
        figure(s, committed).is_some_and(|v| v > total)
    })
    .await;
    assert!(tmux.alternate_on(), "full screen while running");

    // A spike crosses the rule: its alert appears on the screen.
    mosquitto_pub(
        broker.port(),
        "devices/spiker/telemetry",
        &[format!(
            r#"{{"seq":1,"ts":{},"m":{{"temperature":100}}}}"#,
            now_ms()
        )],
        Duration::ZERO,
        &[],
    );
    tmux.shows("the spike's alert", |s| {
        s.lines()
            .any(|l| l.contains("raised") && l.contains("spiker") && l.contains("spike"))
    })
    .await;

    // q quits; the shell is back, out of the alternate screen, echoing.
    tmux.send(&["q"]);
    let back = eventually(Duration::from_secs(10), async || {
        (!tmux.alternate_on()).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "still full screen after q:\n{}",
        tmux.screen()
    );
    tmux.send(&["echo usable-$((6 * 7))", "Enter"]);
    tmux.shows("the shell answering", |s| s.contains("usable-42"))
        .await;

    stop.cancel();
    task.await.expect("load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_top_without_a_terminal_prints_a_line_a_second() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let gateway = Gateway::start(&broker.url(), &pg.url(), "");
    let (stop, task) = load(&broker.url());
    wait_metric(
        &gateway,
        "edge_gateway_readings_committed_total",
        100.0,
        Duration::from_secs(30),
    )
    .await;
    let url = format!("http://127.0.0.1:{}", gateway.http_port);
    // stdout is a pipe here, not a terminal: plain without being asked.
    let out = tokio::task::block_in_place(|| {
        Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
            .args(["top", "--url", &url, "--seconds", "4"])
            .stdin(Stdio::null())
            .output()
            .expect("run top")
    });
    stop.cancel();
    task.await.expect("load");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len() >= 2, "{text}");
    for line in &lines {
        assert!(
            line.contains("msg/s") && line.contains("db up") && line.contains("mqtt up"),
            "{line}"
        );
    }
    assert!(
        lines.iter().any(|l| !l.contains("committed 0/s")),
        "a committed rate above zero: {text}"
    );
    assert!(!text.contains('\u{1b}'), "no escape codes in plain output");

    // A gateway that is not there is an error that says so.
    let out = Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
        .args(["top", "--plain", "--url", "http://127.0.0.1:1"])
        .output()
        .expect("run top");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no gateway answers"));
}
