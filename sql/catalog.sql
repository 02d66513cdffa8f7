-- pg_sharding catalog. Created first (bootstrap), before any function.
-- These tables are written only by the extension's functions: PUBLIC may read, never write.

CREATE TABLE sharding.dist_node (
    node_id            integer PRIMARY KEY,
    host               text    NOT NULL CHECK (host <> ''),
    port               integer NOT NULL CHECK (port BETWEEN 1 AND 65535),
    region             text,
    is_active          boolean NOT NULL DEFAULT true,
    system_identifier  bigint,
    -- This coordinator itself: its placements run in the coordinator's own backends.
    is_coordinator     boolean NOT NULL DEFAULT false,
    added_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (host, port)
);
CREATE SEQUENCE sharding.dist_node_id_seq AS integer OWNED BY sharding.dist_node.node_id;

-- Tables whose shards share placements: shard i of every member lives on the same node(s).
CREATE TABLE sharding.dist_colocation (
    colocation_id        integer PRIMARY KEY,
    shard_count          integer NOT NULL CHECK (shard_count > 0),
    distribution_type    regtype,
    replication_factor   integer NOT NULL DEFAULT 1 CHECK (replication_factor > 0)
);
CREATE SEQUENCE sharding.dist_colocation_id_seq AS integer OWNED BY sharding.dist_colocation.colocation_id;

CREATE TABLE sharding.dist_table (
    logicalrelid         regclass PRIMARY KEY,
    method               text NOT NULL CHECK (method IN ('hash', 'reference', 'range', 'list')),
    -- attnum of the distribution column (stable across RENAME COLUMN); NULL for reference tables
    distribution_attnum  smallint,
    colocation_id        integer REFERENCES sharding.dist_colocation (colocation_id),
    replication_factor   integer NOT NULL DEFAULT 1 CHECK (replication_factor > 0),
    CHECK ((method = 'reference') = (distribution_attnum IS NULL))
);

-- One row per shard. Hash shards own [min_hash, max_hash]; range/list shards use the text bounds.
CREATE TABLE sharding.dist_shard (
    shard_id      bigint PRIMARY KEY,
    logicalrelid  regclass NOT NULL REFERENCES sharding.dist_table (logicalrelid) ON DELETE CASCADE,
    shard_index   integer NOT NULL,
    min_hash      integer,
    max_hash      integer,
    min_value     text,
    max_value     text,
    CHECK (min_hash IS NULL OR max_hash IS NULL OR min_hash <= max_hash),
    UNIQUE (logicalrelid, shard_index)
);
CREATE SEQUENCE sharding.dist_shard_id_seq AS bigint START WITH 102008 OWNED BY sharding.dist_shard.shard_id;

CREATE TABLE sharding.dist_placement (
    placement_id  bigint PRIMARY KEY,
    shard_id      bigint  NOT NULL REFERENCES sharding.dist_shard (shard_id) ON DELETE CASCADE,
    node_id       integer NOT NULL REFERENCES sharding.dist_node (node_id),
    state         text    NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'inactive', 'to_delete')),
    UNIQUE (shard_id, node_id)
);
CREATE INDEX dist_placement_node_idx ON sharding.dist_placement (node_id);
CREATE SEQUENCE sharding.dist_placement_id_seq AS bigint OWNED BY sharding.dist_placement.placement_id;

-- pg_dump of a coordinator keeps the catalog contents.
SELECT pg_catalog.pg_extension_config_dump('sharding.dist_node', '');
SELECT pg_catalog.pg_extension_config_dump('sharding.dist_colocation', '');
SELECT pg_catalog.pg_extension_config_dump('sharding.dist_table', '');
SELECT pg_catalog.pg_extension_config_dump('sharding.dist_shard', '');
SELECT pg_catalog.pg_extension_config_dump('sharding.dist_placement', '');

CREATE VIEW sharding.nodes AS
    SELECT node_id, host, port, region, is_active, is_coordinator
    FROM sharding.dist_node
    ORDER BY node_id;

CREATE VIEW sharding.tables AS
    SELECT t.logicalrelid AS table_name,
           t.method,
           a.attname AS distribution_column,
           pg_catalog.format_type(a.atttypid, a.atttypmod) AS column_type,
           t.colocation_id,
           (SELECT count(*) FROM sharding.dist_shard s WHERE s.logicalrelid = t.logicalrelid) AS shard_count,
           t.replication_factor
      FROM sharding.dist_table t
      LEFT JOIN pg_catalog.pg_attribute a
             ON a.attrelid = t.logicalrelid AND a.attnum = t.distribution_attnum
     ORDER BY t.logicalrelid::text;

-- Commit records of two-phase commit: one row per prepared remote transaction of a committed
-- distributed transaction, written in the coordinator's own transaction (its commit is the
-- decision). Recovery deletes the rows once their prepared transactions are resolved.
CREATE TABLE sharding.dist_transaction (
    gid         text    PRIMARY KEY,
    node_id     integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Old shard placements left behind by moves and splits, dropped later (a query may still be reading one):
-- by the next move, the maintenance worker, or sharding.cleanup_old_placements().
CREATE TABLE sharding.dist_cleanup (
    object_name  text    NOT NULL,
    node_id      integer NOT NULL,
    -- 'function': a split's trigger function (dropped with CASCADE)
    object_type  text    NOT NULL DEFAULT 'table' CHECK (object_type IN ('table', 'function')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (object_name, node_id)
);
