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

pub mod ledger;
pub mod mqtt;
pub mod settings;
pub mod topic;

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::alerts::AlertNotice;
use crate::model::{now_micros, Message};
use crate::shard::Router;
use crate::telemetry::Metrics;
use ledger::{AckLedger, PendingAck};
pub use mqtt::MqttClient;
use topic::TopicFilter;

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
    pub alerts: mpsc::UnboundedReceiver<AlertNotice>,
}

/// What intake needs of the settings.
#[derive(Debug, Clone)]
pub struct IntakeSettings {
    /// The parsed `mqtt.topics`.
    pub filters: Vec<TopicFilter>,
    /// `analytics.alert_topic_prefix`: committed alerts are published under
    /// it; empty for none.
    pub alert_topic_prefix: String,
}

/// Runs intake until `shutdown`, then drains acknowledgements until the
/// writers have reported every commit (`done` closes).
pub async fn run_intake(
    settings: IntakeSettings,
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
    let IntakeSettings {
        filters,
        alert_topic_prefix,
    } = settings;
    let mut ledger = AckLedger::new();
    let mut outbox = Outbox::default();
    let mut awaiting_subacks = 0usize;
    // A message its shard's ring had no room for, retried until it fits.
    let mut blocked: Option<Message> = None;
    let mut stop_intake = false;
    loop {
        metrics
            .messages_in_flight
            .store(ledger.pending() as u64, Relaxed);
        metrics
            .messages_not_durable
            .store(ledger.not_durable() as u64, Relaxed);
        tokio::select! {
            biased;
            ids = done.recv() => {
                let Some(ids) = ids else { break };
                for id in ids {
                    ledger.complete(id);
                }
                outbox.send(&mut ledger, &client, &metrics);
            }
            _ = tokio::time::sleep(Duration::from_millis(5)), if outbox.waiting() => {
                outbox.send(&mut ledger, &client, &metrics);
            }
            _ = tokio::time::sleep(Duration::from_micros(500)), if blocked.is_some() => {
                if let Some(message) = blocked.take() {
                    blocked = router.try_push(message).err();
                }
            }
            Some(notice) = alerts.recv() => {
                if let Some(topic) = notice.topic(&alert_topic_prefix) {
                    if outbox.alerts >= MAX_WAITING_ALERTS {
                        metrics.alerts_unpublished.fetch_add(1, Relaxed);
                        tracing::warn!("alert not published to MQTT, too many waiting (it is in the alerts table)");
                    } else {
                        outbox.push(Request::Alert(topic, notice.json));
                        outbox.send(&mut ledger, &client, &metrics);
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
                        outbox.reset();
                        if stop_intake {
                            continue;
                        }
                        awaiting_subacks = filters.len();
                        for filter in &filters {
                            outbox.push(Request::Subscribe(filter.filter.clone()));
                        }
                        outbox.send(&mut ledger, &client, &metrics);
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
        outbox.send(&mut ledger, &client, &metrics);
        if !outbox.waiting() {
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

/// What the intake asks of the MQTT client.
#[derive(Debug)]
enum Request {
    Ack(PendingAck),
    Subscribe(String),
    /// Topic and JSON of an alert, published with QoS 1.
    Alert(String, String),
}

/// Requests not yet taken by the event loop, in order.
///
/// The intake queues requests without waiting (the driver that would take
/// them may be waiting for the intake), so a full request channel must not
/// drop one: a lost PUBACK holds a slot of the broker's in-flight window
/// until the session ends, and enough of them stall delivery altogether; a
/// lost SUBSCRIBE leaves the gateway deaf. They wait here and are retried.
#[derive(Default)]
struct Outbox {
    waiting: VecDeque<Request>,
    /// How many of them are alerts.
    alerts: usize,
}

impl Outbox {
    fn push(&mut self, request: Request) {
        self.alerts += usize::from(matches!(request, Request::Alert(..)));
        self.waiting.push_back(request);
    }

    /// Queues what waits, then the acks the ledger releases, in order,
    /// until the request channel is full.
    fn send(&mut self, ledger: &mut AckLedger, client: &MqttClient, metrics: &Metrics) {
        self.waiting
            .extend(ledger.release().into_iter().map(Request::Ack));
        while let Some(request) = self.waiting.front() {
            let queued = match request {
                Request::Ack(ack) => client.ack(*ack).is_ok(),
                Request::Subscribe(filter) => client.subscribe(filter).is_ok(),
                Request::Alert(topic, json) => client.publish_alert(topic, json.clone()).is_ok(),
            };
            if !queued {
                return;
            }
            match self.waiting.pop_front() {
                Some(Request::Ack(_)) => {
                    metrics.acks_sent.fetch_add(1, Relaxed);
                }
                Some(Request::Alert(..)) => self.alerts -= 1,
                _ => {}
            }
        }
    }

    fn waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// A new connection: the acks and subscriptions of the old one go (the
    /// broker redelivers what was not acknowledged); alerts stay.
    fn reset(&mut self) {
        self.waiting.retain(|r| matches!(r, Request::Alert(..)));
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
        let mut outbox = Outbox::default();
        for pkid in 1..=5 {
            let id = ledger.register(Some(PendingAck { pkid }));
            ledger.complete(id);
        }
        let mut sent = Vec::new();
        for _ in 0..3 {
            outbox.send(&mut ledger, &client, &metrics);
            sent.push(metrics.acks_sent.load(Relaxed));
            // Empties the request channel, as the event loop's polls would.
            eventloop.clean();
        }
        assert_eq!(sent, [2, 4, 5]);
        assert!(!outbox.waiting());
        assert_eq!(metrics.acks_sent.load(Relaxed), 5);
    }
}
