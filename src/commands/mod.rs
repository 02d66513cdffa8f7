//! SQL-callable functions. Each one validates its input, checks privileges, and turns the
//! typed errors of the layers below into PostgreSQL errors at this boundary.

pub mod distribute;
pub mod grants;
pub mod leftovers;
pub mod node;
pub mod online_move;
pub mod shard_ops;
pub mod split;
pub mod steps;
pub mod utility;

use crate::error::{Result, ShardingError};
use pgrx::prelude::*;

/// Catalog-changing functions are for superusers only.
pub fn require_superuser(function: &str) -> Result<()> {
    // SAFETY: reads the current user's superuser flag; no side effects.
    if unsafe { pg_sys::superuser() } {
        Ok(())
    } else {
        Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied for function {function}"),
        )
        .hint("Only superusers may change the cluster's nodes."))
    }
}

/// A required argument of a non-strict function: NULL gets SQLSTATE 22004 naming the argument.
pub fn required<T>(value: Option<T>, argument: &str) -> Result<T> {
    value.ok_or_else(|| {
        ShardingError::new(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("{argument} must not be NULL"),
        )
    })
}
