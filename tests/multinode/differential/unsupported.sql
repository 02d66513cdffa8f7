-- Shapes refused with SQLSTATE 0A000 (documented in docs/limitations.md); the local side is
-- not consulted.
SELECT ctid FROM users;
SELECT u FROM users u;
SELECT * FROM users FOR UPDATE;
SELECT * FROM users TABLESAMPLE SYSTEM (10);
UPDATE users SET id = id + 1 WHERE id = 5;
UPDATE users SET score = (SELECT count(*) FROM orders);
DELETE FROM orders WHERE id IN (SELECT id FROM users WHERE region IS NULL);
UPDATE regions r SET label = 'x' WHERE EXISTS (SELECT 1 FROM users u WHERE u.region = r.code AND u.id = 1);
UPDATE regions SET label = random()::text;
UPDATE users SET score = (random() * 100)::int WHERE id = 3;
