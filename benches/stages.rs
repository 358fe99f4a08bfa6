//! Per-stage benches, each with its throughput unit: decode (each
//! format) and COPY row encoding per reading, the shard ring per message,
//! the dedup check per message, analytics per reading, and the whole shard
//! worker step (decode, dedup, analytics, COPY encoding) per reading. Run
//! with `cargo bench --bench stages`.

// A test (or bench) that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use edge_gateway::config::PartitionInterval;
use edge_gateway::decode::decode;
use edge_gateway::sink::batch::encode_readings;
use edge_gateway::sink::copy::RowBuffer;
use edge_gateway::sink::partitions::Partitions;
use edge_payload::{Format, Sample};

/// One message as a packing device sends it: 100 samples x 2 metrics.
fn samples() -> Vec<Sample> {
    (0..100)
        .map(|i| Sample {
            ts_ms: 1_750_000_000_000 + i * 1000,
            metrics: vec![
                ("temperature".into(), 21.0 + i as f64 * 0.01),
                ("humidity".into(), 45.0 - i as f64 * 0.02),
            ],
        })
        .collect()
}

fn bench_decode(c: &mut Criterion) {
    let samples = samples();
    let readings = 200u64;
    let mut group = c.benchmark_group("decode");
    group.throughput(Throughput::Elements(readings));
    for format in Format::ALL {
        let payload = edge_payload::encode(format, 1, &samples, &firmware_sim::unit_of)
            .unwrap_or_else(|e| panic!("{e}"));
        group.bench_with_input(BenchmarkId::from_parameter(format), &payload, |b, p| {
            b.iter(|| decode(std::hint::black_box(p), None, 1_750_000_000_000_000))
        });
    }
    group.finish();
}

fn bench_copy_encode(c: &mut Criterion) {
    let payload = edge_payload::encode(Format::NativeCbor, 1, &samples(), &firmware_sim::unit_of)
        .unwrap_or_else(|e| panic!("{e}"));
    let decoded = decode(&payload, None, 0)
        .map(|d| d.readings)
        .unwrap_or_default();
    let partitions = Partitions::new("edge", PartitionInterval::Daily);
    let mut group = c.benchmark_group("copy_encode");
    group.throughput(Throughput::Elements(decoded.len() as u64));
    group.bench_function("readings", |b| {
        b.iter(|| {
            let mut rows = RowBuffer::new(decoded.len() * 64);
            let mut seen = Vec::new();
            encode_readings(
                &mut rows,
                "device-0001",
                std::hint::black_box(&decoded),
                partitions.interval(),
                &mut seen,
            );
            rows.finish()
        })
    });
    group.finish();
}

/// The shard worker's duplicate check per message: a 128-bit hash of the
/// payload plus a set insert (SenML), or a sequence window update (native).
fn bench_dedup(c: &mut Criterion) {
    use edge_gateway::shard::dedup::Dedup;
    use std::sync::Arc;
    let payload = edge_payload::encode(Format::SenmlCbor, 1, &samples(), &firmware_sim::unit_of)
        .unwrap_or_else(|e| panic!("{e}"));
    let devices: Vec<Arc<str>> = (0..1000)
        .map(|d| Arc::from(format!("dev-{d:04}").as_str()))
        .collect();
    let mut group = c.benchmark_group("dedup_check");
    group.throughput(Throughput::Elements(1));
    group.bench_function("senml_identity", |b| {
        let mut dedup = Dedup::new(1_000_000, i64::MAX / 4);
        let mut n = 0u64;
        let mut payload = payload.clone();
        b.iter(|| {
            n += 1;
            payload[..8].copy_from_slice(&n.to_le_bytes());
            dedup.check(
                &devices[(n % 1000) as usize],
                &edge_gateway::model::Decoded::default(),
                &payload,
                false,
                n as i64,
            )
        })
    });
    group.bench_function("native_window", |b| {
        let mut dedup = Dedup::new(1, i64::MAX / 4);
        let mut n = 0u64;
        let mut decoded = edge_gateway::model::Decoded::default();
        b.iter(|| {
            n += 1;
            decoded.seq = Some(n / 1000);
            dedup.check(&devices[(n % 1000) as usize], &decoded, &[], false, 0)
        })
    });
    group.finish();
}

