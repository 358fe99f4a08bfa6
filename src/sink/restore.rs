//! Reading back the dedup state the writers stored with the rows: each
//! device's sequence window (`device_watermarks`) and the identities of
//! recent messages without a sequence (`message_ids`). The shards rebuild
//! their dedup from it at start, so a restart forgets nothing committed.

use std::collections::HashMap;
use std::sync::Arc;

use tokio_postgres::{Client, GenericClient};

use crate::model::seq_window::SeqWindow;
use crate::model::Micros;

/// Calls `f(device, window, last_updated)` for every stored window.
///
/// # Errors
/// Database errors.
pub async fn windows(
    client: &Client,
    schema: &str,
    mut f: impl FnMut(Arc<str>, SeqWindow, Micros),
) -> Result<usize, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT device_id, seq, seen, boot, epoch, newest, \
                 (extract(epoch FROM updated_at) * 1000000)::int8 FROM {schema}.device_watermarks"
            ),
            &[],
        )
        .await?;
    for row in &rows {
        f(
            Arc::from(row.get::<_, &str>(0)),
            window_of(row),
            row.get::<_, i64>(6),
        );
    }
    Ok(rows.len())
}

/// The window of a row whose columns 1 to 5 are `seq, seen, boot, epoch,
/// newest`.
fn window_of(row: &tokio_postgres::Row) -> SeqWindow {
    SeqWindow::restore(row.get::<_, i64>(1) as u64, row.get::<_, &[u8]>(2)).with_state(
        row.get::<_, Option<i64>>(3).map(|b| b as u64),
        row.get::<_, i64>(4).clamp(0, i64::from(u32::MAX)) as u32,
        row.get::<_, i64>(5),
    )
}

/// The stored windows of `devices` (those that have one), read inside the
/// commit that needs them.
///
/// # Errors
/// Database errors.
pub async fn windows_of(
    client: &impl GenericClient,
    schema: &str,
    devices: &[&str],
) -> Result<HashMap<String, SeqWindow>, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT device_id, seq, seen, boot, epoch, newest FROM {schema}.device_watermarks \
                 WHERE device_id = ANY($1)"
            ),
            &[&devices],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|row| (row.get::<_, String>(0), window_of(row)))
        .collect())
}

/// Calls `f(device, identity, received)` for every identity recorded within
/// `horizon` (µs) of now, oldest first.
///
/// # Errors
/// Database errors.
pub async fn identities(
    client: &Client,
    schema: &str,
    horizon: Micros,
    mut f: impl FnMut(&str, u128, Micros),
) -> Result<usize, tokio_postgres::Error> {
    let rows = client
        .query(
            &format!(
                "SELECT device_id, hash, (extract(epoch FROM received_at) * 1000000)::int8 FROM {schema}.message_ids \
                 WHERE received_at > now() - $1::int8 * interval '1 microsecond' ORDER BY received_at"
            ),
            &[&horizon],
        )
        .await?;
    let mut n = 0;
    for row in &rows {
        let hash: &[u8] = row.get(1);
        let Ok(bytes) = <[u8; 16]>::try_from(hash) else {
            continue;
        };
        f(row.get(0), u128::from_be_bytes(bytes), row.get(2));
        n += 1;
    }
    Ok(n)
}
