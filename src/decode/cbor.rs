//! A streaming CBOR reader (RFC 8949) for the decoders of the hot path.
//!
//! It reads one data item header at a time straight from the payload slice:
//! text and byte strings are borrowed, numbers are returned by value, and
//! nothing is allocated, except to join the chunks of an indefinite-length
//! string (rare on the wire, and bounded by the payload). Every length is
//! checked against the bytes that remain before it is used, so a header that
//! claims 2^64 entries costs nothing but the bytes actually sent, and nesting
//! is bounded by [`MAX_DEPTH`] when a value is skipped. `ciborium`'s value
//! model (a visitor call per item, an owned `String` per text) cost more than
//! the rest of the shard worker's step together for SenML CBOR.

use std::borrow::Cow;

/// Deepest nesting of arrays and maps a skipped value may have.
pub const MAX_DEPTH: usize = 64;

/// A malformed CBOR item: what was wrong and at which byte offset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} at byte {at}")]
pub struct CborError {
    pub what: &'static str,
    pub at: usize,
}

/// One data item header, with the content of strings and scalars.
#[derive(Debug, Clone, PartialEq)]
pub enum Item<'a> {
    Uint(u64),
    /// A negative integer: -1 - n.
    Nint(u64),
    Bytes(Cow<'a, [u8]>),
    Text(Cow<'a, str>),
    /// An array of that many items, or of indefinite length (until a break).
    Array(Option<u64>),
    /// A map of that many pairs, or of indefinite length (until a break).
    Map(Option<u64>),
    /// A tag; the tagged item follows.
    Tag(u64),
    Bool(bool),
    Null,
    Undefined,
    /// Any other simple value.
    Simple(u8),
    Float(f64),
    /// The end of an indefinite-length array, map or string.
    Break,
}

impl Item<'_> {
    /// The value of an integer or a float.
    pub fn number(&self) -> Option<f64> {
        match *self {
            Item::Uint(v) => Some(v as f64),
            Item::Nint(v) => Some(-1.0 - v as f64),
            Item::Float(f) => Some(f),
            _ => None,
        }
    }
}

/// The entries of an array or a map whose header was just read: counts
/// down a definite length, or reads up to the break of an indefinite one.
/// For a map, an entry is a pair: the caller reads its key and its value.
#[derive(Debug, Clone, Copy)]
pub struct Entries {
    /// Entries left of a definite length; `None` until a break.
    left: Option<u64>,
}

impl Entries {
    /// For the count an [`Item::Array`] or [`Item::Map`] header gave.
    pub fn new(count: Option<u64>) -> Entries {
        Entries { left: count }
    }

    /// Whether another entry follows; at the break of an indefinite
    /// length, reads it. The caller then reads the entry itself, on a fast
    /// path ([`Reader::small_int`], ...) or with [`Reader::item`] (a tag
    /// before the break is its error), so no [`Item`] is built just to
    /// look for the break.
    #[inline]
    pub fn more(&mut self, r: &mut Reader<'_>) -> bool {
        match &mut self.left {
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
            None if r.peek() == Some(BREAK) => {
                r.pos += 1;
                false
            }
            None => true,
        }
    }
}

/// The initial byte of a break.
const BREAK: u8 = 0xff;

/// A pull reader over one payload.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

