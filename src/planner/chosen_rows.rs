//! UPDATE and DELETE whose rows are chosen on the coordinator: the last resort for a statement
//! that cannot run per shard group, even with broadcast tables and intermediate results. Such
//! a statement reads other distributed tables in correlated subqueries (not co-located, or not
//! joined on distribution columns), reads tables that are only on the coordinator, calls
//! volatile functions per row, or reads the statement's WITH queries in a subquery.
//!
//! `UPDATE t SET a = <expr> FROM ... WHERE <condition> RETURNING <list>` runs in two steps:
//! 1. the coordinator runs `SELECT t.ctid, t.<distribution column>, t.xmin, <expr> FROM t, ...
//!    WHERE <condition>` with PostgreSQL's planner and executor over ShardScans (plan 4), so
//!    every condition, subquery and function means exactly what it means on one server,
//!    evaluated once per row;
//! 2. the shards of `t` that hold chosen rows run `UPDATE t SET a = r.c4 FROM unnest(($1)::tid[],
//!    ($2)::bigint[], ($3)::xid[], ...) r(c1, c2, c3, c4) WHERE t.ctid = r.c1 AND
//!    t.<distribution column> = r.c2 AND t.xmin = r.c3 RETURNING <list>`, each over its own
//!    rows of the first step (its intermediate result, see executor/remote_scan.rs). A
//!    distribution value lives in one shard only, and there the ctid and xmin name one row
//!    version.
//!
//! A row that another transaction changes or deletes between the two steps is no longer that
//! version: the shard skips it, and the statement fails with SQLSTATE 40001 (as PostgreSQL's
//! REPEATABLE READ does) rather than change fewer rows than it chose. Nothing is locked before
//! the second step, so the statement holds exactly the row locks PostgreSQL's would.
//!
//! RETURNING is evaluated on the shards over the changed rows; the columns it reads of the
//! other tables travel with the rows of the first step. A target row that the first step finds
//! several times (several join partners) is changed once, with the values of the first, as
//! PostgreSQL changes it once with those of one of them.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;

use crate::catalog::{cache, tables::Method};
use crate::commands::utility::list_pointers;
use crate::deparse::query::TransmissionSettings;
use crate::error::{Result, ShardingError};
use crate::executor::remote_scan::Broadcast;
use crate::planner::broadcast::{function_rte, sendable_type, unnest_parameter};
use crate::planner::scan_path::collect_params;

use std::sync::atomic::{AtomicBool, Ordering};

/// Set while the second step of such a plan is planned: it must not take this plan itself (a
/// volatile function in its RETURNING, say, is an error there), and it may read ctid and xmin.
static SECOND_STEP: AtomicBool = AtomicBool::new(false);
/// Set while a statement rewritten with broadcast tables or intermediate results is planned:
/// its array parameters exist only in its tasks, so the coordinator cannot run its first step.
static REWRITTEN: AtomicBool = AtomicBool::new(false);

