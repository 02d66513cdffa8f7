//! Broadcast joins: a SELECT joining distributed tables that are not co-located (or not joined
//! on their distribution columns) runs on the shards of one of them, with the rows of the
//! others sent to every task.
//!
//! The statement is rewritten on a copy: each broadcast table becomes a function scan over
//! array parameters, one per column it reads (`ROWS FROM(unnest(($5)::integer[]), ...) AS
//! p(id, ...)`), so the rest of the statement keeps its shape and the remaining tables are
//! co-located: plan 3 (aggregates.rs) takes it from there, and the ShardScan reads each
//! broadcast table first (filtered by the conditions on it alone, projected to the columns the
//! statement reads) and fills the parameters (executor/remote_scan.rs, `broadcast`).
//!
//! A table is broadcast only when that moves fewer bytes than reading the other side to the
//! coordinator: its size (from the workers, cached for a minute) times the task count must
//! not exceed the rest, or it must be small; and never beyond `sharding.broadcast_join_limit`.
//! Otherwise the general plan joins on the coordinator, as before.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;
use std::rc::Rc;
use std::time::{Duration, Instant};

use pgrx::pg_sys;

use crate::catalog::{cache, tables::DistributedTable, tables::Method};
use crate::commands::utility::list_pointers;
use crate::connection::TaskParam;
use crate::deparse::query::deparse_query;
use crate::error::{Result, ShardingError};
use crate::executor::remote_scan::{Broadcast, ShardScanPlan};
use crate::executor::tasks::{self, Task};
use crate::planner::scan_path::collect_params;
use crate::planner::shippable;
use crate::transaction::remote;

/// Tables at most this large are broadcast whatever the size of the rest.
pub(super) const SMALL_TABLE_BYTES: u64 = 1024 * 1024;
/// How long a table's size read from the workers is trusted.
const SIZE_TTL: Duration = Duration::from_secs(60);

/// The coordinator query of plan 3 over the statement with some tables broadcast, `None` when
/// no choice of broadcast tables makes the rest run on co-located shards.
///
/// `prior`: intermediate results the statement already reads (planner/intermediate.rs).
pub unsafe fn plan(parse: *mut pg_sys::Query, prior: &[Broadcast]) -> Result<Option<*mut pg_sys::Query>> {
    let limit = crate::guc::BROADCAST_JOIN_LIMIT.get();
    if limit <= 0 || (*parse).commandType != pg_sys::CmdType::CMD_SELECT || !(*parse).utilityStmt.is_null() {
        return Ok(None);
    }
    // Broadcasting leaves the statement's shape as it is: when plan 3 cannot take that shape,
    // there is nothing to try (and no table sizes to ask the workers for).
    if !super::aggregates::eligible(parse) {
        return Ok(None);
    }
    let limit = limit as u64 * 1024;
    let distributed = top_distributed(parse)?;
    if distributed.len() < 2 {
        return Ok(None);
    }
    let candidates = candidates(parse, &distributed);
    for chosen in choices(candidates.len()) {
        let chosen: Vec<&Candidate> = chosen.iter().map(|&i| &candidates[i]).collect();
        if let Some(coordinator) = attempt(parse, &distributed, &chosen, limit, prior)? {
            return Ok(Some(coordinator));
        }
    }
    Ok(None)
}

/// The hash-distributed tables of the top level: (range table index, table).
pub(super) unsafe fn top_distributed(parse: *mut pg_sys::Query) -> Result<Vec<(u32, Rc<DistributedTable>)>> {
    let mut distributed = Vec::new();
    for (i, rte) in list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable).into_iter().enumerate() {
        if (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION || (*rte).relkind == pg_sys::RELKIND_VIEW as std::ffi::c_char {
            continue;
        }
        if let Some(table) = cache::table_unless_reentrant((*rte).relid)? {
            if table.method == Method::Hash {
                distributed.push(((i + 1) as u32, table));
            }
        }
    }
    Ok(distributed)
}

