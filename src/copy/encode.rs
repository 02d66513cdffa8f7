//! Rows of a relation encoded as COPY text, from Datums, with the columns' output functions.
//! Dropped and generated columns are left out (shards compute generated ones themselves).

use std::ffi::CStr;

use pgrx::pg_sys;
use sharding_core::copy_text;

struct OutputColumn {
    /// Position in the relation's tuple (attnum - 1).
    index: usize,
    output: pg_sys::FmgrInfo,
}

pub struct RowEncoder {
    columns: Vec<OutputColumn>,
    /// Names of the encoded columns, in order (for the shards' COPY column list).
    pub names: Vec<String>,
    /// True when the relation has generated columns (left out of the rows).
    pub has_generated: bool,
}

impl RowEncoder {
    /// SAFETY: `relation` must be an open relation.
    pub unsafe fn for_relation(relation: pg_sys::Relation) -> RowEncoder {
        let descriptor = (*relation).rd_att;
        let mut columns = Vec::new();
        let mut names = Vec::new();
        let mut has_generated = false;
        for index in 0..(*descriptor).natts as usize {
            let attribute = (*descriptor).attrs.as_ptr().add(index);
            if (*attribute).attisdropped {
                continue;
            }
            if (*attribute).attgenerated != 0 {
                has_generated = true;
                continue;
            }
            let (mut output_oid, mut is_varlena) = (pg_sys::InvalidOid, false);
            pg_sys::getTypeOutputInfo((*attribute).atttypid, &mut output_oid, &mut is_varlena);
            let mut output = std::mem::zeroed::<pg_sys::FmgrInfo>();
            pg_sys::fmgr_info(output_oid, &mut output);
            columns.push(OutputColumn { index, output });
            names.push(CStr::from_ptr((*attribute).attname.data.as_ptr()).to_string_lossy().into_owned());
        }
        RowEncoder { columns, names, has_generated }
    }

    /// Appends one row (tab-separated, newline-ended) to `row`. Output function results are
    /// allocated in the current memory context: call it in a per-row context.
    ///
    /// SAFETY: `values` and `nulls` must hold the relation's natts entries of matching types.
    pub unsafe fn encode(&mut self, values: &[pg_sys::Datum], nulls: &[bool], row: &mut Vec<u8>) {
        let _output = crate::deparse::query::ValueOutput::enter();
        for (position, column) in self.columns.iter_mut().enumerate() {
            if position > 0 {
                row.push(b'\t');
            }
            if nulls[column.index] {
                copy_text::push_null(row);
            } else {
                let text = pg_sys::OutputFunctionCall(&mut column.output, values[column.index]);
                copy_text::push_field(row, CStr::from_ptr(text).to_bytes());
            }
        }
        row.push(b'\n');
    }
}
