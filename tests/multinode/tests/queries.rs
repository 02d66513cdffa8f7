//! The query engine on real servers: the differential suite (every query in
//! tests/multinode/differential/ against distributed tables and against plain local copies of
//! the same rows, compared), pruning seen through EXPLAIN, prepared statements over the
//! extended protocol, session settings, cancellation and unreachable workers.

use pg_sharding_multinode::{expect_error, scalar, Client, Cluster};
use postgres::SimpleQueryMessage;

const SCHEMA: &str = include_str!("../differential/schema.sql");
const DISTRIBUTE: &str = include_str!("../differential/distribute.sql");
const DATA: &str = include_str!("../differential/data.sql");
const QUERIES: &str = include_str!("../differential/queries.sql");
const DML: &str = include_str!("../differential/dml.sql");
const UNSUPPORTED: &str = include_str!("../differential/unsupported.sql");

/// Statements prepared as `p` on both sides, each executed with the listed arguments.
const PARAMETERIZED: &[(&str, &[&str])] = &[
    (
        "PREPARE p(bigint) AS SELECT * FROM users WHERE id = $1",
        &["EXECUTE p(5)", "EXECUTE p(17)", "EXECUTE p(200)", "EXECUTE p(NULL)", "EXECUTE p(999)"],
    ),
    (
        "PREPARE p(bigint[]) AS SELECT id FROM users WHERE id = ANY ($1)",
        &["EXECUTE p('{1,2,3}')", "EXECUTE p('{}')", "EXECUTE p('{5,NULL}')", "EXECUTE p(NULL)"],
    ),
    ("PREPARE p(int, bigint) AS SELECT id FROM users WHERE id IN ($1, $2)", &["EXECUTE p(3, 4)", "EXECUTE p(150, NULL)"]),
    ("PREPARE p(smallint) AS SELECT * FROM \"MixedCase\" WHERE \"Id\" = $1", &["EXECUTE p(7)", "EXECUTE p(31)", "EXECUTE p(-1)"]),
    ("PREPARE p(int) AS SELECT id, name FROM users WHERE id = $1 + 1", &["EXECUTE p(4)", "EXECUTE p(99)"]),
    ("PREPARE p(bigint, bigint) AS SELECT count(*) FROM users WHERE id = $1 OR id = $2", &["EXECUTE p(1, 2)", "EXECUTE p(3, 3)"]),
    (
        "PREPARE p(bigint) AS SELECT u.name, o.id, o.amount FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = $1 ORDER BY o.id",
        &["EXECUTE p(7)", "EXECUTE p(8)", "EXECUTE p(0)"],
    ),
    (
        "PREPARE p(int) AS SELECT region, count(*), avg(score), max(name) FROM users WHERE score > $1 GROUP BY region",
        &["EXECUTE p(10)", "EXECUTE p(90)", "EXECUTE p(1000)"],
    ),
    ("PREPARE p(bigint, text) AS SELECT count(*), sum(amount) FROM orders WHERE user_id = $1 AND status = $2", &["EXECUTE p(7, 'new')", "EXECUTE p(22, 'paid')"]),
    ("PREPARE p(text, int) AS SELECT id FROM users WHERE name LIKE $1 ORDER BY id LIMIT $2", &["EXECUTE p('user 1%', 3)", "EXECUTE p('Jürgen%', 2)"]),
    ("PREPARE p(bigint) AS SELECT e.id, e.kind FROM events e JOIN users u ON u.id = e.user_id WHERE u.id = $1", &["EXECUTE p(4)", "EXECUTE p(14)"]),
    ("PREPARE p(timestamptz) AS SELECT kind, count(*) FROM events WHERE at < $1 GROUP BY kind", &["EXECUTE p('2024-01-02 00:00:00+00')"]),
    (
        "PREPARE p(int) AS SELECT r.label, s.c FROM (SELECT region, count(*) c, avg(score) a FROM users WHERE score > $1 GROUP BY region) s JOIN events e ON e.id = s.c LEFT JOIN regions r ON r.code = s.region",
        &["EXECUTE p(0)", "EXECUTE p(50)"],
    ),
    (
        "PREPARE p(text) AS SELECT u.region, count(*), max(e.at) FROM events e JOIN users u ON u.id = e.user_id WHERE e.kind = $1 GROUP BY u.region",
        &["EXECUTE p('buy')", "EXECUTE p('none')", "EXECUTE p(NULL)"],
    ),
    (
        "PREPARE p(bigint, int) AS UPDATE users SET score = score + $2 WHERE id = $1 RETURNING id, score",
        &["BEGIN; EXECUTE p(5, 1); ROLLBACK", "BEGIN; EXECUTE p(6, -3); EXECUTE p(6, 2); ROLLBACK"],
    ),
    (
        "PREPARE p(bigint) AS DELETE FROM orders WHERE user_id = $1 RETURNING id",
        &["BEGIN; EXECUTE p(8); ROLLBACK", "BEGIN; EXECUTE p(NULL); ROLLBACK"],
    ),
    (
        "PREPARE p(text, int) AS UPDATE orders SET note = $1 WHERE user_id IN (SELECT user_id FROM events WHERE kind = $1) AND amount > $2 RETURNING user_id, id",
        &["BEGIN; EXECUTE p('buy', 10); ROLLBACK", "BEGIN; EXECUTE p('none', 0); EXECUTE p(NULL, 0); ROLLBACK"],
    ),
    (
        "PREPARE p(int) AS WITH d AS (DELETE FROM items WHERE qty = $1 RETURNING user_id, sku) SELECT count(*), max(sku) FROM d",
        &["BEGIN; EXECUTE p(3); EXECUTE p(3); EXECUTE p(4); ROLLBACK"],
    ),
    (
        "PREPARE p(text) AS SELECT o.status, count(*) FROM orders o WHERE o.user_id IN (SELECT user_id FROM events WHERE kind = $1) GROUP BY o.status",
        &["EXECUTE p('buy')", "EXECUTE p('view')", "EXECUTE p(NULL)"],
    ),
];

const TABLES: &[&str] = &["users", "orders", "items", "events", "regions", "\"MixedCase\"", "accounts", "notes"];

/// Statements of a one-statement-per-line file (comments and blank lines skipped).
fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("--"))
        .map(|l| l.trim_end_matches(';').to_string())
        .collect()
}

type Rows = Vec<Vec<Option<String>>>;

/// Rows (as text) and the affected count of the last command.
fn run(client: &mut Client, sql: &str) -> Result<(Rows, u64), postgres::Error> {
    let mut rows = Vec::new();
    let mut affected = 0;
    for message in client.simple_query(sql)? {
        match message {
            SimpleQueryMessage::Row(row) => {
                rows.push((0..row.len()).map(|i| row.get(i).map(str::to_string)).collect());
            }
            SimpleQueryMessage::CommandComplete(n) => affected = n,
            _ => {}
        }
    }
    Ok((rows, affected))
}

/// Whether the statement's final clause fixes the row order.
fn ordered(sql: &str) -> bool {
    let upper = sql.to_uppercase();
    match (upper.rfind("ORDER BY"), upper.rfind(')')) {
        (Some(order), Some(paren)) => order > paren,
        (Some(_), None) => true,
        _ => false,
    }
}

fn load(dist: &mut Client, local: &mut Client) {
    for (client, s, s2) in [(&mut *dist, "d", "d2"), (&mut *local, "l", "l2")] {
        client.batch_execute(&SCHEMA.replace("@s2", s2).replace("@s", s)).unwrap();
        if s == "d" {
            client.batch_execute(DISTRIBUTE).unwrap();
        }
        client.batch_execute(&DATA.replace("@s2", s2).replace("@s", s)).unwrap();
    }
    dist.batch_execute("SET search_path = d, d2").unwrap();
    local.batch_execute("SET search_path = l, l2").unwrap();
}

fn compare(dist: &mut Client, local: &mut Client, sql: &str) -> Result<(), String> {
    let expected = run(local, sql).map_err(|e| format!("local side failed: {e}"))?;
    let got = run(dist, sql).map_err(|e| {
        let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
        let message = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string());
        format!("distributed side failed: {code} {message}")
    })?;
    let (mut expected_rows, mut got_rows) = (expected.0, got.0);
    if !ordered(sql) {
        expected_rows.sort();
        got_rows.sort();
    }
    if expected_rows != got_rows {
        let show = |rows: &Rows| rows.iter().take(5).map(|r| format!("{r:?}")).collect::<Vec<_>>().join("\n    ");
        return Err(format!(
            "rows differ: {} expected, {} returned\n  expected: {}\n  returned: {}",
            expected_rows.len(),
            got_rows.len(),
            show(&expected_rows),
            show(&got_rows)
        ));
    }
    if expected.1 != got.1 {
        return Err(format!("affected rows differ: {} expected, {} returned", expected.1, got.1));
    }
    Ok(())
}

#[test]
fn distributed_queries_return_what_a_single_server_returns() {
    differential_suite(&Cluster::start(2));
}