const INDEFINITE: u64 = u64::MAX;

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The offset of the next byte.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The next byte, not consumed.
    #[inline]
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    /// The fast paths below read the shapes devices send (short text,
    /// plain numbers, small labels) straight from the bytes, and leave
    /// anything else unread (`None`) for [`item`](Self::item) or
    /// [`untagged`](Self::untagged), which also give the errors. They read
    /// exactly what `item` would: the differential tests hold them to it.
    ///
    /// An integer of one byte (0..=23 or -24..=-1).
    #[inline]
    pub fn small_int(&mut self) -> Option<i64> {
        let b = self.peek()?;
        let v = match b {
            0x00..=0x17 => i64::from(b),
            0x20..=0x37 => -1 - i64::from(b - 0x20),
            _ => return None,
        };
        self.pos += 1;
        Some(v)
    }

    /// The header of a map of fewer than 24 pairs, its count.
    #[inline]
    pub fn small_map(&mut self) -> Option<u64> {
        let b = self.peek()?;
        let n = match b {
            0xa0..=0xb7 => u64::from(b - 0xa0),
            _ => return None,
        };
        if 2 * n > (self.remaining() - 1) as u64 {
            return None;
        }
        self.pos += 1;
        Some(n)
    }

    /// A definite text string shorter than 256 bytes, valid UTF-8.
    #[inline]
    pub fn short_text(&mut self) -> Option<&'a str> {
        let b = self.peek()?;
        let (start, len) = match b {
            0x60..=0x77 => (self.pos + 1, usize::from(b - 0x60)),
            0x78 => (self.pos + 2, usize::from(*self.buf.get(self.pos + 1)?)),
            _ => return None,
        };
        let s = std::str::from_utf8(self.buf.get(start..start + len)?).ok()?;
        self.pos = start + len;
        Some(s)
    }

    /// The next item, tags skipped, when it is a text string (borrowed
    /// unless chunked); `None` when it is another item, which is read.
    ///
    /// # Errors
    /// As for [`untagged`](Self::untagged).
    #[inline]
    pub fn text(&mut self) -> Result<Option<Cow<'a, str>>, CborError> {
        if let Some(s) = self.short_text() {
            return Ok(Some(Cow::Borrowed(s)));
        }
        Ok(match self.untagged()? {
            Item::Text(s) => Some(s),
            _ => None,
        })
    }

    /// An untagged integer or float, as [`Item::number`] gives it.
    #[inline]
    pub fn plain_number(&mut self) -> Option<f64> {
        let b = self.peek()?;
        let rest = &self.buf[self.pos + 1..];
        let (major, info) = (b >> 5, b & 0x1f);
        let (arg, n) = match info {
            0..=23 => (u64::from(info), 0),
            24 => (u64::from(*rest.first()?), 1),
            25 => (
                u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
                2,
            ),
            26 => (
                u64::from(u32::from_be_bytes(rest.get(..4)?.try_into().ok()?)),
                4,
            ),
            27 => (u64::from_be_bytes(rest.get(..8)?.try_into().ok()?), 8),
            _ => return None,
        };
        let v = match (major, info) {
            (0, _) => arg as f64,
            (1, _) => -1.0 - arg as f64,
            (7, 25) => half(arg as u16),
            (7, 26) => f64::from(f32::from_bits(arg as u32)),
            (7, 27) => f64::from_bits(arg),
            _ => return None,
        };
        self.pos += 1 + n;
        Some(v)
    }

    fn error<T>(&self, what: &'static str) -> Result<T, CborError> {
        Err(CborError { what, at: self.pos })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CborError> {
        if n > self.remaining() {
            return self.error("unexpected end of input");
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, CborError> {
        Ok(self.take(1)?[0])
    }

    /// The argument of a header with additional information `info`:
    /// [`INDEFINITE`] for 31 (the caller says whether that is allowed).
    fn argument(&mut self, info: u8) -> Result<u64, CborError> {
        Ok(match info {
            0..=23 => u64::from(info),
            24 => u64::from(self.byte()?),
            25 => u64::from(u16::from_be_bytes(self.array()?)),
            26 => u64::from(u32::from_be_bytes(self.array()?)),
            27 => u64::from_be_bytes(self.array()?),
            31 => INDEFINITE,
            _ => return self.error("reserved additional information"),
        })
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CborError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A definite length that must fit in what remains (each entry takes at
    /// least one byte), so no caller ever trusts a length the bytes do not
    /// back.
    fn length(&mut self, argument: u64, per_entry: u64) -> Result<usize, CborError> {
        match argument.checked_mul(per_entry) {
            Some(n) if n <= self.remaining() as u64 => Ok(argument as usize),
            _ => self.error("length beyond the end of input"),
        }
    }

    /// Reads the next item header (and the content of a string or scalar).
    ///
    /// # Errors
    /// [`CborError`] for truncated input, reserved encodings, invalid UTF-8
    /// in a text string, or chunks of an indefinite string of another type.
    pub fn item(&mut self) -> Result<Item<'a>, CborError> {
        let initial = self.byte()?;
        let (major, info) = (initial >> 5, initial & 0x1f);
        let arg = self.argument(info)?;
        let indefinite = arg == INDEFINITE && info == 31;
        Ok(match major {
            0 | 1 | 6 if indefinite => return self.error("indefinite length on an integer or tag"),
            0 => Item::Uint(arg),
            1 => Item::Nint(arg),
            2 if indefinite => Item::Bytes(Cow::Owned(self.chunks(2)?)),
            2 => {
                let n = self.length(arg, 1)?;
                Item::Bytes(Cow::Borrowed(self.take(n)?))
            }
            3 if indefinite => match String::from_utf8(self.chunks(3)?) {
                Ok(s) => Item::Text(Cow::Owned(s)),
                Err(_) => return self.error("invalid UTF-8 in a text string"),
            },
            3 => {
                let n = self.length(arg, 1)?;
                let at = self.pos;
                match std::str::from_utf8(self.take(n)?) {
                    Ok(s) => Item::Text(Cow::Borrowed(s)),
                    Err(_) => {
                        return Err(CborError {
                            what: "invalid UTF-8 in a text string",
                            at,
                        })
                    }
                }
            }
            4 if indefinite => Item::Array(None),
            4 => Item::Array(Some(self.length(arg, 1)? as u64)),
            5 if indefinite => Item::Map(None),
            5 => Item::Map(Some(self.length(arg, 2)? as u64)),
            6 => Item::Tag(arg),
            _ => match info {
                20 => Item::Bool(false),
                21 => Item::Bool(true),
                22 => Item::Null,
                23 => Item::Undefined,
                24 if arg < 32 => return self.error("invalid two-byte simple value"),
                0..=19 | 24 => Item::Simple(arg as u8),
                25 => Item::Float(half(arg as u16)),
                26 => Item::Float(f64::from(f32::from_bits(arg as u32))),
                27 => Item::Float(f64::from_bits(arg)),
                _ => Item::Break,
            },
        })
    }

    /// The joined chunks of an indefinite-length string of major type
    /// `major`, up to its break.
    fn chunks(&mut self, major: u8) -> Result<Vec<u8>, CborError> {
        let mut out = Vec::new();
        loop {
            let initial = self.byte()?;
            if initial == 0xff {
                return Ok(out);
            }
            if initial >> 5 != major || initial & 0x1f == 31 {
                return self
                    .error("a chunk of an indefinite string is not a definite string of its type");
            }
            let arg = self.argument(initial & 0x1f)?;
            let n = self.length(arg, 1)?;
            out.extend_from_slice(self.take(n)?);
        }
    }

    /// Reads the next item, skipping the tags in front of it.
    ///
    /// # Errors
    /// As for [`item`](Self::item).
    pub fn untagged(&mut self) -> Result<Item<'a>, CborError> {
        let mut tag = None;
        loop {
            match self.item()? {
                Item::Tag(t) => tag = Some(t),
                Item::Break if tag.is_some() => return self.error("a tag before a break"),
                // RFC 8949 3.4.3: a bignum is a byte string.
                item if matches!(tag, Some(2 | 3)) && !matches!(item, Item::Bytes(_)) => {
                    return self.error("a bignum tag on something other than a byte string")
                }
                item => return Ok(item),
            }
        }
    }

    /// Skips one whole value (with everything nested in it), iteratively.
    ///
    /// # Errors
    /// As for [`item`](Self::item), and for a break outside an
    /// indefinite-length container or nesting deeper than [`MAX_DEPTH`].
    pub fn skip(&mut self) -> Result<(), CborError> {
        let item = self.item()?;
        self.skip_rest(item)
    }

    /// Skips what remains of the value `item` opened (nothing for a scalar
    /// or a string; the content of an array, a map or a tag).
    ///
    /// # Errors
    /// As for [`skip`](Self::skip).
    pub fn skip_rest(&mut self, item: Item<'a>) -> Result<(), CborError> {
        // Items still expected by each open container (INDEFINITE: until
        // its break).
        let mut open = [0u64; MAX_DEPTH];
        // For an indefinite-length map: whether it holds a key without its
        // value so far (a break then is malformed).
        let mut half = [false; MAX_DEPTH];
        let mut is_map = [false; MAX_DEPTH];
        let mut depth = 0;
        let mut item = item;
        loop {
            let map = matches!(item, Item::Map(None));
            let opened = match item {
                Item::Array(Some(n)) if n > 0 => Some(n),
                Item::Map(Some(n)) if n > 0 => Some(2 * n),
                Item::Array(None) | Item::Map(None) => Some(INDEFINITE),
                Item::Tag(_) => {
                    // The tagged item is part of the same value.
                    item = self.item()?;
                    if item == Item::Break {
                        return self.error("a tag before a break");
                    }
                    continue;
                }
                Item::Break => {
                    if depth == 0 || open[depth - 1] != INDEFINITE {
                        return self.error("unexpected break");
                    }
                    if half[depth - 1] {
                        return self.error("a key without a value in a map");
                    }
                    depth -= 1;
                    None
                }
                _ => None,
            };
            if let Some(n) = opened {
                if depth == MAX_DEPTH {
                    return self.error("nesting too deep");
                }
                open[depth] = n;
                half[depth] = false;
                is_map[depth] = map;
                depth += 1;
            } else {
                // A value completed: count it in the containers above.
                while depth > 0 {
                    if open[depth - 1] == INDEFINITE {
                        if is_map[depth - 1] {
                            half[depth - 1] = !half[depth - 1];
                        }
                        break;
                    }
                    open[depth - 1] -= 1;
                    if open[depth - 1] > 0 {
                        break;
                    }
                    depth -= 1;
                }
            }
            if depth == 0 {
                return Ok(());
            }
            item = self.item()?;
        }
    }
}

/// An IEEE 754 half-precision float. A normal half is rebuilt as the
/// double of the same value bit by bit (exponent rebiased from 15 to 1023,
/// mantissa widened from 10 to 52 bits): no `powi` call per value.
#[inline]
fn half(bits: u16) -> f64 {
    let exponent = u64::from((bits >> 10) & 0x1f);
    let mantissa = u64::from(bits & 0x3ff);
    let magnitude = match exponent {
        // Subnormal: mantissa x 2^-24.
        0 => mantissa as f64 / 16_777_216.0,
        31 if mantissa == 0 => f64::INFINITY,
        31 => f64::NAN,
        _ => f64::from_bits(((exponent + 1023 - 15) << 52) | (mantissa << 42)),
    };
    if bits & 0x8000 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(bytes: &[u8]) -> Result<Vec<Item<'_>>, CborError> {
        let mut r = Reader::new(bytes);
        let mut out = Vec::new();
        while r.remaining() > 0 {
            out.push(r.item()?);
        }
        Ok(out)
    }

    #[test]
    fn rfc8949_appendix_a_examples() {
        use Item::*;
        let cases: Vec<(&[u8], Item<'_>)> = vec![
            (&[0x00], Uint(0)),
            (&[0x17], Uint(23)),
            (&[0x18, 0x18], Uint(24)),
            (&[0x19, 0x03, 0xe8], Uint(1000)),
            (
                &[0x1b, 0, 0, 0, 0xe8, 0xd4, 0xa5, 0x10, 0],
                Uint(1_000_000_000_000),
            ),
            (&[0x20], Nint(0)),
            (&[0x38, 0x63], Nint(99)),
            (&[0xf9, 0x3c, 0x00], Float(1.0)),
            (&[0xf9, 0x7b, 0xff], Float(65504.0)),
            (&[0xf9, 0x00, 0x01], Float(5.960464477539063e-8)),
            (&[0xf9, 0xc4, 0x00], Float(-4.0)),
            (&[0xfa, 0x47, 0xc3, 0x50, 0x00], Float(100000.0)),
            (
                &[0xfb, 0x3f, 0xf1, 0x99, 0x99, 0x99, 0x99, 0x99, 0x9a],
                Float(1.1),
            ),
            (&[0xf4], Bool(false)),
            (&[0xf5], Bool(true)),
            (&[0xf6], Null),
            (&[0xf7], Undefined),
            (&[0xf0], Simple(16)),
            (&[0xf8, 0xff], Simple(255)),
            (&[0x64, 0x49, 0x45, 0x54, 0x46], Text(Cow::Borrowed("IETF"))),
            (&[0x44, 1, 2, 3, 4], Bytes(Cow::Borrowed(&[1, 2, 3, 4]))),
            (
                &[0x5f, 0x42, 1, 2, 0x43, 3, 4, 5, 0xff],
                Bytes(Cow::Owned(vec![1, 2, 3, 4, 5])),
            ),
            (
                &[
                    0x7f, 0x65, b's', b't', b'r', b'e', b'a', 0x64, b'm', b'i', b'n', b'g', 0xff,
                ],
                Text(Cow::Owned("streaming".into())),
            ),
            (&[0x83, 1, 2, 3], Array(Some(3))),
            (&[0x9f], Array(None)),
            (&[0xa2, 1, 2, 3, 4], Map(Some(2))),
            (&[0xbf], Map(None)),
            (&[0xc1, 0x1a, 0x51, 0x4b, 0x67, 0xb0], Tag(1)),
            (&[0xff], Break),
        ];
        for (bytes, want) in cases {
            assert_eq!(Reader::new(bytes).item(), Ok(want), "{bytes:02x?}");
        }
        assert!(
            matches!(Reader::new(&[0xf9, 0x7c, 0x00]).item(), Ok(Float(f)) if f == f64::INFINITY)
        );
        assert!(matches!(Reader::new(&[0xf9, 0x7e, 0x00]).item(), Ok(Float(f)) if f.is_nan()));
    }

    #[test]
    fn malformed_input_is_an_error_never_a_panic() {
        for bytes in [
            &[0x18][..],                                             // truncated argument
            &[0x1c],                                                 // reserved
            &[0x1f],                                                 // indefinite integer
            &[0x62, b'a'],                                           // text shorter than its length
            &[0x62, 0xff, 0xfe],                                     // not UTF-8
            &[0x5f, 0x61, b'a', 0xff],                               // text chunk in a byte string
            &[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // 2^64 items
            &[0xf8, 0x10], // two-byte simple value below 32
        ] {
            assert!(items(bytes).is_err(), "{bytes:02x?}");
        }
    }

    #[test]
    fn entries_end_at_their_length_or_their_break() {
        // [1, 2] then 9; [_ 1, 2] then 9; {_ 1: 2} then 9.
        for bytes in [
            &[0x82, 0x01, 0x02, 0x09][..],
            &[0x9f, 0x01, 0x02, 0xff, 0x09],
        ] {
            let mut r = Reader::new(bytes);
            let Ok(Item::Array(count)) = r.item() else {
                panic!("{bytes:02x?}")
            };
            let mut entries = Entries::new(count);
            let mut got = Vec::new();
            while entries.more(&mut r) {
                got.push(r.item().unwrap().number());
            }
            assert_eq!(got, [Some(1.0), Some(2.0)]);
            assert_eq!(r.item(), Ok(Item::Uint(9)));
        }
        let mut r = Reader::new(&[0xbf, 0x01, 0x02, 0xff]);
        let Ok(Item::Map(None)) = r.item() else {
            panic!("a map")
        };
        let mut entries = Entries::new(None);
        assert!(entries.more(&mut r));
        assert_eq!(r.item(), Ok(Item::Uint(1)));
        assert_eq!(r.item(), Ok(Item::Uint(2)));
        assert!(!entries.more(&mut r));
        assert_eq!(r.remaining(), 0);
        assert_eq!(Item::Nint(4).number(), Some(-5.0));
        assert_eq!(Item::Null.number(), None);
    }

    /// Every fast path reads what [`Reader::item`] reads, or leaves the
    /// input untouched: tried on every initial byte, with tails that are
    /// long, short, valid UTF-8 or not.
    #[test]
    fn fast_paths_read_what_item_reads() {
        let tails: [&[u8]; 5] = [
            &[],
            &[0x02],
            &[0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69],
            &[0xff; 30],
            &[0x03; 300],
        ];
        for b in 0..=255u8 {
            for tail in tails {
                let bytes = [&[b][..], tail].concat();
                let mut reference = Reader::new(&bytes);
                let expected = reference.item();
                let after = reference.position();
                let check = |got: Option<Item<'_>>, r: &Reader<'_>, what: &str| match got {
                    Some(item) => {
                        assert_eq!(Ok(item), expected.clone(), "{what} {bytes:02x?}");
                        assert_eq!(r.position(), after, "{what} {bytes:02x?}");
                    }
                    None => assert_eq!(r.position(), 0, "{what} {bytes:02x?}"),
                };
                let mut r = Reader::new(&bytes);
                let got = r.small_int().map(|v| match v {
                    0.. => Item::Uint(v as u64),
                    _ => Item::Nint((-1 - v) as u64),
                });
                check(got, &r, "small_int");
                let mut r = Reader::new(&bytes);
                let got = r.small_map().map(|n| Item::Map(Some(n)));
                check(got, &r, "small_map");
                let mut r = Reader::new(&bytes);
                let got = r.short_text().map(|s| Item::Text(Cow::Borrowed(s)));
                check(got, &r, "short_text");
                let mut r = Reader::new(&bytes);
                match r.plain_number() {
                    Some(v) => {
                        let want = expected.clone().ok().and_then(|i| i.number());
                        assert_eq!(want.map(f64::to_bits), Some(v.to_bits()), "{bytes:02x?}");
                        assert_eq!(r.position(), after, "plain_number {bytes:02x?}");
                    }
                    None => assert_eq!(r.position(), 0, "plain_number {bytes:02x?}"),
                }
            }
        }
    }

    /// Every half float, against the value its definition gives
    /// (RFC 8949 appendix D).
    #[test]
    fn half_floats_decode_exactly() {
        for bits in 0..=u16::MAX {
            let exponent = i32::from((bits >> 10) & 0x1f);
            let mantissa = f64::from(bits & 0x3ff);
            let magnitude = match exponent {
                0 => mantissa * 2f64.powi(-24),
                31 if mantissa == 0.0 => f64::INFINITY,
                31 => f64::NAN,
                _ => (mantissa + 1024.0) * 2f64.powi(exponent - 25),
            };
            let want = if bits & 0x8000 != 0 {
                -magnitude
            } else {
                magnitude
            };
            let got = half(bits);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{bits:#06x}: {got} != {want}"
            );
        }
    }

    #[test]
    fn skip_passes_over_one_whole_value() {
        // [1, {"a": [2, 3]}, tag(1) 4, [_ 5, 6]] then 7.
        let bytes = [
            0x84, 0x01, 0xa1, 0x61, b'a', 0x82, 0x02, 0x03, 0xc1, 0x04, 0x9f, 0x05, 0x06, 0xff,
            0x07,
        ];
        let mut r = Reader::new(&bytes);
        r.skip().unwrap();
        assert_eq!(r.item(), Ok(Item::Uint(7)));
        // Empty containers are whole values too.
        let mut r = Reader::new(&[0x80, 0xa0, 0x01]);
        r.skip().unwrap();
        r.skip().unwrap();
        assert_eq!(r.item(), Ok(Item::Uint(1)));
    }

    #[test]
    fn skip_bounds_nesting_and_breaks() {
        let mut deep = vec![0x81; MAX_DEPTH + 1];
        deep.push(0x00);
        assert_eq!(
            Reader::new(&deep).skip().map_err(|e| e.what),
            Err("nesting too deep")
        );
        assert!(Reader::new(&[0xff]).skip().is_err());
        // An indefinite map must not end after a key (found by fuzzing).
        assert!(Reader::new(&[0xbf, 0x01, 0xff]).skip().is_err());
        let mut r = Reader::new(&[0xbf, 0x01, 0x02, 0xff, 0x07]);
        r.skip().unwrap();
        assert_eq!(r.item(), Ok(Item::Uint(7)));
        // A tag must tag an item, not a break (found by fuzzing).
        assert!(Reader::new(&[0x9f, 0xc1, 0xff]).skip().is_err());
        assert!(Reader::new(&[0xcd, 0xc9, 0xff]).untagged().is_err());
        assert!(Reader::new(&[0xd6, 0xc3, 0x00]).untagged().is_err());
        assert!(Reader::new(&[0xc2, 0x41, 0x01]).untagged().is_ok());
        assert!(Reader::new(&[0x82, 0x01, 0xff]).skip().is_err());
        // An indefinite map that never ends runs out of input.
        assert!(Reader::new(&[0xbf, 0x01, 0x02]).skip().is_err());
    }
}
