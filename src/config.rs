//! Configuration: TOML with a default for every key, unknown keys rejected,
//! environment overrides on top, then [`Config::validate`].
//!
//! Every error names the key (`database.batch_rows`) and the reason, so an
//! operator can fix the file without reading code. `config/gateway.toml`
//! documents every key with its default; the `///` docs here are the same text.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Environment variable overriding `mqtt.url`.
pub const ENV_MQTT_URL: &str = "GATEWAY_MQTT_URL";
/// Environment variable overriding `database.url`.
pub const ENV_DATABASE_URL: &str = "GATEWAY_DATABASE_URL";
/// Environment variable overriding `http.addr`.
pub const ENV_HTTP_ADDR: &str = "GATEWAY_HTTP_ADDR";
/// Environment variable holding the broker password (wins over
/// `mqtt.password_file`).
pub const ENV_MQTT_PASSWORD: &str = "GATEWAY_MQTT_PASSWORD";

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
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.into(),
    }
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

/// MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 5: the gateway announces its own receive maximum, so the broker's
    /// in-flight window does not throttle batching.
    #[serde(rename = "5")]
    V5,
    /// MQTT 3.1.1: the broker's own in-flight limit applies (mosquitto:
    /// `max_inflight_messages`, 20 by default).
    #[serde(rename = "3.1.1")]
    V311,
}

/// `[mqtt]`: where readings come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Broker address, `mqtt://host:port` (`GATEWAY_MQTT_URL` overrides).
    pub url: String,
    /// Client id. Stable across restarts: the broker keeps the session (and
    /// the unacknowledged messages) under it.
    pub client_id: String,
    /// Topic filters to subscribe to with QoS 1. Each has exactly one `+`
    /// segment; the topic level it matches is the device id.
    pub topics: Vec<String>,
    /// `"5"` or `"3.1.1"`.
    pub protocol: Protocol,
    /// MQTT 5 receive maximum: how many unacknowledged QoS 1 messages the
    /// broker may have in flight toward the gateway (1 to 65535).
    pub receive_maximum: u16,
    /// MQTT 5 session expiry: how long the broker keeps the session while
    /// the gateway is away, in seconds.
    pub session_expiry_secs: u32,
    /// Keep-alive interval, in seconds (at least 5).
    pub keep_alive_secs: u64,
    /// First reconnect delay after a connection error, in milliseconds;
    /// doubles on each failure up to `reconnect_max_ms`.
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay, in milliseconds.
    pub reconnect_max_ms: u64,
    /// Largest accepted payload in bytes; larger ones (up to four times
    /// this, the packet limit) are dead letters, stored cut to this size.
    pub max_payload_bytes: usize,
    /// PEM file of the CA that signs the broker's certificate; needed for
    /// `mqtts://` (the certificate and host name are verified).
    pub ca_file: String,
    /// PEM client certificate (chain) for brokers that require one; "" = none.
    pub cert_file: String,
    /// PEM private key of `cert_file`.
    pub key_file: String,
    /// User name for the broker; "" = none.
    pub username: String,
    /// File whose first line is the broker password (`GATEWAY_MQTT_PASSWORD`
    /// wins). The password itself is never logged or printed.
    pub password_file: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: "mqtt://127.0.0.1:1883".into(),
            client_id: "edge-gateway".into(),
            topics: vec!["devices/+/telemetry".into()],
            protocol: Protocol::V5,
            receive_maximum: 1024,
            session_expiry_secs: 86_400,
            keep_alive_secs: 30,
            reconnect_min_ms: 100,
            reconnect_max_ms: 10_000,
            max_payload_bytes: 1 << 20,
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            username: String::new(),
            password_file: String::new(),
        }
    }
}

/// How readings are partitioned in time.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PartitionInterval {
    Hourly,
    Daily,
}

impl PartitionInterval {
    /// Length of one partition in microseconds.
    pub fn micros(self) -> i64 {
        match self {
            PartitionInterval::Hourly => 3_600_000_000,
            PartitionInterval::Daily => crate::model::MICROS_PER_DAY,
        }
    }
}