/// The whole differential suite again with half of every table's shards on the coordinator
/// itself (one worker, and the coordinator registered as a node): those placements run in the
/// coordinator's backends, inside its transactions, and nothing connects back to it.
#[test]
fn placements_on_the_coordinator_run_locally_and_return_what_a_single_server_returns() {
    let cluster = Cluster::start(1);
    let mut c = cluster.coordinator();
    let port = i32::from(cluster.port);
    c.execute("SELECT sharding.add_node('127.0.0.1', $1)", &[&port]).unwrap();
    let flagged: bool = c.query_one("SELECT is_coordinator FROM sharding.dist_node WHERE port = $1", &[&port]).unwrap().get(0);
    assert!(flagged, "the coordinator is recorded as such");
    differential_suite(&cluster);
    let nodes: Vec<i64> = pg_sharding_multinode::shards_per_node(&mut c, "d.users");
    assert_eq!(nodes.len(), 2, "d.users has shards on the worker and on the coordinator: {nodes:?}");
    assert!(nodes.iter().all(|n| *n > 0), "{nodes:?}");
    // No connection came back from the coordinator to itself.
    let loopback: i64 = scalar(&mut c, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pg_sharding:%'");
    assert_eq!(loopback, 0, "the coordinator's placements are reached without a connection");
}

fn differential_suite(cluster: &Cluster) {
    let mut dist = cluster.coordinator();
    let mut local = cluster.coordinator();
    load(&mut dist, &mut local);

    let mut failures = Vec::new();
    let queries = lines(QUERIES);
    assert!(queries.len() >= 150, "the suite has {} queries", queries.len());
    for sql in &queries {
        if let Err(problem) = compare(&mut dist, &mut local, sql) {
            failures.push(format!("{sql}\n  {problem}"));
        }
    }
    // The joins again with broadcasting off: the coordinator joins the shards' rows.
    run(&mut dist, "SET sharding.broadcast_join_limit = 0").unwrap();
    for sql in queries.iter().filter(|q| q.contains("JOIN") || q.contains("(SELECT") || q.contains(", users")) {
        if let Err(problem) = compare(&mut dist, &mut local, sql) {
            failures.push(format!("[broadcast off] {sql}\n  {problem}"));
        }
    }
    run(&mut dist, "RESET sharding.broadcast_join_limit").unwrap();

    // Session settings that change how values print must apply on the workers too.
    for setting in [
        "SET TimeZone = 'Asia/Tokyo'",
        "SET DateStyle = 'SQL, DMY'",
        "SET IntervalStyle = 'sql_standard'",
        "SET extra_float_digits = -2",
    ] {
        for sql in [setting] {
            run(&mut dist, sql).unwrap();
            run(&mut local, sql).unwrap();
        }
        for sql in [
            "SELECT e.id, at, created, at - TIMESTAMPTZ '2024-01-01 00:00:00+00' FROM events e JOIN users u ON u.id = e.id WHERE e.id = 7",
            "SELECT id, at::text, (at - interval '1 day')::text FROM events WHERE id = 9",
            "SELECT id, score::float8 / 7, (score::float8 / 7)::text FROM users WHERE id = 11",
            "SELECT id, at::text FROM events WHERE at < TIMESTAMPTZ '2024-01-01 12:00:00+09'",
            "SELECT round(sum(score::float8 / 7)::numeric, 8) FROM users",
        ] {
            if let Err(problem) = compare(&mut dist, &mut local, sql) {
                failures.push(format!("[{setting}] {sql}\n  {problem}"));
            }
        }
        run(&mut dist, "RESET ALL; SET search_path = d, d2").unwrap();
        run(&mut local, "RESET ALL; SET search_path = l, l2").unwrap();
    }

    // Prepared statements with parameters under generic plans: the shards are chosen at
    // execution from the bound values (NULLs, empty arrays, other integer widths included).
    run(&mut dist, "SET plan_cache_mode = force_generic_plan").unwrap();
    run(&mut local, "SET plan_cache_mode = force_generic_plan").unwrap();
    for (prepare, executions) in PARAMETERIZED {
        run(&mut dist, prepare).unwrap();
        run(&mut local, prepare).unwrap();
        for execute in *executions {
            if let Err(problem) = compare(&mut dist, &mut local, execute) {
                failures.push(format!("{prepare}\n  {execute}\n  {problem}"));
            }
        }
        run(&mut dist, "DEALLOCATE p").unwrap();
        run(&mut local, "DEALLOCATE p").unwrap();
    }
    run(&mut dist, "RESET plan_cache_mode").unwrap();
    run(&mut local, "RESET plan_cache_mode").unwrap();

    let dml = lines(DML);
    let mut diverged: Vec<&str> = Vec::new();
    for sql in &dml {
        if let Err(problem) = compare(&mut dist, &mut local, sql) {
            failures.push(format!("{sql}\n  {problem}"));
        }
        for table in TABLES {
            let check = format!("SELECT * FROM {table}");
            if diverged.contains(table) {
                continue;
            }
            if let Err(problem) = compare(&mut dist, &mut local, &check) {
                failures.push(format!("after {sql}: {table}\n  {problem}"));
                diverged.push(table);
            }
        }
    }

    // Every worker's copy of the reference table changed as the coordinator's did.
    let coordinator_copy = run(&mut dist, "SELECT * FROM regions ORDER BY code").unwrap().0;
    let copies = run(&mut dist, "SELECT shard_id, port FROM sharding.shards WHERE table_name = 'd.regions'::regclass").unwrap().0;
    assert_eq!(copies.len(), 2, "a copy of d.regions on each node");
    for copy in copies {
        let (shard, port) = (copy[0].clone().unwrap(), copy[1].clone().unwrap());
        let mut worker = cluster.connect_port(port.parse().unwrap());
        let rows = run(&mut worker, &format!("SELECT * FROM d.regions_{shard} ORDER BY code")).unwrap().0;
        if rows != coordinator_copy {
            failures.push(format!("the copy of d.regions on port {port} differs from the coordinator's:\n  {rows:?}\n  {coordinator_copy:?}"));
        }
    }

    for sql in lines(UNSUPPORTED) {
        match run(&mut dist, &sql) {
            Ok(_) => failures.push(format!("{sql}\n  expected SQLSTATE 0A000, it ran")),
            Err(e) => {
                let code = e.code().map(|c| c.code().to_string()).unwrap_or_default();
                if code != "0A000" {
                    failures.push(format!("{sql}\n  expected SQLSTATE 0A000, got {code}: {e}"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} statements differ:\n\n{}",
        failures.len(),
        queries.len() + dml.len(),
        failures.join("\n\n")
    );
}

fn explain(client: &mut Client, sql: &str) -> String {
    let (rows, _) = run(client, &format!("EXPLAIN {sql}")).unwrap();
    rows.into_iter().map(|r| r[0].clone().unwrap_or_default()).collect::<Vec<_>>().join("\n")
}

fn task_count(plan: &str) -> Vec<i64> {
    plan.lines()
        .filter_map(|l| l.trim().strip_prefix("Task Count: "))
        .map(|n| n.parse().unwrap())
        .collect()
}

#[test]
fn explain_shows_pruning_and_prepared_statements_prune_at_execution() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE kv (k bigint PRIMARY KEY, v text);
         SELECT create_distributed_table('kv', 'k');
         INSERT INTO kv SELECT g, 'v' || g FROM generate_series(1, 1000) g;",
    )
    .unwrap();
    let shard_of = |c: &mut Client, k: i64| -> i64 { scalar(c, &format!("SELECT sharding.shard_for_value('kv', {k}::bigint)")) };

    let plan = explain(&mut c, "SELECT v FROM kv WHERE k = 5");
    assert_eq!(task_count(&plan), vec![1], "{plan}");
    assert!(plan.contains(&format!("Shards: {}", shard_of(&mut c, 5))), "{plan}");
    assert!(plan.contains(&format!("kv_{}", shard_of(&mut c, 5))), "{plan}");
    assert_eq!(task_count(&explain(&mut c, "SELECT count(*) FROM kv")), vec![32]);
    let in_list = task_count(&explain(&mut c, "SELECT v FROM kv WHERE k IN (1, 2, 3)"))[0];
    assert!((1..=3).contains(&in_list), "IN list of 3 keys touched {in_list} shards");
    assert_eq!(task_count(&explain(&mut c, "UPDATE kv SET v = 'x' WHERE k = 7")), vec![1]);
    // Through views: a plain one of the table, and one joining it with a reference table.
    c.batch_execute(
        "CREATE TABLE digit_labels (n int PRIMARY KEY, label text); SELECT create_reference_table('digit_labels');
         CREATE VIEW kv_plain AS SELECT * FROM kv;
         CREATE VIEW kv_labels AS SELECT kv.k, kv.v, l.label FROM kv JOIN digit_labels l ON l.n = kv.k % 10;",
    )
    .unwrap();
    assert_eq!(task_count(&explain(&mut c, "SELECT * FROM kv_plain WHERE k = 5")), vec![1]);
    assert_eq!(task_count(&explain(&mut c, "SELECT * FROM kv_labels WHERE k = 5")), vec![1]);
    assert_eq!(task_count(&explain(&mut c, "SELECT * FROM kv_labels")), vec![32]);
    // Sent whole to the one shard, as a router query (also under FOR UPDATE).
    let plan = explain(&mut c, "SELECT * FROM kv_plain WHERE k = 5 FOR UPDATE");
    assert_eq!(task_count(&plan), vec![1], "{plan}");
    assert!(plan.contains("FOR UPDATE"), "{plan}");
    assert_eq!(task_count(&explain(&mut c, "DELETE FROM kv WHERE v = 'nothing'")), vec![32]);
    // INSERT ... SELECT between co-located tables runs on the shards.
    c.batch_execute("CREATE TABLE kv2 (k bigint PRIMARY KEY, v text); SELECT create_distributed_table('kv2', 'k', colocate_with => 'kv')").unwrap();
    let plan = explain(&mut c, "INSERT INTO kv2 SELECT k, v FROM kv WHERE k > 10");
    assert_eq!(task_count(&plan), vec![32], "{plan}");
    assert!(plan.contains("INSERT INTO"), "{plan}");
    assert_eq!(c.execute("INSERT INTO kv2 SELECT k, v FROM kv WHERE k > 10", &[]).unwrap(), 990);
    // Not co-located in shape (the key is computed): through the coordinator, same result.
    assert_eq!(c.execute("INSERT INTO kv2 SELECT k + 5000, v FROM kv WHERE k <= 10", &[]).unwrap(), 10);
    let n: i64 = scalar(&mut c, "SELECT count(*) FROM kv2");
    assert_eq!(n, 1000);

    // Aggregates over many shards: partial aggregates on the shards, combined here.
    let plan = explain(&mut c, "SELECT left(v, 2), count(*), avg(k) FROM kv GROUP BY 1");
    assert_eq!(task_count(&plan), vec![32], "{plan}");
    assert!(plan.contains("GROUP BY") && plan.contains("count(k)"), "{plan}");
    let (rows, _) = run(&mut c, "SELECT count(*), sum(k), avg(k) FROM kv").unwrap();
    assert_eq!(rows[0], vec![Some("1000".into()), Some("500500".into()), Some("500.5000000000000000".into())]);

    // Generic plans (forced): the shard is chosen at execution from the bound value.
    c.batch_execute("SET plan_cache_mode = force_generic_plan; PREPARE get(bigint) AS SELECT v FROM kv WHERE k = $1").unwrap();
    for k in [5i64, 6, 700] {
        let plan = explain(&mut c, &format!("EXECUTE get({k})"));
        assert_eq!(task_count(&plan), vec![1], "{plan}");
        assert!(plan.contains(&format!("Shards: {}", shard_of(&mut c, k))), "{plan}");
        let v: String = scalar(&mut c, &format!("EXECUTE get({k})"));
        assert_eq!(v, format!("v{k}"));
    }

    // The extended protocol with parameters, many times (custom then generic plans).
    let mut fresh = cluster.coordinator();
    let statement = fresh.prepare("SELECT v FROM kv WHERE k = $1").unwrap();
    for k in 1..=20i64 {
        let rows = fresh.query(&statement, &[&k]).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<_, String>(0), format!("v{k}"));
    }
    let update = fresh.prepare("UPDATE kv SET v = $2 WHERE k = $1").unwrap();
    for k in 1..=10i64 {
        assert_eq!(fresh.execute(&update, &[&k, &format!("new{k}")]).unwrap(), 1);
    }
    let changed: i64 = scalar(&mut fresh, "SELECT count(*) FROM kv WHERE v LIKE 'new%'");
    assert_eq!(changed, 10);
    // A NULL key matches nothing, and an aggregate over nothing is still one row.
    let rows = fresh.query("SELECT count(*) FROM kv WHERE k = $1", &[&None::<i64>]).unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 0);

    // Grouped by the distribution column: each shard computes its groups completely, HAVING and
    // the first rows (ORDER BY ... LIMIT) included; any aggregate works there.
    let sql = "SELECT k, count(*), string_agg(v, ',') FROM kv GROUP BY k HAVING count(*) > 0 ORDER BY k DESC LIMIT 3";
    let plan = explain(&mut c, sql);
    assert_eq!(task_count(&plan), vec![32], "{plan}");
    assert!(plan.contains("HAVING") && plan.contains("LIMIT 3") && plan.contains("string_agg"), "{plan}");
    let (rows, _) = run(&mut c, sql).unwrap();
    assert_eq!(rows.iter().map(|r| r[0].clone().unwrap()).collect::<Vec<_>>(), vec!["1000", "999", "998"]);

    // A subquery or WITH query over many shards that the shards can aggregate, inside a
    // statement that cannot run there (here: a join with a local table), aggregates on the
    // shards: only the groups come back.
    c.batch_execute(
        "CREATE TABLE labels (n int, label text); INSERT INTO labels SELECT g, 'length ' || g FROM generate_series(1, 8) g;
         CREATE TABLE kv_local AS SELECT * FROM kv;",
    )
    .unwrap();
    for (sql, local) in [
        (
            "SELECT l.label, s.c FROM (SELECT length(v) AS n, count(*) AS c FROM kv GROUP BY 1) s JOIN labels l ON l.n = s.n ORDER BY 1",
            "SELECT l.label, s.c FROM (SELECT length(v) AS n, count(*) AS c FROM kv_local GROUP BY 1) s JOIN labels l ON l.n = s.n ORDER BY 1",
        ),
        (
            "WITH t AS (SELECT length(v) AS n, max(k) AS m FROM kv WHERE k > 100 GROUP BY 1) SELECT l.label, t.m FROM t JOIN labels l USING (n) ORDER BY 1",
            "WITH t AS (SELECT length(v) AS n, max(k) AS m FROM kv_local WHERE k > 100 GROUP BY 1) SELECT l.label, t.m FROM t JOIN labels l USING (n) ORDER BY 1",
        ),
    ] {
        let plan = explain(&mut c, sql);
        assert_eq!(task_count(&plan), vec![32], "{plan}");
        assert!(plan.contains("GROUP BY") && plan.contains("labels"), "{plan}");
        let (got, _) = run(&mut c, sql).unwrap();
        let (expected, _) = run(&mut c, local).unwrap();
        assert!(!expected.is_empty());
        assert_eq!(got, expected, "{sql}");
    }

    // A join of tables that are not co-located: the small one (filtered by its own conditions,
    // projected to the columns the statement reads) goes to every task of the other, where
    // the join and the partial aggregates run.
    c.batch_execute(
        "CREATE TABLE tags (id int PRIMARY KEY, dropped int, name text COLLATE \"und-x-icu\", kind text);
         ALTER TABLE tags DROP COLUMN dropped;
         SELECT create_distributed_table('tags', 'id', colocate_with => 'none');
         INSERT INTO tags SELECT g, (ARRAY['b', 'B', 'a', 'A'])[g % 4 + 1], CASE WHEN g % 2 = 0 THEN 'even' END FROM generate_series(1, 40) g;
         CREATE TABLE tags_local AS SELECT * FROM tags;",
    )
    .unwrap();
    // min and max run on the shards over the broadcast column: in its collation (ICU: a < A <
    // b < B), not the database's (C: A < B < a < b).
    let sql = "SELECT kv.k % 3 AS r, min(t.name), max(t.name), count(t.kind) FROM kv JOIN tags t ON t.id = kv.k % 40 + 1 WHERE t.name >= 'a' GROUP BY 1 ORDER BY 1";
    let plan = explain(&mut c, &format!("(ANALYZE, COSTS off, TIMING off, SUMMARY off) {sql}"));
    assert_eq!(task_count(&plan), vec![32], "{plan}");
    assert!(plan.contains("Broadcast: tags") && plan.contains("Broadcast Task Count: 32"), "{plan}");
    assert!(!plan.contains("routed"), "{plan}");
    let sent: i64 = scalar(&mut c, "SELECT count(*) FROM tags WHERE name >= 'a'");
    assert_eq!(sent, 40);
    // Joined on kv's distribution column: each row of tags goes only to the task of the shard
    // its id hashes to, and tasks that get none do not run.
    let routed = "SELECT t.name, count(*), sum(kv.k) FROM kv JOIN tags t ON t.id = kv.k WHERE t.kind = 'even' GROUP BY 1 ORDER BY 1";
    let routed_plan = explain(&mut c, &format!("(ANALYZE, COSTS off, TIMING off, SUMMARY off) {routed}"));
    assert!(routed_plan.contains("Broadcast: tags (routed by id)") && routed_plan.contains("Broadcast Rows: 20"), "{routed_plan}");
    let shards: i64 = scalar(&mut c, "SELECT count(DISTINCT sharding.shard_for_value('kv', g::bigint)) FROM generate_series(2, 40, 2) g");
    assert_eq!(task_count(&routed_plan), vec![shards], "{routed_plan}");
    let (got, _) = run(&mut c, routed).unwrap();
    let (expected, _) = run(&mut c, &routed.replace("FROM kv JOIN tags", "FROM kv_local kv JOIN tags_local")).unwrap();
    assert_eq!(expected.len(), 2);
    assert_eq!(got, expected, "{routed}");
    // No row to send: one task still answers the aggregate.
    let (got, _) = run(&mut c, "SELECT count(*), sum(kv.k) FROM kv JOIN tags t ON t.id = kv.k WHERE t.kind = 'odd'").unwrap();
    assert_eq!(got, vec![vec![Some("0".to_string()), None]]);
    assert!(plan.contains(&format!("Broadcast Rows: {sent}")), "{plan}");
    assert!(plan.contains("COLLATE \"und-x-icu\"") && plan.contains("min(t.name)"), "{plan}");
    let (got, _) = run(&mut c, sql).unwrap();
    let (expected, _) = run(&mut c, &sql.replace("FROM kv JOIN tags", "FROM kv_local kv JOIN tags_local")).unwrap();
    assert_eq!(expected.len(), 3);
    assert_eq!(expected[0][1].as_deref(), Some("a"));
    assert_eq!(got, expected, "{sql}");
    // UPDATE ... FROM a table that is not co-located: broadcast to the target's shards.
    let update = "UPDATE kv SET v = t.name FROM tags t WHERE t.id = kv.k AND t.kind = 'even'";
    let plan = explain(&mut c, update);
    assert!(plan.contains("Broadcast: tags") && plan.contains("UPDATE"), "{plan}");
    assert_eq!(c.execute(update, &[]).unwrap(), 20);
    let renamed: i64 = scalar(&mut c, "SELECT count(*) FROM kv WHERE k <= 40 AND k % 2 = 0 AND v IN ('a', 'b')");
    assert_eq!(renamed, 20);
    // Turned off: the coordinator joins the rows of both, with the same answer.
    c.batch_execute("SET sharding.broadcast_join_limit = 0").unwrap();
    let plan = explain(&mut c, sql);
    assert!(!plan.contains("Broadcast") && plan.contains("Join"), "{plan}");
    assert_eq!(run(&mut c, sql).unwrap().0, expected);
    // ... and the UPDATE's rows are chosen here (a join over the shards' rows, locking the
    // target's), then changed by ctid on their own shards only.
    let update = "UPDATE kv SET v = t.name || '!' FROM tags t WHERE t.id = kv.k AND t.kind = 'even'";
    let plan = explain(&mut c, &format!("(ANALYZE, COSTS off, TIMING off, SUMMARY off) {update}"));
    assert!(plan.contains("Intermediate Result Rows: 20") && plan.contains("ctid"), "{plan}");
    let tasks = task_count(&plan)[0];
    assert!((1..=20).contains(&tasks), "{plan}");
    let mut c2 = cluster.coordinator();
    c.batch_execute("BEGIN").unwrap();
    assert_eq!(c.execute(update, &[]).unwrap(), 20);
    // It holds the locks PostgreSQL's UPDATE would: the changed rows, not the others it read.
    c2.batch_execute("SET statement_timeout = '500ms'").unwrap();
    let error = c2.execute("UPDATE kv SET v = 'other' WHERE k = 2", &[]).unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("57014"), "{error}");
    assert_eq!(c2.execute("UPDATE kv SET v = 'other' WHERE k = 3", &[]).unwrap(), 1);
    c2.batch_execute("RESET statement_timeout").unwrap();
    c.batch_execute("COMMIT").unwrap();
    // SELECT ... FOR UPDATE over many shards: each shard locks the rows it returns, until the
    // end of the transaction.
    c.batch_execute("BEGIN").unwrap();
    let locked = c.query("SELECT k FROM kv WHERE k % 100 = 7 ORDER BY k FOR UPDATE", &[]).unwrap();
    assert_eq!(locked.len(), 10);
    c2.batch_execute("SET statement_timeout = '500ms'").unwrap();
    let error = c2.execute("UPDATE kv SET v = 'other' WHERE k = 507", &[]).unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("57014"), "{error}");
    assert_eq!(c2.execute("UPDATE kv SET v = v WHERE k = 508", &[]).unwrap(), 1);
    c2.batch_execute("RESET statement_timeout").unwrap();
    c.batch_execute("COMMIT").unwrap();
    // The same with the lock in a subquery of a multi-shard query.
    c.batch_execute("BEGIN").unwrap();
    let locked = c.query("SELECT count(*) FROM kv WHERE k IN (SELECT k FROM kv WHERE k % 100 = 9 FOR UPDATE)", &[]).unwrap();
    assert_eq!(locked[0].get::<_, i64>(0), 10);
    let error = c2.execute("SELECT k FROM kv WHERE k = 509 FOR UPDATE NOWAIT", &[]).unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("55P03"), "{error}");
    assert_eq!(c2.query("SELECT k FROM kv WHERE k = 510 FOR UPDATE NOWAIT", &[]).unwrap().len(), 1);
    c.batch_execute("COMMIT").unwrap();
    // A chosen row that another session changes before the shards change it: the statement
    // fails with 40001 and changes nothing, rather than change fewer rows than it chose.
    c.batch_execute("SET sharding.fault_injection = 'after_chosen_rows:pause:3000'").unwrap();
    let pid: i32 = scalar(&mut c, "SELECT pg_backend_pid()");
    let retag = "UPDATE kv SET v = v || '?' FROM tags t WHERE t.id = kv.k AND t.kind = 'even'";
    let paused = std::thread::spawn(move || {
        let result = c.execute(retag, &[]);
        (c, result)
    });
    let paused_query = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event = 'PgSleep'";
    while c2.query_one(paused_query, &[&pid]).unwrap().get::<_, i64>(0) == 0 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(c2.execute("UPDATE kv SET v = 'meanwhile' WHERE k = 4", &[]).unwrap(), 1);
    let (mut c, result) = paused.join().unwrap();
    let error = result.unwrap_err();
    assert_eq!(error.code().map(|c| c.code()), Some("40001"), "{error}");
    c.batch_execute("RESET sharding.fault_injection").unwrap();
    let retagged: i64 = scalar(&mut c, "SELECT count(*) FROM kv WHERE v LIKE '%?'");
    assert_eq!(retagged, 0);
    let changed: i64 = scalar(&mut c, "SELECT count(*) FROM kv WHERE v IN ('a!', 'b!') AND k <= 40 AND k % 2 = 0");
    assert_eq!(changed, 19); // and k = 4 changed by the other session
    let others: i64 = scalar(&mut c, "SELECT count(*) FROM kv WHERE v LIKE '%!'");
    assert_eq!(others, 19);
    c.batch_execute("RESET sharding.broadcast_join_limit").unwrap();

    // An uncorrelated subquery on a table that is not co-located: the coordinator runs it
    // first and sends its rows to every task, where the rest runs as on co-located shards.
    let sql = "SELECT count(*), min(k), max(k) FROM kv WHERE k IN (SELECT id FROM tags WHERE kind = 'even')";
    let plan = explain(&mut c, &format!("(ANALYZE, COSTS off, TIMING off, SUMMARY off) {sql}"));
    assert_eq!(task_count(&plan), vec![32], "{plan}");
    assert!(plan.contains("Intermediate Result:") && plan.contains("Intermediate Result Rows: 20"), "{plan}");
    assert!(plan.contains("unnest(($1)::integer[])") && plan.contains("count(*)"), "{plan}");
    let (got, _) = run(&mut c, sql).unwrap();
    let (expected, _) = run(&mut c, &sql.replace("FROM kv WHERE", "FROM kv_local kv WHERE").replace("FROM tags", "FROM tags_local")).unwrap();
    assert_eq!(expected[0][0].as_deref(), Some("20"));
    assert_eq!(got, expected, "{sql}");
    // A DELETE with such a subquery (an error before): the same, in the target's tasks. The
    // ICU collation of the subquery's column holds where it runs (here: 'A' only, not 'a').
    let delete = "DELETE FROM kv WHERE k IN (SELECT id * 2 FROM tags WHERE name = 'A')";
    let plan = explain(&mut c, delete);
    assert!(plan.contains("Intermediate Result:") && plan.contains("DELETE"), "{plan}");
    let expected: i64 = scalar(&mut c, "SELECT count(*) FROM kv_local WHERE k IN (SELECT id * 2 FROM tags_local WHERE name = 'A')");
    assert_eq!(expected, 10);
    assert_eq!(c.execute(delete, &[]).unwrap(), 10);
    let left: i64 = scalar(&mut c, "SELECT count(*) FROM kv WHERE k IN (SELECT id * 2 FROM tags_local WHERE name = 'A')");
    assert_eq!(left, 0);
    // Turned off, the SELECT runs as before (the coordinator evaluates the subquery over the
    // rows of kv) and the DELETE still works: its only alternative is an error.
    let with_result = run(&mut c, sql).unwrap().0;
    assert_eq!(with_result[0][0].as_deref(), Some("15"));
    c.batch_execute("SET sharding.broadcast_join_limit = 0").unwrap();
    let plan = explain(&mut c, sql);
    assert!(!plan.contains("Intermediate Result"), "{plan}");
    assert_eq!(run(&mut c, sql).unwrap().0, with_result);
    assert!(explain(&mut c, delete).contains("Intermediate Result:"));
    c.batch_execute("RESET sharding.broadcast_join_limit").unwrap();
    // A subquery in FROM: a function scan over its rows, under its own alias and column names.
    let update = "UPDATE kv SET v = t.label FROM (SELECT id, upper(name) AS label FROM tags WHERE kind = 'even') t WHERE t.id = kv.k";
    let plan = explain(&mut c, update);
    assert!(plan.contains("Intermediate Result:") && plan.contains("t(id, label)"), "{plan}");
    assert_eq!(c.execute(update, &[]).unwrap(), 15);
    let upper: i64 = scalar(&mut c, "SELECT count(*) FROM kv WHERE k <= 40 AND v IN ('A', 'B')");
    assert_eq!(upper, 15);

    // A whole row: the shards send ROW(columns), the coordinator reads it as kv's row type
    // (also for one shard: the shard's own row type must not show).
    let plan = explain(&mut c, "SELECT kv, pg_typeof(kv) FROM kv WHERE k = 7");
    assert!(plan.contains("ROW(pgs_r1.k, pgs_r1.v)"), "{plan}");
    let (rows, _) = run(&mut c, "SELECT kv::text, pg_typeof(kv)::text, tableoid::regclass::text FROM kv WHERE k IN (997, 998) ORDER BY 1").unwrap();
    let expected = |k: &str| vec![Some(format!("({k},v{k})")), Some("kv".to_owned()), Some("kv".to_owned())];
    assert_eq!(rows, vec![expected("997"), expected("998")]);
    // RETURNING the shards cannot evaluate: they return the columns it reads.
    let update = "UPDATE kv SET v = v || '!' WHERE k > 997 RETURNING kv, random() < 2 AS sure";
    let plan = run(&mut c, &format!("EXPLAIN (VERBOSE) {update}")).unwrap().0;
    let plan: String = plan.into_iter().map(|r| r[0].clone().unwrap_or_default() + "\n").collect();
    assert!(plan.contains("RETURNING ROW(k, v) AS c1") && plan.contains("(random() < (2)::double precision)"), "{plan}");
    let (rows, count) = run(&mut c, update).unwrap();
    assert_eq!(count, 3);
    let mut returned: Vec<_> = rows.into_iter().map(|r| (r[0].clone().unwrap_or_default(), r[1].clone())).collect();
    returned.sort();
    assert_eq!(returned, ["(1000,v1000!)", "(998,v998!)", "(999,v999!)"].map(|t| (t.to_owned(), Some("t".to_owned()))).to_vec());
    let (state, message, _, _) = expect_error(&mut c, "UPDATE kv SET v = 'x' WHERE k < 4 RETURNING kv, (SELECT 1)");
    assert_eq!(state, "0A000", "{message}");
    assert!(message.contains("subqueries in the RETURNING list"), "{message}");
}

