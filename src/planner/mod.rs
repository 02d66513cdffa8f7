//! Plan checks. The distributed planner is not built yet; until it is, no query may silently
//! read or write the coordinator's empty shell of a distributed table: such a query fails with
//! a clear error. Allowed: reading reference tables (the coordinator's copy is complete), and
//! INSERT into a distributed or reference table whose rows come from elsewhere (the executor
//! routes them, src/executor/insert.rs).
//!
//! The planner hook's entry point is in C (src/hooks_c/hooks.c); it calls this after planning.

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog::{cache, tables::Method};
use crate::commands::utility::list_pointers;
use crate::error::{OrRaise, ShardingError};

/// Called by the C planner hook with every plan PostgreSQL made.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn pg_sharding_check_plan(planned: *mut pg_sys::PlannedStmt) {
    if cache::extension_active() {
        check_plan(planned).or_raise();
    }
}

/// Tables the plan reads or writes, by range table index (1-based): relation entries of its
/// flattened range table (every subquery, CTE and view included). Not `relationOids`, which
/// also lists regclass constants.
unsafe fn scanned_relations(planned: *mut pg_sys::PlannedStmt) -> Vec<(usize, pg_sys::Oid)> {
    list_pointers::<pg_sys::RangeTblEntry>((*planned).rtable)
        .into_iter()
        .enumerate()
        .filter(|(_, entry)| (**entry).rtekind == pg_sys::RTEKind::RTE_RELATION)
        .map(|(i, entry)| (i + 1, (*entry).relid))
        .collect()
}

/// The range table index written by an INSERT plan (without data-modifying CTEs), if this plan
/// is one.
pub unsafe fn insert_target(planned: *mut pg_sys::PlannedStmt) -> Option<usize> {
    if (*planned).commandType != pg_sys::CmdType::CMD_INSERT || (*planned).hasModifyingCTE {
        return None;
    }
    let result_relations = (*planned).resultRelations;
    if result_relations.is_null() || (*result_relations).length != 1 {
        return None;
    }
    Some((*(*result_relations).elements).int_value as usize)
}

unsafe fn check_plan(planned: *mut pg_sys::PlannedStmt) -> crate::error::Result<()> {
    let insert_into = insert_target(planned);
    let written: Vec<usize> =
        crate::commands::utility::int_list((*planned).resultRelations).into_iter().map(|i| i as usize).collect();
    for (index, relid) in scanned_relations(planned) {
        if relid.to_u32() < pg_sys::FirstNormalObjectId {
            continue;
        }
        let Some(table) = cache::table_unless_reentrant(relid)? else { continue };
        if Some(index) == insert_into {
            continue;
        }
        // ON CONFLICT DO UPDATE's `excluded` is a second entry for the target table.
        let plan = (*planned).planTree;
        if insert_into.is_some()
            && (*plan).type_ == pg_sys::NodeTag::T_ModifyTable
            && (*plan.cast::<pg_sys::ModifyTable>()).exclRelRTI as usize == index
        {
            continue;
        }
        let is_written = written.contains(&index) || (*planned).hasModifyingCTE;
        if table.method == Method::Reference && !is_written {
            continue;
        }
        let what = if table.method == Method::Reference { "writing to reference table" } else { "querying distributed table" };
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("{what} \"{}\" is not supported yet", table.name),
        )
        .detail("This release of pg_sharding creates distributed tables and loads them with COPY and INSERT; SELECT, UPDATE and DELETE on them arrive with the query engine.")
        .hint("Use COPY or INSERT to load rows; sharding.shards lists where they are."));
    }
    Ok(())
}
