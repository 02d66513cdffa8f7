//! Aggregation over many shards, done in two steps: each shard group computes partial
//! aggregates per group (`count`, `sum`, `min`, `max`, `avg` as sum and count, `bool_and/or`),
//! and the coordinator combines them, then applies HAVING, ORDER BY and LIMIT.
//!
//! The statement is split into two parse trees. The worker query is the original one with its
//! select list replaced by the grouping keys and the partial aggregates (deparsed per shard
//! group like any task). The coordinator query reads the tasks' rows from a function RTE
//! (`sharding.task_results`, never executed: the scan hook turns it into a ShardScan) and
//! carries the original select list, HAVING and ORDER BY with each aggregate replaced by its
//! combination and each grouping key by the column that holds it. PostgreSQL's planner plans
//! the coordinator query. Shapes outside this (DISTINCT aggregates, ordered-set aggregates,
//! window functions, grouping sets, sublinks, ...) are left to the general plan, which gives
//! the same answer by aggregating on the coordinator.

use std::ffi::CString;

use pgrx::pg_sys;

use crate::commands::utility::list_pointers;
use crate::deparse::query::deparse_query;
use crate::error::{Result, ShardingError};
use crate::executor::remote_scan::ShardScanPlan;
use crate::planner::scan_path::collect_params;

/// The marker function of the coordinator query's RTE.
pub unsafe fn task_results_function() -> pg_sys::Oid {
    let mut names: *mut pg_sys::List = std::ptr::null_mut();
    names = pg_sys::lappend(names, pg_sys::makeString(pg_sys::pstrdup(c"sharding".as_ptr())).cast());
    names = pg_sys::lappend(names, pg_sys::makeString(pg_sys::pstrdup(c"task_results".as_ptr())).cast());
    let mut argtype = pg_sys::TEXTOID;
    pg_sys::LookupFuncName(names, 1, &mut argtype, true)
}

thread_local! {
    /// The plans of the `sharding.task_results` calls the planning under way made, by the
    /// random token each call carries instead of its plan: a call written by a user (or kept
    /// from an earlier planning) names no plan here and stays a call of the placeholder, which
    /// refuses to run. (A plan in the call itself would let anyone send any SQL to the nodes.)
    static ISSUED: std::cell::RefCell<std::collections::HashMap<String, std::rc::Rc<ShardScanPlan>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
    /// Planner calls under way (nested: SPI queries run while planning).
    static PLANNING: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Called by the C planner hook when a planner call starts.
#[no_mangle]
pub extern "C-unwind" fn pg_sharding_planner_enter() {
    PLANNING.with(|p| p.set(p.get() + 1));
}

/// Called by the C planner hook when a planner call ends, also by an ERROR: the plans issued
/// by the outermost call are forgotten.
#[no_mangle]
pub extern "C-unwind" fn pg_sharding_planner_leave() {
    let depth = PLANNING.with(|p| {
        p.set(p.get().saturating_sub(1));
        p.get()
    });
    if depth == 0 {
        ISSUED.with(|i| i.borrow_mut().clear());
    }
}

/// At the end of a transaction: nothing issued survives it.
pub fn forget_issued_plans() {
    PLANNING.with(|p| p.set(0));
    ISSUED.with(|i| i.borrow_mut().clear());
}

/// A new token for `plan`, valid until the planning under way ends.
fn issue(plan: &ShardScanPlan) -> Result<String> {
    let mut bytes = [0u8; 16];
    // SAFETY: fills the local buffer.
    if !unsafe { pg_sys::pg_strong_random(bytes.as_mut_ptr().cast(), bytes.len()) } {
        return Err(ShardingError::internal("could not generate a random plan token"));
    }
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    ISSUED.with(|i| i.borrow_mut().insert(token.clone(), std::rc::Rc::new(plan.clone())));
    Ok(token)
}

/// A Query tree a plan keeps to plan and run when it runs (planner/modifying_ctes.rs,
/// intermediate.rs, ...), with the plans of the `sharding.task_results` calls in it: they are
/// issued again under their tokens while it is planned (`restore_query`).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredQuery {
    /// nodeToString of the Query.
    tree: String,
    plans: Vec<(String, ShardScanPlan)>,
}

/// `query` as text for a plan to keep (see `StoredQuery`).
pub unsafe fn store_query(query: *mut pg_sys::Query) -> Result<String> {
    let tree = std::ffi::CStr::from_ptr(pg_sys::nodeToString(query.cast())).to_string_lossy().into_owned();
    let mut plans = Vec::new();
    crate::deparse::query::for_each_rte(query, &mut |rte| {
        if let Some(token) = task_results_token(rte) {
            if let Some(plan) = ISSUED.with(|i| i.borrow().get(token).cloned()) {
                plans.push((token.to_string(), (*plan).clone()));
            }
        }
    });
    serde_json::to_string(&StoredQuery { tree, plans }).map_err(|e| ShardingError::internal(e.to_string()))
}

