#!/usr/bin/env bash
# Query-engine workloads of issue 4, each measured against its baseline in the same run:
#   - router point SELECT by id through the coordinator vs the same query sent straight to the
#     worker's shard table (pgbench, 8 clients, -M prepared and -M simple)
#   - single-row UPDATE by id, the same way
#   - SELECT region, count(*), sum(amount), avg(amount) FROM users GROUP BY region
#   - a co-located join users/orders with a filter and GROUP BY region
#   - a join with a reference table
#   - an aggregating subquery joined to a local table (the subquery runs on the shards)
#   - the top 10 users by order total (grouped by the distribution column: top-N per shard)
#     (these three against the same query on plain tables holding all rows on one server)
#   - all rows of orders to the coordinator, and the time to its first row, with rows streamed
#     and gathered, against the plain table
#   - planning time of a router query (EXPLAIN (SUMMARY))
#   - when pgbouncer is installed: the router SELECT and UPDATE sent to the worker through
#     pgbouncer, the cost of one extra hop by itself on this machine (the ceiling for any
#     coordinator)
#
#   bash benches/query_bench.sh [--users N] [--seconds S]
#
# Needs pg_sharding installed (make install). Starts a coordinator + 2 workers in a temporary
# directory (32 shards) and destroys it at the end. users: N rows (default 2,000,000), orders:
# 2N rows co-located on user_id, regions: a reference table.
set -euo pipefail
cd "$(dirname "$0")/.."
users=2000000 seconds=15
while [ $# -gt 0 ]; do
    case "$1" in
        --users) users=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        *) echo "usage: $0 [--users N] [--seconds S]" >&2; exit 2 ;;
    esac
done

work=$(mktemp -d /tmp/pgs-qbench-XXXXXX)
chmod 755 "$work"
port=$((20000 + RANDOM % 20000))
cleanup() { bash scripts/cluster.sh destroy --dir "$work/cluster" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT

bash scripts/cluster.sh start --port "$port" --workers 2 --dir "$work/cluster" \
    --set shared_buffers=256MB --set max_connections=200 >/dev/null
psql_c() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres "$@"; }
psql_w() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$((port + $1))" -U postgres -d postgres "${@:2}"; }

echo "bench: loading $users users and $((2 * users)) orders (distributed and plain)"
start=$(date +%s)
psql_c <<SQL >/dev/null
CREATE TABLE regions (code text PRIMARY KEY, label text);
INSERT INTO regions VALUES ('eu-west', 'Europe West'), ('eu-central', 'Europe Central'), ('us-east', 'US East'),
  ('us-west', 'US West'), ('ap-northeast', 'Tokyo'), ('ap-south', 'Mumbai');
CREATE TABLE users_plain (id bigint PRIMARY KEY, name text, region text, amount numeric(12,2));
CREATE TABLE orders_plain (id bigint, user_id bigint, amount numeric(12,2), status text, product_id int, PRIMARY KEY (user_id, id));
CREATE TABLE products_plain (id int PRIMARY KEY, name text, category text, price numeric(10,2));
INSERT INTO products_plain SELECT g, 'product ' || g, 'category ' || (g % 40), (g * 7 % 10000) / 100.0 FROM generate_series(1, 10000) g;
INSERT INTO users_plain SELECT g, 'user ' || g, (ARRAY['eu-west','eu-central','us-east','us-west','ap-northeast','ap-south'])[g % 6 + 1], (g::bigint * 7919 % 100000) / 100.0
  FROM generate_series(1, $users) g;
INSERT INTO orders_plain SELECT g, (g::bigint * 31) % $users + 1, (g::bigint * 104729 % 50000) / 100.0, (ARRAY['new','paid','shipped','returned'])[g % 4 + 1],
  (g::bigint * 7) % 10000 + 1
  FROM generate_series(1, 2 * $users) g;
