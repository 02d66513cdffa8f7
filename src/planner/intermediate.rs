//! Intermediate results: a statement whose subqueries read distributed tables it cannot run
//! with on the shards (not co-located, not joined on distribution columns) can still run there
//! when those subqueries are evaluated first.
//!
//! An uncorrelated subquery in an expression (`x IN (SELECT ...)`, `EXISTS (...)`, a scalar or
//! `ARRAY(...)` subquery) reads nothing of the statement around it, so its rows are the same
//! for every row of the statement. The coordinator runs it first, with PostgreSQL's executor
//! and the distributed planner (executor/remote_scan.rs, `intermediate_result`), and sends its
//! rows to every task as array parameters, one per output column, exactly as a broadcast table
//! (broadcast.rs). In the statement it becomes `(SELECT r.c1, ... FROM unnest(($7)::integer[],
//! ...) r(c1, ...))`: same output columns, in the same order, so the comparison around it
//! (`x IN`, `= ANY`, row comparisons) is untouched. A subquery in FROM (not LATERAL) becomes a
//! function scan with its alias and column names, as a broadcast table does.
//!
//! Only the subqueries that stop the statement from running per shard group are replaced: all
//! are at first, then each is put back when the statement still runs per shard group with it.
//! UPDATE and DELETE take any such subquery (the alternative is an error); a SELECT, which the
//! general plan answers anyway, only when the subquery's tables are small enough to be worth
//! it, by the broadcast rule.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;

use crate::catalog::{cache, tables::Method};
use crate::commands::utility::list_pointers;
use crate::deparse::query::{for_each_rte, TransmissionSettings};
use crate::error::{Result, ShardingError};
use crate::executor::remote_scan::Broadcast;
use crate::planner::broadcast::{function_rte, select_from, sendable_type, table_bytes, top_distributed, unnest_parameter, SMALL_TABLE_BYTES};
use crate::planner::scan_path::collect_params;

/// An UPDATE or DELETE (a copy) with the subqueries it cannot run per shard group with replaced
/// by intermediate results, and those results; `None` when replacing them does not help.
pub unsafe fn for_modify(parse: *mut pg_sys::Query) -> Result<Option<(*mut pg_sys::Query, Vec<Broadcast>)>> {
    rewrite(parse, &mut |_| Ok(true), &mut |query| Ok(super::router::modify_runs_per_group(query)? || super::broadcast::for_modify(query)?.is_some()))
}

/// Plan 3's coordinator query for a SELECT with its uncorrelated subqueries on tables it is not
/// co-located with evaluated first; `None` when that does not make it plan 3's shape, or when
/// a subquery reads too much to be worth it.
pub unsafe fn plan(parse: *mut pg_sys::Query) -> Result<Option<*mut pg_sys::Query>> {
    let limit = crate::guc::BROADCAST_JOIN_LIMIT.get();
    let subqueries_in_from = list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable)
        .iter()
        .any(|&rte| (*rte).rtekind == pg_sys::RTEKind::RTE_SUBQUERY);
    // Replacing subqueries leaves the statement's clauses as they are: when plan 3 cannot take
    // them, there is nothing to try (and no table sizes to ask the workers for).
    if limit <= 0 || !super::aggregates::eligible_clauses(parse) || !((*parse).hasSubLinks || subqueries_in_from) {
        return Ok(None);
    }
    let limit = limit as u64 * 1024;
    // As for a broadcast table: the subquery's tables, sent to every task, against the largest
    // table the statement reads on the shards (sizes asked for only once there is a candidate).
    let mut rest: Option<Option<(u64, u64)>> = None;
    let mut worth_it = |subquery: *mut pg_sys::Query| -> Result<bool> {
        if rest.is_none() {
            let mut sizes = Some((0u64, 1u64));
            for (_, table) in top_distributed(parse)? {
                sizes = match (sizes, table_bytes(&table)) {
                    (Some((bytes, tasks)), Some(size)) => Some((bytes.max(size), tasks.max(table.shards.len() as u64))),
                    _ => None,
                };
            }
            rest = Some(sizes);
        }
        let Some(Some((rest_bytes, tasks))) = rest else {
            return Ok(false);
        };
        let mut bytes = 0u64;
        for table in distributed_tables(subquery)? {
            let Some(size) = table_bytes(&table) else {
                return Ok(false);
            };
            bytes = bytes.saturating_add(size);
        }
        Ok(bytes <= limit && (bytes <= SMALL_TABLE_BYTES || bytes.saturating_mul(tasks) <= rest_bytes))
    };
    let mut runs_on_shards = |query: *mut pg_sys::Query| -> Result<bool> {
        Ok(super::router::split_select_with(query, Vec::new())?.is_some() || super::broadcast::plan(query, &[])?.is_some())
    };
    let Some((rewritten, results)) = rewrite(parse, &mut worth_it, &mut runs_on_shards)? else {
        return Ok(None);
    };
    if let Some(coordinator) = super::router::split_select_with(rewritten, results.clone())? {
        return Ok(Some(coordinator));
    }
    super::broadcast::plan(rewritten, &results)
}

