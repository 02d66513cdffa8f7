//! Conditions of a query on the output columns of a subquery in its FROM, copied into that
//! subquery (as PostgreSQL's planner does for the subqueries it keeps as such), so that a
//! subquery planned on the shards (router.rs, `replace_subqueries`) is pruned and filtered by
//! them: `SELECT * FROM orders_with_labels WHERE user_id = 3`, over a view joining a
//! distributed table with a reference table, reads one shard. The conditions stay in the outer
//! query too, so a copy that does not help changes nothing.
//!
//! Copied: top-level AND-ed conditions of the WHERE clause that read only the subquery's
//! columns, of a subquery joined without outer joins (a member of the FROM list: an outer
//! join's conditions in WHERE mean something else on its nullable side), that does not group,
//! aggregate, use window functions, DISTINCT, LIMIT or sets (a condition moved below those
//! would change what they compute), and is not a security barrier. (Under FOR UPDATE, the rows
//! locked are then those the whole WHERE clause lets through, as when PostgreSQL pulls the
//! subquery up.) Conditions with volatile
//! functions, sublinks or references to other tables or levels stay where they are.

use pgrx::pg_sys;

use crate::commands::utility::list_pointers;

/// Adds to each subquery in the FROM list of `query` the conditions of `query` that can move
/// into it (kept in `query` too).
pub unsafe fn push_into_subqueries(query: *mut pg_sys::Query) {
    let count = list_pointers::<pg_sys::RangeTblEntry>((*query).rtable).len();
    for rti in 1..=count as i32 {
        if let Some(filtered) = with_outer_conditions(query, rti) {
            let rte = list_pointers::<pg_sys::RangeTblEntry>((*query).rtable)[rti as usize - 1];
            (*rte).subquery = filtered;
        }
    }
}

/// A copy of the subquery of range table entry `rti` of `query` with the conditions of
/// `query` that can move into it added to its WHERE clause; None when there are none.
pub unsafe fn with_outer_conditions(query: *mut pg_sys::Query, rti: i32) -> Option<*mut pg_sys::Query> {
    let rtes = list_pointers::<pg_sys::RangeTblEntry>((*query).rtable);
    let rte = *rtes.get(rti as usize - 1)?;
    let subquery = (*rte).subquery;
    if (*rte).rtekind != pg_sys::RTEKind::RTE_SUBQUERY || subquery.is_null() || (*rte).lateral || (*rte).security_barrier || !filterable(subquery) {
        return None;
    }
    let jointree = (*query).jointree;
    if jointree.is_null() || (*jointree).quals.is_null() {
        return None;
    }
    let in_from_list = list_pointers::<pg_sys::Node>((*jointree).fromlist)
        .into_iter()
        .any(|item| (*item).type_ == pg_sys::NodeTag::T_RangeTblRef && (*item.cast::<pg_sys::RangeTblRef>()).rtindex == rti);
    if !in_from_list {
        return None;
    }
    let outputs = list_pointers::<pg_sys::TargetEntry>((*subquery).targetList);
    let mut moved = Vec::new();
    for conjunct in list_pointers::<pg_sys::Node>(pg_sys::make_ands_implicit((*jointree).quals.cast())) {
        let mut check = Check { rti, outputs: &outputs, columns: 0, movable: true };
        checker(conjunct, (&mut check as *mut Check).cast());
        if !check.movable || check.columns == 0 || pg_sys::contain_volatile_functions(conjunct) {
            continue;
        }
        let copy = pg_sys::copyObjectImpl(conjunct.cast()).cast::<pg_sys::Node>();
        let mut substitution = Substitution { rti, outputs: &outputs };
        moved.push(substitute(copy, (&mut substitution as *mut Substitution).cast()));
    }
    if moved.is_empty() {
        return None;
    }
    let copy: *mut pg_sys::Query = pg_sys::copyObjectImpl(subquery.cast()).cast();
    let mut conditions: *mut pg_sys::List = std::ptr::null_mut();
    for condition in moved {
        conditions = pg_sys::lappend(conditions, condition.cast());
    }
    let inner = (*copy).jointree;
    (*inner).quals = pg_sys::make_and_qual((*inner).quals, pg_sys::make_ands_explicit(conditions).cast());
    Some(copy)
}

