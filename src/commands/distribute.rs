//! create_distributed_table, create_reference_table, undistribute_table, shard_for_value.
//!
//! Every check runs before anything is created. Shards are created on the workers inside the
//! distributed transaction, so a failure at any point rolls back every node: no orphaned shard
//! tables, no catalog rows.

use std::collections::BTreeMap;

use pgrx::prelude::*;
use pgrx::PgRelation;
use sharding_core::copy_text;
use sharding_core::interval::{split_hash_space, HashInterval};

use super::foreign_keys::{self, NewShard};
use super::required;
use crate::connection::RemoteRows;
use sharding_core::foreign_key::Kind;
use crate::catalog::tables::{self, DistributedTable, Method, Shard};
use crate::catalog::{self, cache};
use crate::catalog::nodes::Node;
use crate::copy::shard_writer::ShardWriter;
use crate::deparse::quote;
use crate::deparse::table::{self as table_ddl, shard_object_name, TableDefinition};
use crate::error::{OrRaise, Result, ShardingError};
use crate::routing::{self, DistKind};
use crate::transaction::remote;

/// Rows fetched from the local table per round when moving existing rows into shards.
const MOVE_BATCH_ROWS: i64 = 1000;

struct LocalTable {
    display: String,
}

fn check_local_table(relid: pg_sys::Oid) -> Result<LocalTable> {
    let row = Spi::connect(|client| -> Result<Option<(String, String, String, bool, bool, String)>> {
        let mut rows = client.select(
            "SELECT c.relkind::text, c.relpersistence::text, c.oid::regclass::text, c.relispartition OR c.relrowsecurity,
                    c.relhassubclass OR EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i WHERE i.inhrelid = c.oid),
                    COALESCE((SELECT string_agg(t.tgname::text, ', ') FROM pg_catalog.pg_trigger t
                               WHERE t.tgrelid = c.oid AND NOT t.tgisinternal), '')
               FROM pg_catalog.pg_class c WHERE c.oid = $1",
            Some(1),
            &[relid.into()],
        )?;
        Ok(match rows.next() {
            None => None,
            Some(row) => Some((
                row.get::<String>(1)?.unwrap_or_default(),
                row.get::<String>(2)?.unwrap_or_default(),
                row.get::<String>(3)?.unwrap_or_default(),
                row.get::<bool>(4)?.unwrap_or(false),
                row.get::<bool>(5)?.unwrap_or(false),
                row.get::<String>(6)?.unwrap_or_default(),
            )),
        })
    })?;
    let Some((relkind, persistence, display, is_partition, inherits, triggers)) = row else {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            format!("relation with OID {} does not exist", relid.to_u32()),
        ));
    };
    use PgSqlErrorCode::*;
    let unsupported = |what: &str| {
        ShardingError::new(ERRCODE_FEATURE_NOT_SUPPORTED, format!("cannot distribute {display}: {what}"))
    };
    if relkind == "p" || is_partition {
        return Err(unsupported("partitioned tables, partitions and tables with row-level security are not supported yet"));
    }
    if relkind != "r" {
        return Err(ShardingError::new(ERRCODE_WRONG_OBJECT_TYPE, format!("{display} is not a table")));
    }
    if persistence == "t" {
        return Err(unsupported("temporary tables exist only in this session"));
    }
    if persistence == "u" {
        return Err(unsupported("unlogged tables are not supported yet"));
    }
    if inherits {
        return Err(unsupported("tables with inheritance parents or children are not supported"));
    }
    if !triggers.is_empty() {
        return Err(unsupported("triggers would not fire on rows stored in shards")
            .detail(format!("triggers: {triggers}"))
            .hint("Drop the triggers first."));
    }
    // SAFETY: plain catalog check of the current user against the table's owner.
    if !unsafe { pg_sys::pg_class_ownercheck(relid, pg_sys::GetUserId()) } {
        return Err(ShardingError::new(
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("must be owner of table {display}"),
        ));
    }
    if cache::table(relid)?.is_some() {
        return Err(ShardingError::new(
            ERRCODE_DUPLICATE_OBJECT,
            format!("table {display} is already distributed"),
        )
        .hint("undistribute_table() turns it back into a local table."));
    }
    Ok(LocalTable { display })
}

