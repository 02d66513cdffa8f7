//! Distributed tables, their shards and placements: catalog rows and the metadata the
//! routing code reads (through `cache::table`, never per statement through SPI).

use pgrx::prelude::*;
use sharding_core::interval::HashInterval;

use crate::error::{Result, ShardingError};
use crate::routing::DistKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Hash,
    Reference,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Hash => "hash",
            Method::Reference => "reference",
        }
    }

    fn parse(text: &str) -> Option<Method> {
        match text {
            "hash" => Some(Method::Hash),
            "reference" => Some(Method::Reference),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Shard {
    pub shard_id: i64,
    pub index: i32,
    /// `None` for a reference table's single shard.
    pub interval: Option<HashInterval>,
    /// Nodes holding an active placement, by node_id.
    pub placements: Vec<i32>,
}

#[derive(Debug, Clone)]
pub struct DistributedTable {
    pub relid: pg_sys::Oid,
    pub schema: String,
    pub name: String,
    pub method: Method,
    pub distribution_attnum: Option<i16>,
    pub distribution_column: Option<String>,
    pub distribution_type: pg_sys::Oid,
    pub distribution_kind: Option<DistKind>,
    pub colocation_id: Option<i32>,
    /// Sorted by hash interval (shard index).
    pub shards: Vec<Shard>,
    /// The transactions that wrote the catalog rows read (the table's, its shards', their
    /// active placements'), distinct: a transaction whose snapshot predates one of them
    /// would read shards its workers' snapshots do not show (`check_snapshot`).
    pub catalog_xmins: Vec<u32>,
}

impl DistributedTable {
    /// In a REPEATABLE READ or SERIALIZABLE transaction whose snapshot was taken before the
    /// table's shards or placements were last written (a shard moved or split, the table
    /// distributed), a serialization failure: the workers' snapshots of this transaction would
    /// not show the rows of the new placements, so reads would miss rows and writes lose them.
    pub fn check_snapshot(&self) -> Result<()> {
        // SAFETY: backend globals; the transaction snapshot is only read once it exists.
        unsafe {
            if pg_sys::XactIsoLevel < pg_sys::XACT_REPEATABLE_READ as i32 || !pg_sys::FirstSnapshotSet {
                return Ok(());
            }
            let snapshot = pg_sys::GetTransactionSnapshot();
            for &xmin in &self.catalog_xmins {
                let xid = pg_sys::TransactionId::from(xmin);
                if !pg_sys::TransactionIdIsCurrentTransactionId(xid) && pg_sys::XidInMVCCSnapshot(xid, snapshot) {
                    return Err(ShardingError::new(
                        PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                        format!("could not serialize access due to a concurrent change of the shards of \"{}\"", self.name),
                    )
                    .detail("A shard was moved or split, or the table distributed, after this transaction's snapshot was taken.")
                    .hint("Retry the transaction."));
                }
            }
        }
        Ok(())
    }

    /// The shard owning `hash` (hash-distributed tables only).
    pub fn shard_for_hash(&self, hash: i32) -> Option<&Shard> {
        // A binary search over the sorted shards themselves: this runs per row in COPY and
        // INSERT routing, so nothing is allocated.
        let index = self.shards.partition_point(|s| s.interval.is_some_and(|i| i.max < hash));
        self.shards.get(index).filter(|s| s.interval.is_some_and(|i| i.contains(hash)))
    }
}

/// Reads a table's metadata; `None` when it is not distributed.
pub fn load(relid: pg_sys::Oid) -> Result<Option<DistributedTable>> {
    Spi::connect(|client| {
        let mut rows = client.select(
            "SELECT t.method, t.distribution_attnum, a.attname::text, COALESCE(a.atttypid, 0::oid),
                    t.colocation_id, n.nspname::text, c.relname::text, t.xmin::text::bigint
               FROM sharding.dist_table t
               JOIN pg_catalog.pg_class c ON c.oid = t.logicalrelid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
               LEFT JOIN pg_catalog.pg_attribute a
                      ON a.attrelid = t.logicalrelid AND a.attnum = t.distribution_attnum
              WHERE t.logicalrelid = $1",
            Some(1),
            &[relid.into()],
        )?;
        let Some(row) = rows.next() else { return Ok(None) };
        let method_text = row.get::<String>(1)?.unwrap_or_default();
        let method = Method::parse(&method_text).ok_or_else(|| {
            ShardingError::internal(format!("unknown distribution method {method_text:?} in the catalog"))
        })?;
        let distribution_type = row.get::<pg_sys::Oid>(4)?.unwrap_or(pg_sys::InvalidOid);
        let mut table = DistributedTable {
            relid,
            schema: row.get::<String>(6)?.unwrap_or_default(),
            name: row.get::<String>(7)?.unwrap_or_default(),
            method,
            distribution_attnum: row.get::<i16>(2)?,
            distribution_column: row.get::<String>(3)?,
            distribution_type,
            distribution_kind: DistKind::of_type(distribution_type),
            colocation_id: row.get::<i32>(5)?,
            shards: Vec::new(),
            catalog_xmins: Vec::new(),
        };
        let mut xmins: Vec<i64> = row.get::<i64>(8)?.into_iter().collect();
        for row in client.select(
            "SELECT s.shard_id, s.shard_index, s.min_hash, s.max_hash,
                    ARRAY(SELECT p.node_id FROM sharding.dist_placement p
                           WHERE p.shard_id = s.shard_id AND p.state = 'active' ORDER BY p.node_id),
                    s.xmin::text::bigint,
                    ARRAY(SELECT p.xmin::text::bigint FROM sharding.dist_placement p
                           WHERE p.shard_id = s.shard_id AND p.state = 'active')
               FROM sharding.dist_shard s WHERE s.logicalrelid = $1 ORDER BY s.shard_index",
            None,
            &[relid.into()],
        )? {
            let interval = match (row.get::<i32>(3)?, row.get::<i32>(4)?) {
                (Some(min), Some(max)) => Some(HashInterval { min, max }),
                _ => None,
            };
            table.shards.push(Shard {
                shard_id: row.get::<i64>(1)?.unwrap_or_default(),
                index: row.get::<i32>(2)?.unwrap_or_default(),
                interval,
                placements: row.get::<Vec<i32>>(5)?.unwrap_or_default(),
            });
            xmins.extend(row.get::<i64>(6)?);
            xmins.extend(row.get::<Vec<i64>>(7)?.unwrap_or_default());
        }
        xmins.sort_unstable();
        xmins.dedup();
        table.catalog_xmins = xmins.into_iter().map(|x| x as u32).collect();
        Ok(Some(table))
    })
}

/// A new shard id (the sequence is the catalog's: taken with the catalog owner's rights).
pub fn next_shard_id() -> Result<i64> {
    crate::catalog::as_catalog_owner(|| {
        Spi::get_one::<i64>("SELECT nextval('sharding.dist_shard_id_seq')")?
            .ok_or_else(|| ShardingError::internal("nextval returned NULL"))
    })
}

pub fn new_colocation_group(shard_count: i32, distribution_type: Option<pg_sys::Oid>) -> Result<i32> {
    let id = Spi::connect_mut(|client| {
        client
            .update(
                "INSERT INTO sharding.dist_colocation (colocation_id, shard_count, distribution_type)
                 VALUES (nextval('sharding.dist_colocation_id_seq'), $1, $2::regtype)
                 RETURNING colocation_id",
                None,
                &[shard_count.into(), distribution_type.into()],
            )?
            .first()
            .get_one::<i32>()
    })?;
    id.ok_or_else(|| ShardingError::internal("INSERT into dist_colocation returned no id"))
}

/// A colocation group of hash tables with this shard count and column type, if any exists.
pub fn find_colocation_group(shard_count: i32, distribution_type: pg_sys::Oid) -> Result<Option<i32>> {
    Ok(super::read_one::<i32>(
        // A scalar subquery: one row even when there is no group (get_one errors on zero rows).
        "SELECT (SELECT g.colocation_id FROM sharding.dist_colocation g
                  WHERE g.shard_count = $1 AND g.distribution_type = $2::regtype AND g.replication_factor = 1
                    AND EXISTS (SELECT 1 FROM sharding.dist_table t WHERE t.colocation_id = g.colocation_id)
                  ORDER BY g.colocation_id LIMIT 1)",
        &[shard_count.into(), distribution_type.into()],
    )?)
}

/// Hash interval and placement nodes of each shard index in a colocation group (from any
/// member table). The intervals are the group's own: after a split they are not even.
pub fn colocation_layout(colocation_id: i32) -> Result<Vec<(HashInterval, Vec<i32>)>> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT s.min_hash, s.max_hash,
                    ARRAY(SELECT p.node_id FROM sharding.dist_placement p
                           WHERE p.shard_id = s.shard_id ORDER BY p.node_id)
               FROM sharding.dist_shard s
              WHERE s.logicalrelid = (SELECT t.logicalrelid FROM sharding.dist_table t
                                       WHERE t.colocation_id = $1 ORDER BY t.logicalrelid LIMIT 1)
              ORDER BY s.shard_index",
            None,
            &[colocation_id.into()],
        )?;
        rows.map(|row| {
            let interval = match (row.get::<i32>(1)?, row.get::<i32>(2)?) {
                (Some(min), Some(max)) => HashInterval { min, max },
                _ => return Err(ShardingError::internal(format!("colocation group {colocation_id} has a shard without a hash interval"))),
            };
            Ok((interval, row.get::<Vec<i32>>(3)?.unwrap_or_default()))
        })
        .collect()
    })
}

