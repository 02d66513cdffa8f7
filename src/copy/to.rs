//! COPY TO STDOUT from a distributed table: each shard's own `COPY ... TO STDOUT` output is
//! relayed to the client as one COPY stream (text or csv). A reference table is copied from
//! the coordinator's complete local copy.

use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;

use super::set_copy_completion;
use crate::catalog::cache;
use crate::catalog::tables::{DistributedTable, Method};
use crate::commands::utility::{list_pointers, UtilityCall};
use crate::deparse::{quote, table as table_ddl};
use crate::error::{Result, ShardingError};
use crate::transaction::remote;

fn unsupported(message: &str) -> ShardingError {
    ShardingError::new(PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, message.to_string())
}

/// The COPY options, deparsed for the shards; `header` is reported separately (only the first
/// shard's output may carry it).
unsafe fn copy_options(statement: *mut pg_sys::CopyStmt) -> Result<(Vec<String>, bool, Option<i32>)> {
    let mut options = Vec::new();
    let mut header = false;
    let mut encoding = None;
    for option in list_pointers::<pg_sys::DefElem>((*statement).options) {
        let name = CStr::from_ptr((*option).defname).to_string_lossy().to_lowercase();
        let argument = (*option).arg;
        let value = if argument.is_null() {
            None
        } else {
            Some(CStr::from_ptr(pg_sys::defGetString(option)).to_string_lossy().into_owned())
        };
        match name.as_str() {
            "format" => {
                let format = value.clone().unwrap_or_default().to_lowercase();
                if format == "binary" {
                    return Err(unsupported("COPY TO in binary format is not supported on distributed tables yet"));
                }
                options.push(format!("FORMAT {}", quote::ident(&format)));
            }
            "header" => {
                header = argument.is_null() || pg_sys::defGetBoolean(option);
            }
            "delimiter" | "null" | "quote" | "escape" => {
                options.push(format!("{} {}", name.to_uppercase(), quote::literal(&value.unwrap_or_default())));
            }
            "force_quote" => {
                if !argument.is_null() && (*argument).type_ == pg_sys::NodeTag::T_A_Star {
                    options.push("FORCE_QUOTE *".to_string());
                } else {
                    let names: Vec<String> = list_pointers::<pg_sys::String>(argument.cast())
                        .into_iter()
                        .map(|s| quote::ident(&CStr::from_ptr((*s).sval).to_string_lossy()))
                        .collect();
                    options.push(format!("FORCE_QUOTE ({})", names.join(", ")));
                }
            }
            // Shards send the database encoding; the coordinator converts (copy_to).
            "encoding" => {
                let name = std::ffi::CString::new(value.unwrap_or_default()).unwrap_or_default();
                let id = pg_sys::pg_char_to_encoding(name.as_ptr());
                if id < 0 {
                    return Err(ShardingError::new(
                        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                        "argument to option \"encoding\" must be a valid encoding name",
                    ));
                }
                encoding = Some(id);
            }
            other => {
                return Err(unsupported(&format!("COPY TO option \"{other}\" is not supported on distributed tables yet")))
            }
        }
    }
    Ok((options, header, encoding))
}

/// Sends one protocol message `kind` with `payload` to the client.
unsafe fn send_message(kind: u8, payload: &[u8]) {
    let mut buffer = std::mem::zeroed::<pg_sys::StringInfoData>();
    pg_sys::pq_beginmessage(&mut buffer, kind as std::ffi::c_char);
    pg_sys::pq_sendbytes(&mut buffer, payload.as_ptr().cast(), payload.len() as i32);
    pg_sys::pq_endmessage(&mut buffer);
}

pub unsafe fn copy_to(call: &UtilityCall, statement: *mut pg_sys::CopyStmt, table: &DistributedTable) -> Result<()> {
    if table.method == Method::Reference {
        call.run_standard();
        return Ok(());
    }
    if !(*statement).filename.is_null() {
        return Err(unsupported("COPY from a distributed table TO a file or program is not supported yet; use COPY ... TO STDOUT"));
    }
    if *std::ptr::addr_of!(pg_sys::whereToSendOutput) != pg_sys::CommandDest::DestRemote {
        return Err(unsupported("COPY TO STDOUT from a distributed table needs a client connection"));
    }
    // As COPY of a plain table: DDL (TRUNCATE, DROP, ALTER) waits until the rows are out.
    pg_sys::LockRelationOid(table.relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
    let definition = table_ddl::read(table.relid)?;
    let (options, header, encoding) = copy_options(statement)?;
    let columns: Vec<String> = if (*statement).attlist.is_null() {
        definition.columns.iter().filter(|c| c.generated_sql.is_none()).map(|c| quote::ident(&c.name)).collect()
    } else {
        list_pointers::<pg_sys::String>((*statement).attlist)
            .into_iter()
            .map(|s| quote::ident(&CStr::from_ptr((*s).sval).to_string_lossy()))
            .collect()
    };
    let nodes = cache::nodes()?;

    // CopyOutResponse: text format, one format code per column.
    let mut response = vec![0u8];
    response.extend_from_slice(&(columns.len() as i16).to_be_bytes());
    for _ in &columns {
        response.extend_from_slice(&0i16.to_be_bytes());
    }
    send_message(b'H', &response);

    let mut rows = 0u64;
    for (position, shard) in table.shards.iter().enumerate() {
        let node_id = *shard.placements.first().ok_or_else(|| {
            ShardingError::internal(format!("shard {} has no active placement", shard.shard_id))
        })?;
        let node = nodes.iter().find(|n| n.node_id == node_id).ok_or_else(|| {
            ShardingError::internal(format!("shard {} is placed on unknown node {node_id}", shard.shard_id))
        })?;
        let mut shard_options = options.clone();
        if header && position == 0 {
            shard_options.push("HEADER".to_string());
        }
        let sql = format!(
            "COPY {} ({}) TO STDOUT{}",
            definition.shard_name(shard.shard_id, &quote::ident),
            columns.join(", "),
            if shard_options.is_empty() { String::new() } else { format!(" WITH ({})", shard_options.join(", ")) }
        );
        let connection = remote::for_statement(node, remote::read_access())?;
        rows += connection
            .copy_out(&sql, |chunk| {
                // Workers send the database encoding; the client gets its own, or the one the
                // statement names. libpq hands over one whole row per chunk, so no character is
                // ever split.
                let converted = match encoding {
                    Some(target) => pg_sys::pg_server_to_any(chunk.as_ptr().cast(), chunk.len() as i32, target),
                    None => pg_sys::pg_server_to_client(chunk.as_ptr().cast(), chunk.len() as i32),
                };
                if converted.cast_const() == chunk.as_ptr().cast() {
                    send_message(b'd', chunk);
                } else {
                    send_message(b'd', CStr::from_ptr(converted).to_bytes());
                    pg_sys::pfree(converted.cast());
                }
                Ok(())
            })
            .map_err(|e| remote::remote_error(node, e))?;
    }
    pg_sys::pq_putemptymessage(b'c' as std::ffi::c_char);
    set_copy_completion(call.qc, rows);
    Ok(())
}
