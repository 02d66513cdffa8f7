//! Distributed and reference tables on real servers: creation, placement, spread, DDL,
//! COPY in and out, undistribute, drop, and bad input leaving nothing behind.

use pg_sharding_multinode::{copy_in, copy_out, expect_error, scalar, Client, Cluster};

fn ids_csv(range: std::ops::RangeInclusive<i64>) -> Vec<u8> {
    let mut data = Vec::new();
    for id in range {
        data.extend_from_slice(format!("{id},name {id},{}.50\n", id % 1000).as_bytes());
    }
    data
}

/// Sorted lines of a COPY TO output (shards come back in shard order, not row order).
fn sorted_lines(data: &[u8]) -> Vec<String> {
    let mut lines: Vec<String> = String::from_utf8_lossy(data).lines().map(str::to_string).collect();
    lines.sort();
    lines
}

fn catalog_counts(c: &mut Client) -> (i64, i64, i64) {
    (
        scalar(c, "SELECT count(*) FROM sharding.dist_table"),
        scalar(c, "SELECT count(*) FROM sharding.dist_shard"),
        scalar(c, "SELECT count(*) FROM sharding.dist_placement"),
    )
}

#[test]
fn rows_land_where_shard_for_value_says_and_spread_evenly() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute("CREATE TABLE seq (id bigint PRIMARY KEY, name text, amount numeric(12,2))").unwrap();
    c.batch_execute("SELECT create_distributed_table('seq', 'id')").unwrap();
    let loaded = copy_in(&mut c, "COPY seq FROM STDIN WITH (FORMAT csv)", &ids_csv(1..=100_000)).unwrap();
    assert_eq!(loaded, 100_000);

    let counts = cluster.rows_per_placement("seq");
    assert_eq!(counts.len(), 32);
    assert_eq!(counts.iter().map(|(_, n)| n).sum::<i64>(), 100_000);
    let mean = 100_000.0 / 32.0;
    for (placement, count) in &counts {
        let deviation = (*count as f64 - mean).abs() / mean;
        assert!(deviation < 0.05, "shard {} holds {count} rows ({deviation:.3} from the mean)", placement.shard_id);
    }
    // Both workers hold shards, round-robin: 16 each.
    let on_first = counts.iter().filter(|(p, _)| p.port == cluster.worker_port(1)).count();
    assert_eq!(on_first, 16);

    // Every sampled row is in the shard shard_for_value names, and only there.
    for id in [1i64, 2, 777, 4242, 99_999, 100_000] {
        let shard: i64 = c.query_one("SELECT sharding.shard_for_value('seq', $1::bigint)", &[&id]).unwrap().get(0);
        for (placement, _) in &counts {
            let mut worker = cluster.connect_port(placement.port);
            let found: i64 = worker
                .query_one(&format!("SELECT count(*) FROM public.\"{}\" WHERE id = $1", placement.shard_name), &[&id])
                .unwrap()
                .get(0);
            assert_eq!(found, i64::from(placement.shard_id == shard), "id {id} in shard {}", placement.shard_id);
        }
    }

    // 10,000 pseudo-random text keys over 4 shards: within 15% of the mean.
    c.batch_execute("CREATE TABLE words (key text PRIMARY KEY)").unwrap();
    c.batch_execute("SELECT create_distributed_table('words', 'key', shard_count => 4)").unwrap();
    let mut state: u64 = 0x2545F4914F6CDD1D;
    let mut data = Vec::new();
    for i in 0..10_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(format!("k{:x}-{i}\n", state).as_bytes());
    }
    copy_in(&mut c, "COPY words FROM STDIN", &data).unwrap();
    let counts = cluster.rows_per_placement("words");
    assert_eq!(counts.len(), 4);
    for (placement, count) in &counts {
        let deviation = (*count as f64 - 2500.0).abs() / 2500.0;
        assert!(deviation < 0.15, "shard {} holds {count} keys", placement.shard_id);
    }
}

#[test]
fn distributing_a_populated_table_keeps_every_row_and_undistribute_brings_them_back() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL, balance numeric(12,2) DEFAULT 0 CHECK (balance >= 0),
                                opened date, tags text);
         CREATE INDEX accounts_owner ON accounts (lower(owner));
         INSERT INTO accounts SELECT g, 'owner ' || g, g * 1.25, date '2020-01-01' + g % 1000,
                                     CASE WHEN g % 3 = 0 THEN NULL ELSE E'tab\\there' END
           FROM generate_series(1, 20000) g;",
    )
    .unwrap();
    let before = sorted_lines(&copy_out(&mut c, "COPY accounts TO STDOUT").unwrap());
    let checksum: String = scalar(&mut c, "SELECT md5(string_agg(a::text, ',' ORDER BY id)) FROM accounts a");
    assert_eq!(before.len(), 20_000);

    c.batch_execute("SELECT create_distributed_table('accounts', 'id', shard_count => 8)").unwrap();
    // The coordinator's table is an empty shell (queries on it are refused until the query
    // engine exists, so its size tells).
    let local_bytes: i64 = scalar(&mut c, "SELECT pg_relation_size('accounts')");
    assert_eq!(local_bytes, 0);
    let counts = cluster.rows_per_placement("accounts");
    assert_eq!(counts.iter().map(|(_, n)| n).sum::<i64>(), 20_000);
    let after = sorted_lines(&copy_out(&mut c, "COPY accounts TO STDOUT").unwrap());
    assert_eq!(after, before, "COPY TO of the distributed table returns exactly the original rows");

    // The shards carry the definition: defaults, NOT NULL, CHECK, primary key and index.
    let mut w = cluster.worker(1);
    let shard = &counts.iter().find(|(p, _)| p.port == cluster.worker_port(1)).unwrap().0.shard_name;
    let indexes: i64 = scalar(&mut w, &format!("SELECT count(*) FROM pg_indexes WHERE tablename = '{shard}'"));
    assert_eq!(indexes, 2);
    let (code, ..) = expect_error(&mut w, &format!("INSERT INTO {shard} (id, owner, balance) VALUES (-5, 'x', -1)"));
    assert_eq!(code, "23514", "the CHECK constraint is on the shard");

    c.batch_execute("SELECT undistribute_table('accounts')").unwrap();
    let restored: String = scalar(&mut c, "SELECT md5(string_agg(a::text, ',' ORDER BY id)) FROM accounts a");
    assert_eq!(restored, checksum);
    assert_eq!(cluster.shard_tables_on_workers("accounts"), 0);
    assert_eq!(catalog_counts(&mut c), (0, 0, 0));
}

#[test]
fn ddl_reaches_every_shard() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, \"Label\" text)").unwrap();
    c.batch_execute("SELECT create_distributed_table('items', 'id', shard_count => 6)").unwrap();
    copy_in(&mut c, "COPY items FROM STDIN", b"1\tone\n2\ttwo\n3\tthree\n").unwrap();
    let shards = 6i64;
    let column_count = |cluster: &Cluster, column: &str| -> i64 {
        (1..=2)
            .map(|w| -> i64 {
                scalar(
                    &mut cluster.worker(w),
                    &format!("SELECT count(*) FROM information_schema.columns WHERE table_name ~ '^items_[0-9]+$' AND column_name = '{column}'"),
                )
            })
            .sum()
    };

    c.batch_execute("ALTER TABLE items ADD COLUMN price numeric(10,2) DEFAULT 9.99 NOT NULL").unwrap();
    assert_eq!(column_count(&cluster, "price"), shards);
    // A default computed once (now(), under any DateStyle) fills every shard's rows with the
    // coordinator's value, as on one server; a volatile one is computed per row.
    c.batch_execute(
        "SET DateStyle = 'Postgres, DMY'; BEGIN;
         ALTER TABLE items ADD COLUMN added timestamptz DEFAULT now(), ADD COLUMN draw float8 DEFAULT random();",
    )
    .unwrap();
    assert!(scalar::<i64>(&mut c, "SELECT count(*) FROM items") > 1);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(DISTINCT added) FROM items WHERE added = now()"), 1);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM items WHERE added <> now()"), 0);
    assert!(scalar::<i64>(&mut c, "SELECT count(DISTINCT draw) FROM items") > 1);
    c.batch_execute("COMMIT; RESET DateStyle; ALTER TABLE items DROP COLUMN added, DROP COLUMN draw").unwrap();
    c.batch_execute("ALTER TABLE items RENAME COLUMN \"Label\" TO title").unwrap();
    assert_eq!(column_count(&cluster, "title"), shards);
    assert_eq!(column_count(&cluster, "Label"), 0);
    c.batch_execute("ALTER TABLE items ALTER COLUMN price TYPE numeric(12,2), ALTER COLUMN title SET NOT NULL").unwrap();
    c.batch_execute("ALTER TABLE items ADD CONSTRAINT price_positive CHECK (price > 0)").unwrap();
    c.batch_execute("CREATE INDEX items_title ON items (title)").unwrap();
    let on_workers = |cluster: &Cluster, sql: &str| -> i64 { (1..=2).map(|w| -> i64 { scalar(&mut cluster.worker(w), sql) }).sum() };
    assert_eq!(on_workers(&cluster, "SELECT count(*) FROM pg_indexes WHERE indexname ~ '^items_title_[0-9]+$'"), shards);
    assert_eq!(on_workers(&cluster, "SELECT count(*) FROM pg_constraint WHERE conname = 'price_positive'"), shards);
    assert_eq!(
        on_workers(&cluster, "SELECT count(*) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid WHERE c.relname ~ '^items_[0-9]+$' AND a.attname = 'title' AND a.attnotnull"),
        shards
    );
    c.batch_execute("ALTER INDEX items_title RENAME TO items_by_title").unwrap();
    assert_eq!(on_workers(&cluster, "SELECT count(*) FROM pg_indexes WHERE indexname ~ '^items_by_title_[0-9]+$'"), shards);
    c.batch_execute("DROP INDEX items_by_title").unwrap();
    assert_eq!(on_workers(&cluster, "SELECT count(*) FROM pg_indexes WHERE indexname ~ '^items_by_title_[0-9]+$'"), 0);
    c.batch_execute("CREATE INDEX CONCURRENTLY items_price ON items (price)").unwrap();
    assert_eq!(on_workers(&cluster, "SELECT count(*) FROM pg_indexes WHERE indexname ~ '^items_price_[0-9]+$'"), shards);
    assert_eq!(on_workers(&cluster, "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname ~ '^items_price_[0-9]+$' AND i.indisvalid"), shards);
    c.batch_execute("DROP INDEX CONCURRENTLY items_price").unwrap();
    assert_eq!(on_workers(&cluster, "SELECT count(*) FROM pg_indexes WHERE indexname ~ '^items_price_[0-9]+$'"), 0);
    // A unique index without the distribution column, CONCURRENTLY: refused before the
    // coordinator builds it (no invalid index left behind, the name stays free).
    let (code, ..) = expect_error(&mut c, "CREATE UNIQUE INDEX CONCURRENTLY items_u ON items (price)");
    assert_eq!(code, "0A000");
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM pg_class WHERE relname = 'items_u'"), 0);
    c.batch_execute("ALTER TABLE items DROP CONSTRAINT price_positive, DROP COLUMN price").unwrap();
    assert_eq!(column_count(&cluster, "price"), 0);

    // Existing rows got the new column's default on the shards.
    let data = String::from_utf8(copy_out(&mut c, "COPY items (id, title) TO STDOUT").unwrap()).unwrap();
    assert_eq!(sorted_lines(data.as_bytes()), vec!["1\tone", "2\ttwo", "3\tthree"]);

    // Refused: changes the shards could not follow; nothing changes anywhere.
    for (sql, code) in [
        ("ALTER TABLE items DROP COLUMN id", "0A000"),
        ("ALTER TABLE items ALTER COLUMN id TYPE numeric", "0A000"),
        ("ALTER TABLE items ADD COLUMN n int GENERATED BY DEFAULT AS IDENTITY", "0A000"),
        ("ALTER TABLE items ADD CONSTRAINT title_unique UNIQUE (title)", "0A000"),
        ("ALTER TABLE items ALTER COLUMN title TYPE varchar(5) USING left(title, 5)", "0A000"),
        ("ALTER TABLE items SET (fillfactor = 50)", "0A000"),
        ("CREATE TRIGGER t BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION suppress_redundant_updates_trigger()", "0A000"),
        ("CREATE UNIQUE INDEX items_title_u ON items (title)", "0A000"),
    ] {
        let (got, message, ..) = expect_error(&mut c, sql);
        assert_eq!(got, code, "{sql}: {message}");
    }
    assert_eq!(column_count(&cluster, "id"), shards);
    assert_eq!(column_count(&cluster, "n"), 0);

    // Statements the workers prepared before a column's type changed are prepared again (the
    // workers would refuse them: "cached plan must not change result type"), in this session
    // and in another one.
    let mut other = cluster.coordinator();
    let executions = (1..=7).map(|i| format!("EXECUTE s({i});")).collect::<Vec<_>>().join(" ");
    c.batch_execute("ALTER TABLE items ADD COLUMN w int").unwrap();
    for session in [&mut c, &mut other] {
        session.batch_execute(&format!("PREPARE s(bigint) AS SELECT * FROM items WHERE id = $1; {executions}")).unwrap();
    }
    c.batch_execute("ALTER TABLE items ALTER COLUMN w TYPE bigint").unwrap();
    for session in [&mut c, &mut other] {
        session.batch_execute(&format!("DEALLOCATE s; PREPARE s(bigint) AS SELECT * FROM items WHERE id = $1; {executions}")).unwrap();
    }
    c.batch_execute("ALTER TABLE items DROP COLUMN w").unwrap();

    // RENAME TABLE renames every shard; TRUNCATE empties them; DROP TABLE removes them. Both
    // this session and another that had read the table before go on under the new name.
    let before: i64 = scalar(&mut other, "SELECT count(*) FROM items");
    c.batch_execute("ALTER TABLE items RENAME TO goods").unwrap();
    assert_eq!(cluster.shard_tables_on_workers("goods"), shards);
    assert_eq!(cluster.shard_tables_on_workers("items"), 0);
    for session in [&mut c, &mut other] {
        assert_eq!(scalar::<i64>(session, "SELECT count(*) FROM goods"), before);
        let id: i64 = scalar(session, "SELECT min(id) FROM goods");
        assert_eq!(session.execute("UPDATE goods SET title = 'renamed' WHERE id = $1", &[&id]).unwrap(), 1);
    }
    // A schema holding distributed tables keeps its name (its shards' schemas on the nodes would not follow).
    let (code, ..) = expect_error(&mut c, "ALTER SCHEMA public RENAME TO elsewhere");
    assert_eq!(code, "0A000");
    c.batch_execute("TRUNCATE goods").unwrap();
    assert_eq!(cluster.rows_per_placement("goods").iter().map(|(_, n)| n).sum::<i64>(), 0);
    c.batch_execute("DROP TABLE goods").unwrap();
    assert_eq!(cluster.shard_tables_on_workers("goods"), 0);
    assert_eq!(catalog_counts(&mut c), (0, 0, 0));
}

