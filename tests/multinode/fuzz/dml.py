"""Random UPDATE and DELETE statements (co-located and non-co-located subqueries, correlated or not,
FROM/USING other tables, local tables, volatile conditions; whole rows and volatile functions in
RETURNING) run in a transaction on the distributed
(d) and local (l) copies of the differential dataset, then rolled back; the RETURNING rows and the
target table's contents afterwards must be the same. Prints every difference and every statement
the distributed side refuses. Usage: dml.py SEED COUNT (FUZZ_PORT: the coordinator port)."""
import random, sys
from common import Tally
random.seed(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
N = int(sys.argv[2]) if len(sys.argv) > 2 else 200

# target, its alias, the expression of its user id, the assignments, the columns RETURNING shows
targets = [
  ("users", "u", "u.id", ["score = u.score + 1", "name = u.name || '?'", "flag = NOT u.flag", "region = upper(u.region)",
                          "score = (SELECT count(*) FROM events x WHERE x.user_id = u.id)",
                          "(score, name) = (SELECT count(*), max(kind) FROM events x WHERE x.user_id = u.id)"], "u.id, u.score, u.name"),
  ("orders", "o", "o.user_id", ["note = 'n' || o.id", "amount = o.amount + 1", "status = lower(o.status)",
                                "note = (SELECT max(tag) FROM events x WHERE x.user_id = o.user_id)"], "o.user_id, o.id, o.note"),
  ("items", "i", "i.user_id", ["qty = i.qty + 1", "sku = i.sku || '+'", "qty = (SELECT count(*) FROM notes x WHERE x.user_id = i.user_id)"],
   "i.order_id, i.sku, i.qty"),
  ("events", "e", "e.user_id", ["payload = 'p' || e.id", "tag = 'b'"], "e.id, e.user_id"),
  # a reference table: its "user id" a correlated subquery on a distributed table
  ("regions", "g", "(SELECT min(x.id) FROM users x WHERE x.region = g.code)",
   ["label = g.label || '?'", "label = (SELECT max(name) FROM users x WHERE x.region = g.code)", "label = upper(g.code)"], "g.code, g.label"),
]
conditions = [
  "EXISTS (SELECT 1 FROM events x WHERE x.user_id = {uid} AND x.kind = 'buy')",
  "{uid} IN (SELECT user_id FROM orders WHERE amount > 100)",
  "{uid} IN (SELECT owner FROM accounts WHERE balance > 60)",
  "(SELECT count(*) FROM items x WHERE x.user_id = {uid}) > 3",
  "{uid} % 7 = 2",
  "random() >= 0 AND {uid} < 60",
  "{uid} IN (SELECT user_id FROM notes)",
  "NOT EXISTS (SELECT 1 FROM orders x WHERE x.user_id = {uid} AND x.amount > 200)",
  "EXISTS (SELECT 1 FROM events x WHERE x.id = {uid})",
  "{uid} = ANY (ARRAY(SELECT user_id FROM events WHERE tag = 'a'))",
  "{uid} > (SELECT avg(user_id) FROM events)",
  "EXISTS (SELECT 1 FROM users x WHERE x.id = {uid} AND x.region = 'eu')",
  "{uid} IN (WITH w AS (SELECT user_id FROM orders WHERE status = 'paid') SELECT user_id FROM w)",
  "{uid} IN (SELECT x.user_id FROM events x JOIN orders y ON y.user_id = x.user_id WHERE y.amount > 150)",
  "clock_timestamp() > '2000-01-01' AND {uid} BETWEEN 20 AND 90",
]
# other tables in FROM/USING: the clause, its join condition; assignments may read {other}
others = [
  ("events f", "f.user_id = {uid} AND f.kind = 'view'", None),
  ("notes n", "n.user_id = {uid}", None),
  ("(SELECT user_id, count(*) AS c FROM events GROUP BY user_id) s", "s.user_id = {uid}", "s.c"),
  ("users w", "w.id = {uid} AND w.score > 20", "w.score"),
  ("regions r", "r.code = 'eu'", None),
]

tally = Tally()
for i in range(N):
    table, alias, uid, sets, shown = random.choice(targets)
    if random.random() < 0.2:
        # the coordinator evaluates RETURNING over the columns the shards return
        shown += random.choice([f", {alias}", f", row_to_json({alias})::text", ", (random() * 0)::int"])
    where = [random.choice(conditions).format(uid=uid) for _ in range(random.choice([1, 1, 2]))]
    other = random.choice([None, None] + others)
    other_clause = ""
    if other is not None:
        clause, join, value = other
        where.insert(0, join.format(uid=uid))
        other_clause = clause
    if random.random() < 0.3:
        using = f" USING {other_clause}" if other_clause else ""
        statement = f"DELETE FROM {table} {alias}{using} WHERE {' AND '.join(where)} RETURNING {shown}"
    else:
        assignment = random.choice(sets)
        if other is not None and other[2] is not None and random.random() < 0.5:
            column = assignment.split(" = ")[0]
            if column in ("score", "qty"):
                assignment = f"{column} = {other[2]}"
        from_clause = f" FROM {other_clause}" if other_clause else ""
        statement = f"UPDATE {table} {alias} SET {assignment}{from_clause} WHERE {' AND '.join(where)} RETURNING {shown}"
    tally.add(statement, table)
tally.report(N)
