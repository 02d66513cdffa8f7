//! Whether an expression (or a whole statement) means the same on a worker as on the
//! coordinator, so that it may be sent there.
//!
//! Sent: built-in functions, operators, types and collations that give the same result
//! wherever they run: immutable ones, and stable ones that depend only on the settings workers
//! get from the coordinator (time zone, date style, ...). Kept on the coordinator: anything
//! user-defined (it may not exist on the workers), volatile functions, stable ones that read
//! the clock, the session or the catalogs (now(), current_setting(), to_regclass(), ...),
//! object identifiers (a regclass names a coordinator table), system columns (a shard's ctid is
//! not the table's), and executor-internal parameters.

use pgrx::pg_sys;

fn builtin(oid: pg_sys::Oid) -> bool {
    oid.to_u32() < pg_sys::FirstNormalObjectId
}

#[derive(Clone, Copy)]
pub struct Rules {
    /// Vars of outer query levels and of other relations are allowed (whole statements); a
    /// scan's quals may only use the scanned relation.
    pub whole_statement: bool,
    /// The ctid and xmin of rows may be read: the statement is the second step of
    /// chosen_rows.rs, which compares them with what the same shard returned.
    pub row_identity: bool,
}

#[pgrx::pg_guard]

unsafe extern "C-unwind" fn user_defined_function(func: pg_sys::Oid, _context: *mut std::ffi::c_void) -> bool {
    if !builtin(func) {
        return true;
    }
    match pg_sys::func_volatile(func) as u8 {
        b'i' => false,
        b'v' => true,
        // Stable built-ins give the same result on a worker when they depend only on the
        // settings the worker gets from us (time zone, date style, ...). Those that read the
        // clock, the session or the catalogs do not.
        _ => {
            let name = std::ffi::CStr::from_ptr(pg_sys::get_func_name(func)).to_string_lossy();
            ["now", "transaction_timestamp", "statement_timestamp", "version", "timeofday"].contains(&name.as_ref())
                // Text to object identifier: resolved through the session's search_path and
                // catalogs, which are the coordinator's.
                || (name.starts_with("reg") && name.ends_with("in"))
                || ["pg_", "has_", "to_reg", "current_", "inet_", "txid_", "session_", "obj_description", "col_description"]
                    .iter()
                    .any(|prefix| name.starts_with(prefix))
        }
    }
}

/// Object identifier types: a value names a coordinator object by OID.
fn names_local_object(type_oid: pg_sys::Oid) -> bool {
    [
        pg_sys::REGCLASSOID,
        pg_sys::REGTYPEOID,
        pg_sys::REGPROCOID,
        pg_sys::REGPROCEDUREOID,
        pg_sys::REGOPEROID,
        pg_sys::REGOPERATOROID,
        pg_sys::REGNAMESPACEOID,
        pg_sys::REGROLEOID,
        pg_sys::REGCONFIGOID,
        pg_sys::REGDICTIONARYOID,
        pg_sys::REGCOLLATIONOID,
        pg_sys::OIDOID,
    ]
    .contains(&type_oid)
}

#[pgrx::pg_guard]

unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
    if node.is_null() {
        return false;
    }
    let rules = *(context as *const Rules);
    use pg_sys::NodeTag::*;
    let unshippable = match (*node).type_ {
        T_Query => {
            return pg_sys::query_tree_walker(node.cast(), Some(walker), context, 0);
        }
        T_Var => {
            let var = node.cast::<pg_sys::Var>();
            let identity = rules.row_identity
                && crate::planner::scan_path::ROW_IDENTITY.iter().any(|&(column, _, _)| column == (*var).varattno as i32);
            // A table's whole row is a value of the shard's own row type on a worker: its type
            // shows (`pg_typeof`, the cast ruleutils prints), so the coordinator builds it.
            let table_row = (*var).varattno == 0 && (*var).vartype != pg_sys::RECORDOID;
            ((*var).varattno < 0 && !identity) || table_row || (!rules.whole_statement && (*var).varlevelsup != 0)
        }
        T_Const => {
            let type_oid = (*node.cast::<pg_sys::Const>()).consttype;
            !builtin_type(type_oid) || names_local_object(type_oid)
        }
        T_Param => {
            let param = node.cast::<pg_sys::Param>();
            // A sublink's own parameters (`x IN (SELECT ...)`) travel with the statement.
            !((*param).paramkind == pg_sys::ParamKind::PARAM_EXTERN
                || (rules.whole_statement && (*param).paramkind == pg_sys::ParamKind::PARAM_SUBLINK))
        }
        T_SQLValueFunction | T_NextValueExpr | T_CurrentOfExpr | T_SubPlan | T_AlternativeSubPlan | T_PlaceHolderVar | T_SetToDefault => true,
        T_SubLink => !rules.whole_statement,
        _ => false,
    };
    if unshippable {
        return true;
    }
    if pg_sys::check_functions_in_node(node, Some(user_defined_function), std::ptr::null_mut()) {
        return true;
    }
    // Collations named by the expression must exist on the workers too.
    let (output, input) = match (*node).type_ {
        T_FuncExpr | T_OpExpr | T_DistinctExpr | T_NullIfExpr | T_ScalarArrayOpExpr | T_Aggref | T_WindowFunc
        | T_MinMaxExpr => (true, true),
        T_Var | T_Const | T_Param | T_RelabelType | T_CaseExpr | T_CoerceViaIO | T_CollateExpr | T_ArrayExpr => {
            (true, false)
        }
        _ => (false, false),
    };
    if (output && !builtin(pg_sys::exprCollation(node))) || (input && !builtin(pg_sys::exprInputCollation(node))) {
        return true;
    }
    pg_sys::expression_tree_walker(node, Some(walker), context)
}

/// Types the workers know by the same OID: built-in ones. (Values of other types are sent as
/// text, but expressions built on them are kept on the coordinator.)
fn builtin_type(type_oid: pg_sys::Oid) -> bool {
    builtin(type_oid)
}

/// Whether `node` may be evaluated on a worker.
pub unsafe fn shippable(node: *mut pg_sys::Node, rules: Rules) -> bool {
    if pg_sys::contain_volatile_functions(node) {
        return false;
    }
    let mut rules = rules;
    !walker(node, (&mut rules as *mut Rules).cast())
}