/// Checks that the definition can be recreated on the workers and that unique constraints
/// can be enforced per shard.
fn check_definition(table: &LocalTable, definition: &TableDefinition, distribution_attnum: Option<i16>) -> Result<()> {
    use PgSqlErrorCode::*;
    let display = &table.display;
    super::types::check(definition, display)?;
    let Some(attnum) = distribution_attnum else { return Ok(()) };
    let column_name = definition
        .columns
        .iter()
        .find(|c| c.attnum == attnum)
        .map(|c| c.name.clone())
        .unwrap_or_default();
    for constraint in &definition.constraints {
        match constraint.kind {
            'p' | 'u' if !constraint.columns.contains(&attnum) => {
                return Err(ShardingError::new(
                    ERRCODE_FEATURE_NOT_SUPPORTED,
                    format!(
                        "cannot distribute {display}: constraint \"{}\" does not include the distribution column \"{column_name}\"",
                        constraint.name
                    ),
                )
                .hint("A unique constraint on a distributed table must include the distribution column (it is enforced within each shard); global unique indexes come in a later release."));
            }
            'x' => {
                return Err(ShardingError::new(
                    ERRCODE_FEATURE_NOT_SUPPORTED,
                    format!("cannot distribute {display}: exclusion constraint \"{}\" is not supported", constraint.name),
                ))
            }
            _ => {}
        }
    }
    for index in &definition.indexes {
        if index.unique && !index.columns[..index.key_count.min(index.columns.len())].contains(&attnum) {
            return Err(ShardingError::new(
                ERRCODE_FEATURE_NOT_SUPPORTED,
                format!(
                    "cannot distribute {display}: unique index \"{}\" does not include the distribution column \"{column_name}\"",
                    index.name
                ),
            )
            .hint("A unique index on a distributed table must include the distribution column."));
        }
    }
    Ok(())
}

fn active_nodes() -> Result<Vec<Node>> {
    let nodes: Vec<Node> = cache::nodes()?.iter().filter(|n| n.is_active).cloned().collect();
    if nodes.is_empty() {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "there are no active worker nodes",
        )
        .hint("Add workers with sharding.add_node(host, port)."));
    }
    Ok(nodes)
}

fn node_by_id(nodes: &[Node], node_id: i32) -> Result<&Node> {
    nodes.iter().find(|n| n.node_id == node_id).ok_or_else(|| {
        ShardingError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("node {node_id} of the colocation group is not an active node"),
        )
    })
}

/// `CREATE SCHEMA IF NOT EXISTS` for the (quoted) `schema`, and its grants, where the node,
/// asked through `run`, lacks it: the statement needs CREATE on the database even when the schema exists, a right
/// a table's owner seldom has.
pub(super) fn schema_statement(schema: &str, run: &dyn Fn(&str) -> Result<RemoteRows>) -> Result<Vec<String>> {
    let found = run(&format!("SELECT 1 WHERE pg_catalog.to_regnamespace({}) IS NOT NULL", quote::literal(schema)))?;
    if !found.rows.is_empty() {
        return Ok(Vec::new());
    }
    // With the coordinator's owner (when a superuser creates it) and grants (USAGE, for the
    // roles that read the shards).
    let mut statements = vec![format!("CREATE SCHEMA IF NOT EXISTS {schema}")];
    statements.extend(super::grants::schema_owner_statement(schema)?);
    statements.extend(super::grants::schema_grant_statements(schema)?);
    Ok(statements)
}

/// Creates every shard on its placement nodes: one round trip per node.
fn create_shards_on_workers(definition: &TableDefinition, shards: &[Shard], nodes: &[Node]) -> Result<()> {
    let mut per_node: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for shard in shards {
        for node_id in &shard.placements {
            per_node.entry(*node_id).or_default().extend(definition.shard_ddl(shard.shard_id, &quote::ident));
        }
    }
    for (node_id, statements) in per_node {
        let node = node_by_id(nodes, node_id)?;
        super::types::ensure_on(definition, node)?;
        let mut sql = schema_statement(&quote::ident(&definition.schema), &|sql| remote::execute(node, sql))?;
        sql.extend(statements);
        remote::execute(node, &sql.join("; "))?;
    }
    Ok(())
}

/// Creates the foreign keys `keys` of `relid` on its new shards (after their rows are in, so
/// each key is checked once over the whole shard).
fn create_keys_on_shards(
    relid: pg_sys::Oid,
    definition: &TableDefinition,
    keys: &[foreign_keys::ForeignKey],
    shards: &[Shard],
    nodes: &[Node],
) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut per_node: BTreeMap<i32, Vec<NewShard>> = BTreeMap::new();
    for shard in shards {
        for node_id in &shard.placements {
            per_node.entry(*node_id).or_default().push(NewShard { relid, shard_id: shard.shard_id, interval: shard.interval });
        }
    }
    for (node_id, shards) in per_node {
        let statements = foreign_keys::shard_statements(relid, definition, keys, &shards, &[])?;
        remote::execute(node_by_id(nodes, node_id)?, &statements.join("; "))?;
    }
    Ok(())
}

pub(super) fn lock_table(relid: pg_sys::Oid, mode: &str) -> Result<()> {
    let name = catalog::read_one::<String>("SELECT $1::regclass::text", &[relid.into()])?
        .unwrap_or_default();
    // `name` is regclass output: already quoted and qualified as needed.
    Spi::run(&format!("LOCK TABLE {name} IN {mode} MODE"))?;
    Ok(())
}