/// The tables of `distributed` that could be broadcast, smallest first (of equal sizes, the
/// ones the statement filters first).
unsafe fn candidates(parse: *mut pg_sys::Query, distributed: &[(u32, Rc<DistributedTable>)]) -> Vec<Candidate> {
    let mut candidates: Vec<Candidate> = Vec::new();
    for (rti, table) in distributed {
        let rte = list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable)[*rti as usize - 1];
        // Row-level security quals stay with the table's own scan.
        if !(*rte).securityQuals.is_null() || !(*rte).tablesample.is_null() {
            continue;
        }
        let Some(columns) = referenced_columns(parse, *rti) else { continue };
        if !columns.iter().all(|&attno| sendable_column((*rte).relid, attno)) {
            continue;
        }
        let Some(bytes) = table_bytes(table) else { continue };
        let unfiltered = own_conditions(parse, *rti).is_empty();
        candidates.push((*rti, table.clone(), columns, bytes, unfiltered));
    }
    candidates.sort_by_key(|c| (c.3, c.4));
    candidates
}

/// Which candidates to try, in order: each one alone, then the smallest ones together (a
/// join of three tables from three co-location groups needs two).
fn choices(count: usize) -> impl Iterator<Item = Vec<usize>> {
    let singles = (0..count).map(|i| vec![i]);
    let growing = (2..=count).map(|n| (0..n).collect::<Vec<_>>());
    singles.chain(growing)
}

/// A table that could be broadcast: its range table index, the table, the columns the
/// statement reads, its size, and whether the statement has no conditions on it alone.
type Candidate = (u32, Rc<DistributedTable>, Vec<i16>, u64, bool);

/// Plan 3 with the `chosen` tables broadcast, when each is worth it and the rest then runs on
/// co-located shards.
unsafe fn attempt(
    parse: *mut pg_sys::Query,
    distributed: &[(u32, Rc<DistributedTable>)],
    chosen: &[&Candidate],
    limit: u64,
    prior: &[Broadcast],
) -> Result<Option<*mut pg_sys::Query>> {
    // What stays distributed: its largest table sets the bytes read otherwise, the one with
    // the most shards the task count.
    let rest: Vec<&(u32, Rc<DistributedTable>)> = distributed.iter().filter(|(r, _)| !chosen.iter().any(|c| c.0 == *r)).collect();
    if rest.is_empty() {
        return Ok(None);
    }
    let mut rest_bytes = 0u64;
    let mut tasks = 1u64;
    for (_, other) in &rest {
        let Some(other_bytes) = table_bytes(other) else { return Ok(None) };
        rest_bytes = rest_bytes.max(other_bytes);
        tasks = tasks.max(other.shards.len() as u64);
    }
    // A table routed by the join key sends each row to one task only.
    let copies = |c: &Candidate| if routing_column(parse, c.0, &rest).is_some() { 1 } else { tasks };
    if chosen.iter().any(|c| c.3 > limit || (c.3 > SMALL_TABLE_BYTES && c.3.saturating_mul(copies(c)) > rest_bytes)) {
        return Ok(None);
    }
    match rewrite(parse, chosen)? {
        Some((rewritten, broadcasts)) => super::router::split_select_with(rewritten, prior.iter().cloned().chain(broadcasts).collect()),
        None => Ok(None),
    }
}

/// An UPDATE or DELETE reading distributed tables it cannot run with per shard group (not
/// co-located with the target, or not joined on distribution columns): the statement with the
/// fewest, smallest of them broadcast so that it can, and the broadcasts; `None` when none
/// does. The alternative is an error, so any table up to `sharding.broadcast_join_limit` goes.
pub unsafe fn for_modify(parse: *mut pg_sys::Query) -> Result<Option<(*mut pg_sys::Query, Vec<Broadcast>)>> {
    let limit = crate::guc::BROADCAST_JOIN_LIMIT.get();
    if limit <= 0 {
        return Ok(None);
    }
    let limit = limit as u64 * 1024;
    let target = (*parse).resultRelation as u32;
    let distributed: Vec<(u32, Rc<DistributedTable>)> = top_distributed(parse)?.into_iter().filter(|(rti, _)| *rti != target).collect();
    let candidates: Vec<Candidate> = candidates(parse, &distributed).into_iter().filter(|c| c.3 <= limit).collect();
    for chosen in choices(candidates.len()) {
        let chosen: Vec<&Candidate> = chosen.iter().map(|&i| &candidates[i]).collect();
        if let Some((rewritten, broadcasts)) = rewrite(parse, &chosen)? {
            if super::router::modify_runs_per_group(rewritten)? {
                return Ok(Some((rewritten, broadcasts)));
            }
        }
    }
    Ok(None)
}

