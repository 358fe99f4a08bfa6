//! Per-stage benches: decode (each format) and COPY row encoding, per
//! reading. Run with `cargo bench --bench stages`.

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
        let payload = edge_payload::encode(format, 1, &samples, &firmware_sim::unit_of);
        group.bench_with_input(BenchmarkId::from_parameter(format), &payload, |b, p| {
            b.iter(|| decode(std::hint::black_box(p), None, 1_750_000_000_000_000))
        });
    }
    group.finish();
}

fn bench_copy_encode(c: &mut Criterion) {
    let payload = edge_payload::encode(Format::NativeCbor, 1, &samples(), &firmware_sim::unit_of);
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
                &partitions,
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
    let payload = edge_payload::encode(Format::SenmlCbor, 1, &samples(), &firmware_sim::unit_of);
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
                None,
                &payload,
                false,
                false,
                n as i64,
            )
        })
    });
    group.bench_function("native_window", |b| {
        let mut dedup = Dedup::new(1, 1);
        let mut n = 0u64;
        b.iter(|| {
            n += 1;
            dedup.check(
                &devices[(n % 1000) as usize],
                Some(n / 1000),
                &[],
                false,
                false,
                0,
            )
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
    use edge_gateway::analytics::window::Window;
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
        let mut windows: Vec<Window> = [10, 60, 300]
            .iter()
            .map(|s| Window::new(s * 1_000_000, 5))
            .collect();
        let anomaly = AnomalyConfig::default();
        let mut detector = Detector::new(&anomaly);
        let mut state = RuleState::default();
        let mut t = 0i64;
        b.iter(|| {
            t += 1_000_000;
            let v = 20.0 + ((t / 1_000_000) % 17) as f64 * 0.7;
            for w in &mut windows {
                w.push(t, v);
            }
            let score = detector.update(&anomaly, v);
            state.update(&rule, t, v, score)
        })
    });
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

criterion_group!(
    benches,
    bench_decode,
    bench_copy_encode,
    bench_dedup,
    bench_analytics
);
criterion_main!(benches);
