//! A small safe wrapper over libpq (pq-sys): connect, run a statement with text parameters,
//! copy the result out. Every `unsafe` FFI call of this crate into libpq is in this file.
//!
//! Calls are blocking: connection set-up is bounded by `connect_timeout`, and a peer that dies
//! or becomes unreachable mid-command by TCP keepalives and `tcp_user_timeout` (about 30 s), but
//! a worker that is alive and merely slow (or blocked on a lock) is waited for, and the wait
//! cannot be cancelled. The query engine moves to libpq's non-blocking interface with latch
//! waits (interruptible, parallel); until then this is a known limitation.

use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::ptr::NonNull;

use pq_sys as pq;

pub struct ConnectParams<'a> {
    pub host: &'a str,
    pub port: i32,
    pub dbname: &'a str,
    pub user: &'a str,
    pub connect_timeout_s: i32,
    /// The coordinator database's encoding, so text crosses unchanged.
    pub client_encoding: &'a str,
}

/// An error reported by libpq or by the remote server (with its SQLSTATE when it sent one).
#[derive(Debug, Clone)]
pub struct RemoteError {
    pub sqlstate: Option<String>,
    pub message: String,
    /// The node's CONTEXT line(s), when it sent any (for COPY: which row failed).
    pub context: Option<String>,
}

impl RemoteError {
    fn local(message: impl Into<String>) -> Self {
        Self { sqlstate: None, message: message.into(), context: None }
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.sqlstate {
            Some(code) => write!(f, "{} (SQLSTATE {code})", self.message),
            None => write!(f, "{}", self.message),
        }
    }
}

/// Rows of a result, copied out of libpq as text.
#[derive(Debug, Default)]
pub struct RemoteRows {
    pub rows: Vec<Vec<Option<String>>>,
}

impl RemoteRows {
    /// The value at (row, column), `None` for NULL or out of range.
    pub fn value(&self, row: usize, column: usize) -> Option<&str> {
        self.rows.get(row)?.get(column)?.as_deref()
    }
}

pub struct RemoteConnection {
    conn: NonNull<pq::PGconn>,
}

fn cstring(value: &str) -> Result<CString, RemoteError> {
    CString::new(value).map_err(|_| RemoteError::local(format!("value contains a NUL byte: {value:?}")))
}

/// Copies a libpq-owned C string (may be NULL) into a trimmed Rust string.
///
/// SAFETY: `ptr` must be NULL or point to a NUL-terminated string valid for this call.
unsafe fn owned_text(ptr: *const c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    CStr::from_ptr(ptr).to_string_lossy().trim_end().to_string()
}

impl RemoteConnection {
    pub fn connect(params: &ConnectParams<'_>) -> Result<Self, RemoteError> {
        // Keyword/value arrays: no conninfo string is ever assembled, so nothing needs quoting.
        let pairs = [
            ("host", params.host.to_string()),
            ("port", params.port.to_string()),
            ("dbname", params.dbname.to_string()),
            ("user", params.user.to_string()),
            ("connect_timeout", params.connect_timeout_s.max(1).to_string()),
            ("application_name", "pg_sharding".to_string()),
            ("client_encoding", params.client_encoding.to_string()),
            // A worker that dies or becomes unreachable is noticed within about half a minute,
            // also in the middle of a command (calls block until then: see the note in the
            // module documentation).
            ("keepalives", "1".to_string()),
            ("keepalives_idle", "10".to_string()),
            ("keepalives_interval", "5".to_string()),
            ("keepalives_count", "3".to_string()),
            ("tcp_user_timeout", "30000".to_string()),
        ];
        let keywords: Vec<CString> =
            pairs.iter().map(|(k, _)| cstring(k)).collect::<Result<_, _>>()?;
        let values: Vec<CString> =
            pairs.iter().map(|(_, v)| cstring(v)).collect::<Result<_, _>>()?;
        let mut keyword_ptrs: Vec<*const c_char> = keywords.iter().map(|k| k.as_ptr()).collect();
        let mut value_ptrs: Vec<*const c_char> = values.iter().map(|v| v.as_ptr()).collect();
        keyword_ptrs.push(std::ptr::null());
        value_ptrs.push(std::ptr::null());

        // SAFETY: both arrays are NULL-terminated and outlive the call; expand_dbname = 0 keeps
        // dbname from being parsed as a connection string.
        let raw = unsafe { pq::PQconnectdbParams(keyword_ptrs.as_ptr(), value_ptrs.as_ptr(), 0) };
        let conn = NonNull::new(raw)
            .ok_or_else(|| RemoteError::local("libpq could not allocate a connection"))?;
        let connection = RemoteConnection { conn };
        // SAFETY: conn is a valid PGconn until Drop.
        let status = unsafe { pq::PQstatus(connection.conn.as_ptr()) };
        if status != pq::ConnStatusType::CONNECTION_OK {
            return Err(RemoteError::local(connection.last_error()));
        }
        Ok(connection)
    }