/// The statement (a copy) with the `chosen` tables replaced by function scans over array
/// parameters, and their broadcasts; `None` when one of them cannot be sent.
unsafe fn rewrite(parse: *mut pg_sys::Query, chosen: &[&Candidate]) -> Result<Option<(*mut pg_sys::Query, Vec<Broadcast>)>> {
    let rewritten: *mut pg_sys::Query = pg_sys::copyObjectImpl(parse.cast()).cast();
    let mut params = Vec::new();
    collect_params(parse.cast(), &mut params);
    let mut next_param = params.iter().copied().max().unwrap_or(0) + 1;
    let mut broadcasts = Vec::new();
    let distributed = top_distributed(parse)?;
    let rest: Vec<&(u32, Rc<DistributedTable>)> = distributed.iter().filter(|(r, _)| !chosen.iter().any(|c| c.0 == *r)).collect();
    for (rti, table, _, _, _) in chosen.iter().copied() {
        let route = routing_column(rewritten, *rti, &rest);
        // The conditions on the table alone filter it where it is read; every row sent meets
        // them, so the statement no longer needs them (nor the columns only they read).
        let slots = own_conditions(rewritten, *rti);
        let conditions: Vec<*mut pg_sys::Node> = slots.iter().map(|&slot| *slot).collect();
        for &slot in &slots {
            *slot = pg_sys::makeBoolConst(true, false);
        }
        let Some(mut columns) = referenced_columns(rewritten, *rti) else { return Ok(None) };
        // A statement that reads no column of the table still needs its rows.
        if columns.is_empty() {
            match table.distribution_attnum {
                Some(attno) => columns.push(attno),
                None => return Ok(None),
            }
        }
        let relid = (*list_pointers::<pg_sys::RangeTblEntry>((*rewritten).rtable)[*rti as usize - 1]).relid;
        if !columns.iter().all(|&attno| sendable_column(relid, attno)) {
            return Ok(None);
        }
        let reader = broadcast_reader(rewritten, *rti, table, &columns, &conditions)?;
        replace_with_parameters(rewritten, *rti, &columns, next_param)?;
        let route_column = route.and_then(|attno| columns.iter().position(|&c| c == attno));
        let shown = match route {
            Some(attno) => {
                let name = std::ffi::CStr::from_ptr(pg_sys::get_attname(relid, attno, false)).to_string_lossy().into_owned();
                format!("{} (routed by {name})", table.name)
            }
            None => table.name.clone(),
        };
        broadcasts.push(Broadcast {
            table: shown,
            plan: reader,
            first_param: next_param,
            columns: columns.len(),
            route_column,
            route_type: route.map(|attno| column_type(relid, attno).0.to_u32()).unwrap_or(0),
            column_types: columns.iter().map(|&attno| column_type(relid, attno).0.to_u32()).collect(),
            ..Default::default()
        });
        next_param += columns.len() as i32;
    }
    Ok(Some((rewritten, broadcasts)))
}

/// The columns of range table entry `rti` (of the top level) the statement reads, anywhere in
/// it (also through join aliases and in subqueries); `None` when it reads whole rows or system
/// columns, which a function scan cannot give.
pub(super) unsafe fn referenced_columns(parse: *mut pg_sys::Query, rti: u32) -> Option<Vec<i16>> {
    struct Context {
        parse: *mut pg_sys::Query,
        rti: u32,
        depth: u32,
        columns: Vec<i16>,
        whole: bool,
    }
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        let cx = &mut *(context as *mut Context);
        match (*node).type_ {
            pg_sys::NodeTag::T_Var => {
                let var = node.cast::<pg_sys::Var>();
                if (*var).varlevelsup != cx.depth {
                    return false;
                }
                let rtes = list_pointers::<pg_sys::RangeTblEntry>((*cx.parse).rtable);
                let Some(&rte) = ((*var).varno as usize).checked_sub(1).and_then(|i| rtes.get(i)) else { return false };
                if (*var).varno as u32 == cx.rti {
                    if (*var).varattno <= 0 {
                        cx.whole = true;
                        return true;
                    }
                    if !cx.columns.contains(&(*var).varattno) {
                        cx.columns.push((*var).varattno);
                    }
                } else if (*rte).rtekind == pg_sys::RTEKind::RTE_JOIN {
                    // A column of a join (USING columns, whole joins): what it stands for.
                    let local: *mut pg_sys::Var = pg_sys::copyObjectImpl(var.cast()).cast();
                    (*local).varlevelsup = 0;
                    let expanded = pg_sys::flatten_join_alias_vars(cx.parse, local.cast());
                    let depth = std::mem::replace(&mut cx.depth, 0);
                    let found = walker(expanded, context);
                    (*(context as *mut Context)).depth = depth;
                    return found;
                }
                false
            }
            pg_sys::NodeTag::T_Query => {
                cx.depth += 1;
                let found = pg_sys::query_tree_walker(node.cast(), Some(walker), context, pg_sys::QTW_IGNORE_JOINALIASES as i32);
                (*(context as *mut Context)).depth -= 1;
                found
            }
            _ => pg_sys::expression_tree_walker(node, Some(walker), context),
        }
    }
    let mut context = Context { parse, rti, depth: 0, columns: Vec::new(), whole: false };
    pg_sys::query_tree_walker(parse, Some(walker), (&mut context as *mut Context).cast(), pg_sys::QTW_IGNORE_JOINALIASES as i32);
    if context.whole {
        return None;
    }
    context.columns.sort_unstable();
    Some(context.columns)
}

