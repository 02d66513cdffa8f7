//! Shard operations: move_shard (mode block_writes), drain_node, rebalance_shards and its plan
//! (the planning itself is `sharding_core::rebalance`).
//!
//! A move takes the shard together with the shards co-located with it (same colocation group,
//! same shard index). In `block_writes` mode, writes through the coordinator wait on a lock of
//! the group's tables (EXCLUSIVE: reads go on) while the rows are copied; everything happens in
//! one distributed transaction committed with two-phase commit: the new shards and their rows
//! on the target, the catalog switch, and the old shards dropped on the source. A failure at
//! any point leaves the old placement serving and nothing on the target.
//! Online moves (logical replication) are in `online_move`; splits in `split`.

use pgrx::prelude::*;
use pgrx::PgRelation;
use sharding_core::rebalance::{self, GroupPlacement, Move, Strategy};

use super::{require_superuser, required, steps};
use crate::catalog::nodes::{self, Node};
use crate::catalog;
use crate::deparse::quote;
use crate::deparse::table::{self as table_ddl, shard_object_name};
use crate::error::{OrRaise, Result, ShardingError};
use crate::transaction::remote;

/// One shard of a co-located group: (shard id, table).
struct GroupShard {
    shard_id: i64,
    relid: pg_sys::Oid,
}

struct Group {
    shards: Vec<GroupShard>,
    source: i32,
}

/// The co-located group of `shard_id` and the node holding it.
fn shard_group(shard_id: i64) -> Result<Group> {
    let found = Spi::connect(|client| -> Result<Option<(String, i32, i32)>> {
        let mut rows = client.select(
            "SELECT t.method, s.shard_index, coalesce(t.colocation_id, -1)
               FROM sharding.dist_shard s JOIN sharding.dist_table t ON t.logicalrelid = s.logicalrelid
              WHERE s.shard_id = $1",
            Some(1),
            &[shard_id.into()],
        )?;
        rows.next()
            .map(|row| -> Result<(String, i32, i32)> {
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<i32>(2)?.unwrap_or_default(),
                    row.get::<i32>(3)?.unwrap_or_default(),
                ))
            })
            .transpose()
    })?;
    let Some((method, index, colocation)) = found else {
        return Err(ShardingError::new(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("shard {shard_id} does not exist"))
            .hint("SELECT * FROM sharding.shards lists the shards."));
    };
    if method != "hash" {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("shard {shard_id} belongs to a {method} table, which has a copy on every node"),
        ));
    }
    let members = Spi::connect(|client| -> Result<Vec<(i64, pg_sys::Oid, i32)>> {
        client
            .select(
                "SELECT s.shard_id, s.logicalrelid::oid, p.node_id
                   FROM sharding.dist_shard s
                   JOIN sharding.dist_table t ON t.logicalrelid = s.logicalrelid
                   JOIN sharding.dist_placement p ON p.shard_id = s.shard_id
                  WHERE s.shard_index = $1 AND (t.colocation_id = $2 OR s.shard_id = $3)
                  ORDER BY s.logicalrelid::oid",
                None,
                &[index.into(), colocation.into(), shard_id.into()],
            )?
            .map(|row| {
                Ok((
                    row.get::<i64>(1)?.unwrap_or_default(),
                    row.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                    row.get::<i32>(3)?.unwrap_or_default(),
                ))
            })
            .collect()
    })?;
    let source = members.iter().find(|(id, ..)| *id == shard_id).map(|(.., node)| *node).ok_or_else(|| {
        ShardingError::internal(format!("shard {shard_id} has no placement"))
    })?;
    if members.iter().any(|(.., node)| *node != source) {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("the shards co-located with shard {shard_id} are not all on one node"),
        ));
    }
    Ok(Group { shards: members.into_iter().map(|(shard_id, relid, _)| GroupShard { shard_id, relid }).collect(), source })
}

/// The co-located group of `shard_id` ((shard id, table) each) and the node holding it.
pub struct GroupInfo {
    pub shards: Vec<(i64, pg_sys::Oid)>,
    pub source: i32,
}

pub fn shard_group_of(shard_id: i64) -> Result<GroupInfo> {
    let group = shard_group(shard_id)?;
    Ok(GroupInfo { shards: group.shards.iter().map(|s| (s.shard_id, s.relid)).collect(), source: group.source })
}

