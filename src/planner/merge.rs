//! MERGE into a distributed table: its source runs first, here, as an intermediate result,
//! and each source row goes to the one shard whose rows it can match; each shard then runs
//! the MERGE over its own source rows (`MERGE INTO shard USING (rows) ON ...`).
//!
//! That is exact when the ON condition equates the target's distribution column with a
//! column of the source (with an equality that implies equal hash values): a source row can
//! then match only rows of the shard its value hashes to, so it is matched there exactly
//! when it is matched on one server, and WHEN NOT MATCHED ... INSERT must insert that very
//! column into the distribution column, so that the new row lands in the same shard. A row
//! whose value is NULL matches nothing; it goes nowhere, unless the statement may insert it,
//! which fails as an INSERT of NULL into the distribution column does.
//!
//! The shards print the statement without the source's own text: it is their rows, as array
//! parameters (planner/broadcast.rs, `unnest_parameter`), in a subquery named `pgs_source`
//! (deparse/merge.rs).

use std::ffi::{CStr, CString};
use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog::tables::DistributedTable;
use crate::commands::utility::list_pointers;
use crate::deparse::merge::{deparse_merge, source_index};
use crate::deparse::query::TransmissionSettings;
use crate::error::{Result, ShardingError};
use crate::executor::remote_scan::{add_broadcasts, Broadcast, ShardScanPlan};
use crate::planner::broadcast::{function_rte, select_from, sendable_type, unnest_nothing, unnest_parameter};
use crate::planner::pins::{equality_sides, hashes_like, strip_relabel};
use crate::planner::scan_path::collect_params;
use crate::planner::shippable;

fn unsupported(table: &DistributedTable, what: &str) -> ShardingError {
    ShardingError::new(PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, format!("MERGE into distributed table \"{}\" {what}", table.name))
}

