//! Rows on their way to the shards: encoded as COPY text, routed by their distribution value,
//! streamed by the ShardWriter; for a reference table also spooled for the coordinator's own
//! copy, which PostgreSQL's CopyFrom loads at the end. COPY and INSERT both send rows this way.

use std::ffi::CStr;
use std::io::Write;

use pgrx::pg_sys;

use super::encode::RowEncoder;
use super::shard_writer::ShardWriter;
use crate::catalog::tables::{DistributedTable, Method};
use crate::deparse::{quote, table as table_ddl};
use crate::error::{Result, ShardingError};
use crate::routing::{self, DistKind};

/// A spool file of encoded rows, removed however the statement ends.
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
    // SAFETY: DataDir is set for the life of the server; MyProcPid is a plain int.
    let (data_dir, pid) = unsafe {
        (
            CStr::from_ptr(*std::ptr::addr_of!(pg_sys::DataDir)).to_string_lossy().into_owned(),
            *std::ptr::addr_of!(pg_sys::MyProcPid),
        )
    };
    let dir = std::path::Path::new(&data_dir).join("base").join("pgsql_tmp");
    let _ = std::fs::create_dir_all(&dir);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    // Named like PostgreSQL's own temporary files, so a restart after a crash removes it.
    let path = dir.join(format!("pgsql_tmp_pg_sharding_copy_{pid}_{nanos}"));
    let file = std::fs::File::create(&path)
        .map_err(|e| ShardingError::internal(format!("could not create {}: {e}", path.display())))?;
    Ok(Spool { path, file: std::io::BufWriter::with_capacity(1 << 20, file) })
}

pub struct RowRouter<'t> {
    table: &'t DistributedTable,
    encoder: RowEncoder,
    /// Column names in the order rows carry them (the shards' COPY list, the spool's too).
    names: Vec<String>,
    writer: ShardWriter,
    spool: Option<Spool>,
    /// Attribute index and hash kind of the distribution column (hash tables).
    pub distribution: Option<(usize, DistKind)>,
    row: Vec<u8>,
    pub rows: u64,
}

impl<'t> RowRouter<'t> {
    /// `order`: when rows arrive already encoded in another column order (COPY's raw fields),
    /// that order, as positions among the encoder's columns.
    ///
    /// SAFETY: `relation` must be the open relation of `table`.
    pub unsafe fn new(table: &'t DistributedTable, encoder: RowEncoder, order: Option<&[usize]>) -> Result<Self> {
        let names: Vec<String> = match order {
            Some(order) => order.iter().map(|i| encoder.names[*i].clone()).collect(),
            None => encoder.names.clone(),
        };
        let definition = table_ddl::read(table.relid)?;
        let targets: Vec<(i64, String, Vec<i32>)> = table
            .shards
            .iter()
            .map(|s| (s.shard_id, definition.shard_name(s.shard_id, &quote::ident), s.placements.clone()))
            .collect();
        let writer = ShardWriter::new(&targets, &names)?;
        let spool = if table.method == Method::Reference { Some(open_spool()?) } else { None };
        let distribution = match (table.method, table.distribution_attnum, table.distribution_kind) {
            (Method::Hash, Some(attnum), Some(kind)) => Some(((attnum - 1) as usize, kind)),
            (Method::Hash, _, _) => return Err(ShardingError::internal("hash table without a distribution column")),
            _ => None,
        };
        Ok(RowRouter { table, encoder, names, writer, spool, distribution, row: Vec::with_capacity(512), rows: 0 })
    }

    pub fn table(&self) -> &'t DistributedTable {
        self.table
    }

    /// Column names in the order rows carry them.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn has_generated_columns(&self) -> bool {
        self.encoder.has_generated
    }

    /// Encodes one tuple (attribute order) and sends it to its shard. Output functions allocate
    /// in `memory`, which the caller resets for every row.
    ///
    /// SAFETY: `values`/`nulls` must be a tuple of the table's relation.
    /// Rows are written with the rights of `role` (a view's owner's; 0: the current role's).
    pub fn set_run_as(&mut self, role: u32) {
        self.writer.run_as = role;
    }

    pub unsafe fn route_tuple(&mut self, values: &[pg_sys::Datum], nulls: &[bool], memory: pg_sys::MemoryContext) -> Result<()> {
        let previous = pg_sys::MemoryContextSwitchTo(memory);
        let mut row = std::mem::take(&mut self.row);
        row.clear();
        self.encoder.encode(values, nulls, &mut row);
        let shard_id = match self.distribution {
            Some((index, kind)) => routing::shard_for_value(self.table, (!nulls[index]).then(|| values[index]), kind),
            None => Ok(self.table.shards[0].shard_id),
        };
        pg_sys::MemoryContextSwitchTo(previous);
        let outcome = shard_id.and_then(|shard_id| self.route_encoded(shard_id, &row));
        self.row = row;
        outcome
    }

    /// Sends a row the caller encoded (in `names` order) to shard `shard_id`.
    pub fn route_encoded(&mut self, shard_id: i64, row: &[u8]) -> Result<()> {
        self.writer.push(shard_id, row)?;
        if let Some(spool) = self.spool.as_mut() {
            spool.file.write_all(row).map_err(|e| ShardingError::internal(format!("spool write failed: {e}")))?;
        }
        self.rows += 1;
        Ok(())
    }

    /// Waits for every shard, loads the coordinator's copy of a reference table, and returns
    /// the number of rows routed.
    ///
    /// SAFETY: `relation` must be the open relation of the table.
    pub unsafe fn finish(self, relation: pg_sys::Relation) -> Result<u64> {
        let RowRouter { writer, spool, names, rows, .. } = self;
        writer.finish()?;
        if let Some(mut spool) = spool {
            spool.file.flush().map_err(|e| ShardingError::internal(format!("spool flush failed: {e}")))?;
            load_local_copy(relation, &spool.path, &names)?;
        }
        Ok(rows)
    }
}

/// A ParseState whose range table holds `relation`, as DoCopy builds it: CopyFrom opens its
/// target through range table entry 1, and crashes on an empty range table.
///
/// SAFETY: `relation` must be open.
pub(crate) unsafe fn parse_state_for(relation: pg_sys::Relation, query_string: *const std::ffi::c_char) -> *mut pg_sys::ParseState {
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
    // The spool holds text in the database encoding, whatever the client's encoding is.
    let encoding = pg_sys::makeDefElem(
        c"encoding".as_ptr().cast_mut(),
        pg_sys::makeString(pg_sys::pstrdup(pg_sys::GetDatabaseEncodingName())).cast(),
        -1,
    );
    let options = pg_sys::lappend(std::ptr::null_mut(), encoding.cast());
    let parse_state = parse_state_for(relation, std::ptr::null());
    let copy_state =
        pg_sys::BeginCopyFrom(parse_state, relation, std::ptr::null_mut(), path.as_ptr(), false, None, names, options);
    pg_sys::CopyFrom(copy_state);
    pg_sys::EndCopyFrom(copy_state);
    pg_sys::free_parsestate(parse_state);
    Ok(())
}