pub(super) fn active_node(node_id: i32) -> Result<Node> {
    let node = nodes::load_all()?.into_iter().find(|n| n.node_id == node_id).ok_or_else(|| {
        ShardingError::new(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("node {node_id} is not registered"))
            .hint("SELECT * FROM sharding.nodes lists the registered nodes.")
    })?;
    if !node.is_active {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("node {node_id} is not active"),
        ));
    }
    Ok(node)
}

/// Copies one shard's rows from `source` to `target` (COPY streamed through the coordinator),
/// both inside the distributed transaction. In binary unless a column has a user-defined type:
/// an array's binary form names its element type by OID, which differs from node to node.
fn copy_rows(source: &Node, target: &Node, from: &str, to: &str, columns: &str, binary: bool) -> Result<u64> {
    let reader = remote::for_statement(source, remote::Access::Read)?;
    let writer = remote::in_transaction(target)?;
    let format = if binary { "binary" } else { "text" };
    writer
        .copy_start(&format!("COPY {to} ({columns}) FROM STDIN WITH (FORMAT {format})"))
        .map_err(|e| remote::remote_error(target, e))?;
    let mut sink_error = None;
    let copied = reader.copy_out(&format!("COPY {from} ({columns}) TO STDOUT WITH (FORMAT {format})"), |chunk| {
        writer.copy_data(chunk).map_err(|e| {
            sink_error = Some(remote::remote_error(target, e));
            crate::connection::RemoteError::local("the target node stopped taking rows")
        })
    });
    if let Some(error) = sink_error {
        return Err(error);
    }
    let rows = copied.map_err(|e| remote::remote_error(source, e))?;
    writer.copy_end(None).map_err(|e| remote::remote_error(target, e))?;
    Ok(rows)
}

/// The statements that create one shard of `relid` (with its schema) on a node, with the
/// table's owner and privileges (moves and splits run as a superuser).
pub fn create_shard_sql(relid: pg_sys::Oid, definition: &table_ddl::TableDefinition, shard_id: i64) -> Result<String> {
    let mut statements = vec![format!("CREATE SCHEMA IF NOT EXISTS {}", quote::ident(&definition.schema))];
    statements.extend(definition.shard_ddl(shard_id, &quote::ident));
    statements.extend(super::grants::new_shard_statements(relid, &definition.shard_name(shard_id, &quote::ident))?);
    Ok(statements.join("; "))
}

/// How a move copies the rows.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum MoveMode {
    /// Logical replication; writes wait only for the final catch-up and the catalog switch.
    Online,
    /// Binary COPY while writes wait for the whole copy.
    BlockWrites,
    /// Online when the tables and the source allow it, otherwise block_writes (drain and
    /// rebalance).
    Auto,
}

fn lock_group(group: &Group) -> Result<()> {
    // Writes through the coordinator wait until the move commits; reads go on.
    super::lock_tables_together(&group.shards.iter().map(|m| m.relid).collect::<Vec<_>>(), "EXCLUSIVE")
}

/// The catalog switch: the placements move to the target, and the old shards are recorded for
/// a deferred drop (a query that planned with the old placement may still read them; and the
/// move's transaction then writes nothing on the source, which an online move of another group
/// from the same source in the same transaction needs).
fn switch_placements(group: &Group, source: &Node, target: &Node, old_shards: &[String]) -> Result<()> {
    let ids: Vec<i64> = group.shards.iter().map(|s| s.shard_id).collect();
    catalog::as_catalog_owner(|| {
        Spi::run_with_args(
            "UPDATE sharding.dist_placement SET node_id = $1 WHERE shard_id = ANY ($2) AND node_id = $3",
            &[target.node_id.into(), ids.into(), source.node_id.into()],
        )?;
        Spi::run_with_args(
            "INSERT INTO sharding.dist_cleanup (object_name, node_id) SELECT unnest($1::text[]), $2
             ON CONFLICT DO NOTHING",
            &[old_shards.to_vec().into(), source.node_id.into()],
        )?;
        Ok(())
    })
}

