"""Random INSERT ... SELECT and INSERT ... VALUES statements into distributed tables (sources:
co-located and non-co-located tables, the reference table, the coordinator-only table, VALUES,
generate_series; with aggregates, DISTINCT, LIMIT, window functions, ON CONFLICT DO NOTHING /
DO UPDATE, RETURNING) run in a transaction on the distributed (d) and local (l) copies of the
differential dataset, then rolled back; the RETURNING rows and the target table's contents
afterwards must be the same. Prints every difference and every statement the distributed side
refuses. Usage: inserts.py SEED COUNT (FUZZ_PORT: the coordinator port)."""
import random, sys
from common import Tally
random.seed(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
N = int(sys.argv[2]) if len(sys.argv) > 2 else 200


# Sources of (a bigint id, a bigint user id, a numeric, a text), with the alias they read from.
sources = [
    "SELECT u.id + 5000, u.id, u.score::numeric, u.region FROM users u",
    "SELECT o.id + 7000, o.user_id, o.amount, o.status FROM orders o",
    "SELECT i.order_id + 9000 + i.qty * 1000, i.user_id, i.qty::numeric, i.sku FROM items i",
    "SELECT e.id + 20000, e.user_id, e.id::numeric, e.kind FROM events e",
    "SELECT o.id + 30000, u.id, o.amount, u.name FROM users u JOIN orders o ON o.user_id = u.id",
    "SELECT e.id + 40000, u.id, u.score::numeric, e.tag FROM events e JOIN users u ON u.id = e.user_id",
    "SELECT u.id + 50000, u.id, count(*)::numeric, max(o.status) FROM users u JOIN orders o ON o.user_id = u.id GROUP BY u.id",
    "SELECT min(o.id) + 60000, o.user_id, sum(o.amount), max(o.note) FROM orders o GROUP BY o.user_id",
    "SELECT row_number() OVER (ORDER BY e.id) + 70000, e.user_id, e.id::numeric, e.payload FROM events e",
    "SELECT DISTINCT o.user_id + 80000, o.user_id, 1::numeric, o.status FROM orders o",
    "SELECT g + 90000, g % 200 + 1, g / 3.0, 'g' || g FROM generate_series(1, 40) g",
    "SELECT n.user_id * 100 + 100000 + length(n.note), n.user_id, length(n.note)::numeric, n.note FROM notes n",
    "SELECT u.id + 110000, u.id, (r.label IS NULL)::int::numeric, r.label FROM users u JOIN regions r ON r.code = u.region",
    "SELECT o.id + 120000, o.user_id, o.amount, o.status FROM orders o ORDER BY o.amount DESC NULLS LAST, o.id LIMIT 15",
    "SELECT o.id, o.user_id, o.amount + 1, 'again' FROM orders o",
    "SELECT e.id, e.user_id, e.id::numeric, 'again' FROM events e",
    "SELECT x.id + 130000, x.user_id, x.n, x.t FROM (SELECT o.id, o.user_id, o.amount AS n, o.status AS t FROM orders o WHERE o.amount > 100) x",
    "WITH w AS (SELECT user_id, count(*) AS c FROM events GROUP BY user_id) SELECT w.user_id + 140000, w.user_id, w.c::numeric, 'w' FROM w",
]
filters = ["", " WHERE {uid} < 50", " WHERE {uid} IN (3, 7, 11, 42)", " WHERE {uid} = 17", " WHERE {uid} % 3 = 1"]
# target: (table, columns, conflict target, update assignment, RETURNING)
targets = [
    ("orders", "id, user_id, amount, status", "(user_id, id)", "amount = EXCLUDED.amount, note = 'updated'", "user_id, id, amount"),
    ("events", "id, user_id, payload, kind", "(id)", "kind = EXCLUDED.kind || '!'", "id, user_id, kind"),
    ("items", "order_id, user_id, qty, sku", None, None, "order_id, user_id, sku"),
]

tally = Tally()
for i in range(N):
    table, columns, conflict, update, shown = random.choice(targets)
    cols = columns.split(", ")
    if random.random() < 0.15:
        rows = ", ".join(f"({random.randint(1, 700)}, {random.randint(1, 210)}, {random.randint(0, 99)}, 'v{k}')" for k in range(random.randint(1, 4)))
        source = f"VALUES {rows}"
    else:
        source = random.choice(sources)
        uid = source.split("SELECT ", 1)[1].split(",")[1].strip()
        where = random.choice(filters).format(uid=uid)
        if where and " GROUP BY " in source:
            source = source.replace(" GROUP BY ", where + " GROUP BY ", 1)
        elif where and " ORDER BY " in source:
            source = source.replace(" ORDER BY ", where + " ORDER BY ", 1)
        elif where and not source.startswith("WITH") and "generate_series" not in source:
            source += where
    if table == "items":
        source = f"SELECT a, b, c::int, d FROM ({source}) s(a, b, c, d)"
    statement = f"INSERT INTO {table} ({columns}) {source}"
    if conflict and random.random() < 0.6:
        statement += random.choice([f" ON CONFLICT {conflict} DO NOTHING", f" ON CONFLICT DO NOTHING",
                                    f" ON CONFLICT {conflict} DO UPDATE SET {update}"])
    if random.random() < 0.5:
        statement += f" RETURNING {shown}"
    tally.add(statement, table)
tally.report(N)
