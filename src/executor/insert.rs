//! INSERT into a distributed or reference table.
//!
//! PostgreSQL plans the INSERT as for a local table: its ModifyTable's subplan produces complete
//! rows, with defaults and sequences evaluated once, on the coordinator. Instead of running the
//! ModifyTable, this module pulls those rows, routes each to its shard by the hash of its
//! distribution column (every copy of a reference table, the coordinator's own included) over
//! the pipelined COPY writer inside the distributed transaction, and evaluates RETURNING on the
//! coordinator over the very row it sent: shards have no triggers, so the stored row is the same.

use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog::cache;
use crate::catalog::tables::DistributedTable;
use crate::commands::utility::list_pointers;
use crate::copy::encode::RowEncoder;
use crate::copy::router::RowRouter;
use crate::error::{OrRaise, Result, ShardingError};

/// The distributed table a plan inserts into, when this module runs it.
unsafe fn target(query_desc: *mut pg_sys::QueryDesc) -> Result<Option<Rc<DistributedTable>>> {
    if !cache::extension_active() {
        return Ok(None);
    }
    let planned = (*query_desc).plannedstmt;
    let Some(index) = crate::planner::insert_target(planned) else { return Ok(None) };
    if (*(*planned).planTree).type_ != pg_sys::NodeTag::T_ModifyTable {
        return Ok(None);
    }
    let entries = list_pointers::<pg_sys::RangeTblEntry>((*planned).rtable);
    let Some(entry) = entries.get(index - 1) else { return Ok(None) };
    cache::table_unless_reentrant((**entry).relid)
}

/// Called by the C ExecutorRun hook: does pg_sharding run this plan?
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn pg_sharding_executor_wants(query_desc: *mut pg_sys::QueryDesc) -> bool {
    target(query_desc).or_raise().is_some()
}

/// Called by the C ExecutorRun hook for the plans `pg_sharding_executor_wants` claimed.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn pg_sharding_executor_run(
    query_desc: *mut pg_sys::QueryDesc,
    _direction: pg_sys::ScanDirection::Type,
    _count: u64,
    _execute_once: bool,
) {
    let table = target(query_desc)
        .and_then(|t| t.ok_or_else(|| ShardingError::internal("distributed INSERT plan without a target")))
        .or_raise();
    run_insert(query_desc, &table).or_raise();
}

unsafe fn run_insert(query_desc: *mut pg_sys::QueryDesc, table: &DistributedTable) -> Result<()> {
    let estate = (*query_desc).estate;
    // Inserted through a view of another role's: the rows are written with its rights, as
    // PostgreSQL checks them (the coordinator has).
    let planned = (*query_desc).plannedstmt;
    let run_as = crate::planner::insert_target(planned)
        .and_then(|index| list_pointers::<pg_sys::RangeTblEntry>((*planned).rtable).get(index - 1).map(|e| (**e).checkAsUser.to_u32()))
        .unwrap_or(0);
    let plan = (*(*query_desc).plannedstmt).planTree.cast::<pg_sys::ModifyTable>();
    if (*plan).onConflictAction != pg_sys::OnConflictAction::ONCONFLICT_NONE {
        // The shard decides what a conflict does: rows go as INSERT ... ON CONFLICT statements.
        (*estate).es_processed = super::on_conflict::run(query_desc, table, run_as)?;
        return Ok(());
    }
    let modify = (*query_desc).planstate.cast::<pg_sys::ModifyTableState>();
    let subplan = (*modify).ps.lefttree;
    let result = (*modify).resultRelInfo;
    let relation = (*result).ri_RelationDesc;
    let natts = (*(*relation).rd_att).natts as usize;
    let returning = (*(*query_desc).plannedstmt).hasReturning;

    let mut router = RowRouter::new(table, RowEncoder::for_relation(relation), None)?;
    router.set_run_as(run_as);
    if returning && router.has_generated_columns() {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("INSERT ... RETURNING into \"{}\", which has generated columns, is not supported yet", table.name),
        ));
    }
    let dest = (*query_desc).dest;
    if returning {
        if let Some(startup) = (*dest).rStartup {
            pg_sys::ffi::pg_guard_ffi_boundary(|| startup(dest, pg_sys::CmdType::CMD_INSERT as i32, (*query_desc).tupDesc));
        }
    }
    let context = pg_sys::MakePerTupleExprContext(estate);
    let mut rows = super::InsertRows::new(subplan, (*query_desc).plannedstmt);
    while let Some((slot, values, nulls)) = rows.next(context, natts)? {
        super::check_new_row(result, slot, estate);
        router.route_tuple(values, nulls, (*context).ecxt_per_tuple_memory)?;
        if returning {
            let projection = (*result).ri_projectReturning;
            let expression_context = (*projection).pi_exprContext;
            // As ModifyTable does per row: without it RETURNING's memory grows with the rows.
            pg_sys::MemoryContextReset((*expression_context).ecxt_per_tuple_memory);
            // RETURNING tableoid names the table, as for a local insert.
            (*slot).tts_tableOid = table.relid;
            (*expression_context).ecxt_scantuple = slot;
            (*expression_context).ecxt_outertuple = slot;
            let output = pg_sys::ExecProject(projection);
            if let Some(receive) = (*dest).receiveSlot {
                pg_sys::ffi::pg_guard_ffi_boundary(|| receive(output, dest));
            }
        }
    }
    rows.end();
    (*estate).es_processed = router.finish(relation)?;
    if returning {
        if let Some(shutdown) = (*dest).rShutdown {
            pg_sys::ffi::pg_guard_ffi_boundary(|| shutdown(dest));
        }
    }
    Ok(())
}