/// Moves (or, for reference tables, copies) the local rows into the shards, in batches.
/// Returns the number of rows sent.
fn send_local_rows(
    definition: &TableDefinition,
    shards: &[Shard],
    distribution_attnum: Option<i16>,
    routing_table: Option<&DistributedTable>,
) -> Result<u64> {
    let columns: Vec<&table_ddl::Column> =
        definition.columns.iter().filter(|c| c.generated_sql.is_none()).collect();
    let column_names: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
    let targets: Vec<(i64, String, Vec<i32>)> = shards
        .iter()
        .map(|s| {
            (s.shard_id, quote::qualified(&definition.schema, &shard_object_name(&definition.name, s.shard_id)), s.placements.clone())
        })
        .collect();
    let mut writer = ShardWriter::new(&targets, &column_names)?;
    let hash_sql = match distribution_attnum {
        Some(attnum) => {
            let column = definition.columns.iter().find(|c| c.attnum == attnum).map(|c| c.name.clone()).unwrap_or_default();
            format!("sharding.hash_value({})", quote::ident(&column))
        }
        None => "NULL::int4".to_string(),
    };
    let select_list: Vec<String> = columns.iter().map(|c| format!("{}::text", quote::ident(&c.name))).collect();
    let query = format!(
        "SELECT {hash_sql}, {} FROM ONLY {}",
        select_list.join(", "),
        quote::qualified(&definition.schema, &definition.name)
    );
    let distribution_name = distribution_attnum
        .and_then(|a| definition.columns.iter().find(|c| c.attnum == a))
        .map(|c| c.name.clone());

    let mut row_bytes = Vec::with_capacity(256);
    Spi::connect(|client| -> Result<()> {
        let mut cursor = client.open_cursor(query.as_str(), &[]);
        loop {
            let batch = cursor.fetch(MOVE_BATCH_ROWS)?;
            if batch.is_empty() {
                break;
            }
            for row in batch {
                row_bytes.clear();
                let mut values: Vec<Option<String>> = Vec::with_capacity(columns.len());
                for i in 0..columns.len() {
                    values.push(row.get::<String>(i + 2)?);
                }
                copy_text::push_row(&mut row_bytes, values.iter().map(|v| v.as_deref().map(str::as_bytes)));
                match routing_table {
                    Some(table) => {
                        let hash = row.get::<i32>(1)?.ok_or_else(|| {
                            ShardingError::new(
                                PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
                                format!(
                                    "cannot distribute a row with NULL in the distribution column \"{}\"",
                                    distribution_name.clone().unwrap_or_default()
                                ),
                            )
                        })?;
                        let shard = table.shard_for_hash(hash).ok_or_else(|| {
                            ShardingError::internal(format!("no shard owns hash value {hash}"))
                        })?;
                        writer.push(shard.shard_id, &row_bytes)?;
                    }
                    None => {
                        for shard in shards {
                            writer.push(shard.shard_id, &row_bytes)?;
                        }
                    }
                }
            }
        }
        Ok(())
    })?;
    writer.finish()
}

pub(super) struct DistributeRequest<'a> {
    relid: pg_sys::Oid,
    column: &'a str,
    method: &'a str,
    colocate_with: &'a str,
    shard_count: Option<i32>,
}

