//! UPDATE and DELETE of a table that lives on the coordinator only, reading distributed tables
//! (`DELETE FROM local WHERE id IN (SELECT user_id FROM orders ...)`, `UPDATE local l SET ...
//! FROM users u WHERE ...`), MERGE into a local table, and `SELECT ... FOR UPDATE OF local`
//! joined with distributed tables: PostgreSQL plans them, with the distributed tables read through ShardScans. Such a
//! plan marks every other table of the statement so that it can fetch a joined row again by
//! its ctid when a target row changed concurrently (EvalPlanQual), which a ShardScan cannot
//! do: the coordinator's table is empty.
//!
//! So each distributed table read by such a statement becomes a subquery over it, `(SELECT
//! <every column> FROM t WHERE <the statement's conditions on t alone> OFFSET 0)`: PostgreSQL
//! keeps a subquery with OFFSET as it is (it does not merge it into the statement), and for a
//! subquery it keeps a copy of the joined row instead of its ctid. Column numbers stay the
//! same (a dropped column reads NULL), so the rest of the statement is unchanged; the
//! conditions moved inside still reach the shards.

use std::ffi::CStr;

use pgrx::pg_sys;

use crate::catalog::{cache, tables::Method};
use crate::commands::utility::list_pointers;
use crate::error::Result;
use crate::planner::broadcast::{own_conditions, referenced_columns, renumber_vars};

/// Rewrites `parse` (an UPDATE or DELETE of a local table, or a SELECT locking rows) in place
/// as described above; distributed tables a FOR UPDATE/SHARE clause names stay as they are.
///
/// `move_conditions`: whether the statement's conditions on a table alone go into its
/// subquery (not for MERGE, whose join condition decides between its actions rather than
/// filtering).
pub unsafe fn wrap_distributed_tables(parse: *mut pg_sys::Query, move_conditions: bool) -> Result<()> {
    // The queries first, then the changes: a new subquery holds the table again.
    let mut queries = Vec::new();
    collect_queries(parse.cast(), &mut queries);
    for query in queries {
        let target = if query == parse { (*parse).resultRelation as usize } else { 0 };
        let rtable = (*query).rtable;
        for index in 0..list_pointers::<pg_sys::RangeTblEntry>(rtable).len() {
            let rti = index + 1;
            let cell = (*rtable).elements.add(index);
            let rte = (*cell).ptr_value as *mut pg_sys::RangeTblEntry;
            if rti == target || (*rte).rtekind != pg_sys::RTEKind::RTE_RELATION || !(*rte).tablesample.is_null() {
                continue;
            }
            match cache::table_unless_reentrant((*rte).relid)? {
                Some(table) if table.method == Method::Hash => {}
                _ => continue,
            }
            // Whole rows and system columns of a subquery would be other ones.
            if referenced_columns(query, rti as u32).is_none() || is_locked(query, rti as u32) {
                continue;
            }
            (*cell).ptr_value = wrapped(query, rte, rti as u32, move_conditions).cast();
        }
    }
    Ok(())
}

/// Every Query of the statement: itself, its WITH queries, subqueries in FROM and in
/// expressions, at any depth.
unsafe fn collect_queries(node: *mut pg_sys::Node, out: &mut Vec<*mut pg_sys::Query>) {
    #[pgrx::pg_guard]
    unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, context: *mut std::ffi::c_void) -> bool {
        if node.is_null() {
            return false;
        }
        if (*node).type_ == pg_sys::NodeTag::T_Query {
            (*(context as *mut Vec<*mut pg_sys::Query>)).push(node.cast());
            return pg_sys::query_tree_walker(node.cast(), Some(walker), context, 0);
        }
        pg_sys::expression_tree_walker(node, Some(walker), context)
    }
    walker(node, (out as *mut Vec<*mut pg_sys::Query>).cast());
}

/// `(SELECT <every column> FROM <rte> WHERE <conditions on it alone> OFFSET 0)`, under the
/// table's alias and column names; the conditions leave `query`.
unsafe fn wrapped(query: *mut pg_sys::Query, rte: *mut pg_sys::RangeTblEntry, rti: u32, move_conditions: bool) -> *mut pg_sys::RangeTblEntry {
    let slots = if move_conditions { own_conditions(query, rti) } else { Vec::new() };
    let mut conjuncts: *mut pg_sys::List = std::ptr::null_mut();
    for &slot in &slots {
        let condition: *mut pg_sys::Node = pg_sys::copyObjectImpl((*slot).cast()).cast();
        renumber_vars(condition, 1);
        conjuncts = pg_sys::lappend(conjuncts, condition.cast());
        *slot = pg_sys::makeBoolConst(true, false).cast();
    }
    let quals: *mut pg_sys::Node = if conjuncts.is_null() { std::ptr::null_mut() } else { pg_sys::make_ands_explicit(conjuncts).cast() };

    let relation = pg_sys::RelationIdGetRelation((*rte).relid);
    let tupdesc = (*relation).rd_att;
    let mut target: *mut pg_sys::List = std::ptr::null_mut();
    for i in 0..(*tupdesc).natts as usize {
        let attr = (*tupdesc).attrs.as_ptr().add(i);
        let resno = (i + 1) as i16;
        let (expr, name): (*mut pg_sys::Expr, *mut std::ffi::c_char) = if (*attr).attisdropped {
            (pg_sys::makeNullConst(pg_sys::INT4OID, -1, pg_sys::InvalidOid).cast(), pg_sys::pstrdup(c"".as_ptr()))
        } else {
            let var = pg_sys::makeVar(1, resno, (*attr).atttypid, (*attr).atttypmod, (*attr).attcollation, 0);
            (var.cast(), pg_sys::pstrdup((*attr).attname.data.as_ptr()))
        };
        target = pg_sys::lappend(target, pg_sys::makeTargetEntry(expr, resno, name, false).cast());
    }
    pg_sys::RelationClose(relation);

    let inner: *mut pg_sys::RangeTblEntry = pg_sys::copyObjectImpl(rte.cast()).cast();
    let subquery = super::broadcast::select_from(inner, quals, target);
    (*subquery).canSetTag = false;
    (*subquery).limitOffset = pg_sys::makeConst(pg_sys::INT8OID, -1, pg_sys::InvalidOid, 8, pg_sys::Datum::from(0i64), false, true).cast();
    (*subquery).limitOption = pg_sys::LimitOption::LIMIT_OPTION_COUNT;

    let outer: *mut pg_sys::RangeTblEntry = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblEntry>()).cast();
    (*outer).type_ = pg_sys::NodeTag::T_RangeTblEntry;
    (*outer).rtekind = pg_sys::RTEKind::RTE_SUBQUERY;
    (*outer).subquery = subquery;
    let name = if (*rte).alias.is_null() { (*(*rte).eref).aliasname } else { (*(*rte).alias).aliasname };
    let name = pg_sys::pstrdup(CStr::from_ptr(name).as_ptr());
    (*outer).alias = pg_sys::makeAlias(name, std::ptr::null_mut());
    (*outer).eref = pg_sys::makeAlias(name, pg_sys::copyObjectImpl((*(*rte).eref).colnames.cast()).cast());
    (*outer).inFromCl = (*rte).inFromCl;
    (*outer).inh = false;
    outer
}

/// Whether a FOR UPDATE/SHARE clause of `query` names entry `rti`.
unsafe fn is_locked(query: *mut pg_sys::Query, rti: u32) -> bool {
    list_pointers::<pg_sys::RowMarkClause>((*query).rowMarks).iter().any(|&mark| (*mark).rti == rti)
}