/// A subquery whose rows a condition on its output may filter first.
unsafe fn filterable(subquery: *mut pg_sys::Query) -> bool {
    (*subquery).commandType == pg_sys::CmdType::CMD_SELECT
        && (*subquery).setOperations.is_null()
        && !(*subquery).hasAggs
        && !(*subquery).hasWindowFuncs
        && !(*subquery).hasTargetSRFs
        && (*subquery).groupClause.is_null()
        && (*subquery).groupingSets.is_null()
        && (*subquery).havingQual.is_null()
        && (*subquery).distinctClause.is_null()
        && (*subquery).limitOffset.is_null()
        && (*subquery).limitCount.is_null()
        && !(*subquery).jointree.is_null()
}

struct Check<'a> {
    rti: i32,
    outputs: &'a [*mut pg_sys::TargetEntry],
    /// Columns of the subquery the condition reads.
    columns: usize,
    movable: bool,
}

/// Whether an output column's expression may be computed inside a condition: no volatile
/// functions (they would run once more per row), no sublinks, nothing of other levels.
unsafe fn plain_output(entry: *mut pg_sys::TargetEntry) -> bool {
    let expression = (*entry).expr.cast::<pg_sys::Node>();
    !(*entry).resjunk
        && !pg_sys::contain_volatile_functions(expression)
        && !pg_sys::contain_subplans(expression)
        && !contains_sublink_or_outer_var(expression)
}

unsafe fn contains_sublink_or_outer_var(node: *mut pg_sys::Node) -> bool {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        match (*node).type_ {
            pg_sys::NodeTag::T_SubLink | pg_sys::NodeTag::T_Query => return true,
            pg_sys::NodeTag::T_Var if (*node.cast::<pg_sys::Var>()).varlevelsup != 0 => return true,
            _ => {}
        }
        pg_sys::expression_tree_walker(node, Some(walker), context)
    }
    walker(node, std::ptr::null_mut())
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn checker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
    if node.is_null() {
        return false;
    }
    let check = &mut *(context as *mut Check);
    use pg_sys::NodeTag::*;
    match (*node).type_ {
        T_Var => {
            let var = node.cast::<pg_sys::Var>();
            let output = check.outputs.iter().find(|&&entry| (*entry).resno == (*var).varattno);
            let ok = (*var).varlevelsup == 0
                && (*var).varno == check.rti
                && (*var).varattno > 0
                && output.is_some_and(|&entry| plain_output(entry));
            if !ok {
                check.movable = false;
                return true;
            }
            check.columns += 1;
            return false;
        }
        T_Param if (*node.cast::<pg_sys::Param>()).paramkind != pg_sys::ParamKind::PARAM_EXTERN => {
            check.movable = false;
            return true;
        }
        T_SubLink | T_SubPlan | T_AlternativeSubPlan | T_Aggref | T_WindowFunc | T_GroupingFunc | T_PlaceHolderVar | T_CurrentOfExpr
        | T_Query => {
            check.movable = false;
            return true;
        }
        _ => {}
    }
    pg_sys::expression_tree_walker(node, Some(checker), context)
}

struct Substitution<'a> {
    rti: i32,
    outputs: &'a [*mut pg_sys::TargetEntry],
}

/// The condition with each of its columns of the subquery replaced by that column's
/// expression inside the subquery (checked first: every Var is one of those).
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn substitute(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> *mut pg_sys::Node {
    if node.is_null() {
        return node;
    }
    let substitution = &*(context as *const Substitution);
    if (*node).type_ == pg_sys::NodeTag::T_Var {
        let var = node.cast::<pg_sys::Var>();
        if (*var).varlevelsup == 0 && (*var).varno == substitution.rti {
            if let Some(&entry) = substitution.outputs.iter().find(|&&entry| (*entry).resno == (*var).varattno) {
                return pg_sys::copyObjectImpl((*entry).expr.cast()).cast();
            }
        }
        return node;
    }
    let mutator: unsafe extern "C-unwind" fn(*mut pg_sys::Node, *mut std::ffi::c_void) -> *mut pg_sys::Node = substitute;
    // SAFETY: PostgreSQL 15 declares the mutator without prototype; this is its real signature.
    pg_sys::expression_tree_mutator(
        node,
        Some(std::mem::transmute::<
            unsafe extern "C-unwind" fn(*mut pg_sys::Node, *mut std::ffi::c_void) -> *mut pg_sys::Node,
            unsafe extern "C-unwind" fn() -> *mut pg_sys::Node,
        >(mutator)),
        context,
    )
}