/// `[database]`: where readings go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// libpq-style URL (`GATEWAY_DATABASE_URL` overrides). A password in it is
    /// never logged or printed.
    pub url: String,
    /// Schema holding every table.
    pub schema: String,
    /// Writer connections loading batches in parallel.
    pub writers: usize,
    /// Rows per batch: a batch is flushed when it has this many rows...
    pub batch_rows: usize,
    /// ...or when its oldest row has waited this long, in milliseconds.
    pub flush_interval_ms: u64,
    /// `"daily"` or `"hourly"` partitions of `readings`.
    pub partition: PartitionInterval,
    /// Partitions created ahead of the current one.
    pub partitions_ahead: u32,
    /// Readings older than this many days are rejected at intake.
    pub retention_days: u32,
    /// Delay before retrying a failed batch, in milliseconds (doubles up to
    /// 10 s while the database stays unreachable).
    pub retry_min_ms: u64,
    /// PEM file of the CA that signs the server certificate. When set,
    /// connections require TLS and verify the chain and the host name
    /// (verify-full); a URL asking for `sslmode=prefer`, `allow` or
    /// `disable` is refused.
    pub ca_file: String,
    /// On a Citus coordinator: shards per distributed table when `migrate`
    /// distributes the schema (0 = Citus's `citus.shard_count`, 32 by
    /// default). Each batch is one COPY stream per shard it touches, so a
    /// few shards per worker core load several times faster (deploy/SCALING.md).
    pub citus_shard_count: u32,
    /// Name of a logical-replication publication over `readings` and
    /// `alerts` that `migrate` creates, for downstream change data capture
    /// (logical replication subscribers, Debezium); "" = none.
    pub publication: String,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "postgresql://postgres@127.0.0.1:5432/postgres".into(),
            schema: "edge".into(),
            writers: 2,
            batch_rows: 20_000,
            flush_interval_ms: 200,
            partition: PartitionInterval::Daily,
            partitions_ahead: 2,
            retention_days: 30,
            retry_min_ms: 200,
            publication: String::new(),
            ca_file: String::new(),
            citus_shard_count: 0,
        }
    }
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

/// `[spool]`: where batches wait while PostgreSQL is unreachable.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Directory of the spool (one subdirectory per writer). Must be on a
    /// disk that survives restarts.
    pub dir: String,
    /// Upper bound of the spool in bytes, over all writers (an empty spool
    /// still takes one batch larger than its share); when full, intake
    /// stops until the database takes batches again.
    pub max_bytes: u64,
    /// Size at which a new segment file is started, in bytes.
    pub segment_bytes: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: "/var/lib/edge-gateway/spool".into(),
            max_bytes: 1 << 30,
            segment_bytes: 64 << 20,
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

/// `[limits]`: what one device may make the gateway hold or store. Every
/// breach makes the message a dead letter with its own reason (and counter);
/// the defaults keep every stored key far inside PostgreSQL's index limit
/// (2,704 bytes a B-tree entry).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Longest device id (the topic level the filter's `+` matches), in bytes.
    pub max_device_id_bytes: usize,
    /// Longest metric name (SenML base name + name), in bytes.
    pub max_metric_bytes: usize,
    /// Longest unit, in bytes.
    pub max_unit_bytes: usize,
    /// Longest string value (SenML `vs`), in bytes.
    pub max_string_bytes: usize,
    /// Longest data value (SenML `vd`, decoded), in bytes.
    pub max_data_bytes: usize,
    /// Most readings (SenML records) in one message.
    pub max_records: usize,
    /// Most memory the decoded readings of one message may take, in bytes
    /// (each reading counts about 100 bytes plus its text).
    pub max_decoded_bytes: usize,
    /// Most distinct metric names one device may have at a time (its series
    /// plus the names of the message at hand); a message bringing one more
    /// is a dead letter (`too_many_series`).
    /// Idle series are evicted (`analytics.series_idle_secs`).
    pub max_series_per_device: usize,
    /// Most series the gateway tracks in all (analytics state is about
    /// 1 KiB each): when full, the longest-idle series is evicted (its
    /// final rollup written) to make room.
    pub max_series: usize,
    /// Most devices whose native sequence window is kept in memory (about
    /// 200 bytes each); when full, the longest-idle device is evicted.
    pub max_dedup_devices: usize,
    /// Dead letters stored per device and minute; beyond it they are
    /// counted (`edge_gateway_dead_letters_suppressed_total`) and
    /// acknowledged, not stored.
    pub max_dead_letters_per_device_minute: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let decode = crate::decode::Limits::default();
        LimitsConfig {
            max_device_id_bytes: 128,
            max_metric_bytes: decode.max_metric_bytes,
            max_unit_bytes: decode.max_unit_bytes,
            max_string_bytes: decode.max_string_bytes,
            max_data_bytes: decode.max_data_bytes,
            max_records: decode.max_records,
            max_decoded_bytes: decode.max_decoded_bytes,
            max_series_per_device: 1000,
            max_series: 1_000_000,
            max_dedup_devices: 1_000_000,
            max_dead_letters_per_device_minute: 60,
        }
    }
}

