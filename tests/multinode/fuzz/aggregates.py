"""Random aggregate queries (grouping keys, ROLLUP, SELECT DISTINCT, window functions over groups,
filters, joins, HAVING, ORDER BY ... LIMIT) run on the distributed (d) and local (l) copies of the
differential dataset; prints every difference.
Usage: aggregates.py SEED COUNT (FUZZ_PORT: the coordinator port)."""
import os, random, subprocess, sys
PORT = os.environ.get("FUZZ_PORT", "9800")
random.seed(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
N = int(sys.argv[2]) if len(sys.argv) > 2 else 300

def run(schema, sql):
    p = subprocess.run(["psql", "-X", "-At", "-h", "127.0.0.1", "-p", PORT, "-U", "postgres", "-d", "postgres",
                        "-v", "ON_ERROR_STOP=1", "-c", f"SET search_path = {schema}, {schema}2; SET extra_float_digits = 0", "-c", sql],
                       capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr.strip()

aggs = ["count(*)", "count({c})", "sum({n})", "avg({n})", "min({c})", "max({c})", "count(DISTINCT {c})",
        "bool_and({n} > 10)", "string_agg({t}, ',' ORDER BY {t})", "array_agg({n} ORDER BY {n})", "round(stddev({n}), 6)",
        "percentile_disc(0.5) WITHIN GROUP (ORDER BY {n})", "max({n}) - min({n})", "sum({n}) FILTER (WHERE {n} > 50)"]
tables = {
  "users u": {"key": "u.id", "n": ["u.score", "u.id"], "t": ["u.name", "u.region"], "c": ["u.region", "u.flag", "u.created", "u.score"]},
  "orders o": {"key": "o.user_id", "n": ["o.amount", "o.id"], "t": ["o.status", "o.note"], "c": ["o.status", "o.amount", "o.user_id"]},
  "items i": {"key": "i.user_id", "n": ["i.qty", "i.order_id"], "t": ["i.sku"], "c": ["i.sku", "i.qty"]},
  "events e": {"key": "e.id", "n": ["e.user_id", "e.id"], "t": ["e.kind", "e.payload", "e.tag"], "c": ["e.kind", "e.user_id", "e.tag"]},
}
joins = [
  ("users u", None),
  ("orders o", None),
  ("items i", None),
  ("events e", None),
  ("users u JOIN orders o ON o.user_id = u.id", ["users u", "orders o"]),
  ("users u LEFT JOIN orders o ON o.user_id = u.id", ["users u", "orders o"]),
  ("orders o JOIN items i ON i.user_id = o.user_id AND i.order_id = o.id", ["orders o", "items i"]),
  ("users u JOIN regions r ON r.code = u.region", ["users u"]),
  ("users u LEFT JOIN regions r ON r.code = u.region", ["users u"]),
  ("users u JOIN events e ON e.user_id = u.id", ["users u", "events e"]),
  ("orders o LEFT JOIN events e ON e.user_id = o.user_id", ["orders o", "events e"]),
  # not co-located: broadcast joins (and the coordinator's joins when they do not apply)
  ("events e JOIN users u ON u.id = e.user_id", ["events e", "users u"]),
  ("events e RIGHT JOIN users u ON u.id = e.user_id AND e.kind <> 'view'", ["events e", "users u"]),
  ("events e JOIN orders o ON o.user_id = e.user_id JOIN users u ON u.id = o.user_id", ["events e", "orders o", "users u"]),
  ("users u JOIN users v ON v.score = u.id", ["users u"]),
  ("events e LEFT JOIN orders o ON o.id = e.id", ["events e", "orders o"]),
  ("items i JOIN events e USING (user_id)", ["items i", "events e"]),
]
filters = ["", "{n} > 30", "{c} IS NOT NULL", "{key} IN (3, 7, 11, 42)", "{key} = 17", "{key} < 60", "{t} LIKE '%1%'", "NOT ({n} BETWEEN 10 AND 40)"]

def pick(tabs, kind):
    t = random.choice(tabs); return random.choice(tables[t][kind])

failures = 0
for q in range(N):
    frm, used = random.choice(joins)
    tabs = used or [frm]
    nagg = random.randint(1, 3)
    groupkeys = random.sample([pick(tabs, "c") for _ in range(3)] + [tables[random.choice(tabs)]["key"]], random.randint(0, 2))
    groupkeys = list(dict.fromkeys(groupkeys))
    sel = list(groupkeys)
    for _ in range(nagg):
        a = random.choice(aggs).format(c=pick(tabs, "c"), n=pick(tabs, "n"), t=pick(tabs, "t"))
        sel.append(a)
    where = random.choice(filters)
    if where:
        where = " WHERE " + where.format(n=pick(tabs, "n"), c=pick(tabs, "c"), t=pick(tabs, "t"), key=tables[random.choice(tabs)]["key"])
    sql = f"SELECT {', '.join(sel)} FROM {frm}{where}"
    if groupkeys:
        mode = random.random()
        if mode < 0.2:
            sql += " GROUP BY ROLLUP (" + ", ".join(groupkeys) + ")"
        elif mode < 0.35:
            sql = sql.replace("SELECT ", "SELECT DISTINCT ", 1)
            sql += " GROUP BY " + ", ".join(groupkeys)
        elif mode < 0.5:
            sql = sql.replace("SELECT ", "SELECT rank() OVER (ORDER BY count(*), " + ", ".join(f"{k} NULLS FIRST" for k in groupkeys) + "), ", 1)
            sql += " GROUP BY " + ", ".join(groupkeys)
        else:
            sql += " GROUP BY " + ", ".join(groupkeys)
        if random.random() < 0.3:
            sql += f" HAVING count(*) > {random.randint(0, 3)}"
    ordered = False
    if random.random() < 0.4:
        cols = ", ".join(f"{i+1} NULLS FIRST" for i in range(len(sel) + (1 if "rank()" in sql else 0)))
        sql += f" ORDER BY {cols} LIMIT {random.randint(1, 8)}"
        ordered = True
    if random.random() < 0.25:
        # as a subquery joined to a reference table or wrapped
        sql = f"SELECT count(*), count(DISTINCT x.*) FROM ({sql}) x"
    rl, ol, el = run("l", sql)
    rd, od, ed = run("d", sql)
    if rl != 0:
        continue
    a = ol.splitlines(); b = od.splitlines()
    if not ordered:
        a.sort(); b.sort()
    if rd != 0 or a != b:
        failures += 1
        print("DIFF:", sql)
        print("  local:", a[:4], el[:200])
        print("  dist: ", b[:4], ed[:200])
print("done", N, "failures", failures)
