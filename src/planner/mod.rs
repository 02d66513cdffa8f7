//! The distributed planner. The planner hook's entry point is in C (src/hooks_c/hooks.c): it
//! asks `pg_sharding_plan` first, which returns a plan sent whole to the shards (router.rs)
//! or NULL; then PostgreSQL plans the statement, with every scan of a distributed table
//! replaced by a ShardScan (scan_path.rs); finally `pg_sharding_check_plan` makes sure no plan
//! reads the coordinator's empty shell of a distributed table or writes a table in a way the
//! extension does not route.

pub mod aggregates;
pub mod broadcast;
pub mod chosen_rows;
pub mod hoist;
pub mod intermediate;
pub mod local_write;
pub mod merge;
pub mod modifying_ctes;
pub mod outer_conditions;
pub mod reference_rows;
pub mod returning;
pub mod pins;
pub mod router;
pub mod scan_path;
pub mod shippable;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog::{cache, tables::Method};
use crate::commands::utility::list_pointers;
use crate::error::{OrRaise, ShardingError};
use crate::executor::remote_scan::is_shard_scan;

/// Called by the C planner hook before PostgreSQL's planner: a distributed plan, or NULL.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn pg_sharding_plan(
    parse: *mut pg_sys::Query,
    query_string: *const std::ffi::c_char,
    cursor_options: i32,
    bound_params: pg_sys::ParamListInfo,
) -> *mut pg_sys::PlannedStmt {
    if !cache::extension_active() {
        return std::ptr::null_mut();
    }
    check_referenced_by_local(parse).or_raise();
    router::plan_statement(parse, query_string, cursor_options, bound_params).or_raise().unwrap_or(std::ptr::null_mut())
}

/// Refuses UPDATE, DELETE, MERGE and INSERT ... ON CONFLICT DO UPDATE of a distributed table
/// that a local table references (a key made before the table was distributed, allowed while
/// the local table was empty): a shard changing a row cannot see the local rows that reference
/// it. The local table's own rows are checked (its key's check reads the shards).
unsafe fn check_referenced_by_local(parse: *mut pg_sys::Query) -> crate::error::Result<()> {
    let with_queries = || {
        list_pointers::<pg_sys::CommonTableExpr>((*parse).cteList)
            .into_iter()
            .map(|cte| (*cte).ctequery)
            .filter(|query| !query.is_null() && (*(*query)).type_ == pg_sys::NodeTag::T_Query)
            .map(|query| query.cast::<pg_sys::Query>())
    };
    let queries = std::iter::once(parse).chain((!(*parse).cteList.is_null()).then(with_queries).into_iter().flatten());
    for query in queries {
        use pg_sys::CmdType::*;
        let changes_rows = match (*query).commandType {
            CMD_UPDATE | CMD_DELETE | CMD_MERGE => true,
            CMD_INSERT => {
                let on_conflict = (*query).onConflict;
                !on_conflict.is_null() && (*on_conflict).action == pg_sys::OnConflictAction::ONCONFLICT_UPDATE
            }
            _ => false,
        };
        if !changes_rows {
            continue;
        }
        let Some(index) = usize::try_from((*query).resultRelation).ok().and_then(|i| i.checked_sub(1)) else { continue };
        let Some(&rte) = list_pointers::<pg_sys::RangeTblEntry>((*query).rtable).get(index) else { continue };
        if (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION {
            continue;
        }
        let relid = (*rte).relid;
        let Some(table) = cache::table_unless_reentrant(relid)? else { continue };
        if table.method != Method::Hash {
            continue;
        }
        for other in constraint_partners(relid) {
            if cache::table_unless_reentrant(other)?.is_some() {
                continue;
            }
            let name = pg_sys::get_rel_name(other);
            let local = if name.is_null() { other.to_u32().to_string() } else { std::ffi::CStr::from_ptr(name).to_string_lossy().into_owned() };
            return Err(ShardingError::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("cannot change rows of distributed table \"{}\": the local table \"{local}\" references it", table.name),
            )
            .detail("A shard changing or deleting a row does not see the local rows that reference it.")
            .hint(format!("Distribute \"{local}\" too (create_distributed_table with colocate_with => '{}'), or drop its foreign key.", table.name)));
        }
    }
    Ok(())
}

/// The tables linked to `relid` by the foreign-key triggers on its coordinator table (the
/// tables referencing it, and those it references).
unsafe fn constraint_partners(relid: pg_sys::Oid) -> Vec<pg_sys::Oid> {
    // The relation is locked: parse analysis opened it as the statement's target.
    let relation = pg_sys::RelationIdGetRelation(relid);
    if relation.is_null() {
        return Vec::new();
    }
    let mut partners = Vec::new();
    let triggers = (*relation).trigdesc;
    if !triggers.is_null() {
        for i in 0..usize::try_from((*triggers).numtriggers).unwrap_or(0) {
            let trigger = &*(*triggers).triggers.add(i);
            let other = trigger.tgconstrrelid;
            if trigger.tgisinternal && trigger.tgconstraint != pg_sys::InvalidOid && other != pg_sys::InvalidOid && other != relid
                && !partners.contains(&other)
            {
                partners.push(other);
            }
        }
    }
    pg_sys::RelationClose(relation);
    partners
}

