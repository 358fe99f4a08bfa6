//! rumqttc glue for MQTT 3.1.1 and MQTT 5: options, the event-loop driver
//! and a client handle, behind one interface.
//!
//! Both use a stable client id, a persistent session (clean session/start
//! off; MQTT 5 adds a session expiry), manual acks and reconnect with
//! exponential backoff. MQTT 5 also announces `receive_maximum`, which bounds
//! how many unacknowledged messages the broker sends us: acks wait for the
//! commit, so this window must hold at least a few batches' worth.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet as Packet5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::{Packet as Packet4, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ledger::PendingAck;
use super::settings::{MqttConfig, Protocol};
use super::SourceEvent;

/// Errors of the client handle.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error(transparent)]
    Config(#[from] crate::settings::Invalid),
    #[error("mqtt client request failed: {0}")]
    Client(String),
    #[error("mqtt TLS settings: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

fn client_error(e: impl std::fmt::Display) -> MqttError {
    MqttError::Client(e.to_string())
}

/// A protocol-independent handle for subscribe, ack and disconnect.
#[derive(Clone)]
pub enum MqttClient {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl MqttClient {
    /// Requests a QoS 1 subscription to `filter`. Never waits, like
    /// [`MqttClient::ack`].
    ///
    /// # Errors
    /// When the request channel is full: the caller tries again.
    pub fn subscribe(&self, filter: &str) -> Result<(), MqttError> {
        match self {
            MqttClient::V4(c) => c
                .try_subscribe(filter, QoS::AtLeastOnce)
                .map_err(client_error),
            MqttClient::V5(c) => c
                .try_subscribe(filter, QoS5::AtLeastOnce)
                .map_err(client_error),
        }
    }

    /// Queues a PUBACK. Never waits: the intake task must not block on
    /// the event loop, whose driver may itself be waiting for the intake.
    ///
    /// # Errors
    /// When the request channel is full (the event loop has not been
    /// polled for a while): the caller keeps the ack and tries again.
    pub fn ack(&self, ack: PendingAck) -> Result<(), MqttError> {
        match self {
            MqttClient::V4(c) => {
                let mut publish = rumqttc::Publish::new("", QoS::AtLeastOnce, Vec::new());
                publish.pkid = ack.pkid;
                c.try_ack(&publish).map_err(client_error)
            }
            MqttClient::V5(c) => {
                let mut publish = rumqttc::v5::mqttbytes::v5::Publish::new(
                    "",
                    QoS5::AtLeastOnce,
                    Vec::new(),
                    None,
                );
                publish.pkid = ack.pkid;
                c.try_ack(&publish).map_err(client_error)
            }
        }
    }

    /// Queues an alert for publishing with QoS 1. Never waits.
    ///
    /// # Errors
    /// When the request channel is full or the driver is gone.
    pub fn publish_alert(&self, topic: &str, json: String) -> Result<(), MqttError> {
        match self {
            MqttClient::V4(c) => c
                .try_publish(topic, QoS::AtLeastOnce, false, json)
                .map_err(client_error),
            MqttClient::V5(c) => c
                .try_publish(topic, QoS5::AtLeastOnce, false, json)
                .map_err(client_error),
        }
    }

    /// Sends DISCONNECT after everything queued before it.
    pub async fn disconnect(&self) {
        let _ = match self {
            MqttClient::V4(c) => c.disconnect().await.map_err(client_error),
            MqttClient::V5(c) => c.disconnect().await.map_err(client_error),
        };
    }
}

/// Creates the client and spawns the driver task, which feeds `events`.
///
/// # Errors
/// When `mqtt.url` is invalid.
pub fn start(
    m: &MqttConfig,
    events: mpsc::Sender<SourceEvent>,
    stop: CancellationToken,
) -> Result<MqttClient, MqttError> {
    let addr = m.broker_addr()?;
    let backoff = Backoff::new(
        Duration::from_millis(m.reconnect_min_ms),
        Duration::from_millis(m.reconnect_max_ms),
    );
    // Room for every ack of a full receive window, plus subscribes.
    let capacity = usize::from(m.receive_maximum) + 64;
    let transport = if addr.tls {
        let tls = crate::tls::client_config(&m.ca_file, &m.cert_file, &m.key_file)?;
        Some(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(tls)),
        ))
    } else {
        None
    };
    /// The largest packet taken from the broker: four times the payload
    /// limit, so that a payload over the limit (up to 4x) still arrives
    /// and becomes a dead letter (`payload_too_large`) instead of being
    /// discarded by the broker (MQTT 5) or breaking the connection (3.1.1).
    /// Keep the broker's own limit at or under it (mosquitto:
    /// `message_size_limit`, 4 MiB in `deploy/mosquitto.conf`).
    fn max_packet_bytes(max_payload: usize) -> usize {
        max_payload.saturating_mul(4).saturating_add(1024)
    }
    let password = m.password()?;
    let credentials =
        (!m.username.is_empty()).then(|| (m.username.clone(), password.unwrap_or_default()));
    match m.protocol {
        Protocol::V311 => {
            let mut options = rumqttc::MqttOptions::new(&m.client_id, &addr.host, addr.port);
            options
                .set_clean_session(false)
                .set_manual_acks(true)
                .set_keep_alive(Duration::from_secs(m.keep_alive_secs))
                .set_max_packet_size(max_packet_bytes(m.max_payload_bytes), 64 * 1024)
                .set_request_channel_capacity(capacity);
            if let Some(transport) = transport {
                options.set_transport(transport);
            }
            if let Some((user, password)) = credentials {
                options.set_credentials(user, password);
            }
            let (client, eventloop) = rumqttc::AsyncClient::new(options, capacity);
            tokio::spawn(drive(eventloop, events, backoff, stop));
            Ok(MqttClient::V4(client))
        }
        Protocol::V5 => {
            let mut options = rumqttc::v5::MqttOptions::new(&m.client_id, &addr.host, addr.port);
            options
                .set_clean_start(false)
                .set_session_expiry_interval(Some(m.session_expiry_secs))
                .set_receive_maximum(Some(m.receive_maximum))
                .set_manual_acks(true)
                .set_keep_alive(Duration::from_secs(m.keep_alive_secs))
                .set_max_packet_size(Some(max_packet_bytes(m.max_payload_bytes) as u32))
                .set_request_channel_capacity(capacity);
            if let Some(transport) = transport {
                options.set_transport(transport);
            }
            if let Some((user, password)) = credentials {
                options.set_credentials(user, password);
            }
            let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, capacity);
            tokio::spawn(drive(eventloop, events, backoff, stop));
            Ok(MqttClient::V5(client))
        }
    }
}