/// The plan of a MERGE into distributed table `table`, or an error naming what it cannot run.
pub unsafe fn plan(parse: *mut pg_sys::Query, table: &Rc<DistributedTable>) -> Result<*mut pg_sys::PlannedStmt> {
    let attno = table.distribution_attnum.ok_or_else(|| ShardingError::internal("a hash-distributed table without distribution column"))?;
    let column = table.distribution_column.clone().unwrap_or_default();
    if (*parse).hasModifyingCTE {
        return Err(unsupported(table, "with data-modifying WITH queries is not supported"));
    }
    if pg_sys::check_enable_rls(table.relid, pg_sys::InvalidOid, true) == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32 {
        return Err(unsupported(table, "under row-level security is not supported yet"));
    }
    let target = (*parse).resultRelation as u32;
    let rtes = list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable);
    let Some(source) = source_index(parse).filter(|&s| s >= 1 && s <= rtes.len()).map(|s| s as u32) else {
        return Err(unsupported(table, "with a join as its source is not supported")
            .hint("Put the join in a subquery: USING (SELECT ... FROM a JOIN b ON ...) s."));
    };
    if (*parse).hasSubLinks {
        return Err(unsupported(table, "with subqueries in its ON condition or WHEN clauses is not supported")
            .hint("Join what the subqueries read into the source: USING (SELECT ... ) s."));
    }
    // now(), current_setting() and the like: computed here, once (hoist.rs), as parameters
    // after those of the source's columns.
    let width = list_pointers::<pg_sys::String>((*(*rtes[source as usize - 1]).eref).colnames).len();
    let mut user_params = Vec::new();
    collect_params(parse.cast(), &mut user_params);
    let first_param = user_params.iter().copied().max().unwrap_or(0) + 1;
    // The source's columns the statement reads, by number, with their types.
    let columns = source_columns(parse, source).ok_or_else(|| unsupported(table, "reading whole rows or system columns of its source is not supported"))?;
    // The source column the distribution column is equated with routes the source rows.
    let key = route_key((*(*parse).jointree).quals, target, attno, source, table).ok_or_else(|| {
        unsupported(table, "needs an ON condition that equates its distribution column with a column of the source")
            .detail(format!("Each source row must be matched by the shard of its value of \"{column}\"."))
            .hint(format!("Add ON target.{} = source.column, with columns of the same type.", crate::deparse::quote::ident(&column)))
    })?;
    // A co-located table joined on its distribution column is read where it is.
    // (Not a source under row-level security: its policies, conditions of its range table
    // entry, are applied by the coordinator's planner reading it.)
    let secured = !(*rtes[source as usize - 1]).securityQuals.is_null();
    let in_place = !secured && colocated_source(rtes[source as usize - 1], key.0, table)?;
    let (shipped, hoisted) = super::hoist::hoist(parse, first_param + if in_place { 0 } else { columns.len() as i32 });
    let actions = list_pointers::<pg_sys::MergeAction>((*shipped).mergeActionList);
    let quals = (*(*shipped).jointree).quals;
    let rules = shippable::Rules { whole_statement: true, row_identity: false };
    if !shippable::shippable(quals, rules) || !shippable::shippable((*shipped).mergeActionList.cast(), rules) {
        return Err(unsupported(table, "with an expression only the coordinator can compute in its ON condition or WHEN clauses is not supported")
            .detail("For example random(), nextval() (a serial column's default too), and user-defined or extension functions and operators, which the workers may not have."));
    }

    let mut inserts = false;
    for &action in &actions {
        let entries = list_pointers::<pg_sys::TargetEntry>((*action).targetList);
        if entries.iter().any(|&e| assigns_part((*e).expr.cast())) {
            return Err(unsupported(table, "setting array elements or fields of composite columns is not supported")
                .hint("Set the whole column: SET col = ... ."));
        }
        let entry = entries.iter().find(|e| (***e).resno == attno && !(***e).resjunk);
        match (*action).commandType {
            pg_sys::CmdType::CMD_UPDATE if entry.is_some() => {
                return Err(ShardingError::new(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    format!("cannot change the distribution column \"{column}\" of \"{}\"", table.name),
                )
                .detail("The row would have to move to another shard.")
                .hint("DELETE the row and INSERT it with the new value."));
            }
            pg_sys::CmdType::CMD_INSERT => {
                inserts = true;
                if !entry.is_some_and(|e| is_source_column((**e).expr.cast(), source, key.0)) {
                    let type_name = CStr::from_ptr(pg_sys::format_type_with_typemod(table.distribution_type, distribution_typmod(table)))
                        .to_string_lossy()
                        .into_owned();
                    return Err(unsupported(table, &format!("must insert the source column it matches on into the distribution column \"{column}\""))
                        .detail("Otherwise the new row could belong to another shard than the source row that made it; a conversion (a length limit) may change the value.")
                        .hint(format!("Insert that column as it is, and give it the type of \"{column}\" in the source: USING (SELECT x::{type_name} AS {}, ...) s.", crate::deparse::quote::ident(&column))));
                }
            }
            _ => {}
        }
    }

    let mut exprs = Vec::new();
    let mut hoisted_params = Vec::new();
    for (id, expr) in hoisted {
        hoisted_params.push((id, exprs.len()));
        exprs.push(expr);
    }
    if in_place {
        // Each shard group runs the statement over its own rows of both tables.
        let deparsed = deparse_merge(shipped, true)?;
        let mut plan = shard_plan(&deparsed, shipped, table);
        plan.hoisted = hoisted_params;
        return super::router::planned_statement(parse, &plan, exprs, &[], std::ptr::null_mut());
    }
    if let Some(&(_, type_oid, _, _)) = columns.iter().find(|c| !sendable_type(c.1)) {
        let name = CStr::from_ptr(pg_sys::format_type_be(type_oid)).to_string_lossy().into_owned();
        return Err(unsupported(table, &format!("cannot send source values of type {name} to the shards"))
            .hint("Arrays, composite types and money do not travel as intermediate results yet."));
    }
    let route_column = columns.iter().position(|c| c.0 == key.0).ok_or_else(|| ShardingError::internal("the MERGE key is not read"))?;

    // The intermediate result: SELECT <those columns> FROM <source>.
    let source_rte: *mut pg_sys::RangeTblEntry = pg_sys::copyObjectImpl(rtes[source as usize - 1].cast()).cast();
    // Its row-level security conditions name it by its place in the MERGE: it is the first
    // and only entry of the reader.
    if !(*source_rte).securityQuals.is_null() {
        super::scan_path::ChangeVarNodes((*source_rte).securityQuals.cast(), source as i32, 1, 0);
    }
    let mut target_list: *mut pg_sys::List = std::ptr::null_mut();
    for (i, &(attno, type_oid, typmod, collation)) in columns.iter().enumerate() {
        let var = pg_sys::makeVar(1, attno, type_oid, typmod, collation, 0);
        let name = column_label(i)?;
        target_list = pg_sys::lappend(target_list, pg_sys::makeTargetEntry(var.cast(), (i + 1) as i16, pg_sys::pstrdup(name.as_ptr()), false).cast());
    }
    if inserts {
        // A row whose key is NULL matches nothing: the first WHEN NOT MATCHED clause whose
        // condition it meets decides, here, whether it would be inserted (and fail).
        let (key_attno, key_type) = (columns[route_column].0, columns[route_column].1);
        let check = null_key_inserts(parse, key_attno, key_type, columns[route_column].2, columns[route_column].3);
        let name = column_label(columns.len())?;
        target_list = pg_sys::lappend(target_list, pg_sys::makeTargetEntry(check.cast(), (columns.len() + 1) as i16, pg_sys::pstrdup(name.as_ptr()), false).cast());
    }
    let reader = select_from(source_rte, std::ptr::null_mut(), target_list);
    (*reader).cteList = pg_sys::copyObjectImpl((*parse).cteList.cast()).cast();

    // The statement for the shards: the source replaced by its rows.
    let rewritten: *mut pg_sys::Query = pg_sys::copyObjectImpl(shipped.cast()).cast();
    replace_source(rewritten, source, width, &columns, first_param)?;
    let deparsed = deparse_merge(rewritten, false)?;
    let mut plan = shard_plan(&deparsed, rewritten, table);
    plan.hoisted = hoisted_params;

    let shown = {
        let _settings = TransmissionSettings::enter();
        let copy: *mut pg_sys::Query = pg_sys::copyObjectImpl(reader.cast()).cast();
        CStr::from_ptr(pg_sys::pg_get_querydef(copy, false)).to_string_lossy().into_owned()
    };
    let broadcast = Broadcast {
        table: shown,
        first_param,
        columns: columns.len(),
        query: Some(super::aggregates::store_query(reader)?),
        route_column: Some(route_column),
        route_type: key.1.to_u32(),
        null_key_fails: inserts,
        ..Default::default()
    };
    let planned = super::router::planned_statement(parse, &plan, exprs, &[], std::ptr::null_mut())?;
    add_broadcasts((*planned).planTree, vec![broadcast])?;
    Ok(planned)
}

