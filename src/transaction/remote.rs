//! Worker connections bound to the coordinator's transaction.
//!
//! The first use of a node inside a transaction sends BEGIN with the coordinator's isolation
//! level, read-only mode and SET LOCAL settings. Coordinator subtransactions (SAVEPOINT,
//! PL/pgSQL exception blocks) become remote savepoints, created lazily on the nodes that work
//! inside them. At commit, the remote transactions that only read are committed, a single
//! writer (with nothing written locally) commits in one phase, and several writers commit with
//! two-phase commit (see sharding_core::twophase): PREPARE TRANSACTION in pre-commit, commit
//! records in the local transaction, COMMIT PREPARED after the local commit, and recovery
//! (transaction/recovery.rs) for whatever a failure interrupted. Any error before the local
//! commit rolls back every node.
//!
//! Connections stay open across transactions (one per node per backend) and are dropped when
//! broken.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ffi::{CStr, CString};
use std::rc::Rc;

use pgrx::prelude::*;

use std::time::{Duration, Instant};

use sharding_core::subxact::{savepoint_name, Catchup, OnAbort, RemoteSavepoints, SubId};
use sharding_core::twophase::{commit_protocol, CommitProtocol, Coordinator, Gid};

use super::fault;
use crate::catalog::nodes::Node;
use crate::connection::{self, RemoteConnection};
use crate::deparse::quote;
use crate::error::{Result, ShardingError};

/// Where a node's remote transaction stands.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// No remote transaction of ours (the connection may run autocommit reads).
    Idle,
    /// BEGIN was sent; the distributed transaction's work on the node goes here.
    Open,
    /// PREPARE TRANSACTION was sent with this global id.
    Prepared(String),
}

struct NodeSession {
    connection: Rc<RemoteConnection>,
    phase: Phase,
    /// The remote transaction wrote (or locked rows): it takes part in the commit decision.
    wrote: bool,
    savepoints: RemoteSavepoints,
    /// LOCAL_VERSION whose SET LOCAL values the remote transaction has.
    local_version: u64,
    /// A savepoint rollback failed on the node: what the remote transaction holds is unknown,
    /// so the distributed transaction can only roll back.
    lost: bool,
    label: String,
    /// The values of PROPAGATED_SETTINGS last set on the node (session level); `None` when
    /// unknown (a remote rollback may have undone them).
    settings: Option<Vec<String>>,
    /// Statements prepared on the node: (SQL, parameter types) -> statement name.
    prepared: std::collections::HashMap<(String, Vec<u32>), String>,
    /// `cache::definitions_generation()` when `prepared` was last known valid: a table's
    /// definition changed since (ALTER COLUMN ... TYPE) makes the workers refuse a statement
    /// prepared before ("cached plan must not change result type").
    prepared_generation: u64,
}

impl NodeSession {
    /// Back to no remote transaction (after it committed or rolled back).
    fn end_transaction(&mut self) {
        self.phase = Phase::Idle;
        self.wrote = false;
        self.savepoints = RemoteSavepoints::default();
        self.local_version = 0;
        self.lost = false;
    }
}

/// How many idle sessions of other roles a backend keeps per node (see `SPARE`).
const SPARE_PER_NODE: usize = 2;

thread_local! {
    static SESSIONS: RefCell<BTreeMap<i32, NodeSession>> = const { RefCell::new(BTreeMap::new()) };
    /// Idle node sessions of other roles than the current one's, set aside between
    /// transactions when the role changed (SET ROLE, a view of another role's: see
    /// `connection::run_as`) and taken back when that role returns, so that alternating roles
    /// do not reconnect each time. (node id, session), oldest first.
    static SPARE: RefCell<Vec<(i32, NodeSession)>> = const { RefCell::new(Vec::new()) };
    /// The coordinator's open subtransactions, outermost first.
    static SUBXACTS: RefCell<Vec<SubId>> = const { RefCell::new(Vec::new()) };
    /// Settings changed with SET LOCAL in this transaction (names), propagated to the remote
    /// transactions; LOCAL_VERSION counts the changes.
    static LOCAL_SETTINGS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    static LOCAL_VERSION: Cell<u64> = const { Cell::new(0) };
    /// `SET CONSTRAINTS ALL DEFERRED` (true) or `IMMEDIATE` (false) in this transaction, sent
    /// to the remote transactions with the SET LOCAL values.
    static CONSTRAINTS_ALL: Cell<Option<bool>> = const { Cell::new(None) };
    /// COMMIT PREPARED / ROLLBACK PREPARED statements this backend could not deliver (the
    /// node was unreachable), by node: sent when it next connects there, so that a prepared
    /// transaction does not hold its locks until the next recovery run.
    static UNDELIVERED: RefCell<Vec<(i32, String)>> = const { RefCell::new(Vec::new()) };
}

/// Remembers a decision for a prepared transaction that could not be delivered to `node_id`.
fn deliver_later(node_id: i32, sql: String) {
    UNDELIVERED.with(|u| u.borrow_mut().push((node_id, sql)));
}

