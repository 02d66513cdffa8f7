//! Foreign keys on distributed and reference tables: the checks before a table is distributed
//! or a key is added (the rules live in crates/core/src/foreign_key.rs), and the keys'
//! creation on the shards.
//!
//! The coordinator's tables keep their keys too (its reference-table copies hold rows, so a
//! local table's key to a reference table is enforced there); each shard gets the key to the
//! shard of the referenced table on its own node: the co-located shard covering the same hash
//! values, the reference table's copy, or itself.

use pgrx::prelude::*;
pub use sharding_core::foreign_key::ForeignKey;
use sharding_core::foreign_key::{Kind, Problem};
use sharding_core::interval::HashInterval;

use crate::catalog::cache;
use crate::catalog::tables::Method;
use crate::deparse::{quote, table as table_ddl};
use crate::error::{Result, ShardingError};

/// The colocation a table about to start a new group checks its keys to itself with.
pub const NEW_GROUP: i32 = -1;

/// What `relid` is now.
pub fn kind_of(relid: pg_sys::Oid) -> Result<Kind> {
    Ok(match cache::table(relid)? {
        None => Kind::Local,
        Some(table) => match (table.method, table.distribution_attnum) {
            (Method::Hash, Some(attnum)) => Kind::Distributed { colocation: table.colocation_id, distribution_attnum: attnum },
            _ => Kind::Reference,
        },
    })
}

fn display_of(relid: pg_sys::Oid) -> Result<String> {
    Ok(crate::catalog::read_one::<String>("SELECT $1::regclass::text", &[relid.into()])?.unwrap_or_default())
}

fn refusal(display: &str, key: &ForeignKey, problem: Problem) -> ShardingError {
    let referenced = quote::qualified(&key.referenced_schema, &key.referenced_name);
    let message = |why: String| {
        ShardingError::new(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("foreign key \"{}\" of {display} cannot be enforced on the shards: {why}", key.name),
        )
    };
    match problem {
        Problem::ReferencesLocal => message(format!("the referenced table {referenced} is a local table"))
            .hint(format!("Distribute {referenced} first (create_reference_table, or create_distributed_table co-located with {display}).")),
        Problem::LocalToDistributed => ShardingError::new(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("foreign key \"{}\" of {display} would make a local table reference the distributed table {referenced}", key.name),
        )
        .detail("The coordinator does not hold the rows of a distributed table.")
        .hint("Drop the foreign key first."),
        Problem::ReferenceToDistributed => message(format!("a reference table cannot reference the distributed table {referenced}"))
            .detail("Each node's copy of the reference table would reference rows other nodes hold."),
        Problem::NotColocated => message(format!("{display} and {referenced} are not co-located"))
            .hint(format!("Distribute {display} with colocate_with => '{referenced}'.")),
        Problem::NotOnDistributionColumns => message(format!(
            "the key must pair the distribution column of {display} with the distribution column of {referenced}"
        ))
        .detail("A row and the row it references must hash to the same shard group."),
        Problem::ChangesDistributionColumn(action) => {
            message(format!("{action} would change the distribution column of {display}"))
                .detail("A row whose distribution column changes would stay in a shard its new value does not hash to.")
        }
    }
}

/// Checks the keys `relid` holds, as if it were `kind` (the keys of a table to itself included).
pub fn check_keys(relid: pg_sys::Oid, kind: Kind, keys: &[ForeignKey]) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let display = display_of(relid)?;
    for key in keys {
        let referenced_relid = pg_sys::Oid::from(key.referenced_relid);
        let referenced = if referenced_relid == relid { kind } else { kind_of(referenced_relid)? };
        key.check(kind, referenced).map_err(|problem| refusal(&display, key, problem))?;
    }
    Ok(())
}

