//! The publisher: devices' messages over MQTT at the configured rate, with
//! the faults applied, then a summary of what went out.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge_payload::Sample;
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio_util::sync::CancellationToken;

use crate::config::{boot_and_seq, broker_addr, device_id, topic_of, SimConfig};
use crate::faults::{faults, malformed_payload};
use crate::signal::{now_ms, sample};
use crate::{unit_of, SimError};

/// What a run published.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub devices: usize,
    pub messages: u64,
    pub readings: u64,
    /// QoS 1 messages the broker acknowledged.
    pub acked: u64,
    /// Messages published a second time on purpose.
    pub duplicates: u64,
    /// Messages published after the device's next one on purpose.
    pub reordered: u64,
    /// Malformed messages published instead of real ones.
    pub malformed: u64,
    pub start_ms: i64,
    pub elapsed: Duration,
}

impl Summary {
    /// One line of JSON with every figure.
    pub fn to_json(&self) -> String {
        format!(
            "{{\"devices\":{},\"messages\":{},\"readings\":{},\"acked\":{},\"duplicates\":{},\"reordered\":{},\"malformed\":{},\"start_ms\":{},\"elapsed_s\":{:.3},\"readings_per_s\":{:.1}}}",
            self.devices,
            self.messages,
            self.readings,
            self.acked,
            self.duplicates,
            self.reordered,
            self.malformed,
            self.start_ms,
            self.elapsed.as_secs_f64(),
            self.readings as f64 / self.elapsed.as_secs_f64().max(1e-9)
        )
    }
}

/// Publishes until `count` samples per device are out, `seconds` have
/// passed, or `stop` is cancelled; with QoS 1, waits for every PUBACK.
///
/// # Errors
/// Invalid config, or QoS 1 messages the broker never acknowledged.
pub async fn run(config: &SimConfig, stop: CancellationToken) -> Result<Summary, SimError> {
    config.validate()?;
    let (host, port) = broker_addr(&config.broker)?;
    let mut options = MqttOptions::new(&config.client_id, host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(16 << 20, 16 << 20)
        .set_inflight(1000)
        .set_clean_session(!config.persistent);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    let acked = Arc::new(AtomicU64::new(0));
    let driver_stop = CancellationToken::new();
    let driver = tokio::spawn({
        let acked = acked.clone();
        let driver_stop = driver_stop.clone();
        async move {
            loop {
                tokio::select! {
                    _ = driver_stop.cancelled() => return,
                    event = eventloop.poll() => match event {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acked.fetch_add(1, Relaxed);
                        }
                        Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                        Ok(_) => {}
                        Err(e) => {
                            eprintln!("firmware-sim: broker connection: {e}; retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
        }
    });

    let qos = if config.qos == 1 {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    };
    let start_ms = config.start_ms.unwrap_or_else(now_ms);
    let started = Instant::now();
    let deadline = config.seconds.map(|s| started + Duration::from_secs_f64(s));
    let topics: Vec<String> = (0..config.devices)
        .map(|d| topic_of(config, &device_id(&config.device_prefix, d)))
        .collect();
    let mut summary = Summary {
        devices: config.devices,
        start_ms,
        ..Summary::default()
    };
    let mut next_progress = started + Duration::from_secs(1);
    let mut index: u64 = 0;
    let mut seq: u64 = 1;
    // Per device: a message held back to be published after the next one.
    let mut held: Vec<Option<Vec<u8>>> = vec![None; config.devices];
    'outer: loop {
        let n = match config.count {
            Some(count) if index >= count => break,
            Some(count) => (count - index).min(config.pack as u64),
            None => config.pack as u64,
        };
        for (d, topic) in topics.iter().enumerate() {
            if config.rate > 0.0 {
                // Devices spread evenly over the round rather than all
                // publishing at its start: a steady load, not bursts.
                let offset = d as f64 * n as f64 / config.devices as f64;
                let due = started + Duration::from_secs_f64((index as f64 + offset) / config.rate);
                if due > Instant::now() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(due.into()) => {}
                        _ = stop.cancelled() => break 'outer,
                    }
                }
            }
            if stop.is_cancelled() || deadline.is_some_and(|t| Instant::now() >= t) {
                break 'outer;
            }
            let start_ms = if config.live_time {
                now_ms() - (index + n - 1) as i64 * config.step()
            } else {
                start_ms
            };
            let samples: Vec<Sample> = (index..index + n)
                .map(|i| sample(config, start_ms, d, i))
                .filter(|s| !s.metrics.is_empty())
                .collect();
            if samples.is_empty() {
                // The whole message falls in a dropout.
                continue;
            }
            let readings: u64 = samples.iter().map(|s| s.metrics.len() as u64).sum();
            let (wire_seq, boot) = boot_and_seq(config, d, seq);
            let mut payload =
                edge_payload::encode_with_boot(config.format, wire_seq, boot, &samples, &unit_of)?;
            let fault = faults(config, d, seq - 1);
            match fault.malformed {
                Some(kind) => {
                    payload = malformed_payload(kind, &payload);
                    summary.malformed += 1;
                }
                None => summary.readings += readings,
            }
            let last = config.count.is_some_and(|c| index + n >= c);
            let mut out = Vec::with_capacity(3);
            if fault.reorder && !last && held[d].is_none() {
                held[d] = Some(payload.clone());
                summary.reordered += 1;
            } else {
                out.push(payload.clone());
                out.extend(held[d].take());
            }
            if fault.duplicate {
                out.push(payload);
                summary.duplicates += 1;
            }
            for payload in out {
                if client
                    .publish(topic.as_str(), qos, false, payload)
                    .await
                    .is_err()
                {
                    break 'outer;
                }
                summary.messages += 1;
            }
        }
        seq += 1;
        index += n;
        if config.progress && Instant::now() >= next_progress {
            next_progress += Duration::from_secs(1);
            eprintln!(
                "firmware-sim: {} messages, {} readings, {:.0} readings/s",
                summary.messages,
                summary.readings,
                summary.readings as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    // Messages still held back (the run was cut short) go out last.
    for (d, payload) in held.iter_mut().enumerate() {
        if let Some(payload) = payload.take() {
            if client
                .publish(topics[d].as_str(), qos, false, payload)
                .await
                .is_ok()
            {
                summary.messages += 1;
            }
        }
    }
    let mut result = Ok(());
    if qos == QoS::AtLeastOnce {
        let wait = Instant::now();
        while acked.load(Relaxed) < summary.messages && wait.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let got = acked.load(Relaxed);
        if got < summary.messages {
            result = Err(SimError::Unacked {
                published: summary.messages,
                unacked: summary.messages - got,
                secs: 60,
            });
        }
    }
    summary.acked = acked.load(Relaxed);
    summary.elapsed = started.elapsed();
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
    driver_stop.cancel();
    result.map(|()| summary)
}