/// Sends this backend's undelivered decisions for `node_id` over a new connection (outside any
/// transaction). One that fails for another reason than "already finished" stays for recovery.
fn deliver_pending(node_id: i32, connection: &RemoteConnection) {
    let pending: Vec<String> = UNDELIVERED.with(|u| {
        let mut list = u.borrow_mut();
        let (mine, rest): (Vec<_>, Vec<_>) = list.drain(..).partition(|(id, _)| *id == node_id);
        *list = rest;
        mine.into_iter().map(|(_, sql)| sql).collect()
    });
    for sql in pending {
        if let Err(error) = connection.exec(&sql) {
            if !connection.is_ok() {
                deliver_later(node_id, sql);
            } else if error.sqlstate.as_deref() != Some("42704") {
                pgrx::log!("pg_sharding: {sql} failed: {}; left to recovery", error.message);
            }
        }
    }
}

/// How a statement uses a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A read that may run in the node's own autocommit (unless the distributed transaction
    /// is open there: then it reads inside it, and sees its writes).
    Autocommit,
    /// A read inside the distributed transaction (its snapshot, its settings).
    Read,
    /// A write, DDL or row lock: the node takes part in the commit decision.
    Write,
}

/// How reads use the nodes: inside a transaction block at REPEATABLE READ or SERIALIZABLE, or
/// after SET LOCAL, they join the remote transactions (one snapshot per node for the whole
/// block, the block's settings); otherwise every read statement may run in autocommit, which
/// sees what a READ COMMITTED statement in the remote transaction would.
pub fn read_access() -> Access {
    // SAFETY: plain reads of backend-local globals.
    let (in_block, isolation) = unsafe { (pg_sys::IsTransactionBlock(), *std::ptr::addr_of!(pg_sys::XactIsoLevel)) };
    if in_block && (isolation >= pg_sys::XACT_REPEATABLE_READ as i32 || LOCAL_VERSION.with(Cell::get) > 0) {
        Access::Read
    } else {
        Access::Autocommit
    }
}

/// Called for SET LOCAL in a transaction block: the setting goes to the remote transactions.
pub fn note_local_setting(name: &str) {
    let name = name.to_ascii_lowercase();
    // Not propagated: settings synced at session level anyway, our own (coordinator-side)
    // settings, the role (the workers' user is fixed) and the transaction's own properties
    // (they are part of BEGIN).
    let skipped = PROPAGATED_SETTINGS.iter().any(|s| s.to_string_lossy().eq_ignore_ascii_case(&name))
        || name.starts_with("sharding.")
        || matches!(name.as_str(), "role" | "session_authorization" | "transaction_isolation" | "transaction_read_only" | "transaction_deferrable");
    if skipped {
        return;
    }
    LOCAL_SETTINGS.with(|l| {
        let mut list = l.borrow_mut();
        if !list.contains(&name) {
            list.push(name);
        }
    });
    LOCAL_VERSION.with(|v| v.set(v.get() + 1));
}

/// Called for `SET CONSTRAINTS ALL ...` in a transaction block.
pub fn note_constraints_all(deferred: bool) {
    CONSTRAINTS_ALL.with(|c| c.set(Some(deferred)));
    LOCAL_VERSION.with(|v| v.set(v.get() + 1));
}

fn setting_value(name: &CStr) -> Option<String> {
    // SAFETY: GetConfigOption returns a pointer valid until the setting changes; copied now.
    let value = unsafe { pg_sys::GetConfigOption(name.as_ptr(), true, false) };
    (!value.is_null()).then(|| unsafe { CStr::from_ptr(value) }.to_string_lossy().into_owned())
}

/// `SELECT set_config(name, value, true), ...` for the settings changed with SET LOCAL, and the
/// transaction's `SET CONSTRAINTS ALL`.
fn local_settings_statements() -> Vec<String> {
    let mut statements: Vec<String> = local_settings_statement().into_iter().collect();
    match CONSTRAINTS_ALL.with(Cell::get) {
        Some(true) => statements.push("SET CONSTRAINTS ALL DEFERRED".to_string()),
        Some(false) => statements.push("SET CONSTRAINTS ALL IMMEDIATE".to_string()),
        None => {}
    }
    statements
}

fn local_settings_statement() -> Option<String> {
    let calls: Vec<String> = LOCAL_SETTINGS.with(|l| {
        l.borrow()
            .iter()
            .filter_map(|name| {
                let cname = CString::new(name.as_str()).ok()?;
                let value = setting_value(&cname)?;
                Some(format!("pg_catalog.set_config({}, {}, true)", quote::literal(name), quote::literal(&value)))
            })
            .collect()
    });
    (!calls.is_empty()).then(|| format!("SELECT {}", calls.join(", ")))
}

/// BEGIN with the coordinator transaction's isolation level, read-only and deferrable modes.
fn begin_statement() -> String {
    // SAFETY: plain reads of backend-local globals.
    let (isolation, read_only, deferrable) = unsafe {
        (
            *std::ptr::addr_of!(pg_sys::XactIsoLevel),
            *std::ptr::addr_of!(pg_sys::XactReadOnly),
            *std::ptr::addr_of!(pg_sys::XactDeferrable),
        )
    };
    let level = if isolation >= pg_sys::XACT_SERIALIZABLE as i32 {
        "SERIALIZABLE"
    } else if isolation >= pg_sys::XACT_REPEATABLE_READ as i32 {
        "REPEATABLE READ"
    } else {
        "READ COMMITTED"
    };
    format!(
        "BEGIN ISOLATION LEVEL {level}{}{}",
        if read_only { " READ ONLY" } else { "" },
        if deferrable { " DEFERRABLE" } else { "" }
    )
}

