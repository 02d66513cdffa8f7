//! Shard operations: move_shard (block_writes) with its co-located group, under a concurrent
//! write workload; drain_node before remove_node; errors that change nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use pg_sharding_multinode::{expect_error, scalar, shards_per_node, Client, Cluster};

fn placements(c: &mut Client) -> Vec<(i64, i32)> {
    c.query("SELECT shard_id, node_id FROM sharding.dist_placement ORDER BY shard_id", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Row count and a checksum over every column (named: with a whole row, the checksum would be
/// computed on the coordinator over every row).
fn checksum(c: &mut Client, table: &str) -> (i64, i64) {
    let columns = if table == "users" { "id || ':' || name" } else { "user_id || ':' || n || ':' || amount" };
    let row = c
        .query_one(&format!("SELECT count(*), coalesce(sum(hashtext({columns})), 0)::int8 FROM {table}"), &[])
        .unwrap();
    (row.get(0), row.get(1))
}

/// users (`rows` rows, `shards` shards) and orders (3 per user) co-located with it.
fn users_and_orders(c: &mut Client, shards: i32, rows: i32) {
    c.batch_execute(&format!(
        "CREATE TABLE users (id int PRIMARY KEY, name text);
         CREATE TABLE orders (user_id int NOT NULL, n int NOT NULL, amount numeric, PRIMARY KEY (user_id, n));
         SELECT create_distributed_table('users', 'id', shard_count => {shards});
         SELECT create_distributed_table('orders', 'user_id', colocate_with => 'users');
         INSERT INTO users SELECT g, 'user ' || g FROM generate_series(1, {rows}) g;
         INSERT INTO orders SELECT g % {rows} + 1, g, g / 7.0 FROM generate_series(1, {}) g;",
        3 * rows
    ))
    .unwrap();
}

#[test]
fn move_shard_moves_the_colocated_group_while_writes_wait() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    users_and_orders(&mut c, 4, 2000);
    let node = |c: &mut Client, w: usize| -> i32 {
        scalar(c, &format!("SELECT node_id FROM sharding.dist_node WHERE port = {}", cluster.worker_port(w)))
    };
    let (w1, w2) = (node(&mut c, 1), node(&mut c, 2));
    let shard: i64 = scalar(
        &mut c,
        &format!("SELECT min(shard_id) FROM sharding.shards WHERE table_name = 'users'::regclass AND node_id = {w1}"),
    );
    let index: i32 = scalar(&mut c, &format!("SELECT shard_index FROM sharding.dist_shard WHERE shard_id = {shard}"));
    let before = placements(&mut c);
    let (users_before, orders_before) = (checksum(&mut c, "users"), checksum(&mut c, "orders"));

    // Errors change nothing.
    for (sql, code) in [
        (format!("SELECT sharding.move_shard({shard}, {w1}, 'block_writes')"), "22023"),
        (format!("SELECT sharding.move_shard({shard}, {w2}, 'sideways')"), "22023"),
        (format!("SELECT sharding.move_shard(999999, {w2}, 'block_writes')"), "42704"),
        (format!("SELECT sharding.move_shard({shard}, 999, 'block_writes')"), "42704"),
        (format!("SELECT sharding.move_shard(NULL, {w2}, 'block_writes')"), "22004"),
    ] {
        let (got, message, ..) = expect_error(&mut c, &sql);
        assert_eq!(got, code, "{sql}: {message}");
    }
    c.batch_execute("CREATE ROLE mover LOGIN; SET ROLE mover").unwrap();
    let (code, ..) = expect_error(&mut c, &format!("SELECT sharding.move_shard({shard}, {w2}, 'block_writes')"));
    assert_eq!(code, "42501");
    c.batch_execute("RESET ROLE").unwrap();
    assert_eq!(placements(&mut c), before);

    // A writer keeps inserting through the move: its inserts wait, none fails or is lost.
    let stop = Arc::new(AtomicBool::new(false));
    let inserted = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, inserted) = (stop.clone(), inserted.clone());
        let mut w = cluster.coordinator();
        thread::spawn(move || {
            let mut id = 100_000;
            while !stop.load(Ordering::SeqCst) {
                w.batch_execute(&format!("INSERT INTO users VALUES ({id}, 'late')")).expect("an insert during the move failed");
                inserted.fetch_add(1, Ordering::SeqCst);
                id += 1;
            }
        })
    };
    thread::sleep(Duration::from_millis(200));
    c.batch_execute(&format!("SELECT sharding.move_shard({shard}, {w2}, 'block_writes')")).unwrap();
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();

    // The whole group moved; nothing else did.
    let moved: Vec<i64> = c
        .query(&format!("SELECT shard_id FROM sharding.dist_shard WHERE shard_index = {index} ORDER BY 1"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(moved.len(), 2, "users and orders shards of the group");
    for (shard_id, node_id) in placements(&mut c) {
        let expected = if moved.contains(&shard_id) { w2 } else { before.iter().find(|(s, _)| *s == shard_id).unwrap().1 };
        assert_eq!(node_id, expected, "shard {shard_id}");
    }
    // Every row is there once: the new ones too.
    let late = inserted.load(Ordering::SeqCst) as i64;
    assert!(late > 0);
    let (users_after, _) = checksum(&mut c, "users");
    assert_eq!(users_after, users_before.0 + late);
    let old_rows: i64 = scalar(&mut c, "SELECT count(*) FROM users WHERE id <= 2000");
    assert_eq!(old_rows, 2000);
    let old_sum: i64 = scalar(&mut c, "SELECT coalesce(sum(hashtext(id || ':' || name)), 0)::int8 FROM users WHERE id <= 2000");
    assert_eq!(old_sum, users_before.1);
    assert_eq!(checksum(&mut c, "orders"), orders_before);
    // The old shard tables are dropped later (a query may still read them), then they are gone.
    let cleaned: i64 = scalar(&mut c, "SELECT sharding.cleanup_old_placements()");
    assert_eq!(cleaned, 2, "the users and orders shards of the old placement");
    // The shard tables left the source and exist on the target, with their constraints.
    let on = |cluster: &Cluster, w: usize, shard: i64| -> i64 {
        scalar(&mut cluster.worker(w), &format!("SELECT count(*) FROM pg_class WHERE relname = 'users_{shard}'"))
    };
    assert_eq!((on(&cluster, 1, shard), on(&cluster, 2, shard)), (0, 1));
    let id_in_shard: i32 = scalar(
        &mut c,
        &format!("SELECT min(id) FROM users WHERE id <= 2000 AND sharding.shard_for_value('users', id) = {shard}"),
    );
    let (code, ..) = expect_error(&mut c, &format!("INSERT INTO users VALUES ({id_in_shard}, 'dup')"));
    assert_eq!(code, "23505", "the primary key came along");
    let joined: i64 = scalar(&mut c, "SELECT count(*) FROM users u JOIN orders o ON o.user_id = u.id");
    assert_eq!(joined, 6000, "co-located joins still find every pair");
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM sharding.dist_transaction") > 0, true, "committed with 2PC");

    // Draining worker 1 moves everything to worker 2; then it can be removed.
    let groups: i64 = scalar(&mut c, &format!("SELECT sharding.drain_node('127.0.0.1', {})", cluster.worker_port(1)));
    assert_eq!(groups, 1, "one group was left on worker 1");
    let left: i64 = scalar(&mut c, &format!("SELECT count(*) FROM sharding.dist_placement WHERE node_id = {w1}"));
    assert_eq!(left, 0);
    c.batch_execute(&format!("SELECT sharding.remove_node('127.0.0.1', {})", cluster.worker_port(1))).unwrap();
    assert_eq!(checksum(&mut c, "orders"), orders_before);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM users"), users_before.0 + late);
    let (code, ..) = expect_error(&mut c, &format!("SELECT sharding.drain_node('127.0.0.1', {})", cluster.worker_port(2)));
    assert_eq!(code, "55000", "no other node to drain to");
}

#[test]
fn rebalance_spreads_shard_groups_over_a_new_node() {
    let cluster = Cluster::start(3);
    let mut c = cluster.coordinator();
    users_and_orders(&mut c, 9, 3000);
    let (users_before, orders_before) = (checksum(&mut c, "users"), checksum(&mut c, "orders"));
    // Worker 3 empty, as if it had just been added.
    let drained: i64 = scalar(&mut c, &format!("SELECT sharding.drain_node('127.0.0.1', {})", cluster.worker_port(3)));
    assert_eq!(drained, 3);
    let per_node = |c: &mut Client| shards_per_node(c, "users");
    let before = per_node(&mut c);
    assert_eq!(before.iter().sum::<i64>(), 9);
    assert!(before.contains(&0), "{before:?}");
    // table_distribution shows the skew.
    let distribution = |c: &mut Client| -> (Vec<i64>, i64, f64) {
        let rows = c.query("SELECT shard_count, rows, rows_cv FROM sharding.table_distribution('users') ORDER BY node_id", &[]).unwrap();
        let counts = rows.iter().map(|r| r.get::<_, i64>(0)).collect();
        let total = rows.iter().map(|r| r.get::<_, i64>(1)).sum();
        (counts, total, rows[0].get::<_, Option<f64>>(2).unwrap_or(-1.0))
    };
    let (counts, total, cv) = distribution(&mut c);
    assert_eq!(counts, before);
    assert_eq!(total, 3000, "rows per node add up to the table");
    assert!(cv > 0.5, "one empty node out of three: cv {cv}");

    let (code, ..) = expect_error(&mut c, "SELECT * FROM rebalance_shards(strategy => 'random')");
    assert_eq!(code, "22023");
    c.batch_execute("CREATE ROLE balancer LOGIN; SET ROLE balancer").unwrap();
    let (code, ..) = expect_error(&mut c, "SELECT * FROM rebalance_shards()");
    assert_eq!(code, "42501");
    c.batch_execute("RESET ROLE").unwrap();

    // The plan, and a dry run, change nothing.
    let plan: Vec<(i64, i32)> = c
        .query("SELECT shard_id, to_node FROM sharding.rebalance_plan()", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let dry: Vec<(i64, i32)> = c
        .query("SELECT shard_id, to_node FROM rebalance_shards(dry_run => true)", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(plan, dry);
    assert_eq!(plan.len(), 3, "{plan:?}");
    assert_eq!(per_node(&mut c), before);

    let moved: i64 = scalar(&mut c, "SELECT count(*) FROM rebalance_shards()");
    assert_eq!(moved, 3);
    let after = per_node(&mut c);
    assert_eq!(after, vec![3, 3, 3], "shard counts per node differ by at most one");
    let (counts, total, cv) = distribution(&mut c);
    assert_eq!((counts, total), (vec![3, 3, 3], 3000));
    assert!((0.0..0.2).contains(&cv), "rows now spread evenly: cv {cv}");
    let colocated_apart: i64 = scalar(
        &mut c,
        "SELECT count(*) FROM sharding.shards u JOIN sharding.shards o
            ON o.shard_index = u.shard_index AND o.table_name = 'orders'::regclass
         WHERE u.table_name = 'users'::regclass AND o.node_id <> u.node_id",
    );
    assert_eq!(colocated_apart, 0, "co-located shards moved together");
    assert_eq!(checksum(&mut c, "users"), users_before);
    assert_eq!(checksum(&mut c, "orders"), orders_before);
    let again: i64 = scalar(&mut c, "SELECT count(*) FROM rebalance_shards()");
    assert_eq!(again, 0, "a balanced cluster needs no moves");
}

#[test]
fn a_move_interrupted_by_a_dead_target_leaves_the_old_placement_serving() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY, name text);
         SELECT create_distributed_table('users', 'id', shard_count => 4);
         INSERT INTO users SELECT g, 'user ' || g FROM generate_series(1, 2000) g;",
    )
    .unwrap();
    let node = |c: &mut Client, w: usize| -> i32 {
        scalar(c, &format!("SELECT node_id FROM sharding.dist_node WHERE port = {}", cluster.worker_port(w)))
    };
    let w2 = node(&mut c, 2);
    let shard: i64 = scalar(
        &mut c,
        &format!("SELECT min(shard_id) FROM sharding.shards WHERE table_name = 'users'::regclass AND node_id <> {w2}"),
    );
    let before = placements(&mut c);
    let sums = checksum(&mut c, "users");
    // The move pauses before its two-phase commit; the target dies meanwhile.
    let mut mover = cluster.coordinator();
    mover.batch_execute("SET sharding.fault_injection = 'before_prepare:pause:1000'").unwrap();
    let pid: i32 = scalar(&mut mover, "SELECT pg_backend_pid()");
    let handle = thread::spawn(move || mover.batch_execute(&format!("SELECT sharding.move_shard({shard}, {w2}, 'block_writes')")));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while scalar::<i64>(&mut c, &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND wait_event = 'PgSleep'")) == 0 {
        assert!(std::time::Instant::now() < deadline, "the move never reached its commit");
        thread::sleep(Duration::from_millis(10));
    }
    cluster.kill_worker(2);
    assert!(handle.join().unwrap().is_err(), "the move fails");
    cluster.start_worker(2);
    c.batch_execute("SELECT sharding.recover_prepared_transactions()").unwrap();
    assert_eq!(placements(&mut c), before, "the catalog still names the old placement");
    assert_eq!(checksum(&mut c, "users"), sums, "every row is served from the old placement");
    let leftovers: i64 =
        scalar(&mut cluster.worker(2), &format!("SELECT count(*) FROM pg_class WHERE relname = 'users_{shard}'"));
    assert_eq!(leftovers, 0, "nothing half-copied is left on the target");
    // And a retry finishes the job.
    c.batch_execute(&format!("SELECT sharding.move_shard({shard}, {w2}, 'block_writes')")).unwrap();
    assert_eq!(checksum(&mut c, "users"), sums);
    let now_on: i32 = scalar(&mut c, &format!("SELECT node_id FROM sharding.dist_placement WHERE shard_id = {shard}"));
    assert_eq!(now_on, w2);
}

#[test]
fn hot_shards_names_the_oversized_shard_with_a_split_point() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE events (tenant int NOT NULL, n int NOT NULL, payload text);
         SELECT create_distributed_table('events', 'tenant', shard_count => 4);
         INSERT INTO events SELECT g % 40, g, repeat('x', 100) FROM generate_series(1, 400) g;
         INSERT INTO events SELECT 7, g, repeat('y', 100) FROM generate_series(1, 20000) g;",
    )
    .unwrap();
    let hot_shard: i64 = scalar(&mut c, "SELECT sharding.shard_for_value('events', 7)");
    let rows = c.query("SELECT shard_id, node_id, ratio_to_mean, split_point, suggested_node FROM sharding.hot_shards()", &[]).unwrap();
    assert_eq!(rows.len(), 1, "one shard is hot");
    let (shard, node, ratio, split, suggested): (i64, i32, f64, Option<i32>, Option<i32>) =
        (rows[0].get(0), rows[0].get(1), rows[0].get(2), rows[0].get(3), rows[0].get(4));
    assert_eq!(shard, hot_shard);
    assert!(ratio > 2.0, "{ratio}");
    let hash_of_7: i32 = scalar(&mut c, "SELECT sharding.hash_value(7)");
    assert_eq!(split, Some(hash_of_7), "most rows have tenant 7: the median hash is its hash");
    assert!(suggested.is_some_and(|n| n != node));
    let none: i64 = scalar(&mut c, "SELECT count(*) FROM sharding.hot_shards(100.0)");
    assert_eq!(none, 0);
    let (code, ..) = expect_error(&mut c, "SELECT * FROM sharding.hot_shards(0)");
    assert_eq!(code, "22023");
}