#[test]
fn statement_timeout_cancels_the_remote_work_and_dead_workers_are_named() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v int);
         SELECT create_distributed_table('t', 'id');
         INSERT INTO t SELECT g, g FROM generate_series(1, 100) g;",
    )
    .unwrap();
    let (shard, worker) = shard_of_key_1(&cluster, &mut c, "t");

    // A lock on one shard holds the multi-shard scan; statement_timeout ends it everywhere.
    let mut holder = cluster.worker(worker);
    holder.batch_execute(&format!("BEGIN; LOCK TABLE t_{shard} IN ACCESS EXCLUSIVE MODE")).unwrap();
    c.batch_execute("SET statement_timeout = '500ms'").unwrap();
    let (code, _, _, _) = expect_error(&mut c, "SELECT count(*) FROM t");
    assert_eq!(code, "57014");
    let (code, _, _, _) = expect_error(&mut c, "UPDATE t SET v = v + 1");
    assert_eq!(code, "57014");
    let mut w = cluster.worker(worker);
    assert_eq!(active_tasks_after_a_while(&mut w), 0, "the worker still runs the cancelled statement");
    holder.batch_execute("ROLLBACK").unwrap();
    c.batch_execute("RESET statement_timeout").unwrap();
    let total: i64 = scalar(&mut c, "SELECT sum(v) FROM t");
    assert_eq!(total, 5050, "the cancelled UPDATE changed nothing");

    // A stopped worker: a clear error naming it; shards elsewhere still answer.
    let other = if worker == 1 { 2 } else { 1 };
    cluster.stop_worker(other);
    let (code, message, _, detail) = expect_error(&mut c, "SELECT count(*) FROM t");
    let port = cluster.worker_port(other).to_string();
    assert!(code.starts_with("08"), "{code} {message}");
    assert!(message.contains(&port) || detail.contains(&port), "{message} / {detail}");
    let v: i32 = scalar(&mut c, "SELECT v FROM t WHERE id = 1");
    assert_eq!(v, 1);
    cluster.start_worker(other);
    let count: i64 = scalar(&mut c, "SELECT count(*) FROM t");
    assert_eq!(count, 100);
}

/// The shard holding key 1 of `table`, and the number of the worker it is on.
fn shard_of_key_1(cluster: &Cluster, c: &mut Client, table: &str) -> (i64, usize) {
    let shard: i64 = scalar(c, &format!("SELECT sharding.shard_for_value('{table}', 1)"));
    let port: i32 = scalar(
        c,
        &format!("SELECT n.port FROM sharding.dist_placement p JOIN sharding.dist_node n USING (node_id) WHERE p.shard_id = {shard}"),
    );
    (shard, (port as u16 - cluster.worker_port(1) + 1) as usize)
}

