//! `edge-gateway top`: a live view of a running gateway, refreshed every
//! second from its own HTTP endpoints (`/metrics`, `/alerts`), as `htop` or
//! `vector top` show theirs. Full screen in a terminal (ratatui); one line a
//! second with `--plain` or when stdout is not a terminal. `q` quits.

mod figures;
mod view;

use std::io::IsTerminal;
use std::time::{Duration, Instant};

pub use figures::{parse_alerts, Figures, RecentAlert, Scrape};

use crate::local::probe;

/// Why `top` could not run.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("--url: expected http://host:port, got {0:?}")]
    Url(String),
    #[error("no gateway answers at {0} (is it running, and is http.addr that address?)")]
    Unreachable(String),
    #[error("terminal: {0}")]
    Terminal(#[from] std::io::Error),
}

/// `host:port` from `http://host:port[/]`.
///
/// # Errors
/// [`TopError::Url`] for anything else.
pub fn address(url: &str) -> Result<String, TopError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| TopError::Url(url.into()))?
        .trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(rest.to_string())
        }
        _ => Err(TopError::Url(url.into())),
    }
}

/// What one refresh reads.
struct Reading {
    scrape: Scrape,
    at: Instant,
}

impl Reading {
    /// Seconds since `last`.
    fn secs_since(&self, last: &Reading) -> f64 {
        self.at.duration_since(last.at).as_secs_f64()
    }

    /// The figures between `last` and this reading.
    fn figures_since(&self, last: &Reading) -> Figures {
        Figures::between(&last.scrape, &self.scrape, self.secs_since(last))
    }
}

fn read(addr: &str) -> Option<Reading> {
    let (status, text) = probe::get(addr, "/metrics")?;
    (status == 200).then(|| Reading {
        scrape: Scrape::parse(&text),
        at: Instant::now(),
    })
}

fn alerts(addr: &str) -> Vec<RecentAlert> {
    probe::get(addr, "/alerts").map_or_else(Vec::new, |(_, body)| parse_alerts(&body))
}

/// Runs the view until `q` (or, plain, until interrupted or `seconds`
/// have passed).
///
/// # Errors
/// A bad URL, a gateway that does not answer at start, or a terminal that
/// cannot be set up.
pub fn run(url: &str, plain: bool, seconds: Option<u64>) -> Result<(), TopError> {
    let addr = address(url)?;
    let first = read(&addr).ok_or_else(|| TopError::Unreachable(url.into()))?;
    let until = seconds.map(|s| Instant::now() + Duration::from_secs(s));
    if plain || !std::io::stdout().is_terminal() {
        return run_plain(&addr, first, until);
    }
    view::run(url, &addr, first, until)
}

fn run_plain(addr: &str, mut last: Reading, until: Option<Instant>) -> Result<(), TopError> {
    use std::io::Write;
    let mut out = std::io::stdout();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        if until.is_some_and(|t| Instant::now() >= t) {
            return Ok(());
        }
        let Some(now) = read(addr) else {
            writeln!(out, "gateway not answering at {addr}")?;
            continue;
        };
        let figures = now.figures_since(&last);
        let newest = alerts(addr)
            .first()
            .map(|a| {
                format!(
                    " | last alert {} {} {}/{}",
                    a.state, a.rule, a.device_id, a.metric
                )
            })
            .unwrap_or_default();
        writeln!(out, "{}{newest}", figures.line())?;
        out.flush()?;
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_host_and_port() {
        assert_eq!(
            address("http://127.0.0.1:9187").ok().as_deref(),
            Some("127.0.0.1:9187")
        );
        assert_eq!(address("http://gw:80/").ok().as_deref(), Some("gw:80"));
        assert!(address("https://x:1").is_err());
        assert!(address("http://x").is_err());
    }
}
