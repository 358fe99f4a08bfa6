//! What the exactly-once bookkeeping costs on the database side.
//!
//! The same batches (500 messages x 10 samples x 2 metrics = 10,000
//! readings each) are loaded three ways into a throwaway PostgreSQL:
//! - `copy`: a plain `COPY ... (FORMAT binary)` of the readings, one
//!   transaction per batch (the baseline);
//! - `senml`: the gateway's commit path for SenML, which also records the
//!   batch id and 500 message identities in the same transaction;
//! - `native`: the gateway's commit path for native payloads, which records
//!   the batch id and upserts the devices' sequence windows;
//! - `isolate`: native batches with one poisoned message each (a value a
//!   CHECK constraint refuses): the failed first attempt, then the commit
//!   that bisects the messages down to the poisoned one and stores it as a
//!   dead letter. What one bad message per batch costs a writer.
//!
//! Run: `cargo bench --bench dedup_cost`. Prints a table, then one JSON line.

// A test (or bench) that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use edge_gateway::config::PartitionInterval;
use edge_gateway::decode::decode;
use edge_gateway::local::postgres::LocalPostgres;
use edge_gateway::model::Message;
use edge_gateway::shard::dedup::{Dedup, Verdict};
use edge_gateway::shard::worker::BatchIds;
use edge_gateway::sink::commit::{commit, WriterContext};
use edge_gateway::sink::connection::connect;
use edge_gateway::sink::partitions::Partitions;
use edge_gateway::sink::{schema, Batch, SealedBatch};
use edge_gateway::telemetry::Metrics;
use edge_payload::{Format, Sample};
use futures_util::SinkExt;
use tokio_util::sync::CancellationToken;

const BATCHES: usize = 40;
const MESSAGES: usize = 500;
const SAMPLES: usize = 10;
const DEVICES: usize = 100;

fn batches(
    format: Format,
    start_ms: i64,
    partitions: &Partitions,
    poison: bool,
) -> Vec<SealedBatch> {
    let ids = BatchIds::new();
    let mut dedup = Dedup::new(10_000_000, i64::MAX / 4);
    let mut seq = vec![0u64; DEVICES];
    let mut out = Vec::new();
    for b in 0..BATCHES {
        let mut batch = Batch::new(MESSAGES * SAMPLES * 2);
        for m in 0..MESSAGES {
            let d = m % DEVICES;
            seq[d] += 1;
            let base = start_ms + ((b * MESSAGES + m) * SAMPLES) as i64;
            let samples: Vec<Sample> = (0..SAMPLES as i64)
                .map(|i| Sample {
                    ts_ms: base + i,
                    metrics: vec![
                        ("temperature".into(), 20.0 + i as f64),
                        (
                            "humidity".into(),
                            if poison && m == MESSAGES / 3 {
                                1e15
                            } else {
                                40.0 - i as f64
                            },
                        ),
                    ],
                })
                .collect();
            let payload = Bytes::from(
                edge_payload::encode(format, seq[d], &samples, &firmware_sim::unit_of)
                    .unwrap_or_else(|e| panic!("{e}")),
            );
            let device: Arc<str> = Arc::from(format!("dev-{d:04}").as_str());
            let message = Message {
                id: (b * MESSAGES + m) as u64,
                device: Some(device.clone()),
                topic: Arc::from(format!("devices/{device}/telemetry").as_str()),
                payload: payload.clone(),
                received: start_ms * 1000,
                content_type: None,
                redelivery: false,
            };
            let Ok(decoded) = decode(&payload, None, start_ms * 1000) else {
                panic!("bench payload must decode")
            };
            let Verdict::New {
                window, identity, ..
            } = dedup.check(&device, &decoded, &payload, false, message.received)
            else {
                panic!("bench messages are distinct")
            };
            batch.push_readings(
                &message,
                &decoded.readings,
                partitions.interval(),
                window,
                identity,
                None,
            );
        }
        out.push(batch.seal(ids.next()));
    }
    out
}

