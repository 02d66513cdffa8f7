//! `sharding.split_shard`: splits a shard's hash interval into several, together with the
//! shards co-located with it.
//!
//! The split itself happens on the shard's node; children meant for other nodes are then
//! moved there (online moves, each in its own transaction, see `steps`).
//!
//! Online (the default), on the source node and outside the distributed transaction:
//! 1. the child shards are created, and a trigger on each old shard applies every change
//!    from then on to the child owning the row's hash (an INSERT of the old row with
//!    ON CONFLICT DO NOTHING before each delete makes a writer at REPEATABLE READ fail with a
//!    serialization error instead of missing a row copied after its snapshot);
//! 2. the existing rows are copied in chunks of pages, each chunk under FOR KEY SHARE locks
//!    (a row deleted meanwhile is skipped, one being deleted is waited for) and inserted with
//!    ON CONFLICT DO NOTHING (the trigger's newer copy wins); a chunk that would wait long for
//!    a writer gives up and runs again, smaller, rather than deadlock with it.
//!
//! The children are then exact copies, kept so by the trigger: writes through the coordinator
//! wait (EXCLUSIVE lock on the tables) only while the catalog switches to the children, in the
//! distributed transaction. The old shards (with their trigger) are dropped later, like a
//! move's. In `block_writes` mode the children are created and filled inside the distributed
//! transaction while writes wait.

use pgrx::prelude::*;
use sharding_core::interval::{split_interval, HashInterval};

use super::{require_superuser, required, steps};
use crate::catalog::nodes::{self, Node};
use crate::catalog::{self, cache, tables};
use crate::connection::{self, RemoteConnection};
use crate::deparse::quote;
use crate::deparse::table::{self as table_ddl, shard_object_name, TableDefinition};
use crate::error::{OrRaise, Result, ShardingError};
use crate::transaction::remote;

/// Pages copied per chunk (each chunk is one short transaction on the source).
const CHUNK_PAGES: i64 = 1024;

/// One table of the co-located group being split.
struct Member {
    relid: pg_sys::Oid,
    old_shard: i64,
    definition: TableDefinition,
    /// Quoted, qualified name of the old shard.
    old_name: String,
    distribution_column: String,
    /// (new shard id, interval, quoted qualified name), in hash order.
    children: Vec<(i64, HashInterval, String)>,
}

impl Member {
    fn columns(&self) -> Vec<String> {
        self.definition.columns.iter().filter(|c| c.generated_sql.is_none()).map(|c| quote::ident(&c.name)).collect()
    }

    /// `INSERT INTO child ... SELECT ... FROM <source> WHERE <hash in the child's interval>`
    /// for every child, as data-modifying CTEs named c0, c1, ...
    fn routed_inserts(&self, from: &str, alias: &str, conflict: &str) -> Vec<String> {
        let columns = self.columns().join(", ");
        let hash = format!("sharding.hash_value({alias}.{})", quote::ident(&self.distribution_column));
        self.children
            .iter()
            .enumerate()
            .map(|(i, (_, interval, name))| {
                format!(
                    "c{i} AS (INSERT INTO {name} ({columns}) SELECT {columns} FROM {from}
                       WHERE {hash} BETWEEN {} AND {} {conflict})",
                    interval.min, interval.max
                )
            })
            .collect()
    }

    fn trigger_function(&self) -> String {
        format!("sharding.pgs_split_{}", self.old_shard)
    }
}

/// The columns of the primary key (or replica identity index) of `relid`, which the online
/// split matches rows by; `None` when it has neither.
fn key_columns(relid: pg_sys::Oid) -> Result<Option<Vec<String>>> {
    Ok(catalog::read_one::<Vec<String>>(
        // A scalar subquery: one row (NULL) when there is no such index.
        "SELECT (SELECT (SELECT array_agg(a.attname::text ORDER BY k.ord)
                           FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                           JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                          WHERE k.ord <= i.indnkeyatts)
                   FROM pg_catalog.pg_index i
                  WHERE i.indrelid = $1 AND (i.indisprimary OR i.indisreplident) AND i.indisunique AND i.indpred IS NULL
                  ORDER BY i.indisprimary DESC LIMIT 1)",
        &[relid.into()],
    )?)
}

