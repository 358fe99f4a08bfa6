//! Scale-out by topic sharding: two gateways on one broker split the fleet;
//! every reading is stored once and each device's alerts come from the one
//! instance that owns its shard.

// A test (or bench) that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use edge_gateway::local::{mosquitto::Mosquitto, postgres::LocalPostgres};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_split_the_fleet_by_topic_shard() {
    let pg = LocalPostgres::start().expect("throwaway PostgreSQL");
    let broker = Mosquitto::start().expect("mosquitto");
    let _ = two_gateways_split_the_fleet(&broker.url(), &pg.url()).await;
}
