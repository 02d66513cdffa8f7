"""Random subqueries, WITH queries and sublinks around the distributed (d) and local (l) copies of
the differential dataset; prints every difference. Usage: subqueries.py SEED COUNT."""
import os, random, subprocess, sys
PORT = os.environ.get("FUZZ_PORT", "9800")
random.seed(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
N = int(sys.argv[2]) if len(sys.argv) > 2 else 200

def run(schema, sql):
    p = subprocess.run(["psql", "-X", "-At", "-q", "-h", "127.0.0.1", "-p", PORT, "-U", "postgres", "-d", "postgres",
                        "-v", "ON_ERROR_STOP=1", "-c", f"SET search_path = {schema}, {schema}2; SET extra_float_digits = 0; {sql}"],
                       capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr.strip()

inner = [
  "SELECT user_id, count(*) AS n, sum(amount) AS s FROM orders GROUP BY user_id",
  "SELECT region, count(*) AS n, max(score) AS s FROM users GROUP BY region",
  "SELECT id AS user_id, score AS n, name AS s FROM users WHERE flag",
  "SELECT user_id, count(DISTINCT sku) AS n, sum(qty) AS s FROM items GROUP BY user_id",
  "SELECT e.user_id, count(*) AS n, max(e.id) AS s FROM events e GROUP BY e.user_id",
  "SELECT u.id AS user_id, count(o.id) AS n, sum(o.amount) AS s FROM users u LEFT JOIN orders o ON o.user_id = u.id GROUP BY u.id",
  "SELECT DISTINCT status AS region, 1 AS n, 2 AS s FROM orders",
  "SELECT user_id, amount AS n, status AS s FROM orders ORDER BY amount DESC NULLS LAST, id LIMIT 20",
]
outer = [
  "SELECT count(*), count(x.n), count(DISTINCT x.s::text) FROM ({q}) x",
  "SELECT x.* FROM ({q}) x JOIN users u ON u.id = x.user_id WHERE u.score > 40",
  "WITH x AS ({q}) SELECT count(*), max(x.n::text) FROM x",
  "WITH x AS MATERIALIZED ({q}) SELECT a.user_id FROM x a JOIN x b ON a.user_id = b.user_id",
  "SELECT u.id FROM users u WHERE u.id IN (SELECT user_id FROM ({q}) x) AND u.id < 100",
  "SELECT e.kind, count(*) FROM events e WHERE e.user_id IN (SELECT user_id FROM ({q}) x) GROUP BY e.kind",
  "SELECT r.code, (SELECT count(*) FROM ({q}) x) FROM regions r",
  "SELECT x.n::text, row_number() OVER (ORDER BY x.n::text, x.s::text, x.user_id::text) FROM ({q}) x",
  "SELECT user_id::text FROM ({q}) x UNION SELECT code FROM regions",
  "SELECT count(*) FROM ({q}) x LEFT JOIN events e ON e.user_id::text = x.user_id::text",
  "SELECT x.user_id FROM ({q}) x WHERE EXISTS (SELECT 1 FROM orders o WHERE o.user_id::text = x.user_id::text)",
  "SELECT o.status, count(*) FROM orders o WHERE o.user_id NOT IN (SELECT user_id FROM ({q}) x WHERE user_id IS NOT NULL) GROUP BY o.status",
  "SELECT e.kind, count(*) FROM events e WHERE e.user_id = ANY (ARRAY(SELECT user_id FROM ({q}) x)) GROUP BY e.kind",
  "SELECT count(*), sum(o.amount) FROM orders o WHERE o.amount > ALL (SELECT n FROM ({q}) x WHERE n IS NOT NULL)",
  "SELECT count(*) FROM items i WHERE EXISTS (SELECT 1 FROM ({q}) x WHERE x.n::text > '3') AND i.qty > 2",
]
failures = 0
for i in range(N):
    q = random.choice(inner)
    q = q.replace("region, count", "region AS user_id, count") if q.startswith("SELECT region") else q
    q = q.replace("DISTINCT status AS region", "DISTINCT status AS user_id")
    sql = random.choice(outer).format(q=q)
    rl, ol, el = run("l", sql)
    if rl != 0:
        continue
    rd, od, ed = run("d", sql)
    a = sorted(ol.splitlines()); b = sorted(od.splitlines())
    if rd != 0 or a != b:
        failures += 1
        print("DIFF:", sql); print("  local:", a[:3], el[:150]); print("  dist: ", b[:3], ed[:200])
print("done", N, "failures", failures)