pub(super) fn create_distributed_table_impl(request: DistributeRequest<'_>) -> Result<()> {
    use PgSqlErrorCode::*;
    let method = request.method.trim().to_lowercase();
    if method != "hash" {
        return Err(ShardingError::new(
            ERRCODE_INVALID_PARAMETER_VALUE,
            format!("distribution_type '{}' is not supported", request.method),
        )
        .hint("Use 'hash' (the default); range and list distribution come later."));
    }
    lock_table(request.relid, "EXCLUSIVE")?;
    let table = check_local_table(request.relid)?;

    let column = Spi::connect(|client| -> Result<Option<(i16, pg_sys::Oid, String, bool, Option<String>)>> {
        let mut rows = client.select(
            "SELECT attnum, atttypid, pg_catalog.format_type(atttypid, atttypmod), attgenerated <> '',
                    (SELECT pg_catalog.quote_ident(collname) FROM pg_catalog.pg_collation
                      WHERE oid = attcollation AND NOT collisdeterministic)
               FROM pg_catalog.pg_attribute
              WHERE attrelid = $1 AND attname = $2 AND attnum > 0 AND NOT attisdropped",
            Some(1),
            &[request.relid.into(), request.column.into()],
        )?;
        Ok(match rows.next() {
            None => None,
            Some(row) => Some((
                row.get::<i16>(1)?.unwrap_or_default(),
                row.get::<pg_sys::Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                row.get::<String>(3)?.unwrap_or_default(),
                row.get::<bool>(4)?.unwrap_or(false),
                row.get::<String>(5)?,
            )),
        })
    })?;
    let Some((attnum, type_oid, type_name, generated, nondeterministic)) = column else {
        return Err(ShardingError::new(
            ERRCODE_UNDEFINED_COLUMN,
            format!("column \"{}\" of relation {} does not exist", request.column, table.display),
        ));
    };
    if generated {
        return Err(ShardingError::new(
            ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("the distribution column \"{}\" cannot be a generated column", request.column),
        ));
    }
    if DistKind::of_type(type_oid).is_none() {
        return Err(routing::unsupported_type(request.column, &type_name));
    }
    // Values equal under the collation (`'ABC'` and `'abc'` when it ignores case) would hash
    // to different shards: a lookup by one would miss rows stored under the other.
    if let Some(collation) = nondeterministic {
        return Err(ShardingError::new(
            ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("the distribution column \"{}\" has the nondeterministic collation {collation}", request.column),
        )
        .detail("Rows are placed by a hash of the value's bytes; values the collation treats as equal may differ in their bytes.")
        .hint("Distribute by a column with a deterministic collation (lower(value) in a column of its own, say)."));
    }
    if let Some(count) = request.shard_count {
        if !(1..=64000).contains(&count) {
            return Err(ShardingError::new(
                ERRCODE_INVALID_PARAMETER_VALUE,
                format!("shard_count must be between 1 and 64000, got {count}"),
            ));
        }
    }
    let definition = table_ddl::read(request.relid)?;
    check_definition(&table, &definition, Some(attnum))?;
    let nodes = active_nodes()?;

    // Colocation: an existing group fixes the shard count and where each shard index lives.
    catalog::as_catalog_owner(|| Ok(Spi::run("LOCK TABLE sharding.dist_colocation IN SHARE ROW EXCLUSIVE MODE")?))?;
    let colocate_with = request.colocate_with.trim();
    let keys = table_ddl::foreign_keys(request.relid)?;
    // A key to another distributed table needs its colocation group: 'default' takes it.
    let implied = keys
        .iter()
        .map(|k| pg_sys::Oid::from(k.referenced_relid))
        .filter(|r| *r != request.relid)
        .find(|r| matches!(foreign_keys::kind_of(*r), Ok(Kind::Distributed { .. })));
    let (group, shard_count) = match (colocate_with.to_lowercase().as_str(), implied) {
        ("none", _) => (None, request.shard_count.unwrap_or(crate::guc::SHARD_COUNT.get())),
        ("default", None) => {
            let count = request.shard_count.unwrap_or(crate::guc::SHARD_COUNT.get());
            (tables::find_colocation_group(count, type_oid)?, count)
        }
        (named, implied) => {
            let other_relid = match implied.filter(|_| named == "default") {
                Some(relid) => relid,
                None => catalog::read_one::<pg_sys::Oid>("SELECT pg_catalog.to_regclass($1)::oid", &[colocate_with.into()])?
                    .ok_or_else(|| {
                        ShardingError::new(ERRCODE_UNDEFINED_TABLE, format!("relation \"{colocate_with}\" does not exist"))
                            .hint("colocate_with takes a distributed table's name, 'default' or 'none'.")
                    })?,
            };
            let colocate_with = catalog::read_one::<String>("SELECT $1::regclass::text", &[other_relid.into()])?.unwrap_or_default();
            let colocate_with = colocate_with.as_str();
            let other = cache::table(other_relid)?
                .filter(|t| t.method == Method::Hash)
                .ok_or_else(|| {
                    ShardingError::new(
                        ERRCODE_INVALID_PARAMETER_VALUE,
                        format!("cannot colocate with {colocate_with}: it is not a hash-distributed table"),
                    )
                })?;
            if other.distribution_type != type_oid {
                let other_type = catalog::read_one::<String>(
                    "SELECT pg_catalog.format_type($1, NULL)",
                    &[other.distribution_type.into()],
                )?
                .unwrap_or_default();
                return Err(ShardingError::new(
                    ERRCODE_DATATYPE_MISMATCH,
                    format!(
                        "cannot colocate {} with {colocate_with}: distribution column types differ ({type_name} vs {other_type})",
                        table.display
                    ),
                ));
            }
            let count = other.shards.len() as i32;
            if let Some(requested) = request.shard_count {
                if requested != count {
                    return Err(ShardingError::new(
                        ERRCODE_INVALID_PARAMETER_VALUE,
                        format!("cannot colocate with {colocate_with}: it has {count} shards, not {requested}"),
                    ));
                }
            }
            (other.colocation_id, count)
        }
    };

    let kind = Kind::Distributed { colocation: Some(group.unwrap_or(foreign_keys::NEW_GROUP)), distribution_attnum: attnum };
    foreign_keys::check_keys(request.relid, kind, &keys)?;
    let referenced_locally = foreign_keys::check_referencing(request.relid, kind)?;

    // A new group splits the hash space evenly; a member of an existing group gets its
    // intervals (uneven after a split) and placements.
    let layout: Vec<(HashInterval, Vec<i32>)> = match group {
        Some(group) => tables::colocation_layout(group)?,
        None => split_hash_space(shard_count as u32)
            .map_err(|e| ShardingError::new(ERRCODE_INVALID_PARAMETER_VALUE, e.to_string()))?
            .into_iter()
            .enumerate()
            .map(|(i, interval)| (interval, vec![nodes[i % nodes.len()].node_id]))
            .collect(),
    };
    if layout.len() != shard_count as usize {
        return Err(ShardingError::internal(format!(
            "colocation group has {} shards, expected {shard_count}",
            layout.len(),
        )));
    }
    let mut shards = Vec::with_capacity(layout.len());
    for (index, (interval, placements)) in layout.into_iter().enumerate() {
        shards.push(Shard {
            shard_id: tables::next_shard_id()?,
            index: index as i32,
            interval: Some(interval),
            placements,
        });
    }

    create_shards_on_workers(&definition, &shards, &nodes)?;
    let routing_table = DistributedTable {
        relid: request.relid,
        schema: definition.schema.clone(),
        name: definition.name.clone(),
        method: Method::Hash,
        distribution_attnum: Some(attnum),
        distribution_column: Some(request.column.to_string()),
        distribution_type: type_oid,
        distribution_kind: DistKind::of_type(type_oid),
        colocation_id: group,
        shards: shards.clone(),
        catalog_xmins: Vec::new(),
    };
    super::grants::sync_new_shards(&routing_table)?;
    send_local_rows(&definition, &shards, Some(attnum), Some(&routing_table))?;
    create_keys_on_shards(request.relid, &definition, &keys, &shards, &nodes)?;
    // Rows now live in the shards; the coordinator's table stays as the empty shell queries name.
    // (An empty local table referencing it keeps its key: TRUNCATE would refuse.)
    let emptying = if referenced_locally { "DELETE FROM ONLY" } else { "TRUNCATE ONLY" };
    Spi::run(&format!("{emptying} {}", quote::qualified(&definition.schema, &definition.name)))?;

    catalog::as_catalog_owner(|| {
        let group = match group {
            Some(group) => group,
            None => tables::new_colocation_group(shard_count, Some(type_oid))?,
        };
        tables::insert_table(request.relid, Method::Hash, Some(attnum), Some(group))?;
        for shard in &shards {
            tables::insert_shard(request.relid, shard)?;
        }
        Ok(())
    })
}


