//! Values a write computes once, computed on the coordinator.
//!
//! `UPDATE t SET updated_at = now() WHERE ...` must store the coordinator's now() (the same for
//! the whole transaction, on every shard), not each worker's. Every part of a statement that
//! does not depend on the row and is not volatile, but would not mean the same on a worker
//! (now(), CURRENT_TIMESTAMP, current_setting(), user-defined functions, ...) becomes a new
//! parameter `$n` of the task, evaluated once by the coordinator's executor when the statement
//! runs. Volatile functions (random(), nextval()) stay per row and are not hoisted.
//!
//! INSERT ... ON CONFLICT deparses its clauses from the plan when it runs (executor/on_conflict.rs):
//! there the same parts, and the statement's own parameters, are replaced by constants holding
//! their values (`computed_here`).

use pgrx::pg_sys;

use crate::planner::{pins, shippable};

enum Replacement {
    /// New parameters numbered from `next_param`; the replaced parts are kept to be evaluated
    /// when the statement runs.
    Params { next_param: i32, hoisted: Vec<(i32, *mut pg_sys::Node)> },
    /// Constants evaluated now, with the statement's parameters.
    Values { estate: *mut pg_sys::EState },
    /// The tableoid of range table entry `target.0` is the oid `target.1`.
    TableOid { target: (i32, pg_sys::Oid) },
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn mutate(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> *mut pg_sys::Node {
    if node.is_null() {
        return node;
    }
    let replacement = &mut *(context as *mut Replacement);
    use pg_sys::NodeTag::*;
    match (*node).type_ {
        // Sublinks and their queries stay as they are (they are checked whole later).
        T_Query | T_SubLink => return node,
        // Containers, not expressions (a CaseWhen is a part of its CASE, which PostgreSQL's
        // walkers only enter through the CaseExpr).
        T_TargetEntry | T_FromExpr | T_JoinExpr | T_List | T_RangeTblRef | T_MergeAction | T_CaseWhen => {}
        _ => {
            // Two walks of the subtree: only where the mode needs it.
            let worker_unsafe =
                || pins::is_pin_value(node) && !shippable::shippable(node, shippable::Rules { whole_statement: true, row_identity: false });
            match replacement {
                Replacement::Params { next_param, hoisted } if worker_unsafe() => {
                    let param: *mut pg_sys::Param = pg_sys::palloc0(std::mem::size_of::<pg_sys::Param>()).cast();
                    (*param).xpr.type_ = T_Param;
                    (*param).paramkind = pg_sys::ParamKind::PARAM_EXTERN;
                    (*param).paramid = *next_param;
                    (*param).paramtype = pg_sys::exprType(node);
                    (*param).paramtypmod = pg_sys::exprTypmod(node);
                    (*param).paramcollid = pg_sys::exprCollation(node);
                    (*param).location = -1;
                    hoisted.push((*next_param, node));
                    *next_param += 1;
                    return param.cast();
                }
                Replacement::TableOid { target }
                    if (*node).type_ == T_Var
                        && (*node.cast::<pg_sys::Var>()).varno == target.0
                        && (*node.cast::<pg_sys::Var>()).varattno as i32 == pg_sys::TableOidAttributeNumber =>
                {
                    let oid = pg_sys::Datum::from(target.1.to_u32());
                    return pg_sys::makeConst(pg_sys::OIDOID, -1, pg_sys::InvalidOid, 4, oid, false, true).cast();
                }
                Replacement::Values { estate }
                    if worker_unsafe()
                        || ((*node).type_ == T_Param
                            && (*node.cast::<pg_sys::Param>()).paramkind == pg_sys::ParamKind::PARAM_EXTERN) =>
                {
                    return evaluate(node, *estate);
                }
                _ => {}
            }
        }
    }
    let mutator: unsafe extern "C-unwind" fn(*mut pg_sys::Node, *mut std::ffi::c_void) -> *mut pg_sys::Node = mutate;
    // SAFETY: PostgreSQL 15 declares the mutator without prototype; this is its real signature.
    pg_sys::expression_tree_mutator(node, Some(std::mem::transmute(mutator)), context)
}

/// A Const holding the value of the row-independent `node` in the statement running in `estate`
/// (its parameters included), allocated in the current memory context.
unsafe fn evaluate(node: *mut pg_sys::Node, estate: *mut pg_sys::EState) -> *mut pg_sys::Node {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn with_values(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> *mut pg_sys::Node {
        if node.is_null() {
            return node;
        }
        if (*node).type_ == pg_sys::NodeTag::T_Param {
            let param = node.cast::<pg_sys::Param>();
            if (*param).paramkind == pg_sys::ParamKind::PARAM_EXTERN {
                return param_value(param, context.cast());
            }
        }
        let mutator: unsafe extern "C-unwind" fn(*mut pg_sys::Node, *mut std::ffi::c_void) -> *mut pg_sys::Node = with_values;
        // SAFETY: as in mutate().
        pg_sys::expression_tree_mutator(node, Some(std::mem::transmute(mutator)), context)
    }
    let list = (*estate).es_param_list_info;
    let expr = with_values(node, list.cast());
    if (*expr).type_ == pg_sys::NodeTag::T_Const {
        return expr;
    }
    pg_sys::fix_opfuncids(expr);
    // Plans and runs the expression, and copies the value into the current memory context.
    pg_sys::evaluate_expr(expr.cast(), pg_sys::exprType(expr), pg_sys::exprTypmod(expr), pg_sys::exprCollation(expr)).cast()
}

/// A Const of the value of the statement's parameter `param` in `list` (NULL when unset).
unsafe fn param_value(param: *mut pg_sys::Param, list: pg_sys::ParamListInfo) -> *mut pg_sys::Node {
    let (type_oid, typmod, collation) = ((*param).paramtype, (*param).paramtypmod, (*param).paramcollid);
    let (mut length, mut by_value) = (0i16, false);
    pg_sys::get_typlenbyval(type_oid, &mut length, &mut by_value);
    let id = (*param).paramid;
    let (value, isnull) = if list.is_null() || id < 1 || id > (*list).numParams {
        (pg_sys::Datum::from(0usize), true)
    } else {
        let mut workspace: pg_sys::ParamExternData = std::mem::zeroed();
        let data: *mut pg_sys::ParamExternData = match (*list).paramFetch {
            Some(fetch) => fetch(list, id, false, &mut workspace),
            None => (*list).params.as_mut_ptr().add(id as usize - 1),
        };
        ((*data).value, (*data).isnull)
    };
    pg_sys::makeConst(type_oid, typmod, collation, length.into(), value, isnull, by_value).cast()
}

/// A copy of the write `parse` with its row-independent, worker-unsafe parts replaced by new
/// parameters numbered after `first_param - 1`, and those parts (parameter id, expression).
pub unsafe fn hoist(parse: *mut pg_sys::Query, first_param: i32) -> (*mut pg_sys::Query, Vec<(i32, *mut pg_sys::Node)>) {
    let copy: *mut pg_sys::Query = pg_sys::copyObjectImpl(parse.cast()).cast();
    let mut replacement = Replacement::Params { next_param: first_param, hoisted: Vec::new() };
    let context = (&mut replacement as *mut Replacement).cast();
    (*copy).targetList = mutate((*copy).targetList.cast(), context).cast();
    (*copy).jointree = mutate((*copy).jointree.cast(), context).cast();
    (*copy).returningList = mutate((*copy).returningList.cast(), context).cast();
    (*copy).mergeActionList = mutate((*copy).mergeActionList.cast(), context).cast();
    let hoisted = match replacement {
        Replacement::Params { hoisted, .. } => hoisted,
        Replacement::Values { .. } | Replacement::TableOid { .. } => Vec::new(),
    };
    for (_, expr) in &hoisted {
        pg_sys::fix_opfuncids(*expr);
    }
    (copy, hoisted)
}

/// A copy of the plan expression `node` (a clause of the statement running in `estate`) with
/// its row-independent, worker-unsafe parts and its parameters replaced by constants of their
/// values, for a worker that runs the clause in a statement of its own; the tableoid of the
/// statement's target (range table entry `target.0`) becomes its oid `target.1`.
pub unsafe fn computed_here(node: *mut pg_sys::Node, estate: *mut pg_sys::EState, target: (i32, pg_sys::Oid)) -> *mut pg_sys::Node {
    if node.is_null() {
        return node;
    }
    let copy: *mut pg_sys::Node = pg_sys::copyObjectImpl(node.cast()).cast();
    // First the tableoid, so that what is computed from it (`tableoid::regclass::text`) is then
    // computed here too.
    let mut replacement = Replacement::TableOid { target };
    let copy = mutate(copy, (&mut replacement as *mut Replacement).cast());
    let mut replacement = Replacement::Values { estate };
    mutate(copy, (&mut replacement as *mut Replacement).cast())
}