#[test]
fn copy_is_all_or_nothing_and_refuses_null_distribution_values() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute("CREATE TABLE loads (id bigint, amount int)").unwrap();
    c.batch_execute("SELECT create_distributed_table('loads', 'id')").unwrap();

    // A bad value in the distribution column is found on the coordinator: COPY's own context.
    let mut data = Vec::new();
    for id in 1..=2000 {
        if id == 1500 {
            data.extend_from_slice(b"not-a-number\t1500\n");
        } else {
            data.extend_from_slice(format!("{id}\t{id}\n").as_bytes());
        }
    }
    let error = copy_in(&mut c, "COPY loads FROM STDIN", &data).unwrap_err();
    assert_eq!(pg_sharding_multinode::sqlstate(&error), "22P02");
    let context = error.as_db_error().and_then(|d| d.where_()).unwrap_or_default().to_string();
    assert!(context.contains("line 1500"), "context: {context}");
    assert_eq!(cluster.rows_per_placement("loads").iter().map(|(_, n)| n).sum::<i64>(), 0);

    // A bad value elsewhere is found by the worker that receives the row: its context is in
    // the detail. Nothing is inserted anywhere either way.
    let data: Vec<u8> = data.iter().copied().collect::<Vec<u8>>();
    let data = String::from_utf8(data).unwrap().replace("not-a-number\t1500", "1500\tnot-a-number");
    let error = copy_in(&mut c, "COPY loads FROM STDIN", data.as_bytes()).unwrap_err();
    assert_eq!(pg_sharding_multinode::sqlstate(&error), "22P02");
    let detail = error.as_db_error().and_then(|d| d.detail()).unwrap_or_default().to_string();
    assert!(detail.contains("on node") && detail.contains("not-a-number"), "detail: {detail}");
    assert_eq!(cluster.rows_per_placement("loads").iter().map(|(_, n)| n).sum::<i64>(), 0);

    // A worker's DETAIL comes through (the key of a unique violation), with the node.
    c.batch_execute("CREATE UNIQUE INDEX loads_id ON loads (id); INSERT INTO loads VALUES (7, 7)").unwrap();
    let (code, _, _, detail) = expect_error(&mut c, "INSERT INTO loads VALUES (7, 8)");
    assert_eq!(code, "23505");
    assert!(detail.starts_with("Key (id)=(7) already exists.") && detail.contains("on node"), "{detail}");
    c.batch_execute("DROP INDEX loads_id; TRUNCATE loads").unwrap();
    let error = copy_in(&mut c, "COPY loads FROM STDIN", b"1\t1\n\\N\t2\n").unwrap_err();
    assert_eq!(pg_sharding_multinode::sqlstate(&error), "23502");
    let message = error.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
    assert!(message.contains("\"id\""), "{message}");
    assert_eq!(cluster.rows_per_placement("loads").iter().map(|(_, n)| n).sum::<i64>(), 0);

    // Defaults and sequences are evaluated once, on the coordinator.
    c.batch_execute("CREATE TABLE serials (id bigserial, note text DEFAULT 'n/a'); SELECT create_distributed_table('serials', 'id', shard_count => 4)").unwrap();
    copy_in(&mut c, "COPY serials (note) FROM STDIN", b"a\nb\nc\n").unwrap();
    copy_in(&mut c, "COPY serials (id) FROM STDIN", b"100\n").unwrap();
    let rows = sorted_lines(&copy_out(&mut c, "COPY serials TO STDOUT").unwrap());
    assert_eq!(rows, vec!["1\ta", "100\tn/a", "2\tb", "3\tc"]);

    // Statements on ordinary tables behave exactly as without pg_sharding, errors included.
    c.batch_execute("CREATE TABLE plain (a int)").unwrap();
    let error = copy_in(&mut c, "COPY plain FROM STDIN", b"1\nx\n").unwrap_err();
    let context = error.as_db_error().and_then(|d| d.where_()).unwrap_or_default().to_string();
    assert_eq!(context, "COPY plain, line 2, column a: \"x\"");

    // A COPY inside a transaction that rolls back leaves nothing on the workers.
    c.batch_execute("BEGIN").unwrap();
    copy_in(&mut c, "COPY loads FROM STDIN", b"1\t1\n2\t2\n").unwrap();
    c.batch_execute("ROLLBACK").unwrap();
    assert_eq!(cluster.rows_per_placement("loads").iter().map(|(_, n)| n).sum::<i64>(), 0);
}

#[test]
fn reference_tables_live_on_every_node() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE countries (code text PRIMARY KEY, name text NOT NULL);
         INSERT INTO countries VALUES ('jp', 'Japan'), ('fr', 'France');
         SELECT create_reference_table('countries');",
    )
    .unwrap();
    copy_in(&mut c, "COPY countries FROM STDIN WITH (FORMAT csv)", b"de,Germany\nbr,Brazil\n").unwrap();
    let local: Vec<String> = c.query("SELECT code FROM countries ORDER BY code", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(local, vec!["br", "de", "fr", "jp"], "the coordinator's copy is complete and readable");
    let placements = cluster.placements("countries");
    assert_eq!(placements.len(), 2);
    for placement in &placements {
        let mut w = cluster.connect_port(placement.port);
        let codes: Vec<String> = w
            .query(&format!("SELECT code FROM {} ORDER BY code", placement.shard_name), &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(codes, local);
    }
    // A duplicate key fails the whole COPY on every node.
    let error = copy_in(&mut c, "COPY countries FROM STDIN WITH (FORMAT csv)", b"it,Italy\njp,Japan again\n").unwrap_err();
    assert_eq!(pg_sharding_multinode::sqlstate(&error), "23505");
    let count: i64 = scalar(&mut c, "SELECT count(*) FROM countries");
    assert_eq!(count, 4);
    for placement in &placements {
        let n: i64 = scalar(&mut cluster.connect_port(placement.port), &format!("SELECT count(*) FROM {}", placement.shard_name));
        assert_eq!(n, 4);
    }
    // UPDATE and DELETE change every copy, or none.
    assert_eq!(c.execute("UPDATE countries SET name = upper(name) WHERE code <> 'jp'", &[]).unwrap(), 3);
    c.execute("INSERT INTO countries VALUES ('it', 'Italy')", &[]).unwrap();
    assert_eq!(c.execute("DELETE FROM countries WHERE code = 'it'", &[]).unwrap(), 1);
    c.execute("INSERT INTO countries VALUES ('it', 'Italy')", &[]).unwrap();
    for placement in &placements {
        let mut w = cluster.connect_port(placement.port);
        let upper: i64 = scalar(&mut w, &format!("SELECT count(*) FROM {} WHERE name = upper(name)", placement.shard_name));
        assert_eq!(upper, 3, "copy on port {}", placement.port);
    }
    // A copy that drifted is noticed, and nothing changes anywhere.
    let drifted = &placements[0];
    cluster.connect_port(drifted.port).batch_execute(&format!("DELETE FROM {} WHERE code = 'it'", drifted.shard_name)).unwrap();
    let (code, ..) = expect_error(&mut c, "UPDATE countries SET name = 'x'");
    assert_eq!(code, "XX001");
    let unchanged: i64 = scalar(&mut c, "SELECT count(*) FROM countries WHERE name = 'x'");
    assert_eq!(unchanged, 0);
    cluster.connect_port(drifted.port).batch_execute(&format!("INSERT INTO {} VALUES ('it', 'Italy')", drifted.shard_name)).unwrap();

    // A node that leaves takes its copy along; a node that joins gets one.
    let w2 = cluster.worker_port(2) as i32;
    c.execute("SELECT sharding.remove_node('127.0.0.1', $1)", &[&w2]).unwrap();
    assert_eq!(cluster.placements("countries").len(), 1);
    assert_eq!(cluster.shard_tables_on_workers("countries"), 1);
    c.execute("SELECT sharding.add_node('127.0.0.1', $1)", &[&w2]).unwrap();
    let placements = cluster.placements("countries");
    assert_eq!(placements.len(), 2);
    for placement in &placements {
        let n: i64 = scalar(&mut cluster.connect_port(placement.port), &format!("SELECT count(*) FROM {}", placement.shard_name));
        assert_eq!(n, 5, "copy on port {}", placement.port);
    }
}

#[test]
fn shapes_the_engine_does_not_run_fail_clearly_and_views_read_the_shards() {
    let cluster = Cluster::start(1);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE t (id int); SELECT create_distributed_table('t', 'id'); CREATE VIEW v AS SELECT * FROM t;
         INSERT INTO t SELECT generate_series(1, 10);",
    )
    .unwrap();
    for sql in [
        "UPDATE t SET id = 2",
        "WITH w AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM w, t",
    ] {
        let (code, message, ..) = expect_error(&mut c, sql);
        assert_eq!(code, "0A000", "{sql}");
        assert!(message.contains("\"t\""), "{message}");
    }
    // Data-modifying WITH queries over every shard run first, as statements of their own.
    let n: i64 = scalar(&mut c, "WITH w AS (INSERT INTO t VALUES (1) RETURNING *) SELECT count(*) FROM w");
    assert_eq!(n, 1);
    let n: i64 = scalar(&mut c, "WITH w AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT count(*) FROM w");
    assert_eq!(n, 2);
    // One that nothing reads runs all the same, as on one server.
    c.batch_execute("WITH w AS (DELETE FROM t WHERE id = 10 RETURNING *) SELECT 1").unwrap();
    let n: i64 = scalar(&mut c, "SELECT count(*) FROM t WHERE id = 10");
    assert_eq!(n, 0);
    c.batch_execute("INSERT INTO t VALUES (1), (10)").unwrap();
    let n: i64 = scalar(&mut c, "SELECT count(*) FROM v");
    assert_eq!(n, 10);
    // INSERT ... SELECT from the table itself reads every row before writing any.
    c.batch_execute("INSERT INTO t SELECT id + 100 FROM t").unwrap();
    let n: i64 = scalar(&mut c, "SELECT count(*) FROM v");
    assert_eq!(n, 20);
    let n: i64 = scalar(&mut c, "WITH x AS (SELECT 1) SELECT count(*) FROM x, t");
    assert_eq!(n, 20);
}