/// The trigger that applies changes of the old shard to the children (see the module doc).
fn trigger_sql(member: &Member, keys: &[String]) -> String {
    let hash_of = |row: &str| format!("sharding.hash_value({row}.{})", quote::ident(&member.distribution_column));
    let columns = member.columns();
    let values = |row: &str| columns.iter().map(|c| format!("{row}.{c}")).collect::<Vec<_>>().join(", ");
    let key_match = keys.iter().map(|k| format!("{0} = OLD.{0}", quote::ident(k))).collect::<Vec<_>>().join(" AND ");
    let key_list = keys.iter().map(|k| quote::ident(k)).collect::<Vec<_>>().join(", ");
    let updates = columns.iter().map(|c| format!("{c} = EXCLUDED.{c}")).collect::<Vec<_>>().join(", ");
    let upsert = if updates.is_empty() { "DO NOTHING".to_string() } else { format!("({key_list}) DO UPDATE SET {updates}") };
    let branches = |body: &dyn Fn(&str) -> String| -> String {
        let mut text = String::new();
        for (i, (_, interval, name)) in member.children.iter().enumerate() {
            let keyword = if i == 0 { "IF" } else { "ELSIF" };
            text.push_str(&format!("{keyword} h <= {} THEN {}\n", interval.max, body(name)));
        }
        text.push_str("END IF;\n");
        text
    };
    let remove = |name: &str| {
        format!(
            "INSERT INTO {name} ({}) VALUES ({}) ON CONFLICT DO NOTHING; DELETE FROM {name} WHERE {key_match};",
            columns.join(", "),
            values("OLD")
        )
    };
    let add = |name: &str| format!("INSERT INTO {name} ({}) VALUES ({}) ON CONFLICT {upsert};", columns.join(", "), values("NEW"));
    let children: Vec<&str> = member.children.iter().map(|(_, _, name)| name.as_str()).collect();
    let function = member.trigger_function();
    format!(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $pgs$
         DECLARE h integer;
         BEGIN
           IF TG_OP = 'TRUNCATE' THEN TRUNCATE {children}; RETURN NULL; END IF;
           IF TG_OP <> 'INSERT' THEN
             h := {old_hash};
             {remove_branches}
           END IF;
           IF TG_OP <> 'DELETE' THEN
             h := {new_hash};
             {add_branches}
           END IF;
           RETURN NULL;
         END $pgs$;
         COMMENT ON FUNCTION {function}() IS {comment};
         CREATE TRIGGER pgs_split AFTER INSERT OR UPDATE OR DELETE ON {old} FOR EACH ROW EXECUTE FUNCTION {function}();
         CREATE TRIGGER pgs_split_truncate AFTER TRUNCATE ON {old} FOR EACH STATEMENT EXECUTE FUNCTION {function}();",
        children = children.join(", "),
        // The children's shard ids (numbers only): an interrupted split's next attempt, or the
        // maintenance worker, finds them there.
        comment = quote::literal(&member.children.iter().map(|(id, _, _)| id.to_string()).collect::<Vec<_>>().join(",")),
        old_hash = hash_of("OLD"),
        new_hash = hash_of("NEW"),
        remove_branches = branches(&remove),
        add_branches = branches(&add),
        old = member.old_name,
    )
}

fn on(node: &Node, connection: &RemoteConnection, sql: &str) -> Result<connection::RemoteRows> {
    connection.exec(sql).map_err(|e| remote::remote_error(node, e))
}

/// The statements that remove a member's split trigger and function and, when asked, its
/// children.
fn clear_sql(member: &Member, drop_children: bool) -> String {
    let mut sql = format!(
        "SET lock_timeout = '10s'; DROP TRIGGER IF EXISTS pgs_split ON {old}; DROP TRIGGER IF EXISTS pgs_split_truncate ON {old};
         DROP FUNCTION IF EXISTS {function}()",
        old = member.old_name,
        function = member.trigger_function()
    );
    if drop_children && !member.children.is_empty() {
        let names: Vec<&str> = member.children.iter().map(|(_, _, n)| n.as_str()).collect();
        sql.push_str(&format!("; DROP TABLE IF EXISTS {} CASCADE", names.join(", ")));
    }
    sql
}

