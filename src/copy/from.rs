//! COPY FROM into a distributed or reference table.
//!
//! PostgreSQL's own COPY parser reads the input (STDIN, file or program; text, csv or binary)
//! and evaluates defaults (sequences included) on the coordinator, one row at a time in a
//! per-row memory context. Each row is hashed on its distribution column, encoded in COPY text
//! and buffered for its shard; buffers stream to the shards' placements inside the distributed
//! transaction, so memory stays bounded and a bad row anywhere leaves nothing behind.
//! A reference table's rows also go to the coordinator's own table, through PostgreSQL's
//! CopyFrom reading a spool file of the same encoded rows.

use std::ffi::CStr;
use std::io::Write;

use pgrx::pg_sys;
use pgrx::prelude::*;
use sharding_core::copy_text;

use super::set_copy_completion;
use super::shard_writer::ShardWriter;
use crate::catalog::tables::{DistributedTable, Method};
use crate::commands::utility::UtilityCall;
use crate::deparse::{quote, table as table_ddl};
use crate::error::{Result, ShardingError};
use crate::routing;

extern "C-unwind" {
    /// COPY's own error context callback ("COPY events, line 3: ..."), as the raw C symbol:
    /// pgrx's binding is a Rust wrapper and cannot be stored in an ErrorContextCallback.
    #[link_name = "CopyFromErrorCallback"]
    fn copy_from_error_callback(arg: *mut std::ffi::c_void);
}

/// One column sent to the shards: its position in the parsed row and its output function.
struct OutputColumn {
    index: usize,
    output: pg_sys::FmgrInfo,
}

/// A ParseState whose range table holds `relation`, as DoCopy builds it: CopyFrom opens its
/// target through range table entry 1, and crashes on an empty range table.
unsafe fn parse_state_for(relation: pg_sys::Relation, query_string: *const std::ffi::c_char) -> *mut pg_sys::ParseState {
    let parse_state = pg_sys::make_parsestate(std::ptr::null_mut());
    (*parse_state).p_sourcetext = query_string;
    let entry = pg_sys::addRangeTableEntryForRelation(
        parse_state,
        relation,
        pg_sys::RowExclusiveLock as pg_sys::LOCKMODE,
        std::ptr::null_mut(),
        false,
        false,
    );
    (*(*entry).p_rte).requiredPerms = pg_sys::ACL_INSERT as pg_sys::AclMode;
    parse_state
}

/// Removes the spool file however the COPY ends.
struct Spool {
    path: std::path::PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn open_spool() -> Result<Spool> {
    // SAFETY: DataDir is set for the life of the server.
    let data_dir = unsafe { CStr::from_ptr(*std::ptr::addr_of!(pg_sys::DataDir)) }.to_string_lossy().into_owned();
    let dir = std::path::Path::new(&data_dir).join("base").join("pgsql_tmp");
    let _ = std::fs::create_dir_all(&dir);
    // SAFETY: MyProcPid is a plain int.
    let pid = unsafe { *std::ptr::addr_of!(pg_sys::MyProcPid) };
    let path = dir.join(format!("pg_sharding_copy_{pid}_{}", std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)));
    let file = std::fs::File::create(&path)
        .map_err(|e| ShardingError::internal(format!("could not create {}: {e}", path.display())))?;
    Ok(Spool { path, file: std::io::BufWriter::with_capacity(1 << 20, file) })
}