    fn last_error(&self) -> String {
        // SAFETY: conn is valid; the message is owned by the connection and copied at once.
        unsafe { owned_text(pq::PQerrorMessage(self.conn.as_ptr())) }
    }

    /// True while the connection is usable (not broken by a server crash or network error).
    pub fn is_ok(&self) -> bool {
        // SAFETY: conn is valid until Drop.
        unsafe { pq::PQstatus(self.conn.as_ptr()) == pq::ConnStatusType::CONNECTION_OK }
    }

    /// Runs one or more statements given as text (simple query protocol), no parameters.
    /// Fails with the first error; results of the last statement are returned.
    pub fn exec(&self, sql: &str) -> Result<RemoteRows, RemoteError> {
        let sql = cstring(sql)?;
        // SAFETY: valid connection and NUL-terminated text; results are drained and cleared.
        unsafe {
            if pq::PQsendQuery(self.conn.as_ptr(), sql.as_ptr()) != 1 {
                return Err(RemoteError::local(self.last_error()));
            }
        }
        self.drain_results()
    }

    /// Reads every pending result; the first error wins, the last rows are returned.
    pub fn drain_results(&self) -> Result<RemoteRows, RemoteError> {
        let mut outcome: Result<RemoteRows, RemoteError> = Ok(RemoteRows::default());
        loop {
            // SAFETY: valid connection; each result is owned by a guard and cleared.
            let result = unsafe { pq::PQgetResult(self.conn.as_ptr()) };
            let Some(result) = NonNull::new(result) else { break };
            let guard = ResultGuard(result);
            let rows = guard.rows();
            if outcome.is_ok() {
                outcome = rows;
            }
        }
        if outcome.is_ok() && !self.is_ok() {
            return Err(RemoteError::local(self.last_error()));
        }
        outcome
    }

    /// Starts `COPY ... FROM STDIN`; rows are then sent with `copy_data` and closed with `copy_end`.
    pub fn copy_start(&self, sql: &str) -> Result<(), RemoteError> {
        let sql = cstring(sql)?;
        // SAFETY: valid connection; the single result is cleared by the guard.
        unsafe {
            let result = pq::PQexec(self.conn.as_ptr(), sql.as_ptr());
            let Some(result) = NonNull::new(result) else {
                return Err(RemoteError::local(self.last_error()));
            };
            let guard = ResultGuard(result);
            if pq::PQresultStatus(guard.0.as_ptr()) == pq::ExecStatusType::PGRES_COPY_IN {
                return Ok(());
            }
            guard.rows().map(|_| ()).and(Err(RemoteError::local("the node did not enter COPY mode")))
        }
    }

    /// Sends COPY data (any number of whole or partial rows).
    pub fn copy_data(&self, data: &[u8]) -> Result<(), RemoteError> {
        let length = i32::try_from(data.len()).map_err(|_| RemoteError::local("COPY chunk too large"))?;
        // SAFETY: valid connection in COPY IN state; libpq copies the buffer before returning.
        let sent = unsafe { pq::PQputCopyData(self.conn.as_ptr(), data.as_ptr().cast(), length) };
        if sent == 1 {
            Ok(())
        } else {
            Err(RemoteError::local(self.last_error()))
        }
    }

