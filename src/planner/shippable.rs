//! Whether an expression (or a whole statement) means the same on a worker as on the
//! coordinator, so that it may be sent there.
//!
//! Sent: built-in functions, operators, types and collations that give the same result
//! wherever they run: immutable ones, and stable ones that depend only on the settings workers
//! get from the coordinator (time zone, date style, ...); values of the enum types and domains,
//! and the collations, that the statement's tables' columns use (pg_sharding creates those on
//! the nodes).
//! Kept on the coordinator: other user-defined objects (they may not exist on the workers),
//! volatile functions, stable ones that read the clock, the session or the catalogs (now(),
//! current_setting(), to_regclass(), ...), object identifiers (a regclass names a coordinator
//! table), system columns (a shard's ctid is not the table's), and executor-internal
//! parameters.

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
                // Text search with the session's default configuration, when the workers do
                // not get it (a configuration of the user's own; transaction/remote.rs).
                || (TEXT_SEARCH_DEFAULTS.contains(&name.as_ref()) && !crate::transaction::remote::builtin_text_search_config())
                // Text to object identifier: resolved through the session's search_path and
                // catalogs, which are the coordinator's.
                || (name.starts_with("reg") && name.ends_with("in"))
                || ["pg_", "has_", "to_reg", "current_", "inet_", "txid_", "session_", "obj_description", "col_description"]
                    .iter()
                    .any(|prefix| name.starts_with(prefix))
        }
    }
}

/// Stable built-ins that read default_text_search_config (their forms without a configuration
/// argument).
const TEXT_SEARCH_DEFAULTS: &[&str] = &[
    "to_tsvector",
    "to_tsquery",
    "plainto_tsquery",
    "phraseto_tsquery",
    "websearch_to_tsquery",
    "ts_headline",
    "json_to_tsvector",
    "jsonb_to_tsvector",
    "get_current_ts_config",
];

/// Whether values of `type_oid` can come back from the workers in binary: built-in types, and
/// enums and domains over such types, whose binary forms name no type OID (an enum's is its
/// label, a domain's its base type's). Arrays and rows of user-defined types carry their
/// element types' OIDs, which differ on the workers: those come back as text.
pub(crate) unsafe fn binary_transportable(type_oid: pg_sys::Oid) -> bool {
    if builtin(type_oid) {
        return true;
    }
    match pg_sys::get_typtype(type_oid) as u8 {
        b'e' => true,
        b'd' => binary_transportable(pg_sys::getBaseType(type_oid)),
        _ => false,
    }
}