/// The type, typmod and collation of a column.
unsafe fn column_type(relid: pg_sys::Oid, attno: i16) -> (pg_sys::Oid, i32, pg_sys::Oid) {
    let (mut type_oid, mut typmod, mut collation) = (pg_sys::InvalidOid, -1, pg_sys::InvalidOid);
    pg_sys::get_atttypetypmodcoll(relid, attno, &mut type_oid, &mut typmod, &mut collation);
    (type_oid, typmod, collation)
}

unsafe fn sendable_column(relid: pg_sys::Oid, attno: i16) -> bool {
    sendable_type(column_type(relid, attno).0)
}

/// Whether values of a type travel as elements of an array of that type: not arrays (they
/// would be flattened into the outer array), composites (a function scan would spread them
/// over several columns) nor money.
pub(super) unsafe fn sendable_type(type_oid: pg_sys::Oid) -> bool {
    let base = pg_sys::getBaseType(type_oid);
    type_oid != pg_sys::InvalidOid
        // money's text form follows lc_monetary, which the workers may not share.
        && type_oid != pg_sys::MONEYOID
        && pg_sys::get_array_type(type_oid) != pg_sys::InvalidOid
        && pg_sys::get_element_type(base) == pg_sys::InvalidOid
        && !pg_sys::type_is_rowtype(base)
        && pg_sys::get_typtype(base) != pg_sys::TYPTYPE_PSEUDO as std::ffi::c_char
}

/// Replaces range table entry `rti` of `query` by a function scan over array parameters
/// `$first_param...`, one per referenced column (NULL arrays for the other columns, so that
/// every column keeps its number).
unsafe fn replace_with_parameters(query: *mut pg_sys::Query, rti: u32, columns: &[i16], first_param: i32) -> Result<()> {
    let rtable = (*query).rtable;
    let cell = (*rtable).elements.add(rti as usize - 1);
    let old = (*cell).ptr_value as *mut pg_sys::RangeTblEntry;
    let relid = (*old).relid;
    let names = list_pointers::<pg_sys::String>((*(*old).eref).colnames);
    let mut colnames: *mut pg_sys::List = std::ptr::null_mut();
    let mut functions: *mut pg_sys::List = std::ptr::null_mut();
    for (i, &name) in names.iter().enumerate() {
        let attno = (i + 1) as i16;
        // A dropped column has no name; it is never read, but the alias list needs one.
        let name = std::ffi::CStr::from_ptr((*name).sval).to_string_lossy().into_owned();
        let name = if name.is_empty() { format!("pgs_dropped_{attno}") } else { name };
        let name = CString::new(name).map_err(|e| ShardingError::internal(e.to_string()))?;
        colnames = pg_sys::lappend(colnames, pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())).cast());
        let function = match columns.iter().position(|&c| c == attno) {
            Some(position) => {
                let (type_oid, _, collation) = column_type(relid, attno);
                unnest_parameter(type_oid, collation, first_param + position as i32)
            }
            None => unnest_nothing(),
        };
        functions = pg_sys::lappend(functions, function.cast());
    }
    let alias = if (*old).alias.is_null() { (*(*old).eref).aliasname } else { (*(*old).alias).aliasname };
    let rte = function_rte(functions, colnames, alias);
    (*rte).inFromCl = (*old).inFromCl;
    (*cell).ptr_value = rte.cast();
    Ok(())
}