/// Settings that change how values are parsed and printed (by casts to text and the like in
/// the expressions the shards evaluate); workers get the coordinator's. default_text_search_config
/// only when it names a built-in configuration: one of the user's own would not exist on the
/// workers (and text search functions that use it are then evaluated on the coordinator, see
/// planner/shippable.rs). Not among them: the lc_* locales.
const PROPAGATED_SETTINGS: &[&CStr] = &[
    c"DateStyle",
    c"IntervalStyle",
    c"TimeZone",
    c"extra_float_digits",
    c"standard_conforming_strings",
    c"bytea_output",
    c"array_nulls",
    c"xmlbinary",
    c"xmloption",
    c"quote_all_identifiers",
    c"default_text_search_config",
];

/// Whether the session's default_text_search_config is one every node has.
pub fn builtin_text_search_config() -> bool {
    setting_value(c"default_text_search_config").is_some_and(|value| builtin_configuration(&value))
}

fn builtin_configuration(value: &str) -> bool {
    value.starts_with("pg_catalog.")
}

fn current_settings() -> Vec<String> {
    PROPAGATED_SETTINGS
        .iter()
        .map(|&name| match setting_value(name) {
            // Not sent (settings_statement skips empty values): the nodes keep what they have.
            Some(value) if name == c"default_text_search_config" && !builtin_configuration(&value) => String::new(),
            value => value.unwrap_or_default(),
        })
        .collect()
}

