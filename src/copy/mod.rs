//! COPY on distributed and reference tables: FROM routes rows to shards, TO gathers them.

pub mod encode;
mod from;
pub mod router;
pub mod shard_writer;
mod to;

use std::rc::Rc;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::catalog::tables::DistributedTable;
use crate::commands::utility::UtilityCall;
use crate::error::{Result, ShardingError};

pub fn run_copy(call: &UtilityCall, targets: &[Rc<DistributedTable>]) -> Result<()> {
    let statement = call.statement().cast::<pg_sys::CopyStmt>();
    // SAFETY: the operations table routes only CopyStmt here.
    unsafe {
        if !(*statement).whereClause.is_null() {
            return Err(ShardingError::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                "COPY FROM ... WHERE is not supported on distributed tables yet",
            ));
        }
        check_privileges(statement, &targets[0])?;
        // Row-level security: COPY FROM is refused as PostgreSQL refuses it; COPY TO would read
        // the shards without the policies.
        if pg_sys::check_enable_rls(targets[0].relid, pg_sys::InvalidOid, false) == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32 {
            return Err(if (*statement).is_from {
                ShardingError::new(PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, "COPY FROM not supported with row-level security")
                    .hint("Use INSERT statements instead.")
            } else {
                ShardingError::new(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    format!("COPY {} TO under row-level security is not supported yet", targets[0].name),
                )
                .hint(format!("Use COPY (SELECT * FROM {}) TO instead.", targets[0].name))
            });
        }
        if (*statement).is_from {
            // The checks DoCopy makes before writing.
            pg_sys::PreventCommandIfReadOnly(c"COPY FROM".as_ptr());
            pg_sys::PreventCommandIfParallelMode(c"COPY FROM".as_ptr());
            pg_sys::PreventCommandDuringRecovery(c"COPY FROM".as_ptr());
        }
        if (*statement).is_from {
            from::copy_from(call, statement, &targets[0])
        } else {
            to::copy_to(call, statement, &targets[0])
        }
    }
}

/// The checks COPY itself makes: table privilege, and server-file/program roles.
unsafe fn check_privileges(statement: *mut pg_sys::CopyStmt, table: &DistributedTable) -> Result<()> {
    let user = pg_sys::GetUserId();
    let from = (*statement).is_from;
    if !(*statement).filename.is_null() {
        let (role, what) = if (*statement).is_program {
            (pg_sys::ROLE_PG_EXECUTE_SERVER_PROGRAM, "pg_execute_server_program")
        } else if from {
            (pg_sys::ROLE_PG_READ_SERVER_FILES, "pg_read_server_files")
        } else {
            (pg_sys::ROLE_PG_WRITE_SERVER_FILES, "pg_write_server_files")
        };
        if !pg_sys::has_privs_of_role(user, pg_sys::Oid::from(role)) {
            return Err(ShardingError::new(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("permission denied to COPY {} a file or program", if from { "from" } else { "to" }),
            )
            .hint(format!("Only roles with privileges of the \"{what}\" role may do this.")));
        }
    }
    let mode = (if from { pg_sys::ACL_INSERT } else { pg_sys::ACL_SELECT }) as pg_sys::AclMode;
    if pg_sys::pg_class_aclcheck(table.relid, user, mode) == pg_sys::AclResult::ACLCHECK_OK || columns_allowed(statement, table.relid, user, mode) {
        return Ok(());
    }
    Err(ShardingError::new(PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, format!("permission denied for table {}", table.name)))
}

/// Whether `user` has `mode` on every column COPY reads or writes (its column list, or every
/// column but generated ones), as COPY checks column privileges.
unsafe fn columns_allowed(statement: *mut pg_sys::CopyStmt, relid: pg_sys::Oid, user: pg_sys::Oid, mode: pg_sys::AclMode) -> bool {
    let mut attnums = Vec::new();
    let names = crate::commands::utility::list_pointers::<pg_sys::String>((*statement).attlist);
    if names.is_empty() {
        let relation = pg_sys::RelationIdGetRelation(relid);
        if relation.is_null() {
            return false;
        }
        let tupdesc = (*relation).rd_att;
        for i in 0..(*tupdesc).natts as usize {
            let attr = (*tupdesc).attrs.as_ptr().add(i);
            if !(*attr).attisdropped && (*attr).attgenerated == 0 {
                attnums.push((*attr).attnum);
            }
        }
        pg_sys::RelationClose(relation);
    } else {
        for name in names {
            let attnum = pg_sys::get_attnum(relid, (*name).sval);
            if attnum == pg_sys::InvalidAttrNumber as i16 {
                // COPY itself reports the missing column.
                return true;
            }
            attnums.push(attnum);
        }
    }
    !attnums.is_empty() && attnums.iter().all(|&attnum| pg_sys::pg_attribute_aclcheck(relid, attnum, user, mode) == pg_sys::AclResult::ACLCHECK_OK)
}

/// Sets the command tag to "COPY n".
unsafe fn set_copy_completion(qc: *mut pg_sys::QueryCompletion, rows: u64) {
    if !qc.is_null() {
        (*qc).commandTag = pg_sys::CommandTag::CMDTAG_COPY;
        (*qc).nprocessed = rows;
    }
}
