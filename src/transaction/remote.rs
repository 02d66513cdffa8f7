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
use std::ffi::CStr;
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

fn begin_statement() -> String {
    let mut sql = String::from("BEGIN");
    for name in PROPAGATED_SETTINGS {
        // SAFETY: GetConfigOption returns a pointer valid until the setting changes; copied now.
        let value = unsafe { pg_sys::GetConfigOption(name.as_ptr(), true, false) };
        if value.is_null() {
            continue;
        }
        let value = unsafe { CStr::from_ptr(value) }.to_string_lossy();
        sql.push_str(&format!(
            "; SELECT pg_catalog.set_config({}, {}, true)",
            quote::literal(&name.to_string_lossy()),
            quote::literal(&value)
        ));
    }
    sql
}

/// The connection to `node`, inside a remote transaction that commits or aborts with ours.
pub fn in_transaction(node: &Node) -> Result<Rc<RemoteConnection>> {
    if TAINTED.with(Cell::get) {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
            "a rolled-back subtransaction wrote to worker nodes; roll back the transaction",
        ));
    }
    // A connection that broke while it held this transaction's work must not be replaced by a
    // new one: the work it did is gone, and carrying on would commit without it.
    let existing = SESSIONS.with(|s| {
        let mut sessions = s.borrow_mut();
        match sessions.get(&node.node_id) {
            Some(session) if session.connection.is_ok() => {
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
    let (connection, open) = match existing {
        Some(found) => found,
        None => (Rc::new(connection::connect_to_node(&node.host, node.port)?), false),
    };
    if !open {
        connection.exec(&begin_statement()).map_err(|error| {
            ShardingError::new(
                PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
                format!("could not start a transaction on node {}:{}", node.host, node.port),
            )
            .detail(error.to_string())
        })?;
    }
    SESSIONS.with(|s| {
        s.borrow_mut().insert(
            node.node_id,
            NodeSession {
                connection: connection.clone(),
                in_transaction: true,
                label: format!("{}:{}", node.host, node.port),
            },
        )
    });
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
            .filter(|(_, session)| session.in_transaction)
            .map(|(id, session)| {
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
