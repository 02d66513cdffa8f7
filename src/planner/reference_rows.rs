//! UPDATE and DELETE of a reference table that the workers cannot each run on their own copy:
//! the statement reads distributed tables or tables that live on the coordinator only
//! (`UPDATE tags t SET hits = (SELECT count(*) FROM events e WHERE e.tag = t.id)`, `DELETE FROM
//! tags USING local_list l WHERE ...`), or calls volatile functions (`SET x = random()`), which
//! every copy would evaluate differently.
//!
//! The coordinator's copy is the table itself. PostgreSQL runs the statement there (the
//! distributed tables it reads through ShardScans, see local_write.rs), so it means exactly
//! what it means on one server, locks and all, and RETURNING is evaluated there. The changed
//! rows then reach every worker's copy by their primary key: the statement's RETURNING also
//! returns each row's key and the new values of the columns it sets, and each worker runs
//! `UPDATE <copy> SET a = r.c3 FROM unnest(($1)::<key type>[], ...) r WHERE <copy>.<key> =
//! r.c1 ...` (or `DELETE ... USING`) with them as array parameters (executor/remote_scan.rs).
//! Every copy must change as many rows as the coordinator's did, or the statement fails.
//!
//! This needs a primary key (or a replica identity index) that the statement does not change,
//! since RETURNING only sees the new row.

use pgrx::pg_sys;
use pgrx::PgSqlErrorCode;

use crate::catalog::tables::DistributedTable;
use crate::commands::utility::list_pointers;
use crate::error::{Result, ShardingError};
use crate::planner::broadcast::sendable_type;
use crate::planner::chosen_rows::{type_equality, Rows};

/// The two statements of such a write.
pub struct ReplicatedWrite {
    /// The statement on the coordinator's copy: the user's, reading distributed tables
    /// through subqueries, its RETURNING preceded by `columns` entries (the key and the new
    /// values) for the workers.
    pub local: *mut pg_sys::Query,
    /// The statement on each worker's copy, over array parameters `$1...$columns`.
    pub remote: *mut pg_sys::Query,
    pub columns: usize,
}

fn unsupported(message: String) -> ShardingError {
    ShardingError::new(PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, message)
}

/// Plans the two statements of `parse`, an UPDATE or DELETE of reference table `table`.
pub unsafe fn plan(parse: *mut pg_sys::Query, table: &DistributedTable) -> Result<ReplicatedWrite> {
    let rti = (*parse).resultRelation;
    let target = list_pointers::<pg_sys::RangeTblEntry>((*parse).rtable)[rti as usize - 1];
    let keys = key_columns((*target).relid);
    if keys.is_empty() {
        return Err(unsupported(format!(
            "UPDATE or DELETE of reference table \"{}\" reading distributed or local tables, or calling volatile functions, needs a primary key on it",
            table.name
        ))
        .detail("The coordinator changes its copy first; the workers' copies find the same rows by their key.")
        .hint("Add a primary key to the table."));
    }

    // The workers' columns: the key, then each new value.
    let mut hidden: Vec<*mut pg_sys::Var> = Vec::new();
    for &attno in &keys {
        hidden.push(column_var(rti, (*target).relid, attno));
    }
    let mut assignments = Vec::new();
    if (*parse).commandType == pg_sys::CmdType::CMD_UPDATE {
        for entry in list_pointers::<pg_sys::TargetEntry>((*parse).targetList) {
            if (*entry).resjunk {
                continue;
            }
            if keys.contains(&(*entry).resno) {
                let name = std::ffi::CStr::from_ptr((*entry).resname).to_string_lossy();
                return Err(unsupported(format!(
                    "UPDATE of reference table \"{}\" reading distributed or local tables, or calling volatile functions, cannot set its key column \"{name}\"",
                    table.name
                ))
                .detail("The workers' copies find the changed rows by their key."));
            }
            assignments.push(((*entry).resno, (*entry).resname, hidden.len()));
            hidden.push(column_var(rti, (*target).relid, (*entry).resno));
        }
    }
    for &var in &hidden {
        if !sendable_type((*var).vartype) {
            let name = std::ffi::CStr::from_ptr(pg_sys::format_type_be((*var).vartype)).to_string_lossy();
            return Err(unsupported(format!(
                "UPDATE or DELETE of reference table \"{}\" reading distributed or local tables, or calling volatile functions, cannot send values of type {name} to the workers' copies",
                table.name
            )));
        }
    }

    let local: *mut pg_sys::Query = pg_sys::copyObjectImpl(parse.cast()).cast();
    super::local_write::wrap_distributed_tables(local, true)?;
    let mut returning: *mut pg_sys::List = std::ptr::null_mut();
    for (i, &var) in hidden.iter().enumerate() {
        let name = std::ffi::CString::new(format!("pgs_row_{}", i + 1)).map_err(|e| ShardingError::internal(e.to_string()))?;
        returning = pg_sys::lappend(returning, pg_sys::makeTargetEntry(var.cast(), (i + 1) as i16, pg_sys::pstrdup(name.as_ptr()), false).cast());
    }
    for (i, entry) in list_pointers::<pg_sys::TargetEntry>((*local).returningList).into_iter().enumerate() {
        (*entry).resno = (hidden.len() + i + 1) as i16;
        returning = pg_sys::lappend(returning, entry.cast());
    }
    (*local).returningList = returning;

    let types: Vec<_> = hidden.iter().map(|&var| ((*var).vartype, (*var).vartypmod, (*var).varcollid)).collect();
    let rows = Rows::new(&types, 1)?;
    let mut conditions = Vec::new();
    for (i, &attno) in keys.iter().enumerate() {
        let column = column_var(1, (*target).relid, attno);
        let condition = type_equality(column, rows.var(i)).ok_or_else(|| {
            let name = std::ffi::CStr::from_ptr(pg_sys::format_type_be((*column).vartype)).to_string_lossy();
            unsupported(format!("the key of reference table \"{}\" has type {name}, which has no equality operator", table.name))
        })?;
        conditions.push(condition);
    }
    let remote = rows.statement(parse, target, conditions, &assignments, std::ptr::null_mut());
    Ok(ReplicatedWrite { local, remote, columns: hidden.len() })
}

/// The columns of the table's primary key, or else of its replica identity index; none when
/// it has neither.
unsafe fn key_columns(relid: pg_sys::Oid) -> Vec<i16> {
    let relation = pg_sys::RelationIdGetRelation(relid);
    let mut keys = Vec::new();
    for kind in [pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_PRIMARY_KEY, pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_IDENTITY_KEY] {
        let set = pg_sys::RelationGetIndexAttrBitmap(relation, kind);
        let mut member = pg_sys::bms_next_member(set, -1);
        while member >= 0 {
            keys.push((member + pg_sys::FirstLowInvalidHeapAttributeNumber) as i16);
            member = pg_sys::bms_next_member(set, member);
        }
        if !keys.is_empty() {
            break;
        }
    }
    pg_sys::RelationClose(relation);
    keys
}

/// A reference to column `attno` of table `relid`, range table entry `rti`.
unsafe fn column_var(rti: i32, relid: pg_sys::Oid, attno: i16) -> *mut pg_sys::Var {
    let (mut type_oid, mut typmod, mut collation) = (pg_sys::InvalidOid, -1, pg_sys::InvalidOid);
    pg_sys::get_atttypetypmodcoll(relid, attno, &mut type_oid, &mut typmod, &mut collation);
    pg_sys::makeVar(rti, attno, type_oid, typmod, collation, 0)
}
