//! Work a shard operation did on a node outside the distributed transaction (an online
//! split's child shards and trigger, an online move's new shards on the target), to be
//! undone if the coordinator's transaction does not commit after all: the statements run at
//! abort, each over its own connection, errors only warned about.
//!
//! The connection identity is captured when the work is registered: no catalog access is
//! possible during abort.

use std::cell::RefCell;

use crate::connection::{ConnectParams, RemoteConnection};

struct Pending {
    host: String,
    port: i32,
    dbname: String,
    user: String,
    encoding: String,
    sql: String,
}

thread_local! {
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
}

/// Runs `sql` on `host:port` if this transaction aborts.
pub fn on_abort(host: &str, port: i32, sql: String) -> crate::error::Result<()> {
    let (dbname, user) = crate::connection::session_identity()?;
    let encoding = crate::connection::database_encoding();
    PENDING.with(|p| p.borrow_mut().push(Pending { host: host.to_string(), port, dbname, user, encoding, sql }));
    Ok(())
}

/// The transaction committed: nothing to undo.
pub fn forget() {
    PENDING.with(|p| p.borrow_mut().clear());
}

/// The transaction aborted: undo, newest first.
pub fn run() {
    let pending: Vec<Pending> = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for item in pending.into_iter().rev() {
        let params = ConnectParams {
            host: &item.host,
            application_name: "pg_sharding undo",
            port: item.port,
            dbname: &item.dbname,
            user: &item.user,
            connect_timeout_s: 5,
            client_encoding: &item.encoding,
        };
        let outcome = RemoteConnection::connect(&params).and_then(|c| c.exec(&item.sql));
        if let Err(error) = outcome {
            pgrx::warning!(
                "could not undo a shard operation's work on node {}:{}: {error} (statement: {})",
                item.host,
                item.port,
                item.sql
            );
        }
    }
}
