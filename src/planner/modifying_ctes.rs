//! Data-modifying WITH queries of a statement that does not run whole on one shard group:
//! `WITH gone AS (DELETE FROM orders WHERE amount > 240 RETURNING *) INSERT INTO archive
//! SELECT * FROM gone`, `WITH d AS (UPDATE users SET ... RETURNING id) SELECT count(*) FROM d`.
//!
//! Each such WITH query becomes a statement of its own, planned like any other (over every
//! shard, with the two-step plan, on a reference table...), which runs when the statement
//! starts, in the same distributed transaction and with the same snapshot; in the statement
//! the WITH query becomes `SELECT * FROM sharding.task_results('<that statement>')`, a
//! ShardScan holding its RETURNING rows (executor/remote_scan.rs). PostgreSQL runs every
//! data-modifying WITH query once and to the end, whether or not its rows are read; so does
//! this.
//!
//! Under PostgreSQL no part of the statement sees the changes of another: they all read one
//! snapshot. Here the WITH query's changes happen first, so this applies only when no other
//! part of the statement reads (or changes) a table the WITH query changes, except for the
//! statement's own INSERT target, which it only adds rows to. A WITH query that reads another
//! WITH query stays as it is, with the errors it had.

use std::ffi::{CStr, CString};

use pgrx::{pg_sys, PgSqlErrorCode};

use crate::catalog::cache;
use crate::catalog::tables::{DistributedTable, Method};
use crate::commands::utility::list_pointers;
use crate::deparse::query::TransmissionSettings;
use crate::error::{Result, ShardingError};
use crate::executor::remote_scan::ShardScanPlan;

/// Rewrites the data-modifying WITH queries of `parse` in place as described above; false,
/// leaving it untouched, when the statement does not qualify.
pub unsafe fn separate(parse: *mut pg_sys::Query) -> Result<bool> {
    let ctes = list_pointers::<pg_sys::CommonTableExpr>((*parse).cteList);
    let modifying: Vec<_> = ctes
        .iter()
        .copied()
        .filter(|&cte| {
            let query = (*cte).ctequery.cast::<pg_sys::Query>();
            !query.is_null() && (*query).type_ == pg_sys::NodeTag::T_Query && (*query).commandType != pg_sys::CmdType::CMD_SELECT
        })
        .collect();
    if modifying.is_empty() {
        return Ok(false);
    }
    for &cte in &modifying {
        let query = (*cte).ctequery.cast::<pg_sys::Query>();
        if (*query).resultRelation <= 0 {
            return Ok(false);
        }
        let target = list_pointers::<pg_sys::RangeTblEntry>((*query).rtable)[(*query).resultRelation as usize - 1];
        let written = (*target).relid;
        // Refused with the reason when the table is distributed; a local table's WITH query
        // stays in PostgreSQL's plan.
        let Some(table) = cache::table_unless_reentrant(written)? else {
            if (*cte).cterefcount == 0 || reads_outer_ctes(query) || reads_elsewhere(parse, cte, written) {
                return Ok(false);
            }
            continue;
        };
        let name = CStr::from_ptr((*cte).ctename).to_string_lossy();
        let refuse = |what: String| {
            ShardingError::new(PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, format!("{what} is supported only when the statement targets one shard group"))
        };
        if reads_outer_ctes(query) {
            return Err(refuse(format!("a data-modifying WITH query (\"{name}\") on {} table \"{}\" reading another WITH query", kind(&table), table.name))
                .hint("Run it as a statement of its own."));
        }
        if reads_elsewhere(parse, cte, written) {
            return Err(refuse(format!(
                "a statement reading {} table \"{}\" besides changing it in a data-modifying WITH query (\"{name}\")",
                kind(&table),
                table.name
            ))
            .detail("The WITH query runs first here, and the rest of the statement must not see its changes.")
            .hint("Run the WITH query as a statement of its own."));
        }
    }

    for cte in modifying {
        let statement: *mut pg_sys::Query = pg_sys::copyObjectImpl((*cte).ctequery.cast()).cast();
        // Its own statement now: its count is its own (a reference table's write compares it
        // with the workers').
        (*statement).canSetTag = true;
        let sql = {
            let _settings = TransmissionSettings::enter();
            let copy: *mut pg_sys::Query = pg_sys::copyObjectImpl(statement.cast()).cast();
            CStr::from_ptr(pg_sys::pg_get_querydef(copy, false)).to_string_lossy().into_owned()
        };
        let plan = ShardScanPlan {
            statement: Some(super::aggregates::store_query(statement)?),
            statement_sql: sql,
            writes: true,
            ..Default::default()
        };
        let entries: Vec<_> =
            list_pointers::<pg_sys::TargetEntry>((*statement).returningList).into_iter().filter(|&e| !(*e).resjunk).collect();
        let columns: Vec<(String, *mut pg_sys::Node)> = entries
            .iter()
            .enumerate()
            .map(|(i, &e)| (format!("c{}", i + 1), (*e).expr.cast::<pg_sys::Node>()))
            .collect();
        let rte = super::aggregates::results_rte(&plan, &columns)?;
        let mut target: *mut pg_sys::List = std::ptr::null_mut();
        for (i, &entry) in entries.iter().enumerate() {
            let expr = (*entry).expr.cast::<pg_sys::Node>();
            let var = pg_sys::makeVar(1, (i + 1) as i16, pg_sys::exprType(expr), pg_sys::exprTypmod(expr), pg_sys::exprCollation(expr), 0);
            let name = if (*entry).resname.is_null() {
                let name = CString::new(format!("c{}", i + 1)).map_err(|e| ShardingError::internal(e.to_string()))?;
                pg_sys::pstrdup(name.as_ptr())
            } else {
                pg_sys::pstrdup((*entry).resname)
            };
            target = pg_sys::lappend(target, pg_sys::makeTargetEntry(var.cast(), (i + 1) as i16, name, false).cast());
        }
        let select = super::broadcast::select_from(rte, std::ptr::null_mut(), target);
        (*select).canSetTag = false;
        (*cte).ctequery = select.cast();
        // Read from one materialized copy, never inlined into the statement (whose parts
        // could then run it again).
        (*cte).ctematerialized = pg_sys::CTEMaterialize::CTEMaterializeAlways;
        // PostgreSQL plans a SELECT in WITH only when something reads it; this one must run
        // even when nothing does. Counted as read, it is planned as a subplan, which the
        // executor initializes (and so the ShardScan runs the statement) when the statement
        // starts.
        if (*cte).cterefcount == 0 {
            (*cte).cterefcount = 1;
        }
    }
    (*parse).hasModifyingCTE = false;
    Ok(true)
}

