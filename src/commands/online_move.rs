//! Online shard moves with PostgreSQL's logical replication.
//!
//! 1. The shard tables are created on the target; a publication of the group's shards on the
//!    source, a subscription (with its slot) on the target copy the rows and then stream every
//!    change, while the application keeps writing through the coordinator.
//! 2. Once the initial copy is done, writes are blocked (an EXCLUSIVE lock on the group's tables
//!    on the coordinator; reads go on), the target catches up to the source's current WAL
//!    position, the subscription and the publication are dropped.
//! 3. The catalog switch and the drop of the old shards commit together in the distributed
//!    transaction (two-phase commit). Statements that waited for the lock then run on the new
//!    placement.
//!
//! Any failure before the switch removes the subscription, the slot, the publication and the
//! new shard tables (also what an earlier interrupted attempt left: each move starts by
//! clearing its own names), so the old placement keeps serving and a re-run starts clean.

use std::time::{Duration, Instant};

use pgrx::prelude::*;

use crate::catalog::nodes::Node;
use crate::connection::{self, RemoteConnection};
use crate::deparse::quote;
use crate::deparse::table::{self as table_ddl, shard_object_name};
use crate::error::{Result, ShardingError};

/// How long the final catch-up (writes blocked) may take before the move gives up.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);

fn on(node: &Node, connection: &RemoteConnection, sql: &str) -> Result<crate::connection::RemoteRows> {
    connection.exec(sql).map_err(|e| crate::transaction::remote::remote_error(node, e))
}

/// One statement with text parameters (`$1`, ...).
fn on_with(node: &Node, connection: &RemoteConnection, sql: &str, params: &[&str]) -> Result<crate::connection::RemoteRows> {
    let params: Vec<Option<&str>> = params.iter().map(|p| Some(*p)).collect();
    connection.query(sql, &params).map_err(|e| crate::transaction::remote::remote_error(node, e))
}

/// A libpq conninfo value, single-quoted.
fn conninfo_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Sleeps 100 ms on the latch, serving interrupts (a cancel ends the move).
fn nap() {
    // SAFETY: waits on our own latch, then resets it and serves interrupts.
    unsafe {
        pg_sys::WaitLatch(
            *std::ptr::addr_of!(pg_sys::MyLatch),
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            100,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(*std::ptr::addr_of!(pg_sys::MyLatch));
    }
    pgrx::check_for_interrupts!();
}

/// Checks what an online move needs: logical WAL on the source, a replica identity on every
/// table (UPDATE and DELETE are replicated by it).
fn check_prerequisites(source: &Node, src: &RemoteConnection, tables: &[pg_sys::Oid]) -> Result<()> {
    let level = on(source, src, "SELECT pg_catalog.current_setting('wal_level')")?;
    if level.value(0, 0) != Some("logical") {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("online moves need wal_level = logical on node {}:{}", source.host, source.port),
        )
        .hint("Set wal_level = logical on the workers (a restart), or move with mode => 'block_writes'."));
    }
    for relid in tables {
        let identity = crate::catalog::read_one::<bool>(
            "SELECT c.relreplident = 'f'
                 OR (c.relreplident = 'i' AND EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisreplident))
                 OR (c.relreplident = 'd' AND EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))
               FROM pg_catalog.pg_class c WHERE c.oid = $1",
            &[(*relid).into()],
        )?
        .unwrap_or(false);
        if !identity {
            let name = crate::catalog::read_one::<String>("SELECT $1::regclass::text", &[(*relid).into()])?.unwrap_or_default();
            return Err(ShardingError::new(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("table {name} has no primary key or replica identity, which an online move needs"),
            )
            .hint("Add a primary key (or ALTER TABLE ... REPLICA IDENTITY FULL), or move with mode => 'block_writes'."));
        }
    }
    Ok(())
}

/// Whether an online move of these tables from `source` is possible (otherwise the caller may
/// fall back to block_writes).
pub fn possible(source: &Node, tables: &[pg_sys::Oid]) -> bool {
    match connection::connect_to_node(&source.host, source.port) {
        Ok(src) => check_prerequisites(source, &src, tables).is_ok(),
        Err(_) => false,
    }
}