impl LimitsConfig {
    /// The decoder's share of the limits.
    pub fn decode(&self) -> crate::decode::Limits {
        crate::decode::Limits {
            max_metric_bytes: self.max_metric_bytes,
            max_unit_bytes: self.max_unit_bytes,
            max_string_bytes: self.max_string_bytes,
            max_data_bytes: self.max_data_bytes,
            max_records: self.max_records,
            max_decoded_bytes: self.max_decoded_bytes,
        }
    }
}

/// `[retention]`: how long the side tables keep rows (readings follow
/// `database.retention_days`); 0 keeps them for ever.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Days of `dead_letters` kept.
    pub dead_letters_days: u32,
    /// Days of `alerts` kept.
    pub alerts_days: u32,
    /// Days of `rollups_1m` kept.
    pub rollups_days: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            dead_letters_days: 7,
            alerts_days: 90,
            rollups_days: 90,
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

/// A parsed `mqtt://host:port` (or `mqtts://`) address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// A topic filter with one `+` level whose match is the device id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    pub filter: String,
    levels: Vec<String>,
    device_level: usize,
}

impl TopicFilter {
    /// Parses a filter; exactly one level must be `+`, a `#` may only end it.
    ///
    /// # Errors
    /// A reason text when the filter is not of that form.
    pub fn parse(filter: &str) -> Result<TopicFilter, String> {
        let levels: Vec<String> = filter.split('/').map(str::to_string).collect();
        let pluses: Vec<usize> = levels
            .iter()
            .enumerate()
            .filter(|(_, l)| l.as_str() == "+")
            .map(|(i, _)| i)
            .collect();
        if pluses.len() != 1 {
            return Err(format!(
                "filter {filter:?} must have exactly one '+' level (the device id)"
            ));
        }
        for (i, level) in levels.iter().enumerate() {
            if level == "#" && i + 1 != levels.len() {
                return Err(format!("filter {filter:?}: '#' may only be the last level"));
            }
            if level != "+" && level != "#" && (level.contains('+') || level.contains('#')) {
                return Err(format!(
                    "filter {filter:?}: wildcards must fill a whole level"
                ));
            }
        }
        Ok(TopicFilter {
            filter: filter.to_string(),
            levels,
            device_level: pluses[0],
        })
    }