/// The plans of a restored query, issued until this is dropped.
pub struct Reissued(Vec<String>);

impl Drop for Reissued {
    fn drop(&mut self) {
        ISSUED.with(|i| {
            let mut issued = i.borrow_mut();
            for token in &self.0 {
                issued.remove(token);
            }
        });
    }
}

/// The Query of a `store_query` text, with its plans issued while the result is kept.
pub unsafe fn restore_query(text: &str) -> Result<(*mut pg_sys::Query, Reissued)> {
    let stored: StoredQuery = serde_json::from_str(text).map_err(|e| ShardingError::internal(format!("a kept query: {e}")))?;
    let tree = CString::new(stored.tree).map_err(|e| ShardingError::internal(e.to_string()))?;
    let query: *mut pg_sys::Query = pg_sys::stringToNode(tree.as_ptr()).cast();
    if query.is_null() || (*query).type_ != pg_sys::NodeTag::T_Query {
        return Err(ShardingError::internal("a kept query without its Query tree"));
    }
    let mut tokens = Vec::new();
    ISSUED.with(|i| {
        let mut issued = i.borrow_mut();
        for (token, plan) in stored.plans {
            tokens.push(token.clone());
            issued.insert(token, std::rc::Rc::new(plan));
        }
    });
    Ok((query, Reissued(tokens)))
}

/// The token of a `sharding.task_results` call in `rte`, if it is one.
unsafe fn task_results_token<'a>(rte: *mut pg_sys::RangeTblEntry) -> Option<&'a str> {
    if (*rte).rtekind != pg_sys::RTEKind::RTE_FUNCTION {
        return None;
    }
    let functions = list_pointers::<pg_sys::RangeTblFunction>((*rte).functions);
    let [function] = functions.as_slice() else { return None };
    let call = (**function).funcexpr;
    if call.is_null() || (*call).type_ != pg_sys::NodeTag::T_FuncExpr {
        return None;
    }
    let call = call.cast::<pg_sys::FuncExpr>();
    let marker = task_results_function();
    if marker == pg_sys::InvalidOid || (*call).funcid != marker {
        return None;
    }
    // Ours carry a text constant; a user's call may pass anything (a parameter, a column).
    let args = list_pointers::<pg_sys::Node>((*call).args);
    let [token] = args.as_slice() else { return None };
    if (**token).type_ != pg_sys::NodeTag::T_Const {
        return None;
    }
    let token = token.cast::<pg_sys::Const>();
    if (*token).constisnull || (*token).consttype != pg_sys::TEXTOID {
        return None;
    }
    Some(pgrx::text_to_rust_str_unchecked((*token).constvalue.cast_mut_ptr()))
}

/// The ShardScan plan carried by an RTE of the coordinator query, if `rte` is one made by this
/// planning.
pub unsafe fn task_results_plan(rte: *mut pg_sys::RangeTblEntry) -> Option<std::rc::Rc<ShardScanPlan>> {
    let token = task_results_token(rte)?;
    ISSUED.with(|i| i.borrow().get(token).cloned())
}

/// How one aggregate of the original query is computed from partial results.
enum Combine {
    /// The same aggregate over the partial column (min, max, bool_and, bool_or, sums of the
    /// same type).
    Same,
    /// `aggregate` over the partial column, then converted by `cast` (a function) and made 0
    /// when NULL if `zero_when_null`.
    Sum { aggregate: u32, cast: Option<(u32, pg_sys::Oid)>, zero_when_null: bool },
    /// avg: numeric_div(sum of partial sums, sum of partial counts).
    Average { sum: u32, partial_sum: u32 },
}

