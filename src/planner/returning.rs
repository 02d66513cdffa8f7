//! RETURNING lists the shards cannot evaluate: volatile or user-defined functions, a table's
//! whole row (which is a value of the shard's own row type on a worker) or its tableoid. The shards return the
//! columns the list reads instead, and the coordinator evaluates the list over them, once per
//! changed row, as a single server does.

use pgrx::pg_sys;

use crate::commands::utility::list_pointers;

/// The columns a RETURNING list reads: what the shards return (`shipped`, a RETURNING list)
/// and how the coordinator types them (`outputs`: the columns themselves).
pub struct ColumnsRead {
    pub shipped: *mut pg_sys::List,
    pub outputs: Vec<*mut pg_sys::TargetEntry>,
}

/// The columns `parse`'s RETURNING list reads, `None` when it has subqueries (which the
/// coordinator would have to plan).
pub unsafe fn columns_read(parse: *mut pg_sys::Query) -> Option<ColumnsRead> {
    let mut vars: Vec<*mut pg_sys::Var> = Vec::new();
    if collect_vars((*parse).returningList.cast(), &mut vars) {
        return None;
    }
    let rtable = list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable);
    let mut shipped: *mut pg_sys::List = std::ptr::null_mut();
    let mut outputs = Vec::new();
    for (i, &var) in vars.iter().enumerate() {
        let resno = (i + 1) as i16;
        let name = pg_sys::pstrdup(format!("c{resno}\0").as_ptr().cast());
        let rte = *rtable.get((*var).varno as usize - 1)?;
        let relation = (*rte).rtekind == pg_sys::RTEKind::RTE_RELATION;
        let expr: *mut pg_sys::Node = if (*var).varattno == 0 && relation {
            whole_row((*var).varno, (*rte).relid)?
        } else if (*var).varattno as i32 == pg_sys::TableOidAttributeNumber && relation {
            // The table's oid, as on a single server (a shard's tableoid is its own).
            pg_sys::makeConst(pg_sys::OIDOID, -1, pg_sys::InvalidOid, 4, pg_sys::Datum::from((*rte).relid.to_u32()), false, true)
                .cast()
        } else {
            pg_sys::copyObjectImpl(var.cast()).cast()
        };
        shipped = pg_sys::lappend(shipped, pg_sys::makeTargetEntry(expr.cast(), resno, name, false).cast());
        outputs.push(pg_sys::makeTargetEntry(pg_sys::copyObjectImpl(var.cast()).cast(), resno, name, false));
    }
    Some(ColumnsRead { shipped, outputs })
}

/// `ROW(t.a, t.b, ...)`, an anonymous row of the table's columns (not the dropped ones): its
/// text and binary forms are those of the table's row type, which the coordinator reads.
unsafe fn whole_row(varno: i32, relid: pg_sys::Oid) -> Option<*mut pg_sys::Node> {
    let relation = pg_sys::RelationIdGetRelation(relid);
    if relation.is_null() {
        return None;
    }
    let tupdesc = (*relation).rd_att;
    let row: *mut pg_sys::RowExpr = pg_sys::palloc0(std::mem::size_of::<pg_sys::RowExpr>()).cast();
    (*row).xpr.type_ = pg_sys::NodeTag::T_RowExpr;
    (*row).row_typeid = pg_sys::RECORDOID;
    (*row).row_format = pg_sys::CoercionForm::COERCE_IMPLICIT_CAST;
    (*row).location = -1;
    for k in 0..(*tupdesc).natts as usize {
        let attr = (*tupdesc).attrs.as_ptr().add(k);
        if (*attr).attisdropped {
            continue;
        }
        let column = pg_sys::makeVar(varno, (*attr).attnum, (*attr).atttypid, (*attr).atttypmod, (*attr).attcollation, 0);
        (*row).args = pg_sys::lappend((*row).args, column.cast());
        let name = pg_sys::pstrdup((*attr).attname.data.as_ptr());
        (*row).colnames = pg_sys::lappend((*row).colnames, pg_sys::makeString(name).cast());
    }
    pg_sys::RelationClose(relation);
    Some(row.cast())
}

/// Adds the distinct columns of this level in `node` to `vars`; true when `node` has a
/// subquery.
unsafe fn collect_vars(node: *mut pg_sys::Node, vars: &mut Vec<*mut pg_sys::Var>) -> bool {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        let vars = &mut *(context as *mut Vec<*mut pg_sys::Var>);
        match (*node).type_ {
            pg_sys::NodeTag::T_SubLink | pg_sys::NodeTag::T_Query => true,
            pg_sys::NodeTag::T_Var => {
                let var = node.cast::<pg_sys::Var>();
                if !vars.iter().any(|&v| (*v).varno == (*var).varno && (*v).varattno == (*var).varattno) {
                    vars.push(var);
                }
                false
            }
            _ => pg_sys::expression_tree_walker(node, Some(walker), context),
        }
    }
    walker(node, (vars as *mut Vec<*mut pg_sys::Var>).cast())
}

/// The RETURNING list over the scan's columns (`outputs`, as `columns_read` made them): each
/// column becomes the scan tuple's attribute, for the ShardScan's projection.
pub unsafe fn over_scan_columns(returning: *mut pg_sys::List, outputs: &[*mut pg_sys::TargetEntry]) -> *mut pg_sys::List {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn mutate(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> *mut pg_sys::Node {
        if node.is_null() {
            return node;
        }
        let outputs = &*(context as *const Vec<*mut pg_sys::TargetEntry>);
        if (*node).type_ == pg_sys::NodeTag::T_Var {
            let var = node.cast::<pg_sys::Var>();
            for &entry in outputs {
                let column = (*entry).expr.cast::<pg_sys::Var>();
                if (*column).varno == (*var).varno && (*column).varattno == (*var).varattno {
                    let copy: *mut pg_sys::Var = pg_sys::copyObjectImpl(var.cast()).cast();
                    (*copy).varno = pg_sys::INDEX_VAR;
                    (*copy).varattno = (*entry).resno;
                    return copy.cast();
                }
            }
            return node;
        }
        let mutator: unsafe extern "C-unwind" fn(*mut pg_sys::Node, *mut std::ffi::c_void) -> *mut pg_sys::Node = mutate;
        // SAFETY: PostgreSQL 15 declares the mutator without prototype; this is its real signature.
        pg_sys::expression_tree_mutator(node, Some(std::mem::transmute(mutator)), context)
    }
    let outputs = outputs.to_vec();
    let copy: *mut pg_sys::List = pg_sys::copyObjectImpl(returning.cast()).cast();
    let mut list: *mut pg_sys::List = std::ptr::null_mut();
    for entry in list_pointers::<pg_sys::TargetEntry>(copy) {
        (*entry).expr = mutate((*entry).expr.cast(), (&outputs as *const Vec<_>).cast_mut().cast()).cast();
        pg_sys::fix_opfuncids((*entry).expr.cast());
        list = pg_sys::lappend(list, entry.cast());
    }
    list
}
