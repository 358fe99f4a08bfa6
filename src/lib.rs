//! edge-gateway: MQTT in, time-partitioned PostgreSQL out, nothing lost.
pub mod alerts;
pub mod analytics;
pub mod config;
pub mod decode;
pub mod demo;
pub mod local;
pub mod model;
pub mod pipeline;
pub mod replay;
pub mod settings;
pub mod shard;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod tls;