/// pg_sharding backends on a worker that are running a statement.
fn active_tasks(w: &mut Client) -> i64 {
    scalar(w, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pg\\_sharding:%' AND state = 'active'")
}

/// `active_tasks`, once it is 0 or after 5 s (a cancelled task takes a moment to end).
fn active_tasks_after_a_while(w: &mut Client) -> i64 {
    let mut left = active_tasks(w);
    for _ in 0..50 {
        if left == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        left = active_tasks(w);
    }
    left
}

/// Temporary files this database has written so far (statistics flushed first).
fn temp_files(c: &mut Client) -> i64 {
    c.batch_execute("SELECT pg_stat_force_next_flush()").unwrap();
    c.batch_execute("SET stats_fetch_consistency = none").unwrap();
    scalar(c, "SELECT temp_files FROM pg_stat_database WHERE datname = current_database()")
}

#[test]
fn multi_shard_reads_stream_rows_and_stop_their_tasks_when_no_longer_read() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE s (id int PRIMARY KEY, v text);
         SELECT create_distributed_table('s', 'id');
         INSERT INTO s SELECT g, repeat('x', 200) FROM generate_series(1, 3000) g;",
    )
    .unwrap();
    let (shard, worker) = shard_of_key_1(&cluster, &mut c, "s");
    let elsewhere = (2..3000)
        .find(|k| scalar::<i64>(&mut c, &format!("SELECT sharding.shard_for_value('s', {k})")) != shard)
        .expect("a key of another shard");

    let locked_rows: i64 =
        scalar(&mut c, &format!("SELECT count(*) FROM generate_series(1, 3000) k WHERE sharding.shard_for_value('s', k) = {shard}"));
    assert!(locked_rows > 0);

    // One shard is locked on its worker: a cursor still returns every other shard's rows (each
    // task on a connection of its own, so that none waits behind the locked one).
    let mut holder = cluster.worker(worker);
    holder.batch_execute(&format!("BEGIN; LOCK TABLE s_{shard} IN ACCESS EXCLUSIVE MODE")).unwrap();
    c.batch_execute("SET statement_timeout = '20s'; SET sharding.max_connections_per_node = 32").unwrap();
    c.batch_execute("BEGIN; DECLARE cur CURSOR FOR SELECT id FROM s").unwrap();
    let fetched = c.query(&format!("FETCH {} FROM cur", 3000 - locked_rows), &[]).unwrap();
    assert_eq!(fetched.len() as i64, 3000 - locked_rows, "rows come while a task waits");
    let ids: Vec<i32> = fetched.iter().map(|r| r.get(0)).collect();
    let of_locked: i64 = c
        .query_one(&format!("SELECT count(*) FROM unnest($1::int[]) k WHERE sharding.shard_for_value('s', k) = {shard}"), &[&ids])
        .unwrap()
        .get(0);
    assert_eq!(of_locked, 0);
    let mut w = cluster.worker(worker);
    assert_eq!(active_tasks(&mut w), 1, "the locked shard's task waits on its worker");
    // Other statements run meanwhile (on other connections), and a failed subtransaction
    // leaves the cursor's tasks alone.
    let v: String = scalar(&mut c, &format!("SELECT v FROM s WHERE id = {elsewhere}"));
    assert_eq!(v.len(), 200);
    c.batch_execute("SAVEPOINT a").unwrap();
    let (code, ..) = expect_error(&mut c, "SELECT 1 / 0");
    assert_eq!(code, "22012");
    c.batch_execute("ROLLBACK TO SAVEPOINT a").unwrap();
    assert_eq!(active_tasks(&mut w), 1, "the cursor's task survives the subtransaction's abort");
    // The cursor's tasks would wait for this transaction's own lock: refused, as PostgreSQL
    // refuses it for a table an open cursor reads.
    c.batch_execute("SAVEPOINT b").unwrap();
    for statement in ["TRUNCATE s", "ALTER TABLE s ADD COLUMN w int"] {
        let (code, message, ..) = expect_error(&mut c, statement);
        assert_eq!(code, "55006", "{statement}: {message}");
        c.batch_execute("ROLLBACK TO SAVEPOINT b").unwrap();
    }
    // Closing the cursor stops the task that waits.
    c.batch_execute("CLOSE cur; COMMIT").unwrap();
    assert_eq!(active_tasks_after_a_while(&mut w), 0, "the closed cursor's task still runs");
    holder.batch_execute("ROLLBACK").unwrap();
    c.batch_execute("RESET sharding.max_connections_per_node").unwrap();

    // Read in pieces, with distributed statements in between: every row once.
    c.batch_execute("BEGIN; DECLARE cur CURSOR FOR SELECT id FROM s WHERE v LIKE 'x%'").unwrap();
    let mut seen: Vec<i32> = Vec::new();
    loop {
        let rows = c.query("FETCH 700 FROM cur", &[]).unwrap();
        if rows.is_empty() {
            break;
        }
        seen.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
        let n: i64 = scalar(&mut c, "SELECT count(*) FROM s");
        assert_eq!(n, 3000);
    }
    c.batch_execute("COMMIT").unwrap();
    seen.sort_unstable();
    assert_eq!(seen, (1..=3000).collect::<Vec<i32>>());

    // A cursor without SCROLL reads forward only; a SCROLL cursor also backward.
    c.batch_execute("BEGIN; DECLARE cur CURSOR FOR SELECT id FROM s; FETCH 5 FROM cur").unwrap();
    let (code, ..) = expect_error(&mut c, "FETCH BACKWARD 1 FROM cur");
    assert_eq!(code, "55000");
    c.batch_execute("ROLLBACK; BEGIN; DECLARE cur SCROLL CURSOR FOR SELECT id FROM s").unwrap();
    let forward: Vec<i32> = c.query("FETCH 5 FROM cur", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    let backward: Vec<i32> = c.query("FETCH BACKWARD 4 FROM cur", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(backward, forward[..4].iter().rev().copied().collect::<Vec<_>>());
    c.batch_execute("COMMIT").unwrap();

    // Two streamed scans in one plan (a join on the coordinator) share the backend's
    // connections per node: at most sharding.max_connections_per_node besides the session.
    c.batch_execute(
        "CREATE TABLE s2 (k int, id int); SELECT create_distributed_table('s2', 'k', colocate_with => 'none');
         INSERT INTO s2 SELECT g, g FROM generate_series(1, 3000) g;
         SET sharding.broadcast_join_limit = 0",
    )
    .unwrap();
    let pid: i32 = scalar(&mut c, "SELECT pg_backend_pid()");
    for _ in 0..3 {
        let n: i64 = scalar(&mut c, "SELECT count(*) FROM s JOIN s2 USING (id) WHERE s.v LIKE 'x%' AND s2.k > 0");
        assert_eq!(n, 3000);
    }
    for worker in 1..=2 {
        let mine: i64 =
            scalar(&mut cluster.worker(worker), &format!("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE '%:{pid}'"));
        assert!((1..=3).contains(&mine), "{mine} connections from one backend to worker {worker}");
    }
    c.batch_execute("RESET sharding.broadcast_join_limit").unwrap();

    // A read larger than work_mem: gathered, it spills to a temporary file; streamed, the
    // rows pass through.
    c.batch_execute("SET work_mem = '64kB'; SET sharding.stream_rows = off").unwrap();
    let before = temp_files(&mut c);
    assert_eq!(c.query("SELECT id, v FROM s", &[]).unwrap().len(), 3000);
    let gathered = temp_files(&mut c) - before;
    assert!(gathered >= 1, "the gathered rows spilled ({gathered} files)");
    c.batch_execute("RESET sharding.stream_rows").unwrap();
    let before = temp_files(&mut c);
    assert_eq!(c.query("SELECT id, v FROM s", &[]).unwrap().len(), 3000);
    assert_eq!(temp_files(&mut c) - before, 0, "streamed rows are not stored");

    // INSERT ... SELECT through the coordinator gathers the rows first when its SELECT reads
    // shards: past work_mem they spill, and the file is closed before the commit (PostgreSQL
    // warns "temporary file leak" at commit otherwise).
    let before = temp_files(&mut c);
    c.batch_execute("INSERT INTO s2 SELECT id, id FROM s WHERE id <= 3000").unwrap();
    assert!(temp_files(&mut c) - before >= 1, "the gathered rows spilled");
    let n: i64 = scalar(&mut c, "SELECT count(*) FROM s2");
    assert_eq!(n, 6000);
    c.batch_execute("RESET work_mem").unwrap();
    let log = cluster.log("coordinator");
    assert!(!log.contains("temporary file leak"), "a temporary file stayed open past the commit");
}

#[test]
fn row_level_security_applies_to_distributed_tables() {
    let cluster = Cluster::start(2);
    for worker in 1..=2 {
        cluster.worker(worker).batch_execute("CREATE ROLE alice LOGIN").unwrap();
    }
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE ROLE alice;
         CREATE TABLE docs (id int PRIMARY KEY, owner text, body text);
         SELECT create_distributed_table('docs', 'id');
         INSERT INTO docs SELECT g, CASE WHEN g % 2 = 0 THEN 'alice' ELSE 'bob' END, 'body ' || g FROM generate_series(1, 20) g;
         ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON docs USING (owner = current_user);
         GRANT SELECT, UPDATE ON docs TO alice;
         SET ROLE alice;",
    )
    .unwrap();
    let n: i64 = scalar(&mut c, "SELECT count(*) FROM docs");
    assert_eq!(n, 10, "alice sees her rows only");
    let n: i64 = scalar(&mut c, "SELECT count(*) FROM docs WHERE id = 3");
    assert_eq!(n, 0, "a router query does not bypass the policy");
    let (rows, _) = run(&mut c, "SELECT owner, count(*) FROM docs GROUP BY owner").unwrap();
    assert_eq!(rows, vec![vec![Some("alice".to_string()), Some("10".to_string())]]);
    let (code, ..) = expect_error(&mut c, "UPDATE docs SET body = 'x' WHERE id = 4");
    assert_eq!(code, "0A000");
    // A subquery over the table inside a general plan (joined to a local table) applies the
    // policy too, and a subquery pushed down to the shards still checks privileges here.
    c.batch_execute(
        "RESET ROLE;
         CREATE TABLE owners (name text); INSERT INTO owners VALUES ('alice'), ('bob'); GRANT SELECT ON owners TO alice;
         CREATE TABLE open_docs (id int PRIMARY KEY, owner text); SELECT create_distributed_table('open_docs', 'id');
         INSERT INTO open_docs SELECT g, 'bob' FROM generate_series(1, 5) g;
         SET ROLE alice;",
    )
    .unwrap();
    let (rows, _) = run(&mut c, "SELECT o.name, s.c FROM (SELECT owner, count(*) c FROM docs GROUP BY owner) s JOIN owners o ON o.name = s.owner").unwrap();
    assert_eq!(rows, vec![vec![Some("alice".to_string()), Some("10".to_string())]]);
    let (code, ..) = expect_error(&mut c, "SELECT o.name, s.c FROM (SELECT owner, count(*) c FROM open_docs GROUP BY owner) s JOIN owners o ON o.name = s.owner");
    assert_eq!(code, "42501");
    // Back to the session's own role: the workers see that role again too (the connections
    // opened for alice are replaced between transactions).
    c.batch_execute("RESET ROLE").unwrap();
    let (rows, _) = run(&mut c, "SELECT o.name, s.c FROM (SELECT owner, count(*) c FROM open_docs GROUP BY owner) s JOIN owners o ON o.name = s.owner").unwrap();
    assert_eq!(rows, vec![vec![Some("bob".to_string()), Some("5".to_string())]]);
    let n: i64 = scalar(&mut c, "SELECT count(*) FROM docs WHERE body = 'x'");
    assert_eq!(n, 0);
    // The role that runs on the workers follows SET ROLE between transactions: on each worker,
    // the connection of this session that ran the last task is of the role of its last
    // statement (an idle connection of an earlier role is replaced when next used).
    let pid: i32 = scalar(&mut c, "SELECT pg_backend_pid()");
    let worker_roles = |cluster: &Cluster| -> Vec<String> {
        let mut roles = Vec::new();
        for attempt in 0..50 {
            roles.clear();
            for worker in 1..=2 {
                let mut w = cluster.worker(worker);
                for row in w
                    .query(
                        "SELECT usename::text FROM pg_stat_activity WHERE application_name LIKE '%:' || $1::text
                         ORDER BY query_start DESC LIMIT 1",
                        &[&pid.to_string()],
                    )
                    .unwrap()
                {
                    roles.push(row.get::<_, String>(0));
                }
            }
            roles.sort();
            roles.dedup();
            // A replaced connection's backend may take a moment to exit.
            if roles.len() <= 1 || attempt == 49 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        roles
    };
    let count_all = "SELECT count(*) FROM docs";
    let _: i64 = scalar(&mut c, count_all);
    assert_eq!(worker_roles(&cluster), vec!["postgres".to_string()]);
    c.batch_execute("SET ROLE alice").unwrap();
    let n: i64 = scalar(&mut c, count_all);
    assert_eq!(n, 10);
    assert_eq!(worker_roles(&cluster), vec!["alice".to_string()]);
    c.batch_execute("RESET ROLE").unwrap();
    let n: i64 = scalar(&mut c, count_all);
    assert_eq!(n, 20);
    assert_eq!(worker_roles(&cluster), vec!["postgres".to_string()]);
    // Inside a transaction the node keeps the connection holding the transaction's work.
    c.batch_execute("BEGIN; UPDATE docs SET body = body WHERE id = 1; SET LOCAL ROLE alice").unwrap();
    let n: i64 = scalar(&mut c, count_all);
    assert_eq!(n, 10, "the coordinator still applies alice's policy");
    c.batch_execute("COMMIT").unwrap();

    // New rows pass the policy's check on the coordinator, as on one server (the shards have
    // no policies); COPY is refused, as PostgreSQL refuses COPY FROM under row-level security.
    c.batch_execute("GRANT INSERT ON docs TO alice; SET ROLE alice").unwrap();
    for sql in ["INSERT INTO docs VALUES (100, 'bob', 'x')", "INSERT INTO docs SELECT 101, 'bob', 'x'"] {
        assert_eq!(expect_error(&mut c, sql).0, "42501", "{sql}");
    }
    c.batch_execute("INSERT INTO docs VALUES (100, 'alice', 'mine')").unwrap();
    for sql in [
        "INSERT INTO docs VALUES (100, 'alice', 'x') ON CONFLICT (id) DO UPDATE SET owner = 'bob'",
        "COPY docs FROM STDIN",
        "COPY docs TO STDOUT",
    ] {
        assert_eq!(expect_error(&mut c, sql).0, "0A000", "{sql}");
    }
    c.batch_execute("RESET ROLE").unwrap();
    let owners: Vec<String> = c.query("SELECT owner FROM docs WHERE id >= 100", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(owners, vec!["alice".to_string()]);

    // A view's WITH CHECK OPTION holds for rows inserted through it.
    c.batch_execute("CREATE VIEW low_docs AS SELECT * FROM docs WHERE id < 1000 WITH CHECK OPTION").unwrap();
    for sql in ["INSERT INTO low_docs VALUES (1001, 'bob', 'x')", "INSERT INTO low_docs SELECT 1002, 'bob', 'x'"] {
        assert_eq!(expect_error(&mut c, sql).0, "44000", "{sql}");
    }
    let (code, ..) = expect_error(&mut c, "INSERT INTO low_docs VALUES (1003, 'bob', 'x') ON CONFLICT DO NOTHING");
    assert_eq!(code, "0A000");
    c.batch_execute("INSERT INTO low_docs VALUES (999, 'bob', 'x')").unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM docs WHERE id > 100"), 1);

    // MERGE from a source under row-level security merges the rows the policy lets through
    // (co-located with the target, and a local table; this crashed the coordinator).
    c.batch_execute(
        "CREATE TABLE merged (id int PRIMARY KEY, owner text);
         SELECT create_distributed_table('merged', 'id', colocate_with => 'docs');
         CREATE TABLE local_docs AS SELECT id + 2000 AS id, owner FROM docs WHERE id <= 20;
         ALTER TABLE local_docs ENABLE ROW LEVEL SECURITY;
         CREATE POLICY own ON local_docs USING (owner = current_user);
         GRANT SELECT ON local_docs TO alice; GRANT SELECT, INSERT, UPDATE ON merged TO alice;
         SET ROLE alice;
         MERGE INTO merged m USING docs d ON m.id = d.id WHEN NOT MATCHED THEN INSERT VALUES (d.id, d.owner);
         MERGE INTO merged m USING local_docs d ON m.id = d.id WHEN NOT MATCHED THEN INSERT VALUES (d.id, d.owner)
           WHEN MATCHED THEN UPDATE SET owner = 'again';
         RESET ROLE;",
    )
    .unwrap();
    let merged: Vec<(String, i64)> =
        c.query("SELECT owner, count(*) FROM merged GROUP BY owner", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(merged, vec![("alice".to_string(), 21)]);

    // A condition that can fail on a hidden row's value never sees that row (the shards get
    // it only after the policy's conditions, or not at all).
    c.batch_execute(
        "CREATE TABLE pay (id int PRIMARY KEY, team text, salary int);
         SELECT create_distributed_table('pay', 'id');
         INSERT INTO pay VALUES (1, 'red', 1000), (2, 'blue', 2000), (3, 'green', 31337), (4, 'red', 1500);
         ALTER TABLE pay ENABLE ROW LEVEL SECURITY;
         CREATE POLICY teams ON pay TO alice USING (lower(team) = 'red' OR lower(team) = 'blue');
         GRANT SELECT ON pay TO alice;
         SET ROLE alice;",
    )
    .unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM pay WHERE 1 / (salary - 31337) = 1"), 0);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM pay p JOIN pay q USING (id) WHERE 1 / (p.salary - 31337) = 1"), 0);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM pay WHERE salary > 1200"), 2);
    c.batch_execute("RESET ROLE").unwrap();
}

#[test]
fn transactions_read_their_own_writes_and_roll_back_everywhere() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE acc (id int PRIMARY KEY, balance int NOT NULL);
         SELECT create_distributed_table('acc', 'id');
         INSERT INTO acc SELECT g, 100 FROM generate_series(1, 50) g;",
    )
    .unwrap();
    let total = |c: &mut Client| -> i64 { scalar(c, "SELECT sum(balance) FROM acc") };

    // Reads inside the block see the block's writes, on every shard they touched.
    c.batch_execute("BEGIN; UPDATE acc SET balance = balance - 30 WHERE id = 1; UPDATE acc SET balance = balance + 30 WHERE id = 2").unwrap();
    let one: i32 = scalar(&mut c, "SELECT balance FROM acc WHERE id = 1");
    assert_eq!(one, 70);
    assert_eq!(total(&mut c), 5000);
    c.batch_execute("INSERT INTO acc VALUES (51, 1)").unwrap();
    assert_eq!(total(&mut c), 5001);
    let n: i64 = scalar(&mut c, "SELECT count(*) FROM acc WHERE balance <> 100");
    assert_eq!(n, 3);
    c.batch_execute("ROLLBACK").unwrap();
    assert_eq!(total(&mut c), 5000);
    let n: i64 = scalar(&mut c, "SELECT count(*) FROM acc WHERE balance <> 100");
    assert_eq!(n, 0, "the rollback reached every node");

    // Another session sees committed work only.
    let mut other = cluster.coordinator();
    c.batch_execute("BEGIN; UPDATE acc SET balance = 0 WHERE id <= 10").unwrap();
    assert_eq!(total(&mut other), 5000);
    c.batch_execute("COMMIT").unwrap();
    assert_eq!(total(&mut other), 4000);

    // A failed statement aborts the block; nothing of it stays.
    c.batch_execute("BEGIN; UPDATE acc SET balance = balance + 1").unwrap();
    let (code, ..) = expect_error(&mut c, "UPDATE acc SET balance = balance / 0 WHERE id = 20");
    assert_eq!(code, "22012");
    let (code, ..) = expect_error(&mut c, "SELECT count(*) FROM acc");
    assert_eq!(code, "25P02");
    c.batch_execute("ROLLBACK").unwrap();
    assert_eq!(total(&mut c), 4000);

    // An error caught by a PL/pgSQL exception block leaves the worker connections usable.
    for _ in 0..3 {
        c.batch_execute(
            "DO $$ BEGIN
               BEGIN PERFORM count(*) FROM acc WHERE 1 / (id - 25) > 0;
               EXCEPTION WHEN division_by_zero THEN NULL; END;
             END $$",
        )
        .unwrap();
        assert_eq!(total(&mut c), 4000);
    }

    // Prepared statements survive DDL on the table (their plans are rebuilt).
    let select = c.prepare("SELECT * FROM acc WHERE id = $1").unwrap();
    assert_eq!(c.query(&select, &[&5i32]).unwrap()[0].len(), 2);
    c.batch_execute("ALTER TABLE acc ADD COLUMN note text DEFAULT 'n'").unwrap();
    let rows = c.query(&select, &[&5i32]);
    match rows {
        // PostgreSQL itself refuses a cached plan whose result type changed.
        Err(e) => assert_eq!(e.code().map(|c| c.code().to_string()).unwrap_or_default(), "0A000", "{e}"),
        Ok(rows) => assert_eq!(rows[0].len(), 3),
    }
    let note: String = scalar(&mut c, "SELECT note FROM acc WHERE id = 5");
    assert_eq!(note, "n");
}