pub fn insert_table(
    relid: pg_sys::Oid,
    method: Method,
    distribution_attnum: Option<i16>,
    colocation_id: Option<i32>,
) -> Result<()> {
    Spi::run_with_args(
        "INSERT INTO sharding.dist_table (logicalrelid, method, distribution_attnum, colocation_id)
         VALUES ($1::regclass, $2, $3, $4)",
        &[relid.into(), method.as_str().into(), distribution_attnum.into(), colocation_id.into()],
    )?;
    invalidate_plans_of(relid);
    Ok(())
}

/// Cached plans of statements on `relid` (prepared statements, PL/pgSQL) were made for a table
/// of another kind: a relcache invalidation of the table makes PostgreSQL plan them again.
fn invalidate_plans_of(relid: pg_sys::Oid) {
    // SAFETY: queues an invalidation message for an existing relation.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relid) };
}

pub fn insert_shard(relid: pg_sys::Oid, shard: &Shard) -> Result<()> {
    Spi::run_with_args(
        "INSERT INTO sharding.dist_shard (shard_id, logicalrelid, shard_index, min_hash, max_hash)
         VALUES ($1, $2::regclass, $3, $4, $5)",
        &[
            shard.shard_id.into(),
            relid.into(),
            shard.index.into(),
            shard.interval.map(|i| i.min).into(),
            shard.interval.map(|i| i.max).into(),
        ],
    )?;
    for node_id in &shard.placements {
        Spi::run_with_args(
            "INSERT INTO sharding.dist_placement (placement_id, shard_id, node_id)
             VALUES (nextval('sharding.dist_placement_id_seq'), $1, $2)",
            &[shard.shard_id.into(), (*node_id).into()],
        )?;
    }
    Ok(())
}

