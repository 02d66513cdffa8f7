//! A small safe wrapper over libpq (pq-sys): connect, run a statement with text parameters,
//! copy the result out. Every `unsafe` FFI call of this crate into libpq is in this file.
//!
//! Connections are in libpq's non-blocking mode, and every wait for a node is a wait on this
//! backend's latch and the connection's socket: query cancel, statement_timeout and
//! pg_terminate_backend interrupt it (CHECK_FOR_INTERRUPTS raises the ERROR, which aborts the
//! transaction; the abort then cancels the node's command), and postmaster death ends it.
//! Connection set-up is bounded by `connect_timeout`; a peer that dies or becomes unreachable
//! is noticed through TCP keepalives and `tcp_user_timeout`.

use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use pgrx::pg_sys;
use pq_sys as pq;

use super::local::{LocalConnection, LocalKind, LocalResult};

pub struct ConnectParams<'a> {
    pub host: &'a str,
    /// Names the coordinator backend that owns the connection (see `connection::owner_tag`).
    pub application_name: &'a str,
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
    /// The node's DETAIL and HINT, when it sent them (the key of a unique violation, say).
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl RemoteError {
    pub fn local(message: impl Into<String>) -> Self {
        Self { sqlstate: None, message: message.into(), context: None, detail: None, hint: None }
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

pub struct PqConnection {
    conn: NonNull<pq::PGconn>,
    /// Latch, postmaster death and this connection's socket, made once (on the first wait)
    /// instead of per wait; freed with the connection.
    events: std::cell::Cell<*mut pg_sys::WaitEventSet>,
    /// The coordinator role this connection was opened for (its user on the node).
    role: std::cell::Cell<pg_sys::Oid>,
}

/// Position of the socket in a connection's WaitEventSet (after the latch and postmaster death).
const SOCKET_EVENT: i32 = 2;

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

impl PqConnection {
    pub fn connect(params: &ConnectParams<'_>) -> Result<Self, RemoteError> {
        // Keyword/value arrays: no conninfo string is ever assembled, so nothing needs quoting.
        let pairs = [
            ("host", params.host.to_string()),
            ("port", params.port.to_string()),
            ("dbname", params.dbname.to_string()),
            ("user", params.user.to_string()),
            ("connect_timeout", params.connect_timeout_s.max(1).to_string()),
            ("application_name", params.application_name.to_string()),
            ("client_encoding", params.client_encoding.to_string()),
            // A worker that dies or becomes unreachable is noticed within about half a minute,
            // also in the middle of a command.
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
        let raw = unsafe { pq::PQconnectStartParams(keyword_ptrs.as_ptr(), value_ptrs.as_ptr(), 0) };
        let conn = NonNull::new(raw)
            .ok_or_else(|| RemoteError::local("libpq could not allocate a connection"))?;
        // Owned from here on: an interrupt during the handshake still finishes the connection.
        let connection = PqConnection {
            conn,
            events: std::cell::Cell::new(std::ptr::null_mut()),
            role: std::cell::Cell::new(pg_sys::InvalidOid),
        };
        // connect_timeout does not apply to PQconnectPoll: the deadline is ours.
        let deadline = Instant::now() + Duration::from_secs(params.connect_timeout_s.max(1) as u64);
        // SAFETY: conn is a valid PGconn until Drop.
        if unsafe { pq::PQstatus(connection.conn.as_ptr()) } == pq::ConnStatusType::CONNECTION_BAD {
            return Err(RemoteError::local(connection.last_error()));
        }
        let mut waiting_for = pg_sys::WL_SOCKET_WRITEABLE;
        loop {
            // The socket can change while libpq tries the host's addresses: a one-off wait.
            // SAFETY: valid connection; MyLatch is this backend's latch.
            let fired = unsafe {
                let socket = pq::PQsocket(connection.conn.as_ptr());
                if socket < 0 {
                    return Err(RemoteError::local(connection.last_error()));
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(RemoteError::local(format!(
                        "timeout expired after {} s connecting to {}:{}",
                        params.connect_timeout_s.max(1),
                        params.host,
                        params.port
                    )));
                }
                pg_sys::WaitLatchOrSocket(
                    *std::ptr::addr_of!(pg_sys::MyLatch),
                    (pg_sys::WL_LATCH_SET | pg_sys::WL_EXIT_ON_PM_DEATH | pg_sys::WL_TIMEOUT | waiting_for) as i32,
                    socket,
                    left.as_millis().max(1) as _,
                    pg_sys::PG_WAIT_EXTENSION,
                ) as u32
            };
            if fired & pg_sys::WL_LATCH_SET != 0 {
                // SAFETY: resetting our own latch, then serving interrupts (may raise an ERROR).
                unsafe { pg_sys::ResetLatch(*std::ptr::addr_of!(pg_sys::MyLatch)) };
                pgrx::check_for_interrupts!();
            }
            if fired & waiting_for == 0 {
                continue;
            }
            // SAFETY: valid connection in the middle of its handshake.
            match unsafe { pq::PQconnectPoll(connection.conn.as_ptr()) } {
                pq::PostgresPollingStatusType::PGRES_POLLING_OK => break,
                pq::PostgresPollingStatusType::PGRES_POLLING_READING => waiting_for = pg_sys::WL_SOCKET_READABLE,
                pq::PostgresPollingStatusType::PGRES_POLLING_WRITING => waiting_for = pg_sys::WL_SOCKET_WRITEABLE,
                _ => return Err(RemoteError::local(connection.last_error())),
            }
        }
        // SAFETY: valid connection.
        if unsafe { pq::PQsetnonblocking(connection.conn.as_ptr(), 1) } != 0 {
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

    /// Waits until the socket has `events` (WL_SOCKET_*), the latch is set, or `deadline`
    /// passes. Interrupts are served: a cancel or timeout raises its ERROR from here.
    fn wait(&self, events: u32, deadline: Option<Instant>) -> Result<(), RemoteError> {
        if self.wait_events(events, deadline)? {
            return Err(RemoteError::local("timed out waiting for the node"));
        }
        Ok(())
    }

    /// `wait`, telling a timeout (true) apart instead of failing.
    fn wait_events(&self, events: u32, deadline: Option<Instant>) -> Result<bool, RemoteError> {
        let timeout_ms: i64 = match deadline {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(true);
                }
                left.as_millis().max(1) as i64
            }
        };
        // SAFETY: the set lives in TopMemoryContext until Drop; MyLatch is this backend's latch
        // and the socket belongs to this connection for its whole life.
        let fired = unsafe {
            let socket = pq::PQsocket(self.conn.as_ptr());
            if socket < 0 {
                return Err(RemoteError::local(self.last_error()));
            }
            let mut set = self.events.get();
            if set.is_null() {
                set = pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, 3);
                let latch = *std::ptr::addr_of!(pg_sys::MyLatch);
                pg_sys::AddWaitEventToSet(set, pg_sys::WL_LATCH_SET, pg_sys::PGINVALID_SOCKET, latch, std::ptr::null_mut());
                pg_sys::AddWaitEventToSet(set, pg_sys::WL_EXIT_ON_PM_DEATH, pg_sys::PGINVALID_SOCKET, std::ptr::null_mut(), std::ptr::null_mut());
                pg_sys::AddWaitEventToSet(set, events, socket, std::ptr::null_mut(), std::ptr::null_mut());
                self.events.set(set);
            } else {
                pg_sys::ModifyWaitEvent(set, SOCKET_EVENT, events, std::ptr::null_mut());
            }
            let mut occurred = std::mem::zeroed::<pg_sys::WaitEvent>();
            let count = pg_sys::WaitEventSetWait(set, timeout_ms as _, &mut occurred, 1, pg_sys::PG_WAIT_EXTENSION);
            if count == 0 {
                pg_sys::WL_TIMEOUT
            } else {
                occurred.events
            }
        };
        if fired & pg_sys::WL_LATCH_SET != 0 {
            // SAFETY: resetting our own latch, then serving interrupts (may raise an ERROR).
            unsafe { pg_sys::ResetLatch(*std::ptr::addr_of!(pg_sys::MyLatch)) };
            pgrx::check_for_interrupts!();
        }
        Ok(fired & pg_sys::WL_TIMEOUT != 0 && fired & (pg_sys::WL_SOCKET_READABLE | pg_sys::WL_SOCKET_WRITEABLE) == 0)
    }

    /// Sends everything libpq has queued, waiting (interruptibly) while the socket is full.
    fn flush(&self, deadline: Option<Instant>) -> Result<(), RemoteError> {
        loop {
            // SAFETY: valid connection in non-blocking mode.
            match unsafe { pq::PQflush(self.conn.as_ptr()) } {
                0 => return Ok(()),
                1 => {
                    self.wait(pg_sys::WL_SOCKET_READABLE | pg_sys::WL_SOCKET_WRITEABLE, deadline)?;
                    // Read what arrived, so a node that is talking back does not block on us.
                    // SAFETY: valid connection.
                    if unsafe { pq::PQconsumeInput(self.conn.as_ptr()) } != 1 {
                        return Err(RemoteError::local(self.last_error()));
                    }
                }
                _ => return Err(RemoteError::local(self.last_error())),
            }
        }
    }

    /// The next result of the command in progress (`None` when it is complete), waiting
    /// interruptibly for the node.
    fn next_result(&self, deadline: Option<Instant>) -> Result<Option<ResultGuard>, RemoteError> {
        loop {
            // SAFETY: valid connection; PQgetResult does not block once PQisBusy is false.
            unsafe {
                // Read from the socket only when what libpq holds is not a whole result: each
                // read shifts the rest of its buffer, which made reading many rows quadratic.
                if pq::PQisBusy(self.conn.as_ptr()) != 0 {
                    if pq::PQconsumeInput(self.conn.as_ptr()) != 1 {
                        return Err(RemoteError::local(self.last_error()));
                    }
                }
                if pq::PQisBusy(self.conn.as_ptr()) == 0 {
                    return Ok(NonNull::new(pq::PQgetResult(self.conn.as_ptr())).map(ResultGuard));
                }
            }
            self.wait(pg_sys::WL_SOCKET_READABLE, deadline)?;
        }
    }

    fn send_query(&self, sql: &CStr) -> Result<(), RemoteError> {
        // SAFETY: valid connection and NUL-terminated text.
        if unsafe { pq::PQsendQuery(self.conn.as_ptr(), sql.as_ptr()) } != 1 {
            return Err(RemoteError::local(self.last_error()));
        }
        self.flush(None)
    }

    /// Runs one or more statements given as text (simple query protocol), no parameters.
    /// Fails with the first error; results of the last statement are returned.
    pub fn exec(&self, sql: &str) -> Result<RemoteRows, RemoteError> {
        self.send_query(&cstring(sql)?)?;
        self.drain_results()
    }

    /// Sends statements as text without waiting for their results (`finish` reads them), so
    /// that several nodes can work on them at the same time.
    pub fn send(&self, sql: &str) -> Result<(), RemoteError> {
        self.send_query(&cstring(sql)?)
    }

    /// Reads the results of what `send` sent, giving up at `deadline` (the connection is then
    /// left busy: the caller closes it).
    pub fn finish(&self, deadline: Option<Instant>) -> Result<RemoteRows, RemoteError> {
        self.drain_results_until(deadline).map(|(rows, _)| rows)
    }

    /// Reads every pending result; the first error wins, the last rows are returned.
    pub fn drain_results(&self) -> Result<RemoteRows, RemoteError> {
        self.drain_results_until(None).map(|(rows, _)| rows)
    }

    fn drain_results_until(&self, deadline: Option<Instant>) -> Result<(RemoteRows, u64), RemoteError> {
        let mut outcome: Result<(RemoteRows, u64), RemoteError> = Ok((RemoteRows::default(), 0));
        while let Some(guard) = self.next_result(deadline)? {
            if outcome.is_ok() {
                outcome = guard.rows().map(|rows| (rows, guard.affected()));
            }
        }
        if outcome.is_ok() && !self.is_ok() {
            return Err(RemoteError::local(self.last_error()));
        }
        outcome
    }

    /// Starts `COPY ... FROM STDIN`; rows are then sent with `copy_data` and closed with `copy_end`.
    pub fn copy_start(&self, sql: &str) -> Result<(), RemoteError> {
        self.send_query(&cstring(sql)?)?;
        let Some(guard) = self.next_result(None)? else {
            return Err(RemoteError::local("the node did not answer the COPY"));
        };
        // SAFETY: valid result.
        if unsafe { pq::PQresultStatus(guard.0.as_ptr()) } == pq::ExecStatusType::PGRES_COPY_IN {
            return Ok(());
        }
        let error = guard.rows().err();
        drop(guard);
        let _ = self.drain_results();
        Err(error.unwrap_or_else(|| RemoteError::local("the node did not enter COPY mode")))
    }

    /// Sends COPY data (any number of whole or partial rows).
    pub fn copy_data(&self, data: &[u8]) -> Result<(), RemoteError> {
        let length = i32::try_from(data.len()).map_err(|_| RemoteError::local("COPY chunk too large"))?;
        loop {
            // SAFETY: valid connection in COPY IN state; libpq copies the buffer when it queues it.
            match unsafe { pq::PQputCopyData(self.conn.as_ptr(), data.as_ptr().cast(), length) } {
                1 => return self.flush(None),
                0 => self.wait(pg_sys::WL_SOCKET_WRITEABLE, None)?,
                _ => return Err(RemoteError::local(self.last_error())),
            }
        }
    }

    fn put_copy_end(&self, error: Option<&str>, deadline: Option<Instant>) -> Result<(), RemoteError> {
        let message = error.map(cstring).transpose()?;
        let message_ptr = message.as_ref().map_or(std::ptr::null(), |m| m.as_ptr());
        loop {
            // SAFETY: valid connection in COPY IN state; message is NULL or NUL-terminated.
            match unsafe { pq::PQputCopyEnd(self.conn.as_ptr(), message_ptr) } {
                1 => return self.flush(deadline),
                0 => self.wait(pg_sys::WL_SOCKET_WRITEABLE, deadline)?,
                _ => return Err(RemoteError::local(self.last_error())),
            }
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
        self.put_copy_end(None, None)
    }

    /// Ends COPY (or aborts it with `error`), and returns the command's outcome.
    pub fn copy_end(&self, error: Option<&str>) -> Result<RemoteRows, RemoteError> {
        self.put_copy_end(error, None)?;
        self.drain_results()
    }

    /// Runs `COPY ... TO STDOUT` and hands every chunk of its output to `sink`; returns the
    /// number of rows the node reported.
    pub fn copy_out(
        &self,
        sql: &str,
        mut sink: impl FnMut(&[u8]) -> Result<(), RemoteError>,
    ) -> Result<u64, RemoteError> {
        self.send_query(&cstring(sql)?)?;
        let Some(guard) = self.next_result(None)? else {
            return Err(RemoteError::local("the node did not answer the COPY"));
        };
        // SAFETY: valid result.
        if unsafe { pq::PQresultStatus(guard.0.as_ptr()) } != pq::ExecStatusType::PGRES_COPY_OUT {
            let error = guard.rows().err();
            drop(guard);
            let _ = self.drain_results();
            return Err(error.unwrap_or_else(|| RemoteError::local("the node did not start COPY TO STDOUT")));
        }
        drop(guard);
        let mut sink_error = None;
        self.read_copy_out(None, |chunk| {
            if sink_error.is_none() {
                if let Err(error) = sink(chunk) {
                    sink_error = Some(error);
                }
            }
        })?;
        let (_, rows) = self.drain_results_until(None)?;
        match sink_error {
            Some(error) => Err(error),
            None => Ok(rows),
        }
    }

    /// Brings the connection back to idle after the local transaction failed, within
    /// `timeout`: ends an open COPY, cancels a running command, reads what is left, and rolls
    /// back. False when that did not work (the caller then closes the connection, which makes
    /// the node roll back by itself).
    pub fn abort_and_rollback(&self, timeout: Duration) -> bool {
        if self.cancel_and_read(Some(Instant::now() + timeout)).is_err() {
            return false;
        }
        // A statement that failed outside a transaction block left nothing to roll back (a
        // ROLLBACK would only log a warning on the node).
        self.is_idle() || self.cancel_and_run("ROLLBACK", timeout).is_ok()
    }

    /// Stops what the connection is doing (an open COPY, a running command), reads what is
    /// left, then runs `sql`, all within `timeout`.
    pub fn cancel_and_run(&self, sql: &str, timeout: Duration) -> Result<RemoteRows, RemoteError> {
        let deadline = Some(Instant::now() + timeout);
        self.cancel_and_read(deadline)?;
        let sql = cstring(sql)?;
        // SAFETY: valid, idle connection.
        if unsafe { pq::PQsendQuery(self.conn.as_ptr(), sql.as_ptr()) } != 1 {
            return Err(RemoteError::local(self.last_error()));
        }
        self.flush(deadline)?;
        self.drain_results_until(deadline).map(|(rows, _)| rows)
    }

    /// Stops the command running on the connection (outside any remote transaction: a read
    /// whose rows are no longer wanted) and reads what is left, within `timeout`. False when
    /// the connection is not idle afterwards.
    pub fn cancel_and_drain(&self, timeout: Duration) -> bool {
        self.cancel_and_read(Some(Instant::now() + timeout)).is_ok() && self.is_idle()
    }

    fn cancel_and_read(&self, deadline: Option<Instant>) -> Result<(), RemoteError> {
        // SAFETY: valid connection; the cancel object is freed exactly once.
        unsafe {
            if pq::PQtransactionStatus(self.conn.as_ptr()) == pq::PGTransactionStatusType::PQTRANS_ACTIVE {
                // Ends a COPY FROM STDIN in progress (an error for anything else, ignored).
                let _ = self.put_copy_end(Some("pg_sharding: the coordinator's transaction was aborted"), deadline);
                let cancel = pq::PQgetCancel(self.conn.as_ptr());
                if !cancel.is_null() {
                    let mut error = [0 as c_char; 256];
                    pq::PQcancel(cancel, error.as_mut_ptr(), error.len() as i32);
                    pq::PQfreeCancel(cancel);
                }
            }
        }
        // A COPY OUT returns its COPY_OUT result until its rows are read: read and drop them.
        // A COPY IN returns its COPY_IN result until it is ended: end it (again: the first
        // attempt may not have got through). And whatever keeps coming, the deadline holds.
        while let Some(result) = self.next_result(deadline)? {
            // SAFETY: a valid result.
            match unsafe { pq::PQresultStatus(result.0.as_ptr()) } {
                pq::ExecStatusType::PGRES_COPY_OUT => self.read_copy_out(deadline, |_| {})?,
                pq::ExecStatusType::PGRES_COPY_IN => {
                    self.put_copy_end(Some("pg_sharding: the coordinator's transaction was aborted"), deadline)?
                }
                _ => {}
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(RemoteError::local("timed out waiting for the node"));
            }
        }
        Ok(())
    }

    /// Reads the rest of a COPY OUT, one row (one chunk) at a time, into `sink`.
    fn read_copy_out(&self, deadline: Option<Instant>, mut sink: impl FnMut(&[u8])) -> Result<(), RemoteError> {
        loop {
            let mut buffer: *mut c_char = std::ptr::null_mut();
            // SAFETY: valid connection in COPY OUT state; async mode never blocks; every buffer
            // is freed with PQfreemem after `sink` saw it.
            let length = unsafe { pq::PQgetCopyData(self.conn.as_ptr(), &mut buffer, 1) };
            if length > 0 {
                sink(unsafe { std::slice::from_raw_parts(buffer as *const u8, length as usize) });
                unsafe { pq::PQfreemem(buffer.cast()) };
            } else if length == 0 {
                self.wait(pg_sys::WL_SOCKET_READABLE, deadline)?;
                // SAFETY: valid connection.
                if unsafe { pq::PQconsumeInput(self.conn.as_ptr()) } != 1 {
                    return Err(RemoteError::local(self.last_error()));
                }
            } else {
                return Ok(());
            }
        }
    }

    /// `query`, also returning how many rows the command affected (its tag's count).
    pub fn query_counted(&self, sql: &str, params: &[Option<&str>]) -> Result<(RemoteRows, u64), RemoteError> {
        let sql = cstring(sql)?;
        let owned: Vec<Option<CString>> = params.iter().map(|p| p.map(cstring).transpose()).collect::<Result<_, _>>()?;
        let value_ptrs: Vec<*const c_char> =
            owned.iter().map(|p| p.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())).collect();
        let count = i32::try_from(value_ptrs.len()).map_err(|_| RemoteError::local("too many query parameters"))?;
        // SAFETY: all pointers are valid for the call (libpq copies the parameters); NULL
        // types/lengths/formats mean "infer types, text format".
        let sent = unsafe {
            pq::PQsendQueryParams(
                self.conn.as_ptr(),
                sql.as_ptr(),
                count,
                std::ptr::null(),
                value_ptrs.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                0,
            )
        };
        if sent != 1 {
            return Err(RemoteError::local(self.last_error()));
        }
        self.flush(None)?;
        self.drain_results_until(None)
    }
}

/// What a connection running a task has for the caller right now.
pub enum Poll {
    /// The node has not sent the next result yet.
    Busy,
    /// The next result; `None` when the command is complete.
    Ready(Option<RemoteResult>),
}

/// A parameter of a task: its type for the worker (0: let the worker infer it), and its value
/// in text (format 0) or binary (format 1).
#[derive(Clone)]
pub struct TaskParam {
    pub type_oid: u32,
    pub value: Option<Vec<u8>>,
    pub format: i32,
}

/// libpq's parallel arrays for a task's parameters (pointers into `params`).
struct ParamArrays {
    types: Vec<pq::Oid>,
    values: Vec<*const c_char>,
    lengths: Vec<i32>,
    formats: Vec<i32>,
    count: i32,
}

impl ParamArrays {
    fn new(params: &[TaskParam]) -> Result<Self, RemoteError> {
        Ok(Self {
            types: params.iter().map(|p| p.type_oid).collect(),
            values: params.iter().map(|p| p.value.as_ref().map_or(std::ptr::null(), |v| v.as_ptr().cast())).collect(),
            lengths: params.iter().map(|p| p.value.as_ref().map_or(0, |v| v.len() as i32)).collect(),
            formats: params.iter().map(|p| p.format).collect(),
            count: i32::try_from(params.len()).map_err(|_| RemoteError::local("too many query parameters"))?,
        })
    }
}

/// A statement to run as a task: its text, or the name it was prepared under.
enum Statement<'a> {
    Text(&'a CStr),
    Prepared(&'a CStr),
}

impl PqConnection {
    /// Sends one statement with parameters and returns at once; rows then come one result at a
    /// time (single-row mode) through `poll`. `binary` asks for binary result values.
    pub fn send_task(&self, sql: &CStr, params: &[TaskParam], binary: bool) -> Result<(), RemoteError> {
        self.send_statement(Statement::Text(sql), params, binary)
    }

    /// Like `send_task`, for a statement prepared with `prepare`.
    pub fn send_prepared_task(&self, name: &CStr, params: &[TaskParam], binary: bool) -> Result<(), RemoteError> {
        self.send_statement(Statement::Prepared(name), params, binary)
    }

    fn send_statement(&self, statement: Statement<'_>, params: &[TaskParam], binary: bool) -> Result<(), RemoteError> {
        let arrays = ParamArrays::new(params)?;
        // SAFETY: every array has `count` entries and outlives the call (libpq copies them);
        // text values are NUL-terminated by the caller, binary ones have their lengths.
        unsafe {
            let sent = match statement {
                Statement::Text(sql) => pq::PQsendQueryParams(
                    self.conn.as_ptr(),
                    sql.as_ptr(),
                    arrays.count,
                    arrays.types.as_ptr(),
                    arrays.values.as_ptr(),
                    arrays.lengths.as_ptr(),
                    arrays.formats.as_ptr(),
                    i32::from(binary),
                ),
                Statement::Prepared(name) => pq::PQsendQueryPrepared(
                    self.conn.as_ptr(),
                    name.as_ptr(),
                    arrays.count,
                    arrays.values.as_ptr(),
                    arrays.lengths.as_ptr(),
                    arrays.formats.as_ptr(),
                    i32::from(binary),
                ),
            };
            if sent != 1 {
                return Err(RemoteError::local(self.last_error()));
            }
            // Rows are handed over as they arrive instead of as one result held whole.
            pq::PQsetSingleRowMode(self.conn.as_ptr());
        }
        self.flush(None)
    }

    /// Prepares a named statement on the node (waiting for it).
    pub fn prepare(&self, name: &CStr, sql: &CStr, types: &[u32]) -> Result<(), RemoteError> {
        let count = i32::try_from(types.len()).map_err(|_| RemoteError::local("too many query parameters"))?;
        // SAFETY: valid connection, NUL-terminated strings, `count` types.
        if unsafe { pq::PQsendPrepare(self.conn.as_ptr(), name.as_ptr(), sql.as_ptr(), count, types.as_ptr()) } != 1 {
            return Err(RemoteError::local(self.last_error()));
        }
        self.flush(None)?;
        self.drain_results().map(|_| ())
    }

    /// The coordinator role the connection was opened for (InvalidOid when not recorded).
    pub fn role(&self) -> pg_sys::Oid {
        self.role.get()
    }

    pub fn set_role(&self, role: pg_sys::Oid) {
        self.role.set(role);
    }

    /// Checks a connection that sat idle: reads whatever the node sent meanwhile (a server
    /// shutting down says so and closes) without waiting. False when it is no longer usable.
    pub fn probe(&self) -> bool {
        // One peek at the socket: nothing to read is the healthy case. A server that shut down
        // has sent its last message and closed; anything at all from an idle session means it
        // is not usable.
        let socket = self.socket();
        if socket < 0 || !self.is_ok() {
            return false;
        }
        let mut byte = 0u8;
        // SAFETY: a one-byte peek into a local buffer, non-blocking.
        let peeked = unsafe {
            libc_recv(socket, (&mut byte as *mut u8).cast(), 1, MSG_PEEK | MSG_DONTWAIT)
        };
        peeked < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::WouldBlock
    }

    /// Asks the server to cancel the command running on this connection (no wait).
    pub fn cancel(&self) {
        // SAFETY: valid connection; the cancel object is freed exactly once.
        unsafe {
            let cancel = pq::PQgetCancel(self.conn.as_ptr());
            if !cancel.is_null() {
                let mut error = [0 as c_char; 256];
                pq::PQcancel(cancel, error.as_mut_ptr(), error.len() as i32);
                pq::PQfreeCancel(cancel);
            }
        }
    }

    /// True while a command sent on the connection has not finished (results still to read).
    pub fn is_running(&self) -> bool {
        // SAFETY: valid connection.
        unsafe { pq::PQtransactionStatus(self.conn.as_ptr()) == pq::PGTransactionStatusType::PQTRANS_ACTIVE }
    }

    /// True when the node is not running a command for us and no transaction is open.
    pub fn is_idle(&self) -> bool {
        // SAFETY: valid connection.
        unsafe { pq::PQtransactionStatus(self.conn.as_ptr()) == pq::PGTransactionStatusType::PQTRANS_IDLE }
    }

    /// Reads what the node sent, without waiting.
    pub fn poll(&self) -> Result<Poll, RemoteError> {
        // SAFETY: valid connection; PQgetResult does not block once PQisBusy is false.
        unsafe {
            // Read from the socket only when what libpq has buffered is not enough: a whole
            // answer usually arrives in one read, and reading again would be a wasted syscall
            // for each of its results.
            if pq::PQisBusy(self.conn.as_ptr()) != 0 {
                if pq::PQconsumeInput(self.conn.as_ptr()) != 1 {
                    return Err(RemoteError::local(self.last_error()));
                }
                if pq::PQisBusy(self.conn.as_ptr()) != 0 {
                    return Ok(Poll::Busy);
                }
            }
            Ok(Poll::Ready(NonNull::new(pq::PQgetResult(self.conn.as_ptr())).map(|r| RemoteResult::Pq(ResultGuard(r)))))
        }
    }


    fn socket(&self) -> i32 {
        // SAFETY: valid connection.
        unsafe { pq::PQsocket(self.conn.as_ptr()) }
    }
}

/// Waits until one of `connections` has something to read, an interrupt arrives (served
/// here: a cancel raises its ERROR), or `timeout` passes.
pub fn wait_any_readable(connections: &[&RemoteConnection], timeout: Option<Duration>) -> Result<(), RemoteError> {
    // A local connection always has its next result ready.
    let mut remote = Vec::with_capacity(connections.len());
    for connection in connections {
        match connection {
            RemoteConnection::Local(_) => return Ok(()),
            RemoteConnection::Pq(pq) => remote.push(pq),
        }
    }
    let connections = remote.as_slice();
    if let [only] = connections {
        return only.wait_events(pg_sys::WL_SOCKET_READABLE, timeout.map(|t| Instant::now() + t)).map(|_| ());
    }
    struct Set(*mut pg_sys::WaitEventSet);
    impl Drop for Set {
        fn drop(&mut self) {
            // SAFETY: made below, freed once (also when an interrupt unwinds through here).
            unsafe { pg_sys::FreeWaitEventSet(self.0) }
        }
    }
    // SAFETY: the set lives for this call only; every socket belongs to a live connection.
    let fired = unsafe {
        let set = Set(pg_sys::CreateWaitEventSet(pg_sys::CurrentMemoryContext, connections.len() as i32 + 2));
        let latch = *std::ptr::addr_of!(pg_sys::MyLatch);
        pg_sys::AddWaitEventToSet(set.0, pg_sys::WL_LATCH_SET, pg_sys::PGINVALID_SOCKET, latch, std::ptr::null_mut());
        pg_sys::AddWaitEventToSet(set.0, pg_sys::WL_EXIT_ON_PM_DEATH, pg_sys::PGINVALID_SOCKET, std::ptr::null_mut(), std::ptr::null_mut());
        for connection in connections {
            let socket = connection.socket();
            if socket < 0 {
                return Err(RemoteError::local(connection.last_error()));
            }
            pg_sys::AddWaitEventToSet(set.0, pg_sys::WL_SOCKET_READABLE, socket, std::ptr::null_mut(), std::ptr::null_mut());
        }
        let mut occurred = std::mem::zeroed::<pg_sys::WaitEvent>();
        let timeout_ms = timeout.map_or(-1, |t| t.as_millis().max(1) as i64);
        let count = pg_sys::WaitEventSetWait(set.0, timeout_ms as _, &mut occurred, 1, pg_sys::PG_WAIT_EXTENSION);
        if count == 0 { 0 } else { occurred.events }
    };
    if fired & pg_sys::WL_LATCH_SET != 0 {
        // SAFETY: resetting our own latch, then serving interrupts (may raise an ERROR).
        unsafe { pg_sys::ResetLatch(*std::ptr::addr_of!(pg_sys::MyLatch)) };
        pgrx::check_for_interrupts!();
    }
    Ok(())
}

/// One result of a task: a row (single-row mode), the end of the rows, a command's
/// completion, or an error.
pub enum RemoteResult {
    Pq(ResultGuard),
    Local(LocalResult),
}

pub enum ResultKind {
    Row,
    /// The end of a command's rows; `affected` from its tag (UPDATE ... RETURNING counts here).
    EndOfRows { affected: u64 },
    Command { affected: u64 },
    Error(RemoteError),
}

impl RemoteResult {
    pub fn kind(&self) -> ResultKind {
        let guard = match self {
            RemoteResult::Pq(guard) => guard,
            RemoteResult::Local(result) => {
                return match result.kind {
                    LocalKind::Row => ResultKind::Row,
                    LocalKind::EndOfRows(affected) => ResultKind::EndOfRows { affected },
                    LocalKind::Command(affected) => ResultKind::Command { affected },
                }
            }
        };
        let res = guard.0.as_ptr();
        // SAFETY: valid result until drop.
        match unsafe { pq::PQresultStatus(res) } {
            pq::ExecStatusType::PGRES_SINGLE_TUPLE => ResultKind::Row,
            pq::ExecStatusType::PGRES_TUPLES_OK => ResultKind::EndOfRows { affected: guard.affected() },
            pq::ExecStatusType::PGRES_COMMAND_OK => ResultKind::Command { affected: guard.affected() },
            _ => match guard.rows() {
                Err(error) => ResultKind::Error(error),
                Ok(_) => ResultKind::Error(RemoteError::local("unexpected result from the node")),
            },
        }
    }

    pub fn columns(&self) -> usize {
        match self {
            // SAFETY: valid result.
            RemoteResult::Pq(guard) => unsafe { pq::PQnfields(guard.0.as_ptr()).max(0) as usize },
            RemoteResult::Local(result) => result.columns(),
        }
    }

    /// The value of `column` in the (only) row; `None` for NULL. Text values are followed by a
    /// NUL byte in libpq's buffer, binary ones too (and in a local result's).
    pub fn value(&self, column: usize) -> Option<&[u8]> {
        let guard = match self {
            RemoteResult::Pq(guard) => guard,
            RemoteResult::Local(result) => return result.value(column),
        };
        let res = guard.0.as_ptr();
        // SAFETY: row 0 exists for a PGRES_SINGLE_TUPLE result; the bytes live as long as self.
        unsafe {
            if pq::PQgetisnull(res, 0, column as i32) == 1 {
                return None;
            }
            let length = pq::PQgetlength(res, 0, column as i32).max(0) as usize;
            Some(std::slice::from_raw_parts(pq::PQgetvalue(res, 0, column as i32).cast::<u8>(), length))
        }
    }
}

impl Drop for PqConnection {
    fn drop(&mut self) {
        let set = self.events.get();
        if !set.is_null() {
            // SAFETY: created by this connection, freed once.
            unsafe { pg_sys::FreeWaitEventSet(set) };
        }
        // SAFETY: conn came from PQconnectdbParams and is finished exactly once.
        unsafe { pq::PQfinish(self.conn.as_ptr()) }
    }
}

const MSG_PEEK: i32 = 0x02;
const MSG_DONTWAIT: i32 = 0x40;

extern "C" {
    #[link_name = "recv"]
    fn libc_recv(socket: i32, buffer: *mut std::ffi::c_void, length: usize, flags: i32) -> isize;
}

pub struct ResultGuard(NonNull<pq::PGresult>);

impl ResultGuard {
    /// Rows the command affected, from its tag (0 when it has none).
    fn affected(&self) -> u64 {
        // SAFETY: valid result; the tag is copied at once.
        unsafe { CStr::from_ptr(pq::PQcmdTuples(self.0.as_ptr())).to_string_lossy().parse().unwrap_or(0) }
    }

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
                    let field = |code: u8| Some(owned_text(pq::PQresultErrorField(res, code as i32))).filter(|t| !t.is_empty());
                    let (detail, hint) = (field(pq::PG_DIAG_MESSAGE_DETAIL), field(pq::PG_DIAG_MESSAGE_HINT));
                    return Err(RemoteError { sqlstate, message, context, detail, hint });
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

/// A connection to a node: over libpq, or, for the coordinator's own placements, this backend
/// itself (see `local`).
pub enum RemoteConnection {
    Pq(PqConnection),
    Local(LocalConnection),
}

impl RemoteConnection {
    pub fn connect(params: &ConnectParams<'_>) -> Result<Self, RemoteError> {
        PqConnection::connect(params).map(RemoteConnection::Pq)
    }

    /// A connection to this coordinator's own placements.
    pub fn local() -> Self {
        RemoteConnection::Local(LocalConnection::new())
    }

    pub fn is_local(&self) -> bool {
        matches!(self, RemoteConnection::Local(_))
    }

    pub fn is_ok(&self) -> bool {
        match self {
            RemoteConnection::Pq(c) => c.is_ok(),
            RemoteConnection::Local(_) => true,
        }
    }

    pub fn exec(&self, sql: &str) -> Result<RemoteRows, RemoteError> {
        match self {
            RemoteConnection::Pq(c) => c.exec(sql),
            RemoteConnection::Local(l) => l.exec(sql),
        }
    }

    pub fn send(&self, sql: &str) -> Result<(), RemoteError> {
        match self {
            RemoteConnection::Pq(c) => c.send(sql),
            RemoteConnection::Local(l) => l.send(sql),
        }
    }

    pub fn finish(&self, deadline: Option<Instant>) -> Result<RemoteRows, RemoteError> {
        match self {
            RemoteConnection::Pq(c) => c.finish(deadline),
            RemoteConnection::Local(l) => l.finish(),
        }
    }

    pub fn drain_results(&self) -> Result<RemoteRows, RemoteError> {
        match self {
            RemoteConnection::Pq(c) => c.drain_results(),
            RemoteConnection::Local(l) => l.finish(),
        }
    }

    pub fn copy_start(&self, sql: &str) -> Result<(), RemoteError> {
        match self {
            RemoteConnection::Pq(c) => c.copy_start(sql),
            RemoteConnection::Local(l) => l.copy_start(sql),
        }
    }

    pub fn copy_data(&self, data: &[u8]) -> Result<(), RemoteError> {
        match self {
            RemoteConnection::Pq(c) => c.copy_data(data),
            RemoteConnection::Local(l) => l.copy_data(data),
        }
    }

    pub fn is_busy(&self) -> Result<bool, RemoteError> {
        match self {
            RemoteConnection::Pq(c) => c.is_busy(),
            RemoteConnection::Local(_) => Ok(false),
        }
    }

    pub fn copy_end_async(&self) -> Result<(), RemoteError> {
        match self {
            RemoteConnection::Pq(c) => c.copy_end_async(),
            RemoteConnection::Local(l) => l.copy_end_async(),
        }
    }

    pub fn copy_end(&self, error: Option<&str>) -> Result<RemoteRows, RemoteError> {
        match self {
            RemoteConnection::Pq(c) => c.copy_end(error),
            RemoteConnection::Local(l) => l.copy_end(error),
        }
    }

    pub fn copy_out(&self, sql: &str, sink: impl FnMut(&[u8]) -> Result<(), RemoteError>) -> Result<u64, RemoteError> {
        match self {
            RemoteConnection::Pq(c) => c.copy_out(sql, sink),
            RemoteConnection::Local(l) => l.copy_out(sql, sink),
        }
    }

    pub fn abort_and_rollback(&self, timeout: Duration) -> bool {
        match self {
            RemoteConnection::Pq(c) => c.abort_and_rollback(timeout),
            RemoteConnection::Local(l) => {
                l.reset();
                true
            }
        }
    }

    pub fn cancel_and_run(&self, sql: &str, timeout: Duration) -> Result<RemoteRows, RemoteError> {
        match self {
            RemoteConnection::Pq(c) => c.cancel_and_run(sql, timeout),
            RemoteConnection::Local(l) => {
                l.reset();
                l.exec(sql)
            }
        }
    }

    pub fn cancel_and_drain(&self, timeout: Duration) -> bool {
        match self {
            RemoteConnection::Pq(c) => c.cancel_and_drain(timeout),
            RemoteConnection::Local(l) => {
                l.reset();
                true
            }
        }
    }

    /// Runs one statement with text-format parameters ($1, $2, ...; `None` is NULL).
    pub fn query(&self, sql: &str, params: &[Option<&str>]) -> Result<RemoteRows, RemoteError> {
        self.query_counted(sql, params).map(|(rows, _)| rows)
    }

    pub fn query_counted(&self, sql: &str, params: &[Option<&str>]) -> Result<(RemoteRows, u64), RemoteError> {
        match self {
            RemoteConnection::Pq(c) => c.query_counted(sql, params),
            RemoteConnection::Local(l) => l.query_counted(sql, params),
        }
    }

    pub fn send_task(&self, sql: &CStr, params: &[TaskParam], binary: bool) -> Result<(), RemoteError> {
        match self {
            RemoteConnection::Pq(c) => c.send_task(sql, params, binary),
            RemoteConnection::Local(l) => l.send_task(sql, params, binary),
        }
    }

    pub fn send_prepared_task(&self, name: &CStr, params: &[TaskParam], binary: bool) -> Result<(), RemoteError> {
        match self {
            RemoteConnection::Pq(c) => c.send_prepared_task(name, params, binary),
            RemoteConnection::Local(_) => Err(RemoteError::local("statements are not prepared on the coordinator's own placements")),
        }
    }

    pub fn prepare(&self, name: &CStr, sql: &CStr, types: &[u32]) -> Result<(), RemoteError> {
        match self {
            RemoteConnection::Pq(c) => c.prepare(name, sql, types),
            RemoteConnection::Local(_) => Err(RemoteError::local("statements are not prepared on the coordinator's own placements")),
        }
    }

    pub fn role(&self) -> pg_sys::Oid {
        match self {
            RemoteConnection::Pq(c) => c.role(),
            RemoteConnection::Local(l) => l.role(),
        }
    }

    pub fn set_role(&self, role: pg_sys::Oid) {
        match self {
            RemoteConnection::Pq(c) => c.set_role(role),
            RemoteConnection::Local(l) => l.set_role(role),
        }
    }

    pub fn probe(&self) -> bool {
        match self {
            RemoteConnection::Pq(c) => c.probe(),
            RemoteConnection::Local(_) => true,
        }
    }

    pub fn cancel(&self) {
        match self {
            RemoteConnection::Pq(c) => c.cancel(),
            RemoteConnection::Local(l) => l.reset(),
        }
    }

    pub fn is_running(&self) -> bool {
        match self {
            RemoteConnection::Pq(c) => c.is_running(),
            RemoteConnection::Local(l) => l.is_running(),
        }
    }

    pub fn is_idle(&self) -> bool {
        match self {
            RemoteConnection::Pq(c) => c.is_idle(),
            RemoteConnection::Local(l) => !l.is_running(),
        }
    }

    pub fn poll(&self) -> Result<Poll, RemoteError> {
        match self {
            RemoteConnection::Pq(c) => c.poll(),
            RemoteConnection::Local(l) => l.poll().map(|result| Poll::Ready(result.map(RemoteResult::Local))),
        }
    }
}