#[test]
fn bad_input_errors_and_leaves_nothing_behind() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE good (id int PRIMARY KEY, doc jsonb, u text UNIQUE);
         CREATE TABLE noprimary (id int, doc jsonb);
         CREATE TABLE parent (id int PRIMARY KEY);
         CREATE TABLE child (id int REFERENCES parent (id));
         INSERT INTO parent VALUES (1); INSERT INTO child VALUES (1);
         CREATE TABLE parted (id int) PARTITION BY RANGE (id);
         CREATE UNLOGGED TABLE unlogged_t (id int);
         CREATE TABLE other (id bigint);
         SELECT create_distributed_table('other', 'id', shard_count => 4);
         CREATE TABLE t8 (id int);
         CREATE TABLE owned_by_app (id int);
         CREATE ROLE app;
         GRANT USAGE ON SCHEMA sharding TO app;",
    )
    .unwrap();
    let shard_tables_before = cluster.shard_tables_on_workers("good") + cluster.shard_tables_on_workers("noprimary");
    let catalog_before = catalog_counts(&mut c);

    let cases: Vec<(&str, &str)> = vec![
        ("SELECT create_distributed_table('missing', 'id')", "42P01"),
        ("SELECT create_distributed_table('noprimary', 'nope')", "42703"),
        ("SELECT create_distributed_table('noprimary', 'doc')", "0A000"),
        ("SELECT create_distributed_table('good', 'id')", "0A000"), // unique (u) lacks the column
        ("SELECT create_distributed_table('child', 'id')", "0A000"),
        ("SELECT create_distributed_table('parent', 'id')", "0A000"), // referenced by a local table's rows
        ("SELECT create_distributed_table('parted', 'id')", "0A000"),
        ("SELECT create_distributed_table('unlogged_t', 'id')", "0A000"),
        ("SELECT create_distributed_table('other', 'id')", "42710"),
        ("SELECT create_distributed_table('noprimary', 'id', 'range')", "22023"),
        ("SELECT create_distributed_table('noprimary', 'id', shard_count => 0)", "22023"),
        ("SELECT create_distributed_table('noprimary', 'id', colocate_with => 'other')", "42804"),
        ("SELECT create_distributed_table('t8', 'id', colocate_with => 'missing_table')", "42P01"),
        ("SELECT create_distributed_table('noprimary', NULL)", "22004"),
        ("SELECT create_reference_table('child')", "0A000"),
        ("SELECT undistribute_table('noprimary')", "22023"),
        ("SET ROLE app; SELECT create_distributed_table('owned_by_app', 'id')", "42501"),
    ];
    for (sql, code) in cases {
        let (got, message, ..) = expect_error(&mut c, sql);
        assert_eq!(got, code, "{sql}: {message}");
        c.batch_execute("RESET ROLE").unwrap();
    }
    c.batch_execute("CREATE TEMP TABLE temp_t (id int)").unwrap();
    let (code, ..) = expect_error(&mut c, "SELECT create_distributed_table('temp_t', 'id')");
    assert_eq!(code, "0A000");
    // colocate_with a table of another shard count.
    let (code, ..) = expect_error(&mut c, "CREATE TABLE t9 (id bigint); SELECT create_distributed_table('t9', 'id', colocate_with => 'other', shard_count => 8)");
    assert_eq!(code, "22023");

    assert_eq!(catalog_counts(&mut c), catalog_before, "no catalog rows from failed calls");
    assert_eq!(
        cluster.shard_tables_on_workers("good") + cluster.shard_tables_on_workers("noprimary"),
        shard_tables_before,
        "no shard tables from failed calls"
    );

    // A failure half-way (a worker refuses to create one shard) rolls back every node.
    let next: i64 = scalar(&mut c, "SELECT last_value + 1 FROM sharding.dist_shard_id_seq");
    let mut w2 = cluster.worker(2);
    for id in next..next + 64 {
        w2.batch_execute(&format!("CREATE TABLE public.t8_{id} (blocker int)")).unwrap();
    }
    let blockers = cluster.shard_tables_on_workers("t8");
    let (code, message, ..) = expect_error(&mut c, "SELECT create_distributed_table('t8', 'id', shard_count => 8)");
    assert_eq!(code, "42P07", "{message}");
    assert_eq!(cluster.shard_tables_on_workers("t8"), blockers, "worker 1 keeps no shard of the failed call");
    assert_eq!(catalog_counts(&mut c), catalog_before);

    // No active nodes.
    c.batch_execute("UPDATE sharding.dist_node SET is_active = false").unwrap();
    let (code, message, hint, _) = expect_error(&mut c, "SELECT create_distributed_table('noprimary', 'id')");
    assert_eq!(code, "55000", "{message}");
    assert!(hint.contains("add_node"), "{hint}");
}

fn all_rows(c: &mut Client, table: &str) -> Vec<String> {
    sorted_lines(&copy_out(c, &format!("COPY {table} TO STDOUT")).unwrap())
}

#[test]
fn insert_routes_rows_with_coordinator_defaults_and_returning() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE orders (id bigserial PRIMARY KEY, customer text NOT NULL, amount numeric(10,2) DEFAULT 1.50);
         INSERT INTO orders (customer) VALUES ('before');",
    )
    .unwrap();
    // Planned while the table was local; must be planned again once it is distributed.
    let prepared = c.prepare("INSERT INTO orders (customer) VALUES ($1) RETURNING id, amount::text").unwrap();
    c.batch_execute("SELECT create_distributed_table('orders', 'id', shard_count => 8)").unwrap();

    let row = c.query_one(&prepared, &[&"first"]).unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, String>(1)), (2, "1.50".to_string()));
    // Extended protocol, enough executions for a generic plan.
    for i in 0..8 {
        c.query_one(&prepared, &[&format!("p{i}")]).unwrap();
    }
    let inserted = c.execute("INSERT INTO orders (id, customer, amount) VALUES (1000, 'a', 5), (1001, 'b', NULL), (1002, 'c', DEFAULT)", &[]).unwrap();
    assert_eq!(inserted, 3);
    let returned: Vec<(i64, String)> = c
        .query("INSERT INTO orders (id, customer) VALUES (2000, 'r1'), (2001, 'r2') RETURNING id, upper(customer)", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(returned, vec![(2000, "R1".to_string()), (2001, "R2".to_string())]);
    let table_name: String = c
        .query_one("INSERT INTO orders (id, customer) VALUES (2002, 'r3') RETURNING tableoid::regclass::text", &[])
        .unwrap()
        .get(0);
    assert_eq!(table_name, "orders");
    let bulk = c.execute("INSERT INTO orders (id, customer) SELECT 10000 + g, 'bulk' FROM generate_series(1, 5000) g", &[]).unwrap();
    assert_eq!(bulk, 5000);

    let rows = all_rows(&mut c, "orders");
    assert_eq!(rows.len(), 1 + 1 + 8 + 3 + 3 + 5000);
    assert!(rows.contains(&"1001\tb\t\\N".to_string()), "explicit NULL kept");
    assert!(rows.contains(&"1002\tc\t1.50".to_string()), "DEFAULT evaluated");
    // Sequence values were taken once, on the coordinator: ids 1..10 with no gaps or repeats.
    let ids: Vec<i64> = rows.iter().map(|l| l.split('\t').next().unwrap().parse().unwrap()).filter(|id| *id <= 10).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, (1..=10).collect::<Vec<i64>>());
    // Each row is in the shard shard_for_value names.
    for id in [2i64, 1000, 2001, 12345] {
        let shard: i64 = c.query_one("SELECT sharding.shard_for_value('orders', $1::bigint)", &[&id]).unwrap().get(0);
        let placement = cluster.placements("orders").into_iter().find(|p| p.shard_id == shard).unwrap();
        let found: i64 = cluster
            .connect_port(placement.port)
            .query_one(&format!("SELECT count(*) FROM {} WHERE id = $1", placement.shard_name), &[&id])
            .unwrap()
            .get(0);
        assert_eq!(found, 1, "id {id} in shard {shard}");
    }

    // All or nothing: a NULL distribution value, a NOT NULL violation found by a worker, a
    // duplicate key; and a rolled-back transaction.
    let before = all_rows(&mut c, "orders").len();
    for (sql, code) in [
        ("INSERT INTO orders (id, customer) VALUES (3000, 'ok'), (NULL, 'no id')", "23502"),
        ("INSERT INTO orders (id, customer) VALUES (3001, 'ok'), (3002, NULL)", "23502"),
        ("INSERT INTO orders (id, customer) SELECT 4000 + g, 'dup' FROM generate_series(1, 50) g UNION ALL SELECT 1000, 'dup'", "23505"),
    ] {
        let (got, message, ..) = expect_error(&mut c, sql);
        assert_eq!(got, code, "{sql}: {message}");
    }
    c.batch_execute("BEGIN; INSERT INTO orders (id, customer) VALUES (6000, 'rolled back'); ROLLBACK;").unwrap();
    assert_eq!(all_rows(&mut c, "orders").len(), before, "failed and rolled-back inserts left nothing");
    let inserted = c.execute("INSERT INTO orders (id, customer) VALUES (5000, 'x'), (1000, 'exists') ON CONFLICT DO NOTHING", &[]).unwrap();
    assert_eq!(inserted, 1, "the existing key is skipped, the new one inserted");

    // Reference tables: every copy, the coordinator's included; and INSERT ... SELECT from one.
    c.batch_execute("CREATE TABLE tags (k int PRIMARY KEY, v text); SELECT create_reference_table('tags');").unwrap();
    c.execute("INSERT INTO tags VALUES (1, 'one'), (2, 'two')", &[]).unwrap();
    let local: i64 = scalar(&mut c, "SELECT count(*) FROM tags");
    assert_eq!(local, 2);
    for placement in cluster.placements("tags") {
        let n: i64 = scalar(&mut cluster.connect_port(placement.port), &format!("SELECT count(*) FROM {}", placement.shard_name));
        assert_eq!(n, 2);
    }
    let copied = c.execute("INSERT INTO orders (id, customer) SELECT 7000 + k, v FROM tags", &[]).unwrap();
    assert_eq!(copied, 2);
}

#[test]
fn insert_on_conflict_matches_a_single_server() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    // The same statements on a distributed table and on a plain table of the coordinator.
    c.batch_execute(
        "CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL, hits int DEFAULT 0, note text);
         CREATE UNIQUE INDEX kv_k_note ON kv (k, note) WHERE note IS NOT NULL;
         SELECT create_distributed_table('kv', 'k', shard_count => 4);
         CREATE TABLE kv_plain (k int PRIMARY KEY, v int NOT NULL, hits int DEFAULT 0, note text);
         CREATE UNIQUE INDEX kv_plain_k_note ON kv_plain (k, note) WHERE note IS NOT NULL;",
    )
    .unwrap();
    let statements = [
        "INSERT INTO {t} (k, v) VALUES (1, 10), (2, 20), (7, 70), (8, 80) RETURNING k",
        "INSERT INTO {t} (k, v) VALUES (8, 11), (3, 30), (1, 12), (9, 90) ON CONFLICT DO NOTHING RETURNING k, v",
        "INSERT INTO {t} AS t (k, v) VALUES (1, 100), (9, 1), (2, 200), (4, 40), (7, 7) ON CONFLICT (k) DO UPDATE SET v = t.v + excluded.v, hits = t.hits + 1 WHERE t.k <> 2 RETURNING k, v, hits",
        "INSERT INTO {t} (k, v) VALUES (1, 5) ON CONFLICT ON CONSTRAINT {t}_pkey DO UPDATE SET note = 'c' || excluded.v RETURNING *",
        "INSERT INTO {t} (k, v, note) VALUES (1, 6, 'c5') ON CONFLICT (k, note) WHERE note IS NOT NULL DO UPDATE SET hits = 99 RETURNING *",
        "INSERT INTO {t} (k, v) SELECT g, g FROM generate_series(1, 500) g ON CONFLICT (k) DO UPDATE SET hits = {t}.hits + 1",
    ];
    for statement in statements {
        let text = |rows: Vec<postgres::Row>| -> Vec<String> {
            rows.iter()
                .map(|r| {
                    (0..r.len())
                        .map(|i| match r.try_get::<_, Option<i32>>(i) {
                            Ok(value) => format!("{value:?}"),
                            Err(_) => format!("{:?}", r.try_get::<_, Option<String>>(i).unwrap()),
                        })
                        .collect::<Vec<_>>()
                        .join("|")
                })
                .collect()
        };
        let distributed = c.query(&statement.replace("{t}", "kv"), &[]).unwrap();
        let plain = c.query(&statement.replace("{t}", "kv_plain"), &[]).unwrap();
        assert_eq!(text(distributed), text(plain), "RETURNING of: {statement}");
    }
    // A generic plan's parameters in the clauses the shard runs are the statement's values (the
    // shard statement has parameters of its own).
    c.batch_execute("SET plan_cache_mode = force_generic_plan").unwrap();
    let with_params = "INSERT INTO {t} AS t (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = $3 + excluded.v, note = $4
                       WHERE t.v < $3 RETURNING k, v, note, $3 + 1";
    for (k, v, limit) in [(1i32, 2i32, 1000i32), (3, 4, 1), (600, 6, 7), (4, 1, 100)] {
        let run = |c: &mut postgres::Client, table: &str| -> Vec<String> {
            let rows = c.query(&with_params.replace("{t}", table), &[&k, &v, &limit, &format!("note {k}")]).unwrap();
            rows.iter()
                .map(|r| format!("{:?} {:?} {:?} {:?}", r.get::<_, i32>(0), r.get::<_, i32>(1), r.get::<_, Option<String>>(2), r.get::<_, i32>(3)))
                .collect()
        };
        assert_eq!(run(&mut c, "kv"), run(&mut c, "kv_plain"), "generic plan with ({k}, {v}, {limit})");
    }
    c.batch_execute("RESET plan_cache_mode").unwrap();
    let distributed = all_rows(&mut c, "kv");
    let plain = all_rows(&mut c, "kv_plain");
    assert_eq!(distributed, plain, "final contents");
    // now() in DO UPDATE and RETURNING is the coordinator's transaction time, not a worker's.
    let mut tx = c.transaction().unwrap();
    let started: String = tx.query_one("SELECT now()::text", &[]).unwrap().get(0);
    tx.batch_execute("SELECT pg_sleep(0.3)").unwrap();
    let returned: String = tx
        .query_one("INSERT INTO kv (k, v) VALUES (2, 1) ON CONFLICT (k) DO UPDATE SET note = now()::text RETURNING now()::text", &[])
        .unwrap()
        .get(0);
    tx.commit().unwrap();
    let stored: String = c.query_one("SELECT note FROM kv WHERE k = 2", &[]).unwrap().get(0);
    assert_eq!((stored.as_str(), returned.as_str()), (started.as_str(), started.as_str()));
    // DO UPDATE assigning only a generated column recomputes it; an identity column's DEFAULT
    // (the coordinator's sequence) is refused.
    c.batch_execute(
        "CREATE TABLE gx (id int PRIMARY KEY, a int, k int GENERATED BY DEFAULT AS IDENTITY, gs int GENERATED ALWAYS AS (a * 2) STORED);
         SELECT create_distributed_table('gx', 'id'); INSERT INTO gx (id, a) VALUES (1, 1)",
    )
    .unwrap();
    assert_eq!(c.execute("INSERT INTO gx (id, a) VALUES (1, 5) ON CONFLICT (id) DO UPDATE SET gs = DEFAULT", &[]).unwrap(), 1);
    let (code, ..) = expect_error(&mut c, "INSERT INTO gx (id, a) VALUES (1, 5) ON CONFLICT (id) DO UPDATE SET k = DEFAULT");
    assert_eq!(code, "0A000");
    assert_eq!(all_rows(&mut c, "gx"), vec!["1\t1\t1".to_string()]);
    let (code, ..) = expect_error(&mut c, "INSERT INTO kv (k, v) VALUES (NULL, 1) ON CONFLICT DO NOTHING");
    assert_eq!(code, "23502");

    // The same key twice in one DO UPDATE statement, in different batches sent to one shard:
    // refused as PostgreSQL refuses it, and nothing changes.
    c.batch_execute(
        "CREATE TABLE one (k int PRIMARY KEY, n int); SELECT create_distributed_table('one', 'k', shard_count => 1);
         CREATE TABLE one_plain (k int PRIMARY KEY, n int);",
    )
    .unwrap();
    for table in ["one", "one_plain"] {
        let (code, ..) = expect_error(
            &mut c,
            &format!(
                "INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 2499) g UNION ALL SELECT 1, 1
                 ON CONFLICT (k) DO UPDATE SET n = {table}.n + 1"
            ),
        );
        assert_eq!(code, "21000", "{table}");
    }
    assert_eq!(all_rows(&mut c, "one").len(), 0);
}

