//! split_shard, rebalance onto a new worker and the operator stats, under a concurrent write
//! workload whose clients remember what they were told committed: afterwards the tables must
//! hold exactly that (no row lost, none duplicated, every update once).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use pg_sharding_multinode::{expect_error, scalar, shards_per_node, Client, Cluster};

/// `accounts` (4 shards) and `ledger` co-located with it, `rows` accounts with one ledger row
/// each. Account ids are owned by writers: id % WRITERS.
fn accounts_and_ledger(c: &mut Client, rows: i32) {
    c.batch_execute(&format!(
        "CREATE TABLE accounts (id int PRIMARY KEY, v int NOT NULL, note text);
         CREATE TABLE ledger (account int NOT NULL, n int NOT NULL, amount int NOT NULL, PRIMARY KEY (account, n));
         SELECT create_distributed_table('accounts', 'id', shard_count => 4);
         SELECT create_distributed_table('ledger', 'account', colocate_with => 'accounts');
         INSERT INTO accounts SELECT g, 0, repeat('x', 50) FROM generate_series(1, {rows}) g;
         INSERT INTO ledger SELECT g, 0, 0 FROM generate_series(1, {rows}) g;"
    ))
    .unwrap();
}

const WRITERS: i32 = 3;

/// What one writer was told committed: account id -> v, and its ledger rows (account, n) -> amount.
#[derive(Default)]
struct Committed {
    accounts: BTreeMap<i32, i32>,
    ledger: BTreeMap<(i32, i32), i32>,
    ok: u64,
    failed: u64,
    slowest: Duration,
}

/// Writer `k`: inserts accounts (with a ledger row, in one transaction), updates and deletes
/// its own accounts, until `stop`.
fn spawn_writer(cluster: &Cluster, k: i32, initial: i32, stop: Arc<AtomicBool>) -> thread::JoinHandle<Committed> {
    let mut c = cluster.coordinator();
    thread::spawn(move || {
        let mut state = Committed::default();
        for id in (1..=initial).filter(|id| id % WRITERS == k) {
            state.accounts.insert(id, 0);
            state.ledger.insert((id, 0), 0);
        }
        let mut step = 0i32;
        while !stop.load(Ordering::SeqCst) {
            step += 1;
            let owned: Vec<i32> = state.accounts.keys().copied().collect();
            let pick = owned[(step as usize * 7919) % owned.len()];
            let started = Instant::now();
            let outcome = match step % 4 {
                // A new account and its first ledger row, in one distributed transaction.
                0 | 1 => {
                    let id = 1_000_000 + step * WRITERS + k;
                    let result = c.batch_execute(&format!(
                        "BEGIN; INSERT INTO accounts VALUES ({id}, 1, 'new'); INSERT INTO ledger VALUES ({id}, 1, 10); COMMIT"
                    ));
                    if result.is_ok() {
                        state.accounts.insert(id, 1);
                        state.ledger.insert((id, 1), 10);
                    }
                    result
                }
                2 => {
                    let result = c.batch_execute(&format!("UPDATE accounts SET v = v + 1 WHERE id = {pick}"));
                    if result.is_ok() {
                        *state.accounts.get_mut(&pick).unwrap() += 1;
                    }
                    result
                }
                _ => {
                    if step % 12 == 3 && owned.len() > 10 {
                        let result = c.batch_execute(&format!(
                            "BEGIN; DELETE FROM ledger WHERE account = {pick}; DELETE FROM accounts WHERE id = {pick}; COMMIT"
                        ));
                        if result.is_ok() {
                            state.accounts.remove(&pick);
                            state.ledger.retain(|(a, _), _| *a != pick);
                        }
                        result
                    } else {
                        let n = 100 + step;
                        let result = c.batch_execute(&format!("INSERT INTO ledger VALUES ({pick}, {n}, 5)"));
                        if result.is_ok() {
                            state.ledger.insert((pick, n), 5);
                        }
                        result
                    }
                }
            };
            state.slowest = state.slowest.max(started.elapsed());
            match outcome {
                Ok(()) => state.ok += 1,
                Err(e) => {
                    eprintln!("writer {k}: {}", e.as_db_error().map(|d| format!("{} {}", d.code().code(), d.message())).unwrap_or(e.to_string()));
                    let _ = c.batch_execute("ROLLBACK");
                    state.failed += 1;
                }
            }
        }
        state
    })
}

