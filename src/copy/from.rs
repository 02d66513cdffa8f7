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

use pgrx::pg_sys;
use pgrx::prelude::*;
use sharding_core::copy_text;

use super::encode::RowEncoder;
use super::router::{parse_state_for, RowRouter};
use super::set_copy_completion;
use crate::catalog::tables::DistributedTable;
use crate::commands::utility::UtilityCall;
use crate::error::{Result, ShardingError};
use crate::routing;

extern "C-unwind" {
    /// COPY's own error context callback ("COPY events, line 3: ..."), as the raw C symbol:
    /// pgrx's binding is a Rust wrapper and cannot be stored in an ErrorContextCallback.
    #[link_name = "CopyFromErrorCallback"]
    fn copy_from_error_callback(arg: *mut std::ffi::c_void);
}

pub unsafe fn copy_from(call: &UtilityCall, statement: *mut pg_sys::CopyStmt, table: &DistributedTable) -> Result<()> {
    let relation = pg_sys::table_open(table.relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
    let descriptor = (*relation).rd_att;
    let natts = (*descriptor).natts as usize;
    let encoder = RowEncoder::for_relation(relation);
    let raw_fields = raw_fields_apply(statement, &encoder.names)?;
    let mut router = RowRouter::new(table, encoder, raw_fields.as_deref())?;

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
    let per_row = (*expression_context).ecxt_per_tuple_memory;

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

    let outcome = match &raw_fields {
        Some(order) => copy_raw_rows(copy_state, per_row, descriptor, order, &mut router),
        None => {
            // Every row through NextCopyFrom: defaults, sequences and binary input included.
            let mut values = vec![pg_sys::Datum::from(0usize); natts];
            let mut nulls = vec![false; natts];
            (|| -> Result<()> {
                loop {
                    pg_sys::MemoryContextReset(per_row);
                    let previous = pg_sys::MemoryContextSwitchTo(per_row);
                    let more = pg_sys::NextCopyFrom(copy_state, expression_context, values.as_mut_ptr(), nulls.as_mut_ptr());
                    pg_sys::MemoryContextSwitchTo(previous);
                    if !more {
                        return Ok(());
                    }
                    router.route_tuple(&values, &nulls, per_row)?;
                }
            })()
        }
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
    let rows = router.finish(relation)?;
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
unsafe fn copy_raw_rows(
    copy_state: pg_sys::CopyFromState,
    per_row: pg_sys::MemoryContext,
    descriptor: pg_sys::TupleDesc,
    order: &[usize],
    router: &mut RowRouter<'_>,
) -> Result<()> {
    let encoded_index = |attribute_index: usize| -> usize {
        // Position among the encoded (non-dropped, non-generated) columns.
        (0..attribute_index)
            .filter(|i| {
                let attribute = (*descriptor).attrs.as_ptr().add(*i);
                !(*attribute).attisdropped && (*attribute).attgenerated == 0
            })
            .count()
    };
    // Position of the distribution column among the input fields, and how to read it: with the
    // column's typmod, since numeric(10,2) stores 1.005 as 1.01 and the hash must be of the
    // value stored.
    let mut distribution_input = None;
    if let Some((attribute_index, kind)) = router.distribution {
        let encoded = encoded_index(attribute_index);
        let position = order
            .iter()
            .position(|i| *i == encoded)
            .ok_or_else(|| ShardingError::internal("distribution column missing from the COPY fields"))?;
        let attribute = (*descriptor).attrs.as_ptr().add(attribute_index);
        let (mut input_oid, mut io_param) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
        pg_sys::getTypeInputInfo((*attribute).atttypid, &mut input_oid, &mut io_param);
        let mut input = std::mem::zeroed::<pg_sys::FmgrInfo>();
        pg_sys::fmgr_info(input_oid, &mut input);
        distribution_input = Some((position, kind, input, io_param, (*attribute).atttypmod));
    }
    let names: Vec<String> = router.names().to_vec();
    let table = router.table();
    let mut row = Vec::with_capacity(512);
    loop {
        pg_sys::MemoryContextReset(per_row);
        let previous = pg_sys::MemoryContextSwitchTo(per_row);
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
                format!("missing data for column \"{}\"", names[count])
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
        let shard_id = match distribution_input.as_mut() {
            Some((position, kind, input, io_param, typmod)) => {
                let field = *fields.add(*position);
                let previous = pg_sys::MemoryContextSwitchTo(per_row);
                let value = (!field.is_null()).then(|| pg_sys::InputFunctionCall(input, field, *io_param, *typmod));
                let shard_id = routing::shard_for_value(table, value, *kind);
                pg_sys::MemoryContextSwitchTo(previous);
                shard_id?
            }
            None => table.shards[0].shard_id,
        };
        router.route_encoded(shard_id, &row)?;
    }
}