/// Drops the old placements recorded by earlier moves, each over its own autocommit connection
/// with a short lock_timeout: one still in use stays for the next run. Returns how many were
/// dropped. Only records of committed moves count: those of the current transaction (a drain
/// moving several groups) carry its start time and stay until it has committed.
pub fn cleanup_old_placements() -> Result<i64> {
    let pending = Spi::connect(|client| -> Result<Vec<(String, i32, String)>> {
        client
            .select("SELECT object_name, node_id, object_type FROM sharding.dist_cleanup
              WHERE created_at < pg_catalog.transaction_timestamp() ORDER BY created_at, object_type DESC", None, &[])?
            .map(|row| {
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<i32>(2)?.unwrap_or_default(),
                    row.get::<String>(3)?.unwrap_or_default(),
                ))
            })
            .collect()
    })?;
    if pending.is_empty() {
        return Ok(0);
    }
    let nodes = nodes::load_all()?;
    let mut dropped = 0;
    for (name, node_id, kind) in pending {
        // Names were quoted when recorded; a split's trigger function goes with its trigger.
        let drop = if kind == "function" {
            format!("DROP FUNCTION IF EXISTS {name} CASCADE")
        } else {
            // CASCADE: the keys of the group's other old shards to this one.
            format!("DROP TABLE IF EXISTS {name} CASCADE")
        };
        let done = match nodes.iter().find(|n| n.node_id == node_id) {
            // The node is gone: nothing to drop any more.
            None => true,
            Some(node) => crate::connection::connect_to_node(&node.host, node.port)
                .ok()
                .is_some_and(|c| c.exec(&format!("SET lock_timeout = '1s'; {drop}")).is_ok()),
        };
        if done {
            catalog::as_catalog_owner(|| {
                Spi::run_with_args(
                    "DELETE FROM sharding.dist_cleanup WHERE object_name = $1 AND node_id = $2",
                    &[name.clone().into(), node_id.into()],
                )?;
                Ok(())
            })?;
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// Drops the old shard placements that moves left for later; returns how many.
#[pg_extern(name = "cleanup_old_placements", volatile, parallel_unsafe)]
fn cleanup_old_placements_sql() -> i64 {
    (|| {
        require_superuser("cleanup_old_placements")?;
        cleanup_old_placements()
    })()
    .or_raise()
}

/// Shards on the coordinator itself stay where they are: moving or splitting them is not
/// supported yet (0A000).
pub fn refuse_coordinator(nodes: &[&Node], what: &str) -> Result<()> {
    match nodes.iter().find(|n| n.is_coordinator) {
        Some(node) => Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("shards on the coordinator ({}:{}) cannot be {what}", node.host, node.port),
        )
        .detail("Placements on the coordinator run in its own backends; shard moves and splits reach nodes over connections.")
        .hint("Keep the coordinator's shards where they are, or undistribute and distribute the table again without the coordinator.")),
        None => Ok(()),
    }
}

pub fn move_group(shard_id: i64, target_id: i32, mode: MoveMode) -> Result<()> {
    // One move of a group at a time; concurrent node changes wait.
    nodes::lock_for_change()?;
    // Old placements of earlier moves go first (one may be in the way of this one).
    cleanup_old_placements()?;
    let group = shard_group(shard_id)?;
    let target = active_node(target_id)?;
    if group.source == target.node_id {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("shard {shard_id} is already on node {target_id}"),
        ));
    }
    let source = nodes::load_all()?.into_iter().find(|n| n.node_id == group.source).ok_or_else(|| {
        ShardingError::internal(format!("the node {} of shard {shard_id} is not registered", group.source))
    })?;
    refuse_coordinator(&[&source, &target], "moved")?;
    let tables: Vec<pg_sys::Oid> = group.shards.iter().map(|s| s.relid).collect();
    let online = match mode {
        MoveMode::Online => {
            if remote::wrote_on(&source) {
                return Err(ShardingError::new(
                    PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
                    format!(
                        "an online move cannot run in a transaction that has written on node {}:{}",
                        source.host, source.port
                    ),
                )
                .hint("Run the move in its own transaction, or use mode => 'block_writes'."));
            }
            true
        }
        MoveMode::BlockWrites => false,
        // The replication slot waits for every transaction with writes on the source to end:
        // one of ours there would never end.
        MoveMode::Auto => !remote::wrote_on(&source) && super::online_move::possible(&source, &tables),
    };
    if online {
        return super::online_move::run(shard_id, &group.shards.iter().map(|s| (s.shard_id, s.relid)).collect::<Vec<_>>(), &source, &target, || {
            lock_group(&group)
        }, |old| switch_placements(&group, &source, &target, old));
    }
    lock_group(&group)?;
    let mut dropped = Vec::new();
    for member in &group.shards {
        let definition = table_ddl::read(member.relid)?;
        super::types::ensure_on(&definition, &target)?;
        remote::execute(&target, &create_shard_sql(member.relid, &definition, member.shard_id)?)?;
        let shard = quote::qualified(&definition.schema, &shard_object_name(&definition.name, member.shard_id));
        let columns: Vec<String> =
            definition.columns.iter().filter(|c| c.generated_sql.is_none()).map(|c| quote::ident(&c.name)).collect();
        let binary = definition.columns.iter().all(|c| c.type_oid < pg_sys::FirstNormalObjectId);
        copy_rows(&source, &target, &shard, &shard, &columns.join(", "), binary)?;
        dropped.push(shard);
    }
    // The foreign keys once every shard of the group is filled (a key checks its rows then).
    let keys = super::foreign_keys::group_statements(&super::foreign_keys::existing(
        &group.shards.iter().map(|m| (m.shard_id, m.relid)).collect::<Vec<_>>(),
    )?)?;
    if !keys.is_empty() {
        remote::execute(&target, &keys.join("; "))?;
    }
    switch_placements(&group, &source, &target, &dropped)
}