/// `unnest(($param_id)::type[] [COLLATE collation])` as a function of a function scan: the
/// worker reads the parameter's text with the array type's input function, and a collation
/// other than the type's default holds there too.
pub(super) unsafe fn unnest_parameter(type_oid: pg_sys::Oid, collation: pg_sys::Oid, param_id: i32) -> *mut pg_sys::RangeTblFunction {
    let array_type = pg_sys::get_array_type(type_oid);
    let param: *mut pg_sys::Param = pg_sys::palloc0(std::mem::size_of::<pg_sys::Param>()).cast();
    (*param).xpr.type_ = pg_sys::NodeTag::T_Param;
    (*param).paramkind = pg_sys::ParamKind::PARAM_EXTERN;
    (*param).paramid = param_id;
    (*param).paramtype = pg_sys::TEXTOID;
    (*param).paramtypmod = -1;
    (*param).paramcollid = pg_sys::DEFAULT_COLLATION_OID;
    (*param).location = -1;
    let coerce: *mut pg_sys::CoerceViaIO = pg_sys::palloc0(std::mem::size_of::<pg_sys::CoerceViaIO>()).cast();
    (*coerce).xpr.type_ = pg_sys::NodeTag::T_CoerceViaIO;
    (*coerce).arg = param.cast();
    (*coerce).resulttype = array_type;
    (*coerce).resultcollid = pg_sys::get_typcollation(array_type);
    (*coerce).coerceformat = pg_sys::CoercionForm::COERCE_EXPLICIT_CAST;
    (*coerce).location = -1;
    let mut argument: *mut pg_sys::Expr = coerce.cast();
    if collation != pg_sys::InvalidOid && collation != pg_sys::get_typcollation(type_oid) {
        let collate: *mut pg_sys::CollateExpr = pg_sys::palloc0(std::mem::size_of::<pg_sys::CollateExpr>()).cast();
        (*collate).xpr.type_ = pg_sys::NodeTag::T_CollateExpr;
        (*collate).arg = argument;
        (*collate).collOid = collation;
        (*collate).location = -1;
        argument = collate.cast();
    }
    unnest_function(argument, type_oid, collation)
}

/// `unnest(NULL::integer[])`: a column nobody reads.
pub(super) unsafe fn unnest_nothing() -> *mut pg_sys::RangeTblFunction {
    unnest_function(pg_sys::makeNullConst(pg_sys::INT4ARRAYOID, -1, pg_sys::InvalidOid).cast(), pg_sys::INT4OID, pg_sys::InvalidOid)
}

unsafe fn unnest_function(argument: *mut pg_sys::Expr, element: pg_sys::Oid, collation: pg_sys::Oid) -> *mut pg_sys::RangeTblFunction {
    let call = pg_sys::makeFuncExpr(
        pg_sys::Oid::from(pg_sys::F_UNNEST_ANYARRAY),
        element,
        pg_sys::lappend(std::ptr::null_mut(), argument.cast()),
        collation,
        pg_sys::exprCollation(argument.cast()),
        pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
    );
    (*call).funcretset = true;
    let function: *mut pg_sys::RangeTblFunction = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblFunction>()).cast();
    (*function).type_ = pg_sys::NodeTag::T_RangeTblFunction;
    (*function).funcexpr = call.cast();
    (*function).funccolcount = 1;
    function
}

/// A function scan (`ROWS FROM (...)`) over `functions`, one column each, named `alias(colnames)`.
pub(super) unsafe fn function_rte(functions: *mut pg_sys::List, colnames: *mut pg_sys::List, alias: *mut std::ffi::c_char) -> *mut pg_sys::RangeTblEntry {
    let rte: *mut pg_sys::RangeTblEntry = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblEntry>()).cast();
    (*rte).type_ = pg_sys::NodeTag::T_RangeTblEntry;
    (*rte).rtekind = pg_sys::RTEKind::RTE_FUNCTION;
    (*rte).functions = functions;
    (*rte).inFromCl = true;
    (*rte).inh = false;
    (*rte).alias = pg_sys::makeAlias(alias, pg_sys::copyObjectImpl(colnames.cast()).cast());
    (*rte).eref = pg_sys::makeAlias(alias, colnames);
    rte
}

