//! What interrupted shard operations leave on the nodes when the coordinator crashes in the
//! middle (a crash skips their own cleanup): an online move's subscription, replication slot
//! (which would hold WAL on the source for ever), publication and new tables on the target; an
//! online split's trigger, its function and the children it fills. The maintenance worker
//! clears them, only while no move or split runs in this database (each holds the node-change
//! lock for its whole transaction), so nothing still in use is touched.

use pgrx::prelude::*;

use crate::catalog::{self, nodes};
use crate::connection;
use crate::deparse::quote;
use crate::deparse::table::shard_object_name;
use crate::error::Result;

/// The shard id in an object name `<prefix><id>`.
fn shard_of(name: &str, prefix: &str) -> Option<i64> {
    name.strip_prefix(prefix).and_then(|id| id.parse().ok())
}

/// Qualified names of the shard tables of `shard_id`'s co-located group, and the node that
/// holds the group per the catalog; `None` when the shard no longer exists.
fn group_names(shard_id: i64) -> Result<Option<(Vec<String>, i32)>> {
    let Ok(group) = super::shard_ops::shard_group_of(shard_id) else { return Ok(None) };
    let mut names = Vec::new();
    for (id, relid) in &group.shards {
        let Some(table) = crate::catalog::cache::table(*relid)? else { continue };
        names.push(quote::qualified(&table.schema, &shard_object_name(&table.name, *id)));
    }
    Ok(Some((names, group.source)))
}

/// Clears the leftovers on every active node; returns how many objects were removed.
/// Waits for running moves and splits (they hold the node-change lock) when `wait`; otherwise
/// does nothing (returns 0) while one runs.
pub fn clear(wait: bool) -> Result<i64> {
    let relid = catalog::read_one::<pg_sys::Oid>("SELECT 'sharding.dist_node'::regclass::oid", &[])?
        .unwrap_or(pg_sys::InvalidOid);
    // SAFETY: a lock on an existing relation, held to the end of the transaction.
    unsafe {
        if wait {
            pg_sys::LockRelationOid(relid, pg_sys::ShareRowExclusiveLock as i32);
        } else if !pg_sys::ConditionalLockRelationOid(relid, pg_sys::ShareRowExclusiveLock as i32) {
            return Ok(0);
        }
    }
    let mut removed = 0;
    let active: Vec<_> = nodes::load_all()?.into_iter().filter(|n| n.is_active).collect();
    let connections: Vec<_> =
        active.iter().filter_map(|n| connection::connect_to_node(&n.host, n.port).ok().map(|c| (n.clone(), c))).collect();
    let list = |c: &connection::RemoteConnection, sql: &str| -> Vec<String> {
        c.exec(sql).map(|rows| (0..rows.rows.len()).filter_map(|i| rows.value(i, 0).map(str::to_string)).collect()).unwrap_or_default()
    };
    // Subscriptions first, everywhere: a slot stays in use while its subscription lives.
    let mut sync_slots: Vec<String> = Vec::new();
    for (node, c) in &connections {
        // Subscriptions of interrupted moves to this node, and the tables they were filling
        // (not the group's placement per the catalog).
        for entry in list(c, "SELECT subname::text || ' ' || oid::text FROM pg_catalog.pg_subscription WHERE subname LIKE 'pgs\\_move\\_%'") {
            let (name, oid) = entry.split_once(' ').unwrap_or((entry.as_str(), ""));
            let name = name.to_string();
            sync_slots.push(format!("pg\\_{oid}\\_sync\\_%"));
            let ident = quote::ident(&name);
            // Detached from its slots (the source may be gone); those are dropped by name below.
            let mut sql = format!(
                "ALTER SUBSCRIPTION {ident} DISABLE; ALTER SUBSCRIPTION {ident} SET (slot_name = NONE); DROP SUBSCRIPTION {ident}"
            );
            if let Some((tables, holder)) = shard_of(&name, "pgs_move_").map(group_names).transpose()?.flatten() {
                if holder != node.node_id && !tables.is_empty() {
                    sql.push_str(&format!("; DROP TABLE IF EXISTS {} CASCADE", tables.join(", ")));
                }
            }
            if c.exec(&sql).is_ok() {
                removed += 1;
            }
        }
    }
    for (node, c) in &connections {
        // The walsender of a dropped subscription takes a moment to let go of its slot.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let patterns: Vec<String> = std::iter::once("pgs\\_move\\_%".to_string()).chain(sync_slots.iter().cloned()).collect();
            let array = super::distribute::text_array(&patterns);
            let slots: Vec<String> = c
                .query(
                    "SELECT slot_name::text || ' ' || active::text FROM pg_catalog.pg_replication_slots WHERE slot_name LIKE ANY ($1::text[])",
                    &[Some(&array)],
                )
                .map(|rows| (0..rows.rows.len()).filter_map(|i| rows.value(i, 0).map(str::to_string)).collect())
                .unwrap_or_default();
            let mut busy = false;
            for entry in slots {
                let (name, active) = entry.split_once(' ').unwrap_or((entry.as_str(), "false"));
                if active == "true" {
                    busy = true;
                } else if c.query("SELECT pg_catalog.pg_drop_replication_slot($1)", &[Some(name)]).is_ok() {
                    removed += 1;
                }
            }
            if !busy || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        for name in list(c, "SELECT pubname::text FROM pg_catalog.pg_publication WHERE pubname LIKE 'pgs\\_move\\_%'") {
            if c.exec(&format!("DROP PUBLICATION IF EXISTS {}", quote::ident(&name))).is_ok() {
                removed += 1;
            }
        }
        // Split triggers of shards still in the catalog: that split never committed.
        let functions = list(
            c,
            "SELECT p.proname::text FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'sharding'::regnamespace AND p.proname LIKE 'pgs\\_split\\_%'",
        );
        for name in functions {
            let Some(shard_id) = shard_of(&name, "pgs_split_") else { continue };
            let relid = catalog::read_one::<pg_sys::Oid>(
                "SELECT (SELECT logicalrelid::oid FROM sharding.dist_shard WHERE shard_id = $1)",
                &[shard_id.into()],
            )?;
            // Not in the catalog: a committed split, whose old shard and function are in
            // dist_cleanup.
            let Some(table) = relid.map(crate::catalog::cache::table).transpose()?.flatten() else { continue };
            let function = format!("sharding.{}", quote::ident(&name));
            let children: Vec<String> = super::split::recorded_children(node, c, &function)?
                .into_iter()
                .map(|id| quote::qualified(&table.schema, &shard_object_name(&table.name, id)))
                .collect();
            let mut sql = format!("SET lock_timeout = '1s'; DROP FUNCTION IF EXISTS {function}() CASCADE");
            if !children.is_empty() {
                sql.push_str(&format!("; DROP TABLE IF EXISTS {} CASCADE", children.join(", ")));
            }
            if c.exec(&sql).is_ok() {
                removed += 1;
            }
        }
    }
    Ok(removed)
}

/// Clears what interrupted moves and splits left on the nodes (what the maintenance worker
/// does periodically), after waiting for running ones; returns how many objects were removed.
/// Superuser only.
#[pg_extern(volatile, parallel_unsafe)]
fn clear_interrupted_operations() -> i64 {
    use crate::error::OrRaise;
    (|| {
        super::require_superuser("clear_interrupted_operations")?;
        clear(true)
    })()
    .or_raise()
}
