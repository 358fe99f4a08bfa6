//! `[mqtt]` settings: where readings come from, how to reach the broker
//! (address, TLS, credentials), and which topics name devices.

use serde::{Deserialize, Serialize};

use super::topic::TopicFilter;
use crate::settings::{readable, Invalid};

/// Environment variable holding the broker password (wins over
/// `mqtt.password_file`).
pub const ENV_MQTT_PASSWORD: &str = "GATEWAY_MQTT_PASSWORD";

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

/// A parsed `mqtt://host:port` (or `mqtts://`) address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl MqttConfig {
    /// The broker host and port from `mqtt.url`.
    ///
    /// # Errors
    /// [`Invalid`] for `mqtt.url`.
    pub fn broker_addr(&self) -> Result<BrokerAddr, Invalid> {
        let url = &self.url;
        let (rest, tls) = match (
            url.strip_prefix("mqtts://"),
            url.strip_prefix("mqtt://")
                .or_else(|| url.strip_prefix("tcp://")),
        ) {
            (Some(rest), _) => (rest, true),
            (None, Some(rest)) => (rest, false),
            (None, None) => {
                return Err(Invalid::new(
                    "mqtt.url",
                    format!("expected mqtt://host:port or mqtts://host:port, got {url:?}"),
                ))
            }
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('@') || rest.contains('/') {
            return Err(Invalid::new(
                "mqtt.url",
                "expected mqtt://host:port with nothing else",
            ));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse::<u16>().map_err(|_| {
                    Invalid::new("mqtt.url", format!("port {port:?} is not a number 1-65535"))
                })?,
            ),
            None => (rest, if tls { 8883 } else { 1883 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(Invalid::new("mqtt.url", "host and port must not be empty"));
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
    /// [`Invalid`] for `mqtt.topics[i]`.
    pub fn topic_filters(&self) -> Result<Vec<TopicFilter>, Invalid> {
        self.topics
            .iter()
            .enumerate()
            .map(|(i, t)| {
                TopicFilter::parse(t)
                    .map_err(|reason| Invalid::new(format!("mqtt.topics[{i}]"), reason.to_string()))
            })
            .collect()
    }

    /// The broker password: `GATEWAY_MQTT_PASSWORD`, else the first line of
    /// `mqtt.password_file`, else none.
    ///
    /// # Errors
    /// [`Invalid`] when the file cannot be read.
    pub fn password(&self) -> Result<Option<String>, Invalid> {
        if let Ok(password) = std::env::var(ENV_MQTT_PASSWORD) {
            return Ok(Some(password));
        }
        if self.password_file.is_empty() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&self.password_file)
            .map_err(|e| Invalid::new("mqtt.password_file", format!("cannot read it: {e}")))?;
        Ok(Some(text.lines().next().unwrap_or("").to_string()))
    }

    /// Checks every `mqtt.*` key that has constraints beyond its type.
    ///
    /// # Errors
    /// The first [`Invalid`] found.
    pub fn validate(&self) -> Result<(), Invalid> {
        let tls = self.broker_addr()?.tls;
        if tls && self.ca_file.is_empty() {
            return Err(Invalid::new(
                "mqtt.ca_file",
                "mqtts:// needs the CA certificate that signs the broker's",
            ));
        }
        if self.cert_file.is_empty() != self.key_file.is_empty() {
            return Err(Invalid::new(
                "mqtt.key_file",
                "give both mqtt.cert_file and mqtt.key_file, or neither",
            ));
        }
        readable("mqtt.ca_file", &self.ca_file)?;
        readable("mqtt.cert_file", &self.cert_file)?;
        readable("mqtt.key_file", &self.key_file)?;
        readable("mqtt.password_file", &self.password_file)?;
        if self.client_id.is_empty() || self.client_id.len() > 64 {
            return Err(Invalid::new("mqtt.client_id", "must be 1 to 64 characters"));
        }
        if self.topics.is_empty() {
            return Err(Invalid::new(
                "mqtt.topics",
                "at least one topic filter is needed",
            ));
        }
        self.topic_filters()?;
        if self.receive_maximum == 0 {
            return Err(Invalid::new("mqtt.receive_maximum", "must be 1 to 65535"));
        }
        if self.keep_alive_secs < 5 {
            return Err(Invalid::new("mqtt.keep_alive_secs", "must be at least 5"));
        }
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            return Err(Invalid::new(
                "mqtt.reconnect_min_ms",
                "must be at least 1 and at most mqtt.reconnect_max_ms",
            ));
        }
        if self.max_payload_bytes < 64 || self.max_payload_bytes > 256 << 20 {
            return Err(Invalid::new(
                "mqtt.max_payload_bytes",
                "must be 64 bytes to 256 MiB",
            ));
        }
        Ok(())
    }
}