unsafe fn combine_of(aggref: *mut pg_sys::Aggref) -> Option<Combine> {
    if !(*aggref).aggdistinct.is_null() || !(*aggref).aggorder.is_null() || (*aggref).aggkind != b'n' as std::ffi::c_char {
        return None;
    }
    let fn_oid = (*aggref).aggfnoid.to_u32();
    Some(match fn_oid {
        pg_sys::F_COUNT_ | pg_sys::F_COUNT_ANY => {
            Combine::Sum { aggregate: pg_sys::F_SUM_INT8, cast: Some((pg_sys::F_INT8_NUMERIC, pg_sys::INT8OID)), zero_when_null: true }
        }
        pg_sys::F_SUM_INT2 | pg_sys::F_SUM_INT4 => {
            Combine::Sum { aggregate: pg_sys::F_SUM_INT8, cast: Some((pg_sys::F_INT8_NUMERIC, pg_sys::INT8OID)), zero_when_null: false }
        }
        pg_sys::F_SUM_INT8 | pg_sys::F_SUM_NUMERIC => {
            Combine::Sum { aggregate: pg_sys::F_SUM_NUMERIC, cast: None, zero_when_null: false }
        }
        pg_sys::F_SUM_FLOAT4 | pg_sys::F_SUM_FLOAT8 => Combine::Same,
        pg_sys::F_AVG_INT2 => Combine::Average { sum: pg_sys::F_SUM_INT8, partial_sum: pg_sys::F_SUM_INT2 },
        pg_sys::F_AVG_INT4 => Combine::Average { sum: pg_sys::F_SUM_INT8, partial_sum: pg_sys::F_SUM_INT4 },
        pg_sys::F_AVG_INT8 => Combine::Average { sum: pg_sys::F_SUM_NUMERIC, partial_sum: pg_sys::F_SUM_INT8 },
        pg_sys::F_AVG_NUMERIC => Combine::Average { sum: pg_sys::F_SUM_NUMERIC, partial_sum: pg_sys::F_SUM_NUMERIC },
        pg_sys::F_BOOL_AND | pg_sys::F_BOOL_OR | pg_sys::F_EVERY => Combine::Same,
        _ if fn_oid < pg_sys::FirstNormalObjectId => {
            let name = std::ffi::CStr::from_ptr(pg_sys::get_func_name((*aggref).aggfnoid)).to_string_lossy();
            if name == "min" || name == "max" {
                Combine::Same
            } else {
                return None;
            }
        }
        _ => return None,
    })
}

/// Result type of the built-in aggregate `function`.
fn sum_result_type(function: u32) -> pg_sys::Oid {
    match function {
        pg_sys::F_SUM_INT2 | pg_sys::F_SUM_INT4 | pg_sys::F_COUNT_ANY | pg_sys::F_COUNT_ => pg_sys::INT8OID,
        _ => pg_sys::NUMERICOID,
    }
}

struct Split {
    /// Grouping key expressions (worker columns 1..=k).
    keys: Vec<*mut pg_sys::Node>,
    /// Worker select list: keys, then partial aggregates.
    worker_columns: Vec<*mut pg_sys::Node>,
    unsupported: bool,
}

impl Split {
    /// A worker column holding `expr`, as a Var of the coordinator's RTE 1.
    unsafe fn column(&mut self, expr: *mut pg_sys::Node) -> *mut pg_sys::Node {
        let position = match self.worker_columns.iter().position(|&c| pg_sys::equal(c.cast(), expr.cast())) {
            Some(p) => p,
            None => {
                self.worker_columns.push(expr);
                self.worker_columns.len() - 1
            }
        };
        pg_sys::makeVar(
            1,
            (position + 1) as i16,
            pg_sys::exprType(expr),
            pg_sys::exprTypmod(expr),
            pg_sys::exprCollation(expr),
            0,
        )
        .cast()
    }

    unsafe fn aggregate(&mut self, function: u32, result: pg_sys::Oid, argument: *mut pg_sys::Node, like: *mut pg_sys::Aggref) -> *mut pg_sys::Node {
        let aggref: *mut pg_sys::Aggref = pg_sys::palloc0(std::mem::size_of::<pg_sys::Aggref>()).cast();
        (*aggref).xpr.type_ = pg_sys::NodeTag::T_Aggref;
        (*aggref).aggfnoid = pg_sys::Oid::from(function);
        (*aggref).aggtype = result;
        (*aggref).aggcollid = if function == (*like).aggfnoid.to_u32() { (*like).aggcollid } else { pg_sys::InvalidOid };
        (*aggref).inputcollid = if function == (*like).aggfnoid.to_u32() { (*like).inputcollid } else { pg_sys::InvalidOid };
        (*aggref).aggtranstype = pg_sys::InvalidOid;
        (*aggref).aggargtypes = pg_sys::lappend_oid(std::ptr::null_mut(), pg_sys::exprType(argument));
        (*aggref).args = pg_sys::lappend(
            std::ptr::null_mut(),
            pg_sys::makeTargetEntry(argument.cast(), 1, std::ptr::null_mut(), false).cast(),
        );
        (*aggref).aggkind = b'n' as std::ffi::c_char;
        (*aggref).aggsplit = pg_sys::AggSplit::AGGSPLIT_SIMPLE;
        (*aggref).aggno = -1;
        (*aggref).aggtransno = -1;
        (*aggref).location = -1;
        aggref.cast()
    }

