//! Telemetry: counters every stage updates, and the HTTP endpoints that
//! expose them (`/metrics`, `/healthz`, `/readyz`).

pub mod http;
pub mod metrics;

pub use metrics::Metrics;
