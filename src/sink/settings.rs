//! `[database]`, `[spool]` and `[retention]` settings: where and how
//! readings are stored, where batches wait while the database is away, and
//! how long the side tables keep their rows.

use serde::{Deserialize, Serialize};

use crate::settings::{identifier, readable, Invalid};

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

    /// The partition index (start / interval) holding time `t`.
    #[inline]
    pub fn index_of(self, t: crate::model::Micros) -> i64 {
        t.div_euclid(self.micros())
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
    /// The gateway's sessions ask PostgreSQL to hand their written data
    /// pages to the kernel for writing every this many KiB
    /// (`backend_flush_after`, 0 to 2048; 0 = the server's setting). Bulk
    /// loads otherwise leave gigabytes of dirty pages whose writeback, when
    /// the kernel gets to it, stalls every commit for about a second.
    pub flush_after_kb: u32,
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
            flush_after_kb: 2048,
        }
    }
}

impl DatabaseConfig {
    /// Checks every `database.*` key that has constraints beyond its type.
    ///
    /// # Errors
    /// The first [`Invalid`] found.
    pub fn validate(&self) -> Result<(), Invalid> {
        let d = self;
        if !(d.url.starts_with("postgres://")
            || d.url.starts_with("postgresql://")
            || d.url.contains('='))
        {
            return Err(Invalid::new(
                "database.url",
                "expected postgresql://user@host:port/db or key=value pairs",
            ));
        }
        let pg = super::connection::pg_config(&d.url)?;
        if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require && d.ca_file.is_empty() {
            return Err(Invalid::new(
                "database.ca_file",
                "sslmode=require needs the CA certificate that signs the server's",
            ));
        }
        identifier("database.schema", &d.schema, false)?;
        if d.writers == 0 || d.writers > 64 {
            return Err(Invalid::new("database.writers", "must be 1 to 64"));
        }
        if d.batch_rows == 0 || d.batch_rows > 1_000_000 {
            return Err(Invalid::new("database.batch_rows", "must be 1 to 1000000"));
        }
        if d.flush_interval_ms == 0 || d.flush_interval_ms > 60_000 {
            return Err(Invalid::new(
                "database.flush_interval_ms",
                "must be 1 to 60000",
            ));
        }
        if d.partitions_ahead > 366 {
            return Err(Invalid::new(
                "database.partitions_ahead",
                "must be at most 366",
            ));
        }
        if d.retention_days == 0 || d.retention_days > 36_500 {
            return Err(Invalid::new(
                "database.retention_days",
                "must be 1 to 36500",
            ));
        }
        identifier("database.publication", &d.publication, true)?;
        if d.retry_min_ms == 0 || d.retry_min_ms > 10_000 {
            return Err(Invalid::new("database.retry_min_ms", "must be 1 to 10000"));
        }
        if d.flush_after_kb > 2048 {
            return Err(Invalid::new(
                "database.flush_after_kb",
                "must be 0 to 2048 (PostgreSQL's limit for backend_flush_after)",
            ));
        }
        readable("database.ca_file", &self.ca_file)?;
        Ok(())
    }

    /// Flush interval as a duration.
    pub fn flush_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.flush_interval_ms)
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

impl SpoolConfig {
    /// Checks the `spool.*` keys.
    ///
    /// # Errors
    /// The first [`Invalid`] found.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.dir.is_empty() {
            return Err(Invalid::new("spool.dir", "must name a directory"));
        }
        if self.segment_bytes < 4096 || self.segment_bytes > self.max_bytes {
            return Err(Invalid::new(
                "spool.segment_bytes",
                "must be at least 4096 and at most spool.max_bytes",
            ));
        }
        Ok(())
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
