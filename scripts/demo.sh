#!/usr/bin/env bash
# The demo: a coordinator and two workers on 127.0.0.1, pg_sharding created everywhere, the
# workers registered; prints the node list and health. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${DEMO_PORT:-9700}
dir=${DEMO_DIR:-/tmp/pg_sharding/cluster}

bash scripts/cluster.sh start --port "$port" --workers 2 --dir "$dir"
echo
bash scripts/cluster.sh status --dir "$dir"
cat <<TXT

Connect to the coordinator:  psql -h 127.0.0.1 -p $port -U postgres
Workers:                     psql -h 127.0.0.1 -p $((port + 1)) -U postgres   (and $((port + 2)))
Stop the servers:            make demo-stop      (scripts/cluster.sh stop --dir $dir)
Remove everything:           scripts/cluster.sh destroy --dir $dir
TXT
