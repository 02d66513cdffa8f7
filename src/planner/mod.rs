//! Planner hook. The distributed planner is not built yet; until it is, this hook makes sure no
//! query silently reads or writes the coordinator's empty shell of a distributed table: such a
//! query fails with a clear error (reference tables may be read: the coordinator's copy is
//! complete).

use std::ffi::c_char;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog::{cache, tables::Method};
use crate::error::{OrRaise, ShardingError};

static mut PREVIOUS_PLANNER: pg_sys::planner_hook_type = None;

pub fn install() {
    // SAFETY: called once from _PG_init while preloading; the previous hook is chained.
    unsafe {
        PREVIOUS_PLANNER = pg_sys::planner_hook;
        pg_sys::planner_hook = Some(planner);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn planner(
    parse: *mut pg_sys::Query,
    query_string: *const c_char,
    cursor_options: i32,
    bound_params: pg_sys::ParamListInfo,
) -> *mut pg_sys::PlannedStmt {
    let previous = *std::ptr::addr_of!(PREVIOUS_PLANNER);
    let planned = match previous {
        Some(hook) => hook(parse, query_string, cursor_options, bound_params),
        None => pg_sys::standard_planner(parse, query_string, cursor_options, bound_params),
    };
    if cache::extension_active() {
        check_plan(planned).or_raise();
    }
    planned
}

/// Tables the plan reads or writes: relation entries of its flattened range table (every
/// subquery, CTE and view included). Not `relationOids`, which also lists regclass constants.
unsafe fn scanned_relations(planned: *mut pg_sys::PlannedStmt) -> Vec<pg_sys::Oid> {
    crate::commands::utility::list_pointers::<pg_sys::RangeTblEntry>((*planned).rtable)
        .into_iter()
        .filter(|entry| (**entry).rtekind == pg_sys::RTEKind::RTE_RELATION)
        .map(|entry| (*entry).relid)
        .collect()
}

unsafe fn check_plan(planned: *mut pg_sys::PlannedStmt) -> crate::error::Result<()> {
    let writes = (*planned).commandType != pg_sys::CmdType::CMD_SELECT || (*planned).hasModifyingCTE;
    for relid in scanned_relations(planned) {
        if relid.to_u32() < pg_sys::FirstNormalObjectId {
            continue;
        }
        let Some(table) = cache::table_unless_reentrant(relid)? else { continue };
        if table.method == Method::Reference && !writes {
            continue;
        }
        let what = if table.method == Method::Reference { "writing to reference table" } else { "querying distributed table" };
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("{what} \"{}\" is not supported yet", table.name),
        )
        .detail("This release of pg_sharding creates distributed tables and loads them with COPY; SELECT, INSERT, UPDATE and DELETE on them arrive with the query engine.")
        .hint("Use COPY to load rows; sharding.shards lists where they are."));
    }
    Ok(())
}
