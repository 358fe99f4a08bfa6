//! edge-gateway: MQTT in, time-partitioned PostgreSQL out, nothing lost.
//!
//! # The flow
//!
//! ```text
//!  broker ──PUBLISH──▶ source ──Message──▶ shard ──Batch──▶ sink ──COPY, NOTIFY──▶ PostgreSQL
//!    ▲                 intake, ledger,     router, rings,   commit, writer,
//!    │                 topic filters       workers, dedup   spool, partitions
//!    │                  ▲       ▲            │      │          │        │
//!    │                  │       │   decode ◀─┘      ▼          │        │
//!    │                  │       │               analytics      │        │
//!    │                  │       │                   │ Alert    │        │
//!    │                  │       │                   ▼          │        │
//!    │                  │       │     alerts: the type, its JSON, its notice
//!    │                  │       └── done: ledger ids of durable messages ─┘
//!    │                  └────────── AlertNotice of each committed alert ─────────┘
//!    └── PUBACKs in receive order once durable; alerts published ── source
//! ```
//!
//! Data moves one way: the intake routes each message to the shard that owns
//! its device; the shard's worker decodes it, drops repeats, runs analytics
//! and fills a batch; the writer commits the batch (or spools it). Only two
//! channels lead back to the intake, and both carry plain values: the ledger
//! ids of durable messages (then their PUBACKs go out in order) and the
//! notices of committed alerts (then they are published on MQTT).
//!
//! # Module dependencies
//!
//! Imports follow the flow: a module uses only the modules named on its
//! line, and nothing uses a module above it in the flow. `tests/architecture.rs`
//! reads every `crate::` path in `src/` and fails when this list and the code
//! disagree or when the modules form a cycle.
//!
//! - `pipeline` uses alerts, analytics, config, model, settings, shard, sink, source, telemetry
//! - `demo` uses analytics, config, local, model, pipeline, sink, telemetry, top
//! - `backtest` uses analytics, config, model
//! - `top` uses local
//! - `local` uses config
//! - `config` uses analytics, decode, model, settings, shard, sink, source
//! - `source` uses alerts, model, settings, shard, telemetry, tls
//! - `shard` uses analytics, decode, model, sink, telemetry
//! - `decode` uses model, settings
//! - `analytics` uses alerts, model, settings
//! - `sink` uses alerts, model, settings, telemetry, tls
//! - `alerts` uses model
//! - `telemetry` uses alerts, model
//! - `settings` uses nothing
//! - `tls` uses nothing
//! - `model` uses nothing
//!
//! `config` gathers the settings each stage owns (`source::settings`,
//! `sink::settings`, `analytics`) and knows no driver; `model` is the
//! vocabulary every stage shares (messages, readings, sequence windows,
//! dead-letter reasons); `settings` is the error every settings check
//! returns.

pub mod alerts;
pub mod analytics;
pub mod backtest;
pub mod config;
pub mod decode;
pub mod demo;
pub mod local;
pub mod model;
pub mod pipeline;

pub mod settings;
pub mod shard;
pub mod sink;
pub mod source;
pub mod telemetry;
pub mod tls;
pub mod top;
