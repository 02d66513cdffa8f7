#!/usr/bin/env bash
# COPY throughput: a CSV file of N rows (default 2,000,000) of
#   (id bigint, name text, email text, region text, amount numeric(12,2), created_at timestamptz)
# loaded (a) into a plain table on a single server and (b) into a 32-shard distributed table
# through the coordinator of a 1 + 2 node cluster. Both loads use psql's \copy from the same
# file, in the same run, on the same machine; the script prints rows/s for each and the ratio.
#
#   bash benches/copy_load.sh [--rows N] [--runs K]
#
# Needs pg_sharding installed (make install). Starts its own cluster in a temporary directory
# and destroys it at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=2000000 runs=3
while [ $# -gt 0 ]; do
    case "$1" in
        --rows) rows=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        *) echo "usage: $0 [--rows N] [--runs K]" >&2; exit 2 ;;
    esac
done

work=$(mktemp -d /tmp/pgs-bench-XXXXXX)
chmod 755 "$work"
port=$((20000 + RANDOM % 20000))
cleanup() { bash scripts/cluster.sh destroy --dir "$work/cluster" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

echo "bench: generating $rows rows"
python3 - "$rows" "$work/rows.csv" <<'PY'
import sys, random
n, path = int(sys.argv[1]), sys.argv[2]
random.seed(7)
regions = ["eu-west", "eu-central", "us-east", "us-west", "ap-northeast", "ap-south"]
with open(path, "w") as f:
    for i in range(1, n + 1):
        f.write(f"{i},name {i},user{i}@example.com,{regions[i % 6]},{random.randint(0, 9999999) / 100:.2f},"
                f"2026-{1 + i % 12:02d}-{1 + i % 28:02d} {i % 24:02d}:{i % 60:02d}:{(i * 7) % 60:02d}+00\n")
PY
ls -la "$work/rows.csv" | awk '{printf "bench: %.0f MB of CSV\n", $5 / 1048576}'

bash scripts/cluster.sh start --port "$port" --workers 2 --dir "$work/cluster" >/dev/null
psql_c() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }
schema="id bigint, name text, email text, region text, amount numeric(12,2), created_at timestamptz"

best_plain=0 best_dist=0
for run in $(seq 1 "$runs"); do
    psql_c -c "DROP TABLE IF EXISTS plain_rows, dist_rows" -c "CREATE TABLE plain_rows ($schema)" \
        -c "CREATE TABLE dist_rows ($schema)" -c "SELECT create_distributed_table('dist_rows', 'id', shard_count => 32)" >/dev/null
    psql_c -c "CHECKPOINT" >/dev/null
    start=$(date +%s.%N)
    psql_c -c "\\copy plain_rows FROM '$work/rows.csv' WITH (FORMAT csv)" >/dev/null
    plain_s=$(echo "$(date +%s.%N) - $start" | bc)
    psql_c -c "CHECKPOINT" >/dev/null
    for w in 1 2; do psql -X -q -h 127.0.0.1 -p $((port + w)) -U postgres -c "CHECKPOINT" >/dev/null; done
    start=$(date +%s.%N)
    psql_c -c "\\copy dist_rows FROM '$work/rows.csv' WITH (FORMAT csv)" >/dev/null
    dist_s=$(echo "$(date +%s.%N) - $start" | bc)
    loaded=$(for w in 1 2; do psql -X -tA -h 127.0.0.1 -p $((port + w)) -U postgres -c \
        "SELECT coalesce(sum(n_tup_ins), 0) FROM pg_stat_user_tables WHERE relname ~ '^dist_rows_[0-9]+\$'"; done | paste -sd+ | bc)
    plain_rate=$(echo "$rows / $plain_s" | bc)
    dist_rate=$(echo "$rows / $dist_s" | bc)
    printf 'run %d: single server %8d rows/s (%.1f s)   distributed %8d rows/s (%.1f s)   ratio %.2f   rows in shards %s\n' \
        "$run" "$plain_rate" "$plain_s" "$dist_rate" "$dist_s" "$(echo "$dist_rate / $plain_rate" | bc -l)" "$loaded"
    [ "$plain_rate" -gt "$best_plain" ] && best_plain=$plain_rate
    [ "$dist_rate" -gt "$best_dist" ] && best_dist=$dist_rate
done
printf 'best of %d: single server %d rows/s, distributed %d rows/s, ratio %.2f (target >= 0.80)\n' \
    "$runs" "$best_plain" "$best_dist" "$(echo "$best_dist / $best_plain" | bc -l)"
