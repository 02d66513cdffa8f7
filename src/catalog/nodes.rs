//! Rows of `sharding.dist_node` and the placement counts that guard node removal.
//! Reads and writes go through SPI; hot paths use `cache::nodes()` instead.

use pgrx::prelude::*;

use crate::error::Result;

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub node_id: i32,
    pub host: String,
    pub port: i32,
    pub region: Option<String>,
    pub is_active: bool,
    pub system_identifier: Option<i64>,
    /// This coordinator itself: statements for its placements run in the backend, in its own
    /// transaction (see connection/local.rs), never over a connection.
    pub is_coordinator: bool,
}

const NODE_COLUMNS: &str = "node_id, host, port, region, is_active, system_identifier, is_coordinator";

fn node_from_row(row: &pgrx::spi::SpiHeapTupleData<'_>) -> Result<Node> {
    Ok(Node {
        node_id: row.get::<i32>(1)?.unwrap_or_default(),
        host: row.get::<String>(2)?.unwrap_or_default(),
        port: row.get::<i32>(3)?.unwrap_or_default(),
        region: row.get::<String>(4)?,
        is_active: row.get::<bool>(5)?.unwrap_or(false),
        system_identifier: row.get::<i64>(6)?,
        is_coordinator: row.get::<bool>(7)?.unwrap_or(false),
    })
}

/// Every registered node, ordered by node_id.
pub fn load_all() -> Result<Vec<Node>> {
    Spi::connect(|client| {
        let query = format!("SELECT {NODE_COLUMNS} FROM sharding.dist_node ORDER BY node_id");
        client.select(query.as_str(), None, &[])?.map(|row| node_from_row(&row)).collect()
    })
}

pub fn find(host: &str, port: i32) -> Result<Option<Node>> {
    Spi::connect(|client| {
        let query =
            format!("SELECT {NODE_COLUMNS} FROM sharding.dist_node WHERE host = $1 AND port = $2");
        let mut rows = client.select(query.as_str(), Some(1), &[host.into(), port.into()])?;
        rows.next().map(|row| node_from_row(&row)).transpose()
    })
}

/// Serialises node changes: concurrent add_node/remove_node calls queue behind each other,
/// while readers of the catalog are not blocked.
pub fn lock_for_change() -> Result<()> {
    Spi::run("LOCK TABLE sharding.dist_node IN SHARE ROW EXCLUSIVE MODE")?;
    Ok(())
}

pub fn insert(
    host: &str,
    port: i32,
    region: Option<&str>,
    system_identifier: i64,
    is_coordinator: bool,
) -> Result<i32> {
    // No row limit here: with a limit, the executor stops at the first RETURNING row and the
    // AFTER STATEMENT trigger that invalidates every backend's cache never fires.
    let node_id = Spi::connect_mut(|client| {
        client
            .update(
                "INSERT INTO sharding.dist_node (node_id, host, port, region, system_identifier, is_coordinator)
                 VALUES (nextval('sharding.dist_node_id_seq'), $1, $2, $3, $4, $5)
                 RETURNING node_id",
                None,
                &[host.into(), port.into(), region.into(), system_identifier.into(), is_coordinator.into()],
            )?
            .first()
            .get_one::<i32>()
    })?;
    node_id.ok_or_else(|| crate::error::ShardingError::internal("INSERT into dist_node returned no id"))
}

pub fn delete(node_id: i32) -> Result<()> {
    Spi::run_with_args("DELETE FROM sharding.dist_node WHERE node_id = $1", &[node_id.into()])?;
    Ok(())
}

/// Number of placements of hash-distributed shards (in any state) recorded on a node.
pub fn placement_count(node_id: i32) -> Result<i64> {
    let count = super::read_one::<i64>(
        "SELECT count(*) FROM sharding.dist_placement p
           JOIN sharding.dist_shard s ON s.shard_id = p.shard_id
           JOIN sharding.dist_table t ON t.logicalrelid = s.logicalrelid
          WHERE p.node_id = $1 AND t.method <> 'reference'",
        &[node_id.into()],
    )?;
    Ok(count.unwrap_or(0))
}

/// Forgets a node's reference-table copies (dropping them on the node when it answers, inside
/// the distributed transaction; a node that is down keeps tables nobody refers to any more).
pub fn drop_reference_placements(node: &Node) -> Result<()> {
    let shards = Spi::connect(|client| -> Result<Vec<String>> {
        client
            .select(
                "SELECT n.nspname::text, c.relname::text, s.shard_id
                   FROM sharding.dist_placement p
                   JOIN sharding.dist_shard s ON s.shard_id = p.shard_id
                   JOIN sharding.dist_table t ON t.logicalrelid = s.logicalrelid
                   JOIN pg_catalog.pg_class c ON c.oid = t.logicalrelid
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  WHERE p.node_id = $1 AND t.method = 'reference'",
                None,
                &[node.node_id.into()],
            )?
            .map(|row| {
                let schema = row.get::<String>(1)?.unwrap_or_default();
                let table = row.get::<String>(2)?.unwrap_or_default();
                let shard_id = row.get::<i64>(3)?.unwrap_or_default();
                Ok(crate::deparse::quote::qualified(&schema, &sharding_core::table_def::shard_object_name(&table, shard_id)))
            })
            .collect()
    })?;
    if shards.is_empty() {
        return Ok(());
    }
    if let Ok(connection) = crate::transaction::remote::in_transaction(node) {
        connection
            .exec(&format!("DROP TABLE IF EXISTS {}", shards.join(", ")))
            .map_err(|e| crate::transaction::remote::remote_error(node, e))?;
    }
    crate::catalog::as_catalog_owner(|| {
        Spi::run_with_args(
            "DELETE FROM sharding.dist_placement p USING sharding.dist_shard s, sharding.dist_table t
              WHERE p.shard_id = s.shard_id AND t.logicalrelid = s.logicalrelid
                AND p.node_id = $1 AND t.method = 'reference'",
            &[node.node_id.into()],
        )?;
        Ok(())
    })
}