#[test]
fn rows_moved_by_a_writable_cte_into_another_table_move_whole_or_not_at_all() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE live (id int, owner int, amount int, PRIMARY KEY (owner, id));
         CREATE TABLE archive (id int PRIMARY KEY, owner int, amount int);
         SELECT create_distributed_table('live', 'owner');
         SELECT create_distributed_table('archive', 'id', colocate_with => 'none');
         INSERT INTO live SELECT g, g % 10, g FROM generate_series(1, 200) g;",
    )
    .unwrap();
    let count = |c: &mut Client, sql: &str| -> i64 { scalar(c, sql) };
    // The archive is distributed by another column: the moved rows spread over its shards.
    let moved = c
        .execute("WITH m AS (DELETE FROM live WHERE owner = 3 RETURNING *) INSERT INTO archive SELECT id, owner, amount FROM m", &[])
        .unwrap();
    assert_eq!(moved, 20);
    assert_eq!(count(&mut c, "SELECT count(*) FROM live WHERE owner = 3"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM archive WHERE owner = 3"), 20);
    let shards: i64 = count(&mut c, "SELECT count(DISTINCT sharding.shard_for_value('archive', id)) FROM archive");
    assert!(shards > 1, "the rows went to {shards} archive shard(s)");

    // One archived id already taken: the INSERT fails on its shard, and the DELETE already done
    // on the live shard is rolled back with it. No row is lost or doubled.
    c.batch_execute("INSERT INTO archive VALUES (194, -1, 0)").unwrap();
    let (code, ..) = expect_error(&mut c, "WITH m AS (DELETE FROM live WHERE owner = 4 RETURNING *) INSERT INTO archive SELECT id, owner, amount FROM m");
    assert_eq!(code, "23505");
    assert_eq!(count(&mut c, "SELECT count(*) FROM live WHERE owner = 4"), 20);
    assert_eq!(count(&mut c, "SELECT count(*) FROM archive WHERE owner = 4"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM live") + count(&mut c, "SELECT count(*) FROM archive WHERE owner >= 0"), 200);

    // Over many shards: the DELETE runs first, as a statement of its own, in the same
    // distributed transaction, and the taken id rolls it back on every shard.
    let (code, message, ..) =
        expect_error(&mut c, "WITH m AS (DELETE FROM live WHERE amount > 190 RETURNING *) INSERT INTO archive SELECT id, owner, amount FROM m");
    assert_eq!(code, "23505", "{message}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM live WHERE amount > 190"), 9);
    c.batch_execute("DELETE FROM archive WHERE id = 194").unwrap();
    let moved = c
        .execute("WITH m AS (DELETE FROM live WHERE amount > 190 RETURNING *) INSERT INTO archive SELECT id, owner, amount FROM m", &[])
        .unwrap();
    assert_eq!(moved, 9);
    assert_eq!(count(&mut c, "SELECT count(*) FROM live WHERE amount > 190"), 0);
    assert_eq!(count(&mut c, "SELECT count(*) FROM live") + count(&mut c, "SELECT count(*) FROM archive"), 200);
    // The rest of the statement must not see the WITH query's changes, which run first here:
    // a statement that also reads the changed table is refused before anything runs.
    let (code, message, ..) = expect_error(
        &mut c,
        "WITH m AS (DELETE FROM live WHERE amount > 100 RETURNING *) INSERT INTO archive SELECT m.id, m.owner, (SELECT count(*) FROM live) FROM m",
    );
    assert_eq!(code, "0A000", "{message}");
    assert!(message.contains("besides changing it"), "{message}");
    assert_eq!(count(&mut c, "SELECT count(*) FROM live WHERE amount > 100"), 81);
}

/// The rows of every copy of reference table `table` (shard tables in schema public), the
/// coordinator's first.
fn reference_copies(cluster: &Cluster, table: &str) -> Vec<Rows> {
    let mut c = cluster.coordinator();
    let mut copies = vec![run(&mut c, &format!("SELECT * FROM {table} ORDER BY 1")).unwrap().0];
    for placement in cluster.placements(table) {
        let mut worker = cluster.connect_port(placement.port);
        copies.push(run(&mut worker, &format!("SELECT * FROM {} ORDER BY 1", placement.shard_name)).unwrap().0);
    }
    copies
}

#[test]
fn reference_tables_change_row_by_row_when_the_workers_cannot_run_the_statement() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, region text);
         SELECT create_distributed_table('users', 'id');
         INSERT INTO users SELECT g, 'r' || g % 3 FROM generate_series(1, 60) g;
         CREATE TABLE tags (id int PRIMARY KEY, label text, hits int DEFAULT 0);
         SELECT create_reference_table('tags');
         INSERT INTO tags SELECT g, 'r' || g % 3 FROM generate_series(1, 20) g;
         CREATE TABLE keyless (id int, v float8);
         SELECT create_reference_table('keyless');
         INSERT INTO keyless VALUES (1, 0), (2, 0);",
    )
    .unwrap();

    // Volatile values: computed once, on the coordinator, and the same on every copy.
    let (rows, affected) = run(&mut c, "UPDATE tags SET hits = (random() * 1e6)::int WHERE id <= 15 RETURNING id, hits").unwrap();
    assert_eq!((rows.len(), affected), (15, 15));
    let copies = reference_copies(&cluster, "tags");
    assert_eq!(copies.len(), 3);
    assert!(copies.iter().all(|copy| *copy == copies[0]), "copies differ: {copies:?}");
    // Read from the distributed table; RETURNING reads it too.
    let (rows, _) = run(&mut c, "UPDATE tags t SET hits = u.id * 10 FROM users u WHERE u.id = t.id + 40 RETURNING t.id, t.hits, u.region").unwrap();
    assert_eq!(rows.len(), 20);
    assert!(rows.contains(&vec![Some("1".into()), Some("410".into()), Some("r2".into())]), "{rows:?}");
    let (_, affected) = run(&mut c, "DELETE FROM tags t WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.region = t.label AND u.id > 58)").unwrap();
    assert_eq!(affected, 7, "labels r1 (59 % 3 = 2, 60 % 3 = 0: r2 and r0 stay)");
    let copies = reference_copies(&cluster, "tags");
    assert!(copies.iter().all(|copy| *copy == copies[0]), "copies differ: {copies:?}");
    assert_eq!(copies[0].len(), 13);

    // Generic plans with parameters.
    c.batch_execute("SET plan_cache_mode = force_generic_plan; PREPARE p(int) AS UPDATE tags t SET hits = $1 FROM users u WHERE u.id = t.id AND u.id < $1")
        .unwrap();
    assert_eq!(run(&mut c, "EXECUTE p(5)").unwrap().1, 2, "ids 2 and 3 remain below 5");
    assert_eq!(run(&mut c, "EXECUTE p(100)").unwrap().1, 13);
    let copies = reference_copies(&cluster, "tags");
    assert!(copies.iter().all(|copy| *copy == copies[0]), "copies differ: {copies:?}");
    c.batch_execute("DEALLOCATE p; RESET plan_cache_mode").unwrap();

    // Without a key the workers' copies cannot find the rows: a clear error, nothing changed.
    let (code, message, hint, _) = expect_error(&mut c, "UPDATE keyless SET v = random()");
    assert_eq!(code, "0A000");
    assert!(message.contains("needs a primary key"), "{message}");
    assert!(hint.contains("primary key"), "{hint}");
    let (code, message, _, _) = expect_error(&mut c, "UPDATE tags SET id = id + 100 WHERE random() < 2");
    assert_eq!(code, "0A000");
    assert!(message.contains("cannot set its key column \"id\""), "{message}");
    let copies = reference_copies(&cluster, "keyless");
    assert!(copies.iter().all(|copy| copy.iter().all(|row| row[1].as_deref() == Some("0"))), "{copies:?}");

    // A copy that lost a row: the statement fails as a whole and changes no copy.
    let placement = cluster.placements("tags").remove(0);
    let mut worker = cluster.connect_port(placement.port);
    worker.batch_execute(&format!("DELETE FROM {} WHERE id = 2", placement.shard_name)).unwrap();
    let (code, message, _, _) = expect_error(&mut c, "UPDATE tags SET hits = -1 WHERE random() < 2");
    assert_eq!(code, "XX001");
    assert!(message.contains("copies of a reference table differ"), "{message}");
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM tags WHERE hits = -1"), 0);
    worker.batch_execute(&format!("INSERT INTO {} SELECT 2, 'r2', 100", placement.shard_name)).unwrap();
    c.batch_execute("UPDATE tags SET hits = 100 WHERE id = 2").unwrap();

    // A concurrent write of the same row waits on the coordinator's copy, then sees the
    // committed row (READ COMMITTED), as on a single server.
    let mut first = cluster.coordinator();
    first.batch_execute("BEGIN; UPDATE tags SET hits = 1000 WHERE id = 2 AND random() < 2").unwrap();
    let mut second = cluster.coordinator();
    let waiter = std::thread::spawn(move || {
        run(&mut second, "UPDATE tags t SET hits = t.hits + 1 FROM users u WHERE u.id = t.id AND t.id = 2 RETURNING t.hits").unwrap().0
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(!waiter.is_finished(), "the second write waits for the first");
    first.batch_execute("COMMIT").unwrap();
    assert_eq!(waiter.join().unwrap(), vec![vec![Some("1001".to_string())]]);
    let copies = reference_copies(&cluster, "tags");
    assert!(copies.iter().all(|copy| *copy == copies[0]), "copies differ: {copies:?}");
}

#[test]
fn merge_into_a_distributed_table_sends_each_source_row_to_its_shard() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE stock (id bigint PRIMARY KEY, item text NOT NULL, qty int NOT NULL, updated timestamptz DEFAULT now());
         SELECT create_distributed_table('stock', 'id');
         INSERT INTO stock (id, item, qty) SELECT g, 'item ' || g, 10 FROM generate_series(1, 100) g;
         CREATE TABLE delivery (id bigint, qty int);
         INSERT INTO delivery VALUES (1, 5), (2, -10), (150, 7), (NULL, 1);",
    )
    .unwrap();
    let rows = |c: &mut Client, sql: &str| -> Vec<String> {
        c.query(sql, &[]).unwrap().iter().map(|r| r.get::<_, String>(0)).collect()
    };

    // A delivery: matched rows change (or go), new ones are inserted on the shard of their id,
    // the NULL key matches nothing and its WHEN NOT MATCHED clause skips it.
    let merge = "MERGE INTO stock s USING delivery d ON s.id = d.id
                   WHEN MATCHED AND s.qty + d.qty <= 0 THEN DELETE
                   WHEN MATCHED THEN UPDATE SET qty = s.qty + d.qty
                   WHEN NOT MATCHED AND d.id IS NOT NULL THEN INSERT (id, item, qty) VALUES (d.id, 'new', d.qty)";
    assert_eq!(c.execute(merge, &[]).unwrap(), 3);
    assert_eq!(
        rows(&mut c, "SELECT id || ':' || qty FROM stock WHERE id IN (1, 2, 150) OR qty <> 10 ORDER BY id"),
        ["1:15", "150:7"]
    );
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM stock"), 100);
    // The new row is on the shard its id hashes to: a router query for it finds it.
    assert_eq!(task_count(&explain(&mut c, "SELECT * FROM stock WHERE id = 150")), [1]);
    assert_eq!(scalar::<String>(&mut c, "SELECT item FROM stock WHERE id = 150"), "new");
    // The column default (now()) is the coordinator's, the same for the whole transaction.
    c.batch_execute("BEGIN").unwrap();
    c.execute("MERGE INTO stock s USING (VALUES (151, 1)) d(id, qty) ON s.id = d.id WHEN NOT MATCHED THEN INSERT (id, item, qty) VALUES (d.id, 'x', d.qty)", &[])
        .unwrap();
    assert!(scalar::<bool>(&mut c, "SELECT updated = now() FROM stock WHERE id = 151"));
    c.batch_execute("ROLLBACK").unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM stock WHERE id = 151"), 0, "rolled back on its shard");

    // An upsert through a prepared statement under a generic plan: one task, on the shard
    // of the bound key.
    c.batch_execute("SET plan_cache_mode = force_generic_plan").unwrap();
    let upsert = c
        .prepare(
            "MERGE INTO stock s USING (SELECT $1::bigint AS id, $2::int AS qty) d ON s.id = d.id
               WHEN MATCHED THEN UPDATE SET qty = s.qty + d.qty
               WHEN NOT MATCHED THEN INSERT (id, item, qty) VALUES (d.id, 'upserted', d.qty)",
        )
        .unwrap();
    for _ in 0..3 {
        assert_eq!(c.execute(&upsert, &[&300i64, &2i32]).unwrap(), 1);
    }
    assert_eq!(scalar::<i32>(&mut c, "SELECT qty FROM stock WHERE id = 300"), 6);
    let plan = explain(&mut c, "ANALYZE MERGE INTO stock s USING (VALUES (3, 1)) d(id, qty) ON s.id = d.id WHEN MATCHED THEN UPDATE SET qty = 0");
    assert_eq!(task_count(&plan), [1], "{plan}");
    assert!(plan.contains("Intermediate Result"), "{plan}");
    c.batch_execute("RESET plan_cache_mode").unwrap();

    // As on one server: a target row matched twice fails (21000), and a NULL key that a
    // WHEN NOT MATCHED clause would insert fails as an INSERT of NULL into the distribution
    // column does (23502). Nothing of either statement stays.
    let before: i64 = scalar(&mut c, "SELECT sum(qty) FROM stock");
    let (code, message, ..) = expect_error(&mut c, "MERGE INTO stock s USING (VALUES (4, 1), (4, 2), (5, 1)) d(id, qty) ON s.id = d.id WHEN MATCHED THEN UPDATE SET qty = s.qty + d.qty");
    assert_eq!(code, "21000", "{message}");
    let (code, message, ..) = expect_error(&mut c, "MERGE INTO stock s USING delivery d ON s.id = d.id WHEN MATCHED THEN UPDATE SET qty = 0 WHEN NOT MATCHED THEN INSERT (id, item, qty) VALUES (d.id, 'n', d.qty)");
    assert_eq!(code, "23502", "{message}");
    assert_eq!(scalar::<i64>(&mut c, "SELECT sum(qty) FROM stock"), before);

    // What cannot run on the shards is refused with 0A000, naming the table.
    for sql in [
        "MERGE INTO stock s USING delivery d ON s.qty = d.qty WHEN MATCHED THEN DELETE",
        "MERGE INTO stock s USING delivery d ON s.id = d.id WHEN NOT MATCHED THEN INSERT (id, item, qty) VALUES (d.id + 1, 'n', 1)",
        "MERGE INTO stock s USING delivery d ON s.id = d.id WHEN MATCHED THEN UPDATE SET id = d.id",
    ] {
        let (code, message, ..) = expect_error(&mut c, sql);
        assert_eq!(code, "0A000", "{sql}: {message}");
        assert!(message.contains("\"stock\""), "{message}");
    }

    // A co-located source joined on the distribution column is read on the shards: no
    // intermediate result, each shard group merges its own rows.
    c.batch_execute(
        "CREATE TABLE stock_delta (id bigint, qty int);
         SELECT create_distributed_table('stock_delta', 'id', colocate_with => 'stock');
         INSERT INTO stock_delta VALUES (10, 1), (11, -10), (400, 4);",
    )
    .unwrap();
    let merge = "MERGE INTO stock s USING stock_delta d ON s.id = d.id
                   WHEN MATCHED AND s.qty + d.qty <= 0 THEN DELETE
                   WHEN MATCHED THEN UPDATE SET qty = s.qty + d.qty
                   WHEN NOT MATCHED THEN INSERT (id, item, qty) VALUES (d.id, 'delta', d.qty)";
    let plan = explain(&mut c, merge);
    assert!(!plan.contains("Intermediate Result") && plan.contains("USING public.stock_delta_"), "{plan}");
    let count: i64 = scalar(&mut c, "SELECT count(*) FROM stock");
    assert_eq!(c.execute(merge, &[]).unwrap(), 3);
    assert_eq!(rows(&mut c, "SELECT id || ':' || qty FROM stock WHERE id IN (10, 11, 400) ORDER BY id"), ["10:11", "400:4"]);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM stock"), count);
}

