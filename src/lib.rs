//! edge-gateway: MQTT in, time-partitioned PostgreSQL out, nothing lost.
pub mod decode;
pub mod model;
