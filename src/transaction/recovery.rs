//! Commit records and the recovery of prepared transactions left on the workers.
//!
//! A distributed transaction that commits with two-phase commit writes one row per prepared
//! remote transaction into `sharding.dist_transaction`, in its local transaction: the row is
//! visible exactly when the coordinator committed. Recovery compares the workers' prepared
//! transactions with these rows (the decision table is `sharding_core::twophase::resolve`),
//! commits or rolls back each one, and deletes the rows that are resolved.

use std::collections::{BTreeMap, BTreeSet};

use pgrx::prelude::*;
use sharding_core::twophase::{record_resolved, resolve, Evidence, Gid, Resolution};

use crate::catalog::nodes::{self, Node};
use crate::connection::{self, RemoteConnection};
use crate::deparse::quote;
use crate::error::{Result, ShardingError};
use crate::transaction::remote::this_coordinator;

/// Writes the commit records of the current transaction (node id, gid), as the bootstrap
/// superuser: the catalog is closed to users, whose transactions still need their records.
pub fn write_commit_records(records: &[(i32, String)]) -> Result<()> {
    let node_ids: Vec<i32> = records.iter().map(|(n, _)| *n).collect();
    let gids: Vec<String> = records.iter().map(|(_, g)| g.clone()).collect();
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: saves and switches the user id the way SECURITY DEFINER functions do; an ERROR
    // in between is cleaned up by the transaction abort, which restores the user.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32 | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
    }
    // Pre-commit runs outside any portal: SPI needs a snapshot of its own.
    // SAFETY: pushed and popped around the SPI call (an abort clears the stack).
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let result = Spi::run_with_args(
        "INSERT INTO sharding.dist_transaction (node_id, gid) SELECT * FROM ROWS FROM (pg_catalog.unnest($1::int4[]), pg_catalog.unnest($2::text[]))",
        &[node_ids.into(), gids.into()],
    );
    // SAFETY: restores exactly what was saved above.
    unsafe {
        pg_sys::PopActiveSnapshot();
        pg_sys::SetUserIdAndSecContext(user, context);
    }
    Ok(result?)
}

/// The commit records as they are visible now: gid -> node id.
fn commit_records() -> Result<BTreeMap<String, i32>> {
    Spi::connect(|client| {
        client
            .select("SELECT gid, node_id FROM sharding.dist_transaction", None, &[])?
            .map(|row| Ok((row.get::<String>(1)?.unwrap_or_default(), row.get::<i32>(2)?.unwrap_or_default())))
            .collect()
    })
}

fn has_commit_record(gid: &str) -> Result<bool> {
    Ok(crate::catalog::read_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM sharding.dist_transaction WHERE gid = $1)",
        &[gid.into()],
    )?
    .unwrap_or(false))
}

/// Whether the coordinator transaction that made `gid` is still running: a backend whose
/// transaction has that id and that start time. (The id alone could be a new transaction that
/// got it again after a crash: it would be waiting for the old one's locks, forever.)
fn transaction_running(gid: &Gid) -> Result<bool> {
    // Backend states are cached per transaction: read them afresh.
    Spi::run("SELECT pg_catalog.pg_stat_clear_snapshot()")?;
    let xid = (gid.transaction & 0xFFFF_FFFF).to_string();
    Ok(crate::catalog::read_one::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity
                         WHERE backend_xid::text = $1
                           AND ((extract(epoch FROM xact_start) - 946684800) * 1000000)::int8 = $2)",
        &[xid.into(), gid.started.into()],
    )?
    .unwrap_or(true))
}

/// Evidence about one prepared transaction of ours, asked in the order `resolve` requires.
/// Each SPI statement takes a new snapshot (recovery refuses to run under REPEATABLE READ).
fn evidence(gid: &Gid, text: &str, recorded_before: bool) -> Result<Evidence> {
    if recorded_before {
        return Ok(Evidence { recorded_before, owner_running: false, recorded_now: true });
    }
    let owner_running = transaction_running(gid)?;
    let recorded_now = !owner_running && has_commit_record(text)?;
    Ok(Evidence { recorded_before, owner_running, recorded_now })
}