/// What reaches the coordinator's own placements besides queries: COPY in and out, errors with
/// their SQLSTATE, savepoints, a transaction that writes there and on a worker (two-phase on the
/// worker, the coordinator's part in its own commit), privileges, and the operations that are
/// refused (moves) or leave them alone (rebalancing), then undistribute.
#[test]
fn coordinator_placements_take_copy_transactions_and_privileges() {
    let cluster = Cluster::start(1);
    let mut c = cluster.coordinator();
    let port = i32::from(cluster.port);
    c.execute("SELECT sharding.add_node('127.0.0.1', $1)", &[&port]).unwrap();
    c.batch_execute(
        "CREATE TABLE kv (k int PRIMARY KEY, v text, n numeric);
         SELECT create_distributed_table('kv', 'k', shard_count => 4);",
    )
    .unwrap();
    let coordinator_node: i32 = scalar(&mut c, "SELECT node_id FROM sharding.nodes WHERE is_coordinator");
    let local_shards: i64 =
        scalar(&mut c, &format!("SELECT count(*) FROM sharding.dist_placement WHERE node_id = {coordinator_node}"));
    assert_eq!(local_shards, 2, "half of the shards are on the coordinator");

    // COPY in (text and CSV, non-ASCII text, NULLs) and out again, whole.
    let mut text = String::new();
    for k in 1..=500 {
        text.push_str(&format!("{k}\tvalue é {k}\t{}\n", if k % 7 == 0 { "\\N".to_string() } else { format!("{k}.5") }));
    }
    assert_eq!(pg_sharding_multinode::copy_in(&mut c, "COPY kv FROM STDIN", text.as_bytes()).unwrap(), 500);
    let csv = "501,\"with, comma\",1\n502,\"line\nbreak\",\n";
    assert_eq!(pg_sharding_multinode::copy_in(&mut c, "COPY kv FROM STDIN WITH (FORMAT csv)", csv.as_bytes()).unwrap(), 2);
    // The coordinator's shards are tables of its own database.
    let local_ids: Vec<i64> = c
        .query("SELECT shard_id FROM sharding.dist_placement WHERE node_id = $1", &[&coordinator_node])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let on_coordinator: i64 = local_ids.iter().map(|id| scalar::<i64>(&mut c, &format!("SELECT count(*) FROM public.kv_{id}"))).sum();
    assert!(on_coordinator > 100 && on_coordinator < 402, "rows stored in the coordinator's shards: {on_coordinator}");
    let out = String::from_utf8(pg_sharding_multinode::copy_out(&mut c, "COPY kv TO STDOUT").unwrap()).unwrap();
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    let mut expected: Vec<&str> = text.lines().collect();
    expected.sort();
    assert_eq!(lines.len(), 502, "every row comes out (text format escapes the line break)");
    assert!(expected.iter().all(|l| lines.contains(l)), "COPY TO returns what COPY FROM stored");
    let csv_out = String::from_utf8(pg_sharding_multinode::copy_out(&mut c, "COPY (SELECT v FROM kv WHERE k > 500 ORDER BY k) TO STDOUT WITH (FORMAT csv)").unwrap()).unwrap();
    assert_eq!(csv_out, "\"with, comma\"\n\"line\nbreak\"\n");

    // A local shard's error keeps its SQLSTATE; nothing of the statement stays.
    let (code, ..) = expect_error(&mut c, "INSERT INTO kv SELECT g, 'dup', 0 FROM generate_series(495, 510) g");
    assert_eq!(code, "23505");
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM kv"), 502);

    // Savepoints: a rolled-back subtransaction undoes local and remote writes alike.
    c.batch_execute(
        "BEGIN;
         UPDATE kv SET v = 'kept' WHERE k <= 10;
         SAVEPOINT s;
         UPDATE kv SET v = 'undone' WHERE k <= 100;
         DELETE FROM kv WHERE k > 400;
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO kv SELECT g, 'new', g FROM generate_series(1001, 1100) g;
         COMMIT;",
    )
    .unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM kv WHERE v = 'kept'"), 10);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM kv WHERE v = 'undone'"), 0);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM kv"), 602);
    // That transaction wrote on the worker and on the coordinator: the worker prepared, and
    // nothing is left in doubt anywhere.
    let mut w = cluster.worker(1);
    assert_eq!(scalar::<i64>(&mut w, "SELECT count(*) FROM pg_prepared_xacts"), 0);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM pg_prepared_xacts"), 0);
    let new_on_worker: i64 = scalar(&mut w, "SELECT count(*) FROM pg_class WHERE relname LIKE 'kv\\_%' AND relkind = 'r'");
    assert_eq!(new_on_worker, 2);
    // Rolled back whole.
    c.batch_execute("BEGIN; DELETE FROM kv; INSERT INTO kv VALUES (1, 'only', 1); ROLLBACK;").unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM kv"), 602);

    // The task for a key of a coordinator shard names the coordinator; prepared statements
    // under generic plans reach it too.
    let key_on_coordinator: i32 = scalar(
        &mut c,
        &format!("SELECT min(k) FROM generate_series(11, 100) k WHERE sharding.shard_for_value('kv', k) = ANY ('{{{}}}'::int8[])",
            local_ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")),
    );
    let plan = explain(&mut c, &format!("SELECT * FROM kv WHERE k = {key_on_coordinator}"));
    assert!(plan.contains(&format!("Task Node: 127.0.0.1:{port}")), "{plan}");
    c.batch_execute("SET plan_cache_mode = force_generic_plan; PREPARE get(int) AS SELECT v FROM kv WHERE k = $1").unwrap();
    for k in [key_on_coordinator, 2, 3, 4, 5] {
        let v: String = c.query_one(&format!("EXECUTE get({k})"), &[]).unwrap().get(0);
        assert_eq!(v, if k <= 10 { "kept".to_string() } else { format!("value é {k}") });
    }
    c.batch_execute("DEALLOCATE get; RESET plan_cache_mode").unwrap();

    // Privileges apply to the coordinator's shards as on a worker's.
    w.batch_execute("CREATE ROLE reader LOGIN").unwrap();
    c.batch_execute("CREATE ROLE reader LOGIN; GRANT SELECT ON kv TO reader; GRANT USAGE ON SCHEMA sharding TO reader").unwrap();
    c.batch_execute("SET ROLE reader").unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM kv"), 602);
    let (code, ..) = expect_error(&mut c, "INSERT INTO kv VALUES (5000, 'no', 0)");
    assert_eq!(code, "42501");
    c.batch_execute("RESET ROLE").unwrap();
    // (A client of its own: the error comes before COPY starts, which leaves this client's
    // connection out of step.)
    let mut r = cluster.coordinator();
    r.batch_execute("SET ROLE reader").unwrap();
    let copy = pg_sharding_multinode::copy_in(&mut r, "COPY kv FROM STDIN", b"5001\tno\t0\n");
    assert_eq!(copy.err().and_then(|e| e.code().map(|c| c.code().to_string())).as_deref(), Some("42501"));
    drop(r);

    // Moves of the coordinator's shards are refused; the rebalancer leaves them alone.
    let local_shard: i64 =
        scalar(&mut c, &format!("SELECT min(shard_id) FROM sharding.dist_placement WHERE node_id = {coordinator_node}"));
    let worker_node: i32 = scalar(&mut c, "SELECT node_id FROM sharding.nodes WHERE NOT is_coordinator");
    let (code, message, ..) = expect_error(&mut c, &format!("SELECT sharding.move_shard({local_shard}, {worker_node})"));
    assert_eq!(code, "0A000", "{message}");
    let (code, ..) = expect_error(&mut c, &format!("SELECT sharding.split_shard({local_shard}, ARRAY[0])"));
    assert_eq!(code, "0A000");
    let planned: i64 = scalar(
        &mut c,
        &format!("SELECT count(*) FROM sharding.rebalance_plan() WHERE from_node = {coordinator_node} OR to_node = {coordinator_node}"),
    );
    assert_eq!(planned, 0);

    // DDL reaches the coordinator's shards (a plain CREATE INDEX for CONCURRENTLY there).
    c.batch_execute("ALTER TABLE kv ADD COLUMN extra int DEFAULT 3").unwrap();
    c.batch_execute("CREATE INDEX CONCURRENTLY kv_v ON kv (v)").unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT sum(extra) FROM kv"), 3 * 602);
    let indexes: i64 = scalar(&mut c, "SELECT count(*) FROM pg_indexes WHERE indexname LIKE 'kv\\_v\\_%'");
    assert_eq!(indexes, 2, "the index on each of the coordinator's shards");

    // Back to a local table, with every row.
    c.batch_execute("SELECT undistribute_table('kv')").unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM ONLY kv"), 602);
    let leftovers: i64 = scalar(&mut c, "SELECT count(*) FROM pg_class WHERE relname ~ '^kv_[0-9]+$'");
    assert_eq!(leftovers, 0, "the coordinator's shards are dropped");
    let loopback: i64 = scalar(&mut c, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pg_sharding:%'");
    assert_eq!(loopback, 0);
}

/// The coordinator's statements on its own placements, named in its memory contexts (a kept
/// statement's context carries its text).
fn kept_statements(c: &mut Client, table: &str) -> i64 {
    let pattern = format!("{table}_[0-9]+");
    c.query_one("SELECT count(*) FROM pg_backend_memory_contexts WHERE name = 'CachedPlanSource' AND ident ~ $1", &[&pattern])
        .unwrap()
        .get(0)
}

#[test]
fn coordinator_keeps_its_placements_statements_prepared_and_replans_them_when_tables_change() {
    let cluster = Cluster::start(1);
    let mut c = cluster.coordinator();
    let port = i32::from(cluster.port);
    c.execute("SELECT sharding.add_node('127.0.0.1', $1)", &[&port]).unwrap();
    c.batch_execute(
        "CREATE TABLE kv (k int PRIMARY KEY, v text, n numeric);
         SELECT create_distributed_table('kv', 'k', shard_count => 4);
         INSERT INTO kv SELECT g, 'value ' || g, g + 0.5 FROM generate_series(1, 200) g;",
    )
    .unwrap();
    let coordinator_node: i32 = scalar(&mut c, "SELECT node_id FROM sharding.nodes WHERE is_coordinator");
    let key: i32 = scalar(
        &mut c,
        &format!(
            "SELECT min(k) FROM generate_series(1, 200) k WHERE sharding.shard_for_value('kv', k) IN
               (SELECT shard_id FROM sharding.dist_placement WHERE node_id = {coordinator_node})"
        ),
    );
    // Generic plans: the statement sent to the placement carries the key as $1, so it is the
    // same statement for every key of that shard.
    c.batch_execute("SET plan_cache_mode = force_generic_plan").unwrap();
    let get = "SELECT v, n FROM kv WHERE k = $1";
    assert_eq!(kept_statements(&mut c, "kv"), 0);
    for _ in 0..3 {
        let row = c.query_one(get, &[&key]).unwrap();
        assert_eq!(row.get::<_, String>(0), format!("value {key}"));
        assert_eq!(row.columns()[1].type_().name(), "numeric");
    }
    assert_eq!(kept_statements(&mut c, "kv"), 1, "kept the second time it ran, once");

    // A column's type changes under the kept statement: its text stays the same, its plan is
    // made again (a stale plan would read the rewritten table with the old column type).
    c.batch_execute("ALTER TABLE kv ALTER COLUMN n TYPE text").unwrap();
    for _ in 0..3 {
        let row = c.query_one(get, &[&key]).unwrap();
        assert_eq!(row.get::<_, String>(1), format!("{key}.5"));
    }
    // A write through a kept statement, then read back through one.
    let set = "UPDATE kv SET v = $2 WHERE k = $1";
    for round in 0..3 {
        let changed = c.execute(set, &[&key, &format!("round {round}")]).unwrap();
        assert_eq!(changed, 1);
        assert_eq!(c.query_one(get, &[&key]).unwrap().get::<_, String>(0), format!("round {round}"));
    }
    // Inside a transaction that rolls back, kept statements see and undo its writes.
    c.batch_execute("BEGIN").unwrap();
    c.execute(set, &[&key, &"in transaction"]).unwrap();
    assert_eq!(c.query_one(get, &[&key]).unwrap().get::<_, String>(0), "in transaction");
    c.batch_execute("ROLLBACK").unwrap();
    assert_eq!(c.query_one(get, &[&key]).unwrap().get::<_, String>(0), "round 2");

    // Dropped with the table; a table of the same name gets statements of its own.
    c.batch_execute(
        "DROP TABLE kv;
         CREATE TABLE kv (k int PRIMARY KEY, v text, n int);
         SELECT create_distributed_table('kv', 'k', shard_count => 4);
         INSERT INTO kv SELECT g, 'again ' || g, g FROM generate_series(1, 200) g;",
    )
    .unwrap();
    for _ in 0..2 {
        let key2: i32 = 1;
        let rows = c.query(get, &[&key2]).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<_, i32>(1), 1);
    }

    // At most 256 statements are kept: the least recently used ones are let go.
    for i in 0..300 {
        let sql = format!("SELECT v FROM kv WHERE k = $1 AND v <> 'not {i}'");
        for _ in 0..2 {
            assert_eq!(c.query(&sql, &[&key]).unwrap().len(), 1);
        }
    }
    let kept = kept_statements(&mut c, "kv");
    assert_eq!(kept, 256, "kept statements");
    let loopback: i64 = scalar(&mut c, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pg_sharding:%'");
    assert_eq!(loopback, 0);
}

#[test]
fn values_move_between_nodes_intact_under_any_output_settings_and_client_encoding() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    // ra and rb are not co-located: joins between them broadcast one side's rows, and
    // INSERT ... SELECT between them goes through the coordinator.
    c.batch_execute(
        "CREATE TABLE ra (id int PRIMARY KEY, f float8, r real, ts timestamptz, iv interval);
         CREATE TABLE rb (LIKE ra INCLUDING ALL);
         CREATE TABLE rc (LIKE ra INCLUDING ALL);
         CREATE TABLE la (LIKE ra INCLUDING ALL);
         SELECT create_distributed_table('ra', 'id');
         SELECT create_distributed_table('rb', 'id', colocate_with => 'none', shard_count => 3);
         SELECT create_distributed_table('rc', 'id', colocate_with => 'none', shard_count => 5);
         INSERT INTO la VALUES (1, 1/3.0, 1/3.0, '2024-01-01 00:00+00', '-1 day +02:03:04'),
                               (2, 0.1, 0.1, '2024-06-01 12:00+00', '1 year -2 mons'),
                               (3, 1.7976931348623157e308, 3.4e38, '0044-03-15 12:00+00 BC', '-3 hours');
         INSERT INTO ra SELECT * FROM la;
         INSERT INTO rb SELECT * FROM la;",
    )
    .unwrap();
    // Output settings under which the text of these values loses precision (floats), names a
    // time zone by an abbreviation another node reads differently ("IST"), or cannot be read
    // back at all (a BC date in the SQL style with a local-mean-time offset).
    for settings in [
        "SET extra_float_digits = 0; SET DateStyle = 'Postgres, MDY'; SET TimeZone = 'Asia/Kolkata'; SET IntervalStyle = 'sql_standard'",
        "SET extra_float_digits = -3; SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Pacific/Chatham'; SET IntervalStyle = 'iso_8601'",
    ] {
        c.batch_execute(&format!("RESET ALL; {settings}")).unwrap();
        for column in ["f", "r", "ts", "iv"] {
            let join = format!("SELECT count(*) FROM ra JOIN rb ON rb.{column} = ra.{column}");
            assert!(explain(&mut c, &join).contains("Broadcast:"), "{join}");
            assert_eq!(scalar::<i64>(&mut c, &join), 3, "{settings}: {join}");
        }
        c.batch_execute(
            "TRUNCATE rc;
             INSERT INTO rc SELECT * FROM ra;
             INSERT INTO rc SELECT * FROM ra ON CONFLICT (id) DO UPDATE SET f = excluded.f, ts = excluded.ts;
             UPDATE rb SET r = ra.r, iv = ra.iv FROM ra WHERE ra.ts = rb.ts;
             MERGE INTO rc USING rb ON rc.id = rb.id WHEN MATCHED THEN UPDATE SET r = rb.r;",
        )
        .unwrap();
        c.batch_execute("RESET ALL").unwrap();
        for table in ["rb", "rc"] {
            let same = format!("SELECT count(*) FROM {table} t JOIN la USING (id) WHERE (t.f, t.r, t.ts, t.iv) = (la.f, la.r, la.ts, la.iv)");
            assert_eq!(scalar::<i64>(&mut c, &same), 3, "{settings}: {table}");
        }
    }

    // A client in another encoding than the database's: text values come from the shards
    // and go to them (as parameters) in the database's encoding, and reach the client in its
    // own. (Only ASCII crosses this test's own connection, which expects UTF-8.)
    c.batch_execute(
        "RESET ALL;
         CREATE TABLE enc (id int PRIMARY KEY, t text);
         SELECT create_distributed_table('enc', 'id');
         INSERT INTO enc VALUES (1, 'Ünïcödé'), (2, 'plain');
         SET client_encoding = 'LATIN1';",
    )
    .unwrap();
    let word = "chr(220) || 'n' || chr(239) || 'c' || chr(246) || 'd' || chr(233)";
    let digest = |from: &str| format!("SELECT string_agg(md5(t) || ':' || length(t) || ':' || octet_length(t), ',' ORDER BY id) FROM {from}");
    let expected: String = scalar(&mut c, &digest(&format!("(VALUES (1, {word}), (2, 'plain')) v(id, t)")));
    assert!(expected.contains(":7:11,"), "{expected}");
    assert_eq!(scalar::<String>(&mut c, &digest("enc")), expected);
    assert!(scalar::<bool>(&mut c, &format!("SELECT t = {word} FROM enc WHERE id = 1")));
    c.batch_execute("PREPARE q(text) AS SELECT count(*) FROM enc WHERE t = $1; CREATE TABLE enc_copy AS SELECT * FROM enc").unwrap();
    for _ in 0..7 {
        assert_eq!(scalar::<i64>(&mut c, &format!("EXECUTE q({word})")), 1);
    }
    assert_eq!(scalar::<String>(&mut c, &digest("enc_copy")), expected);
}

