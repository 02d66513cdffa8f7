//! Connections from this backend to worker nodes. Only this folder (and later the executor)
//! calls libpq.

mod libpq;
mod local;

pub use libpq::{wait_any_readable, ConnectParams, Poll, RemoteConnection, RemoteError, RemoteResult, RemoteRows, ResultKind, TaskParam};

use crate::error::ShardingError;
use pgrx::PgSqlErrorCode;

/// The database and role a backend uses on the workers: the same as on the coordinator (the
/// role of `current_role`).
pub fn session_identity() -> crate::error::Result<(String, String)> {
    let (db, user) = crate::catalog::read_two::<String, String>(
        "SELECT pg_catalog.current_database()::text, pg_catalog.pg_get_userbyid($1)::text",
        &[current_role().into()],
    )?;
    match (db, user) {
        (Some(db), Some(user)) => Ok((db, user)),
        _ => Err(ShardingError::internal("could not determine the current database and user")),
    }
}

/// The name of this database's encoding (for example UTF8), used as the workers' client encoding.
pub(crate) fn database_encoding() -> String {
    // SAFETY: returns a pointer to a static encoding name.
    unsafe { std::ffi::CStr::from_ptr(pgrx::pg_sys::GetDatabaseEncodingName()) }
        .to_string_lossy()
        .into_owned()
}

/// While alive, the session's client encoding is the database's, so that the binary send and
/// receive functions of the text types (pq_sendtext, pq_getmsgtext) do not convert: values to
/// and from the nodes are in the database encoding, which is their connections'
/// client_encoding, whatever the client of this session uses. Restored on drop (also when an
/// ERROR unwinds); nothing to do when the two encodings are the same.
pub(crate) struct DatabaseEncoding {
    client: Option<i32>,
}

impl DatabaseEncoding {
    pub(crate) fn enter() -> Self {
        // SAFETY: reads the session's encodings; switching to the database encoding needs no
        // conversion function, so it cannot fail.
        unsafe {
            let client = pgrx::pg_sys::pg_get_client_encoding();
            let database = pgrx::pg_sys::GetDatabaseEncoding();
            if client == database {
                return DatabaseEncoding { client: None };
            }
            pgrx::pg_sys::SetClientEncoding(database);
            DatabaseEncoding { client: Some(client) }
        }
    }
}

impl Drop for DatabaseEncoding {
    fn drop(&mut self) {
        if let Some(client) = self.client {
            // SAFETY: back to the encoding the session had, whose conversion functions were
            // looked up when the client chose it (SetClientEncoding finds them in its cache).
            unsafe { pgrx::pg_sys::SetClientEncoding(client) };
        }
    }
}

/// The application_name of worker connections starts with this, followed by the coordinator
/// backend's process id: the distributed deadlock detector joins the nodes' lock waits by it.
pub fn owner_tag_prefix() -> String {
    // SAFETY: reads the system identifier from shared memory.
    format!("pg_sharding:{}:", unsafe { pgrx::pg_sys::GetSystemIdentifier() })
}

/// Opens a connection to `host:port` as the current user and database, or fails with
/// SQLSTATE 08001 and libpq's own message.
pub fn connect_to_node(host: &str, port: i32) -> crate::error::Result<RemoteConnection> {
    let (dbname, user) = session_identity()?;
    let application_name = format!("{}{}", owner_tag_prefix(), std::process::id());
    let params = ConnectParams {
        host,
        application_name: &application_name,
        port,
        dbname: &dbname,
        user: &user,
        connect_timeout_s: crate::guc::NODE_CONNECT_TIMEOUT.get(),
        client_encoding: &database_encoding(),
    };
    let connection = RemoteConnection::connect(&params).map_err(|error| {
        ShardingError::new(
            PgSqlErrorCode::ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            format!("could not connect to node {host}:{port}"),
        )
        .detail(error.message)
        .hint("Check that the server is running, listens on that address and accepts this user (pg_hba.conf).")
    })?;
    connection.set_role(current_role());
    Ok(connection)
}

/// A connection to `node` outside the distributed transaction: this backend itself for the
/// coordinator's own placements, else a new libpq connection (see `connect_to_node`).
pub fn connect_to(node: &crate::catalog::nodes::Node) -> crate::error::Result<RemoteConnection> {
    if node.is_coordinator {
        return Ok(RemoteConnection::local());
    }
    connect_to_node(&node.host, node.port)
}

thread_local! {
    /// The role whose rights a scan reads its tables with when it is not the current one: the
    /// owner of the view the tables are read through (see `run_as`).
    static RUN_AS: std::cell::Cell<pgrx::pg_sys::Oid> = const { std::cell::Cell::new(pgrx::pg_sys::InvalidOid) };
}

/// The role statements run as on the nodes: the current one (SET ROLE and SECURITY DEFINER
/// functions change it), or the one a scan taking its connections runs as (`run_as`).
pub fn current_role() -> pgrx::pg_sys::Oid {
    let run_as = RUN_AS.with(std::cell::Cell::get);
    if run_as != pgrx::pg_sys::InvalidOid {
        return run_as;
    }
    // SAFETY: reads this backend's current user id.
    unsafe { pgrx::pg_sys::GetUserId() }
}

/// While alive, connections are taken for `role` (0: the current role), as PostgreSQL checks a
/// view's tables with its owner's rights: a scan of tables read through a view of another
/// role's uses that role's connections. The coordinator has checked those rights already.
/// Restored on drop (also when an ERROR unwinds) and at the end of every transaction.
pub struct RunAs(pgrx::pg_sys::Oid);

pub fn run_as(role: u32) -> RunAs {
    RunAs(RUN_AS.with(|r| r.replace(pgrx::pg_sys::Oid::from(role))))
}

impl Drop for RunAs {
    fn drop(&mut self) {
        RUN_AS.with(|r| r.set(self.0));
    }
}

/// Forgets any `run_as` (at transaction end: no guard outlives its statement).
pub fn reset_run_as() {
    RUN_AS.with(|r| r.set(pgrx::pg_sys::InvalidOid));
}
