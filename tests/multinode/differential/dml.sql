-- One statement per line, run on both sides; results (RETURNING rows, affected counts) and
-- then every table's contents must be identical.
UPDATE users SET score = score + 1 WHERE id = 5;
UPDATE users SET score = 0 WHERE region = 'eu';
UPDATE users SET name = 'renamed ' || id WHERE id IN (7, 8, 9);
UPDATE orders SET status = 'void' WHERE user_id = 7 AND amount > 10;
UPDATE orders SET amount = amount * 2 WHERE status = 'paid' RETURNING user_id, id, amount;
DELETE FROM items WHERE qty = 0;
DELETE FROM items WHERE user_id = 15 RETURNING order_id, sku;
DELETE FROM events WHERE kind = 'view' RETURNING id;
UPDATE "MixedCase" SET "Value" = upper("Value") WHERE "select" = 1 RETURNING "Id", "Value";
UPDATE orders o SET note = r.label FROM regions r WHERE r.code = 'jp' AND o.user_id = 3;
UPDATE orders o SET note = 'region ' || r.code FROM users u JOIN regions r ON r.code = u.region WHERE u.id = o.user_id AND o.user_id = 12;
UPDATE users u SET flag = true FROM orders o WHERE o.user_id = u.id AND u.id = 10;
DELETE FROM orders o USING regions r WHERE r.code = 'br' AND o.note = r.code;
DELETE FROM orders WHERE user_id = 99 AND id IN (SELECT order_id FROM items WHERE user_id = 99 AND qty > 4);
UPDATE accounts SET balance = balance - 10 WHERE owner = 5;
DELETE FROM orders WHERE user_id IN (SELECT id FROM users WHERE region IS NULL) RETURNING user_id, id;
UPDATE orders o SET note = u.name FROM users u WHERE u.id = o.user_id AND u.score > 90;
UPDATE users u SET score = (SELECT count(*) FROM orders o WHERE o.user_id = u.id) WHERE u.flag;
DELETE FROM items i WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.user_id = i.user_id AND o.id = i.order_id);
UPDATE users SET region = NULL WHERE score > 95 RETURNING id;
INSERT INTO users VALUES (1001, 'nouveau', 'eu', 1, '2024-05-05', false) RETURNING *;
INSERT INTO users VALUES (1001, 'again', 'us', 2, '2024-05-06', true) ON CONFLICT (id) DO UPDATE SET score = EXCLUDED.score RETURNING id, score;
DELETE FROM users WHERE id = 1001;
INSERT INTO orders SELECT id + 1000, id, score, 'copied', name FROM users WHERE score > 90;
INSERT INTO items SELECT o.id, o.user_id, 'from ' || o.status, 1 FROM orders o JOIN users u ON u.id = o.user_id WHERE u.region = 'jp' RETURNING order_id, user_id;
INSERT INTO events SELECT id + 10000, user_id, kind, payload, at FROM events WHERE kind = 'buy';
INSERT INTO orders SELECT id + 2000, user_id, amount, 'dup', note FROM orders WHERE status = 'paid';
INSERT INTO items SELECT o.id, o.user_id, 'join-' || u.region, 2 FROM orders o JOIN users u ON u.id = o.user_id WHERE u.score > 80;
INSERT INTO items (order_id, user_id, sku, qty) SELECT id, user_id, 'r', 1 FROM orders WHERE user_id = 12 RETURNING *;
INSERT INTO orders SELECT id + 5000, id, score, 'from-users', NULL FROM users WHERE flag;
UPDATE users SET score = score WHERE false;
UPDATE regions SET label = upper(label) WHERE code <> 'jp' RETURNING code, label;
INSERT INTO regions VALUES ('xx', 'Elsewhere');
DELETE FROM regions WHERE code = 'br';
UPDATE regions r SET label = r.label || ' (' || r2.code || ')' FROM regions r2 WHERE r2.code = r.code AND r.code = 'xx';
DELETE FROM events WHERE id = -1;
UPDATE users SET created = current_date - 1, name = name || ' @' || to_char(now(), 'YYYY') WHERE id IN (3, 4) RETURNING id, created = current_date - 1;
UPDATE orders SET note = current_setting('DateStyle') WHERE user_id = 5 AND amount > 0;
DELETE FROM events WHERE at < now() - interval '1000 years';
UPDATE regions SET label = label || ' ' || current_setting('IntervalStyle') WHERE code = 'eu';
WITH d AS (DELETE FROM items WHERE user_id = 22 RETURNING qty) SELECT count(*), sum(qty) FROM d;
WITH u AS (UPDATE orders SET note = 'cte' WHERE user_id = 29 RETURNING id, amount) SELECT count(*), sum(amount) FROM u;
WITH gone AS (DELETE FROM orders WHERE user_id = 36 AND status = 'new' RETURNING id) UPDATE users SET score = score + (SELECT count(*) FROM gone) WHERE id = 36 RETURNING id, score;
WITH d AS (DELETE FROM items WHERE user_id = 43 RETURNING order_id) SELECT o.id, o.status, (SELECT count(*) FROM items i WHERE i.user_id = 43) AS items_seen FROM orders o WHERE o.user_id = 43 AND o.id IN (SELECT order_id FROM d) ORDER BY o.id;
WITH moved AS (DELETE FROM orders WHERE user_id = 30 RETURNING id, user_id, amount) INSERT INTO items SELECT id, user_id, 'moved', 1 FROM moved;
WITH m AS (UPDATE orders SET status = 'archived' WHERE user_id = 31 RETURNING id, user_id) INSERT INTO events SELECT id + 100000, user_id, 'archived', NULL, TIMESTAMPTZ '2024-06-01 00:00:00+00' FROM m RETURNING id, kind;
WITH d AS (DELETE FROM items WHERE user_id = 32 RETURNING qty) INSERT INTO "MixedCase" SELECT 1000 + count(*)::int, 'items', sum(qty)::int FROM d RETURNING "Id", "select";
WITH d AS (DELETE FROM orders WHERE user_id = 44 RETURNING id, user_id) INSERT INTO orders (id, user_id, amount, status) SELECT id + 5000, 45, 1.5, 'moved' FROM d;
INSERT INTO "MixedCase" SELECT 3000 + score, max(region), count(*)::int FROM users GROUP BY score;
INSERT INTO regions SELECT 'g' || score, count(*)::text FROM users WHERE score < 5 GROUP BY score RETURNING code, label;
INSERT INTO accounts (id, owner, balance) SELECT 500 + row_number() OVER (ORDER BY s.status), 1, s.total FROM (SELECT status, sum(amount) total FROM orders GROUP BY status) s;
-- UPDATE ... FROM and DELETE ... USING tables that are not co-located with the target: they
-- are broadcast to the target's shards
UPDATE orders o SET note = 'buyer' FROM events e WHERE e.user_id = o.user_id AND e.kind = 'buy';
UPDATE users u SET score = u.score + 1 FROM accounts a WHERE a.owner = u.id AND a.balance > 50 RETURNING u.id, u.score;
DELETE FROM items i USING events e WHERE e.user_id = i.user_id AND e.id % 7 = 0 RETURNING i.order_id, i.sku;
UPDATE orders o SET status = 'tagged' FROM events e, users u WHERE e.user_id = o.user_id AND u.id = o.user_id AND e.tag >= 'b' AND u.score > 40;
DELETE FROM events e USING users u WHERE u.id = e.user_id AND u.region = 'us';
-- Subqueries on tables the target is not co-located with, or not joined to on distribution
-- columns: evaluated first, their rows sent to the shards (intermediate results).
UPDATE users SET score = (SELECT count(*) FROM orders);
DELETE FROM orders WHERE id IN (SELECT id FROM users WHERE region IS NULL);
UPDATE orders SET note = 'evented' WHERE user_id IN (SELECT user_id FROM events WHERE kind = 'buy') AND status = 'new';
DELETE FROM items WHERE user_id NOT IN (SELECT user_id FROM events) RETURNING order_id, sku;
DELETE FROM items WHERE user_id NOT IN (SELECT user_id FROM events WHERE user_id IS NOT NULL AND kind <> 'buy') RETURNING order_id, sku;
UPDATE users u SET name = name || '!' WHERE EXISTS (SELECT 1 FROM events WHERE kind = 'buy' AND at > '2024-01-04') AND u.id < 20;
UPDATE users SET flag = NOT flag WHERE NOT EXISTS (SELECT 1 FROM events WHERE kind = 'none') AND id BETWEEN 30 AND 40 RETURNING id, flag;
UPDATE orders SET note = (SELECT max(tag) FROM events) WHERE user_id < 5 RETURNING user_id, id, note;
UPDATE users SET region = 'arr' WHERE id = ANY (ARRAY(SELECT user_id FROM events WHERE kind = 'view' ORDER BY id)) RETURNING id;
DELETE FROM events WHERE user_id IN (SELECT id FROM users WHERE score > 95) RETURNING id;
UPDATE events SET payload = 'tagged' WHERE tag > ALL (SELECT tag FROM events WHERE tag < 'b' AND tag IS NOT NULL) RETURNING id, tag;
UPDATE orders o SET note = 'both' FROM users u WHERE u.id = o.user_id AND u.region IN (SELECT kind FROM events) AND o.id IN (SELECT id FROM events WHERE kind = 'buy');
UPDATE orders SET amount = amount + 1 WHERE (user_id, id) IN (SELECT user_id, id FROM events) RETURNING user_id, id, amount;
UPDATE orders o SET note = s.kind FROM (SELECT user_id, max(kind) AS kind FROM events WHERE user_id IS NOT NULL GROUP BY user_id) s WHERE s.user_id = o.user_id AND o.amount > 100;
DELETE FROM items i USING (SELECT DISTINCT payload FROM events WHERE payload IS NOT NULL) p WHERE p.payload = i.sku RETURNING i.order_id;
UPDATE users u SET score = s.c FROM (SELECT user_id, count(*)::int AS c FROM events WHERE user_id IS NOT NULL GROUP BY user_id ORDER BY c DESC, user_id LIMIT 5) s WHERE s.user_id = u.id RETURNING u.id, u.score;
-- What none of that covers: the coordinator chooses the rows (its own plan over the shards'
-- rows, locking them), and the shards change exactly those (by ctid and distribution value).
UPDATE orders o SET note = 'evented ' || o.user_id WHERE EXISTS (SELECT 1 FROM events e WHERE e.user_id = o.user_id AND e.tag = 'a') RETURNING user_id, id, note;
UPDATE users u SET score = (SELECT count(*) FROM events e WHERE e.user_id = u.id) WHERE u.id < 40 RETURNING id, score;
DELETE FROM events e WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.user_id = e.user_id AND o.amount > 50) RETURNING id, user_id;
UPDATE items i SET qty = qty + 1 WHERE i.qty > (SELECT avg(e.id) / 100 FROM events e WHERE e.user_id = i.user_id) RETURNING order_id, sku, qty;
UPDATE users u SET name = n.note FROM notes n WHERE n.user_id = u.id AND n.note LIKE '%1' RETURNING u.id, u.name, n.note;
UPDATE users u SET flag = true FROM notes n WHERE n.user_id = u.id RETURNING u.id, u.flag;
DELETE FROM orders WHERE user_id IN (SELECT user_id FROM notes WHERE note LIKE '%7') RETURNING user_id, id;
UPDATE users SET created = DATE '2024-02-02' WHERE clock_timestamp() > '2000-01-01' AND score < 10 RETURNING id, created;
DELETE FROM items WHERE qty = 2 AND random() >= 0 RETURNING order_id, sku;
WITH buyers AS (SELECT user_id FROM events WHERE kind = 'buy') UPDATE orders SET status = 'bought' WHERE user_id IN (SELECT user_id FROM buyers) AND amount < 20 RETURNING user_id, id;
WITH t AS (SELECT user_id, count(*) AS n FROM orders GROUP BY user_id) UPDATE events e SET payload = 'orders ' || t.n FROM t WHERE t.user_id = e.user_id AND e.kind = 'view' RETURNING e.id, e.payload;
UPDATE "MixedCase" m SET "Value" = "Value" || '?' WHERE "Id" IN (SELECT user_id FROM notes) AND random() < 2 RETURNING "Id", "Value";
UPDATE accounts a SET balance = balance + 1 FROM notes n WHERE n.user_id = a.owner AND a.id < 30 RETURNING a.id, a.balance, n.user_id;
UPDATE users u SET (score, name) = (SELECT count(*), max(kind) FROM events e WHERE e.user_id = u.id) WHERE u.id BETWEEN 40 AND 60 RETURNING id, score, name;
UPDATE orders o SET (amount, note) = (SELECT max(balance), 'max of ' || count(*) FROM accounts), status = 'multi' WHERE o.user_id < 8 AND random() < 2 RETURNING user_id, id, amount, note;
-- A table that lives on the coordinator only, changed by what distributed tables hold.
DELETE FROM notes WHERE user_id IN (SELECT user_id FROM orders WHERE amount > 240) RETURNING user_id, note;
UPDATE notes n SET note = n.note || ' ' || u.region FROM users u WHERE u.id = n.user_id AND u.score > 30 RETURNING n.user_id, n.note;
UPDATE notes n SET note = 'evented' WHERE EXISTS (SELECT 1 FROM events e JOIN users u ON u.id = e.user_id WHERE e.user_id = n.user_id AND e.kind = 'view') RETURNING user_id;
DELETE FROM notes n USING users u, orders o WHERE u.id = n.user_id AND o.user_id = u.id AND o.status = 'new' AND u.region = 'eu';
-- Volatile, with a subquery on a table that is not co-located (found by fuzz/dml.py).
DELETE FROM items i USING users w WHERE w.id = i.user_id AND w.score > 20 AND random() >= 0 AND i.user_id < 60 AND i.user_id IN (SELECT owner FROM accounts WHERE balance > 60) RETURNING i.order_id, i.sku;
MERGE INTO notes n USING users u ON u.id = n.user_id AND u.score > 40 WHEN MATCHED THEN UPDATE SET note = n.note || ' merged ' || u.region WHEN NOT MATCHED AND u.id < 20 THEN INSERT VALUES (u.id, 'from ' || u.name);
-- MERGE into distributed tables: the source runs first, its rows go to the shards their key
-- hashes to (planner/merge.rs). Sources: a local table, the target itself, VALUES with a
-- NULL key and a key of another integer width, a join with a reference table, a quoted table.
MERGE INTO users u USING (SELECT user_id, max(note) AS note FROM notes GROUP BY user_id) n ON n.user_id = u.id WHEN MATCHED THEN UPDATE SET score = u.score + length(n.note);
MERGE INTO orders o USING (SELECT user_id, id, amount FROM orders WHERE status = 'paid') s ON o.user_id = s.user_id AND o.id = s.id WHEN MATCHED AND s.amount > 50 THEN UPDATE SET note = 'merged big' WHEN MATCHED THEN DELETE;
MERGE INTO users u USING (VALUES (5, 'five'), (2001, 'new'), (NULL, 'none')) v(id, name) ON u.id = v.id WHEN MATCHED THEN UPDATE SET name = v.name WHEN NOT MATCHED AND v.id IS NOT NULL THEN INSERT (id, name, region) VALUES (v.id, v.name, 'eu');
MERGE INTO items i USING (SELECT u.id AS user_id, r.label FROM users u JOIN regions r ON r.code = u.region) s ON i.user_id = s.user_id WHEN MATCHED AND i.qty > 5 THEN UPDATE SET sku = i.sku || s.label WHEN MATCHED AND i.qty = 2 THEN DO NOTHING WHEN MATCHED THEN UPDATE SET qty = i.qty + 100;
MERGE INTO events e USING (SELECT id, kind, tag FROM events WHERE kind = 'buy') s ON e.id = s.id WHEN MATCHED THEN UPDATE SET tag = s.kind || coalesce(s.tag, '-'), payload = NULL;
MERGE INTO "MixedCase" m USING (SELECT "Id" + 1 AS "Id", "Value" FROM "MixedCase" WHERE "select" = 1) s ON m."Id" = s."Id" WHEN MATCHED THEN UPDATE SET "Value" = s."Value" || '!' WHEN NOT MATCHED THEN INSERT ("Id", "Value", "select") VALUES (s."Id", s."Value", 7);
MERGE INTO accounts a USING (SELECT id + 500 AS id, id AS owner FROM users WHERE id < 30) s ON a.id = s.id WHEN NOT MATCHED AND s.owner % 2 = 0 THEN DO NOTHING WHEN NOT MATCHED THEN INSERT VALUES (s.id, s.owner, 1);
MERGE INTO users u USING users s ON u.id = s.id AND s.score > 50 WHEN MATCHED AND s.region = 'eu' THEN DELETE WHEN MATCHED THEN UPDATE SET score = s.score - 1, name = u.name || s.region;
MERGE INTO items i USING orders o ON i.user_id = o.user_id AND i.order_id = o.id AND o.amount > 100 WHEN MATCHED THEN UPDATE SET sku = i.sku || o.status;
MERGE INTO accounts a USING (SELECT owner, sum(balance) AS total FROM accounts GROUP BY owner) s ON a.id = s.owner WHEN MATCHED AND s.total > 100 THEN UPDATE SET balance = s.total WHEN MATCHED AND s.total IS NULL THEN DELETE;
-- A reference table changed by what distributed tables, local tables or volatile functions
-- give: the coordinator changes its copy, the workers' copies follow by primary key.
UPDATE regions r SET label = coalesce(label, '?') || ' users ' || (SELECT count(*) FROM users u WHERE u.region = r.code) RETURNING code, label;
UPDATE regions r SET label = r.label || '!' FROM users u WHERE u.region = r.code AND u.id = 3 RETURNING r.code, r.label, u.name;
DELETE FROM regions r WHERE code LIKE 'g%' AND NOT EXISTS (SELECT 1 FROM users u WHERE 'g' || u.score = r.code AND u.flag) RETURNING code;
UPDATE regions r SET label = 'noted ' || n.note FROM notes n WHERE r.code = 'xx' AND n.note IS NOT NULL AND n.user_id = (SELECT min(user_id) FROM notes WHERE note IS NOT NULL) RETURNING code, label;
UPDATE regions SET label = label || '.' WHERE random() < 2 AND code IN (SELECT region FROM users WHERE score > 50) RETURNING code, label;
DELETE FROM regions WHERE code IN (SELECT region FROM users WHERE id = 999999);
-- Data-modifying WITH queries over many shards: they run first, as statements of their own.
WITH d AS (DELETE FROM items WHERE qty = 1 RETURNING *) SELECT count(*), sum(qty), max(sku) FROM d;
WITH i AS (INSERT INTO items VALUES (1, 50, 'x', 1), (2, 51, 'y', 2) RETURNING *) SELECT count(*), sum(qty) FROM i;
WITH m AS (DELETE FROM orders WHERE amount > 240 RETURNING *) INSERT INTO items SELECT id, user_id, 'x', 1 FROM m;
WITH m AS (DELETE FROM orders WHERE user_id = 33 RETURNING *) INSERT INTO items SELECT id, user_id, 'x', 1 FROM m RETURNING order_id, (SELECT count(*) FROM m);
WITH d AS (DELETE FROM events WHERE kind = 'buy' RETURNING user_id) UPDATE users SET score = score + 100 WHERE id IN (SELECT user_id FROM d) RETURNING id, score;
WITH t AS (UPDATE regions SET label = label || '+' RETURNING code) SELECT count(*) FROM users WHERE region IN (SELECT code FROM t);
WITH a AS (DELETE FROM items WHERE qty > 8 RETURNING order_id), b AS (UPDATE accounts SET balance = 0 WHERE balance < 5 RETURNING id) SELECT (SELECT count(*) FROM a), (SELECT count(*) FROM b);
WITH n AS (DELETE FROM notes WHERE user_id < 10 RETURNING user_id) SELECT u.id, u.name FROM users u WHERE u.id IN (SELECT user_id FROM n) ORDER BY u.id;
WITH u AS (UPDATE orders SET status = 'touched' WHERE amount < 20 RETURNING user_id, amount) DELETE FROM events e USING u WHERE e.user_id = u.user_id AND e.kind = 'view' RETURNING e.id;
WITH d AS (DELETE FROM items WHERE qty = 3 RETURNING user_id) SELECT count(*) FROM (SELECT * FROM d LIMIT 1) s;
-- RETURNING the coordinator evaluates over the columns the shards return: a table's whole
-- row, volatile functions, the row type's name.
UPDATE users u SET score = score + 1 WHERE id < 12 RETURNING u, pg_typeof(u)::text, row_to_json(u)::text;
UPDATE users u SET score = score - 1 WHERE id = 12 RETURNING u, score + (random() * 0)::int AS s;
DELETE FROM events e WHERE e.id IN (5, 6, 7) RETURNING e, e.tag;
UPDATE orders o SET note = 'whole' FROM users u WHERE u.id = o.user_id AND u.id = 21 RETURNING o, u.name, (clock_timestamp() >= now());
-- Data-modifying WITH queries that nothing reads: they run all the same.
WITH r AS (UPDATE regions SET label = 'x' WHERE code = 'eu' RETURNING *) SELECT * FROM users WHERE id = 5;
WITH d AS (DELETE FROM items WHERE qty = 1 RETURNING *) SELECT count(*) FROM users;
WITH d AS (DELETE FROM orders WHERE status = 'new' AND amount < 20 RETURNING *) UPDATE users SET score = 1 WHERE id < 5;
-- CASE in the statement's own expressions (computed per row on the shards).
UPDATE users SET region = CASE WHEN region IS NULL THEN 'none' ELSE region END WHERE score > 50 RETURNING id, region;
UPDATE orders SET status = CASE status WHEN 'paid' THEN 'settled' ELSE status END WHERE user_id = 8 RETURNING CASE WHEN amount > 10 THEN 'big' END, id;
DELETE FROM items WHERE CASE WHEN qty > 3 THEN sku LIKE 'x%' ELSE false END RETURNING order_id;
-- Rows chosen by an IN subquery with LIMIT: the statement's first rows in all, not per shard group.
DELETE FROM items WHERE user_id IN (SELECT user_id FROM orders ORDER BY amount DESC, user_id, id LIMIT 2) RETURNING order_id, user_id;
UPDATE users SET flag = NOT flag WHERE id IN (SELECT user_id FROM orders ORDER BY amount, user_id, id LIMIT 5) RETURNING id;
-- Data-modifying WITH queries on a reference table, the statement reading only their rows.
WITH u AS (UPDATE regions SET label = label || '!' WHERE code <> 'jp' RETURNING code, label) SELECT * FROM u;
WITH i AS (INSERT INTO regions VALUES ('yy', 'Why') RETURNING *) SELECT * FROM i;
WITH d AS (DELETE FROM regions WHERE code = 'yy' RETURNING code) SELECT count(*) FROM d;
-- ON CONFLICT through a view naming EXCLUDED.
INSERT INTO orders_view VALUES (1, 1, 5.5, 'viewed', 'v') ON CONFLICT (user_id, id) DO UPDATE SET status = EXCLUDED.status, amount = EXCLUDED.amount RETURNING user_id, id, status;
-- tableoid of the target in RETURNING and ON CONFLICT clauses: the table's, not a shard's.
UPDATE users SET score = score + 1 WHERE id < 4 RETURNING tableoid::regclass::text, id;
DELETE FROM events WHERE id = 8 RETURNING tableoid::regclass, id;
INSERT INTO orders VALUES (1, 1, 1, 'x', 'y') ON CONFLICT (user_id, id) DO UPDATE SET note = 'z' WHERE orders.tableoid = 'orders'::regclass::oid RETURNING tableoid::regclass, tableoid::regclass::text || '!', id;
UPDATE users SET flag = NOT flag WHERE score === 7 RETURNING id;
-- PL/pgSQL: UPDATE ... RETURNING INTO of several rows fails with too_many_rows (P0003), which the block catches.
DO $$ DECLARE v bigint; BEGIN UPDATE users SET score = score + 1 WHERE id < 5 RETURNING id INTO v; EXCEPTION WHEN too_many_rows THEN UPDATE users SET name = 'too many' WHERE id = 1; END $$;
DO $$ DECLARE v text; BEGIN UPDATE regions SET label = label || '*' RETURNING code INTO v; EXCEPTION WHEN too_many_rows THEN UPDATE regions SET label = 'caught' WHERE code = 'eu'; END $$;
UPDATE orders_view SET note = 'through the view' WHERE user_id = 21 RETURNING id, note;
UPDATE orders_view SET amount = 0 WHERE status = 'new' AND amount < 20;
DELETE FROM orders_view WHERE user_id = 22 RETURNING id;
DELETE FROM orders_view WHERE note = 'through the view' AND id > 300;
UPDATE paid_orders SET note = 'paid ' || user_id WHERE user_id < 40 RETURNING id, note;
DELETE FROM paid_orders WHERE amount > 200;