pub unsafe fn copy_from(call: &UtilityCall, statement: *mut pg_sys::CopyStmt, table: &DistributedTable) -> Result<()> {
    let definition = table_ddl::read(table.relid)?;
    let relation = pg_sys::table_open(table.relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
    let descriptor = (*relation).rd_att;
    let natts = (*descriptor).natts as usize;

    let mut columns: Vec<OutputColumn> = Vec::new();
    let mut column_names: Vec<String> = Vec::new();
    for index in 0..natts {
        let attribute = (*descriptor).attrs.as_ptr().add(index);
        if (*attribute).attisdropped || (*attribute).attgenerated != 0 {
            continue;
        }
        let mut output_oid = pg_sys::InvalidOid;
        let mut is_varlena = false;
        pg_sys::getTypeOutputInfo((*attribute).atttypid, &mut output_oid, &mut is_varlena);
        let mut output = std::mem::zeroed::<pg_sys::FmgrInfo>();
        pg_sys::fmgr_info(output_oid, &mut output);
        columns.push(OutputColumn { index, output });
        column_names.push(CStr::from_ptr((*attribute).attname.data.as_ptr()).to_string_lossy().into_owned());
    }
    let distribution = match (table.method, table.distribution_attnum, table.distribution_kind) {
        (Method::Hash, Some(attnum), Some(kind)) => Some(((attnum - 1) as usize, kind)),
        (Method::Hash, _, _) => return Err(ShardingError::internal("hash table without a distribution column")),
        _ => None,
    };

    let targets: Vec<(i64, String, Vec<i32>)> = table
        .shards
        .iter()
        .map(|s| (s.shard_id, definition.shard_name(s.shard_id, &quote::ident), s.placements.clone()))
        .collect();
    let mut writer = ShardWriter::new(&targets, &column_names)?;
    let mut spool = if table.method == Method::Reference { Some(open_spool()?) } else { None };

    let parse_state = parse_state_for(relation, call.query_string);
    let copy_state = pg_sys::BeginCopyFrom(
        parse_state,
        relation,
        std::ptr::null_mut(),
        (*statement).filename,
        (*statement).is_program,
        None,
        (*statement).attlist,
        (*statement).options,
    );
    let executor_state = pg_sys::CreateExecutorState();
    let expression_context = pg_sys::MakePerTupleExprContext(executor_state);
    let mut values = vec![pg_sys::Datum::from(0usize); natts];
    let mut nulls = vec![false; natts];
    let mut row = Vec::with_capacity(512);

    // Errors in the input name the line, as COPY's own do. pgrx re-raises an ERROR at the
    // hook's boundary after unwinding through here, so on the error path the callback must
    // still be on the stack then: it lives in TopTransactionContext (valid until PostgreSQL
    // has reported the error and reset the stack) and is popped only on success.
    let error_context = pg_sys::MemoryContextAllocZero(
        pg_sys::TopTransactionContext,
        std::mem::size_of::<pg_sys::ErrorContextCallback>(),
    )
    .cast::<pg_sys::ErrorContextCallback>();
    (*error_context).previous = *std::ptr::addr_of!(pg_sys::error_context_stack);
    (*error_context).callback = Some(copy_from_error_callback);
    (*error_context).arg = copy_state.cast();
    pg_sys::error_context_stack = error_context;

    let mut rows: u64 = 0;
    let outcome = (|| -> Result<()> {
        loop {
            pg_sys::MemoryContextReset((*expression_context).ecxt_per_tuple_memory);
            let previous = pg_sys::MemoryContextSwitchTo((*expression_context).ecxt_per_tuple_memory);
            let more = pg_sys::NextCopyFrom(copy_state, expression_context, values.as_mut_ptr(), nulls.as_mut_ptr());
            if !more {
                pg_sys::MemoryContextSwitchTo(previous);
                break;
            }
            row.clear();
            for (position, column) in columns.iter_mut().enumerate() {
                if position > 0 {
                    row.push(b'\t');
                }
                if nulls[column.index] {
                    copy_text::push_null(&mut row);
                } else {
                    let text = pg_sys::OutputFunctionCall(&mut column.output, values[column.index]);
                    copy_text::push_field(&mut row, CStr::from_ptr(text).to_bytes());
                }
            }
            row.push(b'\n');
            match distribution {
                Some((index, kind)) => {
                    if nulls[index] {
                        pg_sys::MemoryContextSwitchTo(previous);
                        return Err(ShardingError::new(
                            PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
                            format!(
                                "null value in distribution column \"{}\" of relation \"{}\"",
                                table.distribution_column.clone().unwrap_or_default(),
                                table.name
                            ),
                        ));
                    }
                    let hash = routing::hash_datum(values[index], kind);
                    let shard = table.shard_for_hash(hash).ok_or_else(|| {
                        ShardingError::internal(format!("no shard owns hash value {hash}"))
                    })?;
                    writer.push(shard.shard_id, &row)?;
                }
                None => {
                    writer.push(table.shards[0].shard_id, &row)?;
                    if let Some(spool) = spool.as_mut() {
                        spool.file.write_all(&row).map_err(|e| ShardingError::internal(format!("spool write failed: {e}")))?;
                    }
                }
            }
            pg_sys::MemoryContextSwitchTo(previous);
            rows += 1;
        }
        Ok(())
    })();
    outcome?;
    pg_sys::error_context_stack = (*error_context).previous;

    pg_sys::EndCopyFrom(copy_state);
    pg_sys::FreeExecutorState(executor_state);
    pg_sys::free_parsestate(parse_state);
    writer.finish()?;
    if let Some(spool) = spool.as_mut() {
        spool.file.flush().map_err(|e| ShardingError::internal(format!("spool flush failed: {e}")))?;
        load_local_copy(relation, &spool.path, &column_names)?;
    }
    pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
    set_copy_completion(call.qc, rows);
    Ok(())
}

/// Loads the spooled rows (COPY text, these columns) into the coordinator's own table with
/// PostgreSQL's CopyFrom: constraints, indexes and defaults behave as in any COPY.
unsafe fn load_local_copy(relation: pg_sys::Relation, path: &std::path::Path, columns: &[String]) -> Result<()> {
    let path = std::ffi::CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| ShardingError::internal("spool path contains a NUL byte"))?;
    let mut names: *mut pg_sys::List = std::ptr::null_mut();
    for name in columns {
        let name = std::ffi::CString::new(name.as_str()).map_err(|_| ShardingError::internal("column name contains NUL"))?;
        names = pg_sys::lappend(names, pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())).cast());
    }
    let parse_state = parse_state_for(relation, std::ptr::null());
    let copy_state = pg_sys::BeginCopyFrom(
        parse_state,
        relation,
        std::ptr::null_mut(),
        path.as_ptr(),
        false,
        None,
        names,
        std::ptr::null_mut(),
    );
    pg_sys::CopyFrom(copy_state);
    pg_sys::EndCopyFrom(copy_state);
    pg_sys::free_parsestate(parse_state);
    Ok(())
}