/// Sets a flag while alive (and restores it after).
pub struct Planning(&'static AtomicBool, bool);

impl Planning {
    pub fn second_step() -> Self {
        Planning(&SECOND_STEP, SECOND_STEP.swap(true, Ordering::Relaxed))
    }

    pub fn rewritten() -> Self {
        Planning(&REWRITTEN, REWRITTEN.swap(true, Ordering::Relaxed))
    }

    /// Whether the statement being planned is the second step of this plan.
    pub fn in_second_step() -> bool {
        SECOND_STEP.load(Ordering::Relaxed)
    }

    /// Whether this plan may be taken for the statement being planned.
    pub fn allowed() -> bool {
        !SECOND_STEP.load(Ordering::Relaxed) && !REWRITTEN.load(Ordering::Relaxed)
    }
}

impl Drop for Planning {
    fn drop(&mut self) {
        self.0.store(self.1, Ordering::Relaxed);
    }
}

/// Alias of the rows of the first step in the statement sent to the shards.
const ROWS_ALIAS: &CStr = c"pgs_rows";

/// The statement run by the shards (a new Query) and its intermediate result, the rows the
/// coordinator chooses; `None` when the statement has a part this plan cannot carry (a
/// subquery or system column in RETURNING, values that cannot travel as arrays,
/// data-modifying WITH queries, row-level security).
pub unsafe fn for_modify(parse: *mut pg_sys::Query) -> Result<Option<(*mut pg_sys::Query, Vec<Broadcast>)>> {
    let update = (*parse).commandType == pg_sys::CmdType::CMD_UPDATE;
    let rti = (*parse).resultRelation;
    let rtes = list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable);
    let target_rte = rtes[rti as usize - 1];
    let Some(table) = cache::table((*target_rte).relid)? else { return Ok(None) };
    let Some(dist_attno) = table.distribution_attnum else { return Ok(None) };
    if table.method != Method::Hash || (*parse).hasModifyingCTE || !(*parse).withCheckOptions.is_null() || !(*parse).onConflict.is_null() {
        return Ok(None);
    }
    if current_of((*parse).jointree.cast()) {
        return Err(ShardingError::new(
            pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("WHERE CURRENT OF on distributed table \"{}\" is not supported", table.name),
        )
        .hint(format!("Filter on the row's key instead (the distribution column \"{}\" and a unique column).", table.distribution_column.clone().unwrap_or_default())));
    }

    // The first step's output columns: the row's ctid, distribution value and xmin (in the
    // order executor/remote_scan.rs reads them), the new values, and the other tables' columns
    // RETURNING reads.
    let mut columns: Vec<*mut pg_sys::Expr> = Vec::new();
    columns.push(pg_sys::makeVar(rti, pg_sys::SelfItemPointerAttributeNumber as i16, pg_sys::TIDOID, -1, pg_sys::InvalidOid, 0).cast());
    let (mut dist_type, mut dist_typmod, mut dist_collation) = (pg_sys::InvalidOid, -1, pg_sys::InvalidOid);
    pg_sys::get_atttypetypmodcoll((*target_rte).relid, dist_attno, &mut dist_type, &mut dist_typmod, &mut dist_collation);
    columns.push(pg_sys::makeVar(rti, dist_attno, dist_type, dist_typmod, dist_collation, 0).cast());
    columns.push(pg_sys::makeVar(rti, pg_sys::MinTransactionIdAttributeNumber as i16, pg_sys::XIDOID, -1, pg_sys::InvalidOid, 0).cast());
    let mut assignments = Vec::new();
    // The subqueries of `SET (a, b) = (SELECT ...)` (junk entries; the assignments read their
    // columns as parameters): the first step evaluates them before its columns.
    let mut multiple = Vec::new();
    if update {
        for entry in list_pointers::<pg_sys::TargetEntry>((*parse).targetList) {
            if (*entry).resjunk {
                multiple.push(pg_sys::copyObjectImpl((*entry).expr.cast()).cast::<pg_sys::Expr>());
                continue;
            }
            assignments.push((entry, columns.len()));
            columns.push(pg_sys::copyObjectImpl((*entry).expr.cast()).cast());
        }
    }
    let returning: *mut pg_sys::List = pg_sys::copyObjectImpl((*parse).returningList.cast()).cast();
    let mut carried = Carried { target: rti, first_column: columns.len(), vars: Vec::new(), failed: false };
    carried.renumber(returning.cast());
    if carried.failed {
        return Ok(None);
    }
    columns.extend(carried.vars.iter().map(|&var| var.cast::<pg_sys::Expr>()));
    if !columns.iter().all(|&expr| sendable_type(pg_sys::exprType(expr.cast()))) {
        return Ok(None);
    }

    // The first step: the statement as a SELECT of those columns.
    let select: *mut pg_sys::Query = pg_sys::copyObjectImpl(parse.cast()).cast();
    (*select).commandType = pg_sys::CmdType::CMD_SELECT;
    (*select).resultRelation = 0;
    (*select).returningList = std::ptr::null_mut();
    // The target is in FROM now (as it is to the planner already): EXPLAIN prints it there.
    (*list_pointers::<pg_sys::RangeTblEntry>((*select).rtable)[rti as usize - 1]).inFromCl = true;
    // A projection computes its entries in order, and the executor leaves junk entries out of
    // the rows it returns: the multiple-column subqueries go first.
    let mut target: *mut pg_sys::List = std::ptr::null_mut();
    for (i, &expr) in multiple.iter().enumerate() {
        target = pg_sys::lappend(target, pg_sys::makeTargetEntry(expr, (i + 1) as i16, std::ptr::null_mut(), true).cast());
    }
    for (i, &expr) in columns.iter().enumerate() {
        let name = column_name(i)?;
        let resno = (multiple.len() + i + 1) as i16;
        target = pg_sys::lappend(target, pg_sys::makeTargetEntry(expr, resno, pg_sys::pstrdup(name.as_ptr()), false).cast());
    }
    (*select).targetList = target;

    // The second step: the target joined to the rows by ctid, distribution value and xmin.
    let mut params = Vec::new();
    collect_params(parse.cast(), &mut params);
    let first_param = params.iter().copied().max().unwrap_or(0) + 1;
    let types: Vec<_> = columns
        .iter()
        .map(|&expr| (pg_sys::exprType(expr.cast()), pg_sys::exprTypmod(expr.cast()), pg_sys::exprCollation(expr.cast())))
        .collect();
    let rows = Rows::new(&types, first_param)?;
    let tid_equal = equality(pg_sys::Oid::from(pg_sys::TIDEqualOperator), pg_sys::makeVar(1, pg_sys::SelfItemPointerAttributeNumber as i16, pg_sys::TIDOID, -1, pg_sys::InvalidOid, 0), rows.var(0), pg_sys::InvalidOid);
    let Some(dist_equal) = type_equality(pg_sys::makeVar(1, dist_attno, dist_type, dist_typmod, dist_collation, 0), rows.var(1)) else { return Ok(None) };
    let xmin = pg_sys::makeVar(1, pg_sys::MinTransactionIdAttributeNumber as i16, pg_sys::XIDOID, -1, pg_sys::InvalidOid, 0);
    let Some(xmin_equal) = type_equality(xmin, rows.var(2)) else { return Ok(None) };
    let assignments: Vec<(i16, *mut std::ffi::c_char, usize)> = assignments.into_iter().map(|(entry, column)| ((*entry).resno, (*entry).resname, column)).collect();
    let modify = rows.statement(parse, target_rte, vec![tid_equal, dist_equal, xmin_equal], &assignments, returning);

    let text = super::aggregates::store_query(select)?;
    let sql = {
        let _settings = TransmissionSettings::enter();
        let copy: *mut pg_sys::Query = pg_sys::copyObjectImpl(select.cast()).cast();
        CStr::from_ptr(pg_sys::pg_get_querydef(copy, false)).to_string_lossy().into_owned()
    };
    let rows = Broadcast { table: sql, first_param, columns: columns.len(), query: Some(text), target_rows: rti as u32, ..Default::default() };
    Ok(Some((modify, vec![rows])))
}