#[test]
fn online_move_keeps_writes_flowing_and_loses_nothing() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);
         CREATE TABLE notes (id int NOT NULL, k int NOT NULL, body text, PRIMARY KEY (id, k));
         CREATE TABLE bare (id int, v int);
         SELECT create_distributed_table('items', 'id', shard_count => 4);
         SELECT create_distributed_table('notes', 'id', colocate_with => 'items');
         SELECT create_distributed_table('bare', 'id', colocate_with => 'items');
         INSERT INTO items SELECT g, 0 FROM generate_series(1, 20000) g;
         INSERT INTO notes SELECT g, 1, 'n' FROM generate_series(1, 20000) g;",
    )
    .unwrap();
    let shard: i64 = scalar(&mut c, "SELECT sharding.shard_for_value('items', 1)");
    let from: i32 = scalar(&mut c, &format!("SELECT node_id FROM sharding.dist_placement WHERE shard_id = {shard}"));
    let to: i32 = scalar(&mut c, &format!("SELECT min(node_id) FROM sharding.dist_node WHERE node_id <> {from}"));
    // A table without a primary key in the group: online is refused, nothing changes.
    let (code, message, hint, _) = expect_error(&mut c, &format!("SELECT sharding.move_shard({shard}, {to})"));
    assert_eq!(code, "55000", "{message}");
    assert!(message.contains("bare") && hint.contains("block_writes"), "{message} / {hint}");
    c.batch_execute("DROP TABLE bare").unwrap();

    // Writers insert and update all along; every operation must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let spawn_writer = |kind: u32| {
        let stop = stop.clone();
        let mut w = cluster.coordinator();
        thread::spawn(move || -> (u64, u64, Duration) {
            let (mut ok, mut failed, mut slowest) = (0u64, 0u64, Duration::ZERO);
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let sql = if kind == 0 {
                    format!("INSERT INTO items VALUES ({}, 1)", 1_000_000 + n)
                } else {
                    format!("UPDATE items SET v = v + 1 WHERE id = {}", n * 7919 % 20000 + 1)
                };
                let started = std::time::Instant::now();
                match w.batch_execute(&sql) {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        eprintln!("writer {kind}: {e}");
                        failed += 1;
                    }
                }
                slowest = slowest.max(started.elapsed());
            }
            (ok, failed, slowest)
        })
    };
    let writers = vec![spawn_writer(0), spawn_writer(1)];
    thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    c.batch_execute(&format!("SELECT sharding.move_shard({shard}, {to})")).unwrap();
    let took = started.elapsed();
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let results: Vec<(u64, u64, Duration)> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    let (inserted, updated) = (results[0].0 as i64, results[1].0 as i64);
    let failed: u64 = results.iter().map(|r| r.1).sum();
    let stall = results.iter().map(|r| r.2).max().unwrap();
    println!("online move: {took:?}, writes ok {inserted} inserts + {updated} updates, failed {failed}, longest write {stall:?}");
    assert_eq!(failed, 0, "no write failed during the online move");

    let now_on: i32 = scalar(&mut c, &format!("SELECT node_id FROM sharding.dist_placement WHERE shard_id = {shard}"));
    assert_eq!(now_on, to);
    let notes_on: i64 = scalar(
        &mut c,
        &format!(
            "SELECT count(*) FROM sharding.shards WHERE table_name = 'notes'::regclass AND node_id = {to}
                AND shard_index = (SELECT shard_index FROM sharding.dist_shard WHERE shard_id = {shard})"
        ),
    );
    assert_eq!(notes_on, 1, "the co-located shard moved along");
    let count: i64 = scalar(&mut c, "SELECT count(*) FROM items");
    assert_eq!(count, 20000 + inserted, "no row lost or duplicated");
    let sum: i64 = scalar(&mut c, "SELECT sum(v)::int8 FROM items");
    assert_eq!(sum, inserted + updated, "every update counted once");
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM notes"), 20000);
    // Nothing of the replication is left on either worker.
    for w in 1..=2 {
        let mut worker = cluster.worker(w);
        let left: i64 = scalar(
            &mut worker,
            "SELECT (SELECT count(*) FROM pg_publication) + (SELECT count(*) FROM pg_subscription)
                  + (SELECT count(*) FROM pg_replication_slots)",
        );
        assert_eq!(left, 0, "worker {w}");
    }
}

