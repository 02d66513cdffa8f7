//! Placements on the coordinator itself: their statements run in this backend, through SPI,
//! inside the coordinator's own transaction, instead of over a loopback connection.
//!
//! A `LocalConnection` answers the same calls as a libpq connection, so that every path that
//! reaches a node (tasks, COPY in and out, DDL, reference-table copies) reaches the coordinator
//! the same way. What differs:
//! - there is no remote transaction: the statements are part of the coordinator's, so they see
//!   its writes, its snapshot and its settings, and commit or roll back with it (no BEGIN,
//!   savepoints or PREPARE; see `transaction::remote`);
//! - a statement runs when it is sent, and an error is raised at once, as any error of the
//!   coordinator's own work is;
//! - results are handed out in the shape libpq gives them (one row at a time, values in text
//!   or binary), so the executor decodes them the same way. A SELECT streams from a cursor,
//!   `FETCH_ROWS` rows per call; other statements return their rows whole.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io::{BufRead, Read};

use pgrx::pg_sys;

use sharding_core::statement_cache::StatementCache;

use super::libpq::{RemoteError, RemoteRows, TaskParam};

/// Rows fetched from a local cursor per call.
const FETCH_ROWS: i64 = 1000;

/// One result of a local statement, as libpq gives it in single-row mode.
pub struct LocalResult {
    pub kind: LocalKind,
    /// The row's values, each followed by a NUL byte (text values are read as C strings).
    values: Vec<Option<Vec<u8>>>,
}

pub enum LocalKind {
    Row,
    EndOfRows(u64),
    Command(u64),
}

impl LocalResult {
    pub fn columns(&self) -> usize {
        self.values.len()
    }

    pub fn value(&self, column: usize) -> Option<&[u8]> {
        let bytes = self.values.get(column)?.as_ref()?;
        Some(&bytes[..bytes.len() - 1])
    }
}

/// A SELECT task reading from a cursor.
struct Cursor {
    portal: CString,
    binary: bool,
    /// Rows handed out so far.
    rows: u64,
}

enum State {
    Idle,
    /// A task's results still to hand out, and the cursor the rest comes from.
    Running { queue: VecDeque<LocalResult>, cursor: Option<Cursor> },
    /// COPY ... FROM STDIN started: its statement and the data sent so far (senders send
    /// bounded batches, each ended with `copy_end`).
    CopyIn { sql: String, data: Vec<u8> },
    /// The outcome of what `send` or `copy_end_async` ran, for `finish` / `drain_results`.
    Finished(RemoteRows),
}

pub struct LocalConnection {
    state: RefCell<State>,
    role: Cell<pg_sys::Oid>,
}

impl Default for LocalConnection {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalConnection {
    pub fn new() -> Self {
        // SAFETY: reads this backend's current user id.
        LocalConnection { state: RefCell::new(State::Idle), role: Cell::new(unsafe { pg_sys::GetUserId() }) }
    }

    pub fn role(&self) -> pg_sys::Oid {
        self.role.get()
    }

    pub fn set_role(&self, role: pg_sys::Oid) {
        self.role.set(role);
    }

    /// True while a statement's results are still to be read (or a COPY is open).
    pub fn is_running(&self) -> bool {
        matches!(*self.state.borrow(), State::Running { .. } | State::CopyIn { .. })
    }

    /// Forgets what is under way (a cursor is closed).
    pub fn reset(&self) {
        if let State::Running { cursor: Some(cursor), .. } = self.state.replace(State::Idle) {
            close_cursor(&cursor.portal);
        }
    }

    /// Runs one or more statements given as text; the rows of the last one, in text.
    pub fn exec(&self, sql: &str) -> Result<RemoteRows, RemoteError> {
        self.reset();
        let sql = text(sql)?;
        // SAFETY: SPI is connected for the statement and finished after the rows were copied.
        let rows = unsafe {
            connect();
            let code = pg_sys::SPI_execute(sql.as_ptr(), false, 0);
            let rows = if code < 0 { Err(spi_error(code)) } else { Ok(tuptable_rows(false)) };
            pg_sys::SPI_finish();
            rows?
        };
        Ok(RemoteRows { rows: rows.into_iter().map(|r| r.values.into_iter().map(text_value).collect()).collect() })
    }