/// Exponential reconnect delay.
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }
    fn reset(&mut self) {
        self.next = self.min;
    }
    fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }
}

/// What one poll of an event loop gave.
enum Polled {
    Event(SourceEvent),
    /// Our own DISCONNECT went out: the driver is done.
    Closed,
    Nothing,
    Failed(String),
}

/// One protocol's event loop, reduced to what the driver needs.
trait EventSource {
    async fn next(&mut self) -> Polled;
}

impl EventSource for rumqttc::EventLoop {
    async fn next(&mut self) -> Polled {
        match self.poll().await {
            Ok(rumqttc::Event::Incoming(Packet4::ConnAck(ack))) => {
                Polled::Event(SourceEvent::Connected {
                    session_present: ack.session_present,
                })
            }
            Ok(rumqttc::Event::Incoming(Packet4::SubAck(ack))) => {
                Polled::Event(SourceEvent::Subscribed {
                    granted: ack
                        .return_codes
                        .iter()
                        .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
                })
            }
            Ok(rumqttc::Event::Incoming(Packet4::Publish(p))) => {
                Polled::Event(SourceEvent::Publish {
                    topic: Arc::from(p.topic.as_str()),
                    ack: (p.qos != QoS::AtMostOnce).then_some(PendingAck { pkid: p.pkid }),
                    redelivery: p.dup,
                    payload: p.payload,
                    content_type: None,
                })
            }
            Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Polled::Closed,
            Ok(_) => Polled::Nothing,
            Err(e) => Polled::Failed(e.to_string()),
        }
    }
}

impl EventSource for rumqttc::v5::EventLoop {
    async fn next(&mut self) -> Polled {
        use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
        match self.poll().await {
            Ok(rumqttc::v5::Event::Incoming(Packet5::ConnAck(ack))) => {
                Polled::Event(SourceEvent::Connected {
                    session_present: ack.session_present,
                })
            }
            Ok(rumqttc::v5::Event::Incoming(Packet5::SubAck(ack))) => {
                Polled::Event(SourceEvent::Subscribed {
                    granted: ack
                        .return_codes
                        .iter()
                        .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
                })
            }
            Ok(rumqttc::v5::Event::Incoming(Packet5::Publish(p))) => {
                Polled::Event(SourceEvent::Publish {
                    topic: Arc::from(String::from_utf8_lossy(&p.topic).as_ref()),
                    ack: (p.qos != QoS5::AtMostOnce).then_some(PendingAck { pkid: p.pkid }),
                    content_type: p
                        .properties
                        .as_ref()
                        .and_then(|props| props.content_type.as_deref())
                        .map(Arc::from),
                    redelivery: p.dup,
                    payload: p.payload,
                })
            }
            Ok(rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Polled::Closed,
            Ok(_) => Polled::Nothing,
            Err(e) => Polled::Failed(e.to_string()),
        }
    }
}

/// Polls `source` until `stop`, our own DISCONNECT, or until the intake
/// side is gone; after a failure waits the backoff, and the next poll
/// reconnects.
async fn drive(
    mut source: impl EventSource,
    events: mpsc::Sender<SourceEvent>,
    mut backoff: Backoff,
    stop: CancellationToken,
) {
    loop {
        let event = match source.next().await {
            Polled::Event(event) => {
                if matches!(event, SourceEvent::Connected { .. }) {
                    backoff.reset();
                }
                event
            }
            Polled::Nothing => continue,
            Polled::Closed => {
                let _ = events
                    .send(SourceEvent::Disconnected {
                        error: "disconnected".into(),
                    })
                    .await;
                return;
            }
            Polled::Failed(error) => {
                if events
                    .send(SourceEvent::Disconnected { error })
                    .await
                    .is_err()
                    || stop.is_cancelled()
                {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff.step()) => {}
                    _ = stop.cancelled() => return,
                }
                continue;
            }
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}
