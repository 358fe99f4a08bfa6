//! Edge analytics, run by the shard workers on each series (device and
//! metric) in time order: sliding [`window`]s, threshold and event
//! [`rules`], and streaming [`anomaly`] detection. No I/O: the same code
//! runs in the pipeline, in `replay` and in the benches.

pub mod anomaly;
pub mod engine;
pub mod rules;
mod series;
pub mod window;