/// Checks the keys of other tables to `relid` before it becomes `kind`. Returns true when a
/// local table references it: its rows must then leave the coordinator's table with DELETE
/// (TRUNCATE refuses a referenced table).
pub fn check_referencing(relid: pg_sys::Oid, kind: Kind) -> Result<bool> {
    let mut local = false;
    let referencing = table_ddl::referencing_tables(relid)?;
    let display = if referencing.is_empty() { String::new() } else { display_of(relid)? };
    for (other, key) in referencing {
        let other_display = display_of(other)?;
        match (kind_of(other)?, kind) {
            // The coordinator's copy of a reference table keeps its rows: the key holds there.
            (Kind::Local, Kind::Reference) => {}
            (Kind::Local, _) => {
                let rows = crate::catalog::read_one::<bool>(
                    &format!("SELECT EXISTS (SELECT 1 FROM ONLY {other_display})"),
                    &[],
                )?
                .unwrap_or(false);
                if rows {
                    return Err(ShardingError::new(
                        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                        format!("cannot distribute {display}: the local table {other_display} references it (foreign key \"{key}\") and has rows"),
                    )
                    .detail("The rows of a distributed table leave the coordinator; the local rows would reference nothing.")
                    .hint(format!(
                        "Distribute {display} while {other_display} is empty and distribute {other_display} right after, or drop the foreign key, distribute both tables and add it again."
                    )));
                }
                local = true;
            }
            _ => {
                return Err(ShardingError::new(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    format!("cannot distribute {display}: the table {other_display} references it (foreign key \"{key}\")"),
                ))
            }
        }
    }
    Ok(local)
}

/// A shard being created together with others (whose ids the catalog does not hold yet).
#[derive(Clone, Copy)]
pub struct NewShard {
    pub relid: pg_sys::Oid,
    pub shard_id: i64,
    pub interval: Option<HashInterval>,
}

fn referenced_shard(relid: pg_sys::Oid, key: &ForeignKey, shard: &NewShard, siblings: &[NewShard]) -> Result<i64> {
    let target = pg_sys::Oid::from(key.referenced_relid);
    if target == relid {
        return Ok(shard.shard_id);
    }
    if let Some(sibling) = siblings.iter().find(|s| s.relid == target && s.interval == shard.interval) {
        return Ok(sibling.shard_id);
    }
    let table = cache::table(target)?.ok_or_else(|| {
        ShardingError::internal(format!("the table referenced by foreign key \"{}\" is not distributed", key.name))
    })?;
    if table.method == Method::Reference {
        return Ok(table.shards[0].shard_id);
    }
    table.shards.iter().find(|s| s.interval == shard.interval).map(|s| s.shard_id).ok_or_else(|| {
        ShardingError::internal(format!(
            "no shard of {} covers the hash values of shard {} (foreign key \"{}\")",
            table.name, shard.shard_id, key.name
        ))
    })
}

/// The statements creating `keys` (keys of `relid`, defined as `definition`) on each of
/// `shards` (shards of `relid`).
pub fn shard_statements(
    relid: pg_sys::Oid,
    definition: &table_ddl::TableDefinition,
    keys: &[ForeignKey],
    shards: &[NewShard],
    siblings: &[NewShard],
) -> Result<Vec<String>> {
    let mut statements = Vec::new();
    for shard in shards {
        for key in keys {
            let referenced = referenced_shard(relid, key, shard, siblings)?;
            statements.push(key.shard_sql(
                &definition.shard_name(shard.shard_id, &quote::ident),
                &quote::qualified(&key.referenced_schema, &table_ddl::shard_object_name(&key.referenced_name, referenced)),
                &quote::ident,
            ));
        }
    }
    Ok(statements)
}

/// The statements creating every key of the given shards (each of its own table), with the
/// shards themselves as the siblings: a co-located group being moved or split.
pub fn group_statements(shards: &[NewShard]) -> Result<Vec<String>> {
    let mut statements = Vec::new();
    let mut relids: Vec<pg_sys::Oid> = shards.iter().map(|s| s.relid).collect();
    relids.sort_by_key(|r| r.to_u32());
    relids.dedup();
    for relid in relids {
        let keys = table_ddl::foreign_keys(relid)?;
        if keys.is_empty() {
            continue;
        }
        let own: Vec<NewShard> = shards.iter().filter(|s| s.relid == relid).copied().collect();
        statements.extend(shard_statements(relid, &table_ddl::read(relid)?, &keys, &own, shards)?);
    }
    Ok(statements)
}

/// Existing shards ((shard id, table) each) with their hash intervals.
pub fn existing(shards: &[(i64, pg_sys::Oid)]) -> Result<Vec<NewShard>> {
    shards
        .iter()
        .map(|(shard_id, relid)| {
            let table = cache::table(*relid)?.ok_or_else(|| ShardingError::internal("a table of the group is not distributed"))?;
            let interval = table.shards.iter().find(|s| s.shard_id == *shard_id).and_then(|s| s.interval);
            Ok(NewShard { relid: *relid, shard_id: *shard_id, interval })
        })
        .collect()
}
