//! Node management: sharding.add_node, sharding.remove_node, sharding.node_health.

use std::time::Instant;

use pgrx::prelude::*;
use sharding_core::node_check::{self, Admission, CoordinatorFacts, KnownNode, NodeFacts, Rejection};

use super::{require_superuser, required};
use crate::catalog::{cache, nodes};
use crate::connection::{self, RemoteConnection};
use crate::error::{OrRaise, Result, ShardingError};

/// What the coordinator asks a candidate node, in one round trip.
const NODE_FACTS_QUERY: &str = "SELECT
    (SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_sharding'),
    pg_catalog.current_setting('max_prepared_transactions')::bigint,
    pg_catalog.pg_is_in_recovery(),
    (SELECT system_identifier FROM pg_catalog.pg_control_system()),
    (extract(epoch FROM pg_catalog.pg_postmaster_start_time()) * 1000000)::bigint";

fn validate_address(host: &str, port: i32) -> Result<()> {
    if host.trim().is_empty() {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "host must not be empty",
        ));
    }
    if !(1..=65535).contains(&port) {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("port {port} is out of range"),
        )
        .hint("A port is between 1 and 65535."));
    }
    Ok(())
}

fn parse<T: std::str::FromStr>(value: Option<&str>, what: &str) -> Result<T> {
    value
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ShardingError::internal(format!("node answered an unreadable {what}: {value:?}")))
}

fn remote_facts(connection: &RemoteConnection, host: &str, port: i32) -> Result<NodeFacts> {
    let rows = connection.query(NODE_FACTS_QUERY, &[]).map_err(|error| {
        ShardingError::new(
            PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
            format!("could not inspect node {host}:{port}"),
        )
        .detail(error.to_string())
    })?;
    Ok(NodeFacts {
        extension_version: rows.value(0, 0).map(str::to_string),
        max_prepared_transactions: parse(rows.value(0, 1), "max_prepared_transactions")?,
        in_recovery: rows.value(0, 2) == Some("t"),
        system_identifier: parse(rows.value(0, 3), "system_identifier")?,
        started_at: parse(rows.value(0, 4), "postmaster start time")?,
    })
}

/// The coordinator's own extension version, system identifier, port and start time.
fn coordinator_facts() -> Result<CoordinatorFacts> {
    let (version, system_id, started_at) = crate::catalog::read_three::<String, i64, i64>(
        "SELECT (SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_sharding'),
                (SELECT system_identifier FROM pg_catalog.pg_control_system()),
                (extract(epoch FROM pg_catalog.pg_postmaster_start_time()) * 1000000)::bigint",
        &[],
    )?;
    // SAFETY: PostPortNumber is a plain int set at postmaster start.
    let port = unsafe { *std::ptr::addr_of!(pg_sys::PostPortNumber) };
    match (version, system_id, started_at) {
        (Some(version), Some(system_identifier), Some(started_at)) => {
            Ok(CoordinatorFacts { version, system_identifier, port, started_at })
        }
        _ => Err(ShardingError::internal("pg_sharding is not installed in this database")),
    }
}

fn rejection_error(rejection: Rejection, host: &str, port: i32) -> ShardingError {
    use PgSqlErrorCode::*;
    let node = format!("{host}:{port}");
    match rejection {
        Rejection::ExtensionMissing => ShardingError::new(
            ERRCODE_UNDEFINED_OBJECT,
            format!("extension pg_sharding is not installed on node {node}"),
        )
        .hint("Run CREATE EXTENSION pg_sharding in the same database on that node, then add it again."),
        Rejection::VersionMismatch { coordinator, node: node_version } => ShardingError::new(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "pg_sharding version mismatch: node {node} has {node_version}, the coordinator has {coordinator}"
            ),
        )
        .hint("Install the same pg_sharding version on every node (ALTER EXTENSION pg_sharding UPDATE)."),
        Rejection::PreparedTransactionsDisabled => ShardingError::new(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("max_prepared_transactions is 0 on node {node}"),
        )
        .detail("Distributed transactions commit with two-phase commit, which needs prepared transactions.")
        .hint("Set max_prepared_transactions (for example to 100) in that node's postgresql.conf and restart it."),
        Rejection::InRecovery => ShardingError::new(
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("node {node} is a standby in recovery and cannot hold shards"),
        ),
        Rejection::SameServerAs { node_id, host: known_host, port: known_port } => ShardingError::new(
            ERRCODE_DUPLICATE_OBJECT,
            format!(
                "node {node} is the same server as node {node_id} ({known_host}:{known_port})"
            ),
        ),
    }
}