/// Moves shard `shard_id` and the shards co-located with it to node `target_node`.
#[pg_extern(volatile, parallel_unsafe)]
fn move_shard(shard_id: Option<i64>, target_node: Option<i32>, mode: default!(Option<&str>, "'online'")) {
    (|| {
        require_superuser("move_shard")?;
        let shard_id = required(shard_id, "shard_id")?;
        let target_node = required(target_node, "target_node")?;
        match required(mode, "mode")?.trim().to_ascii_lowercase().as_str() {
            "block_writes" => move_group(shard_id, target_node, MoveMode::BlockWrites),
            "online" => move_group(shard_id, target_node, MoveMode::Online),
            "auto" => move_group(shard_id, target_node, MoveMode::Auto),
            other => Err(ShardingError::new(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("unknown move mode \"{other}\""),
            )
            .hint("The modes are 'online', 'block_writes' and 'auto' (online where the tables allow it).")),
        }
    })()
    .or_raise()
}

/// Moves every shard off the node `host:port` (online where the tables allow it, each move
/// in its own transaction: see `steps`), each group to the active node that holds the fewest
/// shards, so that remove_node can succeed. Returns the number of shard groups moved.
#[pg_extern(volatile, parallel_unsafe)]
fn drain_node(host: Option<&str>, port: Option<i32>) -> i64 {
    (|| -> Result<i64> {
        require_superuser("drain_node")?;
        let (host, port) = (required(host, "host")?, required(port, "port")?);
        let node = nodes::find(host, port)?.ok_or_else(|| {
            ShardingError::new(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, format!("node {host}:{port} is not registered"))
        })?;
        steps::claim()?;
        let groups = catalog::read_one::<i64>(
            "SELECT count(DISTINCT (t.colocation_id, s.shard_index)) FROM sharding.dist_shard s
               JOIN sharding.dist_table t ON t.logicalrelid = s.logicalrelid
               JOIN sharding.dist_placement p ON p.shard_id = s.shard_id
              WHERE p.node_id = $1 AND t.method = 'hash'",
            &[node.node_id.into()],
        )?
        .unwrap_or(0);
        let progress = crate::stats::ProgressSlot::start("drain", groups as usize, 0)?;
        let mut moved = 0;
        loop {
            if moved > groups {
                return Err(ShardingError::internal("the drain does not see its own moves").hint("Run it outside REPEATABLE READ."));
            }
            // Read under a fresh snapshot: the earlier moves committed in their own sessions.
            let Some((shard_id, target)) = steps::with_fresh_snapshot(|| next_drain_move(&node, host, port))? else {
                break;
            };
            progress.moving(shard_id, node.node_id, target, 0);
            steps::run(&format!("SELECT sharding.move_shard({shard_id}, {target}, 'auto')::text"))?;
            progress.moved();
            moved += 1;
        }
        Ok(moved)
    })()
    .or_raise()
}