#[test]
fn pins_follow_the_comparison_and_settings_reach_the_shards() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE bc (k char(5), v int);
         CREATE TABLE vc (k varchar, v int, b bytea);
         CREATE TABLE tt (k text, v int);
         CREATE SCHEMA l;
         CREATE TABLE l.bc (LIKE bc); CREATE TABLE l.vc (LIKE vc); CREATE TABLE l.tt (LIKE tt);
         SELECT create_distributed_table('bc', 'k');
         SELECT create_distributed_table('vc', 'k', colocate_with => 'none');
         SELECT create_distributed_table('tt', 'k', colocate_with => 'none');",
    )
    .unwrap();
    for schema in ["public", "l"] {
        c.batch_execute(&format!(
            "INSERT INTO {schema}.bc VALUES ('a', 1), ('a  ', 2), ('', 3), ('  ', 4), ('b', 5);
             INSERT INTO {schema}.vc VALUES ('a', 1, 'a'), ('a  ', 2, 'b'), ('', 3, '\\x00'), ('  ', 4, NULL), ('b', 5, 'c');
             INSERT INTO {schema}.tt SELECT 'abc' || g, g FROM generate_series(1, 20) g;"
        ))
        .unwrap();
    }
    let both = |c: &mut Client, sql: &str| {
        let distributed = run(c, &format!("SET search_path = public; {sql}")).unwrap();
        let local = run(c, &format!("SET search_path = l; {sql}")).unwrap();
        c.batch_execute("RESET search_path").unwrap();
        assert_eq!(distributed, local, "{sql}");
        assert!(!local.0.is_empty() || local.1 > 0, "{sql}");
    };
    // char(n) compares without trailing spaces: a varchar or text value pins the shard of its
    // value without them. A varchar column compared as char(n) pins nothing.
    for sql in [
        "SELECT * FROM bc WHERE k = 'a '::varchar ORDER BY v",
        "SELECT * FROM bc WHERE k = 'a '::text::bpchar ORDER BY v",
        "SELECT * FROM bc WHERE k = ' '::varchar ORDER BY v",
        "SELECT * FROM bc WHERE k IN ('a '::varchar, 'b  '::varchar) ORDER BY v",
        "SELECT * FROM vc WHERE k = 'a '::bpchar ORDER BY v",
        "SELECT * FROM vc WHERE k = ANY (ARRAY['a'::bpchar]) ORDER BY v",
        "SELECT * FROM vc WHERE k = 'a  ' ORDER BY v",
        // A COLLATE clause on the value: the value still pins.
        "SELECT * FROM tt WHERE k = 'abc1' COLLATE \"C\"",
        "SELECT * FROM tt WHERE k IN ('abc1' COLLATE \"C\", 'abc2') ORDER BY v",
        "SELECT * FROM tt WHERE k = 'abc1' COLLATE \"default\"",
    ] {
        both(&mut c, sql);
    }
    assert_eq!(task_count(&explain(&mut c, "SELECT * FROM bc WHERE k = 'a '::varchar")), [1]);
    assert_eq!(task_count(&explain(&mut c, "SELECT * FROM tt WHERE k IN ('abc1' COLLATE \"C\", 'abc2')")).iter().sum::<i64>(), 2);
    assert!(task_count(&explain(&mut c, "SELECT * FROM vc WHERE k = 'a '::bpchar"))[0] > 1);
    for sql in [
        "PREPARE p(varchar) AS SELECT count(*) FROM bc WHERE k = $1",
        "PREPARE q(text) AS SELECT v FROM tt WHERE k = $1 COLLATE \"C\"",
    ] {
        c.batch_execute(sql).unwrap();
    }
    for _ in 0..7 {
        assert_eq!(scalar::<i64>(&mut c, "EXECUTE p('a ')"), 2);
        assert_eq!(scalar::<i32>(&mut c, "EXECUTE q('abc4')"), 4);
    }
    // Writes pinned the same way change the same rows.
    both(&mut c, "UPDATE bc SET v = v + 10 WHERE k = 'a '::varchar RETURNING v");
    both(&mut c, "DELETE FROM tt WHERE k = 'abc3' COLLATE \"C\" RETURNING v");
    both(&mut c, "SELECT * FROM bc ORDER BY v");

    // Output settings that the shards' own casts to text follow; text search with the
    // session's default configuration, a built-in one (sent to the workers) or one of the
    // user's own (the workers lack it: evaluated here).
    c.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY, body text);
         SELECT create_distributed_table('docs', 'id');
         INSERT INTO docs VALUES (1, 'Die Häuser sind schön'), (2, 'the houses are running');
         CREATE TABLE l.docs AS SELECT * FROM docs;
         CREATE TEXT SEARCH CONFIGURATION mine (COPY = pg_catalog.simple);",
    )
    .unwrap();
    for sql in [
        "SET default_text_search_config = 'pg_catalog.german'; SELECT id, to_tsvector(body)::text FROM docs ORDER BY id",
        "SET default_text_search_config = 'public.mine'; SELECT id, to_tsvector(body)::text, to_tsvector(body) @@ to_tsquery('houses') FROM docs ORDER BY id",
        "SET bytea_output = 'escape'; SELECT k, b::text FROM vc WHERE b IS NOT NULL ORDER BY v",
        "SET quote_all_identifiers = on; SELECT v, quote_ident(k) FROM vc WHERE k <> '' ORDER BY v",
        "SET xmlbinary = 'hex'; SELECT v, xmlelement(name x, b)::text FROM vc WHERE b IS NOT NULL ORDER BY v",
    ] {
        both(&mut c, sql);
        c.batch_execute("RESET ALL").unwrap();
    }
}