fn add_node_impl(host: &str, port: i32, region: Option<&str>) -> Result<i32> {
    require_superuser("add_node")?;
    validate_address(host, port)?;
    nodes::lock_for_change()?;
    if let Some(existing) = nodes::find(host, port)? {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            format!("node {host}:{port} is already registered as node {}", existing.node_id),
        ));
    }
    let coordinator = coordinator_facts()?;
    let connection = connection::connect_to_node(host, port)?;
    let facts = remote_facts(&connection, host, port)?;
    drop(connection);

    let known: Vec<KnownNode> = nodes::load_all()?
        .into_iter()
        .map(|n| KnownNode {
            node_id: n.node_id,
            host: n.host,
            port: n.port,
            system_identifier: n.system_identifier,
        })
        .collect();
    let admission =
        node_check::check_node(&facts, port, &coordinator, &known).map_err(|rejection| rejection_error(rejection, host, port))?;
    let is_coordinator = admission == Admission::Coordinator;
    if is_coordinator {
        pgrx::notice!("node {host}:{port} is this coordinator: statements for its placements run in the coordinator's own backends, inside their transactions");
    }
    let node_id = nodes::insert(host, port, region, facts.system_identifier, is_coordinator)?;
    // Reference tables have a copy on every node, the new one included.
    let node = nodes::find(host, port)?.ok_or_else(|| ShardingError::internal("the new node vanished"))?;
    super::distribute::replicate_reference_tables_to(&node)?;
    Ok(node_id)
}

/// Registers a worker node after checking it can serve: reachable over libpq as the current
/// user and database, the same pg_sharding version installed, prepared transactions enabled.
/// Returns the new node_id. Nothing is recorded when a check fails.
#[pg_extern(volatile, parallel_unsafe)]
fn add_node(
    host: Option<&str>,
    port: Option<i32>,
    region: default!(Option<&str>, "NULL"),
) -> i32 {
    (|| add_node_impl(required(host, "host")?, required(port, "port")?, region))().or_raise()
}

fn remove_node_impl(host: &str, port: i32) -> Result<()> {
    require_superuser("remove_node")?;
    nodes::lock_for_change()?;
    let node = nodes::find(host, port)?.ok_or_else(|| {
        ShardingError::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("node {host}:{port} is not registered"),
        )
        .hint("SELECT * FROM sharding.nodes lists the registered nodes.")
    })?;
    // Copies of reference tables are not data only this node holds: they go with the node.
    nodes::drop_reference_placements(&node)?;
    let placements = nodes::placement_count(node.node_id)?;
    if placements > 0 {
        return Err(ShardingError::new(
            PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
            format!(
                "cannot remove node {host}:{port}: it holds {placements} shard placement{}",
                if placements == 1 { "" } else { "s" }
            ),
        )
        .hint("Drain the node first: move its shards to other nodes (sharding.drain_node / sharding.move_shard)."));
    }
    nodes::delete(node.node_id)
}

/// Removes a node that holds no shard placements.
#[pg_extern(volatile, parallel_unsafe)]
fn remove_node(host: Option<&str>, port: Option<i32>) {
    (|| remove_node_impl(required(host, "host")?, required(port, "port")?))().or_raise()
}

struct Health {
    reachable: bool,
    latency_ms: Option<f64>,
    extension_version: Option<String>,
    error: Option<String>,
}

fn probe(host: &str, port: i32, coordinator_version: Option<&str>) -> Health {
    let connection = match connection::connect_to_node(host, port) {
        Ok(connection) => connection,
        Err(error) => {
            return Health {
                reachable: false,
                latency_ms: None,
                extension_version: None,
                error: Some(error.detail.unwrap_or(error.message)),
            }
        }
    };
    let started = Instant::now();
    let answer = connection.query(
        "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_sharding'",
        &[],
    );
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    match answer {
        Err(error) => Health {
            reachable: true,
            latency_ms: Some(latency_ms),
            extension_version: None,
            error: Some(error.to_string()),
        },
        Ok(rows) => {
            let version = rows.value(0, 0).map(str::to_string);
            let error = match (&version, coordinator_version) {
                (None, _) => Some("extension pg_sharding is not installed".to_string()),
                (Some(v), Some(c)) if v != c => {
                    Some(format!("extension version {v} differs from the coordinator's {c}"))
                }
                _ => None,
            };
            Health { reachable: true, latency_ms: Some(latency_ms), extension_version: version, error }
        }
    }
}

/// Connects to every registered node and reports whether it answers, the round-trip time of a
/// catalog query in milliseconds, its pg_sharding version and the error, if any.
#[pg_extern(volatile, parallel_unsafe)]
fn node_health() -> TableIterator<
    'static,
    (
        name!(node_id, i32),
        name!(host, String),
        name!(port, i32),
        name!(reachable, bool),
        name!(latency_ms, Option<f64>),
        name!(extension_version, Option<String>),
        name!(error, Option<String>),
    ),
> {
    let registered = cache::nodes().or_raise();
    let coordinator_version = crate::catalog::read_one::<String>(
        "SELECT (SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_sharding')",
        &[],
    )
    .or_raise();
    let rows: Vec<_> = registered
        .iter()
        .map(|node| {
            let health = probe(&node.host, node.port, coordinator_version.as_deref());
            (
                node.node_id,
                node.host.clone(),
                node.port,
                health.reachable,
                health.latency_ms,
                health.extension_version,
                health.error,
            )
        })
        .collect();
    TableIterator::new(rows)
}
