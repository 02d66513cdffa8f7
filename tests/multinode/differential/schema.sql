-- The differential dataset. Loaded twice: with @s/@s2 = d/d2 (then distributed, see
-- distribute.sql) and with @s/@s2 = l/l2 (plain local tables). Deterministic: no random().
CREATE SCHEMA @s;
CREATE SCHEMA @s2;
CREATE TABLE @s.users (id bigint PRIMARY KEY, name text, region text, score int, created date, flag bool);
CREATE TABLE @s.orders (id bigint, user_id bigint, amount numeric(10,2), status text, note text, PRIMARY KEY (user_id, id));
CREATE TABLE @s.items (order_id bigint, user_id bigint, sku text, qty int);
CREATE TABLE @s.events (id bigint PRIMARY KEY, user_id bigint, scratch int, kind text, payload text, at timestamptz);
-- A dropped column and a column whose collation is not its type's default (broadcast joins
-- must keep both straight).
ALTER TABLE @s.events DROP COLUMN scratch;
ALTER TABLE @s.events ADD COLUMN tag text COLLATE "und-x-icu";
CREATE TABLE @s.regions (code text PRIMARY KEY, label text);
CREATE TABLE @s."MixedCase" ("Id" int PRIMARY KEY, "Value" text, "select" int);
CREATE TABLE @s2.accounts (id int PRIMARY KEY, owner bigint, balance numeric);
-- Stays a plain table on both sides (not in distribute.sql): statements that mix it with
-- distributed tables.
CREATE TABLE @s.notes (user_id bigint, note text);
-- An operator of the user's own (the workers do not have it): evaluated on the coordinator.
CREATE OPERATOR @s.=== (LEFTARG = int, RIGHTARG = int, FUNCTION = int4eq);