/// The tasks' plan of a MERGE printed for the shards (`query`: the statement printed).
unsafe fn shard_plan(deparsed: &crate::deparse::query::DeparsedQuery, query: *mut pg_sys::Query, table: &DistributedTable) -> ShardScanPlan {
    let mut plan = ShardScanPlan::from_deparsed(deparsed, table.relid);
    let mut params_used = Vec::new();
    collect_params(query.cast(), &mut params_used);
    plan.max_param = params_used.iter().copied().max().unwrap_or(0);
    plan.params_used = params_used;
    plan.modify = true;
    plan.binary = true;
    plan
}

/// Whether the source is a table co-located with the target whose distribution column is the
/// routing column `key`: its rows are then already on the shard of their key, and each shard
/// group can run the MERGE as it is (unless row-level security applies to it: its policies
/// are not printed).
unsafe fn colocated_source(rte: *mut pg_sys::RangeTblEntry, key: i16, target: &DistributedTable) -> Result<bool> {
    if (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION || !(*rte).tablesample.is_null() {
        return Ok(false);
    }
    let Some(source) = crate::catalog::cache::table((*rte).relid)? else { return Ok(false) };
    Ok(source.method == crate::catalog::tables::Method::Hash
        && source.colocation_id.is_some()
        && source.colocation_id == target.colocation_id
        && source.distribution_attnum == Some(key)
        && pg_sys::check_enable_rls(source.relid, pg_sys::InvalidOid, true) != pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32)
}

/// The source column (number, type) that a conjunct of the ON condition equates with the
/// target's distribution column.
unsafe fn route_key(quals: *mut pg_sys::Node, target: u32, attno: i16, source: u32, table: &DistributedTable) -> Option<(i16, pg_sys::Oid)> {
    let conjuncts = list_pointers::<pg_sys::Node>(pg_sys::make_ands_implicit(quals.cast()));
    for conjunct in conjuncts {
        let Some((left, right)) = equality_sides(conjunct) else { continue };
        for (mine, theirs) in [(left, right), (right, left)] {
            if (*mine).type_ != pg_sys::NodeTag::T_Var || (*theirs).type_ != pg_sys::NodeTag::T_Var {
                continue;
            }
            let (mine, theirs) = (mine.cast::<pg_sys::Var>(), theirs.cast::<pg_sys::Var>());
            if (*mine).varlevelsup == 0
                && (*theirs).varlevelsup == 0
                && (*mine).varno as u32 == target
                && (*mine).varattno == attno
                && (*theirs).varno as u32 == source
                && (*theirs).varattno > 0
                && hashes_like(table, (*theirs).vartype)
            {
                return Some(((*theirs).varattno, (*theirs).vartype));
            }
        }
    }
    None
}

/// `CASE WHEN key IS NULL THEN CASE WHEN <condition of the first WHEN NOT MATCHED clause>
/// THEN <it inserts> WHEN ... ELSE false END ELSE false END`, over the source as range table
/// entry 1: whether a source row whose key is NULL would be inserted. (Conditions of WHEN NOT
/// MATCHED clauses read only the source, and one server evaluates them for such a row.)
unsafe fn null_key_inserts(parse: *mut pg_sys::Query, key: i16, key_type: pg_sys::Oid, typmod: i32, collation: pg_sys::Oid) -> *mut pg_sys::Node {
    unsafe fn case(whens: *mut pg_sys::List) -> *mut pg_sys::Node {
        let case: *mut pg_sys::CaseExpr = pg_sys::palloc0(std::mem::size_of::<pg_sys::CaseExpr>()).cast();
        (*case).xpr.type_ = pg_sys::NodeTag::T_CaseExpr;
        (*case).casetype = pg_sys::BOOLOID;
        (*case).args = whens;
        (*case).defresult = pg_sys::makeBoolConst(false, false).cast();
        (*case).location = -1;
        case.cast()
    }
    unsafe fn when(condition: *mut pg_sys::Node, result: *mut pg_sys::Node) -> *mut pg_sys::Node {
        let when: *mut pg_sys::CaseWhen = pg_sys::palloc0(std::mem::size_of::<pg_sys::CaseWhen>()).cast();
        (*when).xpr.type_ = pg_sys::NodeTag::T_CaseWhen;
        (*when).expr = condition.cast();
        (*when).result = result.cast();
        (*when).location = -1;
        when.cast()
    }
    let mut inner: *mut pg_sys::List = std::ptr::null_mut();
    for action in list_pointers::<pg_sys::MergeAction>((*parse).mergeActionList) {
        if (*action).matched {
            continue;
        }
        let condition: *mut pg_sys::Node = if (*action).qual.is_null() {
            pg_sys::makeBoolConst(true, false).cast()
        } else {
            let copy: *mut pg_sys::Node = pg_sys::copyObjectImpl((*action).qual.cast()).cast();
            super::broadcast::renumber_vars(copy, 1);
            copy
        };
        let inserts = (*action).commandType == pg_sys::CmdType::CMD_INSERT;
        inner = pg_sys::lappend(inner, when(condition, pg_sys::makeBoolConst(inserts, false).cast()).cast());
    }
    let test: *mut pg_sys::NullTest = pg_sys::palloc0(std::mem::size_of::<pg_sys::NullTest>()).cast();
    (*test).xpr.type_ = pg_sys::NodeTag::T_NullTest;
    (*test).arg = pg_sys::makeVar(1, key, key_type, typmod, collation, 0).cast();
    (*test).nulltesttype = pg_sys::NullTestType::IS_NULL;
    (*test).location = -1;
    case(pg_sys::lappend(std::ptr::null_mut(), when(test.cast(), case(inner)).cast()))
}

/// Whether an action's new value assigns part of a column (`SET a[1] = ...`, `SET c.f = ...`).
unsafe fn assigns_part(expr: *mut pg_sys::Node) -> bool {
    let node = strip_relabel(expr);
    if node.is_null() {
        return false;
    }
    match (*node).type_ {
        pg_sys::NodeTag::T_SubscriptingRef => !(*node.cast::<pg_sys::SubscriptingRef>()).refassgnexpr.is_null(),
        pg_sys::NodeTag::T_FieldStore => true,
        pg_sys::NodeTag::T_CoerceToDomain => assigns_part((*node.cast::<pg_sys::CoerceToDomain>()).arg.cast()),
        _ => false,
    }
}

/// The typmod of a table's distribution column.
unsafe fn distribution_typmod(table: &DistributedTable) -> i32 {
    let (mut type_oid, mut typmod, mut collation) = (pg_sys::InvalidOid, -1, pg_sys::InvalidOid);
    pg_sys::get_atttypetypmodcoll(table.relid, table.distribution_attnum.unwrap_or(0), &mut type_oid, &mut typmod, &mut collation);
    typmod
}

/// Whether `expr` is column `attno` of the source, perhaps cast between integer types or
/// relabeled (the value, and so its hash, stays the same).
unsafe fn is_source_column(expr: *mut pg_sys::Node, source: u32, attno: i16) -> bool {
    let mut node = strip_relabel(expr);
    if !node.is_null() && (*node).type_ == pg_sys::NodeTag::T_FuncExpr {
        let call = node.cast::<pg_sys::FuncExpr>();
        let args = list_pointers::<pg_sys::Node>((*call).args);
        let integers = [pg_sys::INT2OID, pg_sys::INT4OID, pg_sys::INT8OID];
        if (*call).funcformat == pg_sys::CoercionForm::COERCE_IMPLICIT_CAST
            && args.len() == 1
            && integers.contains(&(*call).funcresulttype)
            && integers.contains(&pg_sys::exprType(args[0]))
        {
            node = strip_relabel(args[0]);
        }
    }
    if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_Var {
        return false;
    }
    let var = node.cast::<pg_sys::Var>();
    (*var).varlevelsup == 0 && (*var).varno as u32 == source && (*var).varattno == attno
}

/// The columns of range table entry `source` that the ON condition and the actions read:
/// (number, type, typmod, collation), by number; `None` when they read a whole row or a
/// system column.
unsafe fn source_columns(parse: *mut pg_sys::Query, source: u32) -> Option<Vec<(i16, pg_sys::Oid, i32, pg_sys::Oid)>> {
    struct Context {
        source: u32,
        columns: Vec<(i16, pg_sys::Oid, i32, pg_sys::Oid)>,
        whole: bool,
    }
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        let cx = &mut *(context as *mut Context);
        if (*node).type_ == pg_sys::NodeTag::T_Var {
            let var = node.cast::<pg_sys::Var>();
            if (*var).varlevelsup == 0 && (*var).varno as u32 == cx.source {
                if (*var).varattno <= 0 {
                    cx.whole = true;
                    return true;
                }
                if !cx.columns.iter().any(|c| c.0 == (*var).varattno) {
                    cx.columns.push(((*var).varattno, (*var).vartype, (*var).vartypmod, (*var).varcollid));
                }
            }
            return false;
        }
        pg_sys::expression_tree_walker(node, Some(walker), context)
    }
    let mut context = Context { source, columns: Vec::new(), whole: false };
    let pointer: *mut std::ffi::c_void = (&mut context as *mut Context).cast();
    walker((*(*parse).jointree).quals, pointer);
    for action in list_pointers::<pg_sys::MergeAction>((*parse).mergeActionList) {
        walker((*action).qual, pointer);
        walker((*action).targetList.cast(), pointer);
    }
    if context.whole {
        return None;
    }
    context.columns.sort_unstable_by_key(|c| c.0);
    Some(context.columns)
}

