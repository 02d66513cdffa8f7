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
UPDATE users SET region = NULL WHERE score > 95 RETURNING id;
INSERT INTO users VALUES (1001, 'nouveau', 'eu', 1, '2024-05-05', false) RETURNING *;
INSERT INTO users VALUES (1001, 'again', 'us', 2, '2024-05-06', true) ON CONFLICT (id) DO UPDATE SET score = EXCLUDED.score RETURNING id, score;
DELETE FROM users WHERE id = 1001;
INSERT INTO orders SELECT id + 1000, id, score, 'copied', name FROM users WHERE score > 90;
INSERT INTO items SELECT o.id, o.user_id, 'from ' || o.status, 1 FROM orders o JOIN users u ON u.id = o.user_id WHERE u.region = 'jp' RETURNING order_id, user_id;
INSERT INTO events SELECT id + 10000, user_id, kind, payload, at FROM events WHERE kind = 'buy';
UPDATE users SET score = score WHERE false;
DELETE FROM events WHERE id = -1;
