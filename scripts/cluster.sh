#!/usr/bin/env bash
# cluster.sh: a local pg_sharding cluster on 127.0.0.1: one coordinator and N workers, each a
# real PostgreSQL 15 server run as the `postgres` OS user (when invoked as root).
#
#   scripts/cluster.sh start   [--port P] [--workers N] [--dir D] [--db NAME] [--set name=value ...]
#   scripts/cluster.sh stop    [--dir D]
#   scripts/cluster.sh restart [--dir D]     (stop, then start: servers load a newly installed build)
#   scripts/cluster.sh status  [--dir D]
#   scripts/cluster.sh destroy [--dir D]
#   scripts/cluster.sh node-stop  NODE [--mode fast|immediate] [--dir D]   (NODE: coordinator, worker1, ...)
#   scripts/cluster.sh node-start NODE [--dir D]
#
# The coordinator listens on port P (default 9700), worker i on P+i. `start` builds nothing: it
# creates what is missing (data directories, extension, node registrations), starts what is
# stopped, and waits until every node accepts connections. It is safe to run again, and with a
# larger --workers it adds workers. --set values are saved and apply on every later start until
# given again.
set -euo pipefail

PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
BIN=$("$PG_CONFIG" --bindir)
HOST=127.0.0.1

die() { echo "cluster.sh: $*" >&2; exit 1; }

usage() {
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

[ $# -ge 1 ] || usage
command=$1
shift
node_arg=
case "$command" in
    node-stop|node-start)
        [ $# -ge 1 ] || usage
        node_arg=$1
        shift
        ;;
esac

port= workers= dir=${PG_SHARDING_CLUSTER_DIR:-/tmp/pg_sharding/cluster} db= mode=fast
sets=()
sets_given=0
while [ $# -gt 0 ]; do
    case "$1" in
        --port) port=${2:?--port needs a value}; shift 2 ;;
        --workers) workers=${2:?--workers needs a value}; shift 2 ;;
        --dir) dir=${2:?--dir needs a value}; shift 2 ;;
        --db) db=${2:?--db needs a value}; shift 2 ;;
        --mode) mode=${2:?--mode needs a value}; shift 2 ;;
        --set) sets+=("${2:?--set needs name=value}"); sets_given=1; shift 2 ;;
        -h|--help) usage ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
[ -z "$port" ] || is_uint "$port" || die "--port must be a number, got '$port'"
[ -z "$workers" ] || is_uint "$workers" || die "--workers must be a number, got '$workers'"
[[ -z "$db" || $db =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--db must be a plain identifier, got '$db'"
case "$mode" in fast|immediate|smart) ;; *) die "--mode must be fast, immediate or smart" ;; esac
dir=$(realpath -m "$dir")
state="$dir/cluster.env"
saved_settings="$dir/settings.conf"

# Servers run as `postgres` when we are root (initdb refuses root); otherwise as ourselves.
as_server_user() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

load_state() {
    [ -f "$state" ] || return 1
    # shellcheck disable=SC1090
    . "$state"
    return 0
}

node_names() {
    echo coordinator
    local i
    for ((i = 1; i <= CLUSTER_WORKERS; i++)); do echo "worker$i"; done
}