/// Where a subquery stands: in an expression, or in FROM at the statement's top level.
#[derive(Clone, Copy)]
enum Place {
    Sublink(*mut pg_sys::SubLink),
    /// The range table cell of the top level's subquery in FROM.
    From(*mut pg_sys::ListCell),
}

impl Place {
    unsafe fn subquery(self) -> *mut pg_sys::Query {
        match self {
            Place::Sublink(sublink) => (*sublink).subselect.cast(),
            Place::From(cell) => (*((*cell).ptr_value as *mut pg_sys::RangeTblEntry)).subquery,
        }
    }

    unsafe fn get(self) -> *mut pg_sys::Node {
        match self {
            Place::Sublink(sublink) => (*sublink).subselect,
            Place::From(cell) => (*cell).ptr_value.cast(),
        }
    }

    unsafe fn set(self, node: *mut pg_sys::Node) {
        match self {
            Place::Sublink(sublink) => (*sublink).subselect = node,
            Place::From(cell) => (*cell).ptr_value = node.cast(),
        }
    }
}

/// A replaced subquery: where it was, what stood there, and what stands there instead.
struct Replaced {
    place: Place,
    original: *mut pg_sys::Node,
    replacement: *mut pg_sys::Node,
    result: Broadcast,
}

/// The statement (a copy) with the subqueries `eligible` accepts replaced by intermediate
/// results, as few as `runs` needs; `None` when `runs` does not accept it even with all of them
/// replaced, or there are none.
unsafe fn rewrite(
    parse: *mut pg_sys::Query,
    eligible: &mut dyn FnMut(*mut pg_sys::Query) -> Result<bool>,
    runs: &mut dyn FnMut(*mut pg_sys::Query) -> Result<bool>,
) -> Result<Option<(*mut pg_sys::Query, Vec<Broadcast>)>> {
    let copy: *mut pg_sys::Query = pg_sys::copyObjectImpl(parse.cast()).cast();
    let mut places = Vec::new();
    for place in candidates(copy)? {
        if eligible(place.subquery())? {
            places.push(place);
        }
    }
    if places.is_empty() {
        return Ok(None);
    }
    let mut params = Vec::new();
    collect_params(copy.cast(), &mut params);
    let mut next_param = params.iter().copied().max().unwrap_or(0) + 1;
    let mut replaced = Vec::new();
    for place in places {
        let original = place.get();
        let (replacement, result) = replacement(place, next_param)?;
        next_param += result.columns as i32;
        place.set(replacement);
        replaced.push(Replaced { place, original, replacement, result });
    }
    if !runs(copy)? {
        return Ok(None);
    }
    // Put back what the statement runs per shard group with (a subquery co-located with it).
    let mut results = Vec::new();
    for entry in replaced {
        entry.place.set(entry.original);
        if !runs(copy)? {
            entry.place.set(entry.replacement);
            results.push(entry.result);
        }
    }
    if results.is_empty() {
        // Every one went back (the statement runs as it was): not this module's plan.
        return Ok(None);
    }
    Ok(Some((copy, results)))
}

