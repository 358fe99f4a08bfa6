//! The spool's record: a sealed batch as bytes (format version, batch id,
//! messages, rows, sequence windows, alerts, rollups, notices). Appended
//! after a CRC by the spool, decoded on replay; anything torn or unknown
//! decodes to `None` and is set aside, never half-replayed.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::alerts::AlertNotice;
use crate::model::seq_window::SeqWindow;
use crate::sink::batch::{BatchId, MessageEntry, SealedBatch};

impl SealedBatch {
    /// The spool form.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = BytesMut::with_capacity(self.readings.len() + self.dead_letters.len() + 256);
        b.put_u32(FORMAT_VERSION);
        b.put_i64(self.id.run);
        b.put_i64(self.id.seq);
        b.put_i64(self.oldest_received);
        put_bytes(&mut b, &self.readings);
        b.put_u64(self.reading_rows as u64);
        put_bytes(&mut b, &self.dead_letters);
        b.put_u64(self.dead_letter_rows as u64);
        b.put_u32(self.partitions.len() as u32);
        for p in &self.partitions {
            b.put_i64(*p);
        }
        b.put_u32(self.messages.len() as u32);
        for m in &self.messages {
            b.put_u64(m.id);
            b.put_i64(m.received);
            put_bytes(&mut b, m.topic.as_bytes());
            match &m.device {
                Some(d) => {
                    b.put_u8(1);
                    put_bytes(&mut b, d.as_bytes());
                }
                None => b.put_u8(0),
            }
            put_bytes(&mut b, &m.payload);
            b.put_u64(m.rows.start as u64);
            b.put_u64(m.rows.end as u64);
            b.put_u32(m.row_count);
            b.put_i64(m.newest);
            match m.identity {
                Some(id) => {
                    b.put_u8(1);
                    b.put_u128(id);
                }
                None => b.put_u8(0),
            }
            // Flags: 1 repeat_ok, 2 verify, then seq and boot (version 4
            // wrote 0 or 1 only, so its files read the same).
            b.put_u8(u8::from(m.repeat_ok) | (u8::from(m.verify.is_some()) << 1));
            if let Some((seq, boot)) = m.verify {
                b.put_u64(seq);
                match boot {
                    Some(boot) => {
                        b.put_u8(1);
                        b.put_u64(boot);
                    }
                    None => b.put_u8(0),
                }
            }
        }
        b.put_u32(self.watermarks.len() as u32);
        for (device, window) in &self.watermarks {
            put_bytes(&mut b, device.as_bytes());
            b.put_u64(window.high());
            put_bytes(&mut b, &window.window_bytes());
            match window.boot() {
                Some(boot) => {
                    b.put_u8(1);
                    b.put_u64(boot);
                }
                None => b.put_u8(0),
            }
            b.put_u32(window.epoch());
            b.put_i64(window.newest());
        }
        put_bytes(&mut b, &self.alerts);
        b.put_u64(self.alert_rows as u64);
        put_bytes(&mut b, &self.rollups);
        b.put_u64(self.rollup_rows as u64);
        b.put_u32(self.notifications.len() as u32);
        for n in &self.notifications {
            put_bytes(&mut b, n.device.as_bytes());
            put_bytes(&mut b, n.json.as_bytes());
        }
        b.to_vec()
    }

    /// Parses the spool form; `None` for anything malformed.
    pub fn decode(mut b: &[u8]) -> Option<SealedBatch> {
        let b = &mut b;
        // Version 3 (before `repeat_ok`) is still read, so a spool left by
        // the previous release replays after an upgrade.
        let version = get_u32(b)?;
        if version != FORMAT_VERSION && version != 3 {
            return None;
        }
        let id = BatchId {
            run: get_i64(b)?,
            seq: get_i64(b)?,
        };
        let oldest_received = get_i64(b)?;
        let readings = Bytes::copy_from_slice(get_bytes(b)?);
        let reading_rows = get_u64(b)? as usize;
        let dead_letters = Bytes::copy_from_slice(get_bytes(b)?);
        let dead_letter_rows = get_u64(b)? as usize;
        let n = get_u32(b)? as usize;
        let mut partitions = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            partitions.push(get_i64(b)?);
        }
        let n = get_u32(b)? as usize;
        let mut messages = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let id = get_u64(b)?;
            let received = get_i64(b)?;
            let topic: Arc<str> = Arc::from(std::str::from_utf8(get_bytes(b)?).ok()?);
            let device = match get_u8(b)? {
                0 => None,
                1 => Some(Arc::from(std::str::from_utf8(get_bytes(b)?).ok()?)),
                _ => return None,
            };
            let payload = Bytes::copy_from_slice(get_bytes(b)?);
            let rows = get_u64(b)? as usize..get_u64(b)? as usize;
            if rows.start > rows.end || rows.end > readings.len() {
                return None;
            }
            let row_count = get_u32(b)?;
            let newest = get_i64(b)?;
            let identity = match get_u8(b)? {
                0 => None,
                1 => Some(get_u128(b)?),
                _ => return None,
            };
            let flags = match version {
                3 => 0,
                _ => match get_u8(b)? {
                    flags @ 0..=3 => flags,
                    _ => return None,
                },
            };
            let repeat_ok = flags & 1 != 0;
            let verify = if flags & 2 != 0 {
                let seq = get_u64(b)?;
                let boot = match get_u8(b)? {
                    0 => None,
                    1 => Some(get_u64(b)?),
                    _ => return None,
                };
                Some((seq, boot))
            } else {
                None
            };
            messages.push(MessageEntry {
                id,
                received,
                topic,
                device,
                payload,
                rows,
                row_count,
                newest,
                identity,
                repeat_ok,
                verify,
            });
        }
        let n = get_u32(b)? as usize;
        let mut watermarks = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let device: Arc<str> = Arc::from(std::str::from_utf8(get_bytes(b)?).ok()?);
            let high = get_u64(b)?;
            let mut window = SeqWindow::restore(high, get_bytes(b)?);
            if version >= 4 {
                let boot = match get_u8(b)? {
                    0 => None,
                    1 => Some(get_u64(b)?),
                    _ => return None,
                };
                window = window.with_state(boot, get_u32(b)?, get_i64(b)?);
            }
            watermarks.push((device, window));
        }
        let alerts = Bytes::copy_from_slice(get_bytes(b)?);
        let alert_rows = get_u64(b)? as usize;
        let rollups = Bytes::copy_from_slice(get_bytes(b)?);
        let rollup_rows = get_u64(b)? as usize;
        let n = get_u32(b)? as usize;
        let mut notifications = Vec::with_capacity(n.min(1 << 16));
        for _ in 0..n {
            let device: Arc<str> = Arc::from(std::str::from_utf8(get_bytes(b)?).ok()?);
            let json = std::str::from_utf8(get_bytes(b)?).ok()?.to_string();
            notifications.push(AlertNotice { device, json });
        }
        if !b.is_empty() {
            return None;
        }
        Some(SealedBatch {
            id,
            readings,
            reading_rows,
            dead_letters,
            dead_letter_rows,
            messages,
            watermarks,
            partitions,
            oldest_received,
            alerts,
            alert_rows,
            rollups,
            rollup_rows,
            notifications,
        })
    }
}

const FORMAT_VERSION: u32 = 4;

fn put_bytes(b: &mut BytesMut, data: &[u8]) {
    b.put_u32(data.len() as u32);
    b.put_slice(data);
}

fn get_bytes<'a>(b: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = get_u32(b)? as usize;
    if b.len() < n {
        return None;
    }
    let (head, tail) = b.split_at(n);
    *b = tail;
    Some(head)
}

macro_rules! getter {
    ($name:ident, $ty:ty, $get:ident) => {
        fn $name(b: &mut &[u8]) -> Option<$ty> {
            (b.remaining() >= std::mem::size_of::<$ty>()).then(|| b.$get())
        }
    };
}
getter!(get_u8, u8, get_u8);
getter!(get_u32, u32, get_u32);
getter!(get_u64, u64, get_u64);
getter!(get_i64, i64, get_i64);
getter!(get_u128, u128, get_u128);
