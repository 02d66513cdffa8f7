//! SQL-callable functions. Each one validates its input, checks privileges, and turns the
//! typed errors of the layers below into PostgreSQL errors at this boundary.

pub mod distribute;
pub mod foreign_keys;
pub mod grants;
pub mod leftovers;
pub mod node;
pub mod online_move;
pub mod shard_ops;
pub mod split;
pub mod steps;
pub mod types;
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

/// Runs cleanup `f` with interrupts held off: a cancel or timeout that arrives meanwhile (or
/// is still pending from the failure being cleaned up after) waits until it is done, instead
/// of cutting the cleanup short and leaving objects on the nodes. Remote waits still end on
/// their own timeouts.
pub fn uninterrupted<T>(f: impl FnOnce() -> T) -> T {
    struct Resume;
    impl Drop for Resume {
        fn drop(&mut self) {
            // SAFETY: undoes the increment below (RESUME_INTERRUPTS), also when unwinding.
            unsafe {
                let count = std::ptr::addr_of_mut!(pg_sys::InterruptHoldoffCount);
                if *count > 0 {
                    *count -= 1;
                }
            }
        }
    }
    // SAFETY: HOLD_INTERRUPTS of this backend.
    unsafe { *std::ptr::addr_of_mut!(pg_sys::InterruptHoldoffCount) += 1 };
    let _resume = Resume;
    f()
}

/// Takes `mode` (for example "EXCLUSIVE") on every table of `relids` without ever holding one
/// while waiting long for the next: a writer holding the second and waiting for the first
/// would otherwise deadlock with us, and the deadlock detector would cancel the writer. Each
/// attempt runs in a subtransaction with a 200 ms lock_timeout; one that times out is rolled
/// back (releasing what it took) and retried. Writers wait at most about that long per attempt.
pub fn lock_tables_together(relids: &[pg_sys::Oid], mode: &str) -> Result<()> {
    let previous = crate::catalog::read_one::<String>("SELECT pg_catalog.current_setting('lock_timeout')", &[])?
        .unwrap_or_else(|| "0".to_string());
    crate::catalog::read_one::<String>("SELECT pg_catalog.set_config('lock_timeout', '200ms', true)", &[])?;
    let mut outcome = Ok(false);
    for _ in 0..3000 {
        // SAFETY: a subtransaction begun and ended here, the memory context and resource
        // owner restored as PL/pgSQL's exception blocks do.
        outcome = unsafe { try_in_subtransaction(|| relids.iter().try_for_each(|relid| distribute::lock_table(*relid, mode))) };
        match outcome {
            Ok(false) => continue,
            _ => break,
        }
    }
    crate::catalog::read_one::<String>("SELECT pg_catalog.set_config('lock_timeout', $1, true)", &[previous.into()])?;
    match outcome? {
        true => Ok(()),
        false => Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
            "could not lock the tables of the shard group: writers kept them busy",
        )),
    }
}

/// Runs `f` in a subtransaction: Ok(true) when it succeeded (kept), Ok(false) when it hit a
/// lock timeout (rolled back), Err when it returned one (rolled back). Any other ERROR rolls
/// the subtransaction back too and is raised again, so callers that catch it are back in
/// their own (sub)transaction.
unsafe fn try_in_subtransaction(f: impl FnOnce() -> Result<()>) -> Result<bool> {
    let context = pg_sys::CurrentMemoryContext;
    let owner = pg_sys::CurrentResourceOwner;
    pg_sys::BeginInternalSubTransaction(std::ptr::null());
    pg_sys::MemoryContextSwitchTo(context);
    let outcome = pgrx::PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok(f())))
        .catch_others(Err)
        .execute();
    if matches!(outcome, Ok(Ok(()))) {
        pg_sys::ReleaseCurrentSubTransaction();
    } else {
        pg_sys::RollbackAndReleaseCurrentSubTransaction();
    }
    pg_sys::MemoryContextSwitchTo(context);
    pg_sys::CurrentResourceOwner = owner;
    match outcome {
        Ok(Ok(())) => Ok(true),
        Ok(Err(error)) => Err(error),
        Err(pgrx::pg_sys::panic::CaughtError::PostgresError(report))
            if report.sql_error_code() == PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE =>
        {
            Ok(false)
        }
        Err(caught) => caught.rethrow(),
    }
}