/// The next move of a drain of `node`: a shard of a co-located group still on it, and the
/// active node that holds the fewest shards; `None` when the node is empty.
fn next_drain_move(node: &Node, host: &str, port: i32) -> Result<Option<(i64, i32)>> {
    let next = catalog::read_one::<i64>(
        "SELECT min(s.shard_id) FROM sharding.dist_shard s
           JOIN sharding.dist_table t ON t.logicalrelid = s.logicalrelid
           JOIN sharding.dist_placement p ON p.shard_id = s.shard_id
          WHERE p.node_id = $1 AND t.method = 'hash'",
        &[node.node_id.into()],
    )?;
    let Some(shard_id) = next else { return Ok(None) };
    let target = catalog::read_one::<i32>(
        // A scalar subquery: one row (NULL) when there is no other node.
        "SELECT (SELECT n.node_id FROM sharding.dist_node n
                   LEFT JOIN sharding.dist_placement p ON p.node_id = n.node_id
                  WHERE n.is_active AND n.node_id <> $1
                  GROUP BY n.node_id ORDER BY count(p.shard_id), n.node_id LIMIT 1)",
        &[node.node_id.into()],
    )?
    .ok_or_else(|| {
        ShardingError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("no other active node to move the shards of {host}:{port} to"),
        )
        .hint("Add a node first (sharding.add_node).")
    })?;
    Ok(Some((shard_id, target)))
}

/// The active nodes and every shard group of hash tables (of `table`'s colocation group when
/// given), with its node and size in bytes (asked from the nodes).
fn current_layout(table: Option<pg_sys::Oid>) -> Result<(Vec<i32>, Vec<Vec<GroupPlacement>>)> {
    let nodes = Spi::connect(|client| -> Result<Vec<i32>> {
        client
            .select("SELECT node_id FROM sharding.dist_node WHERE is_active AND NOT is_coordinator ORDER BY node_id", None, &[])?
            .map(|row| Ok(row.get::<i32>(1)?.unwrap_or_default()))
            .collect()
    })?;
    let groups = Spi::connect(|client| -> Result<Vec<(i32, GroupPlacement)>> {
        client
            .select(
                "WITH sizes AS (SELECT * FROM sharding.shard_sizes())
                 SELECT min(s.shard_id), min(p.node_id), coalesce(sum(z.size_bytes), 0)::int8, coalesce(t.colocation_id, -1)
                   FROM sharding.dist_shard s
                   JOIN sharding.dist_table t ON t.logicalrelid = s.logicalrelid
                   JOIN sharding.dist_placement p ON p.shard_id = s.shard_id
                   JOIN sharding.dist_node n ON n.node_id = p.node_id
                   LEFT JOIN sizes z ON z.shard_id = s.shard_id AND z.node_id = p.node_id
                  WHERE t.method = 'hash' AND NOT n.is_coordinator
                    AND ($1::oid IS NULL OR t.colocation_id =
                         (SELECT colocation_id FROM sharding.dist_table WHERE logicalrelid = $1::oid::regclass))
                  GROUP BY t.colocation_id, s.shard_index
                  ORDER BY 1",
                None,
                &[table.into()],
            )?
            .map(|row| {
                Ok((
                    row.get::<i32>(4)?.unwrap_or_default(),
                    GroupPlacement {
                        shard_id: row.get::<i64>(1)?.unwrap_or_default(),
                        node: row.get::<i32>(2)?.unwrap_or_default(),
                        bytes: row.get::<i64>(3)?.unwrap_or_default().max(0) as u64,
                    },
                ))
            })
            .collect()
    })?;
    // One set per colocation group, in colocation order.
    let mut sets: std::collections::BTreeMap<i32, Vec<GroupPlacement>> = Default::default();
    for (colocation, group) in groups {
        sets.entry(colocation).or_default().push(group);
    }
    Ok((nodes, sets.into_values().collect()))
}

fn planned_moves(table: Option<pg_sys::Oid>, strategy: &str) -> Result<Vec<Move>> {
    let strategy = Strategy::parse(strategy).ok_or_else(|| {
        ShardingError::new(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("unknown rebalance strategy \"{strategy}\""))
            .hint("The strategies are 'by_shard_count' and 'by_disk_size'.")
    })?;
    if let Some(relid) = table {
        if crate::catalog::cache::table(relid)?.is_none_or(|t| t.method != crate::catalog::tables::Method::Hash) {
            return Err(ShardingError::new(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                "only hash-distributed tables are rebalanced",
            ));
        }
    }
    let (nodes, sets) = current_layout(table)?;
    Ok(rebalance::plan_colocated(&nodes, &sets, strategy))
}