/// Object identifier types: a value names a coordinator object by OID.
pub(crate) fn names_local_object(type_oid: pg_sys::Oid) -> bool {
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
    let context = context.cast::<Context>();
    let rules = (*context).rules;
    use pg_sys::NodeTag::*;
    if let Some(type_oid) = value_type(node) {
        if !type_on_workers(context, type_oid) {
            return true;
        }
    }
    let unshippable = match (*node).type_ {
        T_Query => {
            return pg_sys::query_tree_walker(node.cast(), Some(walker), context.cast(), 0);
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
        T_Const => names_local_object((*node.cast::<pg_sys::Const>()).consttype),
        T_Param => {
            let param = node.cast::<pg_sys::Param>();
            // A sublink's own parameters (`x IN (SELECT ...)`) travel with the statement.
            !((*param).paramkind == pg_sys::ParamKind::PARAM_EXTERN
                || (rules.whole_statement && (*param).paramkind == pg_sys::ParamKind::PARAM_SUBLINK))
        }
        T_SQLValueFunction | T_NextValueExpr | T_CurrentOfExpr | T_SubPlan | T_AlternativeSubPlan | T_PlaceHolderVar | T_SetToDefault => true,
        T_SubLink => !rules.whole_statement,
        // An operator of the user's own: the nodes do not have it (its function may be a
        // built-in, which check_functions_in_node below accepts).
        T_OpExpr | T_DistinctExpr | T_NullIfExpr => !builtin((*node.cast::<pg_sys::OpExpr>()).opno),
        T_ScalarArrayOpExpr => !builtin((*node.cast::<pg_sys::ScalarArrayOpExpr>()).opno),
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
    if (output && !collation_on_workers(context, pg_sys::exprCollation(node)))
        || (input && !collation_on_workers(context, pg_sys::exprInputCollation(node)))
    {
        return true;
    }
    pg_sys::expression_tree_walker(node, Some(walker), context.cast())
}

/// The statement being checked, and what is known of the types its workers have.
struct Context {
    rules: Rules,
    /// The whole statement (a Query), whose tables tell which user-defined types the workers
    /// have; or an expression over one table's rows, `relid`.
    top: *mut pg_sys::Node,
    relid: Option<pg_sys::Oid>,
    /// The distributed and reference tables of the statement, read at the first value of a
    /// user-defined type.
    tables: Option<Vec<pg_sys::Oid>>,
}

/// The type of the value an expression node computes, for the nodes that name it in the SQL
/// a worker gets (a constant's or a cast's type, a function's result). Columns and parameters
/// are not among them: a shard's column has its type on the worker, and parameters travel as
/// text of no stated type.
unsafe fn value_type(node: *mut pg_sys::Node) -> Option<pg_sys::Oid> {
    use pg_sys::NodeTag::*;
    match (*node).type_ {
        T_Const | T_FuncExpr | T_CoerceViaIO | T_CoerceToDomain | T_ArrayCoerceExpr | T_RelabelType | T_ArrayExpr | T_RowExpr
        | T_CaseExpr | T_CoalesceExpr | T_MinMaxExpr | T_NullIfExpr | T_Aggref | T_WindowFunc | T_SubscriptingRef
        | T_FieldSelect | T_CollateExpr | T_ConvertRowtypeExpr => Some(pg_sys::exprType(node)),
        _ => None,
    }
}

/// Whether the workers that run the statement know `type_oid` under the coordinator's name
/// for it: a built-in type (same OID everywhere), or an enum or domain (or an array of one)
/// that a column of a distributed or reference table of the statement is built on. types.rs
/// creates those, with the coordinator's definition, on every node before a shard of such a
/// table, and refuses renaming or dropping them while tables use them.
unsafe fn type_on_workers(context: *mut Context, type_oid: pg_sys::Oid) -> bool {
    if builtin(type_oid) {
        return true;
    }
    let element = pg_sys::get_element_type(type_oid);
    let wanted = if element == pg_sys::InvalidOid { type_oid } else { element };
    if builtin(wanted) {
        return true;
    }
    tables(context).iter().any(|&relid| columns_reach(relid, wanted))
}

/// Whether the workers that run the statement have the collation: a built-in one, or one that
/// a column of a distributed or reference table of the statement uses (types.rs creates those
/// on the nodes with the tables' types).
unsafe fn collation_on_workers(context: *mut Context, collation: pg_sys::Oid) -> bool {
    builtin(collation) || tables(context).iter().any(|&relid| columns_have_collation(relid, collation))
}

unsafe fn tables<'a>(context: *mut Context) -> &'a [pg_sys::Oid] {
    if (*context).tables.is_none() {
        let tables = statement_tables((*context).top, (*context).relid);
        (*context).tables = Some(tables);
    }
    (*context).tables.as_deref().unwrap_or_default()
}

/// The distributed and reference tables whose shards run the check's expression.
unsafe fn statement_tables(top: *mut pg_sys::Node, relid: Option<pg_sys::Oid>) -> Vec<pg_sys::Oid> {
    let mut relids = Vec::new();
    match relid {
        Some(relid) => relids.push(relid),
        None if !top.is_null() && (*top).type_ == pg_sys::NodeTag::T_Query => {
            relations_walker(top, (&mut relids as *mut Vec<pg_sys::Oid>).cast());
        }
        None => {}
    }
    relids.retain(|&relid| matches!(crate::catalog::cache::table(relid), Ok(Some(_))));
    relids
}

#[pgrx::pg_guard]

unsafe extern "C-unwind" fn relations_walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
    if node.is_null() {
        return false;
    }
    match (*node).type_ {
        pg_sys::NodeTag::T_Query => {
            pg_sys::query_tree_walker(node.cast(), Some(relations_walker), context, pg_sys::QTW_EXAMINE_RTES_BEFORE as i32)
        }
        pg_sys::NodeTag::T_RangeTblEntry => {
            let rte = node.cast::<pg_sys::RangeTblEntry>();
            let relids = &mut *context.cast::<Vec<pg_sys::Oid>>();
            if (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION && !relids.contains(&(*rte).relid) {
                relids.push((*rte).relid);
            }
            false
        }
        _ => pg_sys::expression_tree_walker(node, Some(relations_walker), context),
    }
}

/// Whether a column of table `relid` has the type `wanted`, directly or as the element of an
/// array or the base of a domain (at any depth).
unsafe fn columns_reach(relid: pg_sys::Oid, wanted: pg_sys::Oid) -> bool {
    any_column(relid, |attr| type_reaches(attr.atttypid, wanted))
}

unsafe fn columns_have_collation(relid: pg_sys::Oid, collation: pg_sys::Oid) -> bool {
    any_column(relid, |attr| attr.attcollation == collation)
}

/// Whether a column of table `relid` (not a dropped one) meets `test`.
unsafe fn any_column(relid: pg_sys::Oid, test: impl Fn(&pg_sys::FormData_pg_attribute) -> bool) -> bool {
    let relation = pg_sys::RelationIdGetRelation(relid);
    if relation.is_null() {
        return false;
    }
    let tupdesc = (*relation).rd_att;
    let mut found = false;
    for k in 0..(*tupdesc).natts as usize {
        let attr = &*(*tupdesc).attrs.as_ptr().add(k);
        if !attr.attisdropped && test(attr) {
            found = true;
            break;
        }
    }
    pg_sys::RelationClose(relation);
    found
}

/// Whether `wanted` is `type_oid`, or what an array or domain of it is built on. (A domain's
/// base is followed to the bottom, so a domain between two others is not found: such a value
/// stays on the coordinator.)
unsafe fn type_reaches(type_oid: pg_sys::Oid, wanted: pg_sys::Oid) -> bool {
    let mut current = type_oid;
    // Each step goes from an array to its element or from a domain to its base.
    for _ in 0..8 {
        if current == wanted {
            return true;
        }
        if builtin(current) {
            return false;
        }
        let element = pg_sys::get_element_type(current);
        current = if element != pg_sys::InvalidOid {
            element
        } else if pg_sys::get_typtype(current) as u8 == b'd' {
            pg_sys::getBaseType(current)
        } else {
            return false;
        };
    }
    false
}

/// Whether `node` may be evaluated on a worker.
pub unsafe fn shippable(node: *mut pg_sys::Node, rules: Rules) -> bool {
    check(node, rules, None)
}

/// Whether `node`, an expression over the rows of table `relid` alone, may be evaluated on
/// that table's shards.
pub unsafe fn shippable_over(node: *mut pg_sys::Node, rules: Rules, relid: pg_sys::Oid) -> bool {
    check(node, rules, Some(relid))
}

unsafe fn check(node: *mut pg_sys::Node, rules: Rules, relid: Option<pg_sys::Oid>) -> bool {
    if pg_sys::contain_volatile_functions(node) {
        return false;
    }
    let mut context = Context { rules, top: node, relid, tables: None };
    !walker(node, (&mut context as *mut Context).cast())
}