async fn truncate(client: &tokio_postgres::Client) {
    client
        .batch_execute("TRUNCATE edge.readings, edge.message_ids, edge.applied_batches, edge.device_watermarks, edge.dead_letters")
        .await
        .unwrap_or_else(|e| panic!("truncate: {e}"));
}

fn rate(rows: usize, took: Duration) -> f64 {
    rows as f64 / took.as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap_or_else(|e| panic!("runtime: {e}"));
    let pg = LocalPostgres::start().unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async {
        let pg_config: tokio_postgres::Config = pg.url().parse().unwrap_or_else(|e| panic!("{e}"));
        let mut client = connect(&pg_config.clone().into()).await.unwrap_or_else(|e| panic!("{e}"));
        schema::create(&mut client, "edge").await.unwrap_or_else(|e| panic!("{e}"));
        let partitions = Arc::new(Partitions::new("edge", PartitionInterval::Daily));
        let start_ms = edge_gateway::model::now_micros() / 1000 - 3_600_000;
        let senml = batches(Format::SenmlCbor, start_ms, &partitions, false);
        let native = batches(Format::NativeCbor, start_ms, &partitions, false);
        let poisoned = batches(Format::NativeCbor, start_ms, &partitions, true);
        client
            .batch_execute("ALTER TABLE edge.readings ADD CONSTRAINT sane CHECK (abs(value) < 1e12)")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let all: Vec<i64> = senml.iter().flat_map(|b| b.partitions.clone()).collect();
        partitions.ensure(&mut client, &all).await.unwrap_or_else(|e| panic!("{e}"));
        let rows: usize = senml.iter().map(|b| b.reading_rows).sum();
        let ctx = WriterContext {
            db: pg_config.clone().into(),
            schema: "edge".into(),
            partitions: partitions.clone(),
            metrics: Arc::new(Metrics::default()),
            retry_min: Duration::from_millis(100),
            shutdown: CancellationToken::new(),
            notify_channel: String::new(),
            alerts: None,
        };

        let mut results = Vec::new();
        for round in 0..2 {
            truncate(&client).await;
            let t = Instant::now();
            for batch in &senml {
                let tx = client.transaction().await.unwrap_or_else(|e| panic!("{e}"));
                let sink = tx
                    .copy_in("COPY edge.readings (time, device_id, metric, value, unit, vs, vb, vd, sum) FROM STDIN (FORMAT binary)")
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                futures_util::pin_mut!(sink);
                sink.send(batch.readings.clone()).await.unwrap_or_else(|e| panic!("{e}"));
                sink.finish().await.unwrap_or_else(|e| panic!("{e}"));
                tx.commit().await.unwrap_or_else(|e| panic!("{e}"));
            }
            let copy = rate(rows, t.elapsed());
            let mut timed = Vec::new();
            for (name, set) in [("senml", &senml), ("native", &native), ("isolate", &poisoned)] {
                truncate(&client).await;
                let t = Instant::now();
                for batch in set.iter() {
                    if commit(&mut client, &ctx, batch, false).await.is_err() {
                        let done = commit(&mut client, &ctx, batch, true).await.unwrap_or_else(|e| panic!("{e}"));
                        assert_eq!(done.rejected, 1);
                    }
                }
                timed.push((name, rate(rows, t.elapsed())));
            }
            if round == 1 {
                results.push(("copy", copy));
                results.extend(timed);
            }
        }
        let copy = results[0].1;
        println!("{:<8} {:>14} {:>8}", "path", "readings/s", "ratio");
        for (name, r) in &results {
            println!("{name:<8} {r:>14.0} {:>8.3}", r / copy);
        }
        println!(
            "{{\"rows\":{rows},\"copy_readings_per_s\":{:.0},\"senml_readings_per_s\":{:.0},\"native_readings_per_s\":{:.0},\"isolate_readings_per_s\":{:.0},\"senml_ratio\":{:.3},\"native_ratio\":{:.3},\"isolate_ratio\":{:.3}}}",
            copy,
            results[1].1,
            results[2].1,
            results[3].1,
            results[1].1 / copy,
            results[2].1 / copy,
            results[3].1 / copy
        );
    });
}
