//! Facts for shard pruning read from predicates: `distribution column = value` (a constant or
//! a parameter, also `= ANY(array)`) and `column = column` between distribution columns.
//!
//! Only equality operators (those estimated with eqsel) between types whose equal values hash
//! equally count, and only under deterministic collations: anything else prunes nothing, which
//! is always correct.

use pgrx::pg_sys;

use crate::catalog::tables::DistributedTable;
use crate::routing::DistKind;

pub unsafe fn strip_relabel(mut node: *mut pg_sys::Node) -> *mut pg_sys::Node {
    while !node.is_null() && (*node).type_ == pg_sys::NodeTag::T_RelabelType {
        node = (*node.cast::<pg_sys::RelabelType>()).arg.cast();
    }
    node
}

/// `node` without the relabelings and COLLATE clauses around it: the value an equality under
/// a deterministic collation compares (equal means the same bytes, whatever the collation).
unsafe fn compared_value(mut node: *mut pg_sys::Node) -> *mut pg_sys::Node {
    loop {
        node = strip_relabel(node);
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_CollateExpr {
            return node;
        }
        node = (*node.cast::<pg_sys::CollateExpr>()).arg.cast();
    }
}

/// The two sides of `a = b`, when `node` is an equality that compares them as what they are.
pub unsafe fn equality_sides(node: *mut pg_sys::Node) -> Option<(*mut pg_sys::Node, *mut pg_sys::Node)> {
    if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_OpExpr {
        return None;
    }
    let op = node.cast::<pg_sys::OpExpr>();
    if (*(*op).args).length != 2 || !is_equality((*op).opno, (*op).inputcollid) {
        return None;
    }
    let args = crate::commands::utility::list_pointers::<pg_sys::Node>((*op).args);
    if args.iter().any(|&arg| column_compared_as_char(arg)) {
        return None;
    }
    Some((compared_value(args[0]), compared_value(args[1])))
}

/// A text or varchar column compared as char(n) (`varchar_column = 'a '::char(3)`): that
/// comparison ignores trailing spaces, which the column's hash does not, so equal values may
/// lie in different shards.
pub unsafe fn column_compared_as_char(arg: *mut pg_sys::Node) -> bool {
    let inner = strip_relabel(arg);
    !arg.is_null()
        && (*arg).type_ == pg_sys::NodeTag::T_RelabelType
        && (*arg.cast::<pg_sys::RelabelType>()).resulttype == pg_sys::BPCHAROID
        && !inner.is_null()
        && (*inner).type_ == pg_sys::NodeTag::T_Var
        && DistKind::of_type((*inner.cast::<pg_sys::Var>()).vartype) == Some(DistKind::Text)
}

unsafe fn is_equality(opno: pg_sys::Oid, collation: pg_sys::Oid) -> bool {
    pg_sys::get_oprrest(opno) == pg_sys::Oid::from(pg_sys::F_EQSEL)
        && (collation == pg_sys::InvalidOid || pg_sys::get_collation_isdeterministic(collation))
}

/// Whether values of `value_type` compared equal to a distribution column of `table` hash to
/// the column's shard.
pub fn hashes_like(table: &DistributedTable, value_type: pg_sys::Oid) -> bool {
    let (Some(column), Some(value)) = (table.distribution_kind, DistKind::of_type(value_type)) else {
        return false;
    };
    // timestamp = timestamptz compares after a time zone conversion: only equal types.
    column.family() == value.family() && (column != DistKind::Timestamp || table.distribution_type == value_type)
}

/// A value a pin may use: anything the executor can compute before the scan starts, the same
/// for every row: constants, external parameters, and non-volatile expressions of them
/// (`(ARRAY[...])[$1]`, `$1 + 1`, `'42'::bigint`). No columns, aggregates or subqueries.
pub unsafe fn is_pin_value(node: *mut pg_sys::Node) -> bool {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn row_dependent(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        use pg_sys::NodeTag::*;
        match (*node).type_ {
            T_Var | T_Aggref | T_WindowFunc | T_GroupingFunc | T_SubLink | T_SubPlan | T_AlternativeSubPlan
            | T_PlaceHolderVar | T_CurrentOfExpr | T_NextValueExpr | T_Query => true,
            // The value of the enclosing CASE's operand, or of the domain being checked.
            T_CaseTestExpr | T_CoerceToDomainValue => true,
            T_Param => (*node.cast::<pg_sys::Param>()).paramkind != pg_sys::ParamKind::PARAM_EXTERN,
            _ => pg_sys::expression_tree_walker(node, Some(row_dependent), context),
        }
    }
    if (*node).type_ == pg_sys::NodeTag::T_Const {
        return !(*node.cast::<pg_sys::Const>()).constisnull;
    }
    !row_dependent(node, std::ptr::null_mut()) && !pg_sys::contain_volatile_functions(node)
}

/// For a scan of `table` as range table entry `varno`: each clause that pins the distribution
/// column gives a disjunction of values (expression, is-array).
pub unsafe fn scan_pins(
    table: &DistributedTable,
    varno: i32,
    clauses: &[*mut pg_sys::Node],
) -> Vec<Vec<(*mut pg_sys::Node, bool)>> {
    let Some(attno) = table.distribution_attnum else { return Vec::new() };
    let is_column = |node: *mut pg_sys::Node| -> bool {
        !node.is_null()
            && (*node).type_ == pg_sys::NodeTag::T_Var
            && (*node.cast::<pg_sys::Var>()).varno == varno
            && (*node.cast::<pg_sys::Var>()).varattno == attno
            && (*node.cast::<pg_sys::Var>()).varlevelsup == 0
    };
    let mut pins = Vec::new();
    for &clause in clauses {
        if let Some((left, right)) = equality_sides(clause) {
            for (column, value) in [(left, right), (right, left)] {
                if is_column(column) && is_pin_value(value) && hashes_like(table, pg_sys::exprType(value)) {
                    pins.push(vec![(value, false)]);
                    break;
                }
            }
            continue;
        }
        if (*clause).type_ == pg_sys::NodeTag::T_ScalarArrayOpExpr {
            let saop = clause.cast::<pg_sys::ScalarArrayOpExpr>();
            if !(*saop).useOr || !is_equality((*saop).opno, (*saop).inputcollid) {
                continue;
            }
            let args = crate::commands::utility::list_pointers::<pg_sys::Node>((*saop).args);
            if args.len() != 2 || !is_column(compared_value(args[0])) || column_compared_as_char(args[0]) {
                continue;
            }
            let array = compared_value(args[1]);
            if is_pin_value(array) {
                let element = pg_sys::get_element_type(pg_sys::exprType(array));
                if element != pg_sys::InvalidOid && hashes_like(table, element) {
                    pins.push(vec![(array, true)]);
                }
            }
        }
    }
    pins
}