/// The subqueries of `query` that read distributed tables, read nothing of the statement around
/// them and whose rows can travel as arrays: in FROM at the top level (not LATERAL), and in
/// expressions at any level, outermost first (one inside another is not listed: it goes with
/// it).
unsafe fn candidates(query: *mut pg_sys::Query) -> Result<Vec<Place>> {
    struct Context {
        found: Vec<*mut pg_sys::SubLink>,
        failure: Option<ShardingError>,
    }
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        let cx = &mut *(context as *mut Context);
        match (*node).type_ {
            pg_sys::NodeTag::T_Query => pg_sys::query_tree_walker(node.cast(), Some(walker), context, 0),
            pg_sys::NodeTag::T_SubLink => {
                let sublink = node.cast::<pg_sys::SubLink>();
                match replaceable(sublink) {
                    Ok(true) => {
                        cx.found.push(sublink);
                        // Its test expression belongs to the statement around it.
                        walker((*sublink).testexpr, context)
                    }
                    Ok(false) => pg_sys::expression_tree_walker(node, Some(walker), context),
                    Err(error) => {
                        cx.failure = Some(error);
                        true
                    }
                }
            }
            _ => pg_sys::expression_tree_walker(node, Some(walker), context),
        }
    }
    let mut places = Vec::new();
    let rtable = (*query).rtable;
    for i in 0..list_pointers::<pg_sys::RangeTblEntry>(rtable).len() {
        let cell = (*rtable).elements.add(i);
        let rte = (*cell).ptr_value as *mut pg_sys::RangeTblEntry;
        if (*rte).rtekind == pg_sys::RTEKind::RTE_SUBQUERY
            && !(*rte).lateral
            && !(*rte).subquery.is_null()
            && self_contained((*rte).subquery)
            && !distributed_tables((*rte).subquery)?.is_empty()
            && sendable_outputs((*rte).subquery)
        {
            places.push(Place::From(cell));
        }
    }
    let mut context = Context { found: Vec::new(), failure: None };
    pg_sys::query_tree_walker(query, Some(walker), (&mut context as *mut Context).cast(), 0);
    if let Some(error) = context.failure {
        return Err(error);
    }
    places.extend(context.found.into_iter().map(Place::Sublink));
    Ok(places)
}

/// Whether a subquery can become an intermediate result: of a kind that only reads its rows,
/// reading nothing of the statement around it, reading distributed tables, and with output
/// columns that travel as array elements (EXISTS reads none of them).
unsafe fn replaceable(sublink: *mut pg_sys::SubLink) -> Result<bool> {
    use pg_sys::SubLinkType::*;
    let subquery: *mut pg_sys::Query = (*sublink).subselect.cast();
    if subquery.is_null() || (*subquery).type_ != pg_sys::NodeTag::T_Query {
        return Ok(false);
    }
    if !matches!((*sublink).subLinkType, EXISTS_SUBLINK | ALL_SUBLINK | ANY_SUBLINK | ROWCOMPARE_SUBLINK | EXPR_SUBLINK | ARRAY_SUBLINK) {
        return Ok(false);
    }
    if !self_contained(subquery) || distributed_tables(subquery)?.is_empty() {
        return Ok(false);
    }
    if (*sublink).subLinkType == EXISTS_SUBLINK {
        return Ok(true);
    }
    Ok(sendable_outputs(subquery))
}

/// Whether a query's output columns travel as array elements.
unsafe fn sendable_outputs(query: *mut pg_sys::Query) -> bool {
    let outputs = outputs(query);
    !outputs.is_empty() && outputs.iter().all(|&(type_oid, _, _)| sendable_type(type_oid))
}

/// The type, typmod and collation of each output column of a query (its non-junk entries).
unsafe fn outputs(query: *mut pg_sys::Query) -> Vec<(pg_sys::Oid, i32, pg_sys::Oid)> {
    list_pointers::<pg_sys::TargetEntry>((*query).targetList)
        .into_iter()
        .filter(|&entry| !(*entry).resjunk)
        .map(|entry| {
            let expr = (*entry).expr.cast::<pg_sys::Node>();
            (pg_sys::exprType(expr), pg_sys::exprTypmod(expr), pg_sys::exprCollation(expr))
        })
        .collect()
}

