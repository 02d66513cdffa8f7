"""Random query shapes the other generators do not build: window functions (partitioned by the
distribution column or not, with frames), DISTINCT ON, set operations, LATERAL, FETCH ... WITH
TIES and OFFSET, GROUPING SETS and CUBE, correlated subqueries in the target list, FULL joins,
joins with VALUES, generate_series, a recursive WITH query and the coordinator-only table, under
random session settings (TimeZone, DateStyle, IntervalStyle, extra_float_digits). Runs each on
the distributed (d) and local (l) copies of the differential dataset; prints every difference.
Usage: shapes.py SEED COUNT (FUZZ_PORT: the coordinator port)."""
import os, random, re, subprocess, sys
PORT = os.environ.get("FUZZ_PORT", "9800")
random.seed(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
N = int(sys.argv[2]) if len(sys.argv) > 2 else 200


def run(schema, settings, sql):
    p = subprocess.run(["psql", "-X", "-At", "-q", "-h", "127.0.0.1", "-p", PORT, "-U", "postgres", "-d", "postgres",
                        "-v", "ON_ERROR_STOP=1", "-c", f"SET search_path = {schema}, {schema}2; {settings}", "-c", sql],
                       capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr.strip()


# alias -> (table, unique key columns, numeric columns, text columns, other columns)
T = {
    "u": ("users", ["u.id"], ["u.score", "u.id"], ["u.name", "u.region"], ["u.created", "u.flag"]),
    "o": ("orders", ["o.user_id", "o.id"], ["o.amount", "o.id", "o.user_id"], ["o.status", "o.note"], []),
    "i": ("items", None, ["i.qty", "i.order_id", "i.user_id"], ["i.sku"], []),
    "e": ("events", ["e.id"], ["e.user_id", "e.id"], ["e.kind", "e.payload", "e.tag"], ["e.at"]),
    "m": ('"MixedCase"', ['m."Id"'], ['m."Id"', 'm."select"'], ['m."Value"'], []),
    "a": ("accounts", ["a.id"], ["a.balance", "a.owner", "a.id"], [], []),
}
KEY = {"u": "u.id", "o": "o.user_id", "i": "i.user_id", "e": "e.id", "m": 'm."Id"', "a": "a.id"}


def num(a):
    return random.choice(T[a][2])


def txt(a):
    return random.choice(T[a][3] or T[a][2])


def col(a):
    return random.choice(T[a][2] + T[a][3] + T[a][4])


def allcols(sel):
    return ", ".join(f"{i + 1} NULLS FIRST" for i in range(len(sel)))


def where(a):
    return random.choice(["", f" WHERE {num(a)} > {v(random.randint(0, 150))}", f" WHERE {KEY[a]} IN ({v(1)}, 2, {v(3)}, 5, 8, 13, 21, 34)",
                          f" WHERE {KEY[a]} = {v(random.randint(1, 60))}", f" WHERE {txt(a)} IS NOT NULL", f" WHERE {KEY[a]} < {v(40)}",
                          f" WHERE {KEY[a]} = ANY (ARRAY[{v(random.randint(1, 60))}, {v(random.randint(1, 60))}])",
                          f" WHERE {KEY[a]} = {v(random.randint(1, 60))} OR {KEY[a]} = {v(random.randint(1, 60))}"])


def v(value):
    """A constant that a prepared run of the query makes a parameter."""
    return f"<<{value}>>"


def window():
    a = random.choice("uoiea")
    part = random.choice(["", f"PARTITION BY {KEY[a]} ", f"PARTITION BY {col(a)} "])
    order = f"ORDER BY {col(a)} NULLS FIRST" + (", " + ", ".join(T[a][1]) if T[a][1] else "")
    frame = random.choice(["", " ROWS BETWEEN 1 PRECEDING AND 1 FOLLOWING", " RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW",
                           " ROWS UNBOUNDED PRECEDING", " GROUPS BETWEEN CURRENT ROW AND 1 FOLLOWING"])
    f = random.choice(["row_number()", "rank()", "dense_rank()", f"lag({col(a)})", f"lead({col(a)}, 2)", f"sum({num(a)})", "count(*)",
                       f"first_value({col(a)})", f"last_value({col(a)})", "ntile(3)", "round(percent_rank()::numeric, 6)",
                       "round(cume_dist()::numeric, 6)", f"avg({num(a)})", f"max({col(a)})"])
    if f in ("row_number()", "rank()", "dense_rank()", "ntile(3)") or "percent" in f or "cume" in f:
        frame = ""
    if not T[a][1] and f in ("row_number()", "ntile(3)") or (not T[a][1] and f.startswith(("lag", "lead", "first", "last"))):
        return None
    if not T[a][1] and frame.startswith(" ROWS"):
        return None
    sel = [col(a), f"{f} OVER ({part}{order}{frame})"]
    if T[a][1]:
        sel += T[a][1]
    sql = f"SELECT {', '.join(sel)} FROM {T[a][0]} {a}{where(a)}"
    if random.random() < 0.3:
        sql = f"SELECT count(*), count(DISTINCT x.*) FROM ({sql}) x"
        return sql, False
    return sql, False


def distinct_on():
    a = random.choice("uoe")
    c = col(a)
    sel = [c, num(a)] + T[a][1]
    sql = f"SELECT DISTINCT ON ({c}) {', '.join(sel)} FROM {T[a][0]} {a}{where(a)} ORDER BY {c} NULLS FIRST, {', '.join(T[a][1])} DESC"
    if random.random() < 0.4:
        sql += f" LIMIT {v(random.randint(1, 5))}"
    return sql, True


def setop():
    a, b = random.choice("uoiem"), random.choice("uoiem")
    op = random.choice(["UNION", "UNION ALL", "INTERSECT", "INTERSECT ALL", "EXCEPT", "EXCEPT ALL"])
    left = f"SELECT {col(a)}::text FROM {T[a][0]} {a}{where(a)}"
    right = f"SELECT {col(b)}::text FROM {T[b][0]} {b}{where(b)}"
    sql = f"({left}) {op} ({right})"
    if random.random() < 0.4:
        return f"SELECT count(*), min(x), max(x) FROM ({sql}) s(x)", False
    if random.random() < 0.4:
        return sql + f" ORDER BY 1 NULLS FIRST LIMIT {random.randint(1, 6)}", True
    return sql, False


def lateral():
    a = random.choice("uo")
    inner = random.choice([
        "SELECT count(*) AS n, sum(o2.amount) AS s FROM orders o2 WHERE o2.user_id = {k}",
        "SELECT o2.id AS n, o2.amount AS s FROM orders o2 WHERE o2.user_id = {k} ORDER BY o2.amount DESC NULLS LAST, o2.id LIMIT 2",
        "SELECT count(*) AS n, max(e2.kind) AS s FROM events e2 WHERE e2.user_id = {k}",
        "SELECT e2.id AS n, e2.tag AS s FROM events e2 WHERE e2.user_id = {k} ORDER BY e2.id LIMIT 1",
        "SELECT i2.sku AS n, i2.qty AS s FROM items i2 WHERE i2.user_id = {k} AND i2.qty > 5",
        "SELECT r2.label AS n, 1 AS s FROM regions r2 WHERE r2.code = u2.region",
    ])
    key = "u.id" if a == "u" else "o.user_id"
    if "u2.region" in inner:
        inner = inner.replace("u2.region", "u.region")
        a = "u"
        key = "u.id"
    join = random.choice(["CROSS JOIN LATERAL", "LEFT JOIN LATERAL"])
    on = " ON true" if join.startswith("LEFT") else ""
    sql = f"SELECT {key}, x.n, x.s FROM {T[a][0]} {a} {join} ({inner.format(k=key)}) x{on}{where(a)}"
    return sql, False


def ties():
    a = random.choice("uoe")
    c = col(a)
    sel = [c] + (T[a][1] or [])
    if random.random() < 0.5:
        return f"SELECT {', '.join(sel)} FROM {T[a][0]} {a}{where(a)} ORDER BY {c} NULLS FIRST FETCH FIRST {v(random.randint(1, 7))} ROWS WITH TIES", False
    order = ", ".join([f"{c} DESC NULLS LAST"] + T[a][1])
    return f"SELECT {', '.join(sel)} FROM {T[a][0]} {a}{where(a)} ORDER BY {order} OFFSET {v(random.randint(0, 30))} LIMIT {v(random.randint(1, 9))}", True


def grouping():
    a = random.choice("uoe")
    c1, c2 = col(a), txt(a)
    if c1 == c2:
        return None
    g = random.choice([f"GROUPING SETS (({c1}), ({c2}), ())", f"CUBE ({c1}, {c2})", f"ROLLUP ({c2}), {KEY[a]}", f"GROUPING SETS ({KEY[a]}, ({c1}, {c2}))"])
    sel = [c1, c2, f"GROUPING({c1}, {c2})", "count(*)", f"sum({num(a)})"]
    if KEY[a] in g:
        sel.insert(0, KEY[a])
    sql = f"SELECT {', '.join(sel)} FROM {T[a][0]} {a}{where(a)} GROUP BY {g}"
    if random.random() < 0.3:
        sql += " HAVING count(*) > 1"
    return sql, False


def correlated():
    a = random.choice("uo")
    key = KEY[a]
    sub = random.choice([
        f"(SELECT count(*) FROM orders o2 WHERE o2.user_id = {key})",
        f"(SELECT max(e2.id) FROM events e2 WHERE e2.user_id = {key})",
        f"(SELECT r.label FROM regions r WHERE r.code = {'u.region' if a == 'u' else 'o.status'})",
        f"(SELECT sum(i2.qty) FROM items i2 WHERE i2.user_id = {key} AND i2.qty > 2)",
        f"EXISTS (SELECT 1 FROM events e2 WHERE e2.user_id = {key} AND e2.kind = 'buy')",
        f"(SELECT count(*) FROM notes n WHERE n.user_id = {key})",
    ])
    return f"SELECT {key}, {col(a)}, {sub} FROM {T[a][0]} {a}{where(a)}", False


def joins():
    j = random.choice([
        "users u FULL JOIN orders o ON o.user_id = u.id",
        "users u FULL JOIN events e ON e.user_id = u.id",
        "orders o FULL JOIN items i ON i.user_id = o.user_id AND i.order_id = o.id",
        "users u JOIN (VALUES (1, 'a'), (5, 'b'), (42, NULL)) v(x, y) ON v.x = u.id",
        "generate_series(1, 30) g(x) LEFT JOIN orders o ON o.user_id = g.x",
        "users u JOIN notes n ON n.user_id = u.id",
        "users u LEFT JOIN notes n ON n.user_id = u.id AND n.note LIKE '%1%'",
        "users u JOIN accounts a ON a.owner = u.id",
        'users u JOIN "MixedCase" m ON m."Id" = u.id',
        'users u RIGHT JOIN "MixedCase" m ON m."select" = u.score',
        "orders o JOIN regions r ON r.code = o.status RIGHT JOIN users u ON u.id = o.user_id",
        "users u WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.id)",
        "users u WHERE EXISTS (SELECT 1 FROM events e WHERE e.user_id = u.id AND e.tag = 'a')",
        "events e WHERE e.user_id NOT IN (SELECT o.user_id FROM orders o WHERE o.amount > 200)",
        "users u JOIN LATERAL generate_series(1, u.score % 3) s(k) ON true",
    ])
    alias = [x for x in "uoiema" if f" {x} " in f" {j} " or f" {x}." in j]
    cols = []
    for a in alias[:2]:
        cols.append(col(a))
    if "g(x)" in j:
        cols.append("g.x")
    if "v(x" in j:
        cols.append("v.y")
    if "n ON" in j:
        cols.append("n.note")
    if "s(k)" in j:
        cols.append("s.k")
    agg = random.random() < 0.4
    if agg:
        return f"SELECT {cols[0]}, count(*), count({cols[-1]}) FROM {j} GROUP BY 1", False
    return f"SELECT {', '.join(cols)} FROM {j}", False


def recursive():
    body = random.choice([
        "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 12) SELECT t.n, u.name FROM t JOIN users u ON u.id = t.n",
        "WITH RECURSIVE t(code, depth) AS (SELECT code, 1 FROM regions WHERE code = 'eu' UNION ALL "
        "SELECT r.code, t.depth + 1 FROM t JOIN regions r ON r.code > t.code WHERE t.depth < 3) SELECT * FROM t",
        "WITH RECURSIVE t(id) AS (SELECT 3::bigint UNION SELECT o.user_id FROM t JOIN orders o ON o.id = t.id WHERE t.id < 200) "
        "SELECT count(*), max(id) FROM t",
        "WITH x AS (SELECT region, count(*) AS n FROM users GROUP BY region) SELECT x.region, x.n, r.label FROM x FULL JOIN regions r ON r.code = x.region",
    ])
    return body, False


def expressions():
    a = random.choice("ue")
    exprs = {
        "u": ["CASE WHEN u.score > 50 THEN 'hi' ELSE coalesce(u.region, '?') END", "upper(u.name)", "substring(u.name from 2 for 3)",
              "u.created + 3", "to_char(u.created, 'Dy DD Mon YYYY')", "u.created::timestamptz", "nullif(u.score, 37)",
              "u::text", "row(u.id, u.region)::text", "u.name ~ '^[^a-z]'", "age(u.created, DATE '2024-01-01')",
              "(u.created::timestamp - TIMESTAMP '2024-01-01')"],
        "e": ["date_trunc('day', e.at)", "e.at", "extract(epoch from e.at)", "to_char(e.at, 'YYYY-MM-DD HH24:MI TZ')",
              "e.at AT TIME ZONE 'UTC'", "e.tag COLLATE \"C\"", "e.payload || e.kind", "e.at - TIMESTAMPTZ '2024-01-01 00:00:00+00'",
              "jsonb_build_object('k', e.kind, 'at', e.at)", "(e.id::float8 / 7)", "e.id::float4 / 3"],
    }[a]
    sel = random.sample(exprs, 2)
    # Not grouped by an interval from age(): '1 mon' and '30 days' are equal, and which of
    # them stands for the group depends on the order rows arrive in, on one server as well.
    if random.random() < 0.4 and "age(" not in sel[0]:
        return f"SELECT {sel[0]}, count(*) FROM {T[a][0]} {a}{where(a)} GROUP BY 1", False
    if random.random() < 0.3:
        return f"SELECT {', '.join(sel)}, {KEY[a]} FROM {T[a][0]} {a}{where(a)} ORDER BY 1 NULLS FIRST, 3 LIMIT 5", True
    return f"SELECT {', '.join(sel)} FROM {T[a][0]} {a}{where(a)}", False


settings = ["", "SET TimeZone = 'Asia/Tokyo'", "SET DateStyle = 'German, DMY'", "SET IntervalStyle = 'sql_standard'",
            "SET extra_float_digits = 0", "SET TimeZone = 'America/St_Johns'; SET DateStyle = 'SQL, MDY'", "SET lc_messages = 'C'"]
shapes = [window, distinct_on, setop, lateral, ties, grouping, correlated, joins, recursive, expressions]
failures = 0
skipped = 0
done = 0
while done < N:
    made = random.choice(shapes)()
    if made is None:
        continue
    done += 1
    sql, ordered = made
    s = random.choice(settings)
    values = re.findall(r"<<(\d+)>>", sql)
    if values and random.random() < 0.5:
        # Prepared, under a generic plan: shards chosen from the bound values at execution.
        types = [random.choice(["int", "bigint"]) for _ in values]
        count = iter(range(1, len(values) + 1))
        body = re.sub(r"<<\d+>>", lambda m: f"${next(count)}", sql)
        s += f"; SET plan_cache_mode = force_generic_plan; PREPARE p({', '.join(types)}) AS {body}"
        sql = f"EXECUTE p({', '.join(values)})"
    else:
        sql = re.sub(r"<<(\d+)>>", r"\1", sql)
    rl, ol, el = run("l", s, sql)
    if rl != 0:
        skipped += 1
        continue
    rd, od, ed = run("d", s, sql)
    a = ol.splitlines(); b = od.splitlines()
    if not ordered:
        a.sort(); b.sort()
    if rd != 0 or a != b:
        failures += 1
        print("DIFF:", s, "|", sql)
        print("  local:", a[:4], len(a), el[:200])
        print("  dist: ", b[:4], len(b), ed[:300])
print("done", N, "skipped (invalid on one server)", skipped, "failures", failures)
