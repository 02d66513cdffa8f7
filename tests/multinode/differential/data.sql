INSERT INTO @s.regions VALUES ('eu', 'Europe'), ('us', 'Amérique du Nord'), ('jp', '日本'), ('br', NULL);
INSERT INTO @s.users
SELECT g,
       CASE WHEN g % 17 = 0 THEN NULL WHEN g % 5 = 0 THEN 'Jürgen ' || g WHEN g % 7 = 0 THEN '東京 ' || g ELSE 'user ' || g END,
       CASE WHEN g % 11 = 0 THEN NULL ELSE (ARRAY['eu', 'us', 'jp', 'br', 'xx'])[g % 5 + 1] END,
       (g * 37) % 101,
       DATE '2024-01-01' + (g % 400),
       g % 3 = 0
FROM generate_series(1, 200) g;
INSERT INTO @s.orders
SELECT g, (g * 7) % 210 + 1,
       CASE WHEN g % 13 = 0 THEN NULL ELSE ((g * 31) % 1000) / 4.0 END,
       (ARRAY['new', 'paid', 'shipped'])[g % 3 + 1],
       CASE WHEN g % 4 = 0 THEN 'note ✓ ' || g END
FROM generate_series(1, 600) g;
INSERT INTO @s.items
SELECT g % 600 + 1, ((g % 600 + 1) * 7) % 210 + 1, 'sku-' || (g % 37), g % 9
FROM generate_series(1, 1000) g;
INSERT INTO @s.events
SELECT g, (g * 13) % 220 + 1, (ARRAY['click', 'view', 'buy'])[g % 3 + 1],
       CASE WHEN g % 10 = 0 THEN NULL ELSE md5(g::text) END,
       TIMESTAMPTZ '2024-01-01 00:00:00+00' + g * interval '37 minutes'
FROM generate_series(1, 400) g;
UPDATE @s.events SET tag = (ARRAY['b', 'B', 'a', 'A', 'é', NULL])[id % 6 + 1];
INSERT INTO @s."MixedCase" SELECT g, 'v' || g, g % 4 FROM generate_series(1, 50) g;
INSERT INTO @s.notes SELECT g % 150 + 1, 'note ' || g FROM generate_series(1, 200, 3) g;
INSERT INTO @s2.accounts SELECT g, g % 200 + 1, g * 1.25 FROM generate_series(1, 100) g;
CREATE VIEW @s.region_counts AS SELECT region, count(*) AS n, avg(score) AS a FROM @s.users GROUP BY region;
CREATE VIEW @s.user_orders AS SELECT u.id, u.name, o.id AS order_id, o.amount FROM @s.users u JOIN @s.orders o ON o.user_id = u.id;
CREATE VIEW @s.orders_view AS SELECT * FROM @s.orders;
CREATE VIEW @s.paid_orders AS SELECT id, user_id, amount, note FROM @s.orders WHERE status = 'paid';
CREATE VIEW @s.checked_orders AS SELECT * FROM @s.orders WHERE amount > 0 WITH CHECK OPTION;