/// The hash-distributed tables a query reads, at any level.
unsafe fn distributed_tables(query: *mut pg_sys::Query) -> Result<Vec<std::rc::Rc<crate::catalog::tables::DistributedTable>>> {
    let mut relids = Vec::new();
    for_each_rte(query, &mut |rte| {
        if (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION && !relids.contains(&(*rte).relid) {
            relids.push((*rte).relid);
        }
    });
    let mut tables = Vec::new();
    for relid in relids {
        if let Some(table) = cache::table_unless_reentrant(relid)? {
            if table.method == Method::Hash {
                tables.push(table);
            }
        }
    }
    Ok(tables)
}

/// Whether a query refers to nothing outside itself: no column, aggregate or WITH query of an
/// enclosing level.
unsafe fn self_contained(query: *mut pg_sys::Query) -> bool {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        let depth = *(context as *mut u32);
        match (*node).type_ {
            pg_sys::NodeTag::T_Var => (*node.cast::<pg_sys::Var>()).varlevelsup > depth,
            pg_sys::NodeTag::T_Aggref => {
                (*node.cast::<pg_sys::Aggref>()).agglevelsup > depth || pg_sys::expression_tree_walker(node, Some(walker), context)
            }
            pg_sys::NodeTag::T_GroupingFunc => (*node.cast::<pg_sys::GroupingFunc>()).agglevelsup > depth,
            pg_sys::NodeTag::T_PlaceHolderVar => {
                (*node.cast::<pg_sys::PlaceHolderVar>()).phlevelsup > depth || pg_sys::expression_tree_walker(node, Some(walker), context)
            }
            pg_sys::NodeTag::T_RangeTblEntry => {
                let rte = node.cast::<pg_sys::RangeTblEntry>();
                // An entry of the query at level `depth`.
                (*rte).rtekind == pg_sys::RTEKind::RTE_CTE && (*rte).ctelevelsup > depth
            }
            pg_sys::NodeTag::T_Query => {
                *(context as *mut u32) += 1;
                let found = pg_sys::query_tree_walker(node.cast(), Some(walker), context, pg_sys::QTW_EXAMINE_RTES_BEFORE as i32);
                *(context as *mut u32) -= 1;
                found
            }
            _ => pg_sys::expression_tree_walker(node, Some(walker), context),
        }
    }
    // The query itself is level 0.
    let mut depth: u32 = 0;
    !pg_sys::query_tree_walker(query, Some(walker), (&mut depth as *mut u32).cast(), pg_sys::QTW_EXAMINE_RTES_BEFORE as i32)
}

/// What stands for the subquery at `place` in the statement: its rows from array parameters
/// `$first_param...`, one per output column (EXISTS: one marker column), as a query in an
/// expression or as a function scan in FROM (with the subquery's alias and column names); and
/// the intermediate result that fills them.
unsafe fn replacement(place: Place, first_param: i32) -> Result<(*mut pg_sys::Node, Broadcast)> {
    use pg_sys::SubLinkType::*;
    let subquery = place.subquery();
    let kind = match place {
        Place::Sublink(sublink) => Some((*sublink).subLinkType),
        Place::From(_) => None,
    };
    let exists = kind == Some(EXISTS_SUBLINK);
    let columns = if exists { vec![(pg_sys::INT4OID, -1, pg_sys::InvalidOid)] } else { outputs(subquery) };
    let mut functions: *mut pg_sys::List = std::ptr::null_mut();
    let mut colnames: *mut pg_sys::List = std::ptr::null_mut();
    let mut target: *mut pg_sys::List = std::ptr::null_mut();
    for (i, &(type_oid, typmod, collation)) in columns.iter().enumerate() {
        functions = pg_sys::lappend(functions, unnest_parameter(type_oid, collation, first_param + i as i32).cast());
        let name = CString::new(format!("c{}", i + 1)).map_err(|e| ShardingError::internal(e.to_string()))?;
        colnames = pg_sys::lappend(colnames, pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())).cast());
        let var = pg_sys::makeVar(1, (i + 1) as i16, type_oid, typmod, collation, 0);
        let entry = pg_sys::makeTargetEntry(var.cast(), (i + 1) as i16, pg_sys::pstrdup(name.as_ptr()), false);
        target = pg_sys::lappend(target, entry.cast());
    }
    let replacement: *mut pg_sys::Node = match place {
        Place::From(cell) => {
            // The columns keep the names the statement reads them by.
            let old = (*cell).ptr_value as *mut pg_sys::RangeTblEntry;
            let alias = if (*old).alias.is_null() { (*(*old).eref).aliasname } else { (*(*old).alias).aliasname };
            let names: *mut pg_sys::List = pg_sys::copyObjectImpl((*(*old).eref).colnames.cast()).cast();
            let rte = function_rte(functions, names, alias);
            (*rte).inFromCl = (*old).inFromCl;
            rte.cast()
        }
        Place::Sublink(_) => {
            let rte = function_rte(functions, colnames, pg_sys::pstrdup(c"pgs_result".as_ptr()));
            select_from(rte, std::ptr::null_mut(), target).cast()
        }
    };

    let text = super::aggregates::store_query(subquery)?;
    let sql = {
        let _settings = TransmissionSettings::enter();
        let copy: *mut pg_sys::Query = pg_sys::copyObjectImpl(subquery.cast()).cast();
        CStr::from_ptr(pg_sys::pg_get_querydef(copy, false)).to_string_lossy().into_owned()
    };
    let result = Broadcast {
        table: sql,
        first_param,
        columns: columns.len(),
        query: Some(text),
        exists,
        row_limit: match kind {
            Some(EXISTS_SUBLINK) => 1,
            Some(EXPR_SUBLINK) => 2,
            _ => 0,
        },
        ..Default::default()
    };
    Ok((replacement, result))
}