/// Whether an expression has `CURRENT OF cursor` (which names a row of the coordinator's
/// table, which has none).
unsafe fn current_of(node: *mut pg_sys::Node) -> bool {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        (*node).type_ == pg_sys::NodeTag::T_CurrentOfExpr || pg_sys::expression_tree_walker(node, Some(walker), context)
    }
    walker(node, std::ptr::null_mut())
}

fn column_name(index: usize) -> Result<CString> {
    CString::new(format!("c{}", index + 1)).map_err(|e| ShardingError::internal(e.to_string()))
}

unsafe fn equality(operator: pg_sys::Oid, left: *mut pg_sys::Var, right: *mut pg_sys::Var, collation: pg_sys::Oid) -> *mut pg_sys::Expr {
    let clause = pg_sys::make_opclause(operator, pg_sys::BOOLOID, false, left.cast(), right.cast(), pg_sys::InvalidOid, collation);
    pg_sys::set_opfuncid(clause.cast());
    clause
}

/// `left = right` with the default equality of their type, under the left side's collation;
/// `None` for a type without one.
pub(super) unsafe fn type_equality(left: *mut pg_sys::Var, right: *mut pg_sys::Var) -> Option<*mut pg_sys::Expr> {
    let type_cache = pg_sys::lookup_type_cache((*left).vartype, pg_sys::TYPECACHE_EQ_OPR as i32);
    if type_cache.is_null() || (*type_cache).eq_opr == pg_sys::InvalidOid {
        return None;
    }
    Some(equality((*type_cache).eq_opr, left, right, (*left).varcollid))
}

/// The rows of an intermediate result in a statement that changes them: `unnest(($first)::t1[],
/// ($first + 1)::t2[], ...) pgs_rows(c1, c2, ...)`, entry 2 of the statement's range table.
pub(super) struct Rows {
    rte: *mut pg_sys::RangeTblEntry,
    vars: Vec<*mut pg_sys::Var>,
}

impl Rows {
    /// `columns`: the type, typmod and collation of each column.
    pub(super) unsafe fn new(columns: &[(pg_sys::Oid, i32, pg_sys::Oid)], first_param: i32) -> Result<Self> {
        let mut functions: *mut pg_sys::List = std::ptr::null_mut();
        let mut colnames: *mut pg_sys::List = std::ptr::null_mut();
        let mut vars = Vec::new();
        for (i, &(type_oid, typmod, collation)) in columns.iter().enumerate() {
            functions = pg_sys::lappend(functions, unnest_parameter(type_oid, collation, first_param + i as i32).cast());
            colnames = pg_sys::lappend(colnames, pg_sys::makeString(pg_sys::pstrdup(column_name(i)?.as_ptr())).cast());
            vars.push(pg_sys::makeVar(2, (i + 1) as i16, type_oid, typmod, collation, 0));
        }
        Ok(Rows { rte: function_rte(functions, colnames, pg_sys::pstrdup(ROWS_ALIAS.as_ptr())), vars })
    }

    /// A new reference to column `index` (from 0).
    pub(super) unsafe fn var(&self, index: usize) -> *mut pg_sys::Var {
        pg_sys::copyObjectImpl(self.vars[index].cast()).cast()
    }

