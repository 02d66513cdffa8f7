#!/usr/bin/env bash
# Shard move throughput and write stall (issue 6): one ~150 MB shard group moved online
# (logical replication) and back with block_writes, then split online in place, and a full
# rebalance of a 12-shard table onto a third worker, each while pgbench updates random rows of
# the table; the longest pgbench transaction during each is the write stall a client saw.
#
#   bash benches/move_bench.sh [--rows N] [--clients C]
#
# Needs pg_sharding installed (make install). Starts a coordinator + 2 workers in a temporary
# directory and destroys it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=1700000 clients=2
while [ $# -gt 0 ]; do
    case "$1" in
        --rows) rows=$2; shift 2 ;;
        --clients) clients=$2; shift 2 ;;
        *) echo "usage: $0 [--rows N] [--clients C]" >&2; exit 2 ;;
    esac
done
work=$(mktemp -d /tmp/pgs-mbench-XXXXXX)
chmod 755 "$work"
port=$((20000 + RANDOM % 20000))
cleanup() { bash scripts/cluster.sh destroy --dir "$work/cluster" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
bash scripts/cluster.sh start --port "$port" --workers 2 --dir "$work/cluster" --set shared_buffers=256MB >/dev/null
psql_c() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }

echo "bench: loading $rows rows into a 2-shard table"
psql_c <<SQL >/dev/null
CREATE TABLE big (id bigint PRIMARY KEY, payload text);
SELECT create_distributed_table('big', 'id', shard_count => 2);
INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, $rows) g;
SQL
shard=$(psql_c -At -c "SELECT sharding.shard_for_value('big', 1::bigint)")
bytes=$(psql_c -At -c "SELECT size_bytes FROM sharding.shards WHERE shard_id = $shard")
from=$(psql_c -At -c "SELECT node_id FROM sharding.dist_placement WHERE shard_id = $shard")
to=$(psql_c -At -c "SELECT min(node_id) FROM sharding.dist_node WHERE node_id <> $from")
printf '\\set id random(1, %s)\nUPDATE big SET payload = payload WHERE id = :id;\n' "$rows" > "$work/update.sql"
echo "bench: shard $shard, $((bytes / 1048576)) MB, node $from -> $to"

timed() { # label sql bytes script: runs sql under a pgbench load of script
    local log="$work/lat_$1"
    pgbench -n -h 127.0.0.1 -p "$port" -U postgres -c "$clients" -j 1 -T 3600 -l --log-prefix="$log" -f "$4" postgres >/dev/null 2>&1 &
    local bench=$!
    sleep 3
    local started ended
    started=$(date +%s%N)
    psql_c -c "$2" >/dev/null
    ended=$(date +%s%N)
    sleep 2
    kill -TERM "$bench" 2>/dev/null || true
    wait "$bench" 2>/dev/null || true
    local seconds stall
    seconds=$(echo "($ended - $started) / 1000000000" | bc -l)
    # Per-transaction log: client, transaction, latency (us), script, epoch s, us.
    stall=$(cat "$log"* 2>/dev/null | awk -v s="$started" -v e="$ended" '{t = $5 * 1000000000 + $6 * 1000; if (t >= s && t <= e + 2000000000 && $3 > m) m = $3} END {printf "%.0f", m / 1000}')
    printf '%-22s %8.1f s %8.1f MB/s   longest write: %s ms\n' "$1" "$seconds" "$(echo "$3 / 1048576 / $seconds" | bc -l)" "$stall"
    rm -f "$log"*
}
move() { # mode target
    timed "move $1" "SELECT sharding.move_shard($shard, $2, '$1')" "$bytes" "$work/update.sql"
}
echo "bench: mode, time, throughput, longest write"
move online "$to"
psql_c -c "SELECT sharding.cleanup_old_placements()" >/dev/null
move block_writes "$from"
count=$(psql_c -At -c "SELECT count(*) FROM big")
[ "$count" = "$rows" ] || { echo "bench: row count changed: $count" >&2; exit 1; }
echo "bench: $count rows, none lost"

# An online split of the same shard group in two at its median hash, in place.
psql_c -c "SELECT sharding.cleanup_old_placements()" >/dev/null
median=$(psql_c -At -c "SELECT split_point FROM sharding.hot_shards(0.0001) WHERE shard_id = $shard")
timed "split online (in place)" "SELECT sharding.split_shard($shard, ARRAY[$median])" "$bytes" "$work/update.sql"
count=$(psql_c -At -c "SELECT count(*) FROM big")
[ "$count" = "$rows" ] || { echo "bench: row count changed by the split: $count" >&2; exit 1; }
echo "bench: split into $(psql_c -At -c "SELECT count(*) FROM sharding.dist_shard WHERE logicalrelid = 'big'::regclass") shards, $count rows, none lost"

# A full rebalance onto a new node: a 12-shard table, a third worker added.
psql_c <<SQL >/dev/null
CREATE TABLE events (id bigint PRIMARY KEY, payload text);
SELECT create_distributed_table('events', 'id', shard_count => 12);
INSERT INTO events SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, $((rows / 2))) g;
SQL
bash scripts/cluster.sh start --port "$port" --workers 3 --dir "$work/cluster" >/dev/null
printf '\\set id random(1, %s)\nUPDATE events SET payload = payload WHERE id = :id;\n' "$((rows / 2))" > "$work/update_events.sql"
planned=$(psql_c -At -F ' ' -c "SELECT count(*), coalesce(sum(bytes), 0) FROM sharding.rebalance_plan()")
moves=${planned%% *}
timed "rebalance onto node 3" "SELECT count(*) FROM rebalance_shards()" "${planned##* }" "$work/update_events.sql"
spread=$(psql_c -At -c "SELECT string_agg(shard_count::text, '/' ORDER BY node_id) FROM sharding.table_distribution('events')")
printf 'rebalance onto a new third node: %s shard groups moved (MB/s above: their bytes over the whole time); events shards per node %s\n' "$moves" "$spread"
ecount=$(psql_c -At -c "SELECT count(*) FROM events")
[ "$ecount" = "$((rows / 2))" ] || { echo "bench: events row count changed: $ecount" >&2; exit 1; }
