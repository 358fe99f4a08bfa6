//! Source stage: the MQTT subscription (rumqttc), QoS 1 with a persistent
//! session and manual acks, reconnecting with backoff.
//!
//! Two tasks: a *driver* polls rumqttc's event loop and turns its events
//! into [`SourceEvent`]s (one per protocol version, in [`mqtt`]); the
//! *intake* task registers each PUBLISH in the [`AckLedger`], routes it to
//! its shard, and releases PUBACKs in receive order as the writers report
//! commits. While a ring is full the intake holds the message that does not
//! fit and takes no more events (backpressure: the driver's channel fills,
//! then the broker's in-flight window), but it keeps releasing PUBACKs and
//! never waits on the MQTT client: the driver may be waiting for it.
//!
//! On shutdown intake stops first: later PUBLISHes are neither queued nor
//! acknowledged, so the broker redelivers them to the next session; the
//! intake task keeps acknowledging what the drained pipeline commits, then
//! disconnects.

pub mod mqtt;

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, TopicFilter};
use crate::model::{now_micros, Message};
use crate::shard::Router;
use crate::sink::ledger::{AckLedger, PendingAck};
use crate::telemetry::Metrics;
pub use mqtt::MqttClient;

/// What the driver reports.
#[derive(Debug)]
pub enum SourceEvent {
    /// CONNACK received; `session_present` tells whether the broker kept state.
    Connected { session_present: bool },
    /// SUBACK for our subscription request.
    Subscribed { granted: bool },
    Publish {
        topic: Arc<str>,
        payload: bytes::Bytes,
        /// `None` for QoS 0 (nothing to acknowledge).
        ack: Option<PendingAck>,
        content_type: Option<Arc<str>>,
        /// DUP flag: the broker is retransmitting.
        redelivery: bool,
    },
    /// The connection failed; the driver reconnects by itself.
    Disconnected { error: String },
}

/// What the intake task listens to.
pub struct IntakeInputs {
    /// Events of the MQTT driver.
    pub events: mpsc::Receiver<SourceEvent>,
    /// Ledger ids of committed (or spooled) messages, from the writers.
    pub done: mpsc::UnboundedReceiver<Vec<u64>>,
    /// Committed alerts (device, JSON) to publish on the alert topic.
    pub alerts: mpsc::UnboundedReceiver<(Arc<str>, String)>,
}