CREATE TABLE users (LIKE users_plain INCLUDING ALL);
CREATE TABLE orders (LIKE orders_plain INCLUDING ALL);
SELECT create_distributed_table('users', 'id', shard_count => 32);
SELECT create_distributed_table('orders', 'user_id', colocate_with => 'users');
SELECT create_reference_table('regions');
-- Not co-located with users and orders: joins with it broadcast it to their shards.
CREATE TABLE products (LIKE products_plain INCLUDING ALL);
SELECT create_distributed_table('products', 'id', colocate_with => 'none');
INSERT INTO products SELECT * FROM products_plain;
-- Not co-located either, one row per ten users: joined on users' distribution column, its rows
-- are routed to the one shard each can join.
CREATE TABLE reviews_plain (id bigint PRIMARY KEY, user_id bigint, stars int, body text);
INSERT INTO reviews_plain SELECT g, (g::bigint * 7907) % $users + 1, g % 5 + 1, 'review ' || g FROM generate_series(1, $users / 10) g;
CREATE TABLE reviews (LIKE reviews_plain INCLUDING ALL);
SELECT create_distributed_table('reviews', 'id', colocate_with => 'none');
INSERT INTO reviews SELECT * FROM reviews_plain;
INSERT INTO users SELECT * FROM users_plain;
INSERT INTO orders SELECT * FROM orders_plain;
CREATE TABLE regions_plain AS SELECT * FROM regions;
VACUUM ANALYZE users_plain, orders_plain, regions_plain, products_plain, reviews_plain;
SQL
for w in 1 2; do psql_w $w -c "VACUUM ANALYZE" >/dev/null; done
echo "bench: loaded in $(( $(date +%s) - start )) s"

# The direct baseline: the same statements sent straight to worker 1, on a plain table there
# holding every user (so that any random id finds its row, as through the coordinator; an index
# over 2M rows instead of a shard's 62,500 only makes the baseline a little slower).
worker=1
worker_port=$((port + worker))
psql_c -c "\\copy users_plain TO '$work/users.tsv'" >/dev/null
psql_w "$worker" -c "CREATE TABLE users_direct (id bigint PRIMARY KEY, name text, region text, amount numeric(12,2))" \
    -c "\\copy users_direct FROM '$work/users.tsv'" -c "VACUUM ANALYZE users_direct" >/dev/null
for target in coord direct; do
    table=users; [ "$target" = direct ] && table=users_direct
    printf '\\set id random(1, %s)\nSELECT * FROM %s WHERE id = :id;\n' "$users" "$table" > "$work/select_$target.sql"
    printf '\\set id random(1, %s)\nUPDATE %s SET amount = amount + 1 WHERE id = :id;\n' "$users" "$table" > "$work/update_$target.sql"
done

tps() { # port mode script
    pgbench -n -h 127.0.0.1 -p "$1" -U postgres -M "$2" -c 8 -j 2 -T "$seconds" -f "$3" postgres 2>/dev/null \
        | awk '/^tps/ {print $3; exit}'
}
ratio() { echo "scale=3; $1 / $2" | bc; }

echo
echo "== router point SELECT and single-row UPDATE (pgbench, 8 clients, ${seconds}s each)"
for mode in prepared simple; do
    d=$(tps "$worker_port" "$mode" "$work/select_direct.sql")
    c=$(tps "$port" "$mode" "$work/select_coord.sql")
    printf "SELECT -M %-8s direct %8.0f tps  coordinator %8.0f tps  ratio %s\n" "$mode" "$d" "$c" "$(ratio "$c" "$d")"
done
d=$(tps "$worker_port" prepared "$work/update_direct.sql")
c=$(tps "$port" prepared "$work/update_coord.sql")
printf "UPDATE -M prepared direct %8.0f tps  coordinator %8.0f tps  ratio %s\n" "$d" "$c" "$(ratio "$c" "$d")"