    pub fn send(&self, sql: &str) -> Result<(), RemoteError> {
        let rows = self.exec(sql)?;
        self.state.replace(State::Finished(rows));
        Ok(())
    }

    /// The outcome of what `send` or `copy_end_async` ran (nothing else is left to read).
    pub fn finish(&self) -> Result<RemoteRows, RemoteError> {
        let rows = match self.state.replace(State::Idle) {
            State::Finished(rows) => rows,
            other => {
                self.state.replace(other);
                self.reset();
                RemoteRows::default()
            }
        };
        Ok(rows)
    }

    /// One statement with text parameters whose types are inferred; its rows in text and the
    /// number of rows it affected.
    pub fn query_counted(&self, sql: &str, params: &[Option<&str>]) -> Result<(RemoteRows, u64), RemoteError> {
        let params: Vec<TaskParam> = params
            .iter()
            .map(|p| TaskParam { type_oid: 0, value: p.map(|v| v.as_bytes().to_vec()), format: 0 })
            .collect();
        self.reset();
        let sql = text_bytes(sql.as_bytes())?;
        // SAFETY: SPI is connected for the statement and finished after the rows were copied.
        let ran = unsafe {
            connect();
            let outcome = run_statement(&sql, &params, false, false);
            pg_sys::SPI_finish();
            outcome?
        };
        let Ran::Whole(results, affected) = ran else {
            return Err(RemoteError::local("a statement opened a cursor"));
        };
        let rows = results
            .into_iter()
            .filter(|r| matches!(r.kind, LocalKind::Row))
            .map(|r| r.values.into_iter().map(text_value).collect())
            .collect();
        Ok((RemoteRows { rows }, affected))
    }

    /// Runs a task: a SELECT opens a cursor that `poll` reads; anything else runs whole now.
    pub fn send_task(&self, sql: &CStr, params: &[TaskParam], binary: bool) -> Result<(), RemoteError> {
        self.reset();
        // SAFETY: SPI is connected for the statement and finished after the rows were copied;
        // a cursor's portal outlives SPI_finish (it lives until closed or the transaction ends).
        let ran = unsafe {
            connect();
            let outcome = run_statement(sql, params, binary, true);
            pg_sys::SPI_finish();
            outcome?
        };
        let state = match ran {
            Ran::Whole(results, _) => State::Running { queue: results.into(), cursor: None },
            Ran::Cursor(portal) => State::Running { queue: VecDeque::new(), cursor: Some(Cursor { portal, binary, rows: 0 }) },
        };
        self.state.replace(state);
        Ok(())
    }

    /// The next result of the running task; `None` once it is complete.
    pub fn poll(&self) -> Result<Option<LocalResult>, RemoteError> {
        let mut state = self.state.borrow_mut();
        let State::Running { queue, cursor } = &mut *state else {
            return Ok(None);
        };
        if queue.is_empty() {
            if let Some(open) = cursor {
                // SAFETY: SPI is connected for the fetch and finished after the rows were copied.
                let batch = unsafe {
                    connect();
                    let portal = pg_sys::SPI_cursor_find(open.portal.as_ptr());
                    if portal.is_null() {
                        pg_sys::SPI_finish();
                        *cursor = None;
                        return Err(RemoteError::local("the coordinator's cursor for a task is gone"));
                    }
                    pg_sys::SPI_cursor_fetch(portal, true, FETCH_ROWS as _);
                    let rows = tuptable_rows(open.binary);
                    pg_sys::SPI_finish();
                    rows
                };
                open.rows += batch.len() as u64;
                let done = (batch.len() as i64) < FETCH_ROWS;
                queue.extend(batch);
                if done {
                    queue.push_back(LocalResult { kind: LocalKind::EndOfRows(open.rows), values: Vec::new() });
                    close_cursor(&open.portal);
                    *cursor = None;
                }
            }
        }
        match queue.pop_front() {
            Some(result) => Ok(Some(result)),
            None => {
                *state = State::Idle;
                Ok(None)
            }
        }
    }

    /// Starts COPY ... FROM STDIN: the rows are taken with `copy_data` and stored at `copy_end`.
    pub fn copy_start(&self, sql: &str) -> Result<(), RemoteError> {
        self.reset();
        self.state.replace(State::CopyIn { sql: sql.to_string(), data: Vec::new() });
        Ok(())
    }