/// The plan that reads a broadcast table: the given columns of each shard's rows, filtered by
/// `conditions` (the statement's conditions on this table alone, see `own_conditions`).
unsafe fn broadcast_reader(
    parse: *mut pg_sys::Query,
    rti: u32,
    table: &DistributedTable,
    columns: &[i16],
    conditions: &[*mut pg_sys::Node],
) -> Result<ShardScanPlan> {
    let rtes = list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable);
    let rte: *mut pg_sys::RangeTblEntry = pg_sys::copyObjectImpl(rtes[rti as usize - 1].cast()).cast();
    let mut conjuncts: *mut pg_sys::List = std::ptr::null_mut();
    for &condition in conditions {
        let copy: *mut pg_sys::Node = pg_sys::copyObjectImpl(condition.cast()).cast();
        renumber_vars(copy, 1);
        conjuncts = pg_sys::lappend(conjuncts, copy.cast());
    }
    let quals: *mut pg_sys::Node = if conjuncts.is_null() { std::ptr::null_mut() } else { pg_sys::make_ands_explicit(conjuncts).cast() };
    let mut target: *mut pg_sys::List = std::ptr::null_mut();
    for (i, &attno) in columns.iter().enumerate() {
        let (type_oid, typmod, collation) = column_type((*rte).relid, attno);
        let var = pg_sys::makeVar(1, attno, type_oid, typmod, collation, 0);
        let name = CString::new(format!("c{}", i + 1)).map_err(|e| ShardingError::internal(e.to_string()))?;
        let entry = pg_sys::makeTargetEntry(var.cast(), (i + 1) as i16, pg_sys::pstrdup(name.as_ptr()), false);
        target = pg_sys::lappend(target, entry.cast());
    }
    let reader = select_from(rte, quals, target);
    let deparsed = deparse_query(reader)?;
    let mut plan = ShardScanPlan::from_deparsed(&deparsed, table.relid);
    let mut params_used = Vec::new();
    collect_params(reader.cast(), &mut params_used);
    plan.max_param = params_used.iter().copied().max().unwrap_or(0);
    plan.params_used = params_used;
    Ok(plan)
}

/// `SELECT <target> FROM <rte> WHERE <quals>`: a query over one range table entry.
pub(super) unsafe fn select_from(rte: *mut pg_sys::RangeTblEntry, quals: *mut pg_sys::Node, target: *mut pg_sys::List) -> *mut pg_sys::Query {
    let query: *mut pg_sys::Query = pg_sys::palloc0(std::mem::size_of::<pg_sys::Query>()).cast();
    (*query).type_ = pg_sys::NodeTag::T_Query;
    (*query).commandType = pg_sys::CmdType::CMD_SELECT;
    (*query).querySource = pg_sys::QuerySource::QSRC_ORIGINAL;
    (*query).canSetTag = true;
    (*query).rtable = pg_sys::lappend(std::ptr::null_mut(), rte.cast());
    let reference: *mut pg_sys::RangeTblRef = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblRef>()).cast();
    (*reference).type_ = pg_sys::NodeTag::T_RangeTblRef;
    (*reference).rtindex = 1;
    (*query).jointree = pg_sys::makeFromExpr(pg_sys::lappend(std::ptr::null_mut(), reference.cast()), quals);
    (*query).targetList = target;
    query
}