pub fn insert_placement(shard_id: i64, node_id: i32) -> Result<()> {
    Spi::run_with_args(
        "INSERT INTO sharding.dist_placement (placement_id, shard_id, node_id)
         VALUES (nextval('sharding.dist_placement_id_seq'), $1, $2)",
        &[shard_id.into(), node_id.into()],
    )?;
    Ok(())
}

/// Every reference table, by relation oid.
pub fn reference_tables() -> Result<Vec<pg_sys::Oid>> {
    Spi::connect(|client| {
        client
            .select("SELECT logicalrelid::oid FROM sharding.dist_table WHERE method = 'reference' ORDER BY 1", None, &[])?
            .map(|row| Ok(row.get::<pg_sys::Oid>(1)?.unwrap_or(pg_sys::InvalidOid)))
            .collect()
    })
}

/// Removes a table from the catalog (shards and placements cascade), and its colocation group
/// when no other table uses it.
pub fn delete_table(relid: pg_sys::Oid, colocation_id: Option<i32>) -> Result<()> {
    Spi::run_with_args("DELETE FROM sharding.dist_table WHERE logicalrelid = $1::regclass", &[relid.into()])?;
    invalidate_plans_of(relid);
    if let Some(group) = colocation_id {
        Spi::run_with_args(
            "DELETE FROM sharding.dist_colocation g WHERE g.colocation_id = $1
               AND NOT EXISTS (SELECT 1 FROM sharding.dist_table t WHERE t.colocation_id = g.colocation_id)",
            &[group.into()],
        )?;
    }
    Ok(())
}