    /// True while a sent command has not finished (reads what has arrived, never blocks); an
    /// error when the connection failed.
    pub fn is_busy(&self) -> Result<bool, RemoteError> {
        // SAFETY: valid connection; PQconsumeInput only reads what the socket already holds.
        unsafe {
            if pq::PQconsumeInput(self.conn.as_ptr()) != 1 {
                return Err(RemoteError::local(self.last_error()));
            }
            Ok(pq::PQisBusy(self.conn.as_ptr()) == 1)
        }
    }

    /// Ends COPY without waiting for the node to finish: collect the outcome later with
    /// `drain_results` (before anything else is sent on this connection).
    pub fn copy_end_async(&self) -> Result<(), RemoteError> {
        // SAFETY: valid connection in COPY IN state.
        if unsafe { pq::PQputCopyEnd(self.conn.as_ptr(), std::ptr::null()) } == 1 {
            Ok(())
        } else {
            Err(RemoteError::local(self.last_error()))
        }
    }

    /// Ends COPY (or aborts it with `error`), and returns the command's outcome.
    pub fn copy_end(&self, error: Option<&str>) -> Result<RemoteRows, RemoteError> {
        let message = error.map(cstring).transpose()?;
        let message_ptr = message.as_ref().map_or(std::ptr::null(), |m| m.as_ptr());
        // SAFETY: valid connection in COPY IN state; message is NULL or NUL-terminated.
        let ended = unsafe { pq::PQputCopyEnd(self.conn.as_ptr(), message_ptr) };
        if ended != 1 {
            return Err(RemoteError::local(self.last_error()));
        }
        self.drain_results()
    }

    /// Runs `COPY ... TO STDOUT` and hands every chunk of its output to `sink`; returns the
    /// number of rows the node reported.
    pub fn copy_out(
        &self,
        sql: &str,
        mut sink: impl FnMut(&[u8]) -> Result<(), RemoteError>,
    ) -> Result<u64, RemoteError> {
        let sql = cstring(sql)?;
        // SAFETY: valid connection; every buffer from PQgetCopyData is freed with PQfreemem
        // after being copied by `sink`; results are cleared by their guards.
        unsafe {
            let result = pq::PQexec(self.conn.as_ptr(), sql.as_ptr());
            let Some(result) = NonNull::new(result) else {
                return Err(RemoteError::local(self.last_error()));
            };
            let guard = ResultGuard(result);
            if pq::PQresultStatus(guard.0.as_ptr()) != pq::ExecStatusType::PGRES_COPY_OUT {
                return guard.rows().and(Err(RemoteError::local("the node did not start COPY TO STDOUT")));
            }
            drop(guard);
            let mut sink_error = None;
            loop {
                let mut buffer: *mut c_char = std::ptr::null_mut();
                let length = pq::PQgetCopyData(self.conn.as_ptr(), &mut buffer, 0);
                if length > 0 {
                    let chunk = std::slice::from_raw_parts(buffer as *const u8, length as usize);
                    if sink_error.is_none() {
                        if let Err(error) = sink(chunk) {
                            sink_error = Some(error);
                        }
                    }
                    pq::PQfreemem(buffer.cast());
                } else {
                    break;
                }
            }
            let mut rows = 0u64;
            loop {
                let result = pq::PQgetResult(self.conn.as_ptr());
                let Some(result) = NonNull::new(result) else { break };
                let guard = ResultGuard(result);
                guard.rows()?;
                let tuples = CStr::from_ptr(pq::PQcmdTuples(guard.0.as_ptr())).to_string_lossy();
                rows = tuples.parse().unwrap_or(rows);
            }
            match sink_error {
                Some(error) => Err(error),
                None => Ok(rows),
            }
        }
    }