# What one extra hop costs on this machine by itself: the same direct statements through
# pgbouncer (a connection proxy that only forwards protocol messages, session pooling) in front
# of worker 1. Skipped when pgbouncer is not installed (apt-get install pgbouncer).
if command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ]; then
    bouncer=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
    bouncer_port=$((port + 50))
    mkdir -p "$work/bouncer"
    cat > "$work/bouncer/pgbouncer.ini" <<INI
[databases]
postgres = host=127.0.0.1 port=$worker_port dbname=postgres user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
auth_type = trust
auth_file = $work/bouncer/users.txt
pool_mode = session
max_client_conn = 100
default_pool_size = 20
logfile = $work/bouncer/pgbouncer.log
pidfile = $work/bouncer/pgbouncer.pid
INI
    echo '"postgres" ""' > "$work/bouncer/users.txt"
    as_user() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
    [ "$(id -u)" = 0 ] && chown -R postgres "$work/bouncer"
    as_user "$bouncer" -d "$work/bouncer/pgbouncer.ini"
    stop_bouncer() { kill "$(cat "$work/bouncer/pgbouncer.pid" 2>/dev/null)" 2>/dev/null || true; }
    trap 'stop_bouncer; cleanup' EXIT
    sleep 1
    d=$(tps "$worker_port" prepared "$work/select_direct.sql")
    b=$(tps "$bouncer_port" prepared "$work/select_direct.sql")
    printf "one-hop proxy (pgbouncer): SELECT -M prepared direct %8.0f tps  via pgbouncer %8.0f tps  ratio %s\n" "$d" "$b" "$(ratio "$b" "$d")"
    d=$(tps "$worker_port" prepared "$work/update_direct.sql")
    b=$(tps "$bouncer_port" prepared "$work/update_direct.sql")
    printf "one-hop proxy (pgbouncer): UPDATE -M prepared direct %8.0f tps  via pgbouncer %8.0f tps  ratio %s\n" "$d" "$b" "$(ratio "$b" "$d")"
    stop_bouncer
else
    echo "one-hop proxy baseline skipped: pgbouncer is not installed"
fi