/// Called by the C planner hook with every plan PostgreSQL made.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn pg_sharding_check_plan(planned: *mut pg_sys::PlannedStmt) {
    if cache::extension_active() {
        check_plan(planned).or_raise();
    }
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

/// Every node of a plan tree (subplans of the statement included), depth first.
unsafe fn plan_nodes(planned: *mut pg_sys::PlannedStmt) -> Vec<*mut pg_sys::Plan> {
    let mut out = Vec::new();
    let mut pending: Vec<*mut pg_sys::Plan> = vec![(*planned).planTree];
    pending.extend(list_pointers::<pg_sys::Plan>((*planned).subplans));
    while let Some(plan) = pending.pop() {
        if plan.is_null() {
            continue;
        }
        out.push(plan);
        pending.push((*plan).lefttree);
        pending.push((*plan).righttree);
        use pg_sys::NodeTag::*;
        match (*plan).type_ {
            T_Append => pending.extend(list_pointers::<pg_sys::Plan>((*plan.cast::<pg_sys::Append>()).appendplans)),
            T_MergeAppend => pending.extend(list_pointers::<pg_sys::Plan>((*plan.cast::<pg_sys::MergeAppend>()).mergeplans)),
            T_BitmapAnd => pending.extend(list_pointers::<pg_sys::Plan>((*plan.cast::<pg_sys::BitmapAnd>()).bitmapplans)),
            T_BitmapOr => pending.extend(list_pointers::<pg_sys::Plan>((*plan.cast::<pg_sys::BitmapOr>()).bitmapplans)),
            T_SubqueryScan => pending.push((*plan.cast::<pg_sys::SubqueryScan>()).subplan),
            T_CustomScan => pending.extend(list_pointers::<pg_sys::Plan>((*plan.cast::<pg_sys::CustomScan>()).custom_plans)),
            _ => {}
        }
    }
    out
}

/// Whether a plan runs tasks on the workers (has a ShardScan anywhere).
pub unsafe fn reads_shards(planned: *mut pg_sys::PlannedStmt) -> bool {
    plan_nodes(planned).iter().any(|&p| is_shard_scan(p))
}

fn unsupported(message: String) -> ShardingError {
    ShardingError::new(PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, message)
}

pub(crate) unsafe fn check_plan(planned: *mut pg_sys::PlannedStmt) -> crate::error::Result<()> {
    let rtable = list_pointers::<pg_sys::RangeTblEntry>((*planned).rtable);
    let relation_at = |index: u32| -> Option<pg_sys::Oid> {
        let rte = *rtable.get((index as usize).checked_sub(1)?)?;
        ((*rte).rtekind == pg_sys::RTEKind::RTE_RELATION).then(|| (*rte).relid)
    };
    let nodes = plan_nodes(planned);
    for &plan in &nodes {
        use pg_sys::NodeTag::*;
        match (*plan).type_ {
            T_SeqScan | T_SampleScan | T_IndexScan | T_IndexOnlyScan | T_BitmapHeapScan | T_TidScan | T_TidRangeScan
            | T_ForeignScan | T_CustomScan => {
                if is_shard_scan(plan) {
                    continue;
                }
                let Some(relid) = relation_at((*plan.cast::<pg_sys::Scan>()).scanrelid) else { continue };
                if relid.to_u32() < pg_sys::FirstNormalObjectId {
                    continue;
                }
                if let Some(table) = cache::table_unless_reentrant(relid)? {
                    if table.method == Method::Hash {
                        return Err(unsupported(format!(
                            "this query would read the coordinator's empty copy of distributed table \"{}\"",
                            table.name
                        )));
                    }
                }
            }
            T_ModifyTable => {
                let modify = plan.cast::<pg_sys::ModifyTable>();
                for index in crate::commands::utility::int_list((*modify).resultRelations) {
                    let Some(relid) = relation_at(index as u32) else { continue };
                    let Some(table) = cache::table_unless_reentrant(relid)? else { continue };
                    let is_insert = (*modify).operation == pg_sys::CmdType::CMD_INSERT;
                    let top_level_insert = is_insert && insert_target(planned) == Some(index as usize) && (*planned).planTree == plan;
                    if !top_level_insert {
                        let what = if is_insert { "INSERT in a data-modifying WITH query" } else { "this UPDATE or DELETE" };
                        return Err(unsupported(format!("{what} on {} table \"{}\" is not supported yet", table.method.as_str(), table.name)));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether `query` or any query inside it (subqueries, sublinks, WITH queries) locks rows
/// (FOR UPDATE/SHARE): then its tasks run in the distributed transaction, which keeps the locks.
pub unsafe fn locks_rows_anywhere(query: *mut pg_sys::Query) -> bool {
    #[pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        if (*node).type_ == pg_sys::NodeTag::T_Query {
            let query = node.cast::<pg_sys::Query>();
            return !(*query).rowMarks.is_null() || pg_sys::query_tree_walker(query, Some(walker), context, 0);
        }
        pg_sys::expression_tree_walker(node, Some(walker), context)
    }
    walker(query.cast(), std::ptr::null_mut())
}
