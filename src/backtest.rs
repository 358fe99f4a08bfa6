//! Backtesting the detector (the `edge-gateway replay` command): the
//! gateway's detector over recorded `timestamp,value` rows, offline, writing
//! `timestamp,value,anomaly_score` per row, for scoring detection on labelled data.

use std::io::{BufRead, BufWriter, Write};
use std::path::Path;

use crate::analytics::anomaly::Detector;
use crate::config::Config;
use crate::model::{days_from_civil, Micros, MICROS_PER_DAY, MICROS_PER_SEC};

/// Why a backtest failed.
#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Row {
        path: String,
        line: usize,
        reason: String,
    },
}

/// Parses `YYYY-MM-DD HH:MM:SS[.ffffff]` (or with `T`, optionally `Z`) as UTC.
pub fn parse_timestamp(s: &str) -> Option<Micros> {
    let s = s.trim().trim_end_matches('Z');
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-');
    let (y, m, day) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':');
    let (h, mi, se): (i64, i64, i64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    let us: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}")[..6].parse().ok()?
    };
    Some(
        days_from_civil(y, m, day) * MICROS_PER_DAY
            + (h * 3600 + mi * 60 + se) * MICROS_PER_SEC
            + us,
    )
}

/// What a replay saw.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BacktestStats {
    pub rows: usize,
    pub max_score: f64,
}

/// Runs the detector over `input`, writing scores to `output`.
///
/// # Errors
/// I/O errors, or a row without a parsable timestamp and value.
pub fn run(config: &Config, input: &Path, output: &Path) -> Result<BacktestStats, BacktestError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| BacktestError::Io { path, source }
    };
    let reader = std::io::BufReader::new(std::fs::File::open(input).map_err(io(input))?);
    let mut out = BufWriter::new(std::fs::File::create(output).map_err(io(output))?);
    writeln!(out, "timestamp,value,anomaly_score").map_err(io(output))?;
    let settings = config.anomaly.prepare();
    let mut detector = Detector::new(&settings);
    let mut stats = BacktestStats::default();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(io(input))?;
        let bad = |reason: &str| BacktestError::Row {
            path: input.display().to_string(),
            line: i + 1,
            reason: reason.to_string(),
        };
        let mut cols = line.split(',');
        let (Some(ts), Some(value)) = (cols.next(), cols.next()) else {
            return Err(bad("expected timestamp,value"));
        };
        if i == 0 && parse_timestamp(ts).is_none() {
            continue; // header
        }
        parse_timestamp(ts).ok_or_else(|| bad("timestamp is not YYYY-MM-DD HH:MM:SS"))?;
        let v: f64 = value
            .trim()
            .parse()
            .map_err(|_| bad("value is not a number"))?;
        if !v.is_finite() {
            return Err(bad("value is not finite"));
        }
        let score = detector.update(&settings, v);
        stats.rows += 1;
        stats.max_score = stats.max_score.max(score);
        writeln!(out, "{ts},{},{score:.6}", value.trim()).map_err(io(output))?;
    }
    out.flush().map_err(io(output))?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_as_utc() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:01"), Some(1_000_000));
        assert_eq!(
            parse_timestamp("2014-04-10 07:15:00.000000"),
            parse_timestamp("2014-04-10T07:15:00Z")
        );
        assert_eq!(
            parse_timestamp("2000-01-01 00:00:00.5"),
            Some(946_684_800_500_000)
        );
        assert_eq!(parse_timestamp("timestamp"), None);
    }
}
