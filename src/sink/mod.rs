//! Sink stage: batches of COPY rows into PostgreSQL, then the ack ledger.
//!
//! Shard workers fill a [`Batch`] with rows already encoded in COPY binary
//! format; a sealed batch goes through a bounded queue to one of K
//! [`writer`]s, which creates missing partitions, COPYs readings and dead
//! letters in one transaction, commits, and reports the batch's message ids
//! to the [`ledger`] so their PUBACKs can be released in order.

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
