//! The hash of a distribution value: which shard a row belongs to.
//!
//! Definition (fixed by the test vectors below; changing it moves every row of every table):
//!
//!   hash(v) = fold(xxh3_64(tag(v) ++ canonical_bytes(v)))      seed 0
//!   fold(h) = (high 32 bits of h) XOR (low 32 bits of h), read as a signed int32
//!
//! | family | SQL types | tag | canonical bytes |
//! |---|---|---|---|
//! | number | int2, int4, int8, numeric | `N` | normalized decimal text: no trailing fractional zeros, no trailing `.`, `-0` is `0`; `NaN`, `Infinity`, `-Infinity` |
//! | text | text, varchar, bpchar | `T` | UTF-8 bytes (bpchar without trailing spaces) |
//! | bytes | bytea | `B` | the bytes |
//! | uuid | uuid | `U` | the 16 bytes |
//! | date | date | `D` | days since 2000-01-01, int32 little-endian |
//! | timestamp | timestamp, timestamptz | `S` | microseconds since 2000-01-01 00:00 (UTC for timestamptz), int64 little-endian |
//!
//! Equal values of one family hash equally whatever their type: 1::int2, 1::int8 and 1.00::numeric
//! agree, and so do 'a'::text and 'a'::varchar.

use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

/// A distribution value reduced to what its hash depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DistValue<'a> {
    Integer(i64),
    /// The text output of a numeric (numeric_out), normalized here.
    Numeric(&'a str),
    /// UTF-8 (or the database encoding's) bytes of the string.
    Text(&'a [u8]),
    /// bpchar: trailing spaces are not significant.
    PaddedText(&'a [u8]),
    Bytes(&'a [u8]),
    Uuid(&'a [u8; 16]),
    Date(i32),
    Timestamp(i64),
}

/// Strips what does not change a numeric's value from its decimal text.
pub fn normalize_numeric(text: &str) -> &str {
    let mut digits = text;
    if digits.contains('.') {
        digits = digits.trim_end_matches('0').trim_end_matches('.');
    }
    if digits == "-0" {
        "0"
    } else {
        digits
    }
}

fn fold(h: u64) -> i32 {
    (((h >> 32) as u32) ^ (h as u32)) as i32
}

fn hash_tagged(tag: u8, payload: &[u8]) -> i32 {
    // Small values (all but long text and bytea) are assembled on the stack.
    let mut small = [0u8; 64];
    if payload.len() < small.len() {
        small[0] = tag;
        small[1..=payload.len()].copy_from_slice(payload);
        fold(xxh3_64(&small[..=payload.len()]))
    } else {
        let mut buffer = Vec::with_capacity(payload.len() + 1);
        buffer.push(tag);
        buffer.extend_from_slice(payload);
        fold(xxh3_64(&buffer))
    }
}

pub fn hash_value(value: DistValue<'_>) -> i32 {
    match value {
        DistValue::Integer(i) => {
            let mut buffer = itoa_buffer();
            let text = format_integer(i, &mut buffer);
            hash_tagged(b'N', text)
        }
        DistValue::Numeric(text) => hash_tagged(b'N', normalize_numeric(text).as_bytes()),
        DistValue::Text(text) => hash_tagged(b'T', text),
        DistValue::PaddedText(text) => {
            let end = text.iter().rposition(|b| *b != b' ').map_or(0, |i| i + 1);
            hash_tagged(b'T', &text[..end])
        }
        DistValue::Bytes(bytes) => hash_tagged(b'B', bytes),
        DistValue::Uuid(bytes) => hash_tagged(b'U', bytes),
        DistValue::Date(days) => hash_tagged(b'D', &days.to_le_bytes()),
        DistValue::Timestamp(micros) => hash_tagged(b'S', &micros.to_le_bytes()),
    }
}

fn itoa_buffer() -> [u8; 20] {
    [0u8; 20]
}

/// Decimal text of an i64 without allocating (i64::MIN has 20 characters).
fn format_integer(value: i64, buffer: &mut [u8; 20]) -> &[u8] {
    let mut magnitude = value.unsigned_abs();
    let mut start = buffer.len();
    loop {
        start -= 1;
        buffer[start] = b'0' + (magnitude % 10) as u8;
        magnitude /= 10;
        if magnitude == 0 {
            break;
        }
    }
    if value < 0 {
        start -= 1;
        buffer[start] = b'-';
    }
    &buffer[start..]
}

/// A 128-bit fingerprint of a tuple of values (each given by its bytes), for detecting repeated
/// keys without keeping the keys: lengths are part of it, so ("ab", "c") and ("a", "bc") differ.
pub fn key_fingerprint<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> u128 {
    let mut buffer = Vec::with_capacity(64);
    for part in parts {
        buffer.extend_from_slice(&(part.len() as u64).to_le_bytes());
        buffer.extend_from_slice(part);
    }
    xxh3_128(&buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_fingerprints_separate_parts() {
        let a = key_fingerprint([&b"ab"[..], b"c"]);
        let b = key_fingerprint([&b"a"[..], b"bc"]);
        assert_ne!(a, b);
        assert_eq!(a, key_fingerprint([&b"ab"[..], b"c"]));
    }

    #[test]
    fn integers_format_like_numerics() {
        let mut b = itoa_buffer();
        assert_eq!(format_integer(0, &mut b), b"0");
        assert_eq!(format_integer(-7, &mut b), b"-7");
        assert_eq!(format_integer(i64::MIN, &mut b), b"-9223372036854775808");
        assert_eq!(format_integer(i64::MAX, &mut b), b"9223372036854775807");
    }

    #[test]
    fn numeric_normalization() {
        assert_eq!(normalize_numeric("1.00"), "1");
        assert_eq!(normalize_numeric("1.0"), "1");
        assert_eq!(normalize_numeric("10"), "10");
        assert_eq!(normalize_numeric("100.500"), "100.5");
        assert_eq!(normalize_numeric("-0.000"), "0");
        assert_eq!(normalize_numeric("0.000"), "0");
        assert_eq!(normalize_numeric("NaN"), "NaN");
        assert_eq!(normalize_numeric("-Infinity"), "-Infinity");
    }

    #[test]
    fn equal_values_hash_equally_across_types() {
        for i in [-1_000_000i64, -1, 0, 1, 42, 1 << 40] {
            let text = i.to_string();
            assert_eq!(hash_value(DistValue::Integer(i)), hash_value(DistValue::Numeric(&text)));
            let padded = format!("{text}.000");
            assert_eq!(hash_value(DistValue::Integer(i)), hash_value(DistValue::Numeric(&padded)));
        }
        assert_eq!(hash_value(DistValue::Numeric("1.0")), hash_value(DistValue::Numeric("1.00")));
        assert_eq!(hash_value(DistValue::Text(b"ab")), hash_value(DistValue::PaddedText(b"ab   ")));
        assert_ne!(hash_value(DistValue::Text(b"1")), hash_value(DistValue::Integer(1)));
        assert_ne!(hash_value(DistValue::Integer(1)), hash_value(DistValue::Integer(2)));
    }

    #[test]
    fn long_payloads_take_the_heap_path_consistently() {
        let long = "x".repeat(1000);
        let a = hash_value(DistValue::Text(long.as_bytes()));
        let b = hash_value(DistValue::Bytes(long.as_bytes()));
        assert_ne!(a, b, "families are tagged");
        let mut tagged = vec![b'T'];
        tagged.extend_from_slice(long.as_bytes());
        assert_eq!(a, fold(xxh3_64(&tagged)));
    }

    /// Frozen test vectors: these numbers are the on-disk contract between coordinator and
    /// shards. If this test fails, the hash definition changed.
    #[test]
    fn test_vectors() {
        let uuid = [
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ];
        let vectors: Vec<(DistValue, i32)> = vec![
            (DistValue::Integer(0), VECTOR_INT_0),
            (DistValue::Integer(1), VECTOR_INT_1),
            (DistValue::Integer(-1), VECTOR_INT_MINUS_1),
            (DistValue::Integer(123456789), VECTOR_INT_123456789),
            (DistValue::Numeric("3.14"), VECTOR_NUMERIC_3_14),
            (DistValue::Text(b""), VECTOR_TEXT_EMPTY),
            (DistValue::Text(b"hello"), VECTOR_TEXT_HELLO),
            (DistValue::Bytes(b"hello"), VECTOR_BYTES_HELLO),
            (DistValue::Uuid(&uuid), VECTOR_UUID),
            (DistValue::Date(0), VECTOR_DATE_2000_01_01),
            (DistValue::Timestamp(0), VECTOR_TIMESTAMP_2000_01_01),
        ];
        for (value, expected) in vectors {
            assert_eq!(hash_value(value), expected, "{value:?}");
        }
    }

    const VECTOR_INT_0: i32 = 1403818059;
    const VECTOR_INT_1: i32 = 669250676;
    const VECTOR_INT_MINUS_1: i32 = -1250303379;
    const VECTOR_INT_123456789: i32 = -409582603;
    const VECTOR_NUMERIC_3_14: i32 = 1895156961;
    const VECTOR_TEXT_EMPTY: i32 = 680088732;
    const VECTOR_TEXT_HELLO: i32 = 453092627;
    const VECTOR_BYTES_HELLO: i32 = 973435286;
    const VECTOR_UUID: i32 = 526515886;
    const VECTOR_DATE_2000_01_01: i32 = -2128052022;
    const VECTOR_TIMESTAMP_2000_01_01: i32 = 124667315;

    #[test]
    fn spread_over_shards_is_even() {
        // 100,000 sequential ids over 32 shards: every shard within 5% of the mean.
        let intervals = crate::interval::split_hash_space(32).unwrap();
        let mut counts = vec![0usize; 32];
        for id in 1..=100_000i64 {
            let h = hash_value(DistValue::Integer(id));
            counts[crate::interval::find_interval(&intervals, h).unwrap()] += 1;
        }
        let mean = 100_000.0 / 32.0;
        for (shard, count) in counts.iter().enumerate() {
            let deviation = (*count as f64 - mean).abs() / mean;
            assert!(deviation < 0.05, "shard {shard}: {count} rows, {deviation:.3} from the mean");
        }
    }
}