pub(super) fn create_reference_table_impl(relid: pg_sys::Oid) -> Result<()> {
    lock_table(relid, "EXCLUSIVE")?;
    let table = check_local_table(relid)?;
    let definition = table_ddl::read(relid)?;
    check_definition(&table, &definition, None)?;
    let keys = table_ddl::foreign_keys(relid)?;
    foreign_keys::check_keys(relid, Kind::Reference, &keys)?;
    foreign_keys::check_referencing(relid, Kind::Reference)?;
    let nodes = active_nodes()?;
    let shard = Shard {
        shard_id: tables::next_shard_id()?,
        index: 0,
        interval: None,
        placements: nodes.iter().map(|n| n.node_id).collect(),
    };
    let shards = vec![shard];
    create_shards_on_workers(&definition, &shards, &nodes)?;
    super::grants::sync_new_shards(
        &DistributedTable {
            relid,
            schema: definition.schema.clone(),
            name: definition.name.clone(),
            method: Method::Reference,
            distribution_attnum: None,
            distribution_column: None,
            distribution_type: pg_sys::InvalidOid,
            distribution_kind: None,
            colocation_id: None,
            shards: shards.clone(),
            catalog_xmins: Vec::new(),
        },
    )?;
    // The coordinator's own table keeps its rows: it is the coordinator's placement.
    send_local_rows(&definition, &shards, None, None)?;
    create_keys_on_shards(relid, &definition, &keys, &shards, &nodes)?;
    catalog::as_catalog_owner(|| {
        tables::insert_table(relid, Method::Reference, None, None)?;
        tables::insert_shard(relid, &shards[0])
    })
}



/// The Citus-compatible entry points live in pg_catalog, so they are callable unqualified
/// whatever the search_path.
#[pg_schema]
mod pg_catalog {
    use super::*;

    /// Distributes a table by hash of `distribution_column` into shards on the worker nodes.
    /// Existing rows are moved into the shards; the local table is left empty.
    #[pg_extern(volatile, parallel_unsafe)]
    fn create_distributed_table(
        table_name: Option<PgRelation>,
        distribution_column: Option<&str>,
        distribution_type: default!(Option<&str>, "'hash'"),
        colocate_with: default!(Option<&str>, "'default'"),
        shard_count: default!(Option<i32>, "NULL"),
    ) {
        (|| {
            // Take the oid and close the relation: TRUNCATE refuses a table this session has open.
            let relid = required(table_name, "table_name")?.oid();
            super::create_distributed_table_impl(DistributeRequest {
                relid,
                column: required(distribution_column, "distribution_column")?,
                method: required(distribution_type, "distribution_type")?,
                colocate_with: colocate_with.unwrap_or("default"),
                shard_count,
            })
        })()
        .or_raise()
    }

    /// Makes a table a reference table: one shard, a copy on every node (the coordinator's copy
    /// is the local table itself).
    #[pg_extern(volatile, parallel_unsafe)]
    fn create_reference_table(table_name: Option<PgRelation>) {
        (|| {
            let relid = required(table_name, "table_name")?.oid();
            create_reference_table_impl(relid)
        })()
        .or_raise()
    }

