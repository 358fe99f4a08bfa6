//! Sink stage: batches of COPY rows into PostgreSQL, durable before acked.
//!
//! Shard workers fill a [`Batch`] with rows already encoded in COPY binary
//! format; a sealed batch goes through a bounded queue to one of K
//! [`writer`]s, which commits it in one transaction ([`commit`], through a
//! [`store`]) or, while the database is away, appends it to its [`spool`];
//! either way the batch's message ids then go back to the intake on the
//! `done` channel, whose ledger releases their PUBACKs in order.
//! [`maintenance`] keeps partitions and retention, [`restore`] reads the
//! stored dedup state back at start.

pub mod batch;
pub mod commit;
pub mod connection;
pub mod copy;
pub mod maintenance;
pub mod partitions;
pub mod restore;
pub mod schema;
pub mod settings;
pub mod spool;
pub mod store;
pub mod writer;

pub use batch::{Batch, SealedBatch};