    pub fn copy_data(&self, chunk: &[u8]) -> Result<(), RemoteError> {
        match &mut *self.state.borrow_mut() {
            State::CopyIn { data, .. } => {
                data.extend_from_slice(chunk);
                Ok(())
            }
            _ => Err(RemoteError::local("no COPY in progress")),
        }
    }

    /// Ends COPY: stores the rows (or, with `error`, drops them and fails as a node would).
    pub fn copy_end(&self, error: Option<&str>) -> Result<RemoteRows, RemoteError> {
        let State::CopyIn { sql, data } = self.state.replace(State::Idle) else {
            return Err(RemoteError::local("no COPY in progress"));
        };
        if let Some(message) = error {
            return Err(RemoteError {
                sqlstate: Some("57014".into()),
                message: format!("COPY from stdin failed: {message}"),
                context: None,
                detail: None,
                hint: None,
            });
        }
        // SAFETY: see copy_from.
        unsafe { copy_from(&sql, &data)? };
        Ok(RemoteRows::default())
    }

    pub fn copy_end_async(&self) -> Result<(), RemoteError> {
        let rows = self.copy_end(None)?;
        self.state.replace(State::Finished(rows));
        Ok(())
    }

    /// Runs `COPY ... TO STDOUT` here and hands its output to `sink`: whole lines for text
    /// and CSV (so that no character is split), blocks for binary. Returns the row count.
    pub fn copy_out(&self, sql: &str, mut sink: impl FnMut(&[u8]) -> Result<(), RemoteError>) -> Result<u64, RemoteError> {
        self.reset();
        let file = TempFile::new()?;
        // SAFETY: see copy_to.
        let (rows, binary) = unsafe { copy_to(sql, &file.path)? };
        let opened = std::fs::File::open(&file.path).map_err(|e| RemoteError::local(format!("could not read {}: {e}", file.path)))?;
        let mut reader = std::io::BufReader::with_capacity(64 * 1024, opened);
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = if binary {
                let mut block = vec![0u8; 64 * 1024];
                let n = reader.read(&mut block).map_err(|e| RemoteError::local(e.to_string()))?;
                block.truncate(n);
                line = block;
                n
            } else {
                reader.read_until(b'\n', &mut line).map_err(|e| RemoteError::local(e.to_string()))?
            };
            if read == 0 {
                break;
            }
            sink(&line)?;
        }
        Ok(rows)
    }
}

/// A file for one local COPY TO, in the server's temporary-file directory (files there are
/// removed at restart), deleted when dropped.
struct TempFile {
    path: String,
}

thread_local! {
    static NEXT_FILE: Cell<u64> = const { Cell::new(0) };
}