/// `SELECT set_config(...)` for the settings that differ from what the node has.
fn settings_statement(known: Option<&Vec<String>>, wanted: &[String]) -> Option<String> {
    let mut calls = Vec::new();
    for (i, (name, value)) in PROPAGATED_SETTINGS.iter().zip(wanted).enumerate() {
        if known.is_some_and(|k| k.get(i) == Some(value)) || value.is_empty() {
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

fn lost_error(label: &str) -> ShardingError {
    ShardingError::new(
        PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
        format!("lost the connection to node {label} during the transaction"),
    )
    .hint("The transaction is rolled back on every node; run it again.")
}

/// A usable session for `node`: the existing one, or a new connection; and whether the
/// distributed transaction is open on it. A connection that broke while it held this
/// transaction's work is an error: the work it did is gone, and carrying on would commit
/// without it.
fn session_connection(node: &Node) -> Result<(Rc<RemoteConnection>, bool)> {
    let existing = SESSIONS.with(|s| {
        let mut sessions = s.borrow_mut();
        match sessions.get(&node.node_id) {
            Some(session) if session.phase != Phase::Idle && (session.lost || !session.connection.is_ok()) => {
                Err(lost_error(&session.label))
            }
            // A cached connection is checked before reuse: a node that restarted meanwhile
            // gets a new connection instead of failing the statement. Between transactions, a
            // connection opened for another role (SET ROLE, RESET ROLE, SECURITY DEFINER) is
            // replaced by one for the current role; inside the distributed transaction the
            // node keeps the connection that holds its work.
            Some(session)
                if session.phase == Phase::Open
                    || (session.connection.is_ok()
                        && session.connection.role() == connection::current_role()
                        && session.connection.probe()) =>
            {
                Ok(Some((session.connection.clone(), session.phase == Phase::Open)))
            }
            Some(_) => {
                if let Some(session) = sessions.remove(&node.node_id) {
                    set_aside(node.node_id, session);
                }
                Ok(None)
            }
            None => Ok(None),
        }
    })?;
    if let Some(found) = existing {
        return Ok(found);
    }
    if let Some(connection) = take_spare(node.node_id) {
        return Ok((connection, false));
    }
    let connection = Rc::new(connection::connect_to_node(&node.host, node.port)?);
    deliver_pending(node.node_id, &connection);
    SESSIONS.with(|s| {
        s.borrow_mut().insert(
            node.node_id,
            NodeSession {
                connection: connection.clone(),
                phase: Phase::Idle,
                wrote: false,
                savepoints: RemoteSavepoints::default(),
                local_version: 0,
                lost: false,
                label: format!("{}:{}", node.host, node.port),
                settings: None,
                prepared: Default::default(),
                prepared_generation: crate::catalog::cache::definitions_generation(),
            },
        )
    });
    Ok((connection, false))
}

/// Keeps an idle session of another role for later (see `SPARE`); a broken or busy one is
/// closed.
fn set_aside(node_id: i32, session: NodeSession) {
    if session.phase != Phase::Idle || session.lost || !session.connection.is_ok() || !session.connection.is_idle() {
        return;
    }
    SPARE.with(|s| {
        let mut spare = s.borrow_mut();
        spare.retain(|(id, kept)| !(*id == node_id && kept.connection.role() == session.connection.role()));
        if spare.iter().filter(|(id, _)| *id == node_id).count() >= SPARE_PER_NODE {
            if let Some(oldest) = spare.iter().position(|(id, _)| *id == node_id) {
                spare.remove(oldest);
            }
        }
        spare.push((node_id, session));
    });
}

/// The set-aside session of the current role on the node, made the node's session again when
/// it still works.
fn take_spare(node_id: i32) -> Option<Rc<RemoteConnection>> {
    let role = connection::current_role();
    let session = SPARE.with(|s| {
        let mut spare = s.borrow_mut();
        let at = spare.iter().position(|(id, kept)| *id == node_id && kept.connection.role() == role)?;
        Some(spare.remove(at).1)
    })?;
    if !session.connection.probe() {
        return None;
    }
    let connection = session.connection.clone();
    SESSIONS.with(|s| s.borrow_mut().insert(node_id, session));
    Some(connection)
}

/// Brings the node in line before a statement runs there: BEGIN when the distributed
/// transaction is to be opened on it (`begin`), savepoints for the coordinator's open
/// subtransactions, the session settings and the SET LOCAL values; all in one round trip.
fn prepare_session(node: &Node, connection: &RemoteConnection, begin: bool, in_transaction: bool) -> Result<()> {
    let wanted = current_settings();
    let version = LOCAL_VERSION.with(Cell::get);
    let open: Vec<SubId> = SUBXACTS.with(|s| s.borrow().clone());
    let (known, catchup, local_version) = SESSIONS.with(|s| {
        let sessions = s.borrow();
        let session = sessions.get(&node.node_id);
        let catchup = match session {
            Some(session) if in_transaction && !begin => session.savepoints.catchup(&open),
            _ => Catchup::default(),
        };
        (session.and_then(|x| x.settings.clone()), catchup, session.map_or(0, |x| x.local_version))
    });
    let mut statements = Vec::new();
    if begin {
        statements.push(begin_statement());
    }
    if let Some(release) = catchup.release {
        statements.push(format!("RELEASE SAVEPOINT {}", savepoint_name(release)));
    }
    for id in &catchup.create {
        statements.push(format!("SAVEPOINT {}", savepoint_name(*id)));
    }
    statements.extend(settings_statement(known.as_ref(), &wanted));
    if in_transaction && version != local_version {
        statements.extend(local_settings_statements());
    }
    if statements.is_empty() {
        return Ok(());
    }
    connection.exec(&statements.join("; ")).map_err(|error| {
        let message = if begin {
            format!("could not start a transaction on node {}:{}", node.host, node.port)
        } else {
            format!("could not prepare the session on node {}:{}", node.host, node.port)
        };
        ShardingError::new(PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE, message).detail(error.to_string())
    })?;
    // SAFETY: plain call.
    let current = unsafe { pg_sys::GetCurrentSubTransactionId() };
    SESSIONS.with(|s| {
        if let Some(session) = s.borrow_mut().get_mut(&node.node_id) {
            session.settings = Some(wanted);
            if begin {
                session.phase = Phase::Open;
                session.savepoints = RemoteSavepoints::begun_in(current);
            } else {
                session.savepoints.caught_up(&catchup);
            }
            if in_transaction {
                session.local_version = version;
            }
        }
    });
    Ok(())
}

/// Whether the distributed transaction has written on `node` (its remote transaction has a
/// transaction id there, or will).
pub fn wrote_on(node: &Node) -> bool {
    SESSIONS.with(|s| s.borrow().get(&node.node_id).is_some_and(|session| session.phase != Phase::Idle && session.wrote))
}

/// Whether the distributed transaction is open on `node`.
pub fn in_transaction_on(node: &Node) -> bool {
    SESSIONS.with(|s| s.borrow().get(&node.node_id).is_some_and(|session| session.phase == Phase::Open))
}

/// The connection to `node` for one statement's tasks, used as `access` says.
pub fn for_statement(node: &Node, access: Access) -> Result<Rc<RemoteConnection>> {
    // The coordinator's own placements: its statements are part of this transaction already.
    if node.is_coordinator {
        return Ok(Rc::new(RemoteConnection::local()));
    }
    let (connection, open) = session_connection(node)?;
    let transactional = open || access != Access::Autocommit;
    prepare_session(node, &connection, transactional && !open, transactional)?;
    if access == Access::Write {
        SESSIONS.with(|s| {
            if let Some(session) = s.borrow_mut().get_mut(&node.node_id) {
                session.wrote = true;
            }
        });
    }
    Ok(connection)
}

/// The connection of the distributed transaction on `node` as it is, for reading the results
/// of a command already sent through `for_statement` (nothing is sent).
pub fn open_connection(node: &Node) -> Result<Rc<RemoteConnection>> {
    if node.is_coordinator {
        return Ok(Rc::new(RemoteConnection::local()));
    }
    SESSIONS.with(|s| match s.borrow().get(&node.node_id) {
        Some(session) if session.phase == Phase::Open => Ok(session.connection.clone()),
        _ => Err(ShardingError::internal(format!("no open transaction on node {}:{}", node.host, node.port))),
    })
}

/// The name of a statement prepared on `node` for `sql` with parameters of `types`, preparing
/// it first if this connection has not yet.
pub fn prepared_statement(node: &Node, connection: &RemoteConnection, sql: &CStr, types: &[u32]) -> Result<CString> {
    let key = (sql.to_string_lossy().into_owned(), types.to_vec());
    let generation = crate::catalog::cache::definitions_generation();
    let (known, count, current) = SESSIONS.with(|s| {
        let sessions = s.borrow();
        let session = sessions.get(&node.node_id);
        (
            session.and_then(|x| x.prepared.get(&key).cloned()),
            session.map_or(0, |x| x.prepared.len()),
            session.is_none_or(|x| x.prepared_generation == generation),
        )
    });
    if let (Some(name), true) = (known, current) {
        return Ok(CString::new(name).unwrap_or_default());
    }
    if count >= MAX_PREPARED || (count > 0 && !current) {
        connection.exec("DEALLOCATE ALL").map_err(|e| remote_error(node, e))?;
        SESSIONS.with(|s| {
            if let Some(session) = s.borrow_mut().get_mut(&node.node_id) {
                session.prepared.clear();
            }
        });
    }
    SESSIONS.with(|s| {
        if let Some(session) = s.borrow_mut().get_mut(&node.node_id) {
            session.prepared_generation = generation;
        }
    });
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
    static POOL: RefCell<BTreeMap<i32, Vec<PoolEntry>>> = const { RefCell::new(BTreeMap::new()) };
}

/// A pooled extra connection and the settings last set on it (None: unknown).
type PoolEntry = (Rc<RemoteConnection>, Option<Vec<String>>);

/// Up to `count` more autocommit connections to `node` for reads running in parallel with the
/// session's own (opened on first use, kept afterwards, checked before reuse). A backend keeps
/// at most `sharding.max_connections_per_node` of them per node, counting those leased to
/// streamed reads (see `Leased`), so this may return fewer.
pub fn extra_connections(node: &Node, count: usize) -> Result<Vec<Rc<RemoteConnection>>> {
    if node.is_coordinator {
        // One backend runs them one after the other anyway.
        return Ok(Vec::new());
    }
    let wanted = current_settings();
    let role = connection::current_role();
    let limit = crate::guc::MAX_CONNECTIONS_PER_NODE.get().max(1) as usize;
    let leased = LEASED.with(|l| l.borrow().get(&node.node_id).copied().unwrap_or(0));
    let (mut taken, mut room): (Vec<PoolEntry>, usize) = POOL.with(|p| {
        let mut pool = p.borrow_mut();
        let entries = pool.entry(node.node_id).or_default();
        // Connections the node closed, or left busy, go.
        entries.retain(|(c, _)| c.is_idle() && c.probe());
        // Those of the current role first: the others (see connection::run_as) stay for their
        // role's next statement while there is room.
        entries.sort_by_key(|(c, _)| c.role() != role);
        // Those beyond the limit (it may have been lowered) go.
        entries.truncate(limit.saturating_sub(leased));
        let taken: Vec<_> = entries.iter().filter(|(c, _)| c.role() == role).take(count).cloned().collect();
        // Make room for the ones missing by closing other roles' connections.
        let mut missing = count - taken.len();
        while missing > 0 && entries.last().is_some_and(|(c, _)| c.role() != role) && entries.len() + leased >= limit {
            entries.pop();
            missing -= 1;
        }
        (taken, limit.saturating_sub(entries.len() + leased))
    });
    while taken.len() < count && room > 0 {
        let connection = Rc::new(connection::connect_to_node(&node.host, node.port)?);
        POOL.with(|p| p.borrow_mut().entry(node.node_id).or_default().push((connection.clone(), None)));
        taken.push((connection, None));
        room -= 1;
    }
    let mut out = Vec::with_capacity(taken.len());
    for (connection, known) in taken {
        if let Some(statement) = settings_statement(known.as_ref(), &wanted) {
            connection.exec(&statement).map_err(|e| remote_error(node, e))?;
            POOL.with(|p| {
                let mut pool = p.borrow_mut();
                if let Some(entry) = pool.get_mut(&node.node_id).and_then(|e| e.iter_mut().find(|(c, _)| Rc::ptr_eq(c, &connection))) {
                    entry.1 = Some(wanted.clone());
                }
            });
        }
        out.push(connection);
    }
    Ok(out)
}

thread_local! {
    /// Extra connections per node leased to streamed reads (out of POOL meanwhile).
    static LEASED: RefCell<BTreeMap<i32, usize>> = const { RefCell::new(BTreeMap::new()) };
}

/// An extra connection taken out of the pool for one streamed read (see `tasks::TaskRun`):
/// nothing else uses it, nor stops it when a subtransaction aborts, until it is given back.
/// Dropped without `give_back`, it is closed (the node then ends what it ran).
pub struct Leased {
    node_id: i32,
    pub connection: Rc<RemoteConnection>,
    settings: Option<Vec<String>>,
}

impl Drop for Leased {
    fn drop(&mut self) {
        LEASED.with(|l| {
            if let Some(count) = l.borrow_mut().get_mut(&self.node_id) {
                *count = count.saturating_sub(1);
            }
        });
    }
}

/// Up to `count` extra connections to `node`, leased (see `Leased`); none when the backend's
/// extra connections to the node are all in use.
pub fn lease_connections(node: &Node, count: usize) -> Result<Vec<Leased>> {
    if node.is_coordinator {
        // A connection of its own (its cursor is apart from other statements' tasks).
        return Ok(vec![Leased { node_id: node.node_id, connection: Rc::new(RemoteConnection::local()), settings: None }]);
    }
    let connections = extra_connections(node, count)?;
    LEASED.with(|l| *l.borrow_mut().entry(node.node_id).or_default() += connections.len());
    POOL.with(|p| {
        let mut pool = p.borrow_mut();
        let entries = pool.entry(node.node_id).or_default();
        Ok(connections
            .into_iter()
            .map(|connection| {
                let settings = entries.iter().position(|(c, _)| Rc::ptr_eq(c, &connection)).and_then(|at| entries.remove(at).1);
                Leased { node_id: node.node_id, connection, settings }
            })
            .collect())
    })
}

/// Puts a leased connection back into the pool, when it is idle and usable.
pub fn give_back(mut leased: Leased) {
    if leased.connection.is_local() {
        return;
    }
    if leased.connection.is_ok() && leased.connection.is_idle() {
        let settings = leased.settings.take();
        POOL.with(|p| p.borrow_mut().entry(leased.node_id).or_default().push((leased.connection.clone(), settings)));
    }
}

/// After an error outside the distributed transaction (a subtransaction of a PL/pgSQL
/// exception block, or the statement's own abort): connections still running a command for us
/// are stopped and drained, or closed.
fn reset_busy_autocommit_connections() {
    let busy: Vec<(i32, Rc<RemoteConnection>)> = SESSIONS.with(|s| {
        s.borrow()
            .iter()
            .filter(|(_, session)| session.phase == Phase::Idle && !session.connection.is_idle())
            .map(|(id, session)| (*id, session.connection.clone()))
            .collect()
    });
    for (node_id, connection) in busy {
        if !connection.abort_and_rollback(ABORT_TIMEOUT) {
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
            entries.retain(|(connection, _)| connection.is_idle() || connection.abort_and_rollback(ABORT_TIMEOUT));
            for entry in entries.iter_mut() {
                entry.1 = None;
            }
        }
    });
}

/// How long an abort waits for a node to stop and roll back before closing the connection.
const ABORT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the commit of prepared transactions waits for a node before leaving the rest to
/// recovery.
const COMMIT_PREPARED_TIMEOUT: Duration = Duration::from_secs(30);

/// The connection to `node`, inside the distributed transaction, for a write.
pub fn in_transaction(node: &Node) -> Result<Rc<RemoteConnection>> {
    for_statement(node, Access::Write)
}

/// Runs `sql` on `node` inside the distributed transaction (a write); a remote error becomes
/// ours, with the worker's SQLSTATE when it sent one.
pub fn execute(node: &Node, sql: &str) -> Result<crate::connection::RemoteRows> {
    let connection = in_transaction(node)?;
    connection.exec(sql).map_err(|error| remote_error(node, error))
}

/// A worker's error as ours: its SQLSTATE and message, with the node named in the detail.
pub fn remote_error(node: &Node, error: crate::connection::RemoteError) -> ShardingError {
    error_on(&format!("{}:{}", node.host, node.port), error)
}

pub fn error_on(label: &str, error: crate::connection::RemoteError) -> ShardingError {
    let code = error
        .sqlstate
        .as_deref()
        .and_then(sqlstate_code)
        .unwrap_or(PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE);
    let context = error.context.map(|c| format!(": {c}")).unwrap_or_default();
    let detail = match error.detail {
        Some(detail) => format!("{detail} (on node {label}{context})"),
        None => format!("on node {label}{context}"),
    };
    let raised = ShardingError::new(code, error.message).detail(detail);
    match error.hint {
        Some(hint) => raised.hint(hint),
        None => raised,
    }
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

// ---------------------------------------------------------------------------------------------
// Commit and abort

/// A participant of the commit: (node id, connection, label).
type Participant = (i32, Rc<RemoteConnection>, String);

/// Sends one statement to every participant, then reads every answer (the nodes work at the
/// same time). Returns the failures, by participant.
fn run_on_all(participants: &[Participant], sql: impl Fn(i32) -> String, deadline: Option<Instant>) -> Vec<(i32, String, crate::connection::RemoteError)> {
    let mut failures = Vec::new();
    let mut sent = Vec::new();
    for (node_id, connection, label) in participants {
        match connection.send(&sql(*node_id)) {
            Ok(()) => sent.push((*node_id, connection, label)),
            Err(error) => failures.push((*node_id, label.clone(), error)),
        }
    }
    for (node_id, connection, label) in sent {
        if let Err(error) = connection.finish(deadline) {
            failures.push((node_id, label.clone(), error));
        }
    }
    failures
}

fn set_phase(node_id: i32, phase: Phase) {
    SESSIONS.with(|s| {
        if let Some(session) = s.borrow_mut().get_mut(&node_id) {
            if phase == Phase::Idle {
                session.end_transaction();
            } else {
                session.phase = phase;
            }
        }
    });
}

fn forget_broken(node_id: i32) {
    SESSIONS.with(|s| {
        let mut sessions = s.borrow_mut();
        if sessions.get(&node_id).is_some_and(|session| !session.connection.is_ok() || !session.connection.is_idle()) {
            sessions.remove(&node_id);
        }
    });
}

/// The coordinator's identity in global transaction ids.
pub fn this_coordinator() -> Coordinator {
    // SAFETY: plain reads of backend globals.
    unsafe {
        Coordinator {
            system_id: pg_sys::GetSystemIdentifier(),
            database: (*std::ptr::addr_of!(pg_sys::MyDatabaseId)).to_u32(),
        }
    }
}

/// Pre-commit: ends every remote transaction or prepares it, so that the local commit that
/// follows is the decision. Any failure raises an ERROR, which aborts everything.
fn pre_commit() {
    let open: Vec<(Participant, bool, bool)> = SESSIONS.with(|s| {
        s.borrow()
            .iter()
            .filter(|(_, session)| session.phase == Phase::Open)
            .map(|(id, session)| ((*id, session.connection.clone(), session.label.clone()), session.wrote, session.lost))
            .collect()
    });
    if open.is_empty() {
        return;
    }
    if let Some(((_, _, label), _, _)) = open.iter().find(|(p, _, lost)| *lost || !p.1.is_ok()) {
        lost_error(label).raise();
    }
    let readers: Vec<Participant> = open.iter().filter(|(_, wrote, _)| !wrote).map(|(p, _, _)| p.clone()).collect();
    let writers: Vec<Participant> = open.iter().filter(|(_, wrote, _)| *wrote).map(|(p, _, _)| p.clone()).collect();

    // Read-only remote transactions end first; under SERIALIZABLE their commit can still
    // fail, which then aborts the whole transaction.
    let failures = run_on_all(&readers, |_| "COMMIT".to_string(), None);
    for (node_id, ..) in &readers {
        set_phase(*node_id, Phase::Idle);
    }
    if let Some((_, label, error)) = failures.into_iter().next() {
        error_on(&label, error).raise();
    }

    // SAFETY: plain call.
    let local_wrote = unsafe { pg_sys::GetTopTransactionIdIfAny() } != pg_sys::InvalidTransactionId;
    match commit_protocol(writers.len(), local_wrote) {
        CommitProtocol::ReadOnly => {}
        CommitProtocol::OnePhase => {
            fault::point("before_commit");
            let failures = run_on_all(&writers, |_| "COMMIT".to_string(), None);
            set_phase(writers[0].0, Phase::Idle);
            if let Some((_, label, error)) = failures.into_iter().next() {
                if error.sqlstate.is_some() {
                    // The node answered: it rolled back (a deferred constraint, a
                    // serialization failure). A definite abort, with the node's own SQLSTATE.
                    error_on(&label, error).raise();
                }
                // No answer: the node may have committed just before the connection broke.
                unknown_outcome(&label, &error.message).raise();
            }
        }
        CommitProtocol::TwoPhase => prepare_all(&writers),
    }
}

/// The error for a commit whose outcome on a node cannot be known: the connection broke while
/// the node committed (one-phase commit, or a single-shard write in the node's autocommit).
/// SQLSTATE 08007, so that a client does not take it for a rollback.
pub fn unknown_outcome(label: &str, cause: &str) -> ShardingError {
    ShardingError::new(
        PgSqlErrorCode::ERRCODE_TRANSACTION_RESOLUTION_UNKNOWN,
        format!("lost the connection to node {label} while it committed: whether the transaction committed there is unknown"),
    )
    .detail(cause.to_string())
    .hint("Check whether the transaction's changes are there before running it again.")
}

/// Phase one: PREPARE TRANSACTION on every writer, then the commit records.
fn prepare_all(writers: &[Participant]) {
    fault::point("before_prepare");
    let coordinator = this_coordinator();
    // SAFETY: assigns the local transaction id (if not yet) and returns it.
    let transaction = unsafe { pg_sys::GetTopFullTransactionId() }.value;
    // SAFETY: plain call.
    let started = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let gid = |node_id: i32| Gid { coordinator, transaction, started, node_id }.format();
    for (node_id, ..) in writers {
        // Prepared from here on for the abort path: it rolls back whatever did get prepared.
        set_phase(*node_id, Phase::Prepared(gid(*node_id)));
    }
    let failures = run_on_all(writers, |node_id| format!("PREPARE TRANSACTION {}", quote::literal(&gid(node_id))), None);
    if let Some((_, label, error)) = failures.into_iter().next() {
        let disabled = error.message.contains("prepared transactions are disabled");
        let mut failure = error_on(&label, error);
        failure = failure.hint(if disabled {
            "Two-phase commit needs max_prepared_transactions > 0 on every worker (it takes a restart)."
        } else {
            "The transaction was rolled back on every node."
        });
        failure.raise();
    }
    fault::point("after_prepare");
    let records: Vec<(i32, String)> = writers.iter().map(|(node_id, ..)| (*node_id, gid(*node_id))).collect();
    if let Err(error) = super::recovery::write_commit_records(&records) {
        error.raise();
    }
    fault::point("after_commit_record");
}

/// After the local commit: COMMIT PREPARED everywhere. Nothing may raise an ERROR here (the
/// transaction is committed); a node that does not answer is left to recovery.
fn commit_prepared() {
    let prepared: Vec<(Participant, String)> = SESSIONS.with(|s| {
        s.borrow_mut()
            .iter_mut()
            .filter_map(|(id, session)| match std::mem::replace(&mut session.phase, Phase::Idle) {
                Phase::Prepared(gid) => {
                    session.end_transaction();
                    Some(((*id, session.connection.clone(), session.label.clone()), gid))
                }
                other => {
                    session.phase = other;
                    None
                }
            })
            .collect()
    });
    if prepared.is_empty() {
        return;
    }
    fault::point("before_commit_prepared");
    let participants: Vec<Participant> = prepared.iter().map(|(p, _)| p.clone()).collect();
    let gid_of = |node_id: i32| prepared.iter().find(|(p, _)| p.0 == node_id).map(|(_, g)| g.clone()).unwrap_or_default();
    let deadline = Some(Instant::now() + COMMIT_PREPARED_TIMEOUT);
    for (node_id, label, error) in run_on_all(&participants, |node_id| format!("COMMIT PREPARED {}", quote::literal(&gid_of(node_id))), deadline) {
        deliver_later(node_id, format!("COMMIT PREPARED {}", quote::literal(&gid_of(node_id))));
        pgrx::warning!(
            "could not commit prepared transaction {} on node {label}: {}; the transaction is committed, and recovery will finish it on that node",
            gid_of(node_id),
            error.message
        );
        forget_broken(node_id);
    }
}

/// Rolls back every remote transaction of the distributed transaction. Never raises: a node
/// that does not answer is disconnected (it then rolls back by itself), a prepared
/// transaction that cannot be rolled back now is left to recovery.
fn abort_all() {
    let ended: Vec<(Participant, Phase)> = SESSIONS.with(|s| {
        s.borrow_mut()
            .iter_mut()
            .filter(|(_, session)| session.phase != Phase::Idle)
            .map(|(id, session)| {
                let phase = session.phase.clone();
                session.end_transaction();
                session.settings = None;
                ((*id, session.connection.clone(), session.label.clone()), phase)
            })
            .collect()
    });
    for ((node_id, connection, _), phase) in ended {
        let sql = match &phase {
            Phase::Prepared(gid) => format!("ROLLBACK PREPARED {}", quote::literal(gid)),
            _ => "ROLLBACK".to_string(),
        };
        let prepared = matches!(phase, Phase::Prepared(_));
        if !connection.is_ok() {
            SESSIONS.with(|s| s.borrow_mut().remove(&node_id));
            if prepared {
                deliver_later(node_id, sql);
            }
            continue;
        }
        if !prepared {
            if !connection.abort_and_rollback(ABORT_TIMEOUT) {
                forget_broken(node_id);
            }
            continue;
        }
        if let Err(error) = connection.cancel_and_run(&sql, ABORT_TIMEOUT) {
            // A PREPARE that failed left nothing to roll back (42704): fine.
            if error.sqlstate.as_deref() != Some("42704") {
                if prepared && !connection.is_ok() {
                    deliver_later(node_id, sql);
                }
                forget_broken(node_id);
            }
        }
    }
}

/// Forgets the transaction's bookkeeping (subtransactions, SET LOCAL).
fn end_of_transaction() {
    SUBXACTS.with(|s| s.borrow_mut().clear());
    LOCAL_SETTINGS.with(|l| l.borrow_mut().clear());
    LOCAL_VERSION.with(|v| v.set(0));
    CONSTRAINTS_ALL.with(|c| c.set(None));
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PARALLEL_PRE_COMMIT => pre_commit(),
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
            commit_prepared();
            super::undo::forget();
            end_of_transaction();
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            connection::reset_run_as();
            crate::planner::aggregates::forget_issued_plans();
            abort_all();
            reset_busy_autocommit_connections();
            super::undo::run();
            end_of_transaction();
        }
        XACT_EVENT_PRE_PREPARE => {
            let open = SESSIONS.with(|s| s.borrow().values().any(|session| session.phase != Phase::Idle));
            if open {
                ShardingError::new(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    "cannot PREPARE a transaction that has used worker nodes inside it",
                )
                .raise();
            }
        }
        _ => {}
    }
}

/// A coordinator subtransaction rolled back: the nodes that worked inside it roll back to
/// their savepoint for it (or whole, when their remote transaction began inside it).
fn subtransaction_aborted(id: SubId) {
    let actions: Vec<(i32, Rc<RemoteConnection>, OnAbort, bool)> = SESSIONS.with(|s| {
        s.borrow_mut()
            .iter_mut()
            .filter(|(_, session)| session.phase == Phase::Open)
            .map(|(node_id, session)| {
                let action = session.savepoints.subtransaction_aborted(id);
                (*node_id, session.connection.clone(), action, !session.connection.is_running())
            })
            .collect()
    });
    for (node_id, connection, action, idle) in actions {
        let outcome = match action {
            OnAbort::Nothing if idle => continue,
            // Busy without a savepoint for this subtransaction: cannot happen, but if it does
            // the remote transaction cannot be trusted.
            OnAbort::Nothing => Err(()),
            OnAbort::RollbackTransaction => {
                let ok = connection.is_ok() && connection.abort_and_rollback(ABORT_TIMEOUT);
                SESSIONS.with(|s| {
                    let mut sessions = s.borrow_mut();
                    if ok {
                        if let Some(session) = sessions.get_mut(&node_id) {
                            session.end_transaction();
                            session.settings = None;
                        }
                    } else {
                        // Closing the connection rolls the node back; none of its work counted.
                        sessions.remove(&node_id);
                    }
                });
                continue;
            }
            OnAbort::RollbackTo(savepoint) => {
                let name = savepoint_name(savepoint);
                connection
                    .cancel_and_run(&format!("ROLLBACK TO SAVEPOINT {name}; RELEASE SAVEPOINT {name}"), ABORT_TIMEOUT)
                    .map(|_| ())
                    .map_err(|error| {
                        pgrx::warning!("could not roll back to a savepoint on node {node_id}: {}", error.message);
                    })
            }
        };
        SESSIONS.with(|s| {
            if let Some(session) = s.borrow_mut().get_mut(&node_id) {
                // The rollback undid session and SET LOCAL settings made since the savepoint.
                session.settings = None;
                session.local_version = 0;
                if outcome.is_err() {
                    session.lost = true;
                }
            }
        });
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent_subid: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    match event {
        SUBXACT_EVENT_START_SUB => SUBXACTS.with(|s| s.borrow_mut().push(my_subid)),
        SUBXACT_EVENT_COMMIT_SUB => {
            SUBXACTS.with(|s| s.borrow_mut().retain(|id| *id < my_subid));
            SESSIONS.with(|s| {
                for session in s.borrow_mut().values_mut().filter(|session| session.phase == Phase::Open) {
                    session.savepoints.subtransaction_committed(my_subid);
                }
            });
        }
        SUBXACT_EVENT_ABORT_SUB => {
            SUBXACTS.with(|s| s.borrow_mut().retain(|id| *id < my_subid));
            reset_busy_autocommit_connections();
            subtransaction_aborted(my_subid);
        }
        _ => {}
    }
}

pub fn register_callbacks() {
    // SAFETY: called once from _PG_init; the callbacks are plain functions living forever.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
    }
}