/// Recovery reads the commit records again after asking whether their transaction ended: that
/// needs a new snapshot per statement, which REPEATABLE READ and SERIALIZABLE do not take.
fn require_fresh_snapshots() -> Result<()> {
    // SAFETY: plain read of a backend-local global.
    if unsafe { *std::ptr::addr_of!(pg_sys::XactIsoLevel) } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
            "recovery of prepared transactions must run at READ COMMITTED",
        )
        .hint("Run it outside the REPEATABLE READ or SERIALIZABLE transaction."));
    }
    Ok(())
}

fn label(node: &Node) -> String {
    format!("{}:{}", node.host, node.port)
}

/// This coordinator's prepared transactions on `connection`'s node: (gid, prepared at (epoch
/// seconds)).
fn prepared_on(connection: &RemoteConnection) -> std::result::Result<Vec<(String, f64)>, connection::RemoteError> {
    let prefix = this_coordinator().gid_prefix();
    let rows = connection.query(
        "SELECT gid, extract(epoch FROM prepared)::float8::text FROM pg_catalog.pg_prepared_xacts
          WHERE database = pg_catalog.current_database() AND starts_with(gid, $1) ORDER BY prepared",
        &[Some(&prefix)],
    )?;
    Ok((0..rows.rows.len())
        .map(|i| {
            (
                rows.value(i, 0).unwrap_or_default().to_string(),
                rows.value(i, 1).and_then(|v| v.parse().ok()).unwrap_or(0.0),
            )
        })
        .collect())
}

/// One line of what recovery did.
pub struct Outcome {
    pub node_id: i32,
    pub node: String,
    pub gid: String,
    pub action: &'static str,
}

/// Resolves every prepared transaction of this coordinator on every node, and deletes the
/// commit records that are resolved. Unreachable nodes are skipped (with a WARNING) and their
/// records kept for the next run.
pub fn recover() -> Result<Vec<Outcome>> {
    require_fresh_snapshots()?;
    // One recovery at a time (the background worker and a manual call).
    Spi::run("SELECT pg_catalog.pg_advisory_xact_lock(7450366110843461187)")?;
    // Records first, then the lists: see sharding_core::twophase::Evidence.
    let records = commit_records()?;
    let nodes = nodes::load_all()?;
    let mut outcomes = Vec::new();
    let mut answered: BTreeSet<i32> = BTreeSet::new();
    let mut still_prepared: BTreeSet<String> = BTreeSet::new();
    let mut committed_now: BTreeSet<String> = BTreeSet::new();
    for node in &nodes {
        let connection = match connection::connect_to_node(&node.host, node.port) {
            Ok(connection) => connection,
            Err(error) => {
                pgrx::warning!("recovery skipped node {}: {}", label(node), error.message);
                continue;
            }
        };
        let prepared = match prepared_on(&connection) {
            Ok(list) => list,
            Err(error) => {
                pgrx::warning!("recovery skipped node {}: {}", label(node), error.message);
                continue;
            }
        };
        answered.insert(node.node_id);
        for (text, _) in prepared {
            let Some(gid) = Gid::parse(&text) else { continue };
            still_prepared.insert(text.clone());
            let resolution = resolve(evidence(&gid, &text, records.contains_key(&text))?);
            let (sql, action) = match resolution {
                Resolution::Leave => {
                    outcomes.push(Outcome { node_id: node.node_id, node: label(node), gid: text, action: "in progress" });
                    continue;
                }
                Resolution::Commit => ("COMMIT PREPARED", "committed"),
                Resolution::Rollback => ("ROLLBACK PREPARED", "rolled back"),
            };
            match connection.exec(&format!("{sql} {}", quote::literal(&text))) {
                Ok(_) => {
                    if resolution == Resolution::Commit {
                        committed_now.insert(text.clone());
                    }
                    outcomes.push(Outcome { node_id: node.node_id, node: label(node), gid: text, action });
                }
                // Finished meanwhile by the transaction itself (or another recovery).
                Err(error) if error.sqlstate.as_deref() == Some("42704") => {
                    still_prepared.remove(&text);
                }
                Err(error) => {
                    pgrx::warning!("recovery could not finish {text} on node {}: {}", label(node), error.message);
                    outcomes.push(Outcome { node_id: node.node_id, node: label(node), gid: text, action: "failed" });
                }
            }
        }
    }
    let known: BTreeSet<i32> = nodes.iter().map(|n| n.node_id).collect();
    let resolved: Vec<String> = records
        .iter()
        .filter(|(gid, node_id)| {
            !known.contains(node_id)
                || record_resolved(answered.contains(node_id), still_prepared.contains(*gid), committed_now.contains(*gid))
        })
        .map(|(gid, _)| gid.clone())
        .collect();
    if !resolved.is_empty() {
        crate::catalog::as_catalog_owner(|| {
            Spi::run_with_args("DELETE FROM sharding.dist_transaction WHERE gid = ANY ($1::text[])", &[resolved.into()])?;
            Ok(())
        })?;
    }
    Ok(outcomes)
}

