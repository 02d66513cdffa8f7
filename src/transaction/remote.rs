//! Worker connections bound to the coordinator's transaction.
//!
//! The first use of a node inside a transaction sends BEGIN (with the session settings that
//! change how values are read and printed); the coordinator's commit commits every open remote
//! transaction in its pre-commit callback, and its abort rolls them back. A failed remote commit
//! raises an ERROR there, which aborts the local transaction and rolls back the rest.
//!
//! Until two-phase commit lands, a failure between two remote COMMITs can leave one node
//! committed and another not; every other failure leaves nothing behind.
//!
//! Connections stay open across transactions (one per node per backend) and are dropped when
//! broken.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::rc::Rc;

use pgrx::prelude::*;

use crate::catalog::nodes::Node;
use crate::connection::{self, RemoteConnection};
use crate::deparse::quote;
use crate::error::{Result, ShardingError};

struct NodeSession {
    connection: Rc<RemoteConnection>,
    in_transaction: bool,
    label: String,
    /// The values of PROPAGATED_SETTINGS last set on the node (session level); `None` when
    /// unknown (a remote rollback may have undone them).
    settings: Option<Vec<String>>,
    /// Statements prepared on the node: (SQL, parameter types) -> statement name.
    prepared: std::collections::HashMap<(String, Vec<u32>), String>,
}

thread_local! {
    static SESSIONS: RefCell<BTreeMap<i32, NodeSession>> = const { RefCell::new(BTreeMap::new()) };
    /// A subtransaction was rolled back after remote work: the remote side cannot follow
    /// (until savepoints are propagated), so the whole transaction must roll back.
    static TAINTED: Cell<bool> = const { Cell::new(false) };
}

/// Settings that change how values are parsed and printed; workers get the coordinator's.
const PROPAGATED_SETTINGS: &[&CStr] =
    &[c"DateStyle", c"IntervalStyle", c"TimeZone", c"extra_float_digits", c"standard_conforming_strings"];

fn current_settings() -> Vec<String> {
    PROPAGATED_SETTINGS
        .iter()
        .map(|name| {
            // SAFETY: GetConfigOption returns a pointer valid until the setting changes; copied now.
            let value = unsafe { pg_sys::GetConfigOption(name.as_ptr(), true, false) };
            if value.is_null() {
                String::new()
            } else {
                unsafe { CStr::from_ptr(value) }.to_string_lossy().into_owned()
            }
        })
        .collect()
}

/// `SELECT set_config(...)` for the settings that differ from what the node has.
fn settings_statement(known: Option<&Vec<String>>, wanted: &[String]) -> Option<String> {
    let mut calls = Vec::new();
    for (i, (name, value)) in PROPAGATED_SETTINGS.iter().zip(wanted).enumerate() {
        if known.is_some_and(|k| k.get(i) == Some(value)) {
            continue;
        }
        calls.push(format!(
            "pg_catalog.set_config({}, {}, false)",
            quote::literal(&name.to_string_lossy()),
            quote::literal(value)
        ));
    }
    (!calls.is_empty()).then(|| format!("SELECT {}", calls.join(", ")))
}

/// A usable session for `node`: the existing one, or a new connection. A connection that broke
/// while it held this transaction's work is an error: the work it did is gone, and carrying on
/// would commit without it.
fn session_connection(node: &Node) -> Result<(Rc<RemoteConnection>, bool)> {
    let existing = SESSIONS.with(|s| {
        let mut sessions = s.borrow_mut();
        match sessions.get(&node.node_id) {
            // A cached connection is checked before reuse: a node that restarted meanwhile
            // gets a new connection instead of failing the statement.
            Some(session) if session.connection.is_ok() && (session.in_transaction || session.connection.probe()) => {
                Ok(Some((session.connection.clone(), session.in_transaction)))
            }
            Some(session) if session.in_transaction => Err(ShardingError::new(
                PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
                format!("lost the connection to node {} during the transaction", session.label),
            )
            .hint("The transaction is rolled back on every node; run it again.")),
            Some(_) => {
                sessions.remove(&node.node_id);
                Ok(None)
            }
            None => Ok(None),
        }
    })?;
    if let Some(found) = existing {
        return Ok(found);
    }
    let connection = Rc::new(connection::connect_to_node(&node.host, node.port)?);
    SESSIONS.with(|s| {
        s.borrow_mut().insert(
            node.node_id,
            NodeSession {
                connection: connection.clone(),
                in_transaction: false,
                label: format!("{}:{}", node.host, node.port),
                settings: None,
                prepared: Default::default(),
            },
        )
    });
    Ok((connection, false))
}

