#!/usr/bin/env bash
# Runs every test tier of pg_sharding and ends with one summary line "summary: N passed, N failed".
#   1. unit       pure logic (crates/core), no PostgreSQL
#   2. pgrx       in-database tests (pgrx-tests/), one server started by cargo pgrx test
#   3. install    the extension (debug build) into the system PostgreSQL 15, safely
#   4. multinode  real coordinator + workers on loopback ports (tests/multinode)
# Setup (packages, cargo-pgrx, pgrx init) is done by `make test` before this script.
set -uo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
MULTINODE_THREADS=${MULTINODE_THREADS:-2}

logs=$(mktemp -d)
passed=0 failed=0
report=()

run_tier() {
    local name=$1 started status tier_passed tier_failed
    shift
    echo "=== tier: $name"
    started=$(date +%s)
    "$@" 2>&1 | tee "$logs/$name.log"
    status=${PIPESTATUS[0]}
    # Count cargo's "test result:" lines; a tier that failed without any counted failure
    # (build error, setup error) still counts as one failure.
    tier_passed=$(grep -oE 'test result: [A-Za-z]+\. [0-9]+ passed' "$logs/$name.log" | awk '{s += $4} END {print s + 0}')
    tier_failed=$(grep -oE '[0-9]+ failed;' "$logs/$name.log" | awk '{s += $1} END {print s + 0}')
    if [ "$status" != 0 ] && [ "$tier_failed" = 0 ]; then tier_failed=1; fi
    passed=$((passed + tier_passed))
    failed=$((failed + tier_failed))
    report+=("$(printf '%-10s %-4s %4d passed %3d failed %5ds' "$name" "$([ "$status" = 0 ] && echo ok || echo FAIL)" "$tier_passed" "$tier_failed" $(($(date +%s) - started)))")
    return "$status"
}

pgrx_tier() {
    local pgdata=/tmp/pgs-pgrx-$$
    # cargo pgrx test copies the library over the installed one; unlinking it first gives the
    # copy a new inode, so running servers (a demo cluster) keep the file they have mapped.
    rm -f "$("$PG_CONFIG" --pkglibdir)/pg_sharding.so"
    local runas=()
    if [ "$(id -u)" = 0 ]; then
        install -d -o postgres -g postgres "$pgdata"
        runas=(--runas postgres --pgdata "$pgdata")
    fi
    cargo pgrx test pg15 "${runas[@]}"
    local status=$?
    rm -rf "$pgdata"
    return $status
}

run_tier unit cargo test -p sharding_core
run_tier pgrx pgrx_tier
if run_tier install bash scripts/install.sh debug; then
    run_tier multinode cargo test -p pg_sharding_multinode -- --test-threads="$MULTINODE_THREADS"
else
    report+=("multinode  SKIP (extension not installed)")
    failed=$((failed + 1))
fi

echo
echo "=== pg_sharding test summary"
printf '%s\n' "${report[@]}"
rm -rf "$logs"
echo "summary: $passed passed, $failed failed"
[ "$failed" = 0 ]