fn move_rows(moves: Vec<Move>) -> TableIterator<'static, (i64, i32, i32, i64)> {
    TableIterator::new(moves.into_iter().map(|m| (m.shard_id, m.from, m.to, m.bytes as i64)))
}

/// The moves `rebalance_shards` would make, without making them: one row per shard group
/// (a shard of it, from, to, bytes), in order.
#[pg_extern(volatile, parallel_unsafe)]
fn rebalance_plan(
    table_name: default!(Option<PgRelation>, "NULL"),
    strategy: default!(Option<&str>, "'by_shard_count'"),
) -> TableIterator<'static, (name!(shard_id, i64), name!(from_node, i32), name!(to_node, i32), name!(bytes, i64))> {
    move_rows(planned_moves(table_name.map(|t| t.oid()), strategy.unwrap_or("by_shard_count")).or_raise())
}

/// The Citus-compatible entry point lives in pg_catalog, callable unqualified.
#[pg_schema]
mod pg_catalog {
    use super::*;

    /// Moves shard groups (online where the tables allow it, one after another, each in its
    /// own transaction: see `steps`) until the active nodes hold
    /// about the same: group counts within one (`by_shard_count`) or sizes within 10% of the
    /// mean (`by_disk_size`). With `dry_run`, only returns the plan. Returns the moves.
    #[pg_extern(volatile, parallel_unsafe)]
    fn rebalance_shards(
        table_name: default!(Option<PgRelation>, "NULL"),
        strategy: default!(Option<&str>, "'by_shard_count'"),
        dry_run: default!(Option<bool>, "false"),
    ) -> TableIterator<'static, (name!(shard_id, i64), name!(from_node, i32), name!(to_node, i32), name!(bytes, i64))> {
        let moves = (|| -> Result<Vec<Move>> {
            if !dry_run.unwrap_or(false) {
                require_superuser("rebalance_shards")?;
            }
            let moves = planned_moves(table_name.map(|t| t.oid()), strategy.unwrap_or("by_shard_count"))?;
            if !dry_run.unwrap_or(false) {
                steps::claim()?;
                let bytes: u64 = moves.iter().map(|m| m.bytes).sum();
                let progress = crate::stats::ProgressSlot::start("rebalance", moves.len(), bytes)?;
                for step in &moves {
                    progress.moving(step.shard_id, step.from, step.to, step.bytes);
                    steps::run(&format!("SELECT sharding.move_shard({}, {}, 'auto')::text", step.shard_id, step.to))?;
                    progress.moved();
                }
            }
            Ok(moves)
        })()
        .or_raise();
        move_rows(moves)
    }
}

/// Per shard placement of `relid` on `node`: (shard id, estimated rows, bytes), asked from the
/// node (rows: the planner's estimate, or an exact count for a shard never analyzed).
fn shard_figures(node: &Node, shards: &[(i64, String)]) -> Result<Vec<(i64, i64, i64)>> {
    if shards.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<String> = shards
        .iter()
        .map(|(id, name)| {
            format!(
                "SELECT {id}::int8, CASE WHEN c.reltuples >= 0 THEN c.reltuples::int8 ELSE (SELECT count(*) FROM {name}) END,
                        pg_catalog.pg_total_relation_size(c.oid)
                   FROM pg_catalog.pg_class c WHERE c.oid = {}::regclass",
                quote::literal(name)
            )
        })
        .collect();
    let connection = remote::for_statement(node, remote::read_access())?;
    let rows = connection.exec(&parts.join(" UNION ALL ")).map_err(|e| remote::remote_error(node, e))?;
    Ok((0..rows.rows.len())
        .map(|i| {
            let number = |c: usize| rows.value(i, c).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
            (number(0), number(1), number(2))
        })
        .collect())
}

/// How a distributed table spreads over the nodes: per active node its shard count,
/// estimated rows and bytes, and (on every row) the coefficient of variation of rows and of
/// bytes across the nodes (0: perfectly even).
#[pg_extern(volatile, parallel_unsafe)]
fn table_distribution(
    table_name: PgRelation,
) -> TableIterator<
    'static,
    (
        name!(node_id, i32),
        name!(node, String),
        name!(shard_count, i64),
        name!(rows, i64),
        name!(bytes, i64),
        name!(rows_cv, Option<f64>),
        name!(bytes_cv, Option<f64>),
    ),
