//! Settings of pg_sharding (all under the reserved `sharding.` prefix).

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// Seconds to wait for a worker connection to be established.
pub static NODE_CONNECT_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(5);

/// Default number of shards for new hash-distributed tables.
pub static SHARD_COUNT: GucSetting<i32> = GucSetting::<i32>::new(32);

/// Connections a backend may use per worker node for reads outside transaction blocks.
pub static MAX_CONNECTIONS_PER_NODE: GucSetting<i32> = GucSetting::<i32>::new(2);

/// EXPLAIN shows the SQL of every task instead of one.
pub static EXPLAIN_ALL_TASKS: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Seconds between runs of the recovery of prepared transactions (0: off).
pub static RECOVERY_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60);

/// Milliseconds a transaction's statement waits for the workers before it looks for a
/// distributed deadlock (0: never).
pub static DISTRIBUTED_DEADLOCK_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(2000);

/// Kilobytes up to which a table joined without co-location is broadcast to the tasks of the
/// other tables (0: never).
pub static BROADCAST_JOIN_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(16 * 1024);

/// Multi-shard reads outside the distributed transaction hand their rows to the executor as
/// they arrive, instead of gathering them first.
pub static STREAM_ROWS: GucSetting<bool> = GucSetting::<bool>::new(true);

pub fn define() {
    GucRegistry::define_bool_guc(
        c"sharding.stream_rows",
        c"Multi-shard reads return rows while their tasks still run.",
        c"Applies to reads outside the distributed transaction that PostgreSQL reads once, forward (not for cursors declared SCROLL, the inner side of a nested loop, or EXPLAIN ANALYZE). They use connections of their own, not the node sessions. Off: every read gathers its rows (spilling to disk beyond work_mem) before returning the first.",
        &STREAM_ROWS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"sharding.broadcast_join_limit",
        c"Largest table that a join between tables that are not co-located sends to every task of the other tables.",
        c"The table's rows, filtered and projected, go to every shard of the other side, where the join and partial aggregates run; a larger table, or a join where that would move more than reading the other side, is joined on the coordinator. 0 turns broadcasting off.",
        &BROADCAST_JOIN_LIMIT,
        0,
        i32::MAX / 1024,
        GucContext::Userset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"sharding.distributed_deadlock_timeout",
        c"Milliseconds a statement of a distributed transaction waits for the workers before it looks for a distributed deadlock.",
        c"The youngest transaction of a cycle of lock waits across nodes is cancelled with SQLSTATE 40P01. 0 turns the detection off.",
        &DISTRIBUTED_DEADLOCK_TIMEOUT,
        0,
        3600 * 1000,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"sharding.recovery_interval",
        c"Seconds between two runs of the recovery of prepared transactions by the background worker.",
        c"The worker also runs it when the server starts. 0 turns the background recovery off; sharding.recover_prepared_transactions() still works.",
        &RECOVERY_INTERVAL,
        0,
        86400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"sharding.max_connections_per_node",
        c"Connections per worker node a session may use to run one statement's tasks in parallel.",
        c"Applies to reads outside transaction blocks; writes and everything in a transaction block use one connection per node, so that the transaction sees its own writes.",
        &MAX_CONNECTIONS_PER_NODE,
        1,
        64,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"sharding.explain_all_tasks",
        c"EXPLAIN shows every task of a distributed plan.",
        c"Off: one task is shown, with the count of all.",
        &EXPLAIN_ALL_TASKS,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"sharding.node_connect_timeout",
        c"Seconds to wait when connecting to a worker node.",
        c"Applies to node management, health checks and query execution. Minimum 1.",
        &NODE_CONNECT_TIMEOUT,
        1,
        3600,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"sharding.shard_count",
        c"Default number of shards of a new hash-distributed table.",
        c"Used by create_distributed_table when shard_count is not given.",
        &SHARD_COUNT,
        1,
        64000,
        GucContext::Userset,
        GucFlags::default(),
    );
    // Reserve the prefix: a typo such as `sharding.shardcount` is then reported, not ignored.
    // SAFETY: plain C call with a static NUL-terminated string, during _PG_init.
    unsafe { pgrx::pg_sys::MarkGUCPrefixReserved(c"sharding".as_ptr()) };
}
