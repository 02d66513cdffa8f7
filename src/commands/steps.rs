//! Long shard operations (rebalance, drain, split onto other nodes) as a series of steps,
//! each one a call such as `SELECT sharding.move_shard(...)`.
//!
//! Outside a transaction block every step runs in its own transaction, over a connection from
//! this backend to its own server: a step commits, and its locks go, before the next starts,
//! so writes wait only for each step's short switch instead of for the whole operation; an
//! interrupted operation keeps the steps done so far, and a re-run does the rest. Inside a
//! transaction block (or at REPEATABLE READ, where later steps could not see earlier ones)
//! the steps run in the caller's transaction and commit or roll back together.

use pgrx::prelude::*;

use crate::connection::{self, RemoteConnection};
use crate::error::{Result, ShardingError};

/// Whether steps run in the caller's transaction.
fn in_callers_transaction() -> bool {
    // SAFETY: reads transaction state of this backend.
    unsafe { pg_sys::IsTransactionBlock() || *std::ptr::addr_of!(pg_sys::XactIsoLevel) >= pg_sys::XACT_REPEATABLE_READ as i32 }
}

/// Where this server listens: its first unix socket directory, else the loopback address.
fn own_address() -> Result<(String, i32)> {
    let (sockets, port) = crate::catalog::read_two::<String, String>(
        "SELECT pg_catalog.current_setting('unix_socket_directories'), pg_catalog.current_setting('port')",
        &[],
    )?;
    let socket = sockets.unwrap_or_default().split(',').map(|s| s.trim().to_string()).find(|s| !s.is_empty());
    let port = port.and_then(|p| p.parse().ok()).unwrap_or(5432);
    Ok((socket.unwrap_or_else(|| "127.0.0.1".to_string()), port))
}

/// Cancels the step on the server when an error (a cancel of our own statement) unwinds
/// while it runs: closing the connection alone would leave it running.
struct CancelOnUnwind<'a>(&'a RemoteConnection);

impl Drop for CancelOnUnwind<'_> {
    fn drop(&mut self) {
        if self.0.is_running() {
            self.0.cancel();
        }
    }
}

/// Runs one step (a single SELECT returning at most one value), returning its value as text.
pub fn run(sql: &str) -> Result<Option<String>> {
    if in_callers_transaction() {
        return Ok(Spi::get_one::<String>(sql)?);
    }
    let (host, port) = own_address()?;
    let connection = connection::connect_to_node(&host, port).map_err(|e| {
        e.hint("Each step of the operation runs in its own transaction over a connection to this server: \
                pg_hba.conf must let the current user connect locally. Inside BEGIN ... COMMIT the steps run in your transaction instead.")
    })?;
    let guard = CancelOnUnwind(&connection);
    connection.send(sql).map_err(|e| crate::transaction::remote::error_on("this coordinator", e))?;
    let rows = connection.finish(None).map_err(|e| crate::transaction::remote::error_on("this coordinator (a step in its own transaction)", e))?;
    drop(guard);
    Ok(rows.value(0, 0).map(str::to_string))
}

/// `ShardingError` for a refused second operation.
pub fn busy() -> ShardingError {
    ShardingError::new(
        PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
        "another rebalance, drain or split is running",
    )
    .hint("SELECT * FROM sharding.rebalance_progress shows it; wait for it to finish.")
}

/// One operation at a time per database: a transaction-level advisory lock, taken without
/// waiting.
pub fn claim() -> Result<()> {
    let claimed = crate::catalog::read_one::<bool>("SELECT pg_catalog.pg_try_advisory_xact_lock(7370, 1)", &[])?;
    if claimed == Some(true) {
        Ok(())
    } else {
        Err(busy())
    }
}

/// Runs catalog reads under a snapshot taken now: between steps that committed in other
/// sessions, the caller's statement snapshot would still show the state before them.
pub fn with_fresh_snapshot<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    // SAFETY: pushes a new snapshot and pops it again; an error unwinding in between aborts
    // the transaction, which clears the active snapshot stack.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
    let result = f();
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    result
}