impl TempFile {
    fn new() -> Result<Self, RemoteError> {
        // SAFETY: DataDir is the absolute data directory path, set at start.
        let data_dir = unsafe { CStr::from_ptr(*std::ptr::addr_of!(pg_sys::DataDir)) }.to_string_lossy().into_owned();
        let directory = format!("{data_dir}/base/pgsql_tmp");
        std::fs::create_dir_all(&directory).map_err(|e| RemoteError::local(format!("could not create {directory}: {e}")))?;
        let n = NEXT_FILE.with(|c| c.replace(c.get() + 1));
        Ok(TempFile { path: format!("{directory}/pgsql_tmp_pg_sharding_copy.{}.{n}", std::process::id()) })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// SPI

/// SAFETY: to be paired with SPI_finish.
unsafe fn connect() {
    let code = pg_sys::SPI_connect();
    if code != pg_sys::SPI_OK_CONNECT as i32 {
        pgrx::error!("pg_sharding: SPI_connect failed ({code})");
    }
}

fn spi_error(code: i32) -> RemoteError {
    // SAFETY: returns a static string.
    let name = unsafe { CStr::from_ptr(pg_sys::SPI_result_code_string(code)) }.to_string_lossy().into_owned();
    RemoteError::local(format!("the coordinator could not run a statement on its own placement: {name}"))
}

fn text(sql: &str) -> Result<CString, RemoteError> {
    CString::new(sql).map_err(|_| RemoteError::local("statement contains a NUL byte"))
}

fn text_bytes(bytes: &[u8]) -> Result<CString, RemoteError> {
    let until_nul = bytes.iter().position(|b| *b == 0).map_or(bytes, |at| &bytes[..at]);
    CString::new(until_nul).map_err(|_| RemoteError::local("value contains a NUL byte"))
}

/// A value as a string (its bytes without the trailing NUL).
fn text_value(value: Option<Vec<u8>>) -> Option<String> {
    value.map(|mut bytes| {
        bytes.pop();
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// What a task ran into.
enum Ran {
    /// The statement ran: its rows (then the end of rows or the command's completion), and the
    /// rows it affected.
    Whole(Vec<LocalResult>, u64),
    /// A SELECT whose rows a cursor (this portal) gives.
    Cursor(CString),
}

/// The parser's state for parameters whose types are inferred (see
/// `setup_parse_variable_parameters`): an array the parser may enlarge, and its length.
#[repr(C)]
struct VarParams {
    types: *mut pg_sys::Oid,
    count: c_int,
}

extern "C-unwind" {
    /// parser/parse_param.h (not in pgrx's bindings).
    fn setup_parse_variable_parameters(pstate: *mut pg_sys::ParseState, types: *mut *mut pg_sys::Oid, count: *mut c_int);
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn parser_setup(pstate: *mut pg_sys::ParseState, arg: *mut c_void) {
    let params = arg.cast::<VarParams>();
    setup_parse_variable_parameters(pstate, &mut (*params).types, &mut (*params).count);
}

/// Statements the coordinator keeps prepared for its placements, per backend.
const KEPT_STATEMENTS: usize = 256;

/// A kept statement: its text and the parameter types it was given (0: inferred).
#[derive(Clone, PartialEq, Eq, Hash)]
struct StatementKey {
    sql: CString,
    types: Vec<u32>,
}

/// A statement prepared and kept (`SPI_keepplan`), and its parameters' types as inferred.
struct KeptPlan {
    plan: pg_sys::SPIPlanPtr,
    types: Vec<pg_sys::Oid>,
}

thread_local! {
    static KEPT: RefCell<StatementCache<StatementKey, KeptPlan>> = RefCell::new(StatementCache::new(KEPT_STATEMENTS));
    /// Statements of this module running, one inside another when a statement on a placement
    /// calls a function that reads a distributed table.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Counts a running statement for as long as it lives (also when an error unwinds it).
struct Running;

impl Running {
    fn enter() -> Running {
        DEPTH.with(|d| d.set(d.get() + 1));
        Running
    }

    /// Whether this is the only statement running: only then may a kept statement be let go
    /// (one running further out may still be about to use it).
    fn outermost() -> bool {
        DEPTH.with(|d| d.get() == 1)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// Prepares `sql` with `params` (types given, or inferred where 0) and runs it; with `cursor`,
/// a single SELECT opens a cursor instead.
///
/// A statement seen before is kept prepared (parsed, analysed and, once PostgreSQL's plan cache
/// settles on a generic plan, planned once): the plan cache replans it when a table it reads
/// changes, as it does for PL/pgSQL's statements.
///
/// SAFETY: SPI must be connected; the results are copied out before the caller finishes it.
unsafe fn run_statement(sql: &CStr, params: &[TaskParam], binary: bool, cursor: bool) -> Result<Ran, RemoteError> {
    let _running = Running::enter();
    let count = params.len();
    let key = StatementKey { sql: sql.to_owned(), types: params.iter().map(|p| p.type_oid).collect() };
    let kept = KEPT.with(|kept| kept.borrow_mut().get(&key).map(|k| (k.plan, k.types.clone())));
    let (plan, types) = match kept {
        Some(kept) => kept,
        None => prepare(key, params)?,
    };
    let list = pg_sys::makeParamList(count as c_int);
    let slots = (*list).params.as_mut_slice(count);
    for (i, param) in params.iter().enumerate() {
        let type_oid = types[i];
        slots[i] = pg_sys::ParamExternData {
            value: pg_sys::Datum::from(0usize),
            isnull: param.value.is_none(),
            pflags: pg_sys::PARAM_FLAG_CONST as u16,
            ptype: type_oid,
        };
        if let Some(bytes) = &param.value {
            slots[i].value = if param.format == 1 {
                let _encoding = super::DatabaseEncoding::enter();
                let mut receive = pg_sys::InvalidOid;
                let mut ioparam = pg_sys::InvalidOid;
                pg_sys::getTypeBinaryInputInfo(type_oid, &mut receive, &mut ioparam);
                let buffer = pg_sys::makeStringInfo();
                pg_sys::appendBinaryStringInfo(buffer, bytes.as_ptr().cast(), bytes.len() as c_int);
                pg_sys::OidReceiveFunctionCall(receive, buffer, ioparam, -1)
            } else {
                let mut input = pg_sys::InvalidOid;
                let mut ioparam = pg_sys::InvalidOid;
                pg_sys::getTypeInputInfo(type_oid, &mut input, &mut ioparam);
                let value = text_bytes(bytes)?;
                pg_sys::OidInputFunctionCall(input, value.as_ptr() as *mut c_char, ioparam, -1)
            };
        }
    }
    if cursor && is_select(plan) {
        let portal = pg_sys::SPI_cursor_open_with_paramlist(std::ptr::null(), plan, list, false);
        if portal.is_null() {
            return Err(spi_error(pg_sys::SPI_result));
        }
        return Ok(Ran::Cursor(CStr::from_ptr((*portal).name).to_owned()));
    }
    let code = pg_sys::SPI_execute_plan_with_paramlist(plan, list, false, 0);
    if code < 0 {
        return Err(spi_error(code));
    }
    let affected = pg_sys::SPI_processed;
    let returns_rows = !pg_sys::SPI_tuptable.is_null();
    let mut results = tuptable_rows(binary);
    results.push(LocalResult {
        kind: if returns_rows { LocalKind::EndOfRows(affected) } else { LocalKind::Command(affected) },
        values: Vec::new(),
    });
    Ok(Ran::Whole(results, affected))
}

/// Prepares the statement of `key`, its parameters' types inferred where not given; keeps a
/// copy prepared when it was seen before. The plan for this run, and the parameter types.
///
/// SAFETY: SPI must be connected.
unsafe fn prepare(key: StatementKey, params: &[TaskParam]) -> Result<(pg_sys::SPIPlanPtr, Vec<pg_sys::Oid>), RemoteError> {
    let count = params.len();
    let given = pg_sys::palloc0(count.max(1) * std::mem::size_of::<pg_sys::Oid>()).cast::<pg_sys::Oid>();
    for (i, param) in params.iter().enumerate() {
        *given.add(i) = pg_sys::Oid::from(param.type_oid);
    }
    let mut var = VarParams { types: given, count: count as c_int };
    let plan = pg_sys::SPI_prepare_params(key.sql.as_ptr(), Some(parser_setup), (&mut var as *mut VarParams).cast(), 0);
    if plan.is_null() {
        return Err(spi_error(pg_sys::SPI_result));
    }
    let mut types: Vec<pg_sys::Oid> = (0..count)
        .map(|i| if (i as c_int) < var.count { *var.types.add(i) } else { pg_sys::InvalidOid })
        // Not referenced by the statement: any type does.
        .map(|t| if t == pg_sys::InvalidOid { pg_sys::UNKNOWNOID } else { t })
        .collect();
    // The kept copy is prepared again with the inferred types fixed: a plan prepared with
    // inferred types would call back into `var` (gone by then) whenever it is replanned.
    if Running::outermost() && keepable(plan) && KEPT.with(|kept| kept.borrow_mut().admit(&key)) {
        let fixed = pg_sys::SPI_prepare(key.sql.as_ptr(), count as c_int, types.as_mut_ptr());
        if !fixed.is_null() && pg_sys::SPI_keepplan(fixed) == 0 {
            let released = KEPT.with(|kept| kept.borrow_mut().insert(key, KeptPlan { plan: fixed, types: types.clone() }));
            for old in released {
                pg_sys::SPI_freeplan(old.plan);
            }
        }
    }
    Ok((plan, types))
}

/// Whether `plan` is worth keeping: one SELECT, INSERT, UPDATE, DELETE or MERGE (not a
/// utility statement, which PostgreSQL does not plan).
unsafe fn keepable(plan: pg_sys::SPIPlanPtr) -> bool {
    use pg_sys::CommandTag::*;
    let sources = pg_sys::SPI_plan_get_plan_sources(plan);
    if sources.is_null() || (*sources).length != 1 {
        return false;
    }
    let source = (*(*sources).elements).ptr_value.cast::<pg_sys::CachedPlanSource>();
    matches!((*source).commandTag, CMDTAG_SELECT | CMDTAG_INSERT | CMDTAG_UPDATE | CMDTAG_DELETE | CMDTAG_MERGE)
}

/// Whether `plan` is one plain SELECT (its rows can stream from a cursor).
unsafe fn is_select(plan: pg_sys::SPIPlanPtr) -> bool {
    if !pg_sys::SPI_is_cursor_plan(plan) {
        return false;
    }
    let sources = pg_sys::SPI_plan_get_plan_sources(plan);
    if sources.is_null() || (*sources).length != 1 {
        return false;
    }
    let source = (*(*sources).elements).ptr_value.cast::<pg_sys::CachedPlanSource>();
    (*source).commandTag == pg_sys::CommandTag::CMDTAG_SELECT
}

/// The rows of SPI_tuptable, values in binary (send functions) or text (output functions).
///
/// SAFETY: SPI must be connected.
unsafe fn tuptable_rows(binary: bool) -> Vec<LocalResult> {
    let table = pg_sys::SPI_tuptable;
    if table.is_null() {
        return Vec::new();
    }
    let desc = (*table).tupdesc;
    let natts = (*desc).natts as usize;
    let functions: Vec<(pg_sys::Oid, bool)> = (0..natts)
        .map(|i| {
            let type_oid = (*desc).attrs.as_slice(natts)[i].atttypid;
            let mut function = pg_sys::InvalidOid;
            let mut varlena = false;
            if binary {
                pg_sys::getTypeBinaryOutputInfo(type_oid, &mut function, &mut varlena);
            } else {
                pg_sys::getTypeOutputInfo(type_oid, &mut function, &mut varlena);
            }
            (function, varlena)
        })
        .collect();
    let count = pg_sys::SPI_processed as usize;
    let mut rows = Vec::with_capacity(count);
    for r in 0..count {
        let tuple = *(*table).vals.add(r);
        let mut values = Vec::with_capacity(natts);
        for (i, (function, _)) in functions.iter().enumerate() {
            let mut isnull = false;
            let datum = pg_sys::SPI_getbinval(tuple, desc, i as c_int + 1, &mut isnull);
            if isnull {
                values.push(None);
                continue;
            }
            let mut bytes = if binary {
                let _encoding = super::DatabaseEncoding::enter();
                let sent = pg_sys::OidSendFunctionCall(*function, datum);
                pgrx::varlena::varlena_to_byte_slice(sent).to_vec()
            } else {
                let out = pg_sys::OidOutputFunctionCall(*function, datum);
                CStr::from_ptr(out).to_bytes().to_vec()
            };
            bytes.push(0);
            values.push(Some(bytes));
        }
        rows.push(LocalResult { kind: LocalKind::Row, values });
    }
    rows
}

fn close_cursor(portal: &CStr) {
    // SAFETY: closing a portal of this transaction by name; gone already is fine.
    unsafe {
        let found = pg_sys::SPI_cursor_find(portal.as_ptr());
        if !found.is_null() {
            pg_sys::SPI_cursor_close(found);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// COPY

thread_local! {
    /// The data a local COPY FROM reads (see `copy_source`): a pointer into the caller's
    /// buffer, its length and the read position, set only while `CopyFrom` runs.
    static SOURCE: Cell<(*const u8, usize, usize)> = const { Cell::new((std::ptr::null(), 0, 0)) };
}

/// COPY's data source callback: hands out the buffer of the COPY in progress.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn copy_source(out: *mut c_void, _min: c_int, max: c_int) -> c_int {
    let (data, length, position) = SOURCE.with(Cell::get);
    let take = (length - position).min(max.max(0) as usize);
    if take > 0 {
        std::ptr::copy_nonoverlapping(data.add(position), out.cast::<u8>(), take);
    }
    SOURCE.with(|s| s.set((data, length, position + take)));
    take as c_int
}

/// The COPY statement in `sql` (one we generated), parsed.
unsafe fn parse_copy(sql: &str) -> Result<*mut pg_sys::CopyStmt, RemoteError> {
    let text = text(sql)?;
    let statements = pg_sys::pg_parse_query(text.as_ptr());
    if statements.is_null() || (*statements).length != 1 {
        return Err(RemoteError::local("expected one COPY statement"));
    }
    let raw = (*(*statements).elements).ptr_value.cast::<pg_sys::RawStmt>();
    let statement = (*raw).stmt;
    if (*statement).type_ != pg_sys::NodeTag::T_CopyStmt {
        return Err(RemoteError::local("expected a COPY statement"));
    }
    Ok(statement.cast())
}

/// The statement's options, with ENCODING set to the database's unless given: the data comes
/// and goes in the database encoding, as it does with the nodes (their client encoding).
unsafe fn options_with_encoding(options: *mut pg_sys::List) -> *mut pg_sys::List {
    let mut list = options;
    let count = if list.is_null() { 0 } else { (*list).length as usize };
    for i in 0..count {
        let option = (*(*list).elements.add(i)).ptr_value.cast::<pg_sys::DefElem>();
        if CStr::from_ptr((*option).defname).to_bytes() == b"encoding" {
            return list;
        }
    }
    let name = pg_sys::makeString(pg_sys::pstrdup(pg_sys::GetDatabaseEncodingName()));
    let option = pg_sys::makeDefElem(pg_sys::pstrdup(c"encoding".as_ptr()), name.cast(), -1);
    list = pg_sys::lappend(list, option.cast());
    list
}

/// A parse state for a COPY on `relation` whose range table holds it, and checks the
/// privileges the COPY needs (COPY checks them in DoCopy, which a local COPY does not go
/// through): `permission` on the listed columns (all when none are listed). Row-level security
/// is refused (the relation is then closed): COPY handles it by rewriting into a query.
unsafe fn copy_parse_state(
    sql: &CStr,
    relation: pg_sys::Relation,
    lockmode: u32,
    columns: *mut pg_sys::List,
    permission: pg_sys::AclMode,
) -> Result<*mut pg_sys::ParseState, RemoteError> {
    let relid = (*relation).rd_id;
    if pg_sys::check_enable_rls(relid, pg_sys::InvalidOid, false) == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32 {
        pg_sys::table_close(relation, pg_sys::NoLock as _);
        return Err(RemoteError {
            sqlstate: Some("0A000".into()),
            message: "COPY of a placement on the coordinator with row-level security is not supported".into(),
            context: None,
            detail: None,
            hint: None,
        });
    }
    let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
    (*pstate).p_sourcetext = sql.as_ptr();
    // CopyFrom finds its target in the parse state's range table (DoCopy puts it there).
    let item = pg_sys::addRangeTableEntryForRelation(pstate, relation, lockmode as c_int, std::ptr::null_mut(), false, false);
    let rte = (*item).p_rte;
    (*rte).requiredPerms = permission;
    let desc = (*relation).rd_att;
    let natts = (*desc).natts as usize;
    let attrs = (*desc).attrs.as_slice(natts);
    let mut selected: *mut pg_sys::Bitmapset = std::ptr::null_mut();
    let offset = pg_sys::FirstLowInvalidHeapAttributeNumber;
    let listed = if columns.is_null() { 0 } else { (*columns).length as usize };
    for (i, attr) in attrs.iter().enumerate() {
        if attr.attisdropped {
            continue;
        }
        let name = CStr::from_ptr(attr.attname.data.as_ptr());
        let wanted = listed == 0
            || (0..listed).any(|k| {
                let column = (*(*columns).elements.add(k)).ptr_value.cast::<pg_sys::String>();
                CStr::from_ptr((*column).sval) == name
            });
        if wanted {
            selected = pg_sys::bms_add_member(selected, i as c_int + 1 - offset);
        }
    }
    if permission == pg_sys::ACL_INSERT as pg_sys::AclMode {
        (*rte).insertedCols = selected;
    } else {
        (*rte).selectedCols = selected;
    }
    pg_sys::ExecCheckRTPerms((*pstate).p_rtable, true);
    Ok(pstate)
}

/// COPY ... FROM STDIN of `sql` over `data`, in this backend.
///
/// SAFETY: called inside a transaction; `data` outlives the call.
unsafe fn copy_from(sql: &str, data: &[u8]) -> Result<u64, RemoteError> {
    let statement = parse_copy(sql)?;
    if !(*statement).is_from || (*statement).relation.is_null() {
        return Err(RemoteError::local("expected COPY ... FROM STDIN"));
    }
    let source = text(sql)?;
    let relation = pg_sys::table_openrv((*statement).relation, pg_sys::RowExclusiveLock as _);
    let pstate =
        copy_parse_state(&source, relation, pg_sys::RowExclusiveLock, (*statement).attlist, pg_sys::ACL_INSERT as pg_sys::AclMode)?;
    let pushed = !pg_sys::ActiveSnapshotSet();
    if pushed {
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    SOURCE.with(|s| s.set((data.as_ptr(), data.len(), 0)));
    let state = pg_sys::BeginCopyFrom(
        pstate,
        relation,
        std::ptr::null_mut(),
        std::ptr::null(),
        false,
        Some(copy_source),
        (*statement).attlist,
        options_with_encoding((*statement).options),
    );
    let rows = pg_sys::CopyFrom(state);
    pg_sys::EndCopyFrom(state);
    SOURCE.with(|s| s.set((std::ptr::null(), 0, 0)));
    if pushed {
        pg_sys::PopActiveSnapshot();
    }
    pg_sys::table_close(relation, pg_sys::NoLock as _);
    pg_sys::CommandCounterIncrement();
    Ok(rows)
}

/// COPY ... TO STDOUT of `sql`, written to the file `path` instead; the row count and whether
/// the format is binary.
///
/// SAFETY: called inside a transaction.
unsafe fn copy_to(sql: &str, path: &str) -> Result<(u64, bool), RemoteError> {
    let statement = parse_copy(sql)?;
    if (*statement).is_from {
        return Err(RemoteError::local("expected COPY ... TO STDOUT"));
    }
    let options = (*statement).options;
    let count = if options.is_null() { 0 } else { (*options).length as usize };
    let mut binary = false;
    for i in 0..count {
        let option = (*(*options).elements.add(i)).ptr_value.cast::<pg_sys::DefElem>();
        if CStr::from_ptr((*option).defname).to_bytes() == b"format" {
            let value = pg_sys::defGetString(option);
            binary = CStr::from_ptr(value).to_bytes().eq_ignore_ascii_case(b"binary");
        }
    }
    let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
    let source = text(sql)?;
    (*pstate).p_sourcetext = source.as_ptr();
    let file = text(path)?;
    // COPY (query) TO: the query, analysed by BeginCopyTo; COPY table TO: the table, whose
    // privileges are checked here.
    let (relation, raw, pstate) = if (*statement).relation.is_null() {
        let raw = pg_sys::palloc0(std::mem::size_of::<pg_sys::RawStmt>()).cast::<pg_sys::RawStmt>();
        (*raw).type_ = pg_sys::NodeTag::T_RawStmt;
        (*raw).stmt = (*statement).query;
        (*raw).stmt_location = -1;
        (std::ptr::null_mut(), raw, pstate)
    } else {
        let relation = pg_sys::table_openrv((*statement).relation, pg_sys::AccessShareLock as _);
        let pstate =
            copy_parse_state(&source, relation, pg_sys::AccessShareLock, (*statement).attlist, pg_sys::ACL_SELECT as pg_sys::AclMode)?;
        (relation, std::ptr::null_mut(), pstate)
    };
    let pushed = !pg_sys::ActiveSnapshotSet();
    if pushed {
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let relid = if relation.is_null() { pg_sys::InvalidOid } else { (*relation).rd_id };
    let state =
        pg_sys::BeginCopyTo(pstate, relation, raw, relid, file.as_ptr(), false, (*statement).attlist, options_with_encoding(options));
    let rows = pg_sys::DoCopyTo(state);
    pg_sys::EndCopyTo(state);
    if !relation.is_null() {
        pg_sys::table_close(relation, pg_sys::NoLock as _);
    }
    if pushed {
        pg_sys::PopActiveSnapshot();
    }
    Ok((rows, binary))
}