    /// Turns a distributed or reference table back into a local table holding every row.
    #[pg_extern(volatile, parallel_unsafe)]
    fn undistribute_table(table_name: Option<PgRelation>) {
        (|| {
            let relid = required(table_name, "table_name")?.oid();
            undistribute_table_impl(relid)
        })()
        .or_raise()
    }
}

/// Gives a node that just joined a copy of every reference table, filled from the
/// coordinator's own copy, inside the distributed transaction of the add_node call.
pub fn replicate_reference_tables_to(node: &Node) -> Result<()> {
    let mut copied = Vec::new();
    for relid in tables::reference_tables()? {
        let Some(table) = cache::table(relid)? else { continue };
        let shard = &table.shards[0];
        if shard.placements.contains(&node.node_id) {
            continue;
        }
        let definition = table_ddl::read(relid)?;
        super::types::ensure_on(&definition, node)?;
        let shard_name = definition.shard_name(shard.shard_id, &quote::ident);
        // A table of that name is never dropped: it may be the user's own (on the coordinator
        // added as a node, say).
        let found = remote::execute(node, &format!("SELECT 1 WHERE pg_catalog.to_regclass({}) IS NOT NULL", quote::literal(&shard_name)))?;
        if !found.rows.is_empty() {
            return Err(ShardingError::new(
                PgSqlErrorCode::ERRCODE_DUPLICATE_TABLE,
                format!("node {}:{} already has a table named {shard_name}, the name of reference table {}'s copy", node.host, node.port, quote::qualified(&definition.schema, &definition.name)),
            )
            .hint("If it is a copy left behind when the node was removed while unreachable, drop it on the node; otherwise rename it. Then add the node again."));
        }
        let mut sql = schema_statement(&quote::ident(&definition.schema), &|sql| remote::execute(node, sql))?;
        sql.extend(definition.shard_ddl(shard.shard_id, &quote::ident));
        remote::execute(node, &sql.join("; "))?;
        let target = Shard { placements: vec![node.node_id], ..shard.clone() };
        super::grants::sync_new_shards(&DistributedTable { shards: vec![target.clone()], ..(*table).clone() })?;
        send_local_rows(&definition, &[target], None, None)?;
        catalog::as_catalog_owner(|| tables::insert_placement(shard.shard_id, node.node_id))?;
        copied.push((NewShard { relid, shard_id: shard.shard_id, interval: None }, definition));
    }
    // Keys between reference tables once every copy is filled.
    let mut statements = Vec::new();
    for (shard, definition) in &copied {
        let keys = table_ddl::foreign_keys(shard.relid)?;
        statements.extend(foreign_keys::shard_statements(shard.relid, definition, &keys, &[*shard], &[])?);
    }
    if !statements.is_empty() {
        remote::execute(node, &statements.join("; "))?;
    }
    Ok(())
}

/// Pulls a shard's rows into the local table through a cursor on the worker (bounded memory).
fn pull_shard_rows(definition: &TableDefinition, shard: &Shard, node: &Node) -> Result<()> {
    let columns: Vec<&table_ddl::Column> =
        definition.columns.iter().filter(|c| c.generated_sql.is_none()).collect();
    let shard_name = quote::qualified(&definition.schema, &shard_object_name(&definition.name, shard.shard_id));
    let remote_select: Vec<String> = columns.iter().map(|c| format!("{}::text", quote::ident(&c.name))).collect();
    remote::execute(
        node,
        &format!("DECLARE sharding_pull NO SCROLL CURSOR FOR SELECT {} FROM {shard_name}", remote_select.join(", ")),
    )?;
    let insert = format!(
        "INSERT INTO {} ({}) SELECT {} FROM unnest({}) AS u({})",
        quote::qualified(&definition.schema, &definition.name),
        columns.iter().map(|c| quote::ident(&c.name)).collect::<Vec<_>>().join(", "),
        columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("u.c{i}::{}", c.type_sql))
            .collect::<Vec<_>>()
            .join(", "),
        (1..=columns.len()).map(|i| format!("${i}::text[]")).collect::<Vec<_>>().join(", "),
        (0..columns.len()).map(|i| format!("c{i}")).collect::<Vec<_>>().join(", "),
    );
    loop {
        let batch = remote::execute(node, &format!("FETCH {MOVE_BATCH_ROWS} FROM sharding_pull"))?;
        if batch.rows.is_empty() {
            break;
        }
        let mut arrays: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(batch.rows.len()); columns.len()];
        for row in batch.rows {
            for (i, value) in row.into_iter().enumerate().take(columns.len()) {
                arrays[i].push(value);
            }
        }
        let args: Vec<pgrx::datum::DatumWithOid> = arrays.into_iter().map(|a| a.into()).collect();
        Spi::run_with_args(&insert, &args)?;
    }
    remote::execute(node, "CLOSE sharding_pull")?;
    Ok(())
}

