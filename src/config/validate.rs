//! Checks of a whole configuration: each stage checks its own section,
//! then the keys that belong to no single stage and the ones that must agree
//! across sections.

use std::net::SocketAddr;

use super::{Config, ConfigError};
use crate::settings::{identifier, Invalid};

impl Config {
    /// Checks every key that has constraints beyond its type.
    ///
    /// # Errors
    /// The first [`ConfigError::Invalid`] found, naming key and reason.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check().map_err(ConfigError::from)
    }

    fn check(&self) -> Result<(), Invalid> {
        self.mqtt.validate()?;
        self.database.validate()?;
        self.spool.validate()?;
        let p = &self.pipeline;
        if p.shards > 1024 {
            return Err(Invalid::new(
                "pipeline.shards",
                "must be at most 1024 (0 = one per core)",
            ));
        }
        if p.ring_capacity < 2 || p.ring_capacity > 1 << 24 {
            return Err(Invalid::new(
                "pipeline.ring_capacity",
                "must be 2 to 16777216",
            ));
        }
        if p.shutdown_timeout_secs == 0 || p.shutdown_timeout_secs > 3600 {
            return Err(Invalid::new(
                "pipeline.shutdown_timeout_secs",
                "must be 1 to 3600",
            ));
        }
        if self.dedup.horizon_secs == 0 {
            return Err(Invalid::new("dedup.horizon_secs", "must be at least 1"));
        }
        if self.dedup.max_identities == 0 {
            return Err(Invalid::new("dedup.max_identities", "must be at least 1"));
        }
        let a = &self.analytics;
        if a.window_buckets == 0 || a.window_buckets > 64 {
            return Err(Invalid::new("analytics.window_buckets", "must be 1 to 64"));
        }
        if a.windows_secs.contains(&0) {
            return Err(Invalid::new(
                "analytics.windows_secs",
                "windows must be at least 1 second",
            ));
        }
        if !(a.lateness_secs >= 0.0 && a.lateness_secs <= 3600.0) {
            return Err(Invalid::new("analytics.lateness_secs", "must be 0 to 3600"));
        }
        self.anomaly.validate()?;
        identifier("analytics.notify_channel", &a.notify_channel, true)?;
        let names: Vec<&str> = self.rules.iter().map(|r| r.name.as_str()).collect();
        for (i, rule) in self.rules.iter().enumerate() {
            rule.validate(i, &names)?;
        }
        self.limits.validate()?;
        if !self.http.addr.is_empty() && self.http.addr.parse::<SocketAddr>().is_err() {
            return Err(Invalid::new(
                "http.addr",
                "expected host:port, e.g. 127.0.0.1:9187, or empty",
            ));
        }
        Ok(())
    }
}