    unsafe fn call(function: u32, result: pg_sys::Oid, args: &[*mut pg_sys::Node]) -> *mut pg_sys::Node {
        let mut list: *mut pg_sys::List = std::ptr::null_mut();
        for &arg in args {
            list = pg_sys::lappend(list, arg.cast());
        }
        pg_sys::makeFuncExpr(
            pg_sys::Oid::from(function),
            result,
            list,
            pg_sys::InvalidOid,
            pg_sys::InvalidOid,
            pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
        )
        .cast()
    }

    /// The coordinator's expression for an aggregate of the original query.
    unsafe fn combine(&mut self, aggref: *mut pg_sys::Aggref) -> *mut pg_sys::Node {
        let Some(combine) = combine_of(aggref) else {
            self.unsupported = true;
            return aggref.cast();
        };
        match combine {
            Combine::Same => {
                let partial = self.column(pg_sys::copyObjectImpl(aggref.cast()).cast());
                self.aggregate((*aggref).aggfnoid.to_u32(), (*aggref).aggtype, partial, aggref)
            }
            Combine::Sum { aggregate, cast, zero_when_null } => {
                let partial = self.column(pg_sys::copyObjectImpl(aggref.cast()).cast());
                // sum(int8) and sum(numeric) are numeric; the original's type comes back through
                // the cast.
                let mut expr = self.aggregate(aggregate, pg_sys::NUMERICOID, partial, aggref);
                if let Some((function, result)) = cast {
                    expr = Self::call(function, result, &[expr]);
                }
                if zero_when_null {
                    let coalesce: *mut pg_sys::CoalesceExpr = pg_sys::palloc0(std::mem::size_of::<pg_sys::CoalesceExpr>()).cast();
                    (*coalesce).xpr.type_ = pg_sys::NodeTag::T_CoalesceExpr;
                    (*coalesce).coalescetype = pg_sys::INT8OID;
                    let zero = pg_sys::makeConst(pg_sys::INT8OID, -1, pg_sys::InvalidOid, 8, pg_sys::Datum::from(0i64), false, true);
                    (*coalesce).args = pg_sys::lappend(pg_sys::lappend(std::ptr::null_mut(), expr.cast()), zero.cast());
                    (*coalesce).location = -1;
                    expr = coalesce.cast();
                }
                expr
            }
            Combine::Average { sum, partial_sum } => {
                // Partial sum and count of the same argument (and filter) as the original.
                let sum_part: *mut pg_sys::Aggref = pg_sys::copyObjectImpl(aggref.cast()).cast();
                (*sum_part).aggfnoid = pg_sys::Oid::from(partial_sum);
                (*sum_part).aggtype = sum_result_type(partial_sum);
                (*sum_part).aggtranstype = pg_sys::InvalidOid;
                let count_part: *mut pg_sys::Aggref = pg_sys::copyObjectImpl(aggref.cast()).cast();
                (*count_part).aggfnoid = pg_sys::Oid::from(pg_sys::F_COUNT_ANY);
                (*count_part).aggtype = pg_sys::INT8OID;
                (*count_part).aggtranstype = pg_sys::InvalidOid;
                (*count_part).aggargtypes = pg_sys::lappend_oid(std::ptr::null_mut(), pg_sys::ANYOID);
                let sum_column = self.column(sum_part.cast());
                let count_column = self.column(count_part.cast());
                let total = self.aggregate(sum, pg_sys::NUMERICOID, sum_column, aggref);
                let count = self.aggregate(pg_sys::F_SUM_INT8, pg_sys::NUMERICOID, count_column, aggref);
                Self::call(pg_sys::F_NUMERIC_DIV, pg_sys::NUMERICOID, &[total, count])
            }
        }
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn mutate(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> *mut pg_sys::Node {
    if node.is_null() {
        return node;
    }
    let split = &mut *(context as *mut Split);
    if let Some(index) = split.keys.iter().position(|&k| pg_sys::equal(k.cast(), node.cast())) {
        let key = split.keys[index];
        return pg_sys::makeVar(1, (index + 1) as i16, pg_sys::exprType(key), pg_sys::exprTypmod(key), pg_sys::exprCollation(key), 0)
            .cast();
    }
    match (*node).type_ {
        pg_sys::NodeTag::T_Aggref => return split.combine(node.cast()),
        pg_sys::NodeTag::T_Var | pg_sys::NodeTag::T_SubLink | pg_sys::NodeTag::T_WindowFunc | pg_sys::NodeTag::T_GroupingFunc => {
            // A column outside the grouping keys (functional dependency) or a shape this
            // split does not handle.
            split.unsupported = true;
            return node;
        }
        _ => {}
    }
    let mutator: unsafe extern "C-unwind" fn(*mut pg_sys::Node, *mut std::ffi::c_void) -> *mut pg_sys::Node = mutate;
    // SAFETY: PostgreSQL 15 declares the mutator without prototype; this is its real signature.
    pg_sys::expression_tree_mutator(node, Some(std::mem::transmute(mutator)), context)
}

/// The top-level AND-ed conditions of a WHERE clause.
unsafe fn top_conjuncts(node: *mut pg_sys::Node) -> Vec<*mut pg_sys::Node> {
    if node.is_null() {
        return Vec::new();
    }
    if (*node).type_ == pg_sys::NodeTag::T_BoolExpr && (*node.cast::<pg_sys::BoolExpr>()).boolop == pg_sys::BoolExprType::AND_EXPR {
        return list_pointers::<pg_sys::Node>((*node.cast::<pg_sys::BoolExpr>()).args).into_iter().flat_map(|n| top_conjuncts(n)).collect();
    }
    vec![node]
}

/// Whether the query is a single-level query this module can split.
pub unsafe fn eligible(parse: *mut pg_sys::Query) -> bool {
    eligible_clauses(parse)
        && list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable).iter().all(|&rte| {
            // Functions (shippable ones: checked with the whole statement) give every task
            // the same rows, as a reference table does; broadcast tables are such functions.
            matches!((*rte).rtekind, pg_sys::RTEKind::RTE_RELATION | pg_sys::RTEKind::RTE_JOIN | pg_sys::RTEKind::RTE_FUNCTION)
                && (*rte).tablesample.is_null()
        })
        && !references_whole_rows_or_system_columns(parse)
}

/// The clauses plan 3 takes (the part of `eligible` that does not look at the range table,
/// which intermediate results change).
pub unsafe fn eligible_clauses(parse: *mut pg_sys::Query) -> bool {
    (*parse).commandType == pg_sys::CmdType::CMD_SELECT
        && !(*parse).hasWindowFuncs
        && !(*parse).hasTargetSRFs
        && !(*parse).hasModifyingCTE
        && (*parse).cteList.is_null()
        && (*parse).setOperations.is_null()
        && (*parse).groupingSets.is_null()
        // FOR UPDATE/SHARE locks what each shard returns: all of it, unless LIMIT or OFFSET
        // would leave some rows locked but not returned.
        && ((*parse).rowMarks.is_null() || ((*parse).limitCount.is_null() && (*parse).limitOffset.is_null()))
}

/// Whole-row references and system columns mean something else on a shard (its row type, its
/// ctid): such queries take the general plan, which refuses them clearly.
unsafe fn references_whole_rows_or_system_columns(parse: *mut pg_sys::Query) -> bool {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        if (*node).type_ == pg_sys::NodeTag::T_Var {
            return (*node.cast::<pg_sys::Var>()).varattno <= 0;
        }
        if (*node).type_ == pg_sys::NodeTag::T_Query {
            return pg_sys::query_tree_walker(node.cast(), Some(walker), context, 0);
        }
        pg_sys::expression_tree_walker(node, Some(walker), context)
    }
    let context = std::ptr::null_mut();
    walker((*parse).targetList.cast(), context)
        || walker((*parse).jointree.cast(), context)
        || walker((*parse).havingQual, context)
}

/// Whether a GROUP BY key is the distribution column of one of the query's distributed tables
/// (`distributed`: range table index and table) that no outer join can null: then all rows of a
/// group share one distribution value, and so one shard group.
unsafe fn groups_by_distribution_column(
    parse: *mut pg_sys::Query,
    keys: &[*mut pg_sys::TargetEntry],
    distributed: &[(u32, std::rc::Rc<crate::catalog::tables::DistributedTable>)],
) -> bool {
    unsafe fn nullable(node: *mut pg_sys::Node, nulled: bool, out: &mut Vec<u32>) {
        if node.is_null() {
            return;
        }
        match (*node).type_ {
            pg_sys::NodeTag::T_RangeTblRef => {
                if nulled {
                    out.push((*node.cast::<pg_sys::RangeTblRef>()).rtindex as u32);
                }
            }
            pg_sys::NodeTag::T_JoinExpr => {
                let join = node.cast::<pg_sys::JoinExpr>();
                use pg_sys::JoinType::*;
                let (left, right) = match (*join).jointype {
                    JOIN_LEFT => (nulled, true),
                    JOIN_RIGHT => (true, nulled),
                    JOIN_FULL => (true, true),
                    _ => (nulled, nulled),
                };
                nullable((*join).larg, left, out);
                nullable((*join).rarg, right, out);
            }
            pg_sys::NodeTag::T_FromExpr => {
                for item in list_pointers::<pg_sys::Node>((*node.cast::<pg_sys::FromExpr>()).fromlist) {
                    nullable(item, nulled, out);
                }
            }
            _ => {}
        }
    }
    if !(*parse).groupingSets.is_null() {
        return false;
    }
    let mut nulled = Vec::new();
    nullable((*parse).jointree.cast(), false, &mut nulled);
    keys.iter().any(|&entry| {
        let expr = crate::planner::pins::strip_relabel((*entry).expr.cast());
        if expr.is_null() || (*expr).type_ != pg_sys::NodeTag::T_Var {
            return false;
        }
        let var = expr.cast::<pg_sys::Var>();
        (*var).varlevelsup == 0
            && !nulled.contains(&((*var).varno as u32))
            && distributed
                .iter()
                .any(|(rti, table)| *rti == (*var).varno as u32 && table.distribution_attnum == Some((*var).varattno))
    })
}

/// The coordinator query of a split aggregation, or `None` when the query does not split.
/// `anchor` is the distributed table whose shards define the tasks (every distributed table of
/// the query must be co-located with it and joined on the distribution column).
pub unsafe fn split(
    parse: *mut pg_sys::Query,
    anchor: pg_sys::Oid,
    distributed: &[(u32, std::rc::Rc<crate::catalog::tables::DistributedTable>)],
    broadcasts: Vec<crate::executor::remote_scan::Broadcast>,
) -> Result<Option<*mut pg_sys::Query>> {
    if !eligible(parse) {
        return Ok(None);
    }
    // Row locks (FOR UPDATE/SHARE) are taken by the shards, in the distributed transaction: on
    // tables only (not on a broadcast table's function scan, which locks nothing).
    let locks_rows = super::locks_rows_anywhere(parse);
    let rtes = list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable);
    if list_pointers::<pg_sys::RowMarkClause>((*parse).rowMarks)
        .iter()
        .any(|&mark| ((*mark).rti as usize).checked_sub(1).and_then(|i| rtes.get(i)).is_none_or(|&rte| (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION))
    {
        return Ok(None);
    }
    let marker = task_results_function();
    if marker == pg_sys::InvalidOid {
        return Ok(None);
    }
    let entries = list_pointers::<pg_sys::TargetEntry>((*parse).targetList);
    let group_refs: Vec<u32> = list_pointers::<pg_sys::SortGroupClause>((*parse).groupClause).iter().map(|c| (**c).tleSortGroupRef).collect();
    let key_entries: Vec<*mut pg_sys::TargetEntry> =
        entries.iter().copied().filter(|e| group_refs.contains(&(**e).ressortgroupref)).collect();
    let mut split = Split {
        keys: key_entries.iter().map(|e| (**e).expr.cast::<pg_sys::Node>()).collect(),
        worker_columns: Vec::new(),
        unsupported: false,
    };
    split.worker_columns = split.keys.clone();
    let aggregating = (*parse).hasAggs || !(*parse).groupClause.is_null();
    // Grouped by a distribution column: every group lies in one shard group, so each shard
    // computes its groups completely (any aggregate, HAVING) and the coordinator only sorts,
    // limits and removes duplicates, as for rows without aggregation.
    let whole = aggregating && groups_by_distribution_column(parse, &key_entries, distributed);
    if whole {
        split.worker_columns.clear();
    }

    // The coordinator's select list and HAVING: aggregates combined, keys read from columns.
    // Without aggregation every output column is computed on the shards.
    let context = (&mut split as *mut Split).cast();
    let mut coordinator_list: *mut pg_sys::List = std::ptr::null_mut();
    for (i, &entry) in entries.iter().enumerate() {
        let copy: *mut pg_sys::TargetEntry = pg_sys::copyObjectImpl(entry.cast()).cast();
        if aggregating && !whole {
            (*copy).expr = mutate((*entry).expr.cast(), context).cast();
        } else {
            split.worker_columns.push((*entry).expr.cast());
            let expr = (*entry).expr.cast::<pg_sys::Node>();
            (*copy).expr = pg_sys::makeVar(1, (i + 1) as i16, pg_sys::exprType(expr), pg_sys::exprTypmod(expr), pg_sys::exprCollation(expr), 0).cast();
        }
        coordinator_list = pg_sys::lappend(coordinator_list, copy.cast());
    }
    let having = if whole { std::ptr::null_mut() } else { mutate((*parse).havingQual, context) };
    // Every worker column must come back as a value the coordinator can read.
    let readable = split.worker_columns.iter().all(|&c| {
        let typ = pg_sys::exprType(c);
        typ != pg_sys::RECORDOID && pg_sys::get_typtype(typ) != pg_sys::TYPTYPE_PSEUDO as std::ffi::c_char
    });
    if split.unsupported || !readable {
        return Ok(None);
    }
    // ORDER BY ... LIMIT without aggregation: each shard returns only its first rows.
    let top_n = (!aggregating || whole)
        && !(*parse).sortClause.is_null()
        && !(*parse).limitCount.is_null()
        && (*parse).limitOffset.is_null()
        && (*parse).distinctClause.is_null()
        && (*parse).limitOption == pg_sys::LimitOption::LIMIT_OPTION_COUNT;

    // The worker query: the original FROM and WHERE, grouped by the keys, returning the keys
    // and the partial aggregates.
    let worker: *mut pg_sys::Query = pg_sys::copyObjectImpl(parse.cast()).cast();
    let mut worker_list: *mut pg_sys::List = std::ptr::null_mut();
    for (i, &expr) in split.worker_columns.iter().enumerate() {
        let name = CString::new(format!("c{}", i + 1)).unwrap_or_default();
        let entry = pg_sys::makeTargetEntry(pg_sys::copyObjectImpl(expr.cast()).cast(), (i + 1) as i16, pg_sys::pstrdup(name.as_ptr()), false);
        if aggregating && !whole && i < key_entries.len() {
            (*entry).ressortgroupref = (*key_entries[i]).ressortgroupref;
        } else if !aggregating || whole {
            (*entry).ressortgroupref = (*entries[i]).ressortgroupref;
        }
        worker_list = pg_sys::lappend(worker_list, entry.cast());
    }
    (*worker).targetList = worker_list;
    if !whole {
        (*worker).havingQual = std::ptr::null_mut();
    }
    (*worker).distinctClause = std::ptr::null_mut();
    (*worker).hasDistinctOn = false;
    if !top_n {
        (*worker).sortClause = std::ptr::null_mut();
        (*worker).limitCount = std::ptr::null_mut();
    }
    (*worker).limitOffset = std::ptr::null_mut();
    (*worker).hasAggs = if whole { (*parse).hasAggs } else { aggregating && split.worker_columns.len() > key_entries.len() };
    let deparsed = deparse_query(worker)?;
    let mut plan = ShardScanPlan::from_deparsed(&deparsed, anchor);
    // Pruning by the WHERE clause's conditions on any distributed table's distribution column
    // (co-located tables share their shard intervals).
    let conjuncts = top_conjuncts((*(*parse).jointree).quals);
    for (rti, table) in distributed {
        for disjunction in crate::planner::pins::scan_pins(table, *rti as i32, &conjuncts) {
            let mut indexes = Vec::new();
            for (value, is_array) in disjunction {
                let value: *mut pg_sys::Node = pg_sys::copyObjectImpl(value.cast()).cast();
                pg_sys::fix_opfuncids(value);
                indexes.push((plan.prune_nodes.len(), is_array));
                plan.prune_nodes.push(std::ffi::CStr::from_ptr(pg_sys::nodeToString(value.cast())).to_string_lossy().into_owned());
            }
            plan.prune.push(indexes);
        }
    }
    let mut params_used = Vec::new();
    collect_params(worker.cast(), &mut params_used);
    plan.max_param = params_used.iter().copied().max().unwrap_or(0);
    plan.params_used = params_used;
    plan.binary = split.worker_columns.iter().all(|&c| super::shippable::binary_transportable(pg_sys::exprType(c)));
    // An aggregate without GROUP BY returns one row even over no rows: some shard answers.
    plan.at_least_one = aggregating && !whole;
    plan.locks_rows = locks_rows;
    plan.add_broadcasts(broadcasts);

    // The coordinator query over the tasks' rows.
    let columns: Vec<(String, *mut pg_sys::Node)> =
        split.worker_columns.iter().enumerate().map(|(i, &column)| (format!("c{}", i + 1), column)).collect();
    let rte = results_rte(&plan, &columns)?;

    let coordinator: *mut pg_sys::Query = pg_sys::palloc0(std::mem::size_of::<pg_sys::Query>()).cast();
    (*coordinator).type_ = pg_sys::NodeTag::T_Query;
    (*coordinator).commandType = pg_sys::CmdType::CMD_SELECT;
    (*coordinator).querySource = (*parse).querySource;
    (*coordinator).queryId = (*parse).queryId;
    (*coordinator).canSetTag = (*parse).canSetTag;
    (*coordinator).rtable = pg_sys::lappend(std::ptr::null_mut(), rte.cast());
    let reference: *mut pg_sys::RangeTblRef = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblRef>()).cast();
    (*reference).type_ = pg_sys::NodeTag::T_RangeTblRef;
    (*reference).rtindex = 1;
    (*coordinator).jointree = pg_sys::makeFromExpr(pg_sys::lappend(std::ptr::null_mut(), reference.cast()), std::ptr::null_mut());
    (*coordinator).targetList = coordinator_list;
    if !whole {
        (*coordinator).groupClause = pg_sys::copyObjectImpl((*parse).groupClause.cast()).cast();
    }
    (*coordinator).havingQual = having;
    (*coordinator).sortClause = pg_sys::copyObjectImpl((*parse).sortClause.cast()).cast();
    (*coordinator).limitCount = pg_sys::copyObjectImpl((*parse).limitCount.cast()).cast();
    (*coordinator).limitOffset = pg_sys::copyObjectImpl((*parse).limitOffset.cast()).cast();
    (*coordinator).limitOption = (*parse).limitOption;
    (*coordinator).hasAggs = (*parse).hasAggs && !whole;
    (*coordinator).distinctClause = pg_sys::copyObjectImpl((*parse).distinctClause.cast()).cast();
    (*coordinator).hasDistinctOn = (*parse).hasDistinctOn;
    (*coordinator).stmt_location = (*parse).stmt_location;
    (*coordinator).stmt_len = (*parse).stmt_len;
    Ok(Some(coordinator))
}

