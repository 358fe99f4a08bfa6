//! Reading back the dedup state the writers stored with the rows: each
//! device's sequence window (`device_watermarks`) and the identities of
//! recent messages without a sequence (`message_ids`). The shards rebuild
//! their dedup from it at start, so a restart forgets nothing committed.

use std::sync::Arc;

use tokio_postgres::Client;

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
        let window = SeqWindow::restore(row.get::<_, i64>(1) as u64, row.get::<_, &[u8]>(2))
            .with_state(
                row.get::<_, Option<i64>>(3).map(|b| b as u64),
                row.get::<_, i64>(4).clamp(0, i64::from(u32::MAX)) as u32,
                row.get::<_, i64>(5),
            );
        f(
            Arc::from(row.get::<_, &str>(0)),
            window,
            row.get::<_, i64>(6),
        );
    }
    Ok(rows.len())
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
