#!/usr/bin/env bash
# Placements on the coordinator (issue 4: "a placement that lives on the coordinator itself runs
# locally, not over a loopback connection"). One server is the coordinator and the only node,
# so every shard is local; each workload is measured against the same query on a plain table
# holding the same rows, in the same run:
#   - router point SELECT by id (pgbench, 8 clients, -M prepared and -M simple)
#   - single-row UPDATE by id (pgbench, 8 clients, -M prepared)
#   - SELECT region, count(*), sum(amount), avg(amount) ... GROUP BY region (all shards)
#   - all rows to the client (COPY (SELECT * ...) TO STDOUT)
#
#   bash benches/local_bench.sh [--users N] [--seconds S]
#
# Needs pg_sharding installed (make install). Starts a cluster in a temporary directory, removes
# its worker so that the coordinator holds all 32 shards, and destroys it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
users=1000000 seconds=10
while [ $# -gt 0 ]; do
    case "$1" in
        --users) users=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        *) echo "usage: $0 [--users N] [--seconds S]" >&2; exit 2 ;;
    esac
done

work=$(mktemp -d /tmp/pgs-lbench-XXXXXX)
chmod 755 "$work"
port=$((20000 + RANDOM % 20000))
cleanup() { bash scripts/cluster.sh destroy --dir "$work/cluster" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

bash scripts/cluster.sh start --port "$port" --workers 1 --dir "$work/cluster" \
    --set shared_buffers=256MB --set max_connections=200 >/dev/null
psql_c() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }

echo "bench: $users users on the coordinator's own 32 shards, and in a plain table"
psql_c <<SQL >/dev/null 2>&1
SELECT sharding.remove_node('127.0.0.1', $((port + 1)));
SELECT sharding.add_node('127.0.0.1', $port);
CREATE TABLE users_plain (id bigint PRIMARY KEY, name text, region text, amount numeric(12,2));
INSERT INTO users_plain SELECT g, 'user ' || g, (ARRAY['eu-west','eu-central','us-east','us-west','ap-northeast','ap-south'])[g % 6 + 1],
  (g::bigint * 7919 % 100000) / 100.0 FROM generate_series(1, $users) g;
CREATE TABLE users (LIKE users_plain INCLUDING ALL);
SELECT create_distributed_table('users', 'id', shard_count => 32);
INSERT INTO users SELECT * FROM users_plain;
VACUUM ANALYZE users_plain;
SQL
psql_c -c "VACUUM ANALYZE" >/dev/null
loopback() { psql_c -Atc "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pg_sharding:%'"; }

tps() { # table mode script
    local script="$work/$1.$2.sql"
    printf '%s\n' "$3" > "$script"
    pgbench -n -h 127.0.0.1 -p "$port" -U postgres -M "$2" -c 8 -j 2 -T "$seconds" -f "$script" postgres 2>/dev/null \
        | awk '/^tps/ {print int($3)}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }

echo "== router point SELECT and single-row UPDATE (pgbench, 8 clients, ${seconds}s each)"
for mode in prepared simple; do
    plain=$(tps plain "$mode" "\\set id random(1, $users)
SELECT * FROM users_plain WHERE id = :id;")
    dist=$(tps dist "$mode" "\\set id random(1, $users)
SELECT * FROM users WHERE id = :id;")
    echo "SELECT -M $mode: distributed $dist tps, plain table $plain tps, ratio $(ratio "$dist" "$plain")"
done
plain=$(tps uplain prepared "\\set id random(1, $users)
UPDATE users_plain SET amount = amount + 1 WHERE id = :id;")
dist=$(tps udist prepared "\\set id random(1, $users)
UPDATE users SET amount = amount + 1 WHERE id = :id;")
echo "UPDATE -M prepared: distributed $dist tps, plain table $plain tps, ratio $(ratio "$dist" "$plain")"
psql_c -c "VACUUM ANALYZE users_plain" -c "VACUUM ANALYZE users" >/dev/null

best() { # best of 5 runs of one statement, in ms
    local sql=$1 best=""
    for _ in 1 2 3 4 5; do
        local t
        t=$(psql_c -c '\timing on' -c "$sql" 2>/dev/null | awk '/^Time:/ {print $2}' | tail -1)
        if [ -z "$best" ] || awk -v a="$t" -v b="$best" 'BEGIN { exit !(a < b) }'; then best=$t; fi
    done
    echo "$best"
}
echo "== analytical queries (best of 5, ms)"
for pair in "GROUP BY region|SELECT region, count(*), sum(amount), avg(amount) FROM %s GROUP BY region" \
            "all rows out|COPY (SELECT * FROM %s) TO '/dev/null'"; do
    label=${pair%%|*} template=${pair#*|}
    plain=$(best "$(printf "$template" users_plain)")
    dist=$(best "$(printf "$template" users)")
    echo "$label: distributed $dist ms, plain table $plain ms, ratio $(ratio "$dist" "$plain")"
done
echo "connections from the coordinator to itself: $(loopback)"