fn column_label(i: usize) -> Result<CString> {
    CString::new(format!("c{}", i + 1)).map_err(|e| ShardingError::internal(e.to_string()))
}

/// Replaces range table entry `source` (of `width` columns) by a subquery over array
/// parameters `$first_param...`, one per column read (NULLs for the others, so that every
/// column keeps its number), its columns named c1, c2, ...
unsafe fn replace_source(query: *mut pg_sys::Query, source: u32, width: usize, columns: &[(i16, pg_sys::Oid, i32, pg_sys::Oid)], first_param: i32) -> Result<()> {
    let mut functions: *mut pg_sys::List = std::ptr::null_mut();
    let mut colnames: *mut pg_sys::List = std::ptr::null_mut();
    let mut target: *mut pg_sys::List = std::ptr::null_mut();
    for i in 0..width {
        let attno = (i + 1) as i16;
        let (function, type_oid, typmod, collation) = match columns.iter().position(|c| c.0 == attno) {
            Some(position) => {
                let (_, type_oid, typmod, collation) = columns[position];
                (unnest_parameter(type_oid, collation, first_param + position as i32), type_oid, typmod, collation)
            }
            None => (unnest_nothing(), pg_sys::INT4OID, -1, pg_sys::InvalidOid),
        };
        functions = pg_sys::lappend(functions, function.cast());
        let name = column_label(i)?;
        colnames = pg_sys::lappend(colnames, pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())).cast());
        // unnest() gives the element type without typmod: the subquery's column is the same.
        let var = pg_sys::makeVar(1, attno, type_oid, if typmod >= 0 { -1 } else { typmod }, collation, 0);
        target = pg_sys::lappend(target, pg_sys::makeTargetEntry(var.cast(), attno, pg_sys::pstrdup(name.as_ptr()), false).cast());
    }
    let rows = function_rte(functions, colnames, pg_sys::pstrdup(c"pgs_rows".as_ptr()));
    let subquery = select_from(rows, std::ptr::null_mut(), target);
    let rte: *mut pg_sys::RangeTblEntry = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblEntry>()).cast();
    (*rte).type_ = pg_sys::NodeTag::T_RangeTblEntry;
    (*rte).rtekind = pg_sys::RTEKind::RTE_SUBQUERY;
    (*rte).subquery = subquery;
    (*rte).inFromCl = true;
    let alias = CString::new(crate::deparse::merge::SOURCE_ALIAS).map_err(|e| ShardingError::internal(e.to_string()))?;
    (*rte).eref = pg_sys::makeAlias(pg_sys::pstrdup(alias.as_ptr()), colnames);
    let cell = (*(*query).rtable).elements.add(source as usize - 1);
    (*cell).ptr_value = rte.cast();
    Ok(())
}
