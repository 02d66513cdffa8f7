//! Execution of statements on distributed tables. The ExecutorRun hook's entry point is in C
//! (src/hooks_c/hooks.c) and hands over only the plans this module claims.

pub mod insert;
pub mod remote_scan;
pub mod tasks;
mod on_conflict;

use pgrx::pg_sys;

use crate::error::{Result, ShardingError};

/// The kinds of WITH CHECK options of the INSERT's target (row-level security policies, the
/// WITH CHECK OPTION of the views it was written through), as a bit set by `WCOKind`.
pub(crate) unsafe fn check_option_kinds(result: *mut pg_sys::ResultRelInfo) -> u32 {
    crate::commands::utility::list_pointers::<pg_sys::WithCheckOption>((*result).ri_WithCheckOptions)
        .into_iter()
        .fold(0, |kinds, option| kinds | (1 << (*option).kind))
}

/// Checks a new row as ExecInsert does before storing it: the row-level security INSERT
/// policies, then the views' WITH CHECK OPTION (an ERROR when it fails). The shards have
/// neither, so the coordinator checks each row before it is sent.
pub(crate) unsafe fn check_new_row(result: *mut pg_sys::ResultRelInfo, slot: *mut pg_sys::TupleTableSlot, estate: *mut pg_sys::EState) {
    if (*result).ri_WithCheckOptions.is_null() {
        return;
    }
    pg_sys::ExecWithCheckOptions(pg_sys::WCOKind::WCO_RLS_INSERT_CHECK, result, slot, estate);
    pg_sys::ExecWithCheckOptions(pg_sys::WCOKind::WCO_VIEW_CHECK, result, slot, estate);
}

/// The rows an INSERT inserts: its subplan's, read as they come, or first all gathered into a
/// tuplestore when the subplan reads shards itself (its tasks use the same worker connections
/// the inserted rows are streamed over, so they must be done first).
pub(crate) struct InsertRows {
    subplan: *mut pg_sys::PlanState,
    store: *mut pg_sys::Tuplestorestate,
    slot: *mut pg_sys::TupleTableSlot,
}

impl InsertRows {
    /// SAFETY: `subplan` is the initialized subplan of an INSERT plan `planned`.
    pub(crate) unsafe fn new(subplan: *mut pg_sys::PlanState, planned: *mut pg_sys::PlannedStmt) -> Self {
        let mut rows = Self { subplan, store: std::ptr::null_mut(), slot: std::ptr::null_mut() };
        if crate::planner::reads_shards(planned) {
            rows.store = pg_sys::tuplestore_begin_heap(false, false, *std::ptr::addr_of!(pg_sys::work_mem));
            loop {
                let slot = pg_sys::ExecProcNode(subplan);
                if slot.is_null() || (*slot).tts_flags & pg_sys::TTS_FLAG_EMPTY as u16 != 0 {
                    break;
                }
                pg_sys::tuplestore_puttupleslot(rows.store, slot);
                rows.slot = slot;
            }
            if !rows.slot.is_null() {
                rows.slot = pg_sys::MakeSingleTupleTableSlot((*rows.slot).tts_tupleDescriptor, &pg_sys::TTSOpsMinimalTuple);
            }
        }
        rows
    }

    /// Frees the gathered rows (a tuplestore past work_mem holds a temporary file, which must
    /// be closed before the transaction commits).
    ///
    /// SAFETY: called once, after the last `next`.
    pub(crate) unsafe fn end(self) {
        if !self.store.is_null() {
            if !self.slot.is_null() {
                pg_sys::ExecDropSingleTupleTableSlot(self.slot);
            }
            pg_sys::tuplestore_end(self.store);
        }
    }

    /// The next complete new row, with the per-row memory of `context` reset first; `None`
    /// when done. The slices live until the next call.
    ///
    /// SAFETY: the target relation has `natts` attributes.
    pub(crate) unsafe fn next<'a>(
        &mut self,
        context: *mut pg_sys::ExprContext,
        natts: usize,
    ) -> Result<Option<(*mut pg_sys::TupleTableSlot, &'a [pg_sys::Datum], &'a [bool])>> {
        pg_sys::MemoryContextReset((*context).ecxt_per_tuple_memory);
        let slot = if self.store.is_null() {
            pg_sys::ExecProcNode(self.subplan)
        } else if !self.slot.is_null() && pg_sys::tuplestore_gettupleslot(self.store, true, false, self.slot) {
            self.slot
        } else {
            std::ptr::null_mut()
        };
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
}