/// Brings the node's session settings in line with ours; `prefix` statements (BEGIN) go in the
/// same round trip.
fn sync_and_run(node: &Node, connection: &RemoteConnection, prefix: Option<&str>) -> Result<()> {
    let wanted = current_settings();
    let statement = SESSIONS.with(|s| {
        s.borrow().get(&node.node_id).and_then(|session| settings_statement(session.settings.as_ref(), &wanted))
    });
    let sql = match (prefix, &statement) {
        (None, None) => return Ok(()),
        (Some(prefix), None) => prefix.to_string(),
        (None, Some(set)) => set.clone(),
        (Some(prefix), Some(set)) => format!("{prefix}; {set}"),
    };
    connection.exec(&sql).map_err(|error| {
        ShardingError::new(
            PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
            format!("could not prepare the session on node {}:{}", node.host, node.port),
        )
        .detail(error.to_string())
    })?;
    SESSIONS.with(|s| {
        if let Some(session) = s.borrow_mut().get_mut(&node.node_id) {
            session.settings = Some(wanted);
            if prefix.is_some() {
                session.in_transaction = true;
            }
        }
    });
    Ok(())
}

/// Whether the distributed transaction has work open on `node`.
pub fn in_transaction_on(node: &Node) -> bool {
    SESSIONS.with(|s| s.borrow().get(&node.node_id).is_some_and(|session| session.in_transaction))
}

/// The connection to `node` for one statement's tasks. Inside the distributed transaction
/// when it already wrote there or when `transactional`; otherwise the statement runs in the
/// node's own autocommit (reads outside transaction blocks need no BEGIN and COMMIT).
pub fn for_statement(node: &Node, transactional: bool) -> Result<Rc<RemoteConnection>> {
    if transactional {
        return in_transaction(node);
    }
    check_not_tainted()?;
    let (connection, open) = session_connection(node)?;
    if !open {
        sync_and_run(node, &connection, None)?;
    }
    Ok(connection)
}

/// The name of a statement prepared on `node` for `sql` with parameters of `types`, preparing
/// it first if this connection has not yet.
pub fn prepared_statement(node: &Node, connection: &RemoteConnection, sql: &CStr, types: &[u32]) -> Result<CString> {
    let key = (sql.to_string_lossy().into_owned(), types.to_vec());
    let (known, count) = SESSIONS.with(|s| {
        let sessions = s.borrow();
        let session = sessions.get(&node.node_id);
        (session.and_then(|x| x.prepared.get(&key).cloned()), session.map_or(0, |x| x.prepared.len()))
    });
    if let Some(name) = known {
        return Ok(CString::new(name).unwrap_or_default());
    }
    if count >= MAX_PREPARED {
        connection.exec("DEALLOCATE ALL").map_err(|e| remote_error(node, e))?;
        SESSIONS.with(|s| {
            if let Some(session) = s.borrow_mut().get_mut(&node.node_id) {
                session.prepared.clear();
            }
        });
    }
    let name = format!("pgs_{}", NEXT_STATEMENT.with(|n| n.replace(n.get() + 1)));
    let cname = CString::new(name.clone()).unwrap_or_default();
    connection.prepare(&cname, sql, types).map_err(|e| remote_error(node, e))?;
    SESSIONS.with(|s| {
        if let Some(session) = s.borrow_mut().get_mut(&node.node_id) {
            session.prepared.insert(key, name);
        }
    });
    Ok(cname)
}

/// Statements kept prepared per node connection before they are all deallocated.
const MAX_PREPARED: usize = 500;

thread_local! {
    static NEXT_STATEMENT: Cell<u64> = const { Cell::new(1) };
    /// Extra connections per node for parallel reads outside transaction blocks, with the
    /// settings last set on each.
    static POOL: RefCell<BTreeMap<i32, Vec<(Rc<RemoteConnection>, Option<Vec<String>>)>>> = const { RefCell::new(BTreeMap::new()) };
}