/// Runs `operation` while WRITERS clients write; returns their merged results.
fn under_load(cluster: &Cluster, initial: i32, operation: impl FnOnce()) -> Committed {
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS).map(|k| spawn_writer(cluster, k, initial, stop.clone())).collect();
    thread::sleep(Duration::from_millis(400));
    operation();
    thread::sleep(Duration::from_millis(400));
    stop.store(true, Ordering::SeqCst);
    let mut all = Committed::default();
    for writer in writers {
        let part = writer.join().unwrap();
        all.accounts.extend(part.accounts);
        all.ledger.extend(part.ledger);
        all.ok += part.ok;
        all.failed += part.failed;
        all.slowest = all.slowest.max(part.slowest);
    }
    all
}

/// The tables hold exactly what the writers were told committed.
fn assert_holds(c: &mut Client, committed: &Committed) {
    let accounts: BTreeMap<i32, i32> =
        c.query("SELECT id, v FROM accounts", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect();
    let missing = committed.accounts.keys().filter(|id| !accounts.contains_key(id)).count();
    let extra = accounts.keys().filter(|id| !committed.accounts.contains_key(id)).count();
    let differ = committed.accounts.iter().filter(|(id, v)| accounts.get(id).is_some_and(|got| got != *v)).count();
    assert_eq!((missing, extra, differ), (0, 0, 0), "accounts: missing, unexpected, wrong value");
    let ledger: BTreeMap<(i32, i32), i32> = c
        .query("SELECT account, n, amount FROM ledger", &[])
        .unwrap()
        .iter()
        .map(|r| ((r.get(0), r.get(1)), r.get(2)))
        .collect();
    assert_eq!(ledger.len(), committed.ledger.len(), "ledger rows");
    assert!(ledger == committed.ledger, "ledger contents");
    let total: i64 = scalar(c, "SELECT count(*) FROM accounts");
    assert_eq!(total as usize, committed.accounts.len(), "count(*) agrees with the rows read");
}

fn assert_success_rate(committed: &Committed, what: &str) {
    let total = committed.ok + committed.failed;
    let rate = committed.ok as f64 / total as f64;
    println!(
        "{what}: {} client operations, {} failed ({:.2}% ok), longest {:?}",
        total,
        committed.failed,
        rate * 100.0,
        committed.slowest
    );
    assert!(total > 50, "the writers ran: {total}");
    assert!(rate >= 0.99, "{what}: {:.2}% of client operations succeeded", rate * 100.0);
}

/// Nothing of a split or move is left on the workers once the old shards are dropped.
fn assert_no_leftovers(cluster: &Cluster, workers: usize) {
    let mut c = cluster.coordinator();
    c.batch_execute("SELECT sharding.cleanup_old_placements()").unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM sharding.dist_cleanup"), 0);
    let mut expected = 0;
    for shards in c.query("SELECT count(*) FROM sharding.dist_shard", &[]).unwrap() {
        expected = shards.get::<_, i64>(0);
    }
    let mut found = 0;
    for w in 1..=workers {
        let mut worker = cluster.worker(w);
        let left: Vec<String> = worker
            .query(
                "SELECT 'trigger ' || tgname FROM pg_trigger WHERE tgname LIKE 'pgs_split%'
                 UNION ALL SELECT 'function ' || proname FROM pg_proc WHERE proname LIKE 'pgs_split%'
                 UNION ALL SELECT 'publication ' || pubname FROM pg_publication
                 UNION ALL SELECT 'subscription ' || subname FROM pg_subscription
                 UNION ALL SELECT 'slot ' || slot_name FROM pg_replication_slots",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(left.is_empty(), "worker {w}: left behind: {left:?}");
        found += scalar::<i64>(
            &mut worker,
            "SELECT count(*) FROM pg_class WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace",
        );
    }
    assert_eq!(found, expected, "exactly one shard table per catalog shard on the workers");
}

#[test]
fn split_shard_online_under_writes_keeps_every_committed_row() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    accounts_and_ledger(&mut c, 100000);
    let shard: i64 = scalar(&mut c, "SELECT sharding.shard_for_value('accounts', 1)");
    let source: i32 = scalar(&mut c, &format!("SELECT node_id FROM sharding.dist_placement WHERE shard_id = {shard}"));
    let other: i32 = scalar(&mut c, &format!("SELECT min(node_id) FROM sharding.dist_node WHERE node_id <> {source}"));
    let (min, max): (i32, i32) = {
        let row = c.query_one(&format!("SELECT min_hash, max_hash FROM sharding.dist_shard WHERE shard_id = {shard}"), &[]).unwrap();
        (row.get(0), row.get(1))
    };
    let third = ((max as i64 - min as i64) / 3) as i32;
    let points = format!("ARRAY[{}, {}]", min + third, min + 2 * third);

    let mut took = Duration::ZERO;
    let mut new_ids: Vec<i64> = Vec::new();
    let committed = under_load(&cluster, 100000, || {
        let started = Instant::now();
        new_ids = c
            .query_one(&format!("SELECT sharding.split_shard({shard}, {points}, ARRAY[{source}, {other}, {source}])"), &[])
            .unwrap()
            .get(0);
        took = started.elapsed();
    });
    println!("split of shard {shard} into 3 (one piece moved to node {other}): {took:?}");
    assert_success_rate(&committed, "split");
    assert_eq!(new_ids.len(), 3);

    // The catalog: 6 shards per table, contiguous intervals, co-located pieces on the same node.
    let layout: Vec<(i32, i32, i32, i64)> = c
        .query(
            "SELECT min_hash, max_hash, node_id, shard_id FROM sharding.shards WHERE table_name = 'accounts'::regclass ORDER BY shard_index",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(layout.len(), 6);
    assert_eq!(layout[0].0, i32::MIN);
    assert_eq!(layout[5].1, i32::MAX);
    for pair in layout.windows(2) {
        assert_eq!(pair[0].1 as i64 + 1, pair[1].0 as i64, "gap or overlap: {layout:?}");
    }
    let pieces: Vec<&(i32, i32, i32, i64)> = layout.iter().filter(|l| new_ids.contains(&l.3)).collect();
    assert_eq!(pieces.iter().map(|p| p.2).collect::<Vec<_>>(), vec![source, other, source]);
    assert_eq!((pieces[0].0, pieces[0].1), (min, min + third));
    let apart: i64 = scalar(
        &mut c,
        "SELECT count(*) FROM sharding.shards a JOIN sharding.shards l
            ON l.shard_index = a.shard_index AND l.table_name = 'ledger'::regclass
         WHERE a.table_name = 'accounts'::regclass AND (l.node_id <> a.node_id OR l.min_hash <> a.min_hash)",
    );
    assert_eq!(apart, 0, "ledger split and moved with accounts");
    assert_eq!(scalar::<i32>(&mut c, "SELECT shard_count FROM sharding.dist_colocation"), 6);

    assert_holds(&mut c, &committed);
    // Routing uses the new intervals: every account is found by its key, joins stay co-located.
    let unrouted: i64 = scalar(
        &mut c,
        "SELECT count(*) FROM accounts a WHERE NOT EXISTS (SELECT 1 FROM ledger l WHERE l.account = a.id)",
    );
    assert_eq!(unrouted, 0);
    for id in [1, 2, 3, 4, 5, 29999] {
        let exists: i64 = scalar(&mut c, &format!("SELECT count(*) FROM accounts WHERE id = {id}"));
        assert_eq!(exists, committed.accounts.contains_key(&id) as i64, "account {id}");
    }
    // A table created co-located now gets the group's (uneven) intervals.
    c.batch_execute("CREATE TABLE extra (id int PRIMARY KEY); SELECT create_distributed_table('extra', 'id', colocate_with => 'accounts')")
        .unwrap();
    let mismatched: i64 = scalar(
        &mut c,
        "SELECT count(*) FROM sharding.shards e JOIN sharding.shards a ON a.shard_index = e.shard_index AND a.table_name = 'accounts'::regclass
          WHERE e.table_name = 'extra'::regclass AND (e.min_hash, e.max_hash, e.node_id) IS DISTINCT FROM (a.min_hash, a.max_hash, a.node_id)",
    );
    assert_eq!(mismatched, 0);
    c.batch_execute("DROP TABLE extra").unwrap();
    assert_no_leftovers(&cluster, 2);
}

#[test]
fn split_errors_change_nothing_and_a_failed_split_cleans_up() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    accounts_and_ledger(&mut c, 2000);
    c.batch_execute(
        "CREATE TABLE bare (id int, v int); SELECT create_distributed_table('bare', 'id', shard_count => 2)",
    )
    .unwrap();
    let shard: i64 = scalar(&mut c, "SELECT sharding.shard_for_value('accounts', 1)");
    let catalog = |c: &mut Client| -> Vec<(i64, i32, i32, i32)> {
        c.query("SELECT shard_id, shard_index, min_hash, max_hash FROM sharding.dist_shard ORDER BY shard_id", &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    };
    let before = catalog(&mut c);
    let max: i32 = scalar(&mut c, &format!("SELECT max_hash FROM sharding.dist_shard WHERE shard_id = {shard}"));
    for (sql, code) in [
        (format!("SELECT sharding.split_shard({shard}, ARRAY[{max}])"), "22023"),
        (format!("SELECT sharding.split_shard({shard}, ARRAY[]::int[])"), "22023"),
        (format!("SELECT sharding.split_shard({shard}, ARRAY[0, -5])"), "22023"),
        (format!("SELECT sharding.split_shard({shard}, NULL)"), "22004"),
        (format!("SELECT sharding.split_shard({shard}, ARRAY[{}], ARRAY[1])", max - 10), "22023"),
        (format!("SELECT sharding.split_shard({shard}, ARRAY[{}], ARRAY[1, 99])", max - 10), "42704"),
        (format!("SELECT sharding.split_shard({shard}, ARRAY[{}], mode => 'fast')", max - 10), "22023"),
        ("SELECT sharding.split_shard(1, ARRAY[0])".to_string(), "42704"),
    ] {
        let (got, message, ..) = expect_error(&mut c, &sql);
        assert_eq!(got, code, "{sql}: {message}");
    }
    // No primary key: online is refused with a hint; block_writes works.
    let bare: i64 = scalar(&mut c, "SELECT min(shard_id) FROM sharding.dist_shard WHERE logicalrelid = 'bare'::regclass");
    let (code, message, hint, _) = expect_error(&mut c, &format!("SELECT sharding.split_shard({bare}, ARRAY[-1073741824])"));
    assert_eq!(code, "55000", "{message}");
    assert!(hint.contains("block_writes"), "{hint}");
    assert_eq!(catalog(&mut c), before);
    c.batch_execute("INSERT INTO bare SELECT g, g FROM generate_series(1, 1000) g").unwrap();
    c.batch_execute(&format!("SELECT sharding.split_shard({bare}, ARRAY[-1073741824], mode => 'block_writes')")).unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM sharding.dist_shard WHERE logicalrelid = 'bare'::regclass"), 3);
    assert_eq!(scalar::<i64>(&mut c, "SELECT sum(v)::int8 FROM bare"), 500500);
    c.batch_execute("DROP TABLE bare").unwrap();
    let before = catalog(&mut c);

    // A failure after the trigger is in place and the rows are copied: the old shard keeps
    // serving, the children and the trigger are gone, writes work.
    c.batch_execute("SET sharding.fault_injection = 'split_before_switch:error'").unwrap();
    let (code, message, ..) = expect_error(&mut c, &format!("SELECT sharding.split_shard({shard}, ARRAY[{}])", max - 1000));
    assert_eq!(code, "XX000", "{message}");
    assert!(message.contains("split_before_switch"), "{message}");
    c.batch_execute("RESET sharding.fault_injection").unwrap();
    assert_eq!(catalog(&mut c), before);
    c.batch_execute("UPDATE accounts SET v = v + 1; INSERT INTO accounts VALUES (5000000, 7, 'after')").unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT sum(v)::int8 FROM accounts"), 2007);
    assert_no_leftovers(&cluster, 2);
    // A cancel in the middle (statement_timeout while paused after the trigger) also cleans up.
    c.batch_execute("SET sharding.fault_injection = 'split_after_trigger:pause:5000'; SET statement_timeout = '1s'").unwrap();
    let (code, ..) = expect_error(&mut c, &format!("SELECT sharding.split_shard({shard}, ARRAY[{}])", max - 1000));
    assert_eq!(code, "57014");
    c.batch_execute("RESET sharding.fault_injection; RESET statement_timeout").unwrap();
    assert_eq!(catalog(&mut c), before);
    assert_no_leftovers(&cluster, 2);
    // A crash of the coordinator after the copy: no cleanup runs, the old shard keeps serving
    // (its trigger still fills children nobody owns).
    let split_sql = format!("SELECT sharding.split_shard({shard}, ARRAY[{}])", max - 1000);
    let crashing = {
        let mut victim = cluster.coordinator();
        let sql = split_sql.clone();
        thread::spawn(move || {
            victim.batch_execute("SET sharding.fault_injection = 'split_before_switch:pause:20000'").unwrap();
            victim.batch_execute(&sql).is_err()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while scalar::<i64>(&mut c, "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'") == 0 {
        assert!(Instant::now() < deadline, "the split did not reach its pause");
        thread::sleep(Duration::from_millis(50));
    }
    cluster.kill_coordinator();
    assert!(crashing.join().unwrap(), "the crashed split reported an error");
    cluster.start_coordinator();
    let mut c = cluster.coordinator();
    assert_eq!(catalog(&mut c), before);
    c.batch_execute("UPDATE accounts SET v = v + 1 WHERE id <= 10; DELETE FROM accounts WHERE id = 5000000").unwrap();
    let sum: i64 = scalar(&mut c, "SELECT sum(v)::int8 FROM accounts");
    assert_eq!(sum, 2010);
    // The maintenance worker (or this function, which it runs) clears what the crash left.
    c.batch_execute("SELECT sharding.clear_interrupted_operations()").unwrap();
    assert_no_leftovers(&cluster, 2);
    // The re-run finishes.
    c.batch_execute(&split_sql).unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM sharding.dist_shard WHERE logicalrelid = 'accounts'::regclass"), 5);
    assert_eq!(scalar::<i64>(&mut c, "SELECT sum(v)::int8 FROM accounts"), sum);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM accounts"), 2000);
    assert_no_leftovers(&cluster, 2);

    // The same for an online move: a crash after the initial copy leaves a subscription, a
    // slot holding WAL on the source, a publication and the new tables.
    let moving: i64 = scalar(&mut c, "SELECT sharding.shard_for_value('accounts', 2)");
    let from: i32 = scalar(&mut c, &format!("SELECT node_id FROM sharding.dist_placement WHERE shard_id = {moving}"));
    let to = 3 - from;
    let crashing = {
        let mut victim = cluster.coordinator();
        thread::spawn(move || {
            victim.batch_execute("SET sharding.fault_injection = 'move_after_copy:pause:20000'").unwrap();
            victim.batch_execute(&format!("SELECT sharding.move_shard({moving}, {to})")).is_err()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while scalar::<i64>(&mut c, "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'") == 0 {
        assert!(Instant::now() < deadline, "the move did not reach its pause");
        thread::sleep(Duration::from_millis(50));
    }
    let mut source = cluster.worker(from as usize);
    assert_eq!(scalar::<i64>(&mut source, "SELECT count(*) FROM pg_replication_slots"), 1);
    cluster.kill_coordinator();
    assert!(crashing.join().unwrap());
    cluster.start_coordinator();
    let mut c = cluster.coordinator();
    assert_eq!(scalar::<i32>(&mut c, &format!("SELECT node_id FROM sharding.dist_placement WHERE shard_id = {moving}")), from);
    c.batch_execute("SELECT sharding.clear_interrupted_operations()").unwrap();
    assert_no_leftovers(&cluster, 2);
    assert_eq!(scalar::<i64>(&mut c, "SELECT sum(v)::int8 FROM accounts"), sum);
}

#[test]
fn rebalance_onto_a_new_worker_under_writes_reports_progress() {
    let cluster = Cluster::start(3);
    let mut c = cluster.coordinator();
    accounts_and_ledger(&mut c, 20000);
    c.batch_execute(&format!("SELECT sharding.drain_node('127.0.0.1', {})", cluster.worker_port(3))).unwrap();
    // Eight shard groups over two nodes, the third empty (as if just added).
    c.batch_execute(
        "SELECT sharding.split_shard(s.shard_id, ARRAY[(s.min_hash::int8 + s.max_hash) / 2]::int[])
           FROM sharding.dist_shard s WHERE s.logicalrelid = 'accounts'::regclass",
    )
    .unwrap();
    let per_node = |c: &mut Client| shards_per_node(c, "accounts");
    assert_eq!(per_node(&mut c), vec![4, 4, 0]);
    let total_before: i64 = scalar(&mut c, "SELECT sum(v)::int8 FROM accounts");

    // A rebalance cancelled in the middle keeps the moves it finished, leaves every shard
    // group on one node, and loses nothing; the run below finishes the job.
    c.batch_execute("SET statement_timeout = '1500ms'").unwrap();
    let (code, ..) = expect_error(&mut c, "SELECT count(*) FROM rebalance_shards()");
    assert_eq!(code, "57014");
    c.batch_execute("RESET statement_timeout").unwrap();
    assert_eq!(per_node(&mut c).iter().sum::<i64>(), 8);
    assert_eq!(scalar::<i64>(&mut c, "SELECT sum(v)::int8 FROM accounts"), total_before);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM sharding.rebalance_progress"), 0);
    let left: i64 = scalar(&mut c, "SELECT count(*) FROM sharding.rebalance_plan()");
    assert!((1..=2).contains(&left), "the cancelled rebalance left {left} of its 2 moves");

    // Another session watches the progress view while the rebalance runs.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let watching = watching.clone();
        let mut w = cluster.coordinator();
        thread::spawn(move || {
            let mut seen: Vec<(String, i32, i32, Option<i64>)> = Vec::new();
            while watching.load(Ordering::SeqCst) {
                for row in w
                    .query("SELECT operation, moves_done, moves_total, current_shard_id FROM sharding.rebalance_progress", &[])
                    .unwrap()
                {
                    seen.push((row.get(0), row.get(1), row.get(2), row.get(3)));
                }
                thread::sleep(Duration::from_millis(50));
            }
            seen
        })
    };
    let mut took = Duration::ZERO;
    let committed = under_load(&cluster, 20000, || {
        let started = Instant::now();
        let moved: i64 = scalar(&mut c, "SELECT count(*) FROM rebalance_shards()");
        took = started.elapsed();
        assert_eq!(moved, left);
    });
    watching.store(false, Ordering::SeqCst);
    let seen = watcher.join().unwrap();
    println!("rebalance onto a third worker: {took:?}; progress rows seen: {}", seen.len());
    assert_success_rate(&committed, "rebalance");
    assert!(
        seen.iter().any(|(op, _, total, current)| op == "rebalance" && *total as i64 == left && current.is_some()),
        "the progress view showed the rebalance and its current move: {seen:?}"
    );
    let counts = per_node(&mut c);
    assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1, "{counts:?}");
    assert_holds(&mut c, &committed);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM sharding.rebalance_progress"), 0);
    // Inside a transaction block the moves share the caller's transaction and roll back with it.
    c.batch_execute(&format!("SELECT sharding.drain_node('127.0.0.1', {})", cluster.worker_port(3))).unwrap();
    let before = per_node(&mut c);
    c.batch_execute("BEGIN; SELECT count(*) FROM rebalance_shards(); ROLLBACK").unwrap();
    assert_eq!(per_node(&mut c), before);
    assert_no_leftovers(&cluster, 3);
}

#[test]
fn shard_stats_count_routed_reads_and_writes_and_hot_shards_use_them() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    accounts_and_ledger(&mut c, 4000);
    c.batch_execute("ANALYZE accounts").unwrap_or(());
    let previous: Option<String> = scalar(&mut c, "SELECT sharding.reset_shard_stats()::text");
    assert!(previous.is_none(), "never reset before: {previous:?}");
    let hot: i64 = scalar(&mut c, "SELECT sharding.shard_for_value('accounts', 42)");
    for _ in 0..30 {
        c.batch_execute("SELECT v FROM accounts WHERE id = 42").unwrap();
    }
    c.batch_execute("UPDATE accounts SET v = v + 1 WHERE id = 42; INSERT INTO accounts VALUES (4001, 0, 'n'), (4002, 0, 'n')")
        .unwrap();
    let stats: Vec<(i64, i64, i64, Option<i64>, Option<i64>)> = c
        .query(
            "SELECT shard_id, reads, writes, estimated_rows, size_bytes FROM sharding.shard_stats WHERE table_name = 'accounts'::regclass",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(stats.len(), 4);
    let (_, reads, writes, ..) = stats.iter().find(|s| s.0 == hot).unwrap();
    assert_eq!(*reads, 30, "30 router reads of one shard");
    assert!(*writes >= 1, "the update at least");
    let inserted: i64 = stats.iter().map(|s| s.2).sum::<i64>() - 1;
    assert_eq!(inserted, 2, "two rows inserted");
    let others: i64 = stats.iter().filter(|s| s.0 != hot).map(|s| s.1).sum();
    assert_eq!(others, 0, "the other shards were not read");
    let rows: i64 = stats.iter().map(|s| s.3.unwrap_or(0)).sum();
    assert!((3000..=5000).contains(&rows), "estimated rows add up to about the table: {rows}");
    assert!(stats.iter().all(|s| s.4.unwrap_or(0) > 0));

    // The load criterion: the shard read 30 times is hot although it is not larger.
    let hot_rows: Vec<(i64, i64, Option<f64>, Option<i32>)> = c
        .query("SELECT shard_id, load, load_ratio_to_mean, split_point FROM sharding.hot_shards(2.0)", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(hot_rows.len(), 1, "{hot_rows:?}");
    assert_eq!(hot_rows[0].0, hot);
    assert!(hot_rows[0].2.unwrap() > 2.0);
    let (min, max): (i32, i32) = {
        let row = c.query_one(&format!("SELECT min_hash, max_hash FROM sharding.dist_shard WHERE shard_id = {hot}"), &[]).unwrap();
        (row.get(0), row.get(1))
    };
    let point = hot_rows[0].3.unwrap();
    assert!(min <= point && point < max, "the split point is a valid one for the shard");
    // Splitting there works and keeps every row.
    let before: i64 = scalar(&mut c, "SELECT count(*) FROM accounts");
    c.batch_execute(&format!("SELECT sharding.split_shard({hot}, ARRAY[{point}])")).unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM accounts"), before);
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM sharding.dist_shard WHERE logicalrelid = 'accounts'::regclass"), 5);

    // Reset zeroes the counters (and says when they were last reset); only superusers may.
    let previous: Option<String> = scalar(&mut c, "SELECT sharding.reset_shard_stats()::text");
    assert!(previous.is_some());
    assert_eq!(scalar::<i64>(&mut c, "SELECT sum(reads + writes)::int8 FROM sharding.shard_stats"), 0);
    c.batch_execute("CREATE ROLE watcher LOGIN; SET ROLE watcher").unwrap();
    let (code, ..) = expect_error(&mut c, "SELECT sharding.reset_shard_stats()");
    assert_eq!(code, "42501");
    c.batch_execute("RESET ROLE").unwrap();
}
