"""Random transactions on the distributed (d) and local (l) copies of the differential dataset:
3 to 7 statements (UPDATE, DELETE, INSERT, reads that must see the transaction's own writes,
SAVEPOINT / ROLLBACK TO / RELEASE), then every touched table is read and the transaction rolled
back. Every statement's output must be the same on both sides. Usage: transactions.py SEED
COUNT (FUZZ_PORT: the coordinator port)."""
import os, random, subprocess, sys
PORT = os.environ.get("FUZZ_PORT", "9800")
random.seed(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
N = int(sys.argv[2]) if len(sys.argv) > 2 else 100
MARK = "--8<--"


def run(schema, isolation, statements):
    args = ["psql", "-X", "-At", "-q", "-h", "127.0.0.1", "-p", PORT, "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1",
            "-c", f"SET search_path = {schema}, {schema}2; SET extra_float_digits = 0", "-c", f"BEGIN ISOLATION LEVEL {isolation}"]
    for s in statements:
        args += ["-c", s, "-c", f"SELECT '{MARK}'"]
    args += ["-c", "ROLLBACK"]
    p = subprocess.run(args, capture_output=True, text=True)
    parts = [sorted(part.splitlines()) for part in p.stdout.split(MARK + "\n")]
    return p.returncode, parts, p.stderr.strip()


k = lambda: random.randint(1, 210)
writes = [
    lambda: f"UPDATE users SET score = score + {random.randint(1, 9)} WHERE id = {k()}",
    lambda: f"UPDATE users SET name = name || '*' WHERE region = '{random.choice(['eu', 'us', 'jp'])}' AND id < {k()}",
    lambda: f"UPDATE orders SET amount = coalesce(amount, 0) + 1 WHERE user_id IN ({k()}, {k()})",
    lambda: f"DELETE FROM orders WHERE user_id = {k()}",
    lambda: f"DELETE FROM items WHERE qty = {random.randint(0, 8)} AND user_id < {k()}",
    lambda: f"INSERT INTO orders VALUES ({random.randint(1000, 1100)}, {k()}, 12.5, 'tx', NULL) ON CONFLICT DO NOTHING",
    lambda: f"INSERT INTO users VALUES ({random.randint(300, 320)}, 'new', 'eu', 1, '2024-02-02', true) ON CONFLICT (id) DO UPDATE SET score = users.score + 1",
    lambda: f"INSERT INTO items SELECT order_id, user_id, sku || '+', qty FROM items WHERE user_id = {k()}",
    lambda: f"UPDATE events SET kind = 'seen' WHERE user_id = {k()}",
    lambda: f"UPDATE regions SET label = coalesce(label, '') || '!' WHERE code = '{random.choice(['eu', 'us', 'br'])}'",
    lambda: f"UPDATE users u SET score = (SELECT count(*) FROM events e WHERE e.user_id = u.id) WHERE u.id < {k()}",
    lambda: f"DELETE FROM events WHERE id IN (SELECT id FROM events WHERE user_id = {k()})",
]
reads = [
    lambda: "SELECT region, count(*), sum(score) FROM users GROUP BY region",
    lambda: f"SELECT * FROM users WHERE id = {k()}",
    lambda: "SELECT count(*), sum(amount) FROM orders",
    lambda: "SELECT u.region, count(o.id) FROM users u JOIN orders o ON o.user_id = u.id GROUP BY u.region",
    lambda: "SELECT e.kind, count(*) FROM events e JOIN users u ON u.id = e.user_id GROUP BY e.kind",
    lambda: f"SELECT sku, sum(qty) FROM items WHERE user_id < {k()} GROUP BY sku",
    lambda: "SELECT code, label FROM regions",
    lambda: "SELECT r.code, count(*) FROM users u JOIN regions r ON r.code = u.region GROUP BY r.code",
]
controls = ["SAVEPOINT a", "ROLLBACK TO SAVEPOINT a", "RELEASE SAVEPOINT a"]

failures = ran = 0
for i in range(N):
    statements = []
    savepoint = False
    for _ in range(random.randint(3, 7)):
        r = random.random()
        if r < 0.15:
            if not savepoint:
                statements.append("SAVEPOINT a")
                savepoint = True
            else:
                statements.append(random.choice(controls[1:]))
                savepoint = statements[-1].startswith("ROLLBACK")
        elif r < 0.6:
            statements.append(random.choice(writes)())
        else:
            statements.append(random.choice(reads)())
    statements += ["SELECT * FROM users", "SELECT * FROM orders", "SELECT * FROM items", "SELECT * FROM events", "SELECT * FROM regions"]
    isolation = random.choice(["READ COMMITTED", "REPEATABLE READ"])
    rl, ol, el = run("l", isolation, statements)
    if rl != 0:
        continue
    ran += 1
    rd, od, ed = run("d", isolation, statements)
    if rd != 0 or ol != od:
        failures += 1
        print("DIFF:", isolation, " ; ".join(statements[:-5]))
        for n, (a, b) in enumerate(zip(ol, od)):
            if a != b:
                print(f"  statement {n + 1}: local {a[:3]} ({len(a)}), dist {b[:3]} ({len(b)})")
                break
        print("  ", ed[:300])
print("done", N, "ran", ran, "failures", failures)