/// Up to `count` more autocommit connections to `node` for reads running in parallel with the
/// session's own (opened on first use, kept afterwards, checked before reuse).
pub fn extra_connections(node: &Node, count: usize) -> Result<Vec<Rc<RemoteConnection>>> {
    let wanted = current_settings();
    let mut out = Vec::new();
    for slot in 0..count {
        let existing = POOL.with(|p| {
            let mut pool = p.borrow_mut();
            let entries = pool.entry(node.node_id).or_default();
            if slot < entries.len() && !(entries[slot].0.is_idle() && entries[slot].0.probe()) {
                entries.remove(slot);
            }
            entries.get(slot).cloned()
        });
        let (connection, known) = match existing {
            Some(found) => found,
            None => {
                let connection = Rc::new(connection::connect_to_node(&node.host, node.port)?);
                POOL.with(|p| p.borrow_mut().entry(node.node_id).or_default().push((connection.clone(), None)));
                (connection, None)
            }
        };
        if let Some(statement) = settings_statement(known.as_ref(), &wanted) {
            connection.exec(&statement).map_err(|e| remote_error(node, e))?;
            POOL.with(|p| {
                if let Some(entry) = p.borrow_mut().get_mut(&node.node_id).and_then(|e| e.get_mut(slot)) {
                    entry.1 = Some(wanted.clone());
                }
            });
        }
        out.push(connection);
    }
    Ok(out)
}

/// After an error outside the distributed transaction (a subtransaction of a PL/pgSQL
/// exception block, or the statement's own abort): connections still running a command for us
/// are stopped and drained, or closed.
fn reset_busy_autocommit_connections() {
    let busy: Vec<(i32, Rc<RemoteConnection>)> = SESSIONS.with(|s| {
        s.borrow()
            .iter()
            .filter(|(_, session)| !session.in_transaction && !session.connection.is_idle())
            .map(|(id, session)| (*id, session.connection.clone()))
            .collect()
    });
    for (node_id, connection) in busy {
        if !connection.abort_and_rollback(std::time::Duration::from_secs(5)) {
            SESSIONS.with(|s| s.borrow_mut().remove(&node_id));
        }
        SESSIONS.with(|s| {
            if let Some(session) = s.borrow_mut().get_mut(&node_id) {
                session.settings = None;
            }
        });
    }
    POOL.with(|p| {
        for entries in p.borrow_mut().values_mut() {
            entries.retain(|(connection, _)| connection.is_idle() || connection.abort_and_rollback(std::time::Duration::from_secs(5)));
            for entry in entries.iter_mut() {
                entry.1 = None;
            }
        }
    });
}

fn check_not_tainted() -> Result<()> {
    if TAINTED.with(Cell::get) {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
            "a rolled-back subtransaction wrote to worker nodes; roll back the transaction",
        ));
    }
    Ok(())
}

/// The connection to `node`, inside a remote transaction that commits or aborts with ours.
pub fn in_transaction(node: &Node) -> Result<Rc<RemoteConnection>> {
    check_not_tainted()?;
    let (connection, open) = session_connection(node)?;
    if !open {
        sync_and_run(node, &connection, Some("BEGIN")).map_err(|error| {
            ShardingError::new(
                PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
                format!("could not start a transaction on node {}:{}", node.host, node.port),
            )
            .detail(error.message)
        })?;
    }
    Ok(connection)
}

/// Runs `sql` on `node` inside the distributed transaction; a remote error becomes ours,
/// with the worker's SQLSTATE when it sent one.
pub fn execute(node: &Node, sql: &str) -> Result<crate::connection::RemoteRows> {
    let connection = in_transaction(node)?;
    connection.exec(sql).map_err(|error| remote_error(node, error))
}

/// A worker's error as ours: its SQLSTATE and message, with the node named in the detail.
pub fn remote_error(node: &Node, error: crate::connection::RemoteError) -> ShardingError {
    let code = error
        .sqlstate
        .as_deref()
        .and_then(sqlstate_code)
        .unwrap_or(PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE);
    let context = error.context.map(|c| format!(": {c}")).unwrap_or_default();
    ShardingError::new(code, error.message).detail(format!("on node {}:{}{context}", node.host, node.port))
}