    /// `UPDATE <target> SET <column> = pgs_rows.c<n>, ... FROM <rows> WHERE <conditions>
    /// RETURNING <returning>`, or `DELETE FROM <target> USING <rows> ...`, as `parse` is an
    /// UPDATE or a DELETE of `target` (which becomes entry 1). `assignments`: (attribute
    /// number, column name, index of the column of the rows holding its new value).
    pub(super) unsafe fn statement(
        &self,
        parse: *mut pg_sys::Query,
        target: *mut pg_sys::RangeTblEntry,
        conditions: Vec<*mut pg_sys::Expr>,
        assignments: &[(i16, *mut std::ffi::c_char, usize)],
        returning: *mut pg_sys::List,
    ) -> *mut pg_sys::Query {
        let modify: *mut pg_sys::Query = pg_sys::palloc0(std::mem::size_of::<pg_sys::Query>()).cast();
        (*modify).type_ = pg_sys::NodeTag::T_Query;
        (*modify).commandType = (*parse).commandType;
        (*modify).querySource = pg_sys::QuerySource::QSRC_ORIGINAL;
        (*modify).canSetTag = (*parse).canSetTag;
        (*modify).resultRelation = 1;
        let target: *mut pg_sys::RangeTblEntry = pg_sys::copyObjectImpl(target.cast()).cast();
        (*modify).rtable = pg_sys::lappend(pg_sys::lappend(std::ptr::null_mut(), target.cast()), self.rte.cast());
        let mut from: *mut pg_sys::List = std::ptr::null_mut();
        for rtindex in 1..=2 {
            let reference: *mut pg_sys::RangeTblRef = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblRef>()).cast();
            (*reference).type_ = pg_sys::NodeTag::T_RangeTblRef;
            (*reference).rtindex = rtindex;
            from = pg_sys::lappend(from, reference.cast());
        }
        let mut conjuncts: *mut pg_sys::List = std::ptr::null_mut();
        for condition in conditions {
            conjuncts = pg_sys::lappend(conjuncts, condition.cast());
        }
        (*modify).jointree = pg_sys::makeFromExpr(from, pg_sys::make_ands_explicit(conjuncts).cast());
        let mut assigned: *mut pg_sys::List = std::ptr::null_mut();
        for &(attno, name, column) in assignments {
            let name = if name.is_null() { std::ptr::null_mut() } else { pg_sys::pstrdup(name) };
            assigned = pg_sys::lappend(assigned, pg_sys::makeTargetEntry(self.var(column).cast(), attno, name, false).cast());
        }
        (*modify).targetList = assigned;
        (*modify).returningList = returning;
        modify
    }
}

/// RETURNING, moved onto the second step's range table: the target becomes entry 1, and each
/// column of another table (or join) it reads becomes a column of the rows (entry 2), which
/// the first step outputs. Fails on what cannot move that way: subqueries, system columns,
/// whole-row references to other tables.
struct Carried {
    target: i32,
    first_column: usize,
    /// The other tables' columns, as the first step reads them.
    vars: Vec<*mut pg_sys::Var>,
    failed: bool,
}

impl Carried {
    unsafe fn renumber(&mut self, node: *mut pg_sys::Node) {
        #[pgrx::pg_guard]
        unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
            if node.is_null() {
                return false;
            }
            let cx = &mut *(context as *mut Carried);
            match (*node).type_ {
                pg_sys::NodeTag::T_Var => {
                    let var = node.cast::<pg_sys::Var>();
                    if (*var).varlevelsup != 0 || ((*var).varno == cx.target && (*var).varattno < 0) {
                        // A system column of the target would be the shard's.
                        cx.failed = true;
                    } else if (*var).varno == cx.target {
                        (*var).varno = 1;
                        (*var).varnosyn = 1;
                    } else if (*var).varattno <= 0 {
                        cx.failed = true;
                    } else {
                        let found = cx.vars.iter().position(|&v| (*v).varno == (*var).varno && (*v).varattno == (*var).varattno);
                        let index = found.unwrap_or_else(|| {
                            cx.vars.push(pg_sys::copyObjectImpl(var.cast()).cast());
                            cx.vars.len() - 1
                        });
                        let column = (cx.first_column + index + 1) as i16;
                        (*var).varno = 2;
                        (*var).varattno = column;
                        (*var).varnosyn = 2;
                        (*var).varattnosyn = column;
                    }
                    cx.failed
                }
                pg_sys::NodeTag::T_SubLink | pg_sys::NodeTag::T_Query => {
                    cx.failed = true;
                    true
                }
                _ => pg_sys::expression_tree_walker(node, Some(walker), context),
            }
        }
        walker(node, (self as *mut Carried).cast());
    }
}
