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
pub(crate) struct Spool {
    pub(crate) path: std::path::PathBuf,
    pub(crate) file: std::io::BufWriter<std::fs::File>,
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub(crate) fn open_spool() -> Result<Spool> {
    // SAFETY: DataDir is set for the life of the server.
    let data_dir = unsafe { CStr::from_ptr(*std::ptr::addr_of!(pg_sys::DataDir)) }.to_string_lossy().into_owned();
    let dir = std::path::Path::new(&data_dir).join("base").join("pgsql_tmp");
    let _ = std::fs::create_dir_all(&dir);
    // SAFETY: MyProcPid is a plain int.
    let pid = unsafe { *std::ptr::addr_of!(pg_sys::MyProcPid) };
    // Named like PostgreSQL's own temporary files, so a restart after a crash removes it.
    let path = dir.join(format!("pgsql_tmp_pg_sharding_copy_{pid}_{}", std::time::SystemTime::now()
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
    let raw_fields = raw_fields_apply(statement, &column_names)?;
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
    let input_names: Vec<String> = match &raw_fields {
        Some(order) => order.iter().map(|i| column_names[*i].clone()).collect(),
        None => column_names.clone(),
    };
    let mut writer = ShardWriter::new(&targets, &input_names)?;
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
    let outcome = match &raw_fields {
        Some(order) => copy_raw_rows(
            copy_state,
            expression_context,
            distribution.map_or(-1, |(index, _)| (*(*descriptor).attrs.as_ptr().add(index)).atttypmod),
            order,
            &columns,
            &column_names,
            distribution,
            table,
            &mut writer,
            spool.as_mut(),
            &mut rows,
        ),
        None => (|| -> Result<()> {
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
            let shard_id = match distribution {
                Some((index, kind)) => routing::shard_for_value(table, (!nulls[index]).then(|| values[index]), kind),
                None => Ok(table.shards[0].shard_id),
            };
            pg_sys::MemoryContextSwitchTo(previous);
            writer.push(shard_id?, &row)?;
            if let Some(spool) = spool.as_mut() {
                spool.file.write_all(&row).map_err(|e| ShardingError::internal(format!("spool write failed: {e}")))?;
            }
            rows += 1;
        }
        Ok(())
    })(),
    };
    if let Err(error) = &outcome {
        // A worker's error is about a row sent earlier, not the line being read now: the
        // worker's own context (in the detail) tells which row; ours would mislead.
        if error.detail.as_deref().is_some_and(|d| d.starts_with("on node ")) {
            pg_sys::error_context_stack = (*error_context).previous;
        }
    }
    outcome?;
    pg_sys::error_context_stack = (*error_context).previous;

    pg_sys::EndCopyFrom(copy_state);
    pg_sys::FreeExecutorState(executor_state);
    pg_sys::free_parsestate(parse_state);
    writer.finish()?;
    if let Some(spool) = spool.as_mut() {
        spool.file.flush().map_err(|e| ShardingError::internal(format!("spool flush failed: {e}")))?;
        load_local_copy(relation, &spool.path, &input_names)?;
    }
    pg_sys::table_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE);
    set_copy_completion(call.qc, rows);
    Ok(())
}

/// The order of the input's fields (as indexes into `columns`) when rows can be forwarded from
/// COPY's raw fields: text or csv input that names every stored column, without options that
/// change what NULL means. Then only the distribution column is parsed on the coordinator.
/// Otherwise `None`: every row goes through NextCopyFrom (defaults, binary input, ...).
unsafe fn raw_fields_apply(statement: *mut pg_sys::CopyStmt, column_names: &[String]) -> Result<Option<Vec<usize>>> {
    for option in crate::commands::utility::list_pointers::<pg_sys::DefElem>((*statement).options) {
        let name = CStr::from_ptr((*option).defname).to_string_lossy().to_lowercase();
        match name.as_str() {
            "format" => {
                let format = CStr::from_ptr(pg_sys::defGetString(option)).to_string_lossy().to_lowercase();
                if format == "binary" {
                    return Ok(None);
                }
            }
            "force_not_null" | "force_null" => return Ok(None),
            _ => {}
        }
    }
    if (*statement).attlist.is_null() {
        return Ok(Some((0..column_names.len()).collect()));
    }
    let mut order = Vec::new();
    for name in crate::commands::utility::list_pointers::<pg_sys::String>((*statement).attlist) {
        let name = CStr::from_ptr((*name).sval).to_string_lossy();
        match column_names.iter().position(|c| *c == name) {
            Some(index) if !order.contains(&index) => order.push(index),
            // Unknown or repeated names: let NextCopyFrom report them.
            _ => return Ok(None),
        }
    }
    Ok((order.len() == column_names.len()).then_some(order))
}

/// The raw-fields loop: each row's fields are re-escaped as COPY text and forwarded; only the
/// distribution column goes through its input function, to be hashed.
#[allow(clippy::too_many_arguments)]
unsafe fn copy_raw_rows(
    copy_state: pg_sys::CopyFromState,
    expression_context: *mut pg_sys::ExprContext,
    // The column's typmod: numeric(10,2) stores 1.005 as 1.01, and the hash must be of the
    // value stored, so the field is read as the column reads it.
    distribution_typmod: i32,
    order: &[usize],
    columns: &[OutputColumn],
    names: &[String],
    distribution: Option<(usize, routing::DistKind)>,
    table: &DistributedTable,
    writer: &mut ShardWriter,
    mut spool: Option<&mut Spool>,
    rows: &mut u64,
) -> Result<()> {
    // Position of the distribution column among the input fields, and its input function.
    let mut distribution_input = None;
    if let Some((attribute_index, kind)) = distribution {
        let position = order
            .iter()
            .position(|i| columns[*i].index == attribute_index)
            .ok_or_else(|| ShardingError::internal("distribution column missing from the COPY fields"))?;
        let type_oid = table.distribution_type;
        let (mut input_oid, mut io_param) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
        pg_sys::getTypeInputInfo(type_oid, &mut input_oid, &mut io_param);
        let mut input = std::mem::zeroed::<pg_sys::FmgrInfo>();
        pg_sys::fmgr_info(input_oid, &mut input);
        distribution_input = Some((position, kind, input, io_param));
    }
    let mut row = Vec::with_capacity(512);
    loop {
        pg_sys::MemoryContextReset((*expression_context).ecxt_per_tuple_memory);
        let previous = pg_sys::MemoryContextSwitchTo((*expression_context).ecxt_per_tuple_memory);
        let mut fields: *mut *mut std::ffi::c_char = std::ptr::null_mut();
        let mut count: i32 = 0;
        let more = pg_sys::NextCopyFromRawFields(copy_state, &mut fields, &mut count);
        pg_sys::MemoryContextSwitchTo(previous);
        if !more {
            return Ok(());
        }
        let count = count.max(0) as usize;
        if count != order.len() {
            let message = if count > order.len() {
                "extra data after last expected column".to_string()
            } else {
                format!("missing data for column \"{}\"", names[order[count]])
            };
            return Err(ShardingError::new(PgSqlErrorCode::ERRCODE_BAD_COPY_FILE_FORMAT, message));
        }
        row.clear();
        for position in 0..count {
            if position > 0 {
                row.push(b'\t');
            }
            let field = *fields.add(position);
            if field.is_null() {
                copy_text::push_null(&mut row);
            } else {
                copy_text::push_field(&mut row, CStr::from_ptr(field).to_bytes());
            }
        }
        row.push(b'\n');
        match distribution_input.as_mut() {
            Some((position, kind, input, io_param)) => {
                let field = *fields.add(*position);
                let previous = pg_sys::MemoryContextSwitchTo((*expression_context).ecxt_per_tuple_memory);
                let value =
                    (!field.is_null()).then(|| pg_sys::InputFunctionCall(input, field, *io_param, distribution_typmod));
                let shard_id = routing::shard_for_value(table, value, *kind);
                pg_sys::MemoryContextSwitchTo(previous);
                writer.push(shard_id?, &row)?;
            }
            None => {
                writer.push(table.shards[0].shard_id, &row)?;
                if let Some(spool) = spool.as_mut() {
                    spool.file.write_all(&row).map_err(|e| ShardingError::internal(format!("spool write failed: {e}")))?;
                }
            }
        }
        *rows += 1;
    }
}

/// Loads the spooled rows (COPY text, these columns) into the coordinator's own table with
/// PostgreSQL's CopyFrom: constraints, indexes and defaults behave as in any COPY.
pub(crate) unsafe fn load_local_copy(relation: pg_sys::Relation, path: &std::path::Path, columns: &[String]) -> Result<()> {
    let path = std::ffi::CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| ShardingError::internal("spool path contains a NUL byte"))?;
    let mut names: *mut pg_sys::List = std::ptr::null_mut();
    for name in columns {
        let name = std::ffi::CString::new(name.as_str()).map_err(|_| ShardingError::internal("column name contains NUL"))?;
        names = pg_sys::lappend(names, pg_sys::makeString(pg_sys::pstrdup(name.as_ptr())).cast());
    }
    // The spool holds text in the database encoding, whatever the client's encoding is.
    let encoding = pg_sys::makeDefElem(
        c"encoding".as_ptr().cast_mut(),
        pg_sys::makeString(pg_sys::pstrdup(pg_sys::GetDatabaseEncodingName())).cast(),
        -1,
    );
    let options = pg_sys::lappend(std::ptr::null_mut(), encoding.cast());
    let parse_state = parse_state_for(relation, std::ptr::null());
    let copy_state = pg_sys::BeginCopyFrom(
        parse_state,
        relation,
        std::ptr::null_mut(),
        path.as_ptr(),
        false,
        None,
        names,
        options,
    );
    pg_sys::CopyFrom(copy_state);
    pg_sys::EndCopyFrom(copy_state);
    pg_sys::free_parsestate(parse_state);
    Ok(())
}