> {
    let rows = (|| -> Result<Vec<(i32, String, i64, i64, i64, Option<f64>, Option<f64>)>> {
        let table = crate::catalog::cache::table(table_name.oid())?.ok_or_else(|| {
            ShardingError::new(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("\"{}\" is not distributed", table_name.name()))
        })?;
        let nodes = crate::catalog::cache::nodes()?;
        let mut out = Vec::new();
        for node in nodes.iter().filter(|n| n.is_active) {
            let shards: Vec<(i64, String)> = table
                .shards
                .iter()
                .filter(|s| s.placements.contains(&node.node_id))
                .map(|s| (s.shard_id, quote::qualified(&table.schema, &shard_object_name(&table.name, s.shard_id))))
                .collect();
            let figures = shard_figures(node, &shards)?;
            let (rows, bytes) = figures.iter().fold((0i64, 0i64), |(r, b), (_, rows, bytes)| (r + rows, b + bytes));
            out.push((node.node_id, format!("{}:{}", node.host, node.port), shards.len() as i64, rows, bytes, None, None));
        }
        let rows_cv = rebalance::coefficient_of_variation(&out.iter().map(|r| r.3 as f64).collect::<Vec<_>>());
        let bytes_cv = rebalance::coefficient_of_variation(&out.iter().map(|r| r.4 as f64).collect::<Vec<_>>());
        for row in out.iter_mut() {
            row.5 = rows_cv;
            row.6 = bytes_cv;
        }
        Ok(out)
    })()
    .or_raise();
    TableIterator::new(rows)
}

/// Shards of hash-distributed tables whose size, or load (reads plus writes this coordinator
/// routed to them since the last `reset_shard_stats`), is more than `threshold` times their
/// table's mean, with a suggestion: the split point (the median hash of the shard's rows,
/// asked from its node) and the node with the least data to move it to.
#[pg_extern(volatile, parallel_unsafe)]
fn hot_shards(
    threshold: default!(Option<f64>, "2.0"),
) -> TableIterator<
    'static,
    (
        name!(shard_id, i64),
        name!(table_name, String),
        name!(node_id, i32),
        name!(bytes, i64),
        name!(ratio_to_mean, f64),
        name!(load, i64),
        name!(load_ratio_to_mean, Option<f64>),
        name!(split_point, Option<i32>),
        name!(suggested_node, Option<i32>),
    ),
> {
    type Row = (i64, String, i32, i64, f64, i64, Option<f64>, Option<i32>, Option<i32>);
    let rows = (|| -> Result<Vec<Row>> {
        let threshold = threshold.unwrap_or(2.0);
        if !(threshold > 0.0) {
            return Err(ShardingError::new(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "threshold must be positive"));
        }
        // (shard, table oid, node, bytes, load) for every hash shard; the means per table.
        let sizes = Spi::connect(|client| -> Result<Vec<(i64, pg_sys::Oid, i32, i64, i64)>> {
            client
                .select(
                    "SELECT z.shard_id, s.logicalrelid::oid, z.node_id, coalesce(z.size_bytes, 0)::int8
                       FROM sharding.shard_sizes() z
                       JOIN sharding.dist_shard s ON s.shard_id = z.shard_id
                       JOIN sharding.dist_table t ON t.logicalrelid = s.logicalrelid
                      WHERE t.method = 'hash' ORDER BY z.shard_id",
                    None,
                    &[],
                )?
                .map(|row| {
                    let shard_id = row.get::<i64>(1)?.unwrap_or_default();
                    let (reads, writes) = crate::stats::counts(shard_id);
                    Ok((
                        shard_id,
                        row.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                        row.get::<i32>(3)?.unwrap_or_default(),
                        row.get::<i64>(4)?.unwrap_or_default(),
                        (reads + writes) as i64,
                    ))
                })
                .collect()
        })?;
        let mut per_table: std::collections::BTreeMap<u32, (i64, i64, i64)> = Default::default();
        let mut per_node: std::collections::BTreeMap<i32, i64> = Default::default();
        for (_, relid, node, bytes, load) in &sizes {
            let entry = per_table.entry(relid.to_u32()).or_default();
            entry.0 += bytes;
            entry.1 += load;
            entry.2 += 1;
            *per_node.entry(*node).or_default() += bytes;
        }
        let active: Vec<i32> = crate::catalog::cache::nodes()?.iter().filter(|n| n.is_active).map(|n| n.node_id).collect();
        let mut out = Vec::new();
        for (shard_id, relid, node_id, bytes, load) in sizes {
            let (total_bytes, total_load, count) = per_table[&relid.to_u32()];
            let mean_bytes = total_bytes as f64 / count.max(1) as f64;
            let mean_load = total_load as f64 / count.max(1) as f64;
            let size_hot = mean_bytes > 0.0 && bytes as f64 > threshold * mean_bytes;
            let load_hot = mean_load > 0.0 && load as f64 > threshold * mean_load;
            if !size_hot && !load_hot {
                continue;
            }
            let table = crate::catalog::cache::table(relid)?
                .ok_or_else(|| ShardingError::internal(format!("table {relid:?} vanished")))?;
            let split_point = median_hash(&table, shard_id, node_id)?;
            let suggested = active
                .iter()
                .filter(|n| **n != node_id)
                .min_by_key(|n| (per_node.get(*n).copied().unwrap_or(0), **n))
                .copied();
            out.push((
                shard_id,
                format!("{}.{}", table.schema, table.name),
                node_id,
                bytes,
                if mean_bytes > 0.0 { bytes as f64 / mean_bytes } else { 0.0 },
                load,
                (mean_load > 0.0).then(|| load as f64 / mean_load),
                split_point,
                suggested,
            ));
        }
        Ok(out)
    })()
    .or_raise();
    TableIterator::new(rows)
}

