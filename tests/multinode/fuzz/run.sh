#!/usr/bin/env bash
# Random differential queries: starts a coordinator + 2 workers, loads the differential dataset
# (tests/multinode/differential/) distributed (schema d) and as plain tables (schema l), runs the
# generators with a few seeds and prints every query whose results differ (dml.py: every UPDATE
# or DELETE whose RETURNING rows or resulting table differ; merge.py: every MERGE whose target differs). Not part of make test.
#   bash tests/multinode/fuzz/run.sh [--seeds N] [--first SEED] [--queries N]
# Needs pg_sharding installed (make install) and python3.
set -euo pipefail
cd "$(dirname "$0")/../../.."
seeds=3 first=1 queries=200
while [ $# -gt 0 ]; do
    case "$1" in
        --seeds) seeds=$2; shift 2 ;;
        --queries) queries=$2; shift 2 ;;
        --first) first=$2; shift 2 ;;
        *) echo "usage: $0 [--seeds N] [--first SEED] [--queries N]" >&2; exit 2 ;;
    esac
done
work=$(mktemp -d /tmp/pgs-fuzz-XXXXXX)
chmod 755 "$work"
port=$((20000 + RANDOM % 20000))
cleanup() { bash scripts/cluster.sh destroy --dir "$work/cluster" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
bash scripts/cluster.sh start --port "$port" --workers 2 --dir "$work/cluster" >/dev/null
psql_c() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }
data=tests/multinode/differential
for s in d l; do
    sed -e "s/@s2/${s}2/g" -e "s/@s/$s/g" "$data/schema.sql" | psql_c
    if [ "$s" = d ]; then psql_c -f "$data/distribute.sql" >/dev/null; fi
    sed -e "s/@s2/${s}2/g" -e "s/@s/$s/g" "$data/data.sql" | psql_c
done
failed=0
for seed in $(seq "$first" $((first + seeds - 1))); do
    for generator in aggregates subqueries shapes dml merge inserts transactions; do
        out=$(FUZZ_PORT=$port python3 "tests/multinode/fuzz/$generator.py" "$seed" "$queries")
        echo "$generator seed $seed: $(echo "$out" | tail -1)"
        if ! echo "$out" | tail -1 | grep -q "failures 0$"; then
            echo "$out" | head -n -1
            failed=1
        fi
    done
done
exit "$failed"