/// Runs intake until `shutdown`, then drains acknowledgements until the
/// writers have reported every commit (`done` closes).
pub async fn run_intake(
    config: &Config,
    client: MqttClient,
    inputs: IntakeInputs,
    router: Arc<Router>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let IntakeInputs {
        mut events,
        mut done,
        mut alerts,
    } = inputs;
    let filters: Vec<TopicFilter> = config.topic_filters().unwrap_or_default();
    let mut ledger = AckLedger::new();
    let mut acks = Acks::default();
    let mut awaiting_subacks = 0usize;
    // Filters to (re)subscribe to once the request channel takes them.
    let mut to_subscribe: Vec<&str> = Vec::new();
    // Alerts (topic, JSON) waiting for room in the request channel.
    let mut unpublished: VecDeque<(String, String)> = VecDeque::new();
    // A message its shard's ring had no room for, retried until it fits.
    let mut blocked: Option<Message> = None;
    let mut stop_intake = false;
    loop {
        tokio::select! {
            biased;
            ids = done.recv() => {
                let Some(ids) = ids else { break };
                for id in ids {
                    ledger.complete(id);
                }
                acks.send(&mut ledger, &client, &metrics);
            }
            _ = tokio::time::sleep(Duration::from_millis(5)), if acks.waiting() || !to_subscribe.is_empty() || !unpublished.is_empty() => {
                acks.send(&mut ledger, &client, &metrics);
                subscribe(&client, &mut to_subscribe);
                publish_alerts(&client, &mut unpublished);
            }
            _ = tokio::time::sleep(Duration::from_micros(500)), if blocked.is_some() => {
                if let Some(message) = blocked.take() {
                    blocked = router.try_push(message).err();
                }
            }
            Some((device, json)) = alerts.recv() => {
                let prefix = &config.analytics.alert_topic_prefix;
                if !prefix.is_empty() {
                    if unpublished.len() >= MAX_WAITING_ALERTS {
                        metrics.alerts_unpublished.fetch_add(1, Relaxed);
                        tracing::warn!("alert not published to MQTT, too many waiting (it is in the alerts table)");
                    } else {
                        unpublished.push_back((format!("{prefix}{device}"), json));
                        publish_alerts(&client, &mut unpublished);
                    }
                }
            }
            _ = shutdown.cancelled(), if !stop_intake => {
                stop_intake = true;
                // Not queued, so never acknowledged: redelivered later.
                blocked = None;
                tracing::info!(pending = ledger.pending(), "intake stopped; draining");
                router.close();
            }
            event = events.recv(), if blocked.is_none() => {
                let Some(event) = event else {
                    if !stop_intake {
                        stop_intake = true;
                        router.close();
                    }
                    continue;
                };
                match event {
                    SourceEvent::Connected { session_present } => {
                        metrics.mqtt_connected.store(true, Relaxed);
                        // The broker redelivers what was not acknowledged.
                        ledger.reset();
                        acks.reset();
                        if stop_intake {
                            continue;
                        }
                        awaiting_subacks = filters.len();
                        to_subscribe = filters.iter().map(|f| f.filter.as_str()).collect();
                        subscribe(&client, &mut to_subscribe);
                        tracing::info!(session_present, "connected to broker");
                    }
                    SourceEvent::Subscribed { granted } => {
                        if !granted {
                            tracing::error!("broker refused a subscription");
                        }
                        awaiting_subacks = awaiting_subacks.saturating_sub(1);
                        if awaiting_subacks == 0 && granted {
                            metrics.mqtt_subscribed.store(true, Relaxed);
                            tracing::info!(filters = filters.len(), "subscribed");
                        }
                    }
                    SourceEvent::Publish { topic, payload, ack, content_type, redelivery } => {
                        if stop_intake {
                            // Not registered, not acknowledged: redelivered later.
                            continue;
                        }
                        metrics.messages_received.fetch_add(1, Relaxed);
                        let id = ledger.register(ack);
                        let device = filters.iter().find_map(|f| f.device_of(&topic)).map(Arc::from);
                        let message = Message {
                            id,
                            device,
                            topic,
                            payload,
                            received: now_micros(),
                            content_type,
                            redelivery,
                        };
                        if let Err(message) = router.try_push(message) {
                            metrics.intake_paused.fetch_add(1, Relaxed);
                            blocked = Some(message);
                        }
                    }
                    SourceEvent::Disconnected { error } => {
                        if metrics.mqtt_connected.swap(false, Relaxed) {
                            metrics.mqtt_reconnects.fetch_add(1, Relaxed);
                            tracing::warn!(%error, "broker connection lost; reconnecting");
                        }
                        metrics.mqtt_subscribed.store(false, Relaxed);
                    }
                }
            }
        }
    }
    // The last acks, given the event loop a moment to take them.
    for _ in 0..200 {
        acks.send(&mut ledger, &client, &metrics);
        if !acks.waiting() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    client.disconnect().await;
    // Let the driver write the last acks and the DISCONNECT.
    let drain = async {
        while let Some(event) = events.recv().await {
            if matches!(event, SourceEvent::Disconnected { .. }) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// Alerts waiting to be published beyond this are counted and dropped
/// (they are in the alerts table all the same).
const MAX_WAITING_ALERTS: usize = 10_000;

/// Queues the waiting alerts, in order, until the request channel is full.
fn publish_alerts(client: &MqttClient, waiting: &mut VecDeque<(String, String)>) {
    while let Some((topic, json)) = waiting.pop_front() {
        if client.publish_alert(&topic, json.clone()).is_err() {
            waiting.push_front((topic, json));
            return;
        }
    }
}

/// Queues SUBSCRIBEs for `filters`, keeping those the request channel has
/// no room for yet.
fn subscribe(client: &MqttClient, filters: &mut Vec<&str>) {
    filters.retain(|filter| client.subscribe(filter).is_err());
}

/// PUBACKs released by the ledger and not yet taken by the event loop.
///
/// Acks are queued without waiting (the driver that would take them may be
/// waiting for the intake task), so a full request channel cannot be
/// allowed to drop one: a lost PUBACK holds a slot of the broker's
/// in-flight window until the session ends, and enough of them stall
/// delivery altogether. They wait here, in order, and are retried.
#[derive(Default)]
struct Acks {
    waiting: VecDeque<PendingAck>,
}

impl Acks {
    /// Sends what waits, then what the ledger releases, in order, until
    /// the request channel is full.
    fn send(&mut self, ledger: &mut AckLedger, client: &MqttClient, metrics: &Metrics) {
        self.waiting.extend(ledger.release());
        let mut sent = 0;
        for ack in &self.waiting {
            if client.ack(*ack).is_err() {
                break;
            }
            sent += 1;
        }
        self.waiting.drain(..sent);
        metrics.acks_sent.fetch_add(sent as u64, Relaxed);
    }

    fn waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Forgets the acks of a connection that is gone.
    fn reset(&mut self) {
        self.waiting.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request channel with room for two: acks that do not fit wait, in
    /// order, and go out as the event loop takes what is queued. None is
    /// lost (a lost PUBACK holds a slot of the broker's window for good;
    /// before, the three that did not fit were dropped).
    #[test]
    fn acks_that_do_not_fit_wait_and_none_is_lost() {
        let options = rumqttc::MqttOptions::new("t", "127.0.0.1", 1);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 2);
        let client = MqttClient::V4(client);
        let metrics = Metrics::default();
        let mut ledger = AckLedger::new();
        let mut acks = Acks::default();
        for pkid in 1..=5 {
            let id = ledger.register(Some(PendingAck { pkid }));
            ledger.complete(id);
        }
        let mut sent = Vec::new();
        for _ in 0..3 {
            acks.send(&mut ledger, &client, &metrics);
            sent.push(metrics.acks_sent.load(Relaxed));
            // Empties the request channel, as the event loop's polls would.
            eventloop.clean();
        }
        assert_eq!(sent, [2, 4, 5]);
        assert!(!acks.waiting());
        assert_eq!(metrics.acks_sent.load(Relaxed), 5);
    }
}