node_port() {
    case "$1" in
        coordinator) echo "$CLUSTER_PORT" ;;
        worker*) echo $((CLUSTER_PORT + ${1#worker})) ;;
        *) die "unknown node '$1' (coordinator, worker1, ...)" ;;
    esac
}

is_running() { as_server_user "$BIN/pg_ctl" -D "$dir/$1" status >/dev/null 2>&1; }

psql_node() {
    local port=$1
    shift
    psql -X -q -v ON_ERROR_STOP=1 -h "$HOST" -p "$port" -U postgres -d "$CLUSTER_DB" "$@"
}

write_config() {
    local name=$1 port=$2 conf="$dir/$1/pg_sharding_cluster.conf"
    {
        echo "# written by scripts/cluster.sh on every start; put own settings in settings.conf via --set"
        echo "listen_addresses = '$HOST'"
        echo "port = $port"
        echo "unix_socket_directories = '$dir'"
        echo "shared_preload_libraries = 'pg_sharding'"
        echo "max_prepared_transactions = 100"
        echo "wal_level = logical                 # online shard moves use logical replication"
        echo "max_connections = 200"
        echo "lc_messages = 'C'"
        echo "log_line_prefix = '%m [%p] %q%u@%d '"
        if [ -f "$saved_settings" ]; then cat "$saved_settings"; fi
    } | as_server_user tee "$conf" >/dev/null
    grep -q "^include_if_exists = 'pg_sharding_cluster.conf'" "$dir/$name/postgresql.conf" ||
        echo "include_if_exists = 'pg_sharding_cluster.conf'" | as_server_user tee -a "$dir/$name/postgresql.conf" >/dev/null
}

init_node() {
    local name=$1
    [ -f "$dir/$name/PG_VERSION" ] && return 0
    echo "cluster.sh: initdb $name"
    as_server_user "$BIN/initdb" -D "$dir/$name" -U postgres -A trust --locale=C.UTF-8 -E UTF8 -N >"$dir/$name.initdb.log" 2>&1 ||
        { cat "$dir/$name.initdb.log" >&2; die "initdb of $name failed"; }
}

start_node() {
    local name=$1
    is_running "$name" && return 0
    # Without the shell's RUST_BACKTRACE: the servers would append a Rust backtrace to the
    # DETAIL of errors raised through the extension.
    if ! as_server_user env -u RUST_BACKTRACE -u RUST_LIB_BACKTRACE "$BIN/pg_ctl" -D "$dir/$name" -l "$dir/$name.log" -w -t 60 start >/dev/null 2>&1; then
        tail -n 20 "$dir/$name.log" >&2 || true
        die "$name did not start (port $(node_port "$name")); log: $dir/$name.log"
    fi
}

stop_node() {
    local name=$1 how=$2
    is_running "$name" || return 0
    as_server_user "$BIN/pg_ctl" -D "$dir/$name" -m "$how" -w -t 60 stop >/dev/null
}

wait_ready() {
    local port=$1 tries=0
    until "$BIN/pg_isready" -q -h "$HOST" -p "$port" -d "$CLUSTER_DB" -U postgres; do
        tries=$((tries + 1))
        [ $tries -lt 300 ] || die "node on port $port does not accept connections"
        sleep 0.1
    done
}

cmd_start() {
    local extension_dir
    extension_dir="$("$PG_CONFIG" --sharedir)/extension"
    [ -f "$extension_dir/pg_sharding.control" ] ||
        die "pg_sharding is not installed into $extension_dir: run 'make install' first (start builds nothing)"

    if load_state; then
        [ -z "$port" ] || [ "$port" = "$CLUSTER_PORT" ] ||
            die "the cluster in $dir uses port $CLUSTER_PORT; destroy it first to change the port"
        [ -z "$db" ] || [ "$db" = "$CLUSTER_DB" ] ||
            die "the cluster in $dir uses database $CLUSTER_DB; destroy it first to change it"
        if [ -n "$workers" ]; then
            [ "$workers" -ge "$CLUSTER_WORKERS" ] ||
                die "the cluster in $dir has $CLUSTER_WORKERS workers; removing workers is done with sharding.remove_node"
            CLUSTER_WORKERS=$workers
        fi
    else
        CLUSTER_PORT=${port:-9700}
        CLUSTER_WORKERS=${workers:-2}
        CLUSTER_DB=${db:-postgres}
    fi
    [ "$CLUSTER_PORT" -ge 1024 ] && [ $((CLUSTER_PORT + CLUSTER_WORKERS)) -le 65535 ] ||
        die "ports $CLUSTER_PORT..$((CLUSTER_PORT + CLUSTER_WORKERS)) are out of range"

    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$dir"; fi
    as_server_user test -w "$dir" ||
        die "$dir is not writable by the server user (its parent directories must be searchable)"
    printf 'CLUSTER_PORT=%s\nCLUSTER_WORKERS=%s\nCLUSTER_DB=%s\n' "$CLUSTER_PORT" "$CLUSTER_WORKERS" "$CLUSTER_DB" >"$state"
    if [ "$sets_given" = 1 ]; then
        : >"$saved_settings"
        local setting
        for setting in "${sets[@]}"; do
            [[ $setting == *=* ]] || die "--set takes name=value, got '$setting'"
            echo "${setting%%=*} = ${setting#*=}" >>"$saved_settings"
        done
    fi

    local name
    for name in $(node_names); do
        init_node "$name"
        write_config "$name" "$(node_port "$name")"
        start_node "$name"
    done
    for name in $(node_names); do
        wait_ready "$(node_port "$name")"
        if [ "$CLUSTER_DB" != postgres ]; then
            psql -X -q -h "$HOST" -p "$(node_port "$name")" -U postgres -d postgres -tA \
                -c "SELECT 1 FROM pg_database WHERE datname = '$CLUSTER_DB'" | grep -q 1 ||
                "$BIN/createdb" -h "$HOST" -p "$(node_port "$name")" -U postgres "$CLUSTER_DB"
        fi
        psql_node "$(node_port "$name")" -c "CREATE EXTENSION IF NOT EXISTS pg_sharding" 2>&1 | grep -v NOTICE || true
    done
    local i worker_port
    for ((i = 1; i <= CLUSTER_WORKERS; i++)); do
        worker_port=$((CLUSTER_PORT + i))
        psql_node "$CLUSTER_PORT" -tA -c "SELECT sharding.add_node('$HOST', $worker_port)
            WHERE NOT EXISTS (SELECT 1 FROM sharding.nodes WHERE host = '$HOST' AND port = $worker_port)" >/dev/null
    done
    echo "cluster.sh: coordinator on $HOST:$CLUSTER_PORT, $CLUSTER_WORKERS worker(s) on ports $((CLUSTER_PORT + 1))..$((CLUSTER_PORT + CLUSTER_WORKERS)), data in $dir"
}

cmd_stop() {
    load_state || { echo "cluster.sh: no cluster in $dir"; return 0; }
    local name
    for name in $(node_names); do
        if [ -d "$dir/$name" ]; then stop_node "$name" fast; fi
    done
    echo "cluster.sh: stopped the servers in $dir"
}

cmd_status() {
    load_state || die "no cluster in $dir"
    local name state_text
    for name in $(node_names); do
        if is_running "$name"; then state_text="running"; else state_text="stopped"; fi
        printf '%-12s %s:%-5s %s\n' "$name" "$HOST" "$(node_port "$name")" "$state_text"
    done
    if is_running coordinator; then
        echo
        psql_node "$CLUSTER_PORT" -c "SELECT * FROM sharding.nodes" \
            -c "SELECT node_id, host, port, reachable, round(latency_ms::numeric, 2) AS latency_ms, extension_version, error FROM sharding.node_health()"
    fi
}

cmd_destroy() {
    if ! load_state; then
        if [ -e "$dir" ]; then die "$dir holds no cluster.env: refusing to delete a directory this tool did not create"; fi
        echo "cluster.sh: no cluster in $dir"
        return 0
    fi
    local name
    for name in $(node_names); do
        if [ -d "$dir/$name" ]; then stop_node "$name" immediate; fi
    done
    rm -rf "$dir"
    echo "cluster.sh: destroyed $dir"
}

case "$command" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status) cmd_status ;;
    destroy) cmd_destroy ;;
    node-stop) load_state || die "no cluster in $dir"; node_port "$node_arg" >/dev/null; stop_node "$node_arg" "$mode" ;;
    node-start) load_state || die "no cluster in $dir"; node_port "$node_arg" >/dev/null; start_node "$node_arg"; wait_ready "$(node_port "$node_arg")" ;;
    *) usage ;;
esac