    /// The device id if `topic` matches this filter.
    pub fn device_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let mut device = None;
        let mut parts = topic.split('/');
        for (i, level) in self.levels.iter().enumerate() {
            if level == "#" {
                return device;
            }
            let part = parts.next()?;
            if i == self.device_level {
                if part.is_empty() {
                    return None;
                }
                device = Some(part);
            } else if level != part {
                return None;
            }
        }
        match parts.next() {
            None => device,
            Some(_) => None,
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

    /// Checks every key that has constraints beyond its type.
    ///
    /// # Errors
    /// The first [`ConfigError::Invalid`] found, naming key and reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.broker_addr()?;
        let m = &self.mqtt;
        if self.broker_addr()?.tls && m.ca_file.is_empty() {
            return Err(invalid(
                "mqtt.ca_file",
                "mqtts:// needs the CA certificate that signs the broker's",
            ));
        }
        if m.cert_file.is_empty() != m.key_file.is_empty() {
            return Err(invalid(
                "mqtt.key_file",
                "give both mqtt.cert_file and mqtt.key_file, or neither",
            ));
        }
        for (key, path) in [
            ("mqtt.ca_file", &m.ca_file),
            ("mqtt.cert_file", &m.cert_file),
            ("mqtt.key_file", &m.key_file),
            ("mqtt.password_file", &m.password_file),
            ("database.ca_file", &self.database.ca_file),
        ] {
            if !path.is_empty() && std::fs::metadata(path).is_err() {
                return Err(invalid(key, format!("cannot read {path}")));
            }
        }
        if m.client_id.is_empty() || m.client_id.len() > 64 {
            return Err(invalid("mqtt.client_id", "must be 1 to 64 characters"));
        }
        if m.topics.is_empty() {
            return Err(invalid(
                "mqtt.topics",
                "at least one topic filter is needed",
            ));
        }
        self.topic_filters()?;
        if m.receive_maximum == 0 {
            return Err(invalid("mqtt.receive_maximum", "must be 1 to 65535"));
        }
        if m.keep_alive_secs < 5 {
            return Err(invalid("mqtt.keep_alive_secs", "must be at least 5"));
        }
        if m.reconnect_min_ms == 0 || m.reconnect_min_ms > m.reconnect_max_ms {
            return Err(invalid(
                "mqtt.reconnect_min_ms",
                "must be at least 1 and at most mqtt.reconnect_max_ms",
            ));
        }
        if m.max_payload_bytes < 64 || m.max_payload_bytes > 256 << 20 {
            return Err(invalid(
                "mqtt.max_payload_bytes",
                "must be 64 bytes to 256 MiB",
            ));
        }
        let d = &self.database;
        if !(d.url.starts_with("postgres://")
            || d.url.starts_with("postgresql://")
            || d.url.contains('='))
        {
            return Err(invalid(
                "database.url",
                "expected postgresql://user@host:port/db or key=value pairs",
            ));
        }
        let pg = self.pg_config()?;
        if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require && d.ca_file.is_empty() {
            return Err(invalid(
                "database.ca_file",
                "sslmode=require needs the CA certificate that signs the server's",
            ));
        }
        if !valid_identifier(&d.schema) {
            return Err(invalid(
                "database.schema",
                "must be a lower-case SQL identifier ([a-z_][a-z0-9_]*, at most 40 characters)",
            ));
        }
        if d.writers == 0 || d.writers > 64 {
            return Err(invalid("database.writers", "must be 1 to 64"));
        }
        if d.batch_rows == 0 || d.batch_rows > 1_000_000 {
            return Err(invalid("database.batch_rows", "must be 1 to 1000000"));
        }
        if d.flush_interval_ms == 0 || d.flush_interval_ms > 60_000 {
            return Err(invalid("database.flush_interval_ms", "must be 1 to 60000"));
        }
        if d.partitions_ahead > 366 {
            return Err(invalid("database.partitions_ahead", "must be at most 366"));
        }
        if d.retention_days == 0 || d.retention_days > 36_500 {
            return Err(invalid("database.retention_days", "must be 1 to 36500"));
        }
        if !d.publication.is_empty() && !valid_identifier(&d.publication) {
            return Err(invalid(
                "database.publication",
                "must be a lower-case identifier or empty",
            ));
        }
        if d.retry_min_ms == 0 || d.retry_min_ms > 10_000 {
            return Err(invalid("database.retry_min_ms", "must be 1 to 10000"));
        }
        let p = &self.pipeline;
        if p.shards > 1024 {
            return Err(invalid(
                "pipeline.shards",
                "must be at most 1024 (0 = one per core)",
            ));
        }
        if p.ring_capacity < 2 || p.ring_capacity > 1 << 24 {
            return Err(invalid("pipeline.ring_capacity", "must be 2 to 16777216"));
        }
        if p.shutdown_timeout_secs == 0 || p.shutdown_timeout_secs > 3600 {
            return Err(invalid(
                "pipeline.shutdown_timeout_secs",
                "must be 1 to 3600",
            ));
        }
        if self.spool.dir.is_empty() {
            return Err(invalid("spool.dir", "must name a directory"));
        }
        if self.spool.segment_bytes < 4096 || self.spool.segment_bytes > self.spool.max_bytes {
            return Err(invalid(
                "spool.segment_bytes",
                "must be at least 4096 and at most spool.max_bytes",
            ));
        }
        if self.dedup.horizon_secs == 0 {
            return Err(invalid("dedup.horizon_secs", "must be at least 1"));
        }
        if self.dedup.max_identities == 0 {
            return Err(invalid("dedup.max_identities", "must be at least 1"));
        }
        let a = &self.analytics;
        if a.window_buckets == 0 || a.window_buckets > 64 {
            return Err(invalid("analytics.window_buckets", "must be 1 to 64"));
        }
        if a.windows_secs.contains(&0) {
            return Err(invalid(
                "analytics.windows_secs",
                "windows must be at least 1 second",
            ));
        }
        if !(a.lateness_secs >= 0.0 && a.lateness_secs <= 3600.0) {
            return Err(invalid("analytics.lateness_secs", "must be 0 to 3600"));
        }
        self.anomaly
            .validate()
            .map_err(|(key, reason)| invalid(&key, reason))?;
        if !a.notify_channel.is_empty() && !valid_identifier(&a.notify_channel) {
            return Err(invalid(
                "analytics.notify_channel",
                "must be a lower-case identifier or empty",
            ));
        }
        let names: Vec<&str> = self.rules.iter().map(|r| r.name.as_str()).collect();
        for (i, rule) in self.rules.iter().enumerate() {
            let key = format!("rules[{i}] ({})", rule.name);
            rule.validate(&names)
                .map_err(|reason| invalid(&key, reason))?;
            if names.iter().filter(|n| **n == rule.name).count() > 1 {
                return Err(invalid(&key, "rule names must be unique"));
            }
        }
        if !self.http.addr.is_empty() && self.http.addr.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "http.addr",
                "expected host:port, e.g. 127.0.0.1:9187, or empty",
            ));
        }
        Ok(())
    }

    /// The broker host and port from `mqtt.url`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for `mqtt.url`.
    pub fn broker_addr(&self) -> Result<BrokerAddr, ConfigError> {
        let url = &self.mqtt.url;
        let (rest, tls) = match (
            url.strip_prefix("mqtts://"),
            url.strip_prefix("mqtt://")
                .or_else(|| url.strip_prefix("tcp://")),
        ) {
            (Some(rest), _) => (rest, true),
            (None, Some(rest)) => (rest, false),
            (None, None) => {
                return Err(invalid(
                    "mqtt.url",
                    format!("expected mqtt://host:port or mqtts://host:port, got {url:?}"),
                ))
            }
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('@') || rest.contains('/') {
            return Err(invalid(
                "mqtt.url",
                "expected mqtt://host:port with nothing else",
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse::<u16>().map_err(|_| {
                    invalid("mqtt.url", format!("port {port:?} is not a number 1-65535"))
                })?,
            ),
            None => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(invalid("mqtt.url", "host and port must not be empty"));
        }
        Ok(BrokerAddr {
            host: host.to_string(),
            port,
            tls,
        })
    }

    /// The parsed topic filters.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for `mqtt.topics[i]`.
    pub fn topic_filters(&self) -> Result<Vec<TopicFilter>, ConfigError> {
        self.mqtt
            .topics
            .iter()
            .enumerate()
            .map(|(i, t)| {
                TopicFilter::parse(t)
                    .map_err(|reason| invalid(&format!("mqtt.topics[{i}]"), reason))
            })
            .collect()
    }

    /// The connection settings from `database.url`, with a 5 s connect
    /// timeout unless the URL sets one (a host that drops packets must fail
    /// fast, so batches go to the spool) and `application_name` edge-gateway.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for `database.url`.
    pub fn pg_config(&self) -> Result<tokio_postgres::Config, ConfigError> {
        let mut pg: tokio_postgres::Config = self.database.url.parse().map_err(|e| {
            invalid(
                "database.url",
                format!("not a valid connection string: {e}"),
            )
        })?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(5));
        }
        if pg.get_application_name().is_none() {
            pg.application_name("edge-gateway");
        }
        Ok(pg)
    }

    /// The broker password: `GATEWAY_MQTT_PASSWORD`, else the first line of
    /// `mqtt.password_file`, else none.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when the file cannot be read.
    pub fn mqtt_password(&self) -> Result<Option<String>, ConfigError> {
        if let Ok(password) = std::env::var(ENV_MQTT_PASSWORD) {
            return Ok(Some(password));
        }
        if self.mqtt.password_file.is_empty() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&self.mqtt.password_file)
            .map_err(|e| invalid("mqtt.password_file", format!("cannot read it: {e}")))?;
        Ok(Some(text.lines().next().unwrap_or("").to_string()))
    }

    /// Connection settings and, when `database.ca_file` is set, TLS.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for `database.url` or `database.ca_file`.
    pub fn db(&self) -> Result<crate::sink::writer::Db, ConfigError> {
        let mut pg = self.pg_config()?;
        let tls = if self.database.ca_file.is_empty() {
            None
        } else {
            // With a CA the connection is verify-full: TLS is required, and
            // rustls checks the chain and the host name. A URL that would
            // let a man in the middle downgrade it is refused.
            let url = self.database.url.to_ascii_lowercase().replace(' ', "");
            if ["sslmode=prefer", "sslmode=disable", "sslmode=allow"]
                .iter()
                .any(|m| url.contains(m))
            {
                return Err(invalid(
                    "database.url",
                    "with database.ca_file set, sslmode must be require (or left out): prefer, allow and disable let a man in the middle force plaintext",
                ));
            }
            pg.ssl_mode(tokio_postgres::config::SslMode::Require);
            let config = crate::tls::client_config(&self.database.ca_file, "", "")
                .map_err(|e| invalid("database.ca_file", e.to_string()))?;
            Some(tokio_postgres_rustls::MakeRustlsConnect::new(config))
        };
        Ok(crate::sink::writer::Db { pg, tls })
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
        Duration::from_millis(self.database.flush_interval_ms)
    }

    /// The effective configuration as TOML with secrets masked, for
    /// `check-config` and logs.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database.url = format!("<not shown: {}>", describe_database(&shown.database.url));
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// True for `[a-z_][a-z0-9_]*` up to 40 bytes: safe to splice into SQL.
pub fn valid_identifier(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 40
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// What `database.url` points at, as the driver parsed it: host(s), port(s),
/// database and user, nothing else. A connection string is never shown,
/// even masked (masking by hand misses passwords with `/`, `?`, spaces or
/// quotes). Unparseable URLs show as such, without their text.
pub fn describe_database(url: &str) -> String {
    let Ok(pg) = url.parse::<tokio_postgres::Config>() else {
        return "<database.url does not parse>".to_string();
    };
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = pg.get_ports().iter().map(u16::to_string).collect();
    format!(
        "host={} port={} dbname={} user={}",
        if hosts.is_empty() {
            "localhost".into()
        } else {
            hosts.join(",")
        },
        if ports.is_empty() {
            "5432".into()
        } else {
            ports.join(",")
        },
        pg.get_dbname().unwrap_or("(user name)"),
        pg.get_user().unwrap_or("(none)"),
    )
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
        let shipped = include_str!("../config/gateway.toml");
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
        let text = include_str!("../config/rules.example.toml");
        let config = Config::from_toml(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.rules.len(), 7);
        assert!(config.validate().is_ok(), "{:?}", config.validate());
        let mut bad = config.clone();
        bad.rules[0].clear = Some(90.0);
        match bad.validate() {
            Err(ConfigError::Invalid { key, reason }) => {
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
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key),
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
            config.broker_addr().ok(),
            Some(BrokerAddr {
                host: "b".into(),
                port: 2,
                tls: false
            })
        );
    }

    #[test]
    fn topic_filters_extract_devices() {
        let f = TopicFilter::parse("devices/+/telemetry").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(f.device_of("devices/d1/telemetry"), Some("d1"));
        assert_eq!(f.device_of("devices//telemetry"), None);
        assert_eq!(f.device_of("devices/d1/other"), None);
        assert_eq!(f.device_of("devices/d1/telemetry/x"), None);
        let g = TopicFilter::parse("site/+/#").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(g.device_of("site/d2/a/b"), Some("d2"));
        assert!(TopicFilter::parse("a/+/+").is_err());
        assert!(TopicFilter::parse("a/#/b/+").is_err());
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
