//! Binary COPY encoding: rows written straight into one byte buffer in
//! PostgreSQL's `COPY ... (FORMAT binary)` wire format, with no per-value
//! trait objects (the generic `postgres-types` path is much slower).
//!
//! Format: an 11-byte signature, a flags word and a header-extension length,
//! then per row an `i16` field count and per field an `i32` byte length (-1
//! for NULL) followed by the value in its binary send format; an `i16` -1
//! ends the stream.

use bytes::{BufMut, BytesMut};

use crate::model::Micros;

/// Signature, flags (0) and header extension length (0).
pub const HEADER: &[u8; 19] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// End-of-data marker.
pub const TRAILER: [u8; 2] = (-1i16).to_be_bytes();

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
const PG_EPOCH_OFFSET: i64 = 946_684_800_000_000;

/// Appends rows to a COPY binary buffer.
#[derive(Debug)]
pub struct RowBuffer {
    buf: BytesMut,
    rows: usize,
}

impl RowBuffer {
    /// An empty buffer holding only the header.
    pub fn new(capacity: usize) -> RowBuffer {
        let mut buf = BytesMut::with_capacity(capacity.max(HEADER.len() + 2));
        buf.put_slice(HEADER);
        RowBuffer { buf, rows: 0 }
    }

    /// Rows written so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes written so far, header included.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True when no row was written.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Starts a row of `fields` fields; the caller then writes exactly that many.
    #[inline]
    pub fn row(&mut self, fields: i16) -> &mut Self {
        self.rows += 1;
        self.buf.put_i16(fields);
        self
    }

    #[inline]
    pub fn null(&mut self) -> &mut Self {
        self.buf.put_i32(-1);
        self
    }

    #[inline]
    pub fn timestamptz(&mut self, t: Micros) -> &mut Self {
        self.buf.put_i32(8);
        self.buf.put_i64(t - PG_EPOCH_OFFSET);
        self
    }

    #[inline]
    pub fn float8(&mut self, v: f64) -> &mut Self {
        self.buf.put_i32(8);
        self.buf.put_f64(v);
        self
    }

    #[inline]
    pub fn int8(&mut self, v: i64) -> &mut Self {
        self.buf.put_i32(8);
        self.buf.put_i64(v);
        self
    }

    #[inline]
    pub fn boolean(&mut self, v: bool) -> &mut Self {
        self.buf.put_i32(1);
        self.buf.put_u8(u8::from(v));
        self
    }

    /// A `text` value. PostgreSQL rejects NUL bytes in text. Device ids,
    /// metric names, units and string values with a NUL never get here
    /// (they are dead letters, `invalid_text`); for free text that is stored
    /// as it came (a dead letter's topic or error) a NUL is replaced by
    /// U+FFFD rather than failing the batch.
    #[inline]
    pub fn text(&mut self, s: &str) -> &mut Self {
        if s.as_bytes().contains(&0) {
            let clean = s.replace('\0', "\u{fffd}");
            return self.bytea(clean.as_bytes());
        }
        self.bytea(s.as_bytes())
    }

    #[inline]
    pub fn opt_text(&mut self, s: Option<&str>) -> &mut Self {
        match s {
            Some(s) => self.text(s),
            None => self.null(),
        }
    }

    #[inline]
    pub fn opt_float8(&mut self, v: Option<f64>) -> &mut Self {
        match v {
            Some(v) => self.float8(v),
            None => self.null(),
        }
    }

    /// A `jsonb` value (binary format: version byte 1, then the text).
    #[inline]
    pub fn jsonb(&mut self, json: &str) -> &mut Self {
        self.buf.put_i32(json.len() as i32 + 1);
        self.buf.put_u8(1);
        self.buf.put_slice(json.as_bytes());
        self
    }

    /// A `bytea` value (also the binary format of `text`).
    #[inline]
    pub fn bytea(&mut self, b: &[u8]) -> &mut Self {
        // Fields are limited to 1 GB by PostgreSQL; payloads are capped far lower.
        self.buf.put_i32(b.len() as i32);
        self.buf.put_slice(b);
        self
    }

    /// The finished COPY stream (header, rows, trailer).
    pub fn finish(mut self) -> bytes::Bytes {
        self.buf.put_slice(&TRAILER);
        self.buf.freeze()
    }
}

/// The byte range of each row of a finished COPY stream (header and
/// trailer excluded); `None` when the stream is malformed.
pub fn split_rows(stream: &[u8]) -> Option<Vec<std::ops::Range<usize>>> {
    let mut at = HEADER.len();
    let mut rows = Vec::new();
    let read = |at: usize, n: usize| stream.get(at..at + n);
    loop {
        let start = at;
        let fields = i16::from_be_bytes(read(at, 2)?.try_into().ok()?);
        at += 2;
        if fields == -1 {
            return (at == stream.len()).then_some(rows);
        }
        for _ in 0..fields {
            let len = i32::from_be_bytes(read(at, 4)?.try_into().ok()?);
            at += 4;
            if len > 0 {
                read(at, len as usize)?;
                at += len as usize;
            }
        }
        rows.push(start..at);
    }
}

/// A COPY stream of the rows of `stream` at `ranges` (from [`split_rows`]).
pub fn select_rows(stream: &[u8], ranges: &[std::ops::Range<usize>]) -> bytes::Bytes {
    let len: usize = ranges.iter().map(|r| r.len()).sum();
    let mut out = BytesMut::with_capacity(HEADER.len() + len + 2);
    out.put_slice(HEADER);
    for r in ranges {
        out.put_slice(&stream[r.clone()]);
    }
    out.put_slice(&TRAILER);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_split_and_select_back() {
        let mut rows = RowBuffer::new(0);
        rows.row(2).text("a").null();
        rows.row(2).int8(7).text("bc");
        rows.row(1).bytea(b"");
        let out = rows.finish();
        let ranges = split_rows(&out).expect("well formed");
        assert_eq!(ranges.len(), 3);
        assert_eq!(select_rows(&out, &ranges), out);
        let mut one = RowBuffer::new(0);
        one.row(2).int8(7).text("bc");
        assert_eq!(select_rows(&out, &ranges[1..2]), one.finish());
        assert_eq!(split_rows(&out[..out.len() - 1]), None);
    }

    #[test]
    fn encodes_header_rows_and_trailer() {
        let mut rows = RowBuffer::new(64);
        rows.row(3)
            .timestamptz(PG_EPOCH_OFFSET + 1)
            .text("a")
            .null();
        assert_eq!(rows.rows(), 1);
        let out = rows.finish();
        let mut want = HEADER.to_vec();
        want.extend_from_slice(&3i16.to_be_bytes());
        want.extend_from_slice(&8i32.to_be_bytes());
        want.extend_from_slice(&1i64.to_be_bytes());
        want.extend_from_slice(&1i32.to_be_bytes());
        want.push(b'a');
        want.extend_from_slice(&(-1i32).to_be_bytes());
        want.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(&out[..], &want[..]);
    }

    #[test]
    fn nul_in_text_is_replaced() {
        let mut rows = RowBuffer::new(0);
        rows.row(1).text("a\0b");
        let out = rows.finish();
        let field = &out[HEADER.len() + 2..out.len() - 2];
        assert_eq!(&field[4..], "a\u{fffd}b".as_bytes());
    }
}