    /// Runs one statement with text-format parameters ($1, $2, ...; `None` is NULL).
    pub fn query(&self, sql: &str, params: &[Option<&str>]) -> Result<RemoteRows, RemoteError> {
        self.query_counted(sql, params).map(|(rows, _)| rows)
    }

    /// `query`, also returning how many rows the command affected (its tag's count).
    pub fn query_counted(&self, sql: &str, params: &[Option<&str>]) -> Result<(RemoteRows, u64), RemoteError> {
        let sql = cstring(sql)?;
        let owned: Vec<Option<CString>> = params.iter().map(|p| p.map(cstring).transpose()).collect::<Result<_, _>>()?;
        let value_ptrs: Vec<*const c_char> =
            owned.iter().map(|p| p.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())).collect();
        let count = i32::try_from(value_ptrs.len()).map_err(|_| RemoteError::local("too many query parameters"))?;
        // SAFETY: as in `query`; PQcmdTuples points into the result, copied before it is cleared.
        unsafe {
            let result = pq::PQexecParams(
                self.conn.as_ptr(),
                sql.as_ptr(),
                count,
                std::ptr::null(),
                value_ptrs.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                0,
            );
            let Some(result) = NonNull::new(result) else {
                return Err(RemoteError::local(self.last_error()));
            };
            let guard = ResultGuard(result);
            let rows = guard.rows()?;
            let affected = CStr::from_ptr(pq::PQcmdTuples(guard.0.as_ptr())).to_string_lossy().parse().unwrap_or(0);
            Ok((rows, affected))
        }
    }
}

impl Drop for RemoteConnection {
    fn drop(&mut self) {
        // SAFETY: conn came from PQconnectdbParams and is finished exactly once.
        unsafe { pq::PQfinish(self.conn.as_ptr()) }
    }
}

struct ResultGuard(NonNull<pq::PGresult>);

impl ResultGuard {
    fn rows(&self) -> Result<RemoteRows, RemoteError> {
        let res = self.0.as_ptr();
        // SAFETY: res is a valid PGresult until Drop; every returned pointer is copied at once.
        unsafe {
            match pq::PQresultStatus(res) {
                pq::ExecStatusType::PGRES_TUPLES_OK | pq::ExecStatusType::PGRES_COMMAND_OK => {}
                _ => {
                    let sqlstate =
                        pq::PQresultErrorField(res, pq::PG_DIAG_SQLSTATE as i32);
                    let sqlstate = (!sqlstate.is_null()).then(|| owned_text(sqlstate));
                    let message = owned_text(pq::PQresultErrorField(
                        res,
                        pq::PG_DIAG_MESSAGE_PRIMARY as i32,
                    ));
                    let message =
                        if message.is_empty() { owned_text(pq::PQresultErrorMessage(res)) } else { message };
                    let context = owned_text(pq::PQresultErrorField(res, pq::PG_DIAG_CONTEXT as i32));
                    let context = (!context.is_empty()).then_some(context);
                    return Err(RemoteError { sqlstate, message, context });
                }
            }
            let nrows = pq::PQntuples(res).max(0);
            let ncols = pq::PQnfields(res).max(0);
            let mut rows = Vec::with_capacity(nrows as usize);
            for r in 0..nrows {
                let mut row = Vec::with_capacity(ncols as usize);
                for c in 0..ncols {
                    if pq::PQgetisnull(res, r, c) == 1 {
                        row.push(None);
                    } else {
                        let value = CStr::from_ptr(pq::PQgetvalue(res, r, c));
                        row.push(Some(value.to_string_lossy().into_owned()));
                    }
                }
                rows.push(row);
            }
            Ok(RemoteRows { rows })
        }
    }
}

impl Drop for ResultGuard {
    fn drop(&mut self) {
        // SAFETY: the result is cleared exactly once.
        unsafe { pq::PQclear(self.0.as_ptr()) }
    }
}