/// A table that becomes local keeps its foreign keys only where the coordinator can enforce
/// them: to itself (a reference table's rows never leave the coordinator) or to reference
/// tables. Keys of distributed or reference tables to it would lose their shards.
fn check_undistributable(relid: pg_sys::Oid, table: &DistributedTable) -> Result<()> {
    let display = quote::qualified(&table.schema, &table.name);
    let refuse = |why: String| {
        ShardingError::new(PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED, format!("cannot undistribute {display}: {why}"))
            .hint("Drop the foreign key first.")
    };
    for key in table_ddl::foreign_keys(relid)? {
        let referenced = pg_sys::Oid::from(key.referenced_relid);
        if referenced == relid && table.method == Method::Hash {
            return Err(refuse(format!("its foreign key \"{}\" references the table itself", key.name))
                .detail("Its rows come back shard by shard: a row may reference one that has not come back yet."));
        }
        if referenced != relid && matches!(foreign_keys::kind_of(referenced)?, Kind::Distributed { .. }) {
            return Err(refuse(format!("its foreign key \"{}\" references the distributed table {}", key.name,
                quote::qualified(&key.referenced_schema, &key.referenced_name))));
        }
    }
    for (other, key) in table_ddl::referencing_tables(relid)? {
        if cache::table(other)?.is_some() {
            let other = catalog::read_one::<String>("SELECT $1::regclass::text", &[other.into()])?.unwrap_or_default();
            return Err(refuse(format!("the table {other} references it (foreign key \"{key}\")")));
        }
    }
    Ok(())
}

pub(super) fn undistribute_table_impl(relid: pg_sys::Oid) -> Result<()> {
    lock_table(relid, "ACCESS EXCLUSIVE")?;
    let table = cache::table(relid)?.ok_or_else(|| {
        ShardingError::new(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "table is not distributed")
    })?;
    // SAFETY: plain catalog check of the current user against the table's owner.
    if !unsafe { pg_sys::pg_class_ownercheck(relid, pg_sys::GetUserId()) } {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("must be owner of table {}", quote::qualified(&table.schema, &table.name)),
        ));
    }
    let definition = table_ddl::read(relid)?;
    check_undistributable(relid, &table)?;
    let nodes: Vec<Node> = cache::nodes()?.iter().cloned().collect();
    // The catalog goes first, so the rows written below land in the local table.
    catalog::as_catalog_owner(|| tables::delete_table(relid, table.colocation_id))?;
    if table.method == Method::Hash {
        for shard in &table.shards {
            let node_id = *shard.placements.first().ok_or_else(|| {
                ShardingError::internal(format!("shard {} has no active placement", shard.shard_id))
            })?;
            pull_shard_rows(&definition, shard, node_by_id(&nodes, node_id)?)?;
        }
    }
    let mut per_node: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    for shard in &table.shards {
        for node_id in &shard.placements {
            per_node.entry(*node_id).or_default().push(quote::qualified(
                &definition.schema,
                &shard_object_name(&definition.name, shard.shard_id),
            ));
        }
    }
    for (node_id, names) in per_node {
        remote::execute(node_by_id(&nodes, node_id)?, &format!("DROP TABLE IF EXISTS {}", names.join(", ")))?;
    }
    Ok(())
}


/// The shard of `table_name` that holds rows whose distribution column equals `value`.
#[pg_extern(stable, parallel_safe)]
fn shard_for_value(table_name: PgRelation, value: pgrx::AnyElement) -> i64 {
    (|| -> Result<i64> {
        let table = cache::table(table_name.oid())?.ok_or_else(|| {
            ShardingError::new(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "table is not distributed")
        })?;
        if table.method == Method::Reference {
            return Ok(table.shards[0].shard_id);
        }
        let column_kind = table.distribution_kind.ok_or_else(|| ShardingError::internal("no distribution column"))?;
        let value_kind = DistKind::of_type(value.oid()).filter(|k| k.family() == column_kind.family()).ok_or_else(|| {
            ShardingError::new(
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                format!(
                    "the value's type does not match the distribution column \"{}\"",
                    table.distribution_column.clone().unwrap_or_default()
                ),
            )
            .hint("Cast the value to the distribution column's type.")
        })?;
        // SAFETY: AnyElement carries a valid non-NULL datum of its type.
        let hash = unsafe { routing::hash_datum(value.datum(), value_kind) };
        table
            .shard_for_hash(hash)
            .map(|s| s.shard_id)
            .ok_or_else(|| ShardingError::internal(format!("no shard owns hash value {hash}")))
    })()
    .or_raise()
}

/// Size and row estimate of one shard placement, asked from its node.
pub struct PlacementFigures {
    pub shard_id: i64,
    pub node_id: i32,
    /// `None` when the node could not be asked.
    pub bytes: Option<i64>,
    /// The planner's estimate, or an exact count for a shard never analyzed.
    pub rows: Option<i64>,
}