/// Commits every prepared transaction on the workers whose coordinator transaction committed,
/// rolls back those whose transaction did not (and is not running anymore), and deletes the
/// commit records that are resolved. Returns what it did, one row per prepared transaction.
#[pg_extern(volatile, parallel_unsafe)]
fn recover_prepared_transactions(
) -> TableIterator<'static, (name!(node_id, i32), name!(node, String), name!(gid, String), name!(action, String))> {
    let outcomes = (|| {
        require_superuser()?;
        recover()
    })()
    .or_raise();
    TableIterator::new(outcomes.into_iter().map(|o| (o.node_id, o.node, o.gid, o.action.to_string())))
}

fn require_superuser() -> Result<()> {
    // SAFETY: reads the current user's superuser flag.
    if unsafe { pg_sys::superuser() } {
        Ok(())
    } else {
        Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "only superusers can recover prepared transactions",
        ))
    }
}

/// This coordinator's prepared transactions on every node, with what recovery would do with
/// each ('commit', 'abort', or 'in progress' while their transaction still runs). Unreachable
/// nodes are skipped with a WARNING. Backs the `sharding.transactions` view.
#[pg_extern(volatile, parallel_unsafe)]
fn prepared_transactions() -> TableIterator<
    'static,
    (
        name!(node_id, i32),
        name!(node, String),
        name!(gid, String),
        name!(prepared_epoch, f64),
        name!(decision, String),
    ),
> {
    let rows = (|| -> Result<Vec<(i32, String, String, f64, String)>> {
        require_fresh_snapshots()?;
        let mut rows = Vec::new();
        for node in nodes::load_all()? {
            let listed = connection::connect_to_node(&node.host, node.port)
                .and_then(|c| prepared_on(&c).map_err(|e| crate::transaction::remote::remote_error(&node, e)));
            let prepared = match listed {
                Ok(list) => list,
                Err(error) => {
                    pgrx::warning!("node {} skipped: {}", label(&node), error.message);
                    continue;
                }
            };
            for (text, at) in prepared {
                let Some(gid) = Gid::parse(&text) else { continue };
                let decision = match resolve(evidence(&gid, &text, has_commit_record(&text)?)?) {
                    Resolution::Commit => "commit",
                    Resolution::Rollback => "abort",
                    Resolution::Leave => "in progress",
                };
                rows.push((node.node_id, label(&node), text, at, decision.to_string()));
            }
        }
        Ok(rows)
    })()
    .or_raise();
    TableIterator::new(rows)
}

use crate::error::OrRaise;