/// Removes the split triggers and, when asked, the children (best effort: every member is
/// tried, the first failure is returned).
fn clear(source: &Node, members: &[Member], drop_children: bool) -> Result<()> {
    let connection = connection::connect_to_node(&source.host, source.port)?;
    let mut first_error = None;
    for member in members {
        if let Err(e) = on(source, &connection, &clear_sql(member, drop_children)) {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// The child shard ids an interrupted split recorded in its trigger function's comment on
/// `connection`'s node (anything but a comma-separated list of numbers is ignored).
pub fn recorded_children(node: &Node, connection: &RemoteConnection, function: &str) -> Result<Vec<i64>> {
    let params = [Some(format!("{function}()"))];
    let params: Vec<Option<&str>> = params.iter().map(|p| p.as_deref()).collect();
    let comment = connection
        .query("SELECT pg_catalog.obj_description(pg_catalog.to_regprocedure($1), 'pg_proc')", &params)
        .map_err(|e| remote::remote_error(node, e))?;
    let text = comment.value(0, 0).unwrap_or_default();
    Ok(text.split(',').map(str::trim).filter_map(|id| id.parse::<i64>().ok()).collect())
}

/// Removes what an interrupted earlier split of these shards left (a crash of the coordinator
/// skips every cleanup): the trigger and its function, and the children the function's comment
/// names. The old shards are still in the catalog, so no split of them ever committed and
/// those children belong to nothing.
fn clear_leftovers(source: &Node, members: &[Member]) -> Result<()> {
    let connection = connection::connect_to_node(&source.host, source.port)?;
    for member in members {
        let children: Vec<String> = recorded_children(source, &connection, &member.trigger_function())?
            .into_iter()
            .map(|id| quote::qualified(&member.definition.schema, &shard_object_name(&member.definition.name, id)))
            .collect();
        let mut sql = clear_sql(member, false);
        if !children.is_empty() {
            sql.push_str(&format!("; DROP TABLE IF EXISTS {} CASCADE", children.join(", ")));
        }
        on(source, &connection, &sql)?;
    }
    Ok(())
}

/// Creates the triggers, retrying while the old shard is busy (CREATE TRIGGER waits for the
/// writers of the shard; a short lock_timeout keeps writers from queueing behind it).
fn install_triggers(source: &Node, connection: &RemoteConnection, members: &[Member], keys: &[Vec<String>]) -> Result<()> {
    let sql: Vec<String> = members.iter().zip(keys).map(|(m, k)| trigger_sql(m, k)).collect();
    let mut attempt = 0;
    loop {
        let outcome = on(source, connection, &format!("BEGIN; SET LOCAL lock_timeout = '500ms'; {}; COMMIT", sql.join("; ")));
        match outcome {
            Ok(_) => return Ok(()),
            Err(e) => {
                let _ = connection.exec("ROLLBACK");
                attempt += 1;
                if e.code != PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE || attempt >= 20 {
                    return Err(e);
                }
            }
        }
    }
}

/// Copies the rows of the old shards into the children, chunk by chunk (online mode).
fn copy_chunks(source: &Node, connection: &RemoteConnection, members: &[Member]) -> Result<u64> {
    let mut copied = 0u64;
    for member in members {
        let pages = connection
            .query(
                "SELECT pg_catalog.pg_relation_size($1::regclass) / pg_catalog.current_setting('block_size')::int8",
                &[Some(&member.old_name)],
            )
            .map_err(|e| remote::remote_error(source, e))?
            .value(0, 0)
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0);
        let mut start = 0;
        let mut size = CHUNK_PAGES;
        let mut failures = 0;
        while start < pages {
            let end = start + size;
            let mut ctes = vec![format!(
                "src AS (SELECT s.* FROM ONLY {} s WHERE s.ctid >= '({start},0)'::tid AND s.ctid < '({end},0)'::tid FOR KEY SHARE OF s)",
                member.old_name
            )];
            ctes.extend(member.routed_inserts("src", "src", "ON CONFLICT DO NOTHING"));
            let sql = format!("WITH {} SELECT count(*) FROM src", ctes.join(", "));
            // A chunk and a writer can wait for each other (each holds a row or a new child row
            // the other needs). The chunk gives up first (lock_timeout, well below the
            // writers' deadlock_timeout) and is run again, smaller: it is idempotent, and the
            // writer goes on instead of failing.
            match on(source, connection, &sql) {
                Ok(rows) => {
                    copied += rows.value(0, 0).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                    start = end;
                    size = CHUNK_PAGES;
                }
                Err(e)
                    if failures < 200
                        && [
                            PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
                            PgSqlErrorCode::ERRCODE_T_R_DEADLOCK_DETECTED,
                            PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                        ]
                        .contains(&e.code) =>
                {
                    failures += 1;
                    size = (size / 2).max(16);
                }
                Err(e) => return Err(e),
            }
            pgrx::check_for_interrupts!();
        }
    }
    Ok(copied)
}

/// The catalog switch: the children replace the old shards (on the same node), the shard
/// indexes of the group are renumbered in hash order, and the old shards and trigger
/// functions are recorded for a deferred drop.
fn switch_catalog(members: &[Member], source: &Node, colocation_id: Option<i32>) -> Result<()> {
    catalog::as_catalog_owner(|| {
        let relids: Vec<pg_sys::Oid> = members.iter().map(|m| m.relid).collect();
        // Negative indexes while renumbering: (logicalrelid, shard_index) stays unique.
        Spi::run_with_args(
            "UPDATE sharding.dist_shard SET shard_index = -1 - shard_index WHERE logicalrelid::oid = ANY ($1)",
            &[relids.clone().into()],
        )?;
        for member in members {
            Spi::run_with_args("DELETE FROM sharding.dist_shard WHERE shard_id = $1", &[member.old_shard.into()])?;
            for (i, (id, interval, _)) in member.children.iter().enumerate() {
                tables::insert_shard(
                    member.relid,
                    &tables::Shard { shard_id: *id, index: -1_000_000 - i as i32, interval: Some(*interval), placements: vec![source.node_id] },
                )?;
            }
            Spi::run_with_args(
                "INSERT INTO sharding.dist_cleanup (object_name, node_id, object_type)
                 VALUES ($1, $3, 'table'), ($2, $3, 'function') ON CONFLICT DO NOTHING",
                &[member.old_name.clone().into(), format!("{}()", member.trigger_function()).into(), source.node_id.into()],
            )?;
        }
        Spi::run_with_args(
            "UPDATE sharding.dist_shard s SET shard_index = r.i
               FROM (SELECT shard_id, (row_number() OVER (PARTITION BY logicalrelid ORDER BY min_hash) - 1)::int AS i
                       FROM sharding.dist_shard WHERE logicalrelid::oid = ANY ($1)) r
              WHERE s.shard_id = r.shard_id",
            &[relids.into()],
        )?;
        if let Some(group) = colocation_id {
            Spi::run_with_args(
                "UPDATE sharding.dist_colocation SET shard_count = shard_count + $2 WHERE colocation_id = $1",
                &[group.into(), (members[0].children.len() as i32 - 1).into()],
            )?;
        }
        Ok(())
    })
}

/// Splits shard `shard_id` (and its co-located shards) on its node; returns the new shard ids
/// of `shard_id`'s table in hash order.
/// The statements creating the foreign keys of every child (keys to co-located tables go to
/// the sibling child covering the same hash values).
fn children_keys(members: &[Member]) -> Result<Vec<String>> {
    let children: Vec<super::foreign_keys::NewShard> = members
        .iter()
        .flat_map(|m| {
            m.children.iter().map(|(id, interval, _)| super::foreign_keys::NewShard {
                relid: m.relid,
                shard_id: *id,
                interval: Some(*interval),
            })
        })
        .collect();
    super::foreign_keys::group_statements(&children)
}

fn split_in_place(shard_id: i64, points: &[i32], online: bool) -> Result<Vec<i64>> {
    nodes::lock_for_change()?;
    super::shard_ops::cleanup_old_placements()?;
    let group = super::shard_ops::shard_group_of(shard_id)?;
    // DDL on the tables waits until the split is done (the children must get it too).
    for (_, relid) in &group.shards {
        super::distribute::lock_table(*relid, "SHARE UPDATE EXCLUSIVE")?;
    }
    let source = nodes::load_all()?.into_iter().find(|n| n.node_id == group.source).ok_or_else(|| {
        ShardingError::internal(format!("the node {} of shard {shard_id} is not registered", group.source))
    })?;
    super::shard_ops::refuse_coordinator(&[&source], "split")?;
    let mut members = Vec::new();
    let mut colocation_id = None;
    for (member_shard, relid) in &group.shards {
        let table = cache::table(*relid)?.ok_or_else(|| ShardingError::internal("a table of the group is not distributed"))?;
        colocation_id = table.colocation_id;
        let interval = table
            .shards
            .iter()
            .find(|s| s.shard_id == *member_shard)
            .and_then(|s| s.interval)
            .ok_or_else(|| ShardingError::internal(format!("shard {member_shard} has no hash interval")))?;
        let pieces = split_interval(interval, points)
            .map_err(|e| ShardingError::new(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, e.to_string())
                .detail(format!("shard {shard_id} owns the hash values {} to {}", interval.min, interval.max)))?;
        let definition = table_ddl::read(*relid)?;
        let old_name = quote::qualified(&definition.schema, &shard_object_name(&definition.name, *member_shard));
        let children = pieces
            .iter()
            .map(|piece| {
                let id = tables::next_shard_id()?;
                Ok((id, *piece, quote::qualified(&definition.schema, &shard_object_name(&definition.name, id))))
            })
            .collect::<Result<Vec<_>>>()?;
        members.push(Member {
            relid: *relid,
            old_shard: *member_shard,
            definition,
            old_name,
            distribution_column: table.distribution_column.clone().unwrap_or_default(),
            children,
        });
    }
    let ids_of = |members: &[Member]| -> Vec<i64> {
        members.iter().find(|m| m.old_shard == shard_id).map(|m| m.children.iter().map(|c| c.0).collect()).unwrap_or_default()
    };

    let relids: Vec<pg_sys::Oid> = group.shards.iter().map(|(_, relid)| *relid).collect();
    if !online {
        super::lock_tables_together(&relids, "EXCLUSIVE")?;
        for member in &members {
            let mut sql = Vec::new();
            for (id, _, _) in &member.children {
                sql.push(super::shard_ops::create_shard_sql(member.relid, &member.definition, *id)?);
            }
            sql.push(format!(
                "WITH {} SELECT 1",
                member.routed_inserts(&format!("ONLY {} AS s", member.old_name), "s", "").join(", ")
            ));
            remote::execute(&source, &sql.join("; "))?;
        }
        let keys = children_keys(&members)?;
        if !keys.is_empty() {
            remote::execute(&source, &keys.join("; "))?;
        }
        switch_catalog(&members, &source, colocation_id)?;
        return Ok(ids_of(&members));
    }

    let mut keys = Vec::new();
    for member in &members {
        match key_columns(member.relid)? {
            Some(columns) => keys.push(columns),
            None => {
                let name = catalog::read_one::<String>("SELECT $1::regclass::text", &[member.relid.into()])?.unwrap_or_default();
                return Err(ShardingError::new(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("table {name} has no primary key or replica identity index, which an online split needs"),
                )
                .hint("Add a primary key, or split with mode => 'block_writes'."));
            }
        }
    }
    if remote::wrote_on(&source) {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
            format!("an online split cannot run in a transaction that has written on node {}:{}", source.host, source.port),
        )
        .hint("Run the split in its own transaction, or use mode => 'block_writes'."));
    }
    // What an interrupted earlier attempt may have left on the old shards.
    clear_leftovers(&source, &members)?;
    let connection = connection::connect_to_node(&source.host, source.port)?;
    let attempt = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Result<()> {
        for member in &members {
            let ddl: Vec<String> = member
                .children
                .iter()
                .map(|(id, _, _)| super::shard_ops::create_shard_sql(member.relid, &member.definition, *id))
                .collect::<Result<_>>()?;
            on(&source, &connection, &ddl.join("; "))?;
        }
        install_triggers(&source, &connection, &members, &keys)?;
        crate::transaction::fault::point("split_after_trigger");
        on(&source, &connection, "SET lock_timeout = '200ms'")?;
        copy_chunks(&source, &connection, &members)?;
        on(&source, &connection, "RESET lock_timeout")?;
        // The foreign keys once the children are filled (the triggers keep them in step after).
        let keys = children_keys(&members)?;
        if !keys.is_empty() {
            on(&source, &connection, &keys.join("; "))?;
        }
        crate::transaction::fault::point("split_before_switch");
        // The children are complete and kept so by the trigger: writes wait from here to commit.
        super::lock_tables_together(&relids, "EXCLUSIVE")?;
        switch_catalog(&members, &source, colocation_id)
    }));
    if matches!(attempt, Ok(Ok(()))) {
        // Should the transaction not commit after all, the children and triggers go.
        for member in &members {
            crate::transaction::undo::on_abort(&source.host, source.port, clear_sql(member, true))?;
        }
    } else if let Err(cleanup) = super::uninterrupted(|| clear(&source, &members, true)) {
        pgrx::warning!("the failed split of shard {shard_id} could not remove everything it made: {}", cleanup.message);
    }
    match attempt {
        Ok(result) => result.map(|()| ids_of(&members)),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Splits shard `shard_id` and the shards co-located with it at `split_points` (each point is
/// the last hash value of a piece), placing the pieces on `target_nodes` (one per piece;
/// NULL: all on the shard's node). Returns the new shard ids of `shard_id`'s table.
#[pg_extern(volatile, parallel_unsafe)]
fn split_shard(
    shard_id: Option<i64>,
    split_points: Option<Vec<Option<i32>>>,
    target_nodes: default!(Option<Vec<Option<i32>>>, "NULL"),
    mode: default!(Option<&str>, "'online'"),
) -> Vec<i64> {
    (|| -> Result<Vec<i64>> {
        require_superuser("split_shard")?;
        let shard_id = required(shard_id, "shard_id")?;
        let points: Vec<i32> = required(split_points, "split_points")?
            .into_iter()
            .map(|p| required(p, "a split point"))
            .collect::<Result<_>>()?;
        if points.len() > 63 {
            return Err(ShardingError::new(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, "at most 63 split points at once"));
        }
        let online = match required(mode, "mode")?.trim().to_ascii_lowercase().as_str() {
            "online" => true,
            "block_writes" => false,
            other => {
                return Err(ShardingError::new(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("unknown split mode \"{other}\""))
                    .hint("The modes are 'online' and 'block_writes'."))
            }
        };
        let source = super::shard_ops::shard_group_of(shard_id)?.source;
        let targets: Vec<i32> = match target_nodes {
            None => vec![source; points.len() + 1],
            Some(nodes) => nodes.into_iter().map(|n| required(n, "a target node")).collect::<Result<_>>()?,
        };
        if targets.len() != points.len() + 1 {
            return Err(ShardingError::new(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("{} split points make {} shards, but {} target nodes were given", points.len(), points.len() + 1, targets.len()),
            ));
        }
        for target in &targets {
            super::shard_ops::active_node(*target)?;
        }
        if targets.iter().all(|t| *t == source) {
            return split_in_place(shard_id, &points, online);
        }
        // Split where the shard is, then move the pieces meant for other nodes, each step in
        // its own transaction.
        steps::claim()?;
        let progress = crate::stats::ProgressSlot::start("split", targets.iter().filter(|t| **t != source).count(), 0)?;
        let array = |values: &[i32]| format!("'{{{}}}'", values.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(","));
        let ids_text = steps::run(&format!(
            "SELECT sharding.split_shard({shard_id}, {}::int[], NULL, {})::text",
            array(&points),
            quote::literal(if online { "online" } else { "block_writes" })
        ))?
        .unwrap_or_default();
        let ids: Vec<i64> = ids_text.trim_matches(|c| c == '{' || c == '}').split(',').filter_map(|v| v.trim().parse().ok()).collect();
        if ids.len() != targets.len() {
            return Err(ShardingError::internal(format!("the split returned {ids_text}, expected {} shards", targets.len())));
        }
        for (id, target) in ids.iter().zip(&targets) {
            if *target == source {
                continue;
            }
            progress.moving(*id, source, *target, 0);
            steps::run(&format!(
                "SELECT sharding.move_shard({id}, {target}, {})::text",
                quote::literal(if online { "auto" } else { "block_writes" })
            ))?;
            progress.moved();
        }
        Ok(ids)
    })()
    .or_raise()
}