#[test]
fn repeatable_read_transactions_fail_rather_than_miss_a_moved_shard() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    users_and_orders(&mut c, 4, 200);
    c.batch_execute("CREATE TABLE other (id int PRIMARY KEY); SELECT create_distributed_table('other', 'id', colocate_with => 'none')").unwrap();
    let node = |c: &mut Client, w: usize| -> i32 {
        scalar(c, &format!("SELECT node_id FROM sharding.dist_node WHERE port = {}", cluster.worker_port(w)))
    };
    let w2 = node(&mut c, 2);
    let shard: i64 = scalar(&mut c, &format!("SELECT min(shard_id) FROM sharding.shards WHERE table_name = 'users'::regclass AND node_id <> {w2}"));
    // REPEATABLE READ transactions whose snapshots (taken reading another table) predate a
    // move: their workers' snapshots would not show the moved rows, so they fail (40001)
    // instead of reading fewer rows or updating fewer. READ COMMITTED goes on.
    let mut readers: Vec<Client> = (0..2).map(|_| cluster.coordinator()).collect();
    let mut committed = cluster.coordinator();
    for reader in readers.iter_mut() {
        reader.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").unwrap();
        assert_eq!(scalar::<i64>(reader, "SELECT count(*) FROM other"), 0);
    }
    committed.batch_execute("BEGIN; SELECT count(*) FROM other").unwrap();
    c.batch_execute(&format!("SELECT sharding.move_shard({shard}, {w2}, 'block_writes')")).unwrap();
    assert_eq!(scalar::<i64>(&mut committed, "SELECT count(*) FROM users"), 200);
    let (code, ..) = expect_error(&mut readers[0], "SELECT count(*) FROM users");
    assert_eq!(code, "40001");
    let (code, ..) = expect_error(&mut readers[1], "UPDATE users SET name = name || '!'");
    assert_eq!(code, "40001");
    for reader in readers.iter_mut() {
        reader.batch_execute("ROLLBACK").unwrap();
    }
    committed.batch_execute("COMMIT").unwrap();
    // A transaction that starts after the move sees every row.
    let reader = &mut readers[0];
    reader.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").unwrap();
    assert_eq!(reader.execute("UPDATE users SET name = name || '!'", &[]).unwrap(), 200);
    reader.batch_execute("COMMIT").unwrap();
}
