//! Configuration: TOML with a default for every key, unknown keys rejected,
//! environment overrides on top, then [`Config::validate`].
//!
//! Each stage owns the settings of its section (`source::settings` the
//! `[mqtt]` keys, `sink::settings` `[database]`, `[spool]` and
//! `[retention]`, `analytics` its own); this module gathers them into one
//! file with the sections that belong to no single stage, and knows no
//! driver: connections are built by the stage that uses them.
//!
//! Every error names the key (`database.batch_rows`) and the reason, so an
//! operator can fix the file without reading code. `config/gateway.toml`
//! documents every key with its default; the `///` docs here are the same text.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Environment variable overriding `mqtt.url`.
pub const ENV_MQTT_URL: &str = "GATEWAY_MQTT_URL";
/// Environment variable overriding `database.url`.
pub const ENV_DATABASE_URL: &str = "GATEWAY_DATABASE_URL";
/// Environment variable overriding `http.addr`.
pub const ENV_HTTP_ADDR: &str = "GATEWAY_HTTP_ADDR";

mod validate;

pub use crate::decode::{Limits as LimitsConfig, MAX_KEY_TEXT_BYTES};
pub use crate::settings::Invalid;
pub use crate::sink::connection::describe_database;
pub use crate::sink::settings::{DatabaseConfig, PartitionInterval, RetentionConfig, SpoolConfig};
pub use crate::source::settings::{MqttConfig, Protocol, ENV_MQTT_PASSWORD};

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error(transparent)]
    Invalid(#[from] Invalid),
}

/// The whole gateway configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub mqtt: MqttConfig,
    pub database: DatabaseConfig,
    pub pipeline: PipelineConfig,
    pub spool: SpoolConfig,
    pub dedup: DedupConfig,
    pub analytics: crate::analytics::engine::AnalyticsConfig,
    pub anomaly: crate::analytics::anomaly::AnomalyConfig,
    pub http: HttpConfig,
    pub limits: LimitsConfig,
    pub retention: RetentionConfig,
    /// `[[rules]]`: alert rules (see `config/rules.example.toml`).
    pub rules: Vec<crate::analytics::rules::RuleConfig>,
}

/// `[pipeline]`: shards and intake checks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Shard workers; 0 means one per CPU core.
    pub shards: usize,
    /// Messages each shard's ring buffer holds; a full ring pauses intake.
    pub ring_capacity: usize,
    /// Readings timed more than this many seconds in the future are rejected.
    pub max_future_skew_secs: u64,
    /// On SIGTERM/SIGINT, how long draining (flush, commit, ack) may take, in
    /// seconds; what is not acknowledged by then is redelivered by the broker.
    pub shutdown_timeout_secs: u64,
    /// Seconds between the periodic summary log lines (0 = none).
    pub summary_interval_secs: u64,
    /// A writer with work pending that makes no progress (no commit, no
    /// spool write) for this many seconds fails readiness; one that can
    /// neither commit nor spool for this long stops the gateway, which exits
    /// non-zero for its supervisor to restart it (nothing unsaved is acked).
    pub stall_secs: u64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            shards: 0,
            ring_capacity: 4096,
            max_future_skew_secs: 600,
            shutdown_timeout_secs: 30,
            summary_interval_secs: 30,
            stall_secs: 60,
        }
    }
}

/// `[dedup]`: dropping redelivered and re-sent messages.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DedupConfig {
    /// How long identities of messages without a sequence (SenML) are
    /// remembered, in seconds. Keep it at least as long as the broker keeps
    /// the gateway's session (`mqtt.session_expiry_secs`).
    pub horizon_secs: u64,
    /// Most identities remembered per shard (about 50 bytes each in memory).
    pub max_identities: usize,
}

impl Default for DedupConfig {
    fn default() -> Self {
        DedupConfig {
            horizon_secs: 86_400,
            max_identities: 1_000_000,
        }
    }
}

impl From<&Config> for crate::shard::worker::WorkerConfig {
    /// A shard worker's share of the settings.
    fn from(config: &Config) -> Self {
        crate::shard::worker::WorkerConfig {
            batch_rows: config.database.batch_rows,
            flush_interval: config.flush_interval(),
            max_payload_bytes: config.mqtt.max_payload_bytes,
            max_future: config.pipeline.max_future_skew_secs as i64 * crate::model::MICROS_PER_SEC,
            max_past: i64::from(config.database.retention_days) * crate::model::MICROS_PER_DAY,
            limits: config.limits,
            partitions: config.database.partition,
        }
    }
}

/// `[http]`: metrics and health endpoints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address for `/metrics`, `/healthz`, `/readyz`
    /// (`GATEWAY_HTTP_ADDR` overrides). Empty disables the server.
    pub addr: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            addr: "127.0.0.1:9187".into(),
        }
    }
}