second_ms() { # port sql: the second of two runs in one fresh session (the first warms it), in ms
    { echo '\timing on'; echo "$2;"; echo "$2;"; } |
        psql -X -q -h 127.0.0.1 -p "$1" -U postgres -d postgres | awk '/^Time:/ {print $2}' | tail -n 1
}
median() { sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
rounds=5
# The UPDATE runs above changed about 3 % of the distributed users' rows (the plain table none):
# vacuum their dead versions, so that autovacuum does not run during the timings and both sides
# scan tables in the same state, then write the dirty pages out, on every server.
for w in 1 2; do psql_w $w -c "VACUUM ANALYZE" >/dev/null; done
psql_c -c "CHECKPOINT" >/dev/null
for w in 1 2; do psql_w $w -c "CHECKPOINT" >/dev/null; done
echo
echo "== analytical queries (ms, median of $rounds rounds; each round runs plain, distributed with 1 and with 2"
echo "   connections per node one after another, each timed on its second run in a fresh session;"
echo "   plain = the same rows in plain tables on one server)"
compare() { # label distributed-sql plain-sql
    local plain=() one=() two=() p o t
    for _ in $(seq 1 "$rounds"); do
        plain+=("$(second_ms "$port" "$3")")
        one+=("$(PGOPTIONS="-c sharding.max_connections_per_node=1 ${EXTRA_OPTIONS:-}" second_ms "$port" "$2")")
        two+=("$(PGOPTIONS="-c sharding.max_connections_per_node=2 ${EXTRA_OPTIONS:-}" second_ms "$port" "$2")")
    done
    p=$(printf '%s\n' "${plain[@]}" | median)
    o=$(printf '%s\n' "${one[@]}" | median)
    t=$(printf '%s\n' "${two[@]}" | median)
    printf "%-32s plain %8.1f ms  distributed %8.1f ms (ratio %s), with 2 connections/node %8.1f ms (ratio %s)\n" \
        "$1" "$p" "$o" "$(ratio "$o" "$p")" "$t" "$(ratio "$t" "$p")"
    echo "    runs: plain ${plain[*]} | distributed ${one[*]} | 2 connections/node ${two[*]}"
}
compare "GROUP BY region" \
    "SELECT region, count(*), sum(amount), avg(amount) FROM users GROUP BY region" \
    "SELECT region, count(*), sum(amount), avg(amount) FROM users_plain GROUP BY region"
compare "co-located join + GROUP BY" \
    "SELECT u.region, count(*), sum(o.amount) FROM users u JOIN orders o ON o.user_id = u.id WHERE o.status = 'paid' GROUP BY u.region" \
    "SELECT u.region, count(*), sum(o.amount) FROM users_plain u JOIN orders_plain o ON o.user_id = u.id WHERE o.status = 'paid' GROUP BY u.region"
compare "reference-table join" \
    "SELECT r.label, count(*) FROM users u JOIN regions r ON r.code = u.region GROUP BY r.label" \
    "SELECT r.label, count(*) FROM users_plain u JOIN regions_plain r ON r.code = u.region GROUP BY r.label"
compare "top users by total (GROUP BY the distribution column, ORDER BY LIMIT)" \
    "SELECT user_id, count(*), sum(amount) FROM orders GROUP BY user_id ORDER BY sum(amount) DESC, user_id LIMIT 10" \
    "SELECT user_id, count(*), sum(amount) FROM orders_plain GROUP BY user_id ORDER BY sum(amount) DESC, user_id LIMIT 10"
# regions_plain is a local table on the coordinator: the statement takes the general plan, and
# the subquery aggregates on the shards.
compare "subquery joined to local" \
    "SELECT r.label, s.n, s.total FROM (SELECT region, count(*) n, sum(amount) total FROM users GROUP BY region) s JOIN regions_plain r ON r.code = s.region" \
    "SELECT r.label, s.n, s.total FROM (SELECT region, count(*) n, sum(amount) total FROM users_plain GROUP BY region) s JOIN regions_plain r ON r.code = s.region"
# products is not co-located with orders: the filtered products go to every orders shard, where
# the join and the partial aggregates run; then the same with broadcasting off (the coordinator
# joins the rows of both, as before broadcast joins).
compare "non-co-located join (broadcast)" \
    "SELECT p.category, count(*), sum(o.amount) FROM orders o JOIN products p ON p.id = o.product_id WHERE p.price > 50 GROUP BY p.category" \
    "SELECT p.category, count(*), sum(o.amount) FROM orders_plain o JOIN products_plain p ON p.id = o.product_id WHERE p.price > 50 GROUP BY p.category"
EXTRA_OPTIONS="-c sharding.broadcast_join_limit=0" compare "non-co-located join (broadcast off)" \
    "SELECT p.category, count(*), sum(o.amount) FROM orders o JOIN products p ON p.id = o.product_id WHERE p.price > 50 GROUP BY p.category" \
    "SELECT p.category, count(*), sum(o.amount) FROM orders_plain o JOIN products_plain p ON p.id = o.product_id WHERE p.price > 50 GROUP BY p.category"
# reviews is joined on users' distribution column: each filtered review goes to the one users
# shard its user_id hashes to (a routed broadcast); then the same with broadcasting off.
compare "join on the distribution column, not co-located (routed)" \
    "SELECT u.region, count(*), avg(r.stars) FROM reviews r JOIN users u ON u.id = r.user_id WHERE r.stars >= 4 GROUP BY u.region" \
    "SELECT u.region, count(*), avg(r.stars) FROM reviews_plain r JOIN users_plain u ON u.id = r.user_id WHERE r.stars >= 4 GROUP BY u.region"
EXTRA_OPTIONS="-c sharding.broadcast_join_limit=0" compare "same, broadcasting off" \
    "SELECT u.region, count(*), avg(r.stars) FROM reviews r JOIN users u ON u.id = r.user_id WHERE r.stars >= 4 GROUP BY u.region" \
    "SELECT u.region, count(*), avg(r.stars) FROM reviews_plain r JOIN users_plain u ON u.id = r.user_id WHERE r.stars >= 4 GROUP BY u.region"
# An uncorrelated subquery on products (not co-located with orders): the coordinator runs it
# first and sends its ids to every orders shard (an intermediate result), where the filter and
# the partial aggregates run; then with it off (the coordinator filters every orders row).
compare "IN subquery, not co-located (intermediate result)" \
    "SELECT o.status, count(*), sum(o.amount) FROM orders o WHERE o.product_id IN (SELECT id FROM products WHERE category = 'category 7') GROUP BY o.status" \
    "SELECT o.status, count(*), sum(o.amount) FROM orders_plain o WHERE o.product_id IN (SELECT id FROM products_plain WHERE category = 'category 7') GROUP BY o.status"
EXTRA_OPTIONS="-c sharding.broadcast_join_limit=0" compare "IN subquery (intermediate result off)" \
    "SELECT o.status, count(*), sum(o.amount) FROM orders o WHERE o.product_id IN (SELECT id FROM products WHERE category = 'category 7') GROUP BY o.status" \
    "SELECT o.status, count(*), sum(o.amount) FROM orders_plain o WHERE o.product_id IN (SELECT id FROM products_plain WHERE category = 'category 7') GROUP BY o.status"

echo
echo "== all 2N rows of orders to the coordinator: COPY (SELECT ...) TO '/dev/null', and the time to"
echo "   the first row (FETCH 1 from a cursor); ms, median of $rounds rounds; streamed = rows handed on"
echo "   as they arrive (the default), gathered = sharding.stream_rows off (all rows first, in a"
echo "   tuplestore that spills beyond work_mem); plain = the plain table on one server"
first_row_ms() { # port sql: time of FETCH 1 from a cursor over sql, second of two in one session
    { echo '\timing on'; for _ in 1 2; do echo "BEGIN;"; echo "DECLARE c NO SCROLL CURSOR FOR $2;"; echo "FETCH 1 FROM c;"; echo "COMMIT;"; done; } |
        psql -X -q -h 127.0.0.1 -p "$1" -U postgres -d postgres | awk '/^Time:/ {print $2}' | sed -n 7p
}
streaming() { # label measure-function distributed-sql plain-sql
    local plain=() streamed=() gathered=() p s g
    for _ in $(seq 1 "$rounds"); do
        plain+=("$("$2" "$port" "$4")")
        streamed+=("$("$2" "$port" "$3")")
        gathered+=("$(PGOPTIONS="-c sharding.stream_rows=off" "$2" "$port" "$3")")
    done
    p=$(printf '%s\n' "${plain[@]}" | median)
    s=$(printf '%s\n' "${streamed[@]}" | median)
    g=$(printf '%s\n' "${gathered[@]}" | median)
    printf "%-32s plain %8.1f ms  streamed %8.1f ms (ratio %s)  gathered %8.1f ms (ratio %s)\n" \
        "$1" "$p" "$s" "$(ratio "$s" "$p")" "$g" "$(ratio "$g" "$p")"
    echo "    runs: plain ${plain[*]} | streamed ${streamed[*]} | gathered ${gathered[*]}"
}
streaming "COPY all orders rows" second_ms \
    "COPY (SELECT * FROM orders) TO '/dev/null'" "COPY (SELECT * FROM orders_plain) TO '/dev/null'"
streaming "first row of all orders" first_row_ms "SELECT * FROM orders" "SELECT * FROM orders_plain"

echo
echo "== planning time of a router query (EXPLAIN (SUMMARY) in one session, median of 50)"
for i in $(seq 1 50); do echo "EXPLAIN (SUMMARY) SELECT * FROM users WHERE id = $i;"; done \
    | psql_c | awk '/Planning Time/ {print $3}' | sort -n | sed -n 25p | awk '{printf "router query planning: %.3f ms\n", $1}'
