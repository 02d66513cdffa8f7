"""Random MERGE statements into the distributed tables of the differential dataset: sources that
are local, distributed (aggregated, limited, self-reads, a co-located table read in place), reference-table joins and VALUES lists
with NULL keys and keys of another integer width; random WHEN MATCHED / WHEN NOT MATCHED clauses
with conditions on either side. Each runs in a transaction on the distributed (d) and local (l)
copies, then rolled back; the target's contents afterwards must be the same. Prints every
difference and every statement the distributed side refuses.
Usage: merge.py SEED COUNT (FUZZ_PORT: the coordinator port)."""
import random, sys
from common import Tally
random.seed(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
N = int(sys.argv[2]) if len(sys.argv) > 2 else 200

# table, alias, distribution column, numeric column, text column, the INSERT of a source row s(k, n, t)
targets = [
    ("users", "u", "id", "score", "name", "(id, name, score) VALUES (s.k, s.t, s.n)"),
    ("orders", "o", "user_id", "amount", "note", "(id, user_id, amount, status) VALUES (coalesce(s.n, 0) + 5000, s.k, 1, 'merged')"),
    ("items", "i", "user_id", "qty", "sku", "(order_id, user_id, sku, qty) VALUES (0, s.k, s.t, s.n)"),
    ("events", "e", "id", "user_id", "payload", "(id, user_id, kind) VALUES (s.k, s.n, s.t)"),
    ("accounts", "a", "id", "balance", None, "VALUES (s.k, s.n, 1)"),
    ('"MixedCase"', "m", '"Id"', '"select"', '"Value"', '("Id", "Value", "select") VALUES (s.k, s.t, s.n)'),
]
sources = [
    "(SELECT id AS k, score AS n, name AS t FROM users WHERE score > {x}) s",
    "(SELECT user_id AS k, count(*)::int AS n, max(status) AS t FROM orders GROUP BY user_id) s",
    "(SELECT user_id AS k, sum(qty)::int AS n, min(sku) AS t FROM items GROUP BY user_id) s",
    "(SELECT user_id AS k, count(*)::int AS n, max(note) AS t FROM notes GROUP BY user_id) s",
    "(VALUES (1, 5, 'a'), (2, NULL, 'b'), (NULL, 3, 'c'), (77, 1, NULL), (2001, 2, 'z'), ({x}, {x}, 'x')) s(k, n, t)",
    "(SELECT u.id AS k, length(r.label) AS n, r.label AS t FROM users u JOIN regions r ON r.code = u.region) s",
    "(SELECT id + 3 AS k, user_id::int AS n, kind AS t FROM events WHERE kind <> 'view') s",
    "(SELECT owner AS k, count(*)::int AS n, 'acc' AS t FROM accounts GROUP BY owner) s",
    "(SELECT id AS k, score AS n, name AS t FROM users ORDER BY score DESC NULLS LAST, id LIMIT {x}) s",
    "(SELECT \"Id\" + 1 AS k, \"select\" AS n, \"Value\" AS t FROM \"MixedCase\") s",
    # a table as it is (co-located with users, orders and items: read on the shards)
    "users s(k, t, r, n)",
]

tally = Tally()
for i in range(N):
    table, alias, key, num, text, insert = random.choice(targets)
    source = random.choice(sources).format(x=random.randint(1, 60))
    on = f"{alias}.{key} = s.k"
    if random.random() < 0.3:
        on += random.choice([f" AND {alias}.{num} IS NOT NULL", " AND s.n > 1", f" AND {alias}.{num} < 100"])
    matched = [f"UPDATE SET {num} = {alias}.{num} + coalesce(s.n, 0)", "DELETE", "DO NOTHING"]
    if text:
        matched.append(f"UPDATE SET {text} = coalesce(s.t, 'null') || '~'")
    matched_conditions = ["", " AND s.n > 3", f" AND {alias}.{num} % 2 = 0", " AND s.t IS NULL"]
    not_matched = [f"INSERT {insert}", "DO NOTHING"]
    not_matched_conditions = ["", " AND s.n > 2", " AND s.k IS NOT NULL", " AND s.t LIKE '%a%'"]
    clauses = []
    for _ in range(random.choice([1, 2, 2, 3])):
        if random.random() < 0.5:
            clauses.append(f"WHEN MATCHED{random.choice(matched_conditions)} THEN {random.choice(matched)}")
        else:
            clauses.append(f"WHEN NOT MATCHED{random.choice(not_matched_conditions)} THEN {random.choice(not_matched)}")
    # Unconditional clauses last (one server refuses clauses after them).
    clauses.sort(key=lambda c: " AND " not in c.split(" THEN ")[0])
    statement = f"MERGE INTO {table} {alias} USING {source} ON {on} {' '.join(clauses)}"
    tally.add(statement, table)
tally.report(N)