#[test]
fn trigger_transition_tables_read_distributed_tables() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    // A statement trigger on a local table reads distributed rows through its transition
    // table (planned by PostgreSQL over ShardScans); changing distributed rows through it is
    // refused, and works through a temporary copy.
    c.batch_execute(
        "CREATE TABLE t1 (id int PRIMARY KEY, g int);
         INSERT INTO t1 SELECT i, i % 3 FROM generate_series(1, 20) i;
         SELECT create_distributed_table('t1', 'id', shard_count => 4);
         CREATE TABLE seen (n bigint);
         CREATE TABLE tl (a int);
         CREATE FUNCTION tlf() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO seen SELECT count(*) FROM t1 WHERE id IN (SELECT a FROM newt);
           INSERT INTO seen SELECT sum(g) FROM t1 WHERE EXISTS (SELECT 1 FROM newt WHERE newt.a = t1.id);
           IF current_setting('test.change', true) = 'direct' THEN
             DELETE FROM t1 WHERE id IN (SELECT a FROM newt);
           ELSE
             CREATE TEMP TABLE copied ON COMMIT DROP AS SELECT * FROM newt;
             DELETE FROM t1 WHERE id IN (SELECT a FROM copied);
           END IF;
           RETURN NULL;
         END $$;
         CREATE TRIGGER tlt AFTER INSERT ON tl REFERENCING NEW TABLE AS newt FOR EACH STATEMENT EXECUTE FUNCTION tlf();",
    )
    .unwrap();
    c.batch_execute("INSERT INTO tl VALUES (1), (2), (5), (99)").unwrap();
    let seen: Vec<i64> = c.query("SELECT n FROM seen", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(seen, vec![3, 1 + 2 + 2]);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM t1"), 17);
    c.batch_execute("SET test.change = 'direct'").unwrap();
    let (code, ..) = expect_error(&mut c, "INSERT INTO tl VALUES (3)");
    assert_eq!(code, "0A000");
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM t1"), 17);
}

#[test]
fn views_read_and_insert_with_their_owners_rights() {
    let cluster = Cluster::start(2);
    for port in [cluster.port, cluster.worker_port(1), cluster.worker_port(2)] {
        cluster.connect_port(port).batch_execute("CREATE ROLE app LOGIN; CREATE ROLE viewer LOGIN; GRANT CREATE ON SCHEMA public TO app").unwrap();
    }
    let as_role = |role: &str| {
        pg_sharding_multinode::Client::connect(&format!("host=127.0.0.1 port={} user={role} dbname=postgres", cluster.port), pg_sharding_multinode::NoTls)
            .unwrap()
    };
    // The viewer may use the views and one table of app's, never the views' tables themselves.
    let mut app = as_role("app");
    app.batch_execute(
        "CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance int);
         SELECT create_distributed_table('accounts', 'id', shard_count => 4);
         CREATE TABLE visits (id int, at int);
         SELECT create_distributed_table('visits', 'id', colocate_with => 'accounts');
         CREATE TABLE kinds (k int PRIMARY KEY, label text);
         SELECT create_reference_table('kinds');
         INSERT INTO accounts SELECT g, 'o' || g % 3, g * 10 FROM generate_series(1, 40) g;
         INSERT INTO visits SELECT g % 40 + 1, g FROM generate_series(1, 100) g;
         INSERT INTO kinds VALUES (0, 'zero'), (1, 'one'), (2, 'two');
         CREATE VIEW account_kinds AS SELECT a.id, a.balance, k.label FROM accounts a JOIN kinds k ON k.k = a.id % 3;
         CREATE VIEW account_visits AS SELECT a.id, count(*) AS visits FROM accounts a JOIN visits v ON v.id = a.id GROUP BY a.id;
         CREATE VIEW new_accounts AS SELECT id, owner, balance FROM accounts;
         GRANT SELECT ON account_kinds, account_visits, visits TO viewer;
         GRANT SELECT, INSERT ON new_accounts TO viewer;",
    )
    .unwrap();
    let mut viewer = as_role("viewer");
    assert_eq!(scalar::<i64>(&mut viewer, "SELECT count(*) FROM account_kinds"), 40);
    assert_eq!(scalar::<i64>(&mut viewer, "SELECT sum(balance) FROM account_kinds WHERE id = 7"), 70);
    assert_eq!(scalar::<String>(&mut viewer, "SELECT string_agg(label, ',' ORDER BY label) FROM (SELECT DISTINCT label FROM account_kinds) s"), "one,two,zero");
    assert_eq!(scalar::<i64>(&mut viewer, "SELECT sum(visits)::bigint FROM account_visits"), 100);
    let plan: Vec<String> = viewer.query("EXPLAIN SELECT * FROM account_kinds WHERE id = 7", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(plan.iter().any(|l| l.trim() == "Runs As: app") && plan.iter().any(|l| l.trim() == "Task Count: 1"), "{plan:?}");
    // The workers' own plans (VERBOSE, ANALYZE) are asked with the same rights.
    let plan: Vec<String> =
        viewer.query("EXPLAIN (ANALYZE, VERBOSE) SELECT * FROM account_kinds WHERE id = 7", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert!(plan.iter().any(|l| l.contains("Remote Plan")), "{plan:?}");
    // A view's tables with a table the viewer reads itself.
    assert_eq!(scalar::<i64>(&mut viewer, "SELECT count(*) FROM account_visits a JOIN visits v USING (id)"), 100);
    // Alternating with statements that run with the viewer's own rights, in and out of a
    // transaction block.
    for _ in 0..3 {
        assert_eq!(scalar::<i64>(&mut viewer, "SELECT count(*) FROM visits WHERE id = 5"), 3);
        assert_eq!(scalar::<i64>(&mut viewer, "SELECT count(*) FROM new_accounts WHERE id = 5"), 1);
    }
    // Alternating roles reuses the node sessions of each (no reconnecting per statement).
    let pid: i32 = scalar(&mut viewer, "SELECT pg_backend_pid()");
    let worker_sessions = || -> Vec<i32> {
        [cluster.worker_port(1), cluster.worker_port(2)]
            .iter()
            .flat_map(|port| {
                cluster
                    .connect_port(*port)
                    .query_one("SELECT coalesce(array_agg(pid ORDER BY pid), '{}') FROM pg_stat_activity WHERE application_name LIKE '%:' || $1::text", &[&pid.to_string()])
                    .unwrap()
                    .get::<_, Vec<i32>>(0)
            })
            .collect()
    };
    let alternate = |viewer: &mut Client| {
        for _ in 0..3 {
            assert_eq!(scalar::<i64>(viewer, "SELECT count(*) FROM account_kinds WHERE id = 5"), 1);
            assert_eq!(scalar::<i64>(viewer, "SELECT count(*) FROM visits WHERE id = 5"), 3);
            assert_eq!(scalar::<i64>(viewer, "SELECT count(*) FROM new_accounts WHERE id = 5"), 1);
        }
    };
    alternate(&mut viewer);
    let sessions = worker_sessions();
    assert!(sessions.len() >= 2, "{sessions:?}");
    alternate(&mut viewer);
    assert_eq!(worker_sessions(), sessions, "the same worker sessions serve both roles");
    viewer.batch_execute("BEGIN").unwrap();
    assert_eq!(scalar::<i64>(&mut viewer, "SELECT count(*) FROM new_accounts"), 40);
    assert_eq!(scalar::<i64>(&mut viewer, "SELECT count(*) FROM visits"), 100);
    viewer.batch_execute("COMMIT").unwrap();
    // Rows inserted through the view are written with its owner's rights, and read back in
    // the same transaction.
    viewer.batch_execute("INSERT INTO new_accounts VALUES (41, 'v', 1)").unwrap();
    viewer.batch_execute("INSERT INTO new_accounts SELECT g, 'v', 1 FROM generate_series(42, 50) g").unwrap();
    assert_eq!(viewer.execute("INSERT INTO new_accounts VALUES (50, 'again', 1), (52, 'v', 1) ON CONFLICT (id) DO NOTHING", &[]).unwrap(), 1);
    viewer.batch_execute("BEGIN; INSERT INTO new_accounts VALUES (51, 'v', 1)").unwrap();
    assert_eq!(scalar::<i64>(&mut viewer, "SELECT count(*) FROM new_accounts WHERE owner = 'v'"), 12);
    viewer.batch_execute("COMMIT").unwrap();
    assert_eq!(scalar::<i64>(&mut app, "SELECT count(*) FROM accounts"), 52);
    // A data-modifying WITH query through a view, on one shard.
    app.batch_execute("BEGIN").unwrap();
    assert_eq!(scalar::<i64>(&mut app, "WITH d AS (DELETE FROM new_accounts WHERE id = 52 RETURNING *) SELECT count(*) FROM d"), 1);
    app.batch_execute("ROLLBACK").unwrap();
    // A cursor a SECURITY DEFINER function opens reads with its owner's rights when fetched.
    app.batch_execute(
        "CREATE FUNCTION open_accounts() RETURNS refcursor LANGUAGE plpgsql SECURITY DEFINER AS $$
           DECLARE c refcursor := 'accounts_cursor';
           BEGIN OPEN c FOR SELECT id FROM accounts; RETURN c; END $$;
         GRANT EXECUTE ON FUNCTION open_accounts() TO viewer;",
    )
    .unwrap();
    viewer.batch_execute("BEGIN; SELECT open_accounts()").unwrap();
    assert_eq!(viewer.query("FETCH ALL FROM accounts_cursor", &[]).unwrap().len(), 52);
    viewer.batch_execute("COMMIT").unwrap();

    // The tables themselves stay closed to the viewer (refused by the coordinator).
    for sql in ["SELECT count(*) FROM accounts", "INSERT INTO accounts VALUES (99, 'x', 0)", "SELECT count(*) FROM kinds"] {
        let (code, _, _, detail) = expect_error(&mut viewer, sql);
        assert_eq!(code, "42501", "{sql}");
        assert!(!detail.contains("on node"), "{sql}: refused by a node, not the coordinator");
    }
}

#[test]
fn the_plan_placeholder_never_runs_what_a_user_passes_it() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE secrets (id int PRIMARY KEY, v text);
         SELECT create_distributed_table('secrets', 'id', shard_count => 4);
         INSERT INTO secrets SELECT g, 'secret ' || g FROM generate_series(1, 10) g;
         CREATE ROLE mallory LOGIN;",
    )
    .unwrap();
    for port in [cluster.worker_port(1), cluster.worker_port(2)] {
        cluster.connect_port(port).batch_execute("CREATE ROLE mallory LOGIN").unwrap();
    }
    let relid: u32 = scalar::<u32>(&mut c, "SELECT 'secrets'::regclass::oid");
    // A split aggregation's plans carry sharding.task_results calls; one written by a user
    // (here asking for every row, as a superuser) stays a call of the placeholder.
    let plan = format!(
        r#"{{"pieces":[[null,"SELECT v FROM "],[0,""]],"relations":[{relid}],"anchor":{relid},"prune":[],"params_used":[],"max_param":0,"binary":false,"modify":false,"at_least_one":false,"reference_write":false,"hoisted":[],"prune_nodes":[],"run_as":10}}"#
    );
    let mut mallory =
        pg_sharding_multinode::Client::connect(&format!("host=127.0.0.1 port={} user=mallory dbname=postgres", cluster.port), pg_sharding_multinode::NoTls).unwrap();
    for client in [&mut mallory, &mut c] {
        let sql = format!("SELECT * FROM sharding.task_results('{plan}') AS t(v text)");
        let (code, message, ..) = expect_error(client, &sql);
        assert_eq!(code, "0A000", "{message}");
        assert!(message.contains("placeholder"), "{message}");
        // Also inlined from a SQL function, and in a subquery.
        let (code, ..) = expect_error(client, &format!("SELECT count(*) FROM ({sql}) s"));
        assert_eq!(code, "0A000");
    }
    c.batch_execute(&format!(
        "CREATE FUNCTION leak() RETURNS SETOF text LANGUAGE sql AS $f$ SELECT v FROM sharding.task_results('{plan}') AS t(v text) $f$;
         CREATE FUNCTION pass(text) RETURNS SETOF text LANGUAGE sql AS $f$ SELECT v FROM sharding.task_results($1) AS t(v text) $f$;
         GRANT EXECUTE ON FUNCTION leak(), pass(text) TO mallory;"
    ))
    .unwrap();
    // Calls whose argument is not a constant (this crashed the server).
    for sql in ["SELECT * FROM leak()", "SELECT * FROM pass('00112233445566778899aabbccddeeff')", "SELECT * FROM sharding.task_results(current_user::text) AS t(v text)"] {
        let (code, ..) = expect_error(&mut mallory, sql);
        assert_eq!(code, "0A000", "{sql}");
    }
    mallory.batch_execute("PREPARE p(text) AS SELECT * FROM sharding.task_results($1) AS t(v text)").unwrap();
    let (code, ..) = expect_error(&mut mallory, "EXECUTE p('00112233445566778899aabbccddeeff')");
    assert_eq!(code, "0A000");
    // The split aggregations themselves work as before.
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(DISTINCT v) FROM secrets"), 10);
    assert_eq!(scalar::<String>(&mut c, "SELECT max(v) FROM (SELECT v, count(*) FROM secrets GROUP BY v) s"), "secret 9");
}