/// The conditions of the statement that every result row meets, when range table entry `rti`
/// is in every result row: the conjuncts of WHERE and of the inner joins above it; none when
/// an outer join can null it. Given as the places that hold them.
unsafe fn conditions_met(parse: *mut pg_sys::Query, rti: u32) -> Vec<*mut *mut pg_sys::Node> {
    /// The conjuncts of the inner joins on the way down to `rti`; `None` when it is not found
    /// there, `Some(false)` when an outer join can null it.
    unsafe fn path(node: *mut pg_sys::Node, rti: u32, out: &mut Vec<*mut *mut pg_sys::Node>) -> Option<bool> {
        if node.is_null() {
            return None;
        }
        match (*node).type_ {
            pg_sys::NodeTag::T_RangeTblRef => ((*node.cast::<pg_sys::RangeTblRef>()).rtindex as u32 == rti).then_some(true),
            pg_sys::NodeTag::T_FromExpr => {
                let from = node.cast::<pg_sys::FromExpr>();
                for item in list_pointers::<pg_sys::Node>((*from).fromlist) {
                    if let Some(found) = path(item, rti, out) {
                        if found {
                            conjuncts(&mut (*from).quals, out);
                        }
                        return Some(found);
                    }
                }
                None
            }
            pg_sys::NodeTag::T_JoinExpr => {
                let join = node.cast::<pg_sys::JoinExpr>();
                use pg_sys::JoinType::*;
                let sides = [
                    ((*join).larg, matches!((*join).jointype, JOIN_RIGHT | JOIN_FULL)),
                    ((*join).rarg, matches!((*join).jointype, JOIN_LEFT | JOIN_FULL)),
                ];
                for (side, nullable) in sides {
                    if let Some(found) = path(side, rti, out) {
                        let found = found && !nullable;
                        if found && (*join).jointype == JOIN_INNER {
                            conjuncts(&mut (*join).quals, out);
                        }
                        return Some(found);
                    }
                }
                None
            }
            _ => None,
        }
    }
    unsafe fn conjuncts(slot: *mut *mut pg_sys::Node, out: &mut Vec<*mut *mut pg_sys::Node>) {
        let node = *slot;
        if node.is_null() {
            return;
        }
        if (*node).type_ == pg_sys::NodeTag::T_BoolExpr && (*node.cast::<pg_sys::BoolExpr>()).boolop == pg_sys::BoolExprType::AND_EXPR {
            let args = (*node.cast::<pg_sys::BoolExpr>()).args;
            for i in 0..list_pointers::<pg_sys::Node>(args).len() {
                let cell = (*args).elements.add(i);
                conjuncts(std::ptr::addr_of_mut!((*cell).ptr_value).cast(), out);
            }
            return;
        }
        out.push(slot);
    }
    let mut found = Vec::new();
    if path((*parse).jointree.cast(), rti, &mut found) != Some(true) {
        return Vec::new();
    }
    found
}

/// Conditions of the statement on range table entry `rti` alone that every result row meets:
/// conjuncts of WHERE and of the inner joins above it, when no outer join can null it. Given
/// as the places that hold them, so that a rewrite can take them out.
pub(super) unsafe fn own_conditions(parse: *mut pg_sys::Query, rti: u32) -> Vec<*mut *mut pg_sys::Node> {
    let relid = list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable).get(rti as usize - 1).map_or(pg_sys::InvalidOid, |rte| (**rte).relid);
    conditions_met(parse, rti)
        .into_iter()
        .filter(|&slot| only_reads(*slot, rti) && shippable::shippable_over(*slot, shippable::Rules { whole_statement: false, row_identity: false }, relid))
        .collect()
}

/// The column of range table entry `rti` (a table to broadcast) by which its rows can be
/// routed to the one task that can use each: a condition every result row meets equates it
/// with the distribution column of a table of `rest` (which stays distributed, co-located with
/// the tasks' shards), with an equality that implies equal hash values (the type's own, or
/// between integer types; a deterministic collation). A row then joins only rows of the shard
/// group its value hashes to, and a row whose value is NULL joins none.
unsafe fn routing_column(parse: *mut pg_sys::Query, rti: u32, rest: &[&(u32, Rc<DistributedTable>)]) -> Option<i16> {
    use crate::routing::DistKind;
    for slot in conditions_met(parse, rti) {
        let node = *slot;
        if (*node).type_ != pg_sys::NodeTag::T_OpExpr {
            continue;
        }
        let op = node.cast::<pg_sys::OpExpr>();
        let args = list_pointers::<pg_sys::Node>((*op).args);
        if args.len() != 2 || args.iter().any(|&a| (*a).type_ != pg_sys::NodeTag::T_Var) {
            continue;
        }
        let (left, right) = (args[0].cast::<pg_sys::Var>(), args[1].cast::<pg_sys::Var>());
        for (mine, theirs) in [(left, right), (right, left)] {
            if (*mine).varlevelsup != 0 || (*theirs).varlevelsup != 0 || (*mine).varno as u32 != rti || (*mine).varattno <= 0 {
                continue;
            }
            let distributed = rest.iter().any(|(other, table)| {
                (*theirs).varno as u32 == *other && table.distribution_attnum == Some((*theirs).varattno)
            });
            if !distributed {
                continue;
            }
            let collation = (*op).inputcollid;
            if collation != pg_sys::InvalidOid && !pg_sys::get_collation_isdeterministic(collation) {
                continue;
            }
            let (mine_type, theirs_type) = ((*mine).vartype, (*theirs).vartype);
            let hashes_alike = match (DistKind::of_type(mine_type), DistKind::of_type(theirs_type)) {
                (Some(DistKind::Int2 | DistKind::Int4 | DistKind::Int8), Some(DistKind::Int2 | DistKind::Int4 | DistKind::Int8)) => {
                    pg_sys::get_op_opfamily_strategy((*op).opno, pg_sys::INTEGER_BTREE_FAM_OID) == pg_sys::BTEqualStrategyNumber as i32
                }
                (Some(_), Some(_)) if mine_type == theirs_type => {
                    let cache = pg_sys::lookup_type_cache(mine_type, pg_sys::TYPECACHE_EQ_OPR as i32);
                    !cache.is_null() && (*cache).eq_opr == (*op).opno
                }
                _ => false,
            };
            if hashes_alike {
                return Some((*mine).varattno);
            }
        }
    }
    None
}