#[test]
fn copy_from_files_and_binary_input() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE src (id bigint, label text, amount numeric(10,2), at timestamptz, raw bytea);
         INSERT INTO src SELECT g, 'label ' || g, g / 7.0, timestamptz '2026-01-01 00:00+00' + g * interval '1 hour',
                                decode(md5(g::text), 'hex')
           FROM generate_series(1, 3000) g;
         CREATE TABLE dst (LIKE src);
         SELECT create_distributed_table('dst', 'id', shard_count => 6);",
    )
    .unwrap();
    let expected = sorted_lines(&copy_out(&mut c, "COPY src TO STDOUT").unwrap());

    // Binary input: every type round-trips.
    let binary = copy_out(&mut c, "COPY src TO STDOUT (FORMAT binary)").unwrap();
    assert_eq!(copy_in(&mut c, "COPY dst FROM STDIN (FORMAT binary)", &binary).unwrap(), 3000);
    assert_eq!(all_rows(&mut c, "dst"), expected);

    // A server-side file (csv with a header), read by the coordinator.
    c.batch_execute("TRUNCATE dst").unwrap();
    let dir = std::env::temp_dir().join(format!("pgsh-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("rows.csv");
    let csv = copy_out(&mut c, "COPY src TO STDOUT (FORMAT csv, HEADER)").unwrap();
    std::fs::write(&path, csv).unwrap();
    std::process::Command::new("chmod").args(["-R", "a+rX", &dir.to_string_lossy()]).status().unwrap();
    let loaded = c.execute(&format!("COPY dst FROM '{}' (FORMAT csv, HEADER)", path.display()), &[]).unwrap();
    assert_eq!(loaded, 3000);
    assert_eq!(all_rows(&mut c, "dst"), expected);

    // A file with one bad row loads nothing.
    c.batch_execute("TRUNCATE dst").unwrap();
    let mut bad = std::fs::read_to_string(&path).unwrap();
    bad = bad.replacen("\n1500,", "\nnot-a-number,", 1);
    std::fs::write(&path, bad).unwrap();
    let (code, ..) = expect_error(&mut c, &format!("COPY dst FROM '{}' (FORMAT csv, HEADER)", path.display()));
    assert_eq!(code, "22P02");
    assert_eq!(all_rows(&mut c, "dst").len(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_worker_lost_before_commit_aborts_the_write_on_every_node() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute("CREATE TABLE t (id int, v text); SELECT create_distributed_table('t', 'id', shard_count => 4);").unwrap();
    let mut data = Vec::new();
    for id in 1..=200 {
        data.extend_from_slice(format!("{id}\trow {id}\n").as_bytes());
    }
    c.batch_execute("BEGIN").unwrap();
    copy_in(&mut c, "COPY t FROM STDIN", &data).unwrap();
    cluster.kill_worker(2);
    let error = c.batch_execute("COMMIT").unwrap_err();
    assert_eq!(pg_sharding_multinode::sqlstate(&error), "08006");
    cluster.start_worker(2);
    let mut c = cluster.coordinator();
    assert_eq!(all_rows(&mut c, "t").len(), 0, "no node kept the rows of the failed transaction");
    // The next transaction works with fresh connections.
    copy_in(&mut c, "COPY t FROM STDIN", &data).unwrap();
    assert_eq!(all_rows(&mut c, "t").len(), 200);
}

fn psql(cluster: &Cluster, encoding: &str, sql: &str, input: &[u8]) -> (bool, Vec<u8>, String) {
    use std::io::Write;
    let mut child = std::process::Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &cluster.port.to_string(), "-U", "postgres", "-c", sql])
        .env("PGCLIENTENCODING", encoding)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let output = child.wait_with_output().unwrap();
    (output.status.success(), output.stdout, String::from_utf8_lossy(&output.stderr).to_string())
}

#[test]
fn values_are_hashed_as_stored_and_text_crosses_encodings() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute("CREATE TABLE prices (p numeric(10,2), note text); SELECT create_distributed_table('prices', 'p', shard_count => 8);").unwrap();
    // 1.005 is stored as 1.01: the row must be in the shard of 1.01, by COPY and by INSERT.
    copy_in(&mut c, "COPY prices FROM STDIN", b"1.005\tcopy\n").unwrap();
    c.execute("INSERT INTO prices VALUES (2.005, 'insert')", &[]).unwrap();
    for (stored, note) in [("1.01", "copy"), ("2.01", "insert")] {
        let shard: i64 = c.query_one(&format!("SELECT sharding.shard_for_value('prices', {stored}::numeric)"), &[]).unwrap().get(0);
        let placement = cluster.placements("prices").into_iter().find(|p| p.shard_id == shard).unwrap();
        let found: String = cluster
            .connect_port(placement.port)
            .query_one(&format!("SELECT note FROM {} WHERE p = {stored}", placement.shard_name), &[])
            .unwrap()
            .get(0);
        assert_eq!(found, note);
    }

    // A LATIN1 client: COPY into a reference table (coordinator copy and worker copies) and
    // back out of a distributed table, byte for byte.
    c.batch_execute("CREATE TABLE words (w text PRIMARY KEY); SELECT create_reference_table('words');
                     CREATE TABLE dwords (w text); SELECT create_distributed_table('dwords', 'w');").unwrap();
    let latin1 = b"caf\xe9\nna\xefve\n";
    for table in ["words", "dwords"] {
        let (ok, _, error) = psql(&cluster, "LATIN1", &format!("COPY {table} FROM STDIN"), latin1);
        assert!(ok, "{error}");
    }
    let local: Vec<String> = c.query("SELECT w FROM words ORDER BY w", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(local, vec!["café".to_string(), "naïve".to_string()]);
    for placement in cluster.placements("words") {
        let copy: Vec<String> = cluster.connect_port(placement.port).query(&format!("SELECT w FROM {} ORDER BY w", placement.shard_name), &[]).unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(copy, local);
    }
    let (ok, out, error) = psql(&cluster, "LATIN1", "COPY dwords TO STDOUT", b"");
    assert!(ok, "{error}");
    let mut lines: Vec<&[u8]> = out.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
    lines.sort();
    assert_eq!(lines, vec![&b"caf\xe9"[..], &b"na\xefve"[..]]);
    // The same with COPY's ENCODING option, from a UTF8 client.
    let out = copy_out(&mut c, "COPY dwords TO STDOUT (ENCODING 'LATIN1')").unwrap();
    let mut lines: Vec<&[u8]> = out.split(|b| *b == b'\n').filter(|l| !l.is_empty()).collect();
    lines.sort();
    assert_eq!(lines, vec![&b"caf\xe9"[..], &b"na\xefve"[..]]);
    let (code, ..) = expect_error(&mut c, "COPY dwords TO STDOUT (ENCODING 'no such encoding')");
    assert_eq!(code, "22023");
    // A row the client's encoding cannot hold fails the COPY in the middle of a shard's rows
    // (22P05, as on one server); the session goes on (the shard's COPY was read to its end).
    c.batch_execute("INSERT INTO dwords SELECT 'Ω' || g FROM generate_series(1, 3000) g").unwrap();
    let outcome = c.copy_out("COPY dwords TO STDOUT (ENCODING 'LATIN1')").map_err(|e| format!("{e:?}")).and_then(|mut reader| {
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut data).map_err(|e| format!("{e:?}"))
    });
    let error = outcome.unwrap_err();
    assert!(error.contains("E22P05"), "{error}");
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM dwords"), 3002);

    // COPY FROM refuses a read-only transaction, as PostgreSQL does; a failed block rolls back.
    let (code, ..) = expect_error(&mut c, "BEGIN READ ONLY; COPY dwords FROM STDIN");
    assert_eq!(code, "25006");
    c.batch_execute("ROLLBACK").unwrap();
    let _ = c.batch_execute("BEGIN; SELECT 1/0");
    c.batch_execute("ROLLBACK").unwrap();
}

#[test]
fn waits_for_workers_can_be_cancelled() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute("CREATE TABLE locked (id int, v text); SELECT create_distributed_table('locked', 'id', shard_count => 2);").unwrap();
    // Another session on a worker holds a lock on a shard: the coordinator's write must wait.
    let placement = cluster.placements("locked").remove(0);
    let mut holder = cluster.connect_port(placement.port);
    holder.batch_execute(&format!("BEGIN; LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", placement.shard_name)).unwrap();

    let mut data = Vec::new();
    for id in 1..=1000 {
        data.extend_from_slice(format!("{id}\tv{id}\n").as_bytes());
    }
    c.batch_execute("SET statement_timeout = '1500ms'").unwrap();
    let started = std::time::Instant::now();
    let error = copy_in(&mut c, "COPY locked FROM STDIN", &data).unwrap_err();
    let waited = started.elapsed();
    assert_eq!(pg_sharding_multinode::sqlstate(&error), "57014", "{error:?}");
    assert!(waited < std::time::Duration::from_secs(10), "the timeout ended the wait ({waited:?})");
    c.batch_execute("RESET statement_timeout").unwrap();

    // The worker is not left running our COPY; once the lock goes, nothing was written.
    let mut worker = cluster.connect_port(placement.port);
    let active: i64 = scalar(
        &mut worker,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pg\\_sharding:%' AND state = 'active'",
    );
    assert_eq!(active, 0);
    holder.batch_execute("ROLLBACK").unwrap();
    assert_eq!(all_rows(&mut c, "locked").len(), 0);
    // And the next transaction works.
    copy_in(&mut c, "COPY locked FROM STDIN", &data).unwrap();
    assert_eq!(all_rows(&mut c, "locked").len(), 1000);

    // A timeout in the middle of a large COPY FROM, while the shards' COPYs are still taking
    // rows, ends it too (the abort used to spin for good when a COPY would not end at once).
    c.batch_execute("CREATE TABLE bulk (id bigint, g int, pad text); SELECT create_distributed_table('bulk', 'g', shard_count => 8)").unwrap();
    let mut bulk = Vec::new();
    for id in 1..=400_000 {
        bulk.extend_from_slice(format!("{id}	{}	{}
", id % 1000, "x".repeat(100)).as_bytes());
    }
    let port = cluster.port;
    let (done, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut client =
            pg_sharding_multinode::Client::connect(&format!("host=127.0.0.1 port={port} user=postgres dbname=postgres"), pg_sharding_multinode::NoTls).unwrap();
        client.batch_execute("SET statement_timeout = '300ms'").unwrap();
        let started = std::time::Instant::now();
        let result = client.copy_in("COPY bulk FROM STDIN").and_then(|mut writer| {
            use std::io::Write;
            let _ = writer.write_all(&bulk);
            writer.finish()
        });
        let code = result.err().map(|e| pg_sharding_multinode::sqlstate(&e));
        let works = client.batch_execute("RESET statement_timeout; SELECT 1").is_ok();
        let _ = done.send((code, started.elapsed(), works));
    });
    let (code, took, works) = outcome.recv_timeout(std::time::Duration::from_secs(60)).expect("the cancelled COPY FROM returned");
    assert_eq!(code.as_deref(), Some("57014"));
    assert!(took < std::time::Duration::from_secs(15), "{took:?}");
    assert!(works, "the session goes on");
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM bulk"), 0);
}

#[test]
fn privileges_follow_the_table_to_its_shards() {
    let cluster = Cluster::start(2);
    // Roles are per server: the application role exists on every node.
    for port in [cluster.port, cluster.worker_port(1), cluster.worker_port(2)] {
        cluster.connect_port(port).batch_execute("CREATE ROLE app LOGIN").unwrap();
    }
    let mut admin = cluster.coordinator();
    admin
        .batch_execute(
            "CREATE TABLE events (id bigint, note text);
             GRANT SELECT ON events TO app;
             SELECT create_distributed_table('events', 'id', shard_count => 4);
             GRANT USAGE ON SCHEMA sharding TO app;",
        )
        .unwrap();
    let shard_privilege = |privilege: &str| -> Vec<bool> {
        cluster
            .placements("events")
            .iter()
            .map(|p| {
                cluster
                    .connect_port(p.port)
                    .query_one(&format!("SELECT has_table_privilege('app', '{}', '{privilege}')", p.shard_name), &[])
                    .unwrap()
                    .get::<_, bool>(0)
            })
            .collect()
    };
    assert_eq!(shard_privilege("SELECT"), vec![true; 4], "grants made before distribution reach the shards");
    assert_eq!(shard_privilege("INSERT"), vec![false; 4]);

    let app_client = || {
        pg_sharding_multinode::Client::connect(&format!("host=127.0.0.1 port={} user=app dbname=postgres", cluster.port), pg_sharding_multinode::NoTls).unwrap()
    };
    let mut app = app_client();
    let (code, ..) = expect_error(&mut app, "INSERT INTO events VALUES (1, 'denied')");
    assert_eq!(code, "42501");

    admin.batch_execute("GRANT INSERT ON events TO app").unwrap();
    assert_eq!(shard_privilege("INSERT"), vec![true; 4]);
    let mut app = app_client();
    app.execute("INSERT INTO events VALUES (1, 'by app'), (2, 'by app')", &[]).unwrap();
    copy_in(&mut app, "COPY events FROM STDIN", b"3\tcopied by app\n").unwrap();
    assert_eq!(all_rows(&mut app, "events").len(), 3);

    admin.batch_execute("REVOKE INSERT ON events FROM app").unwrap();
    assert_eq!(shard_privilege("INSERT"), vec![false; 4]);
    assert_eq!(shard_privilege("SELECT"), vec![true; 4]);
    admin.batch_execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO app").unwrap();
    assert_eq!(shard_privilege("DELETE"), vec![true; 4]);

    // Column privileges reach the shards' columns.
    for port in [cluster.port, cluster.worker_port(1), cluster.worker_port(2)] {
        cluster.connect_port(port).batch_execute("CREATE ROLE clerk LOGIN").unwrap();
    }
    admin.batch_execute("GRANT SELECT (id), UPDATE (note) ON events TO clerk").unwrap();
    let column_privilege = |column: &str, privilege: &str| -> Vec<bool> {
        cluster
            .placements("events")
            .iter()
            .map(|p| {
                cluster
                    .connect_port(p.port)
                    .query_one(&format!("SELECT has_column_privilege('clerk', '{}', '{column}', '{privilege}')", p.shard_name), &[])
                    .unwrap()
                    .get::<_, bool>(0)
            })
            .collect()
    };
    assert_eq!(column_privilege("id", "SELECT"), vec![true; 4]);
    assert_eq!(column_privilege("note", "SELECT"), vec![false; 4]);
    assert_eq!(column_privilege("note", "UPDATE"), vec![true; 4]);
    let mut clerk =
        pg_sharding_multinode::Client::connect(&format!("host=127.0.0.1 port={} user=clerk dbname=postgres", cluster.port), pg_sharding_multinode::NoTls).unwrap();
    assert_eq!(scalar::<i64>(&mut clerk, "SELECT count(id) FROM events"), 3);
    assert_eq!(clerk.execute("UPDATE events SET note = 'by clerk' WHERE id = 1", &[]).unwrap(), 1);
    let (code, ..) = expect_error(&mut clerk, "SELECT note FROM events");
    assert_eq!(code, "42501");
    admin.batch_execute("REVOKE SELECT (id) ON events FROM clerk").unwrap();
    assert_eq!(column_privilege("id", "SELECT"), vec![false; 4]);
    assert_eq!(column_privilege("note", "UPDATE"), vec![true; 4]);

    // USAGE on a schema of distributed tables reaches the nodes' schema of the same name, both
    // granted before the schema reaches a node and after.
    admin
        .batch_execute(
            "CREATE SCHEMA sales; GRANT USAGE ON SCHEMA sales TO clerk;
             CREATE TABLE sales.deals (id int PRIMARY KEY, amount int);
             SELECT create_distributed_table('sales.deals', 'id', shard_count => 4);
             INSERT INTO sales.deals SELECT g, g FROM generate_series(1, 10) g;
             CREATE SCHEMA ops;
             CREATE TABLE ops.tasks (id int);
             SELECT create_distributed_table('ops.tasks', 'id', shard_count => 4);
             GRANT USAGE ON SCHEMA ops TO clerk;
             GRANT SELECT ON ALL TABLES IN SCHEMA sales, ops TO clerk;",
        )
        .unwrap();
    let schema_usage = |schema: &str| -> Vec<bool> {
        [cluster.worker_port(1), cluster.worker_port(2)]
            .iter()
            .map(|port| {
                cluster.connect_port(*port).query_one(&format!("SELECT has_schema_privilege('clerk', '{schema}', 'USAGE')"), &[]).unwrap().get(0)
            })
            .collect()
    };
    assert_eq!(schema_usage("sales"), vec![true; 2]);
    assert_eq!(schema_usage("ops"), vec![true; 2]);
    assert_eq!(scalar::<i64>(&mut clerk, "SELECT count(*) FROM sales.deals"), 10);
    assert_eq!(scalar::<i64>(&mut clerk, "SELECT count(*) FROM ops.tasks"), 0);
    admin.batch_execute("REVOKE USAGE ON SCHEMA sales FROM clerk").unwrap();
    assert_eq!(schema_usage("sales"), vec![false; 2]);
    assert_eq!(schema_usage("ops"), vec![true; 2]);

    // COPY checks column privileges as PostgreSQL does.
    admin.batch_execute("GRANT SELECT (id) ON events TO clerk").unwrap();
    assert_eq!(copy_out(&mut clerk, "COPY events (id) TO STDOUT").unwrap().split(|b| *b == b'\n').filter(|l| !l.is_empty()).count(), 3);
    let (code, ..) = expect_error(&mut clerk, "COPY events TO STDOUT");
    assert_eq!(code, "42501");

    // The nodes' schemas follow their owner (ALTER SCHEMA ... OWNER TO, REASSIGN OWNED BY).
    let schema_owner = |schema: &str| -> Vec<String> {
        [cluster.worker_port(1), cluster.worker_port(2)]
            .iter()
            .map(|port| {
                cluster.connect_port(*port).query_one(&format!("SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = '{schema}'"), &[]).unwrap().get(0)
            })
            .collect()
    };
    admin.batch_execute("ALTER SCHEMA sales OWNER TO app").unwrap();
    assert_eq!(schema_owner("sales"), vec!["app".to_string(); 2]);
    admin.batch_execute("REASSIGN OWNED BY app TO clerk").unwrap();
    assert_eq!(schema_owner("sales"), vec!["clerk".to_string(); 2]);
    assert_eq!(scalar::<i64>(&mut clerk, "SELECT count(id) FROM events"), 3);

    // DROP OWNED BY takes the role's privileges off the shards too.
    admin.batch_execute("REASSIGN OWNED BY clerk TO postgres; DROP OWNED BY clerk").unwrap();
    assert_eq!(column_privilege("note", "UPDATE"), vec![false; 4]);
    assert_eq!(column_privilege("id", "SELECT"), vec![false; 4]);
    assert_eq!(schema_usage("ops"), vec![false; 2]);
}

#[test]
fn tables_keep_their_owner_and_grants_on_the_shards_through_moves_and_splits() {
    let cluster = Cluster::start(2);
    for port in [cluster.port, cluster.worker_port(1), cluster.worker_port(2)] {
        cluster
            .connect_port(port)
            .batch_execute(
                "CREATE ROLE app LOGIN; CREATE ROLE app2 LOGIN; CREATE ROLE reader LOGIN;
                 GRANT CREATE ON SCHEMA public TO app, app2;",
            )
            .unwrap();
    }
    let as_role = |role: &str| {
        pg_sharding_multinode::Client::connect(&format!("host=127.0.0.1 port={} user={role} dbname=postgres", cluster.port), pg_sharding_multinode::NoTls)
            .unwrap()
    };
    // A table owner who is not a superuser distributes its own tables (with an enum column, and
    // a reference table); a superuser distributes another table of app's.
    let mut app = as_role("app");
    app.batch_execute(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE items (id int PRIMARY KEY, m mood, v int);
         SELECT create_distributed_table('items', 'id', shard_count => 4);
         INSERT INTO items SELECT g, 'happy', g FROM generate_series(1, 100) g;
         CREATE TABLE labels (k int PRIMARY KEY, label text);
         SELECT create_reference_table('labels');
         INSERT INTO labels VALUES (0, 'zero'), (1, 'one');
         CREATE TABLE later (id int PRIMARY KEY, v int);
         INSERT INTO later SELECT g, g FROM generate_series(1, 50) g;
         GRANT SELECT ON items, labels, later TO reader;",
    )
    .unwrap();
    let mut admin = cluster.coordinator();
    admin.batch_execute("SELECT create_distributed_table('later', 'id', shard_count => 4)").unwrap();
    assert_eq!(scalar::<i64>(&mut app, "WITH u AS (UPDATE later SET v = v + 1 RETURNING 1) SELECT count(*) FROM u"), 50);
    assert_eq!(scalar::<i64>(&mut app, "SELECT count(*) FROM later WHERE v > 1"), 50);

    // Shards of every kind are the owner's, and carry the table's grants.
    let owners = |table: &str| -> Vec<(String, bool)> {
        cluster
            .placements(table)
            .iter()
            .map(|p| {
                let row = cluster
                    .connect_port(p.port)
                    .query_one(
                        &format!(
                            "SELECT relowner::regrole::text, has_table_privilege('reader', '{0}', 'SELECT') FROM pg_class WHERE oid = '{0}'::regclass",
                            p.shard_name
                        ),
                        &[],
                    )
                    .unwrap();
                (row.get(0), row.get(1))
            })
            .collect()
    };
    for table in ["items", "labels", "later"] {
        let found = owners(table);
        assert!(!found.is_empty());
        assert!(found.iter().all(|o| *o == ("app".to_string(), true)), "{table}: {found:?}");
    }

    // Moves and splits (run by a superuser) keep the owner and the grants.
    let node = |c: &mut Client, w: usize| -> i32 {
        scalar(c, &format!("SELECT node_id FROM sharding.dist_node WHERE port = {}", cluster.worker_port(w)))
    };
    let (w1, w2) = (node(&mut admin, 1), node(&mut admin, 2));
    let on = |c: &mut Client, w: i32| -> i64 {
        scalar(c, &format!("SELECT min(shard_id) FROM sharding.shards WHERE table_name = 'items'::regclass AND node_id = {w}"))
    };
    let (first, second) = (on(&mut admin, w1), on(&mut admin, w2));
    admin.batch_execute(&format!("SELECT sharding.move_shard({first}, {w2})")).unwrap();
    admin.batch_execute(&format!("SELECT sharding.move_shard({second}, {w1}, 'block_writes')")).unwrap();
    let middle = |c: &mut Client, shard: i64| -> i32 {
        scalar(c, &format!("SELECT ((min_hash::bigint + max_hash::bigint) / 2)::int FROM sharding.dist_shard WHERE shard_id = {shard}"))
    };
    let split_points = (middle(&mut admin, first), middle(&mut admin, second));
    admin.batch_execute(&format!("SELECT sharding.split_shard({first}, ARRAY[{}])", split_points.0)).unwrap();
    admin.batch_execute(&format!("SELECT sharding.split_shard({second}, ARRAY[{}], mode => 'block_writes')", split_points.1)).unwrap();
    let found = owners("items");
    assert_eq!(found.len(), 6);
    assert!(found.iter().all(|o| *o == ("app".to_string(), true)), "{found:?}");
    assert_eq!(scalar::<i64>(&mut as_role("reader"), "SELECT count(*) FROM items"), 100);
    assert_eq!(scalar::<i64>(&mut as_role("app"), "WITH u AS (UPDATE items SET v = v + 1 RETURNING 1) SELECT count(*) FROM u"), 100);

    // ALTER TABLE ... OWNER TO reaches the shards; the old owner loses its rights there too.
    admin.batch_execute("ALTER TABLE items OWNER TO app2").unwrap();
    let found = owners("items");
    assert!(found.iter().all(|o| *o == ("app2".to_string(), true)), "{found:?}");
    let (code, ..) = expect_error(&mut as_role("app"), "SELECT count(*) FROM items");
    assert_eq!(code, "42501");
    assert_eq!(scalar::<i64>(&mut as_role("app2"), "WITH d AS (DELETE FROM items WHERE id <= 10 RETURNING 1) SELECT count(*) FROM d"), 10);
    assert_eq!(scalar::<i64>(&mut as_role("reader"), "SELECT count(*) FROM items"), 90);
    // So does REASSIGN OWNED BY.
    admin.batch_execute("REASSIGN OWNED BY app2 TO app").unwrap();
    let found = owners("items");
    assert!(found.iter().all(|o| *o == ("app".to_string(), true)), "{found:?}");
    assert_eq!(scalar::<i64>(&mut as_role("app"), "SELECT count(*) FROM items"), 90);
}

#[test]
fn index_methods_long_names_and_name_clashes_on_the_nodes() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    // Indexes of every built-in method, before and after distribution, on both kinds of table.
    c.batch_execute(
        "CREATE TABLE docs (id int, name text, doc jsonb, tags int[], at timestamptz);
         CREATE INDEX docs_doc ON docs USING gin (doc jsonb_path_ops);
         SELECT create_distributed_table('docs', 'id', shard_count => 4);
         CREATE INDEX docs_name ON docs USING hash (name);
         CREATE INDEX docs_tags ON docs USING gin (tags);
         CREATE INDEX docs_at ON docs USING brin (at);
         CREATE INDEX docs_name_desc ON docs (name DESC NULLS LAST);
         CREATE TABLE codes (code text PRIMARY KEY);
         CREATE INDEX codes_hash ON codes USING hash (code);
         SELECT create_reference_table('codes');
         CREATE INDEX codes_spgist ON codes USING spgist (code);
         INSERT INTO docs VALUES (1, 'a', '{\"k\": 1}', '{1,2}', now()), (2, 'b', '{\"k\": 2}', '{3}', now());",
    )
    .unwrap();
    let p = &cluster.placements("docs")[0];
    let definitions: Vec<String> = cluster
        .connect_port(p.port)
        .query("SELECT indexdef FROM pg_indexes WHERE tablename = $1 ORDER BY indexname", &[&p.shard_name])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(definitions.len(), 5, "{definitions:?}");
    for method in ["USING gin (doc jsonb_path_ops)", "USING hash (name)", "USING gin (tags)", "USING brin (at)", "USING btree (name DESC NULLS LAST)"] {
        assert!(definitions.iter().any(|d| d.contains(method)), "{method}: {definitions:?}");
    }
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM docs WHERE doc @> '{\"k\": 2}'"), 1);

    // Names too long for the shard suffix: a table with its primary key, and two indexes whose
    // names start alike; dropping one leaves the other (a unique one) in force.
    let long_table = "t".repeat(60);
    c.batch_execute(&format!(
        "CREATE TABLE \"{long_table}\" (id int PRIMARY KEY, a int);
         SELECT create_distributed_table('\"{long_table}\"', 'id', shard_count => 4);
         INSERT INTO \"{long_table}\" VALUES (1, 1);
         CREATE TABLE ux (id int, a int);
         SELECT create_distributed_table('ux', 'id', shard_count => 4);
         CREATE UNIQUE INDEX ux_unique_index_on_id_and_a_padding_padding_padding_pad_1 ON ux (id, a);
         CREATE INDEX ux_unique_index_on_id_and_a_padding_padding_padding_pad_2 ON ux (a);
         DROP INDEX ux_unique_index_on_id_and_a_padding_padding_padding_pad_2;
         INSERT INTO ux VALUES (1, 1);"
    ))
    .unwrap();
    let (code, ..) = expect_error(&mut c, "INSERT INTO ux VALUES (1, 1)");
    assert_eq!(code, "23505");
    let (code, ..) = expect_error(&mut c, &format!("INSERT INTO \"{long_table}\" VALUES (1, 2)"));
    assert_eq!(code, "23505");

    // The coordinator added as a node never drops a table of its own named like a copy.
    let shard: i64 = scalar(&mut c, "SELECT shard_id FROM sharding.dist_shard WHERE logicalrelid = 'codes'::regclass");
    c.batch_execute(&format!("CREATE TABLE codes_{shard} (important text); INSERT INTO codes_{shard} VALUES ('mine')")).unwrap();
    let (code, message, ..) = expect_error(&mut c, &format!("SELECT sharding.add_node('127.0.0.1', {})", cluster.port));
    assert_eq!(code, "42P07", "{message}");
    assert_eq!(scalar::<String>(&mut c, &format!("SELECT important FROM codes_{shard}")), "mine");
}

