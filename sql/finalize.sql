-- Runs after every function exists: cache invalidation triggers and privileges.

-- Any change to a catalog table invalidates the backend-local metadata caches of every backend
-- (sent through PostgreSQL's relcache invalidation, delivered at commit).
CREATE TRIGGER dist_node_invalidate AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON sharding.dist_node FOR EACH STATEMENT EXECUTE FUNCTION sharding.catalog_changed();
CREATE TRIGGER dist_colocation_invalidate AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON sharding.dist_colocation FOR EACH STATEMENT EXECUTE FUNCTION sharding.catalog_changed();
CREATE TRIGGER dist_table_invalidate AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON sharding.dist_table FOR EACH STATEMENT EXECUTE FUNCTION sharding.catalog_changed();
CREATE TRIGGER dist_shard_invalidate AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON sharding.dist_shard FOR EACH STATEMENT EXECUTE FUNCTION sharding.catalog_changed();
CREATE TRIGGER dist_placement_invalidate AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE
    ON sharding.dist_placement FOR EACH STATEMENT EXECUTE FUNCTION sharding.catalog_changed();

REVOKE ALL ON ALL TABLES IN SCHEMA sharding FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA sharding FROM PUBLIC;
GRANT USAGE ON SCHEMA sharding TO PUBLIC;
GRANT SELECT ON sharding.dist_node, sharding.dist_colocation, sharding.dist_table,
                sharding.dist_shard, sharding.dist_placement, sharding.dist_transaction, sharding.dist_cleanup,
                sharding.nodes TO PUBLIC;

-- Node management is for superusers (the functions check too).
REVOKE ALL ON FUNCTION sharding.add_node(text, integer, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION sharding.remove_node(text, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION sharding.catalog_changed() FROM PUBLIC;

-- Shards and where they live; size_bytes is asked from the nodes (NULL when unreachable).
-- A reference table's coordinator copy is the local table itself and is not listed here.
CREATE VIEW sharding.shards AS
    SELECT s.logicalrelid AS table_name, s.shard_id, s.shard_index, s.min_hash, s.max_hash,
           p.node_id, n.host, n.port, p.state, z.size_bytes
      FROM sharding.dist_shard s
      JOIN sharding.dist_placement p ON p.shard_id = s.shard_id
      JOIN sharding.dist_node n ON n.node_id = p.node_id
      LEFT JOIN sharding.shard_sizes() z ON z.shard_id = s.shard_id AND z.node_id = p.node_id
     ORDER BY s.logicalrelid::text, s.shard_index, p.node_id;
GRANT SELECT ON sharding.tables, sharding.shards TO PUBLIC;

-- The row source of the coordinator's half of a split aggregation. Plans name it, and the
-- planner replaces it by a scan of the shards' partial results; it never runs by itself.
CREATE FUNCTION sharding.task_results(plan text) RETURNS SETOF record
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'sharding.task_results() is only a placeholder inside distributed plans'
        USING ERRCODE = 'feature_not_supported';
END
$$;

-- Two-phase commit: in-doubt prepared transactions per node, with their age and what
-- recovery will do with them. Recovery itself is for superusers.
CREATE VIEW sharding.transactions AS
    SELECT node_id, node, gid, pg_catalog.to_timestamp(prepared_epoch) AS prepared,
           pg_catalog.now() - pg_catalog.to_timestamp(prepared_epoch) AS age, decision
      FROM sharding.prepared_transactions();
GRANT SELECT ON sharding.transactions TO PUBLIC;
REVOKE ALL ON FUNCTION sharding.recover_prepared_transactions() FROM PUBLIC;

-- Per shard placement: its size and row estimate (asked from its node) and the reads and
-- writes this coordinator routed to it since sharding.reset_shard_stats().
CREATE VIEW sharding.shard_stats AS
    SELECT s.logicalrelid AS table_name, s.shard_id, p.node_id, n.host, n.port,
           f.estimated_rows, f.size_bytes,
           COALESCE(c.reads, 0) AS reads, COALESCE(c.writes, 0) AS writes
      FROM sharding.dist_shard s
      JOIN sharding.dist_placement p ON p.shard_id = s.shard_id
      JOIN sharding.dist_node n ON n.node_id = p.node_id
      LEFT JOIN sharding.placement_stats() f ON f.shard_id = s.shard_id AND f.node_id = p.node_id
      LEFT JOIN sharding.shard_counters() c ON c.shard_id = s.shard_id
     ORDER BY s.logicalrelid::text, s.shard_index, p.node_id;
GRANT SELECT ON sharding.shard_stats TO PUBLIC;
REVOKE ALL ON FUNCTION sharding.reset_shard_stats() FROM PUBLIC;

-- Running rebalances, drains and splits: moves done and left, the move under way and how
-- much of it has reached the target.
CREATE VIEW sharding.rebalance_progress AS
    SELECT o.pid, o.operation, o.started_at, pg_catalog.now() - o.started_at AS elapsed,
           o.moves_done, o.moves_total, o.moves_total - o.moves_done AS moves_left,
           o.bytes_done, o.bytes_total,
           o.shard_id AS current_shard_id, o.from_node AS current_from_node, o.to_node AS current_to_node,
           o.shard_bytes AS current_bytes, sharding.bytes_on_node(o.shard_id, o.to_node) AS current_bytes_copied,
           pg_catalog.now() - o.move_started_at AS current_elapsed
      FROM sharding.operations_in_progress() o;
GRANT SELECT ON sharding.rebalance_progress TO PUBLIC;