/// Removes what a move named `name` may have left: the subscription (and its slot), the
/// publication, and, when `drop_target_tables`, the new shard tables. Best effort: every step
/// is tried, the first failure is returned.
fn clear(source: &Node, target: &Node, name: &str, target_tables: &[String]) -> Result<()> {
    let errors = std::cell::RefCell::new(Vec::<ShardingError>::new());
    let note = |r: Result<crate::connection::RemoteRows>| {
        if let Err(e) = r {
            errors.borrow_mut().push(e);
        }
    };
    let ident = quote::ident(name);
    // The subscription's oid names the slots of its table synchronisation workers on the source
    // (pg_<oid>_sync_<relid>_<sysid>), which a subscription dropped during its initial copy
    // without reaching the source leaves behind.
    let mut subscription_oid = None;
    match connection::connect_to_node(&target.host, target.port) {
        Ok(tgt) => {
            let found = on_with(target, &tgt, "SELECT oid::text FROM pg_catalog.pg_subscription WHERE subname = $1", &[name]);
            subscription_oid = found.ok().and_then(|r| r.value(0, 0).map(str::to_string));
            // A plain drop also drops the slots on the source; without the source, detach them
            // first (dropped below, by name, when the source is back).
            if subscription_oid.is_some() && on(target, &tgt, &format!("DROP SUBSCRIPTION {ident}")).is_err() {
                note(on(target, &tgt, &format!("ALTER SUBSCRIPTION {ident} DISABLE")));
                note(on(target, &tgt, &format!("ALTER SUBSCRIPTION {ident} SET (slot_name = NONE)")));
                note(on(target, &tgt, &format!("DROP SUBSCRIPTION {ident}")));
            }
            if !target_tables.is_empty() {
                note(on(target, &tgt, &format!("DROP TABLE IF EXISTS {}", target_tables.join(", "))));
            }
        }
        Err(e) => errors.borrow_mut().push(e),
    }
    match connection::connect_to_node(&source.host, source.port) {
        Ok(src) => {
            // The slot may still be in use for a moment after the subscription went.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                // The move's slot, and its table-sync slots (none when the oid is unknown).
                let sync = subscription_oid.as_ref().map(|oid| format!("pg\\_{oid}\\_sync\\_%")).unwrap_or_default();
                let slots = "(slot_name = $1 OR slot_name LIKE $2)";
                let dropped = on_with(
                    source,
                    &src,
                    &format!(
                        "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots
                          WHERE {slots} AND NOT active"
                    ),
                    &[name, &sync],
                );
                let left = on_with(source, &src, &format!("SELECT count(*) FROM pg_catalog.pg_replication_slots WHERE {slots}"), &[name, &sync]);
                let gone = left.as_ref().ok().and_then(|r| r.value(0, 0).map(|v| v == "0")).unwrap_or(false);
                if gone || Instant::now() > deadline {
                    if !gone {
                        note(dropped);
                    }
                    break;
                }
                nap();
            }
            note(on(source, &src, &format!("DROP PUBLICATION IF EXISTS {ident}")));
        }
        Err(e) => errors.borrow_mut().push(e),
    }
    match errors.into_inner().into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Moves the group `shards` ((shard id, table)) from `source` to `target` online.
