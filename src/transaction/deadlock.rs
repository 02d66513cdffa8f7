//! The distributed deadlock detector. A transaction whose statement has waited for the workers
//! longer than `sharding.distributed_deadlock_timeout` gathers the lock waits of every node
//! (worker connections carry their coordinator backend's pid in application_name) and of the
//! coordinator, joins them into a wait-for graph between coordinator backends, and cancels
//! itself with 40P01 when it is the youngest transaction of a cycle through it
//! (`sharding_core::waitgraph`). Every member of the cycle looks, so exactly the youngest goes.

use std::collections::BTreeMap;

use pgrx::prelude::*;
use sharding_core::waitgraph::{owner_pid, victim};

use crate::catalog::cache;
use crate::connection;
use crate::error::{Result, ShardingError};

/// Lock waits on one worker between connections of this coordinator: (waiter, holder) as
/// coordinator backend pids. A node that cannot be asked adds nothing.
fn worker_edges(host: &str, port: i32, prefix: &str) -> Vec<(i32, i32)> {
    let Ok(connection) = connection::connect_to_node(host, port) else { return Vec::new() };
    let pattern = format!("{prefix}%");
    let Ok(rows) = connection.query(
        "SELECT w.application_name, b.application_name
           FROM pg_catalog.pg_stat_activity w
          CROSS JOIN LATERAL pg_catalog.unnest(pg_catalog.pg_blocking_pids(w.pid)) AS bp(pid)
           JOIN pg_catalog.pg_stat_activity b ON b.pid = bp.pid
          WHERE w.wait_event_type = 'Lock' AND w.application_name LIKE $1 AND b.application_name LIKE $1",
        &[Some(&pattern)],
    ) else {
        return Vec::new();
    };
    (0..rows.rows.len())
        .filter_map(|i| {
            let waiter = owner_pid(rows.value(i, 0)?, prefix)?;
            let holder = owner_pid(rows.value(i, 1)?, prefix)?;
            Some((waiter, holder))
        })
        .collect()
}

/// Lock waits between backends of the coordinator itself.
fn local_edges() -> Result<Vec<(i32, i32)>> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT w.pid, bp.pid FROM pg_catalog.pg_stat_activity w
                  CROSS JOIN LATERAL pg_catalog.unnest(pg_catalog.pg_blocking_pids(w.pid)) AS bp(pid)
                  WHERE w.wait_event_type = 'Lock'",
                None,
                &[],
            )?
            .map(|row| Ok((row.get::<i32>(1)?.unwrap_or_default(), row.get::<i32>(2)?.unwrap_or_default())))
            .collect()
    })
}

/// Transaction start (microseconds) of the coordinator backends in `pids`.
fn start_times(pids: &[i32]) -> Result<BTreeMap<i32, i64>> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT pid, ((extract(epoch FROM xact_start) - 946684800) * 1000000)::int8
                   FROM pg_catalog.pg_stat_activity WHERE pid = ANY ($1) AND xact_start IS NOT NULL",
                None,
                &[pids.to_vec().into()],
            )?
            .map(|row| Ok((row.get::<i32>(1)?.unwrap_or_default(), row.get::<i64>(2)?.unwrap_or_default())))
            .collect()
    })
}

/// Raises 40P01 when this transaction is the one to cancel in a distributed deadlock.
pub fn check() -> Result<()> {
    let me = std::process::id() as i32;
    let prefix = connection::owner_tag_prefix();
    // Backend states are cached per transaction: read them afresh.
    Spi::run("SELECT pg_catalog.pg_stat_clear_snapshot()")?;
    let mut edges = local_edges()?;
    for node in cache::nodes()?.iter().filter(|n| n.is_active && !n.is_coordinator) {
        edges.extend(worker_edges(&node.host, node.port, &prefix));
    }
    let mut pids: Vec<i32> = edges.iter().flat_map(|(a, b)| [*a, *b]).collect();
    pids.sort_unstable();
    pids.dedup();
    if !pids.contains(&me) {
        return Ok(());
    }
    let started = start_times(&pids)?;
    if victim(&edges, me, &started) == Some(me) {
        return Err(ShardingError::new(PgSqlErrorCode::ERRCODE_T_R_DEADLOCK_DETECTED, "distributed deadlock detected")
            .detail(format!(
                "Transactions waiting for each other's locks across nodes (coordinator backends {}); this one, the youngest, was cancelled.",
                pids.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")
            ))
            .hint("Take rows in a consistent order in transactions that update several of them."));
    }
    Ok(())
}