fn sqlstate_code(code: &str) -> Option<PgSqlErrorCode> {
    let bytes = code.as_bytes();
    if bytes.len() != 5 {
        return None;
    }
    // MAKE_SQLSTATE: six bits per character, first character lowest.
    let packed = bytes
        .iter()
        .enumerate()
        .fold(0i32, |acc, (i, b)| acc + ((((*b as i32) - ('0' as i32)) & 0x3F) << (6 * i)));
    Some(PgSqlErrorCode::from(packed))
}

/// With writes open on several nodes, checks that each one still answers before any is told to
/// COMMIT: a node that died during the transaction then aborts it everywhere, instead of being
/// found only after the others committed. (What remains, a node failing during the COMMIT round
/// itself, is what two-phase commit closes.)
fn verify_before_commit() {
    let open: Vec<(Rc<RemoteConnection>, String)> = SESSIONS.with(|s| {
        s.borrow()
            .values()
            .filter(|session| session.in_transaction)
            .map(|session| (session.connection.clone(), session.label.clone()))
            .collect()
    });
    if open.len() < 2 {
        return;
    }
    for (connection, label) in open {
        if let Err(error) = connection.exec("SELECT 1") {
            ShardingError::new(
                PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
                format!("node {label} failed before commit; the transaction was rolled back on every node"),
            )
            .detail(error.to_string())
            .raise();
        }
    }
}

fn finish_all(command: &str, raise: bool) {
    let open: Vec<(i32, Rc<RemoteConnection>, String)> = SESSIONS.with(|s| {
        s.borrow_mut()
            .iter_mut()
            // On abort, also the sessions a statement used outside the transaction: one may
            // still be running a cancelled command.
            .filter(|(_, session)| session.in_transaction || (!raise && !session.connection.is_idle()))
            .map(|(id, session)| {
                if !raise {
                    session.settings = None;
                }
                session.in_transaction = false;
                (*id, session.connection.clone(), session.label.clone())
            })
            .collect()
    });
    let mut failure: Option<ShardingError> = None;
    for (node_id, connection, label) in open {
        if failure.is_some() {
            // After one failed COMMIT the rest are rolled back by the abort that follows.
            SESSIONS.with(|s| {
                if let Some(session) = s.borrow_mut().get_mut(&node_id) {
                    session.in_transaction = true;
                }
            });
            continue;
        }
        if !raise {
            // Abort: stop whatever the node is still doing for us, then roll back; a node that
            // does not manage within the time is disconnected and rolls back by itself.
            if !connection.abort_and_rollback(std::time::Duration::from_secs(5)) {
                SESSIONS.with(|s| s.borrow_mut().remove(&node_id));
            }
            continue;
        }
        if let Err(error) = connection.exec(command) {
            if !connection.is_ok() {
                SESSIONS.with(|s| s.borrow_mut().remove(&node_id));
            }
            if raise {
                failure = Some(
                    ShardingError::new(
                        PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
                        format!("could not commit the transaction on node {label}"),
                    )
                    .detail(error.to_string()),
                );
            }
        }
    }
    if let Some(error) = failure {
        error.raise();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PARALLEL_PRE_COMMIT => {
            if TAINTED.with(Cell::get) {
                ShardingError::new(
                    PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
                    "a rolled-back subtransaction wrote to worker nodes; the transaction was rolled back",
                )
                .raise();
            }
            verify_before_commit();
            finish_all("COMMIT", true);
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            TAINTED.with(|t| t.set(false));
            finish_all("ROLLBACK", false);
            reset_busy_autocommit_connections();
        }
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => TAINTED.with(|t| t.set(false)),
        XACT_EVENT_PRE_PREPARE => {
            let open = SESSIONS.with(|s| s.borrow().values().any(|session| session.in_transaction));
            if open {
                ShardingError::new(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "cannot PREPARE a transaction that has written to worker nodes",
                )
                .raise();
            }
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    _my_subid: pg_sys::SubTransactionId,
    _parent_subid: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        reset_busy_autocommit_connections();
        let open = SESSIONS.with(|s| s.borrow().values().any(|session| session.in_transaction));
        if open {
            TAINTED.with(|t| t.set(true));
        }
    }
}

pub fn register_callbacks() {
    // SAFETY: called once from _PG_init; the callbacks are plain functions living forever.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
    }
}
