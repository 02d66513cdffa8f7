//! Values a write computes once, computed on the coordinator.
//!
//! `UPDATE t SET updated_at = now() WHERE ...` must store the coordinator's now() (the same for
//! the whole transaction, on every shard), not each worker's. Every part of a statement that
//! does not depend on the row and is not volatile, but would not mean the same on a worker
//! (now(), CURRENT_TIMESTAMP, current_setting(), user-defined functions, ...) becomes a new
//! parameter `$n` of the task, evaluated once by the coordinator's executor when the statement
//! runs. Volatile functions (random(), nextval()) stay per row and are not hoisted.

use pgrx::pg_sys;

use crate::planner::{pins, shippable};

struct Hoisting {
    next_param: i32,
    hoisted: Vec<(i32, *mut pg_sys::Node)>,
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn mutate(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> *mut pg_sys::Node {
    if node.is_null() {
        return node;
    }
    let hoisting = &mut *(context as *mut Hoisting);
    use pg_sys::NodeTag::*;
    match (*node).type_ {
        // Sublinks and their queries stay as they are (they are checked whole later).
        T_Query | T_SubLink => return node,
        // Containers, not expressions (a CaseWhen is a part of its CASE, which PostgreSQL's
        // walkers only enter through the CaseExpr).
        T_TargetEntry | T_FromExpr | T_JoinExpr | T_List | T_RangeTblRef | T_MergeAction | T_CaseWhen => {}
        _ => {
            if pins::is_pin_value(node) && !shippable::shippable(node, shippable::Rules { whole_statement: true, row_identity: false }) {
                let param: *mut pg_sys::Param = pg_sys::palloc0(std::mem::size_of::<pg_sys::Param>()).cast();
                (*param).xpr.type_ = T_Param;
                (*param).paramkind = pg_sys::ParamKind::PARAM_EXTERN;
                (*param).paramid = hoisting.next_param;
                (*param).paramtype = pg_sys::exprType(node);
                (*param).paramtypmod = pg_sys::exprTypmod(node);
                (*param).paramcollid = pg_sys::exprCollation(node);
                (*param).location = -1;
                hoisting.hoisted.push((hoisting.next_param, node));
                hoisting.next_param += 1;
                return param.cast();
            }
        }
    }
    let mutator: unsafe extern "C-unwind" fn(*mut pg_sys::Node, *mut std::ffi::c_void) -> *mut pg_sys::Node = mutate;
    // SAFETY: PostgreSQL 15 declares the mutator without prototype; this is its real signature.
    pg_sys::expression_tree_mutator(node, Some(std::mem::transmute(mutator)), context)
}

/// A copy of the write `parse` with its row-independent, worker-unsafe parts replaced by new
/// parameters numbered after `first_param - 1`, and those parts (parameter id, expression).
pub unsafe fn hoist(parse: *mut pg_sys::Query, first_param: i32) -> (*mut pg_sys::Query, Vec<(i32, *mut pg_sys::Node)>) {
    let copy: *mut pg_sys::Query = pg_sys::copyObjectImpl(parse.cast()).cast();
    let mut hoisting = Hoisting { next_param: first_param, hoisted: Vec::new() };
    let context = (&mut hoisting as *mut Hoisting).cast();
    (*copy).targetList = mutate((*copy).targetList.cast(), context).cast();
    (*copy).jointree = mutate((*copy).jointree.cast(), context).cast();
    (*copy).returningList = mutate((*copy).returningList.cast(), context).cast();
    (*copy).mergeActionList = mutate((*copy).mergeActionList.cast(), context).cast();
    for (_, expr) in &hoisting.hoisted {
        pg_sys::fix_opfuncids(*expr);
    }
    (copy, hoisting.hoisted)
}