/// The rows of `sql` as text, one line per row.
fn text_rows(c: &mut Client, sql: &str) -> Vec<String> {
    c.simple_query(sql)
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(row) => {
                Some((0..row.len()).map(|i| row.get(i).unwrap_or("NULL").to_string()).collect::<Vec<_>>().join("|"))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn enum_and_domain_columns_are_created_on_the_nodes_and_keep_their_order() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    let port2 = cluster.worker_port(2);
    // Worker 2 joins later: it gets the types with a reference table's copy and a shard move.
    c.batch_execute(&format!("SELECT sharding.remove_node('127.0.0.1', {port2})")).unwrap();
    c.batch_execute(
        "CREATE SCHEMA app;
         CREATE TYPE app.mood AS ENUM ('sad', 'ok', 'happy');
         CREATE DOMAIN posint AS int CHECK (VALUE > 0);
         CREATE DOMAIN app.goodmood AS app.mood NOT NULL DEFAULT 'ok' CHECK (VALUE <> 'sad');
         CREATE TABLE app.t (id int PRIMARY KEY, m app.mood, ms app.mood[], n posint, g app.goodmood);
         CREATE TABLE app.t_local (LIKE app.t INCLUDING ALL);
         SELECT create_distributed_table('app.t', 'id', shard_count => 4);
         CREATE TABLE app.labels (m app.mood PRIMARY KEY, label text);
         INSERT INTO app.labels VALUES ('sad', ':('), ('ok', ':|'), ('happy', ':)');
         SELECT create_reference_table('app.labels');",
    )
    .unwrap();
    for table in ["app.t", "app.t_local"] {
        c.batch_execute(&format!(
            "INSERT INTO {table} SELECT g, (ARRAY['sad','ok','happy']::app.mood[])[g % 3 + 1],
                    CASE WHEN g % 5 = 0 THEN NULL ELSE ARRAY[(ARRAY['happy','sad']::app.mood[])[g % 2 + 1]] END,
                    g, (CASE WHEN g % 2 = 0 THEN 'happy' ELSE 'ok' END)::app.mood FROM generate_series(1, 60) g"
        ))
        .unwrap();
    }
    let queries = [
        "SELECT id, m, ms, n, g FROM {t} ORDER BY m, id",
        "SELECT m, count(*), min(id), max(g::app.mood) FROM {t} GROUP BY m ORDER BY m",
        "SELECT id FROM {t} WHERE m > 'sad' AND 'sad' = ANY (ms) ORDER BY id",
        "SELECT min(m), max(m), array_agg(DISTINCT g ORDER BY g) FROM {t}",
        "SELECT t.id, l.label FROM {t} t JOIN app.labels l ON l.m = t.m WHERE t.id <= 10 ORDER BY t.id",
    ];
    let compare = |c: &mut Client, when: &str| {
        for q in queries {
            let distributed = text_rows(c, &q.replace("{t}", "app.t"));
            let local = text_rows(c, &q.replace("{t}", "app.t_local"));
            assert!(!local.is_empty(), "{q}");
            assert_eq!(distributed, local, "{when}: {q}");
        }
    };
    compare(&mut c, "distributed");

    // Values of the types the tables' columns use travel with the statement, so their
    // conditions run on the shards (not on the coordinator over every row). A domain that no
    // table uses does not exist on the workers: its condition stays on the coordinator.
    c.batch_execute("CREATE DOMAIN app.small AS int CHECK (VALUE < 100)").unwrap();
    for (q, shipped, here) in [
        ("SELECT id FROM {t} WHERE m = 'happy' AND g::app.mood <> 'ok' ORDER BY id", "'happy'::app.mood", false),
        ("SELECT id FROM {t} WHERE m IN ('sad', 'ok') AND ms @> ARRAY['happy'::app.mood] ORDER BY id", "ARRAY['sad'::app.mood", false),
        ("SELECT id, n FROM {t} WHERE n = 7::posint", "7)::public.posint", false),
        ("SELECT id, m FROM {t} WHERE id = 8 AND m > 'sad'", "'sad'::app.mood", false),
        ("SELECT id FROM {t} WHERE n::int = 9::app.small", "", true),
    ] {
        let plan = text_rows(&mut c, &format!("EXPLAIN (VERBOSE, COSTS OFF) {}", q.replace("{t}", "app.t"))).join("\n");
        assert!(plan.contains(shipped), "{q}: {plan}");
        let coordinator_part = plan.split("Remote SQL").next().unwrap_or_default();
        assert_eq!(coordinator_part.lines().any(|l| l.trim_start().starts_with("Filter:")), here, "{q}: {plan}");
        let local = text_rows(&mut c, &q.replace("{t}", "app.t_local"));
        assert!(!local.is_empty(), "{q}");
        assert_eq!(text_rows(&mut c, &q.replace("{t}", "app.t")), local, "{q}");
    }
    for table in ["app.t", "app.t_local"] {
        c.batch_execute(&format!("UPDATE {table} SET m = 'sad', ms = ARRAY['ok'::app.mood] WHERE m = 'happy' AND id % 4 = 0")).unwrap();
    }
    compare(&mut c, "after an UPDATE with enum values");

    // Domain constraints hold on the shards too: INSERT, and COPY (whose rows only the workers
    // convert).
    let (code, ..) = expect_error(&mut c, "INSERT INTO app.t VALUES (100, 'ok', NULL, -1, 'ok')");
    assert_eq!(code, "23514");
    let copy = pg_sharding_multinode::copy_in(&mut c, "COPY app.t FROM STDIN", b"101\tok\t\\N\t1\tsad\n");
    assert_eq!(copy.err().map(|e| pg_sharding_multinode::sqlstate(&e)).as_deref(), Some("23514"));
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM app.t"), 60);

    // A new value in the middle of the order, then a renamed one: on every node, in order.
    c.batch_execute(&format!("SELECT sharding.add_node('127.0.0.1', {port2})")).unwrap();
    c.batch_execute("ALTER TYPE app.mood ADD VALUE 'meh' BEFORE 'ok'").unwrap();
    for table in ["app.t", "app.t_local"] {
        c.batch_execute(&format!("INSERT INTO {table} VALUES (61, 'meh', '{{meh,happy}}', 61, 'meh')")).unwrap();
    }
    c.batch_execute("INSERT INTO app.labels VALUES ('meh', ':/')").unwrap();
    compare(&mut c, "after ADD VALUE");
    c.batch_execute("ALTER TYPE app.mood RENAME VALUE 'meh' TO 'so-so'").unwrap();
    compare(&mut c, "after RENAME VALUE");
    let labels = "SELECT string_agg(enumlabel::text, ',' ORDER BY enumsortorder) FROM pg_enum WHERE enumtypid = 'app.mood'::regtype";
    for worker in [1, 2] {
        let mut w = cluster.worker(worker);
        assert_eq!(scalar::<String>(&mut w, labels), "sad,so-so,ok,happy", "worker {worker}");
    }

    // Shards moved to the new node (both ways of copying) find their types there.
    let w2: i32 = scalar(&mut c, &format!("SELECT node_id FROM sharding.nodes WHERE port = {port2}"));
    let shards: Vec<i64> = c
        .query("SELECT shard_id FROM sharding.dist_shard WHERE logicalrelid = 'app.t'::regclass ORDER BY shard_id LIMIT 2", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    c.batch_execute(&format!("SELECT sharding.move_shard({}, {w2}, 'block_writes')", shards[0])).unwrap();
    c.batch_execute(&format!("SELECT sharding.move_shard({}, {w2})", shards[1])).unwrap();
    let mut w = cluster.worker(2);
    assert_eq!(scalar::<i64>(&mut w, "SELECT count(*) FROM pg_type WHERE typname IN ('mood', 'goodmood', 'posint')"), 3);
    compare(&mut c, "after the moves");

    // Changes that would leave the nodes' types behind are refused, and change nothing.
    for (sql, code) in [
        ("DROP TYPE app.mood CASCADE", "0A000"),
        ("ALTER DOMAIN posint ADD CONSTRAINT small CHECK (VALUE < 10)", "0A000"),
        ("ALTER TYPE app.mood RENAME TO feeling", "0A000"),
        ("ALTER DOMAIN app.goodmood SET SCHEMA public", "0A000"),
    ] {
        assert_eq!(expect_error(&mut c, sql).0, code, "{sql}");
    }
    compare(&mut c, "after the refusals");
    // A table dropped with its types, and the types created anew with other values: the
    // nodes' old types, which nothing there uses any more, are replaced.
    c.batch_execute(
        "CREATE TYPE app.tmp AS ENUM ('a', 'b');
         CREATE DOMAIN app.tmpd AS app.tmp CHECK (VALUE <> 'a');
         CREATE TABLE app.u (id int, c app.tmpd);
         SELECT create_distributed_table('app.u', 'id', shard_count => 4);
         DROP TABLE app.u;
         DROP DOMAIN app.tmpd;
         DROP TYPE app.tmp;
         CREATE TYPE app.tmp AS ENUM ('z', 'y', 'a');
         CREATE DOMAIN app.tmpd AS app.tmp CHECK (VALUE <> 'y');
         CREATE TABLE app.u (id int, c app.tmpd, cs app.tmp[]);
         SELECT create_distributed_table('app.u', 'id', shard_count => 4);
         INSERT INTO app.u SELECT g, (ARRAY['z', 'a']::app.tmp[])[g % 2 + 1], ARRAY['y'::app.tmp] FROM generate_series(1, 10) g;",
    )
    .unwrap();
    assert_eq!(text_rows(&mut c, "SELECT c, count(*) FROM app.u GROUP BY c ORDER BY c"), ["z|5", "a|5"]);
    assert_eq!(expect_error(&mut c, "INSERT INTO app.u VALUES (11, 'y')").0, "23514");
    let tmp_labels = "SELECT string_agg(enumlabel::text, ',' ORDER BY enumsortorder) FROM pg_enum WHERE enumtypid = 'app.tmp'::regtype";
    for worker in [1, 2] {
        assert_eq!(scalar::<String>(&mut cluster.worker(worker), tmp_labels), "z,y,a", "worker {worker}");
    }

    // Enums and domains come back in binary; arrays of them as text, where settings that do not
    // print a timestamptz or a float exactly are refused (an IST the coordinator would read as
    // Israel's), not misread. ISO and the default float digits read the same values as the
    // local table; so do enum and domain columns under any setting.
    c.batch_execute("ALTER TABLE app.t ADD COLUMN at timestamptz DEFAULT '2020-01-01 08:37+00', ADD COLUMN f float8 DEFAULT 1/3.0;
                     ALTER TABLE app.t_local ADD COLUMN at timestamptz DEFAULT '2020-01-01 08:37+00', ADD COLUMN f float8 DEFAULT 1/3.0;
                     SET TimeZone = 'Asia/Kolkata'").unwrap();
    let read = |c: &mut Client, columns: &str, table: &str| text_rows(c, &format!("SELECT {columns} FROM {table} WHERE id < 4 ORDER BY id"));
    for (setting, reset) in [("SET DateStyle = 'SQL, DMY'", "RESET DateStyle"), ("SET extra_float_digits = 0", "RESET extra_float_digits")] {
        c.batch_execute(setting).unwrap();
        let (code, message, ..) = expect_error(&mut c, "SELECT id, ms, at, f FROM app.t WHERE id = 1");
        assert_eq!(code, "0A000", "{setting}: {message}");
        assert_eq!(read(&mut c, "id, m, n, g, at, f", "app.t"), read(&mut c, "id, m, n, g, at, f", "app.t_local"), "{setting}");
        c.batch_execute(reset).unwrap();
    }
    assert_eq!(read(&mut c, "id, m, ms, at, f * 3 = 1", "app.t"), read(&mut c, "id, m, ms, at, f * 3 = 1", "app.t_local"));
    c.batch_execute("RESET TimeZone").unwrap();

    // Types the nodes cannot get: composite types; a node's own type of the same name that
    // differs and that the node uses. Nothing is distributed.
    w.batch_execute("CREATE TYPE public.color AS ENUM ('blue', 'red'); CREATE TABLE public.palette (c public.color)").unwrap();
    c.batch_execute(
        "CREATE TYPE pair AS (a int, b text);
         CREATE TABLE pairs (id int, p pair);
         CREATE TYPE color AS ENUM ('red', 'blue');
         CREATE TABLE colors (id int, c color);",
    )
    .unwrap();
    let (code, message, ..) = expect_error(&mut c, "SELECT create_distributed_table('pairs', 'id')");
    assert_eq!(code, "0A000", "{message}");
    let (code, message, ..) = expect_error(&mut c, "SELECT create_distributed_table('colors', 'id')");
    assert_eq!(code, "55000", "{message}");
    assert!(message.contains("color"), "{message}");
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM sharding.dist_table WHERE logicalrelid IN ('pairs'::regclass, 'colors'::regclass)"), 0);
    assert_eq!(scalar::<i64>(&mut w, "SELECT count(*) FROM pg_class WHERE relname LIKE 'colors\\_%'"), 0);
}

#[test]
fn collations_of_columns_and_indexes_are_created_on_the_nodes() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE SCHEMA words;
         CREATE COLLATION words.german (provider = icu, locale = 'de-DE');
         CREATE COLLATION words.ci (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
         CREATE COLLATION bytewise (provider = libc, lc_collate = 'C', lc_ctype = 'C');
         CREATE DOMAIN words.label AS text COLLATE words.ci;
         CREATE TABLE words.w (id int PRIMARY KEY, word text COLLATE words.german, tag words.label, raw text);
         CREATE INDEX w_raw ON words.w (raw COLLATE bytewise);
         CREATE TABLE words.w_local (LIKE words.w INCLUDING ALL);
         SELECT create_distributed_table('words.w', 'id', shard_count => 4);",
    )
    .unwrap();
    for table in ["words.w", "words.w_local"] {
        c.batch_execute(&format!(
            "INSERT INTO {table} SELECT g, (ARRAY['Äpfel', 'apfel', 'Zebra', 'über', 'Ober'])[g % 5 + 1],
                    (ARRAY['Red', 'RED', 'red', 'Blue'])[g % 4 + 1], (ARRAY['b', 'B', 'a', 'é'])[g % 4 + 1]
               FROM generate_series(1, 40) g"
        ))
        .unwrap();
    }
    for worker in [1, 2] {
        let names = "SELECT string_agg(collname::text || ':' || collisdeterministic, ',' ORDER BY collname) FROM pg_collation WHERE oid >= 16384";
        assert_eq!(scalar::<String>(&mut cluster.worker(worker), names), "bytewise:true,ci:false,german:true", "worker {worker}");
    }
    // Conditions on the columns run on the shards, under the columns' collations; sorting,
    // grouping and DISTINCT give what one server gives.
    for (q, shipped) in [
        ("SELECT id FROM {t} WHERE word < 'b' ORDER BY id", true),
        ("SELECT id FROM {t} WHERE tag = 'rEd' ORDER BY id", true),
        // A collation only an index uses: the nodes have it, but the condition stays on the
        // coordinator (only the columns' collations are looked for).
        ("SELECT id FROM {t} WHERE raw < 'a' COLLATE bytewise ORDER BY id", false),
        ("SELECT word, count(*) FROM {t} GROUP BY word ORDER BY word", false),
        ("SELECT lower(tag), count(*) FROM {t} GROUP BY tag ORDER BY 1", false),
        ("SELECT count(DISTINCT tag), count(DISTINCT raw COLLATE bytewise), min(word), max(word) FROM {t}", false),
        ("SELECT id, word FROM {t} ORDER BY word COLLATE bytewise, id LIMIT 7", false),
    ] {
        let local = text_rows(&mut c, &q.replace("{t}", "words.w_local"));
        assert!(!local.is_empty(), "{q}");
        assert_eq!(text_rows(&mut c, &q.replace("{t}", "words.w")), local, "{q}");
        if shipped {
            let plan = text_rows(&mut c, &format!("EXPLAIN (VERBOSE, COSTS OFF) {}", q.replace("{t}", "words.w"))).join("\n");
            let coordinator_part = plan.split("Remote SQL").next().unwrap_or_default();
            assert!(!coordinator_part.contains("Filter:"), "{q}: {plan}");
        }
    }

    // A nondeterministic collation on the distribution column: 'RED' and 'red' are equal but
    // would hash to different shards. Refused, nothing changes.
    c.batch_execute("CREATE TABLE words.tags (t text COLLATE words.ci PRIMARY KEY)").unwrap();
    let (code, message, ..) = expect_error(&mut c, "SELECT create_distributed_table('words.tags', 't')");
    assert_eq!(code, "0A000", "{message}");
    assert!(message.contains("nondeterministic"), "{message}");
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM sharding.dist_table WHERE logicalrelid = 'words.tags'::regclass"), 0);
    // ... as a reference table it is fine (no hashing).
    c.batch_execute("INSERT INTO words.tags VALUES ('Red'), ('Blue'); SELECT create_reference_table('words.tags')").unwrap();
    assert_eq!(expect_error(&mut c, "INSERT INTO words.tags VALUES ('BLUE')").0, "23505");

    // A column added later with a new collation; a node's leftover collation of that name with
    // another definition, unused there, is replaced; one in use there is not.
    let mut w1 = cluster.worker(1);
    w1.batch_execute("CREATE COLLATION words.french (provider = icu, locale = 'de-DE')").unwrap();
    c.batch_execute(
        "CREATE COLLATION words.french (provider = icu, locale = 'fr-FR');
         ALTER TABLE words.w ADD COLUMN fr text COLLATE words.french;
         ALTER TABLE words.w_local ADD COLUMN fr text COLLATE words.french;
         UPDATE words.w SET fr = word; UPDATE words.w_local SET fr = word;",
    )
    .unwrap();
    let locale = "SELECT colliculocale FROM pg_collation WHERE collname = 'french'";
    assert_eq!(scalar::<String>(&mut w1, locale), "fr-FR");
    let q = "SELECT id FROM {t} WHERE fr > 'b' ORDER BY id";
    assert_eq!(text_rows(&mut c, &q.replace("{t}", "words.w")), text_rows(&mut c, &q.replace("{t}", "words.w_local")));
    w1.batch_execute(
        "CREATE COLLATION public.swedish (provider = icu, locale = 'de-DE');
         CREATE TABLE public.mine (t text COLLATE public.swedish);",
    )
    .unwrap();
    c.batch_execute("CREATE COLLATION swedish (provider = icu, locale = 'sv-SE'); CREATE TABLE sv (id int, t text COLLATE swedish)").unwrap();
    let (code, message, ..) = expect_error(&mut c, "SELECT create_distributed_table('sv', 'id')");
    assert_eq!(code, "55000", "{message}");
    assert!(message.contains("collation"), "{message}");
    assert_eq!(scalar::<i64>(&mut w1, "SELECT count(*) FROM pg_class WHERE relname LIKE 'sv\\_%'"), 0);
}

/// Foreign keys of the shards in one node's schema: (shard table, key name, valid) each.
fn shard_keys(w: &mut Client) -> Vec<(String, String, bool)> {
    w.query(
        "SELECT conrelid::regclass::text, conname::text, convalidated FROM pg_constraint
          WHERE contype = 'f' AND connamespace = 'public'::regnamespace ORDER BY 1, 2",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

fn keys_on_workers(cluster: &Cluster) -> usize {
    (1..=2).map(|w| shard_keys(&mut cluster.worker(w)).len()).sum()
}

#[test]
fn a_local_table_referencing_a_table_being_distributed_blocks_its_changes_until_distributed_too() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    // Allowed while the local table is empty: it is meant to be distributed right after.
    c.batch_execute(
        "CREATE TABLE par (id int PRIMARY KEY, v text);
         CREATE TABLE chi (id int, p int REFERENCES par (id));
         SELECT create_distributed_table('par', 'id');
         INSERT INTO par SELECT g, 'v' FROM generate_series(1, 10) g;
         INSERT INTO chi VALUES (1, 2);",
    )
    .unwrap();
    // The local rows' key is checked against the shards.
    assert_eq!(expect_error(&mut c, "INSERT INTO chi VALUES (2, 99)").0, "23503");
    // A shard changing a row would not see the local row that references it: refused.
    for sql in [
        "DELETE FROM par WHERE id = 2",
        "UPDATE par SET v = 'w' WHERE id = 2",
        "WITH d AS (DELETE FROM par WHERE id = 2 RETURNING id) SELECT count(*) FROM d",
        "INSERT INTO par VALUES (2, 'x') ON CONFLICT (id) DO UPDATE SET v = 'x'",
        "MERGE INTO par USING (SELECT 2 AS id) s ON par.id = s.id WHEN MATCHED THEN DELETE",
    ] {
        let (code, message, ..) = expect_error(&mut c, sql);
        assert_eq!(code, "0A000", "{sql}: {message}");
        assert!(message.contains("\"chi\""), "{message}");
    }
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM par WHERE id = 2 AND v = 'v'"), 1);
    c.batch_execute("INSERT INTO par VALUES (11, 'v') ON CONFLICT DO NOTHING").unwrap();
    // Distributed too, the key holds on the shards and the parent's rows change again.
    c.batch_execute("SELECT create_distributed_table('chi', 'p', colocate_with => 'par')").unwrap();
    assert_eq!(expect_error(&mut c, "DELETE FROM par WHERE id = 2").0, "23503");
    c.batch_execute("DELETE FROM par WHERE id = 3; UPDATE par SET v = 'w' WHERE id = 2").unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM par"), 10);
}

#[test]
fn foreign_keys_hold_on_the_shards_through_moves_splits_and_ddl() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    let port2 = cluster.worker_port(2);
    // Worker 2 joins later: it gets the reference tables' copies with their key.
    c.batch_execute(&format!("SELECT sharding.remove_node('127.0.0.1', {port2})")).unwrap();
    // The usual multi-tenant schema, keys declared before distributing (local rows included).
    c.batch_execute(
        "CREATE TABLE currencies (code text PRIMARY KEY);
         CREATE TABLE countries (code text PRIMARY KEY, currency text NOT NULL REFERENCES currencies (code));
         CREATE TABLE companies (id bigint PRIMARY KEY, country text REFERENCES countries (code), name text);
         CREATE TABLE campaigns (company_id bigint REFERENCES companies (id) ON DELETE CASCADE, id bigint,
                                 name text, PRIMARY KEY (company_id, id));
         CREATE TABLE ads (company_id bigint, campaign_id bigint, id bigint, PRIMARY KEY (company_id, id),
                           FOREIGN KEY (company_id, campaign_id) REFERENCES campaigns (company_id, id) ON DELETE CASCADE);
         INSERT INTO currencies VALUES ('JPY'), ('EUR'), ('BRL');
         INSERT INTO countries VALUES ('jp', 'JPY'), ('fr', 'EUR'), ('br', 'BRL');
         INSERT INTO companies SELECT g, (ARRAY['jp','fr','br'])[g % 3 + 1], 'company ' || g FROM generate_series(1, 40) g;
         SELECT create_reference_table('currencies');
         SELECT create_reference_table('countries');
         SELECT create_distributed_table('companies', 'id', shard_count => 4);
         SELECT create_distributed_table('campaigns', 'company_id');
         SELECT create_distributed_table('ads', 'company_id');
         INSERT INTO campaigns SELECT c, k, 'c' FROM generate_series(1, 40) c, generate_series(1, 3) k;
         INSERT INTO ads SELECT c, k, k * 10 + a FROM generate_series(1, 40) c, generate_series(1, 3) k, generate_series(1, 2) a;",
    )
    .unwrap();
    // A key to a distributed table put the table in that table's colocation group.
    assert_eq!(
        scalar::<i64>(&mut c, "SELECT count(DISTINCT colocation_id) FROM sharding.dist_table WHERE logicalrelid IN ('companies'::regclass, 'campaigns'::regclass, 'ads'::regclass)"),
        1
    );
    // Every shard holds its key: 4 shards of 3 tables, and the reference copy's.
    assert_eq!(shard_keys(&mut cluster.worker(1)).len(), 13);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM companies"), 40);

    let violations = |c: &mut Client, when: &str| {
        for sql in [
            "INSERT INTO companies VALUES (100, 'xx', 'n')",
            "INSERT INTO campaigns VALUES (999, 1, 'x')",
            "INSERT INTO ads VALUES (1, 7, 1)",
            "DELETE FROM countries WHERE code = 'jp'",
            "INSERT INTO countries VALUES ('de', 'DEM')",
            "UPDATE companies SET country = 'de' WHERE id = 2",
        ] {
            assert_eq!(expect_error(c, sql).0, "23503", "{when}: {sql}");
        }
        // Every shard group's ads check their campaign.
        for id in [1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13] {
            assert_eq!(expect_error(c, &format!("INSERT INTO ads VALUES ({id}, 9, 1)")).0, "23503", "{when}: company {id}");
        }
        let copy = copy_in(c, "COPY campaigns FROM STDIN", b"1\t50\tok\n998\t1\tno company\n");
        assert_eq!(copy.err().map(|e| pg_sharding_multinode::sqlstate(&e)).as_deref(), Some("23503"), "{when}: COPY");
    };
    violations(&mut c, "distributed");
    // ON DELETE CASCADE runs inside each shard group.
    c.batch_execute("DELETE FROM companies WHERE id = 5").unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM campaigns"), 117);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM ads"), 234);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM ads WHERE company_id = 5"), 0);
    c.batch_execute(
        "BEGIN; INSERT INTO companies VALUES (200, 'fr', 'new'); INSERT INTO campaigns VALUES (200, 1, 'new');
         INSERT INTO ads VALUES (200, 1, 1); COMMIT;",
    )
    .unwrap();

    // Keys added later: checked on the shards, NOT VALID and VALIDATE CONSTRAINT included.
    c.batch_execute(
        "CREATE TABLE notes (company_id bigint, id int, body text, PRIMARY KEY (company_id, id));
         SELECT create_distributed_table('notes', 'company_id', colocate_with => 'companies');
         INSERT INTO notes VALUES (1, 1, 'fine'), (777, 1, 'orphan');",
    )
    .unwrap();
    let add = "ALTER TABLE notes ADD CONSTRAINT notes_company FOREIGN KEY (company_id) REFERENCES companies (id)";
    assert_eq!(expect_error(&mut c, add).0, "23503");
    c.batch_execute(&format!("{add} NOT VALID")).unwrap();
    assert_eq!(expect_error(&mut c, "INSERT INTO notes VALUES (778, 1, 'new orphan')").0, "23503");
    assert_eq!(expect_error(&mut c, "ALTER TABLE notes VALIDATE CONSTRAINT notes_company").0, "23503");
    c.batch_execute("DELETE FROM notes WHERE company_id = 777; ALTER TABLE notes VALIDATE CONSTRAINT notes_company").unwrap();
    let notes_keys: Vec<bool> = shard_keys(&mut cluster.worker(1)).into_iter().filter(|k| k.1 == "notes_company").map(|k| k.2).collect();
    assert_eq!(notes_keys, vec![true; 4]);
    // A table referencing itself within a tenant: rows that reference later rows move in.
    c.batch_execute(
        "CREATE TABLE tree (company_id bigint, id int, parent int, PRIMARY KEY (company_id, id),
                            FOREIGN KEY (company_id, parent) REFERENCES tree (company_id, id) DEFERRABLE);
         BEGIN; SET CONSTRAINTS ALL DEFERRED;
         INSERT INTO tree SELECT c, k, CASE WHEN k < 5 THEN k + 1 END FROM generate_series(10, 30) c, generate_series(1, 5) k;
         COMMIT;
         SELECT create_distributed_table('tree', 'company_id', colocate_with => 'companies');",
    )
    .unwrap();
    assert_eq!(expect_error(&mut c, "INSERT INTO tree VALUES (10, 6, 99)").0, "23503");
    c.batch_execute("INSERT INTO tree VALUES (10, 6, 1)").unwrap();

    // Keys the shards could not enforce are refused, and nothing changes.
    c.batch_execute(
        "CREATE TABLE elsewhere (company_id bigint); SELECT create_distributed_table('elsewhere', 'company_id', colocate_with => 'none');
         CREATE TABLE by_other_column (id bigint PRIMARY KEY, company_id bigint);
         SELECT create_distributed_table('by_other_column', 'id', colocate_with => 'companies');
         CREATE TABLE nulling (company_id bigint, id bigint, PRIMARY KEY (company_id, id)); SELECT create_distributed_table('nulling', 'company_id', colocate_with => 'companies');
         CREATE TABLE ref_to_distributed (company_id bigint); SELECT create_reference_table('ref_to_distributed');
         CREATE TABLE plain (id int PRIMARY KEY);
         CREATE TABLE to_plain (id int REFERENCES plain (id));
         CREATE TABLE parents (id int PRIMARY KEY);
         CREATE TABLE kids (parent int REFERENCES parents (id));
         INSERT INTO parents VALUES (1); INSERT INTO kids VALUES (1);",
    )
    .unwrap();
    let tables_before = scalar::<i64>(&mut c, "SELECT count(*) FROM sharding.dist_table");
    let keys_to_companies = "SELECT count(*) FROM pg_constraint WHERE confrelid = 'companies'::regclass";
    let keys_before = scalar::<i64>(&mut c, keys_to_companies);
    for sql in [
        "ALTER TABLE elsewhere ADD FOREIGN KEY (company_id) REFERENCES companies (id)",
        "ALTER TABLE by_other_column ADD FOREIGN KEY (company_id) REFERENCES companies (id)",
        "ALTER TABLE nulling ADD FOREIGN KEY (company_id) REFERENCES companies (id) ON DELETE SET NULL",
        "ALTER TABLE ref_to_distributed ADD FOREIGN KEY (company_id) REFERENCES companies (id)",
        // A local table cannot reference a distributed table: its coordinator table has no rows.
        "CREATE TABLE local_to_distributed (company_id bigint REFERENCES companies (id))",
        "CREATE TABLE local_to_distributed (company_id bigint, FOREIGN KEY (company_id) REFERENCES companies (id))",
        "ALTER TABLE plain ADD COLUMN company_id bigint REFERENCES companies (id)",
        "ALTER TABLE to_plain ADD FOREIGN KEY (id) REFERENCES companies (id)",
        "SELECT create_distributed_table('to_plain', 'id')",
        "SELECT create_distributed_table('parents', 'id')",
        "SELECT undistribute_table('companies')",
        "ALTER TABLE campaigns ADD CONSTRAINT by_id FOREIGN KEY (id) REFERENCES companies (id)",
    ] {
        let (code, message, ..) = expect_error(&mut c, sql);
        assert_eq!(code, "0A000", "{sql}: {message}");
    }
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM sharding.dist_table"), tables_before);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM pg_constraint WHERE conname = 'by_id'"), 0);
    assert_eq!(scalar::<i64>(&mut c, keys_to_companies), keys_before);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM pg_class WHERE relname = 'local_to_distributed'"), 0);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM kids"), 1);
    assert_eq!(shard_keys(&mut cluster.worker(1)).len(), 21);

    // A node that joins gets the reference tables' key; shard groups moved there (both ways)
    // and split keep theirs, pointing at their own group's shards.
    c.batch_execute(&format!("SELECT sharding.add_node('127.0.0.1', {port2})")).unwrap();
    assert_eq!(shard_keys(&mut cluster.worker(2)).len(), 1);
    let w2: i32 = scalar(&mut c, &format!("SELECT node_id FROM sharding.nodes WHERE port = {port2}"));
    let shards: Vec<(i64, i32, i32)> = c
        .query(
            "SELECT shard_id, min_hash, max_hash FROM sharding.dist_shard WHERE logicalrelid = 'companies'::regclass ORDER BY shard_index",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    c.batch_execute(&format!("SELECT sharding.move_shard({}, {w2}, 'block_writes')", shards[0].0)).unwrap();
    c.batch_execute(&format!("SELECT sharding.move_shard({}, {w2})", shards[1].0)).unwrap();
    let (split, min, max) = shards[2];
    c.batch_execute(&format!("SELECT sharding.split_shard({split}, ARRAY[{}])", (min as i64 + max as i64) / 2)).unwrap();
    c.batch_execute("SELECT sharding.cleanup_old_placements()").unwrap();
    // 5 shards of 5 tables, and the two reference copies' keys.
    assert_eq!(keys_on_workers(&cluster), 27);
    // Each ads shard references the campaigns shard covering the same hash values.
    let pairs = |client: &mut Client, sql: &str| -> Vec<(String, String)> {
        client.query(sql, &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
    };
    let expected = pairs(
        &mut c,
        "SELECT 'ads_' || a.shard_id, 'campaigns_' || m.shard_id FROM sharding.dist_shard a
           JOIN sharding.dist_shard m ON m.min_hash = a.min_hash AND m.logicalrelid = 'campaigns'::regclass
          WHERE a.logicalrelid = 'ads'::regclass ORDER BY 1",
    );
    let mut actual: Vec<(String, String)> = (1..=2)
        .flat_map(|w| {
            pairs(
                &mut cluster.worker(w),
                "SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint
                  WHERE contype = 'f' AND conrelid::regclass::text LIKE 'ads\\_%'",
            )
        })
        .collect();
    actual.sort();
    assert_eq!(actual, expected);
    assert_eq!(actual.len(), 5);
    violations(&mut c, "after the moves and the split");
    // notes references company 1 without an action: the whole DELETE is refused.
    let delete = "DELETE FROM companies WHERE id = ANY (ARRAY[1, 2, 3, 4, 6, 7, 8])";
    assert_eq!(expect_error(&mut c, delete).0, "23503");
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM campaigns"), 118);
    c.batch_execute(&format!("DELETE FROM notes; {delete}")).unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM campaigns"), 97);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM ads WHERE company_id <= 8"), 0);

    // TRUNCATE needs CASCADE as on one server, which empties the referencing tables' shards.
    assert_eq!(expect_error(&mut c, "TRUNCATE companies").0, "0A000");
    c.batch_execute("TRUNCATE companies CASCADE").unwrap();
    for table in ["companies", "campaigns", "ads", "notes"] {
        assert_eq!(scalar::<i64>(&mut c, &format!("SELECT count(*) FROM {table}")), 0, "{table}");
    }
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM countries"), 3);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM tree"), 106);
    // DROP ... CASCADE drops the keys of the other tables' shards too.
    c.batch_execute("DROP TABLE companies CASCADE").unwrap();
    let mut left: Vec<String> = (1..=2)
        .flat_map(|w| shard_keys(&mut cluster.worker(w)))
        .map(|k| k.1)
        .filter(|n| !n.starts_with("countries") && !n.starts_with("tree"))
        .collect();
    left.dedup();
    assert_eq!(left, vec!["ads_company_id_campaign_id_fkey".to_string()]);
    c.batch_execute("INSERT INTO campaigns VALUES (1, 1, 'no company needed now'); INSERT INTO ads VALUES (1, 1, 1)").unwrap();
    assert_eq!(expect_error(&mut c, "INSERT INTO ads VALUES (1, 2, 2)").0, "23503");
}
