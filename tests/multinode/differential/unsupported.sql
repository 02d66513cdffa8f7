-- Shapes refused with SQLSTATE 0A000 (documented in docs/limitations.md); the local side is
-- not consulted.
SELECT ctid FROM users;
DELETE FROM users WHERE id = 7 RETURNING (SELECT 1), users;
SELECT * FROM users ORDER BY id LIMIT 5 FOR UPDATE;
SELECT * FROM users TABLESAMPLE SYSTEM (10);
SELECT count(*) FROM (SELECT * FROM users TABLESAMPLE BERNOULLI (50) WHERE id = 5) s;
SELECT region, count(*) FROM (SELECT * FROM users TABLESAMPLE SYSTEM (100)) s GROUP BY region;
UPDATE users SET id = id + 1 WHERE id = 5;
UPDATE regions SET code = code || '?' WHERE random() < 2;
UPDATE regions r SET code = r.code || u.id FROM users u WHERE u.region = r.code;
UPDATE users u SET score = 1 FROM notes n WHERE n.user_id = u.id RETURNING (SELECT count(*) FROM notes);
WITH i AS (INSERT INTO items VALUES (1, 50, 'x', 1) RETURNING *) SELECT * FROM items WHERE user_id = 50;
WITH u AS (UPDATE users SET id = 7 WHERE id = 5 RETURNING *) SELECT * FROM u;
UPDATE users SET score = 1 WHERE CURRENT OF no_such_cursor;
MERGE INTO users u USING notes n ON n.note = u.name WHEN MATCHED THEN UPDATE SET score = 0;
MERGE INTO users u USING notes n ON n.user_id = u.id WHEN NOT MATCHED THEN INSERT (id) VALUES (n.user_id + 1);
MERGE INTO users u USING notes n ON n.user_id = u.id WHEN MATCHED THEN UPDATE SET id = n.user_id;
MERGE INTO users u USING notes n ON n.user_id = u.id WHEN MATCHED AND u.id IN (SELECT user_id FROM orders) THEN DELETE;
MERGE INTO users u USING notes n ON n.user_id = u.id WHEN MATCHED THEN UPDATE SET score = random() * 10;
MERGE INTO users u USING notes n JOIN regions r ON r.code = n.note ON n.user_id = u.id WHEN MATCHED THEN DELETE;
MERGE INTO regions r USING notes n ON n.note = r.code WHEN MATCHED THEN DELETE;
WITH d AS (DELETE FROM items WHERE qty = 1 RETURNING *) SELECT count(*) FROM d JOIN items i ON i.order_id = d.order_id;
WITH a AS (SELECT user_id FROM orders WHERE amount > 200), d AS (DELETE FROM items WHERE user_id IN (SELECT user_id FROM a) RETURNING *) SELECT count(*) FROM d;
INSERT INTO orders VALUES (1, 1, 1, 'x', 'y') ON CONFLICT (user_id, id) DO UPDATE SET note = (SELECT max(label) FROM regions);
INSERT INTO orders VALUES (1, 1, 1, 'x', 'y') ON CONFLICT (user_id, id) DO UPDATE SET note = 'z' RETURNING ctid;
UPDATE users SET score = 1 WHERE id = 3 RETURNING xmin;
SELECT u.id FROM users u JOIN regions r ON r.code = u.region WHERE u.id = 5 FOR UPDATE;
SELECT count(*) FROM users WHERE region IN (SELECT code FROM regions FOR SHARE);