/// Analytics per reading for one series: three windows (10 s, 1 min,
/// 5 min), the anomaly detector and one threshold rule, in time order.
fn bench_analytics(c: &mut Criterion) {
    use edge_gateway::analytics::anomaly::{AnomalyConfig, Detector};
    use edge_gateway::analytics::engine::{Analytics, AnalyticsConfig, Outputs};
    use edge_gateway::analytics::rules::{Kind, RuleConfig, RuleState};
    use edge_gateway::analytics::window::{Layout, Windows};
    use std::sync::Arc;
    let rule = RuleConfig {
        name: "hot".into(),
        kind: Kind::Above,
        metric: "*".into(),
        devices: "*".into(),
        threshold: Some(30.0),
        clear: Some(28.0),
        for_secs: 5.0,
        clear_for_secs: 0.0,
        first: None,
        then: None,
        within_secs: 0.0,
    };
    let mut group = c.benchmark_group("analytics");
    group.throughput(Throughput::Elements(1));
    group.bench_function("windows3_detector_rule", |b| {
        let layout = Layout::new(&[10_000_000, 60_000_000, 300_000_000], 5);
        let mut windows = Windows::new(&layout);
        let anomaly = AnomalyConfig::default().prepare();
        let mut detector = Detector::new(&anomaly);
        let mut state = RuleState::new(0);
        let mut t = 0i64;
        b.iter(|| {
            t += 1_000_000;
            let v = 20.0 + ((t / 1_000_000) % 17) as f64 * 0.7;
            windows.push(&layout, t, v);
            let score = detector.update(&anomaly, v);
            state.update(&rule, t, v, score)
        })
    });
    // The detector, and without each optional channel: what that channel
    // costs (its quality: README, `--ideas`).
    for (name, config) in [
        ("detector", AnomalyConfig::default()),
        (
            "detector_without_distribution",
            AnomalyConfig {
                distribution: false,
                ..AnomalyConfig::default()
            },
        ),
        (
            "detector_without_coarse",
            AnomalyConfig {
                blocks: Vec::new(),
                ..AnomalyConfig::default()
            },
        ),
    ] {
        group.bench_function(name, |b| {
            let anomaly = config.prepare();
            let mut detector = Detector::new(&anomaly);
            let mut i = 0u64;
            b.iter(|| {
                i += 1;
                detector.update(&anomaly, 20.0 + (i % 17) as f64 * 0.7)
            })
        });
    }
    group.bench_function("engine_observe", |b| {
        let mut analytics = Analytics::new(
            Arc::new(AnalyticsConfig::default()),
            AnomalyConfig::default(),
            Arc::new(vec![rule.clone()]),
        );
        let device: Arc<str> = Arc::from("dev-0001");
        let mut out = Outputs::default();
        let mut t = 0i64;
        b.iter(|| {
            t += 1_000_000;
            let v = 20.0 + ((t / 1_000_000) % 17) as f64 * 0.7;
            analytics.observe(&device, "temperature", t, v, t, &mut out);
            out.alerts.clear();
            out.rollups.clear();
        })
    });
    group.finish();
}

/// A message of `device` as the MQTT source hands it to the router.
fn message(id: u64, device: &str, payload: &bytes::Bytes) -> edge_gateway::model::Message {
    use std::sync::Arc;
    edge_gateway::model::Message {
        id,
        device: Some(Arc::from(device)),
        topic: Arc::from(format!("devices/{device}/telemetry").as_str()),
        payload: payload.clone(),
        received: edge_gateway::model::now_micros(),
        content_type: None,
        redelivery: false,
    }
}

/// The shard ring: a router push (device hash, lock-free queue, wake-up)
/// and the worker's pop, per message.
fn bench_ring(c: &mut Criterion) {
    use edge_gateway::shard::Router;
    let router = Router::new(2, 4096);
    let payload = bytes::Bytes::from_static(b"{}");
    let messages: Vec<_> = (0..64)
        .map(|d| message(d, &format!("dev-{d:04}"), &payload))
        .collect();
    let mut group = c.benchmark_group("ring");
    group.throughput(Throughput::Elements(1));
    group.bench_function("push_pop", |b| {
        let mut n = 0usize;
        b.iter(|| {
            n += 1;
            let m = messages[n % messages.len()].clone();
            // The ring has room: one in, one out.
            let _ = router.try_push(m);
            router.shards().iter().find_map(|s| s.pop())
        })
    });
    group.finish();
}

/// The shard worker's whole step for packed native CBOR messages (200
/// readings each) from 100 devices: decode, duplicate check, analytics
/// (three windows, the detector, one rule) and COPY encoding into the
/// batch, per reading.
fn bench_worker_step(c: &mut Criterion) {
    use edge_gateway::analytics::anomaly::AnomalyConfig;
    use edge_gateway::analytics::engine::{Analytics, AnalyticsConfig};
    use edge_gateway::config::Config;
    use edge_gateway::shard::dedup::Dedup;
    use edge_gateway::shard::worker::{BatchIds, Worker, WorkerConfig};
    use edge_gateway::shard::Router;
    use edge_gateway::telemetry::Metrics;
    use std::sync::Arc;
    let config = Config::default();
    let samples = samples();
    let readings: usize = samples.iter().map(|s| s.metrics.len()).sum();
    let per_round = 100;
    let mut group = c.benchmark_group("worker_step");
    group.throughput(Throughput::Elements((readings * per_round) as u64));
    group.bench_function("native_cbor_analytics", |b| {
        let mut seq = 0u64;
        b.iter_batched(
            || {
                seq += 1;
                let payload = bytes::Bytes::from(
                    edge_payload::encode(Format::NativeCbor, seq, &samples, &firmware_sim::unit_of)
                        .unwrap_or_else(|e| panic!("{e}")),
                );
                let router = Router::new(1, 16);
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let worker = Worker::new(
                    router.shards()[0].clone(),
                    WorkerConfig::from(&config),
                    Arc::new(Metrics::default()),
                    tx,
                    Dedup::new(1000, i64::MAX / 4),
                    Arc::new(BatchIds::new()),
                )
                .with_analytics(
                    Analytics::new(
                        Arc::new(AnalyticsConfig::default()),
                        AnomalyConfig::default(),
                        Arc::new(Vec::new()),
                    ),
                    None,
                );
                let messages: Vec<_> = (0..per_round)
                    .map(|d| message(d as u64, &format!("dev-{d:04}"), &payload))
                    .collect();
                (worker, messages, rx)
            },
            |(mut worker, messages, rx)| {
                for m in messages {
                    worker.handle(m);
                }
                (worker, rx)
            },
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_decode,
    bench_copy_encode,
    bench_ring,
    bench_dedup,
    bench_analytics,
    bench_worker_step
);
criterion_main!(benches);