/// Whether an expression reads columns of range table entry `rti` and nothing else of any
/// query level (no other table, no subquery).
unsafe fn only_reads(node: *mut pg_sys::Node, rti: u32) -> bool {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        let (rti, seen) = &mut *(context as *mut (u32, bool));
        match (*node).type_ {
            pg_sys::NodeTag::T_Var => {
                let var = node.cast::<pg_sys::Var>();
                if (*var).varlevelsup != 0 || (*var).varno as u32 != *rti || (*var).varattno <= 0 {
                    return true;
                }
                *seen = true;
                false
            }
            pg_sys::NodeTag::T_SubLink | pg_sys::NodeTag::T_Query | pg_sys::NodeTag::T_Aggref | pg_sys::NodeTag::T_WindowFunc | pg_sys::NodeTag::T_GroupingFunc => true,
            _ => pg_sys::expression_tree_walker(node, Some(walker), context),
        }
    }
    let mut context = (rti, false);
    !walker(node, (&mut context as *mut (u32, bool)).cast()) && context.1
}

/// Points every Var of an expression (all of one table, see `only_reads`) at entry `rti`.
pub(super) unsafe fn renumber_vars(node: *mut pg_sys::Node, rti: i32) {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        if (*node).type_ == pg_sys::NodeTag::T_Var {
            let var = node.cast::<pg_sys::Var>();
            let rti = *(context as *const i32);
            (*var).varno = rti;
            (*var).varnosyn = rti as u32;
            return false;
        }
        pg_sys::expression_tree_walker(node, Some(walker), context)
    }
    let mut rti = rti;
    walker(node, (&mut rti as *mut i32).cast());
}

thread_local! {
    static SIZES: RefCell<HashMap<u32, (u64, Instant)>> = RefCell::new(HashMap::new());
}

/// The size in bytes of a distributed table: its first shard's, read from the worker that
/// holds it (and kept a minute), times its shard count. `None` when the worker cannot say.
pub(super) fn table_bytes(table: &DistributedTable) -> Option<u64> {
    let key = table.relid.to_u32();
    if let Some(bytes) = SIZES.with(|s| s.borrow().get(&key).filter(|(_, at)| at.elapsed() < SIZE_TTL).map(|(bytes, _)| *bytes)) {
        return Some(bytes);
    }
    let shard = table.shards.first()?;
    let node_id = *shard.placements.first()?;
    let node = cache::nodes().ok()?.iter().find(|n| n.node_id == node_id)?.clone();
    let name = sharding_core::table_def::shard_object_name(&table.name, shard.shard_id);
    // Cannot fail for a missing table (it may run inside the node's transaction).
    let task = Task {
        node,
        sql: CString::from(
            c"SELECT coalesce(sum(pg_catalog.pg_relation_size(c.oid)), 0) FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
        ),
        params: None,
        run_as: 0,
    };
    let text = |value: &str| {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        TaskParam { type_oid: pg_sys::TEXTOID.to_u32(), value: Some(bytes), format: 0 }
    };
    let params = [text(&table.schema), text(&name)];
    let mut first = None;
    tasks::run(std::slice::from_ref(&task), &params, false, remote::Access::Autocommit, |row| {
        first = row.value(0).and_then(|v| std::str::from_utf8(v).ok()).and_then(|v| v.parse::<u64>().ok());
        Ok(())
    })
    .ok()?;
    let bytes = first?.saturating_mul(table.shards.len() as u64);
    SIZES.with(|s| s.borrow_mut().insert(key, (bytes, Instant::now())));
    Some(bytes)
}
