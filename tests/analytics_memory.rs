//! What the analytics state of a series really costs: every byte a shard
//! worker's `Analytics` allocates for many devices, counted by a global
//! allocator, divided by the series. This includes what the per-series
//! gauge (`edge_gateway_analytics_state_bytes`) leaves out: the device
//! map, the per-device series vectors and the metric names.
//!
//! The budget is 1 KiB per active series (the scaling plan: 400,000 series
//! in well under 1 GB) with the default windows and detector and the two
//! rules of the end-to-end benchmark, at 1 reading/s per series. This file
//! holds one test, so no other test allocates while it counts.

// A test (or bench) that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use edge_gateway::analytics::anomaly::AnomalyConfig;
use edge_gateway::analytics::engine::{Analytics, AnalyticsConfig, Outputs};
use edge_gateway::analytics::rules::{Kind, RuleConfig};

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn rule(name: &str, kind: Kind, metric: &str, threshold: f64) -> RuleConfig {
    RuleConfig {
        name: name.into(),
        kind,
        metric: metric.into(),
        devices: "*".into(),
        threshold: Some(threshold),
        clear: None,
        for_secs: 5.0,
        clear_for_secs: 0.0,
        first: None,
        then: None,
        within_secs: 0.0,
    }
}

#[test]
fn a_series_costs_at_most_one_kib() {
    const DEVICES: usize = 5_000;
    const METRICS: [&str; 4] = ["temperature", "humidity", "pressure", "battery"];
    const SECONDS: i64 = 200;
    let rules = Arc::new(vec![
        rule("hot", Kind::Above, "*", 80.0),
        rule("odd", Kind::Anomaly, "*", 0.99),
    ]);
    let devices: Vec<Arc<str>> = (0..DEVICES)
        .map(|d| Arc::from(format!("dev-{d:06}").as_str()))
        .collect();
    let mut out = Outputs::default();

    let before = LIVE.load(Ordering::Relaxed);
    let mut analytics = Analytics::new(
        Arc::new(AnalyticsConfig::default()),
        AnomalyConfig::default(),
        rules,
    );
    for second in 0..SECONDS {
        let t = second * 1_000_000;
        for (d, device) in devices.iter().enumerate() {
            for (m, metric) in METRICS.iter().enumerate() {
                let v = 20.0 + ((second + d as i64 + m as i64) % 17) as f64 * 0.3;
                analytics.observe(device, metric, t, v, t, &mut out);
            }
        }
        out = Outputs::default();
        if second % 10 == 0 {
            analytics.tick(t, &mut out);
        }
    }
    out = Outputs::default();
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    let series = DEVICES * METRICS.len();
    let per_series = bytes as f64 / series as f64;
    let footprint = analytics.memory();
    eprintln!(
        "{series} series: {bytes} bytes allocated, {per_series:.0} per series \
         (the gauges count {:.0} of state and {:.0} held per series)",
        footprint.state_bytes as f64 / series as f64,
        footprint.held_bytes as f64 / series as f64,
    );
    assert_eq!(footprint.series, series);
    assert!(
        per_series <= 1024.0,
        "{per_series:.0} bytes per series, over the 1 KiB budget"
    );
    drop((analytics, out));
}
