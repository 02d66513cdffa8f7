//! Which shard a value belongs to: PostgreSQL Datums reduced to `sharding_core::hash::DistValue`.
//! The hash definition itself lives in crates/core (hash.rs) and is documented there.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;
use sharding_core::hash::{hash_value, DistValue};

use crate::error::ShardingError;

/// The families of distribution column types (see crates/core/src/hash.rs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DistKind {
    Int2,
    Int4,
    Int8,
    Numeric,
    Text,
    PaddedText,
    Bytes,
    Uuid,
    Date,
    Timestamp,
}

pub const SUPPORTED_TYPES: &str =
    "smallint, integer, bigint, numeric, text, varchar, char, uuid, date, timestamp, timestamptz, bytea";

impl DistKind {
    pub fn of_type(type_oid: pg_sys::Oid) -> Option<DistKind> {
        Some(match type_oid {
            pg_sys::INT2OID => DistKind::Int2,
            pg_sys::INT4OID => DistKind::Int4,
            pg_sys::INT8OID => DistKind::Int8,
            pg_sys::NUMERICOID => DistKind::Numeric,
            pg_sys::TEXTOID | pg_sys::VARCHAROID => DistKind::Text,
            pg_sys::BPCHAROID => DistKind::PaddedText,
            pg_sys::BYTEAOID => DistKind::Bytes,
            pg_sys::UUIDOID => DistKind::Uuid,
            pg_sys::DATEOID => DistKind::Date,
            pg_sys::TIMESTAMPOID | pg_sys::TIMESTAMPTZOID => DistKind::Timestamp,
            _ => return None,
        })
    }

    /// How to hash a value of kind `value` compared with a distribution column of kind
    /// `column` (a kind of the same family): as the value's own kind, except text or varchar
    /// compared with a char(n) column. That comparison is char's, which ignores trailing
    /// spaces (`k = 'a '::varchar` is true for k = 'a'): the value hashes as char does.
    pub fn hashing(column: Option<DistKind>, value: DistKind) -> DistKind {
        match (column, value) {
            (Some(DistKind::PaddedText), DistKind::Text) => DistKind::PaddedText,
            _ => value,
        }
    }

    /// Kinds whose equal values hash equally (integers and numerics; text, varchar and char).
    pub fn family(self) -> u8 {
        match self {
            DistKind::Int2 | DistKind::Int4 | DistKind::Int8 | DistKind::Numeric => 1,
            DistKind::Text | DistKind::PaddedText => 2,
            DistKind::Bytes => 3,
            DistKind::Uuid => 4,
            DistKind::Date => 5,
            DistKind::Timestamp => 6,
        }
    }
}

/// The error for a distribution column of a type we cannot hash.
pub fn unsupported_type(column: &str, type_name: &str) -> ShardingError {
    ShardingError::new(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("column \"{column}\" has type {type_name}, which cannot be a distribution column"),
    )
    .hint(format!("Supported distribution column types: {SUPPORTED_TYPES}."))
}

/// Bytes of a (possibly toasted or short-header) varlena datum.
///
/// SAFETY: `datum` must be a non-NULL varlena of the current memory context's lifetime.
unsafe fn varlena_bytes<'a>(datum: pg_sys::Datum) -> &'a [u8] {
    let detoasted = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
    let length = pgrx::varlena::varsize_any_exhdr(detoasted);
    let data = pgrx::varlena::vardata_any(detoasted) as *const u8;
    std::slice::from_raw_parts(data, length)
}

/// The shard hash of a non-NULL datum of `kind`.
///
/// SAFETY: `datum` must be a valid, non-NULL value of a type of `kind`.
pub unsafe fn hash_datum(datum: pg_sys::Datum, kind: DistKind) -> i32 {
    match kind {
        DistKind::Int2 => hash_value(DistValue::Integer(datum.value() as i16 as i64)),
        DistKind::Int4 => hash_value(DistValue::Integer(datum.value() as i32 as i64)),
        DistKind::Int8 => hash_value(DistValue::Integer(datum.value() as i64)),
        DistKind::Numeric => {
            let text = pg_sys::OidOutputFunctionCall(pg_sys::Oid::from(pg_sys::F_NUMERIC_OUT), datum);
            let hash = hash_value(DistValue::Numeric(&CStr::from_ptr(text).to_string_lossy()));
            pg_sys::pfree(text.cast());
            hash
        }
        DistKind::Text => hash_value(DistValue::Text(varlena_bytes(datum))),
        DistKind::PaddedText => hash_value(DistValue::PaddedText(varlena_bytes(datum))),
        DistKind::Bytes => hash_value(DistValue::Bytes(varlena_bytes(datum))),
        DistKind::Uuid => {
            let bytes = &*(datum.cast_mut_ptr::<[u8; 16]>());
            hash_value(DistValue::Uuid(bytes))
        }
        DistKind::Date => hash_value(DistValue::Date(datum.value() as i32)),
        DistKind::Timestamp => hash_value(DistValue::Timestamp(datum.value() as i64)),
    }
}

/// The shard of a row whose distribution column holds `value` (`None` for NULL, which no
/// shard accepts: SQLSTATE 23502 naming the column).
///
/// SAFETY: `value` must be a valid datum of a type of `kind`.
pub unsafe fn shard_for_value(
    table: &crate::catalog::tables::DistributedTable,
    value: Option<pg_sys::Datum>,
    kind: DistKind,
) -> crate::error::Result<i64> {
    let Some(value) = value else {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
            format!(
                "null value in distribution column \"{}\" of relation \"{}\"",
                table.distribution_column.clone().unwrap_or_default(),
                table.name
            ),
        ));
    };
    let hash = hash_datum(value, kind);
    table
        .shard_for_hash(hash)
        .map(|shard| shard.shard_id)
        .ok_or_else(|| ShardingError::internal(format!("no shard of {} owns hash value {hash}", table.name)))
}

/// `sharding.hash_value(anyelement)`: the shard hash of a value (NULL for NULL).
#[pg_extern(name = "hash_value", immutable, parallel_safe)]
fn hash_value_of(value: pgrx::AnyElement) -> i32 {
    let kind = DistKind::of_type(value.oid()).unwrap_or_else(|| {
        // SAFETY: format_type_be only reads the type cache.
        let name = unsafe { CStr::from_ptr(pg_sys::format_type_be(value.oid())) }.to_string_lossy().into_owned();
        ShardingError::new(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("values of type {name} cannot be hashed for distribution"),
        )
        .hint(format!("Supported types: {SUPPORTED_TYPES}."))
        .raise()
    });
    // SAFETY: AnyElement carries a valid non-NULL datum of type value.oid().
    unsafe { hash_datum(value.datum(), kind) }
}
