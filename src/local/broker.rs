//! The embedded MQTT broker (rumqttd) that `demo` and in-process tests use,
//! so they need no broker installed. It listens on 127.0.0.1 with an MQTT
//! 3.1.1 and an MQTT 5 port. rumqttd has no stop call: the broker lives until
//! the process exits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

use super::{free_port, wait_for_port, LocalError};

/// Ports of a running embedded broker.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedBroker {
    /// MQTT 3.1.1 listener.
    pub v4_port: u16,
    /// MQTT 5 listener.
    pub v5_port: u16,
}

impl EmbeddedBroker {
    /// `mqtt://127.0.0.1:port` of the listener for `protocol`.
    pub fn url(&self, protocol: crate::config::Protocol) -> String {
        let port = match protocol {
            crate::config::Protocol::V5 => self.v5_port,
            crate::config::Protocol::V311 => self.v4_port,
        };
        format!("mqtt://127.0.0.1:{port}")
    }
}

fn server(name: &str, port: u16) -> ServerSettings {
    ServerSettings {
        name: name.to_string(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 4 << 20,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

/// Starts rumqttd on two free ports in a background thread.
///
/// # Errors
/// When no port is free or the broker does not start listening.
pub fn start() -> Result<EmbeddedBroker, LocalError> {
    let v4_port = free_port()?;
    let v5_port = free_port()?;
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 100_000,
            max_outgoing_packet_count: 500,
            max_segment_size: 64 << 20,
            max_segment_count: 16,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("v4".to_string(), server("v4", v4_port))])),
        v5: Some(HashMap::from([("v5".to_string(), server("v5", v5_port))])),
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(super::io_err("spawn the embedded broker thread"))?;
    for port in [v4_port, v5_port] {
        if !wait_for_port(port, Duration::from_secs(10)) {
            return Err(LocalError::NotReady {
                what: "embedded rumqttd".into(),
                secs: 10,
                log: String::new(),
            });
        }
    }
    Ok(EmbeddedBroker { v4_port, v5_port })
}