fn kind(table: &DistributedTable) -> &'static str {
    if table.method == Method::Reference {
        "reference"
    } else {
        "distributed"
    }
}

/// Whether a part of `parse` other than WITH query `cte` (its other WITH queries, its body)
/// reads or changes table `relid`, except as the target of `parse` when it is an INSERT.
unsafe fn reads_elsewhere(parse: *mut pg_sys::Query, cte: *mut pg_sys::CommonTableExpr, relid: pg_sys::Oid) -> bool {
    for other in list_pointers::<pg_sys::CommonTableExpr>((*parse).cteList) {
        if other != cte && reads_relation((*other).ctequery, relid, None) {
            return true;
        }
    }
    let insert_target = ((*parse).commandType == pg_sys::CmdType::CMD_INSERT).then_some((*parse).resultRelation);
    let body: *mut pg_sys::Query = pg_sys::copyObjectImpl(parse.cast()).cast();
    (*body).cteList = std::ptr::null_mut();
    reads_relation(body.cast(), relid, insert_target)
}

/// Whether `query` refers to a WITH query of an enclosing level (a sibling WITH query).
unsafe fn reads_outer_ctes(query: *mut pg_sys::Query) -> bool {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        let depth = &mut *(context as *mut u32);
        match (*node).type_ {
            pg_sys::NodeTag::T_Query => {
                let query = node.cast::<pg_sys::Query>();
                if list_pointers::<pg_sys::RangeTblEntry>((*query).rtable)
                    .iter()
                    .any(|&rte| (*rte).rtekind == pg_sys::RTEKind::RTE_CTE && (*rte).ctelevelsup > *depth)
                {
                    return true;
                }
                *depth += 1;
                let found = pg_sys::query_tree_walker(query, Some(walker), context, 0);
                *depth -= 1;
                found
            }
            _ => pg_sys::expression_tree_walker(node, Some(walker), context),
        }
    }
    let mut depth = 0u32;
    walker(query.cast(), (&mut depth as *mut u32).cast())
}

/// Whether `node` (a Query) reads or changes table `relid` anywhere, except as range table
/// entry `except` of its top level (an INSERT's target).
unsafe fn reads_relation(node: *mut pg_sys::Node, relid: pg_sys::Oid, except: Option<i32>) -> bool {
    struct Context {
        relid: pg_sys::Oid,
        except: Option<i32>,
        top: *mut pg_sys::Query,
    }
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        let cx = &*(context as *const Context);
        if (*node).type_ == pg_sys::NodeTag::T_Query {
            let query = node.cast::<pg_sys::Query>();
            for (i, rte) in list_pointers::<pg_sys::RangeTblEntry>((*query).rtable).into_iter().enumerate() {
                if (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION
                    && (*rte).relid == cx.relid
                    && !(query == cx.top && cx.except == Some(i as i32 + 1))
                {
                    return true;
                }
            }
            return pg_sys::query_tree_walker(query, Some(walker), context, 0);
        }
        pg_sys::expression_tree_walker(node, Some(walker), context)
    }
    let context = Context { relid, except, top: node.cast() };
    walker(node, (&context as *const Context).cast_mut().cast())
}
