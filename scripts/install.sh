#!/usr/bin/env bash
# Builds pg_sharding and installs it into the system PostgreSQL 15.
#   scripts/install.sh [release|debug]      (default: release)
# Running servers keep working: every file is copied beside its destination and renamed over
# it, so a server that has the old library mapped keeps the old inode instead of seeing its
# code change underneath it (which crashes it).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
profile=${1:-release}
case "$profile" in
    release) flags=() ;;
    # The test build: debug, with the fault-injection points of the failure tests.
    debug) flags=(--debug --features fault_injection) ;;
    *) echo "usage: $0 [release|debug]" >&2; exit 2 ;;
esac

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if ! cargo pgrx package --pg-config "$PG_CONFIG" "${flags[@]}" --out-dir "$out" >"$out.log" 2>&1; then
    cat "$out.log" >&2
    exit 1
fi
rm -f "$out.log"

sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
count=0
while IFS= read -r -d '' file; do
    relative=${file#"$out"}
    mode=644
    case "$relative" in *.so) mode=755 ;; esac
    sudo_if_needed install -D -m "$mode" "$file" "$relative.tmp.$$"
    sudo_if_needed mv -f "$relative.tmp.$$" "$relative"
    count=$((count + 1))
done < <(find "$out" -type f -print0)
echo "install: pg_sharding ($profile) installed into $("$PG_CONFIG" --pkglibdir) and $("$PG_CONFIG" --sharedir)/extension ($count files)"