/// The median hash of a shard's rows (where a split would halve it), asked from its node, as a
/// valid split point of the shard's interval.
fn median_hash(table: &crate::catalog::tables::DistributedTable, shard_id: i64, node_id: i32) -> Result<Option<i32>> {
    let Some(column) = &table.distribution_column else { return Ok(None) };
    let Some(node) = crate::catalog::cache::nodes()?.iter().find(|n| n.node_id == node_id).cloned() else {
        return Ok(None);
    };
    let shard = quote::qualified(&table.schema, &shard_object_name(&table.name, shard_id));
    let connection = remote::for_statement(&node, remote::read_access())?;
    let rows = connection
        .exec(&format!(
            "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY sharding.hash_value({})) FROM {shard}",
            quote::ident(column)
        ))
        .map_err(|e| remote::remote_error(&node, e))?;
    let median: Option<i32> = rows.value(0, 0).and_then(|v| v.parse().ok());
    // A split point ends a piece, so it must leave the last value for the other piece.
    let interval = table.shards.iter().find(|s| s.shard_id == shard_id).and_then(|s| s.interval);
    Ok(match (median, interval) {
        (Some(point), Some(interval)) if interval.min < interval.max => Some(point.clamp(interval.min, interval.max - 1)),
        (_, Some(_)) => None,
        (point, None) => point,
    })
}

/// Bytes the shards of `shard_id`'s group take on node `node_id` (NULL when the node cannot be
/// asked): during a move, how much has reached the target.
#[pg_extern(volatile, parallel_unsafe, strict)]
fn bytes_on_node(shard_id: i64, node_id: i32) -> Option<i64> {
    let names = (|| -> Result<Vec<String>> {
        let group = shard_group(shard_id)?;
        group
            .shards
            .iter()
            .map(|member| {
                let table = crate::catalog::cache::table(member.relid)?
                    .ok_or_else(|| ShardingError::internal("a table of the group is not distributed"))?;
                Ok(quote::qualified(&table.schema, &shard_object_name(&table.name, member.shard_id)))
            })
            .collect()
    })()
    .ok()?;
    let node = crate::catalog::cache::nodes().ok()?.iter().find(|n| n.node_id == node_id).cloned()?;
    let connection = crate::connection::connect_to(&node).ok()?;
    let array = super::distribute::text_array(&names);
    let rows = connection
        .query(
            "SELECT coalesce(sum(pg_catalog.pg_total_relation_size(r)), 0)::int8
               FROM unnest($1::text[]) AS u(n), pg_catalog.to_regclass(u.n) AS r WHERE r IS NOT NULL",
            &[Some(&array)],
        )
        .ok()?;
    rows.value(0, 0).and_then(|v| v.parse().ok())
}