/// Figures of every shard placement (one query per node; an unreachable node gives `None`s).
pub fn placement_figures() -> Result<Vec<PlacementFigures>> {
    let placements = Spi::connect(|client| -> Result<Vec<(i64, i32, String)>> {
        client
            .select(
                "SELECT s.shard_id, p.node_id, n.nspname::text, c.relname::text
                   FROM sharding.dist_shard s
                   JOIN sharding.dist_placement p ON p.shard_id = s.shard_id
                   JOIN pg_catalog.pg_class c ON c.oid = s.logicalrelid
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace",
                None,
                &[],
            )?
            .map(|row| {
                Ok((
                    row.get::<i64>(1)?.unwrap_or_default(),
                    row.get::<i32>(2)?.unwrap_or_default(),
                    quote::qualified(
                        &row.get::<String>(3)?.unwrap_or_default(),
                        &shard_object_name(&row.get::<String>(4)?.unwrap_or_default(), row.get::<i64>(1)?.unwrap_or_default()),
                    ),
                ))
            })
            .collect()
    })?;
    let nodes: Vec<Node> = cache::nodes()?.iter().cloned().collect();
    let mut figures = Vec::with_capacity(placements.len());
    let mut by_node: BTreeMap<i32, Vec<(i64, String)>> = BTreeMap::new();
    for (shard_id, node_id, name) in placements {
        by_node.entry(node_id).or_default().push((shard_id, name));
    }
    for (node_id, shards) in by_node {
        let unknown = |shards: &[(i64, String)]| {
            shards.iter().map(|(id, _)| PlacementFigures { shard_id: *id, node_id, bytes: None, rows: None }).collect::<Vec<_>>()
        };
        let Ok(node) = node_by_id(&nodes, node_id) else { continue };
        let Ok(connection) = crate::connection::connect_to(node) else {
            figures.extend(unknown(&shards));
            continue;
        };
        let names: Vec<&str> = shards.iter().map(|(_, name)| name.as_str()).collect();
        let array = text_array(&names);
        // A shard never analyzed has reltuples -1: counting it is exact and, being new, cheap.
        let answer = connection.query(
            "SELECT pg_catalog.pg_total_relation_size(c.oid),
                    CASE WHEN c.reltuples >= 0 THEN c.reltuples::int8
                         WHEN c.oid IS NOT NULL THEN (SELECT x FROM sharding.count_rows(c.oid) x) END
               FROM unnest($1::text[]) WITH ORDINALITY AS u(n, i)
               LEFT JOIN pg_catalog.pg_class c ON c.oid = pg_catalog.to_regclass(u.n)
              ORDER BY u.i",
            &[Some(&array)],
        );
        match answer {
            Ok(result) => {
                for (i, (shard_id, _)) in shards.iter().enumerate() {
                    figures.push(PlacementFigures {
                        shard_id: *shard_id,
                        node_id,
                        bytes: result.value(i, 0).and_then(|v| v.parse().ok()),
                        rows: result.value(i, 1).and_then(|v| v.parse().ok()),
                    });
                }
            }
            Err(_) => figures.extend(unknown(&shards)),
        }
    }
    Ok(figures)
}

/// Size in bytes of every shard placement, asked from the nodes (one query per node).
#[pg_extern(volatile, parallel_unsafe)]
fn shard_sizes() -> TableIterator<'static, (name!(shard_id, i64), name!(node_id, i32), name!(size_bytes, Option<i64>))> {
    let rows = placement_figures().or_raise();
    TableIterator::new(rows.into_iter().map(|f| (f.shard_id, f.node_id, f.bytes)))
}

/// Estimated rows and bytes of every shard placement, asked from the nodes (backs
/// `sharding.shard_stats`).
#[pg_extern(volatile, parallel_unsafe)]
fn placement_stats() -> TableIterator<
    'static,
    (name!(shard_id, i64), name!(node_id, i32), name!(estimated_rows, Option<i64>), name!(size_bytes, Option<i64>)),
> {
    let rows = placement_figures().or_raise();
    TableIterator::new(rows.into_iter().map(|f| (f.shard_id, f.node_id, f.rows, f.bytes)))
}

/// The exact row count of a table (used on workers for shards the planner has no estimate of).
#[pg_extern(volatile, parallel_unsafe, strict)]
fn count_rows(relation: PgRelation) -> i64 {
    let name = quote::qualified(&relation.namespace().to_string(), &relation.name().to_string());
    Spi::get_one::<i64>(&format!("SELECT count(*) FROM {name}")).ok().flatten().unwrap_or(0)
}

/// A text-array literal (`{"a","b"}`) of `values`, to send as a `text[]` parameter.
pub fn text_array(values: &[impl AsRef<str>]) -> String {
    format!("{{{}}}", values.iter().map(|v| array_element(v.as_ref())).collect::<Vec<_>>().join(","))
}

/// One element of a text-array literal: double-quoted, with `"` and `\` escaped.
fn array_element(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for ch in value.chars() {
        if ch == '"' || ch == '\\' {
            out.push('\\');
        }
        out.push(ch);
    }
    out.push('"');
    out
}