/// `block_writes` takes the lock that stops writes; `switch` changes the catalog and drops the
/// old shards (given their qualified names) inside the distributed transaction.
pub fn run(
    shard_id: i64,
    shards: &[(i64, pg_sys::Oid)],
    source: &Node,
    target: &Node,
    block_writes: impl FnOnce() -> Result<()>,
    switch: impl FnOnce(&[String]) -> Result<()>,
) -> Result<()> {
    let name = format!("pgs_move_{shard_id}");
    let src = connection::connect_to_node(&source.host, source.port)?;
    let tgt = connection::connect_to_node(&target.host, target.port)?;
    check_prerequisites(source, &src, &shards.iter().map(|(_, relid)| *relid).collect::<Vec<_>>())?;
    let mut definitions = Vec::new();
    let mut names = Vec::new();
    for (id, relid) in shards {
        let definition = table_ddl::read(*relid)?;
        names.push(quote::qualified(&definition.schema, &shard_object_name(&definition.name, *id)));
        definitions.push((definition, *id));
    }
    // Whatever an interrupted earlier attempt left behind.
    clear(source, target, &name, &names)?;

    let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
        for ((definition, id), (_, relid)) in definitions.iter().zip(shards) {
            super::types::ensure_with(definition, target, &|sql| on(target, &tgt, sql))?;
            on(target, &tgt, &super::shard_ops::create_shard_sql(*relid, definition, *id)?)?;
        }
        // The foreign keys now, on empty shards: the subscription's copy and changes arrive as
        // replication (session_replication_role = replica), which the keys' triggers skip, and
        // the source already held them.
        let keys = super::foreign_keys::group_statements(&super::foreign_keys::existing(shards)?)?;
        if !keys.is_empty() {
            on(target, &tgt, &keys.join("; "))?;
        }
        on(source, &src, &format!("CREATE PUBLICATION {} FOR TABLE {}", quote::ident(&name), names.join(", ")))?;
        let (dbname, user) = connection::session_identity()?;
        let conninfo = format!(
            "host={} port={} dbname={} user={} application_name={}",
            conninfo_value(&source.host),
            source.port,
            conninfo_value(&dbname),
            conninfo_value(&user),
            conninfo_value(&name)
        );
        on(
            target,
            &tgt,
            &format!(
                "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH (slot_name = {})",
                quote::ident(&name),
                quote::literal(&conninfo),
                quote::ident(&name),
                quote::literal(&name)
            ),
        )?;
        // The initial copy, while writes go on.
        loop {
            let state = on_with(
                target,
                &tgt,
                "SELECT count(*) FILTER (WHERE r.srsubstate = 'r'), count(*) FROM pg_catalog.pg_subscription_rel r
                   JOIN pg_catalog.pg_subscription s ON s.oid = r.srsubid WHERE s.subname = $1",
                &[&name],
            )?;
            let (ready, all) = (state.value(0, 0).unwrap_or("0").to_string(), state.value(0, 1).unwrap_or("0").to_string());
            if all == shards.len().to_string() && ready == all {
                break;
            }
            nap();
        }
        crate::transaction::fault::point("move_after_copy");
        // Writes wait from here until the commit; the target catches up with the source.
        block_writes()?;
        let lsn = on(source, &src, "SELECT pg_catalog.pg_current_wal_lsn()::text")?.value(0, 0).unwrap_or_default().to_string();
        let deadline = Instant::now() + CATCH_UP_TIMEOUT;
        loop {
            let caught_up = on_with(
                source,
                &src,
                "SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_catalog.pg_replication_slots WHERE slot_name = $2",
                &[&lsn, &name],
            )?;
            if caught_up.value(0, 0) == Some("t") {
                break;
            }
            if Instant::now() > deadline {
                return Err(ShardingError::new(
                    PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
                    format!("the target node did not catch up within {} s", CATCH_UP_TIMEOUT.as_secs()),
                ));
            }
            nap();
        }
        // The copy is complete: stop replicating, then switch.
        on(target, &tgt, &format!("DROP SUBSCRIPTION {}", quote::ident(&name)))?;
        on(source, &src, &format!("DROP PUBLICATION {}", quote::ident(&name)))?;
        switch(&names)
    }));
    if matches!(attempt, Ok(Ok(()))) {
        // Should the transaction not commit after all, the new shards on the target go.
        crate::transaction::undo::on_abort(&target.host, target.port, format!("DROP TABLE IF EXISTS {}", names.join(", ")))?;
    } else if let Err(cleanup) = super::uninterrupted(|| clear(source, target, &name, &names)) {
        pgrx::warning!("the failed move of shard {shard_id} could not remove everything it made: {}", cleanup.message);
    }
    match attempt {
        Ok(result) => result,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