/// A range table entry reading the rows of the tasks of `plan` (a call of the marker function
/// `sharding.task_results`, which the scan hook turns into a ShardScan), with one column per
/// entry of `columns` (name, and an expression giving its type, typmod and collation).
pub unsafe fn results_rte(plan: &ShardScanPlan, columns: &[(String, *mut pg_sys::Node)]) -> Result<*mut pg_sys::RangeTblEntry> {
    let marker = task_results_function();
    if marker == pg_sys::InvalidOid {
        return Err(ShardingError::internal("function sharding.task_results is missing"));
    }
    let token = issue(plan)?;
    let rte: *mut pg_sys::RangeTblEntry = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblEntry>()).cast();
    (*rte).type_ = pg_sys::NodeTag::T_RangeTblEntry;
    (*rte).rtekind = pg_sys::RTEKind::RTE_FUNCTION;
    (*rte).inFromCl = true;
    let function: *mut pg_sys::RangeTblFunction = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblFunction>()).cast();
    (*function).type_ = pg_sys::NodeTag::T_RangeTblFunction;
    let token = CString::new(token).map_err(|e| ShardingError::internal(e.to_string()))?;
    let argument = pg_sys::makeConst(
        pg_sys::TEXTOID,
        -1,
        pg_sys::DEFAULT_COLLATION_OID,
        -1,
        pg_sys::Datum::from(pg_sys::cstring_to_text(token.as_ptr())),
        false,
        false,
    );
    (*function).funcexpr = pg_sys::makeFuncExpr(
        marker,
        pg_sys::RECORDOID,
        pg_sys::lappend(std::ptr::null_mut(), argument.cast()),
        pg_sys::InvalidOid,
        pg_sys::DEFAULT_COLLATION_OID,
        pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
    )
    .cast();
    (*(*function).funcexpr.cast::<pg_sys::FuncExpr>()).funcretset = true;
    let mut colnames: *mut pg_sys::List = std::ptr::null_mut();
    for (name, column) in columns {
        let name = CString::new(name.as_str()).map_err(|e| ShardingError::internal(e.to_string()))?;
        colnames = pg_sys::lappend(colnames, pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())).cast());
        (*function).funccoltypes = pg_sys::lappend_oid((*function).funccoltypes, pg_sys::exprType(*column));
        (*function).funccoltypmods = pg_sys::lappend_int((*function).funccoltypmods, pg_sys::exprTypmod(*column));
        (*function).funccolcollations = pg_sys::lappend_oid((*function).funccolcollations, pg_sys::exprCollation(*column));
    }
    (*function).funccolcount = columns.len() as i32;
    (*function).funccolnames = colnames;
    (*rte).functions = pg_sys::lappend(std::ptr::null_mut(), function.cast());
    (*rte).eref = pg_sys::makeAlias(c"shard_results".as_ptr(), colnames);
    Ok(rte)
}
