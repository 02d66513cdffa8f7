#!/usr/bin/env bash
# The cost of two-phase commit (issue 5): a bank transfer (two single-row UPDATEs in one
# transaction) between two accounts on the same worker (one-phase commit) against one between
# accounts on different workers (two-phase commit), with pgbench in the same run, alternating.
#
#   bash benches/transfer_bench.sh [--seconds S] [--runs K] [--clients C]
#
# Needs pg_sharding installed (make install). Starts a coordinator + 2 workers in a temporary
# directory and destroys it at the end. The servers keep fsync on: the extra WAL flushes of
# PREPARE and of the coordinator's commit record are part of what is measured.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=15 runs=2 clients=8
while [ $# -gt 0 ]; do
    case "$1" in
        --seconds) seconds=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --clients) clients=$2; shift 2 ;;
        *) echo "usage: $0 [--seconds S] [--runs K] [--clients C]" >&2; exit 2 ;;
    esac
done

work=$(mktemp -d /tmp/pgs-tbench-XXXXXX)
chmod 755 "$work"
port=$((20000 + RANDOM % 20000))
cleanup() { bash scripts/cluster.sh destroy --dir "$work/cluster" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

bash scripts/cluster.sh start --port "$port" --workers 2 --dir "$work/cluster" --set max_connections=200 >/dev/null
psql_c() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }

# 100,000 accounts over 32 shards; pairs of accounts on the same worker and on different
# workers, in coordinator-local tables (looking one up costs the same in both scripts).
psql_c <<'SQL' >/dev/null
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
SELECT create_distributed_table('accounts', 'id', shard_count => 32);
INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 100000) g;
CREATE TABLE account_node AS
    SELECT a.id, s.node_id FROM generate_series(1, 100000) a(id)
      JOIN sharding.shards s ON s.table_name = 'accounts'::regclass
       AND s.shard_id = sharding.shard_for_value('accounts', a.id);
CREATE TABLE pairs_same (i int PRIMARY KEY, a int, b int);
CREATE TABLE pairs_cross (i int PRIMARY KEY, a int, b int);
INSERT INTO pairs_same
    SELECT row_number() OVER (), x.id, y.id
      FROM (SELECT id, node_id, row_number() OVER (PARTITION BY node_id ORDER BY id) r FROM account_node) x
      JOIN (SELECT id, node_id, row_number() OVER (PARTITION BY node_id ORDER BY id DESC) r FROM account_node) y
        ON x.node_id = y.node_id AND x.r = y.r AND x.id < y.id
     LIMIT 20000;
INSERT INTO pairs_cross
    SELECT row_number() OVER (), x.id, y.id
      FROM (SELECT id, row_number() OVER (ORDER BY id) r FROM account_node WHERE node_id = (SELECT min(node_id) FROM account_node)) x
      JOIN (SELECT id, row_number() OVER (ORDER BY id) r FROM account_node WHERE node_id = (SELECT max(node_id) FROM account_node)) y
        ON x.r = y.r
     LIMIT 20000;
VACUUM ANALYZE pairs_same, pairs_cross;
SQL
for kind in same cross; do
    cat > "$work/$kind.sql" <<SCRIPT
\\set i random(1, 20000)
SELECT a, b FROM pairs_$kind WHERE i = :i \\gset
BEGIN;
UPDATE accounts SET balance = balance - 1 WHERE id = :a;
UPDATE accounts SET balance = balance + 1 WHERE id = :b;
END;
SCRIPT
done

tps() { # script
    pgbench -n -h 127.0.0.1 -p "$port" -U postgres -M prepared -c "$clients" -j 2 -T "$seconds" -f "$1" postgres 2>/dev/null \
        | awk '/^tps/ {print $3; exit}'
}
echo "bench: transfer TPS, $clients clients, ${seconds}s per run, -M prepared"
printf '%-4s %14s %14s %8s\n' run one-node two-node ratio
for run in $(seq 1 "$runs"); do
    one=$(tps "$work/same.sql")
    two=$(tps "$work/cross.sql")
    printf '%-4s %14.1f %14.1f %8.3f\n' "$run" "$one" "$two" "$(echo "$two / $one" | bc -l)"
done
total=$(psql_c -At -c "SELECT sum(balance) FROM accounts")
[ "$total" = 100000000 ] || { echo "bench: total balance changed: $total" >&2; exit 1; }
records=$(psql_c -At -c "SELECT count(*) FROM sharding.dist_transaction")
echo "bench: total balance unchanged; $records commit records awaiting the next recovery run"
