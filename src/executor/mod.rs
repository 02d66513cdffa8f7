//! Execution of statements on distributed tables. The ExecutorRun hook's entry point is in C
//! (src/hooks_c/hooks.c) and hands over only the plans this module claims.

pub mod insert;
pub mod remote_scan;
pub mod tasks;
mod on_conflict;

use pgrx::pg_sys;

use crate::error::{Result, ShardingError};

/// A complete new row of an INSERT plan: the next tuple of the ModifyTable's subplan, with the
/// per-row memory of `context` reset first. `None` when the subplan is done.
///
/// SAFETY: `subplan` must be the initialized subplan of an INSERT into a relation of `natts`
/// attributes; the slices live until the next call.
pub(crate) unsafe fn next_insert_row<'a>(
    subplan: *mut pg_sys::PlanState,
    context: *mut pg_sys::ExprContext,
    natts: usize,
) -> Result<Option<(*mut pg_sys::TupleTableSlot, &'a [pg_sys::Datum], &'a [bool])>> {
    pg_sys::MemoryContextReset((*context).ecxt_per_tuple_memory);
    let slot = pg_sys::ExecProcNode(subplan);
    if slot.is_null() || (*slot).tts_flags & pg_sys::TTS_FLAG_EMPTY as u16 != 0 {
        return Ok(None);
    }
    pg_sys::slot_getallattrs(slot);
    if (*(*slot).tts_tupleDescriptor).natts as usize != natts {
        return Err(ShardingError::internal("the INSERT plan does not produce whole rows of the table"));
    }
    Ok(Some((
        slot,
        std::slice::from_raw_parts((*slot).tts_values, natts),
        std::slice::from_raw_parts((*slot).tts_isnull, natts),
    )))
}
