//! Housekeeping in the database: the schema at start ([`migrate`]), then,
//! every ten minutes ([`run`]), partitions created ahead, expired ones
//! dropped, dedup state past its horizon and side-table rows past their
//! retention deleted.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::connection::{connect, describe, Db};
use super::partitions::Partitions;
use super::schema;
use super::settings::{DatabaseConfig, RetentionConfig};
use crate::model::{now_micros, MICROS_PER_DAY};

/// What housekeeping needs of the settings.
#[derive(Debug, Clone)]
pub struct Housekeeping {
    pub database: DatabaseConfig,
    pub retention: RetentionConfig,
    /// `dedup.horizon_secs`: how long message identities, applied batch ids
    /// and the windows of silent devices are kept.
    pub dedup_horizon_secs: u64,
}

/// Creates the schema and the partitions around now, and drops partitions
/// past retention.
///
/// # Errors
/// Any database error.
pub async fn migrate(
    db: &Db,
    h: &Housekeeping,
    partitions: &Partitions,
) -> Result<(), tokio_postgres::Error> {
    let mut client = connect(db).await?;
    schema::create(&mut client, &h.database.schema).await?;
    let distributed =
        schema::distribute(&client, &h.database.schema, h.database.citus_shard_count).await?;
    if !distributed.is_empty() {
        tracing::info!(tables = ?distributed, "Citus: distributed by device_id, co-located");
    }
    if !h.database.publication.is_empty() {
        schema::create_publication(&client, &h.database.schema, &h.database.publication).await?;
    }
    maintain(&mut client, h, partitions).await?;
    Ok(())
}

/// One round of housekeeping: partitions ahead created, expired ones
/// dropped, dedup state past its horizon and side-table rows past their
/// retention deleted.
///
/// # Errors
/// Database errors of the partition and dedup statements (retention
/// deletes are reported, not returned).
pub async fn maintain(
    client: &mut Client,
    h: &Housekeeping,
    partitions: &Partitions,
) -> Result<(), tokio_postgres::Error> {
    let now = now_micros();
    let created = partitions
        .create_ahead(client, now, h.database.partitions_ahead)
        .await?;
    let cutoff = now - i64::from(h.database.retention_days) * MICROS_PER_DAY;
    let dropped = partitions.drop_before(client, cutoff).await?;
    let horizon = format!("{} seconds", h.dedup_horizon_secs);
    let s = &h.database.schema;
    client
        .execute(
            &format!("DELETE FROM {s}.message_ids WHERE received_at < now() - $1::text::interval"),
            &[&horizon],
        )
        .await?;
    client
        .execute(
            &format!(
                "DELETE FROM {s}.applied_batches WHERE applied_at < now() - $1::text::interval"
            ),
            &[&horizon],
        )
        .await?;
    // Sequence windows of devices silent past the horizon: the workers
    // evict them from memory after the same time.
    let pruned = client
        .execute(
            &format!(
                "DELETE FROM {s}.device_watermarks WHERE updated_at < now() - $1::text::interval"
            ),
            &[&horizon],
        )
        .await?;
    let r = &h.retention;
    let mut expired = 0;
    for (table, column, days) in [
        ("dead_letters", "received_at", r.dead_letters_days),
        ("alerts", "time", r.alerts_days),
        ("rollups_1m", "bucket", r.rollups_days),
    ] {
        if days == 0 {
            continue;
        }
        let sql =
            format!("DELETE FROM {s}.{table} WHERE {column} < now() - $1::int4 * interval '1 day'");
        // Retention is housekeeping: a refusal (a role without DELETE, a
        // publication that needs a replica identity) is reported, not fatal.
        match client.execute(&sql, &[&(days as i32)]).await {
            Ok(n) => expired += n,
            Err(e) => {
                tracing::warn!(table, error = %describe(&e), "retention delete failed")
            }
        }
    }
    if created > 0 || !dropped.is_empty() || pruned > 0 || expired > 0 {
        tracing::info!(created, dropped = ?dropped, watermarks_pruned = pruned, rows_expired = expired, "maintenance done");
    }
    Ok(())
}

/// Creates partitions ahead and drops expired ones every ten minutes.
pub async fn run(db: Db, h: Housekeeping, partitions: Arc<Partitions>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = async {
            let mut client = connect(&db).await?;
            maintain(&mut client, &h, &partitions).await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %describe(&e), "partition maintenance failed; retrying later");
        }
    }
}