impl Config {
    /// Reads `path` (or starts from defaults when `None`), applies the
    /// environment overrides, and validates.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, the key and the reason.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                Config::from_toml(&text).map_err(|message| ConfigError::Parse {
                    path: path.display().to_string(),
                    message,
                })?
            }
            None => Config::default(),
        };
        config.apply_env(|key| std::env::var(key).ok());
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text; unknown keys are errors.
    ///
    /// # Errors
    /// The parser's message, which names the key and line.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    /// Applies `GATEWAY_*` overrides; `get` reads a variable.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(url) = get(ENV_MQTT_URL) {
            self.mqtt.url = url;
        }
        if let Some(url) = get(ENV_DATABASE_URL) {
            self.database.url = url;
        }
        if let Some(addr) = get(ENV_HTTP_ADDR) {
            self.http.addr = addr;
        }
    }

    /// Shard count with `0` resolved to the number of cores.
    pub fn shard_count(&self) -> usize {
        match self.pipeline.shards {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        }
    }

    /// Flush interval as a duration.
    pub fn flush_interval(&self) -> Duration {
        self.database.flush_interval()
    }

    /// The effective configuration as TOML with secrets masked, for
    /// `check-config` and logs.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database.url = format!("<not shown: {}>", describe_database(&shown.database.url));
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert!(Config::default().validate().is_ok());
    }

    /// The shipped file documents every key, with the default value.
    #[test]
    fn shipped_file_is_the_defaults_and_lists_every_key() {
        let shipped = include_str!("../../config/gateway.toml");
        assert_eq!(Config::from_toml(shipped), Ok(Config::default()));
        let defaults: toml::Table =
            toml::from_str(&Config::default().to_redacted_toml()).unwrap_or_default();
        let file: toml::Table = toml::from_str(shipped).unwrap_or_default();
        for (section, keys) in &defaults {
            for key in keys.as_table().into_iter().flat_map(|t| t.keys()) {
                assert!(
                    file.get(section).and_then(|s| s.get(key)).is_some(),
                    "config/gateway.toml lacks {section}.{key}"
                );
            }
        }
    }

    #[test]
    fn example_rules_are_valid() {
        let text = include_str!("../../config/rules.example.toml");
        let config = Config::from_toml(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.rules.len(), 7);
        assert!(config.validate().is_ok(), "{:?}", config.validate());
        let mut bad = config.clone();
        bad.rules[0].clear = Some(90.0);
        match bad.validate() {
            Err(ConfigError::Invalid(Invalid { key, reason })) => {
                assert_eq!(key, "rules[0] (overheat)");
                assert!(reason.contains("hysteresis"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("[database]\nbatch_rowz = 5\n")
            .err()
            .unwrap_or_default();
        assert!(err.contains("batch_rowz"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        for (toml, key) in [
            ("[database]\nbatch_rows = 0", "database.batch_rows"),
            (
                "[database]\nflush_after_kb = 4096",
                "database.flush_after_kb",
            ),
            ("[database]\nschema = \"Edge; drop\"", "database.schema"),
            ("[mqtt]\nurl = \"http://x\"", "mqtt.url"),
            ("[mqtt]\nurl = \"mqtts://x\"", "mqtt.ca_file"),
            ("[mqtt]\ncert_file = \"/etc/hostname\"", "mqtt.key_file"),
            ("[mqtt]\nca_file = \"/nonexistent.pem\"", "mqtt.ca_file"),
            ("[mqtt]\ntopics = [\"devices/#\"]", "mqtt.topics[0]"),
            ("[http]\naddr = \"nope\"", "http.addr"),
        ] {
            let config = Config::from_toml(toml).unwrap_or_default();
            match config.validate() {
                Err(ConfigError::Invalid(Invalid { key: k, .. })) => assert_eq!(k, key),
                other => panic!("{toml}: {other:?}"),
            }
        }
    }

    #[test]
    fn env_overrides_file() {
        let mut config = Config::from_toml("[mqtt]\nurl = \"mqtt://a:1\"").unwrap_or_default();
        config.apply_env(|k| match k {
            ENV_MQTT_URL => Some("mqtt://b:2".into()),
            ENV_HTTP_ADDR => Some("127.0.0.1:1".into()),
            _ => None,
        });
        assert_eq!(config.mqtt.url, "mqtt://b:2");
        assert_eq!(config.http.addr, "127.0.0.1:1");
        assert_eq!(
            config.mqtt.broker_addr().ok(),
            Some(crate::source::settings::BrokerAddr {
                host: "b".into(),
                port: 2,
                tls: false
            })
        );
    }

    #[test]
    fn connection_strings_are_never_shown() {
        for (url, secret) in [
            ("postgresql://gw:s3cret@db:5432/x", "s3cret"),
            ("postgresql://gw:a%2Fb%3Fc@db/x", "a%2Fb"),
            (
                "postgresql://gw@db/x?password=s3cret&application_name=b",
                "s3cret",
            ),
            ("host=db password=s3cret user=gw", "s3cret"),
            ("host=db password = 'two words' user=gw", "two words"),
            ("host=db password='q\\'uoted' user=gw", "uoted"),
        ] {
            let shown = describe_database(url);
            assert!(!shown.contains(secret), "{url} -> {shown}");
            assert!(shown.contains("host=db"), "{url} -> {shown}");
            let mut config = Config::default();
            config.database.url = url.into();
            assert!(!config.to_redacted_toml().contains(secret), "{url}");
        }
        assert_eq!(
            describe_database("postgresql://gw:pw@db:5433/x"),
            "host=db port=5433 dbname=x user=gw"
        );
    }
}
