//! Distributed transactions: two-phase commit, recovery, savepoints and isolation, and the
//! bank-transfer failure tests (a worker or the coordinator killed at each phase of the
//! commit protocol, the phases reached with the test build's fault-injection points).
//!
//! Rounds per failure scenario: 20 by default; PG_SHARDING_SOAK=N runs N rounds with a longer
//! workload in each (`make soak`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use pg_sharding_multinode::{expect_error, scalar, sqlstate, Client, Cluster};

const ACCOUNTS: i32 = 40;
const INITIAL: i64 = 1000;
/// Accounts per worker kept for the probe transfers.
const PROBES: usize = 2;

fn rounds() -> usize {
    ["PG_SHARDING_SOAK", "PG_SHARDING_ROUNDS"]
        .iter()
        .find_map(|name| std::env::var(name).ok().and_then(|v| v.parse().ok()))
        .unwrap_or(20)
}

fn soak() -> bool {
    std::env::var("PG_SHARDING_SOAK").is_ok()
}

fn prepared_on_workers(cluster: &Cluster) -> i64 {
    (1..=cluster.workers)
        .map(|w| scalar::<i64>(&mut cluster.worker(w), "SELECT count(*) FROM pg_prepared_xacts"))
        .sum()
}

/// A table acc(id, balance) of `rows` accounts with balance 100, in 4 shards.
fn accounts(c: &mut Client, rows: i32) {
    c.batch_execute(&format!(
        "CREATE TABLE acc (id int PRIMARY KEY, balance int NOT NULL);
         SELECT create_distributed_table('acc', 'id', shard_count => 4);
         INSERT INTO acc SELECT g, 100 FROM generate_series(1, {rows}) g;"
    ))
    .unwrap();
}

/// The smallest account id (up to `rows`) whose shard lives on worker `w`.
fn first_account_on(c: &mut Client, cluster: &Cluster, w: usize, rows: i32) -> i32 {
    scalar(
        c,
        &format!(
            "SELECT min(a.id) FROM generate_series(1, {rows}) a(id) JOIN sharding.shards s
               ON s.table_name = 'acc'::regclass AND s.shard_id = sharding.shard_for_value('acc', a.id)
              WHERE s.port = {}",
            cluster.worker_port(w)
        ),
    )
}

#[test]
fn two_phase_commit_writes_records_and_recovery_resolves_prepared_transactions() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v int);
         SELECT create_distributed_table('t', 'id', shard_count => 4);",
    )
    .unwrap();
    // Distributing the table wrote the catalog and both workers: two-phase commit.
    let records = |c: &mut Client| scalar::<i64>(c, "SELECT count(*) FROM sharding.dist_transaction");
    assert_eq!(records(&mut c), 2);
    c.batch_execute("SELECT sharding.recover_prepared_transactions()").unwrap();
    assert_eq!(records(&mut c), 0);

    // One node written: one phase, no record. Both nodes: two-phase, one record per node.
    c.batch_execute("INSERT INTO t VALUES (1, 1)").unwrap();
    c.batch_execute("BEGIN; INSERT INTO t VALUES (2, 2); COMMIT").unwrap();
    assert_eq!(records(&mut c), 0, "single-node writes commit in one phase");
    c.batch_execute("INSERT INTO t SELECT g, g FROM generate_series(10, 30) g").unwrap();
    assert_eq!(records(&mut c), 2, "a write on two nodes leaves a commit record per node");
    assert_eq!(prepared_on_workers(&cluster), 0, "COMMIT PREPARED ran after the local commit");
    let done: i64 = scalar(&mut c, "SELECT count(*) FROM sharding.recover_prepared_transactions()");
    assert_eq!(done, 0, "nothing was left to recover");
    assert_eq!(records(&mut c), 0, "recovery deletes resolved records");

    // Prepared transactions left behind, as a failure would leave them: one whose coordinator
    // transaction committed (with its record), one whose transaction aborted (no record), one
    // of somebody else. Recovery commits the first, rolls back the second, leaves the third.
    let (sysid, db): (String, String) = {
        let row = c
            .query_one("SELECT system_identifier::text, (SELECT oid FROM pg_database WHERE datname = current_database())::text FROM pg_control_system()", &[])
            .unwrap();
        (row.get(0), row.get(1))
    };
    let node_id = |c: &mut Client, w: usize| -> i32 {
        scalar(c, &format!("SELECT node_id FROM sharding.dist_node WHERE port = {}", cluster.worker_port(w)))
    };
    let w1 = node_id(&mut c, 1);
    let committed_xid: String = {
        let mut t = c.transaction().unwrap();
        let xid: String = t.query_one("SELECT txid_current()::text", &[]).unwrap().get(0);
        t.commit().unwrap();
        xid
    };
    let aborted_xid: String = {
        let mut t = c.transaction().unwrap();
        let xid: String = t.query_one("SELECT txid_current()::text", &[]).unwrap().get(0);
        t.rollback().unwrap();
        xid
    };
    let gid_commit = format!("pgs:{sysid}:{db}:{committed_xid}:1:{w1}");
    let gid_abort = format!("pgs:{sysid}:{db}:{aborted_xid}:1:{w1}");
    c.batch_execute(&format!("INSERT INTO sharding.dist_transaction (gid, node_id) VALUES ('{gid_commit}', {w1})")).unwrap();
    let mut worker = cluster.worker(1);
    let shard: String = scalar(&mut worker, "SELECT relname::text FROM pg_class WHERE relname LIKE 't\\_%' AND relkind = 'r' ORDER BY 1 LIMIT 1");
    for (gid, value) in [(&gid_commit, 1001), (&gid_abort, 1002), (&"somebody_else".to_string(), 1003)] {
        worker
            .batch_execute(&format!("BEGIN; INSERT INTO {shard} VALUES ({value}, 0); PREPARE TRANSACTION '{gid}'"))
            .unwrap();
    }
    let in_doubt: Vec<(String, String)> = c
        .query("SELECT gid, decision FROM sharding.transactions ORDER BY gid", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut expected = vec![(gid_commit.clone(), "commit".to_string()), (gid_abort.clone(), "abort".to_string())];
    expected.sort();
    assert_eq!(in_doubt, expected, "the view lists our in-doubt transactions with their fate");
    let actions: BTreeMap<String, String> = c
        .query("SELECT gid, action FROM sharding.recover_prepared_transactions()", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(actions.get(&gid_commit).map(String::as_str), Some("committed"));
    assert_eq!(actions.get(&gid_abort).map(String::as_str), Some("rolled back"));
    assert_eq!(actions.len(), 2, "{actions:?}");
    let kept: Vec<i32> =
        worker.query(&format!("SELECT id FROM {shard} WHERE id > 1000"), &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(kept, vec![1001]);
    let left: Vec<String> = worker.query("SELECT gid FROM pg_prepared_xacts", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(left, vec!["somebody_else".to_string()], "foreign prepared transactions are not ours to resolve");
    worker.batch_execute("ROLLBACK PREPARED 'somebody_else'").unwrap();
    assert_eq!(records(&mut c), 0);

    // Recovery is for superusers.
    c.batch_execute("CREATE ROLE plain LOGIN").unwrap();
    c.batch_execute("SET ROLE plain").unwrap();
    let (code, ..) = expect_error(&mut c, "SELECT * FROM sharding.recover_prepared_transactions()");
    assert_eq!(code, "42501");
    c.batch_execute("RESET ROLE").unwrap();
}

#[test]
fn savepoints_isolation_and_set_local_reach_the_workers() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    accounts(&mut c, 20);
    let balances = |c: &mut Client| -> Vec<i32> {
        c.query("SELECT balance FROM acc WHERE id <= 5 ORDER BY id", &[]).unwrap().iter().map(|r| r.get(0)).collect()
    };

    // ROLLBACK TO SAVEPOINT undoes exactly the work after it, on every node; RELEASE keeps it.
    c.batch_execute(
        "BEGIN;
         UPDATE acc SET balance = balance + 1 WHERE id = 1;
         SAVEPOINT a;
         UPDATE acc SET balance = balance + 10;
         SAVEPOINT b;
         UPDATE acc SET balance = balance + 100 WHERE id IN (2, 3);
         RELEASE SAVEPOINT b;
         ROLLBACK TO SAVEPOINT a;
         UPDATE acc SET balance = balance + 2 WHERE id IN (3, 4);
         SAVEPOINT c;
         UPDATE acc SET balance = balance + 1000 WHERE id = 5;
         RELEASE SAVEPOINT c;
         COMMIT;",
    )
    .unwrap();
    assert_eq!(balances(&mut c), vec![101, 100, 102, 102, 1100]);

    // An error inside a savepoint, rolled back to, leaves the transaction usable.
    c.batch_execute("BEGIN; UPDATE acc SET balance = balance - 1 WHERE id = 1; SAVEPOINT s").unwrap();
    let (code, ..) = expect_error(&mut c, "UPDATE acc SET balance = balance / 0 WHERE id IN (1, 2, 3, 4)");
    assert_eq!(code, "22012");
    c.batch_execute("ROLLBACK TO SAVEPOINT s; UPDATE acc SET balance = balance - 1 WHERE id = 2; COMMIT").unwrap();
    assert_eq!(balances(&mut c), vec![100, 99, 102, 102, 1100]);

    // PL/pgSQL exception blocks are subtransactions too: the failed iterations leave nothing.
    c.batch_execute(
        "DO $$ BEGIN
           FOR i IN 1..5 LOOP
             BEGIN
               UPDATE acc SET balance = balance + 1 WHERE id = i;
               UPDATE acc SET balance = balance + 1 WHERE id = 20 - i;
               IF i % 2 = 0 THEN RAISE EXCEPTION 'undo %', i; END IF;
             EXCEPTION WHEN raise_exception THEN NULL;
             END;
           END LOOP;
         END $$",
    )
    .unwrap();
    assert_eq!(balances(&mut c), vec![101, 99, 103, 102, 1101]);
    let total: i64 = scalar(&mut c, "SELECT sum(balance) FROM acc");
    assert_eq!(total, 100 * 20 + 1 + 2 * 2 + 1000 - 1 - 1 + 6);

    // A failed statement aborts the whole block, as in PostgreSQL.
    c.batch_execute("BEGIN; UPDATE acc SET balance = 0 WHERE id = 7").unwrap();
    let (code, ..) = expect_error(&mut c, "UPDATE acc SET balance = 1 / 0 WHERE id = 8");
    assert_eq!(code, "22012");
    let (code, ..) = expect_error(&mut c, "SELECT 1");
    assert_eq!(code, "25P02");
    c.batch_execute("ROLLBACK").unwrap();
    assert_eq!(scalar::<i32>(&mut c, "SELECT balance FROM acc WHERE id = 7"), 100);

    // REPEATABLE READ: one snapshot per node for the whole block.
    let mut other = cluster.coordinator();
    c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ").unwrap();
    let before: i64 = scalar(&mut c, "SELECT sum(balance) FROM acc");
    other.batch_execute("UPDATE acc SET balance = balance + 50 WHERE id IN (1, 2, 3, 4)").unwrap();
    let again: i64 = scalar(&mut c, "SELECT sum(balance) FROM acc");
    assert_eq!(again, before, "the block keeps its snapshot");
    c.batch_execute("COMMIT").unwrap();
    let after: i64 = scalar(&mut c, "SELECT sum(balance) FROM acc");
    assert_eq!(after, before + 200);

    // SERIALIZABLE READ ONLY blocks read; READ ONLY refuses writes.
    c.batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE").unwrap();
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM acc"), 20);
    c.batch_execute("COMMIT").unwrap();
    c.batch_execute("BEGIN READ ONLY").unwrap();
    let (code, ..) = expect_error(&mut c, "UPDATE acc SET balance = 0 WHERE id = 3");
    assert_eq!(code, "25006");
    c.batch_execute("ROLLBACK").unwrap();

    // SET LOCAL reaches the remote transactions, also those already open: a lock wait on a
    // worker ends after the lock_timeout set last (the earlier 5 s would still be waiting).
    c.batch_execute("BEGIN; UPDATE acc SET balance = balance + 1 WHERE id = 9").unwrap();
    other
        .batch_execute(
            "BEGIN; SET LOCAL lock_timeout = '5s';
             UPDATE acc SET balance = balance WHERE id <> 9;
             SET LOCAL lock_timeout = '200ms'",
        )
        .unwrap();
    let started = Instant::now();
    let (code, ..) = expect_error(&mut other, "UPDATE acc SET balance = balance + 1 WHERE id = 9");
    assert_eq!(code, "55P03");
    assert!(started.elapsed() < Duration::from_secs(3), "the later SET LOCAL did not reach the worker");
    other.batch_execute("ROLLBACK").unwrap();
    c.batch_execute("COMMIT").unwrap();
    // SET LOCAL ends with the block, on the workers too.
    other.batch_execute("BEGIN").unwrap();
    assert_eq!(scalar::<i32>(&mut other, "SELECT balance FROM acc WHERE id = 9"), 101);
    other.batch_execute("COMMIT").unwrap();
}

#[test]
fn a_one_phase_commit_that_loses_its_node_reports_an_unknown_outcome() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    accounts(&mut c, 40);
    let id = first_account_on(&mut c, &cluster, 2, 40);
    // The node dies while the coordinator is about to COMMIT its only writer: the client must
    // not be told "failed" (the node might have committed), but 08007.
    let mut client = cluster.coordinator();
    client.batch_execute("SET sharding.fault_injection = 'before_commit:pause:1000'").unwrap();
    let pid: i32 = scalar(&mut client, "SELECT pg_backend_pid()");
    let waiter = thread::spawn(move || {
        let result = client.batch_execute(&format!("BEGIN; UPDATE acc SET balance = 0 WHERE id = {id}; COMMIT"));
        result.map_err(|e| sqlstate(&e))
    });
    wait_paused(&mut c, pid);
    cluster.kill_worker(2);
    assert_eq!(waiter.join().unwrap(), Err("08007".to_string()));
    cluster.start_worker(2);
    let balance: i32 = scalar(&mut c, &format!("SELECT balance FROM acc WHERE id = {id}"));
    assert_eq!(balance, 100, "the COMMIT never reached the node");
}

#[test]
fn a_deadlock_across_nodes_cancels_the_youngest_transaction() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    accounts(&mut c, 40);
    // Two accounts on different workers.
    let (a, b) = (first_account_on(&mut c, &cluster, 1, 40), first_account_on(&mut c, &cluster, 2, 40));
    for round in 0..3 {
        let mut older = cluster.coordinator();
        let mut younger = cluster.coordinator();
        older.batch_execute(&format!("BEGIN; UPDATE acc SET balance = balance - 1 WHERE id = {a}")).unwrap();
        thread::sleep(Duration::from_millis(20));
        younger.batch_execute(&format!("BEGIN; UPDATE acc SET balance = balance - 1 WHERE id = {b}")).unwrap();
        let started = Instant::now();
        let waiter = thread::spawn(move || {
            let result = older.batch_execute(&format!("UPDATE acc SET balance = balance + 1 WHERE id = {b}; COMMIT"));
            (older, result)
        });
        thread::sleep(Duration::from_millis(200));
        let (code, message, detail, _) =
            expect_error(&mut younger, &format!("UPDATE acc SET balance = balance + 1 WHERE id = {a}"));
        assert_eq!(code, "40P01", "round {round}: {message} {detail}");
        assert!(message.contains("distributed deadlock"), "{message}");
        younger.batch_execute("ROLLBACK").unwrap();
        let (_older, result) = waiter.join().unwrap();
        result.expect("the older transaction goes on once the younger is cancelled");
        assert!(started.elapsed() < Duration::from_secs(15), "round {round}: took {:?}", started.elapsed());
    }
    let total: i64 = scalar(&mut c, "SELECT sum(balance) FROM acc");
    assert_eq!(total, 4000);
    let moved: Vec<i32> = c
        .query(&format!("SELECT balance FROM acc WHERE id IN ({a}, {b}) ORDER BY id = {a} DESC"), &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(moved, vec![97, 103], "the older transaction's transfers all committed");
}

// ---------------------------------------------------------------------------------------------
// The bank-transfer workload

#[derive(Default, Debug, Clone, Copy)]
struct Counts {
    attempted: u64,
    committed: u64,
    aborted: u64,
    unknown: u64,
    recovered: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.attempted += other.attempted;
        self.committed += other.committed;
        self.aborted += other.aborted;
        self.unknown += other.unknown;
        self.recovered += other.recovered;
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Committed,
    Aborted,
    /// The connection to the coordinator was lost during the transaction.
    Unknown,
}

struct Bank {
    cluster: Cluster,
    /// Accounts by the worker (1, 2) that holds them.
    by_worker: [Vec<i32>; 2],
    next_transfer: AtomicU64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, list: &'a [i32]) -> &'a i32 {
        &list[(self.next() % list.len() as u64) as usize]
    }
}

impl Bank {
    fn open() -> Bank {
        let cluster = Cluster::start(2);
        let mut c = cluster.coordinator();
        c.batch_execute(&format!(
            "CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
             CREATE TABLE ledger (account_id int NOT NULL, transfer_id bigint NOT NULL, delta bigint NOT NULL);
             SELECT create_distributed_table('accounts', 'id', shard_count => 8);
             SELECT create_distributed_table('ledger', 'account_id', colocate_with => 'accounts');
             INSERT INTO accounts SELECT g, {INITIAL} FROM generate_series(1, {ACCOUNTS}) g;"
        ))
        .unwrap();
        let mut by_worker = [Vec::new(), Vec::new()];
        for row in c
            .query(
                &format!(
                    "SELECT a.id, s.port FROM generate_series(1, {ACCOUNTS}) a(id)
                       JOIN sharding.shards s ON s.table_name = 'accounts'::regclass
                        AND s.shard_id = sharding.shard_for_value('accounts', a.id)"
                ),
                &[],
            )
            .unwrap()
        {
            let (id, port): (i32, i32) = (row.get(0), row.get(1));
            let worker = (port - cluster.port as i32) as usize;
            by_worker[worker - 1].push(id);
        }
        assert!(by_worker.iter().all(|l| l.len() > PROBES + 1), "accounts on both workers: {by_worker:?}");
        Bank { cluster, by_worker, next_transfer: AtomicU64::new(1) }
    }

    /// A transfer between accounts on different workers (usually) or any two; never the
    /// first two of each worker, which the paused probe transfers use.
    fn pick(&self, rng: &mut Rng) -> (i32, i32) {
        if rng.next() % 5 != 0 {
            (*rng.pick(&self.by_worker[0][PROBES..]), *rng.pick(&self.by_worker[1][PROBES..]))
        } else {
            let all: Vec<i32> = self.by_worker.iter().flat_map(|l| l[PROBES..].iter().copied()).collect();
            let a = *rng.pick(&all);
            let mut b = *rng.pick(&all);
            while a == b {
                b = *rng.pick(&all);
            }
            (a, b)
        }
    }

    /// One transfer in one transaction: both balances and both ledger rows.
    fn transfer(&self, client: &mut Client, from: i32, to: i32, amount: i64) -> (u64, Outcome) {
        let id = self.next_transfer.fetch_add(1, Ordering::SeqCst);
        // Rows are locked in id order: transfers never wait for each other in a cycle.
        let (first, first_delta, second, second_delta) =
            if from < to { (from, -amount, to, amount) } else { (to, amount, from, -amount) };
        let sql = format!(
            "BEGIN;
             UPDATE accounts SET balance = balance + ({first_delta}) WHERE id = {first};
             UPDATE accounts SET balance = balance + ({second_delta}) WHERE id = {second};
             INSERT INTO ledger VALUES ({from}, {id}, {}), ({to}, {id}, {amount});
             COMMIT;",
            -amount
        );
        match client.batch_execute(&sql) {
            Ok(()) => (id, Outcome::Committed),
            // The coordinator was lost, or it lost the one node while that node committed (08007).
            Err(error) if error.is_closed() || error.code().is_none() || sqlstate(&error) == "08007" => {
                let _ = client.batch_execute("ROLLBACK");
                (id, Outcome::Unknown)
            }
            Err(_) => {
                let _ = client.batch_execute("ROLLBACK");
                (id, Outcome::Aborted)
            }
        }
    }

    fn verify(&self, outcomes: &BTreeMap<u64, Outcome>) -> u64 {
        let mut c = self.cluster.coordinator();
        // Recovery until nothing is in doubt (a coordinator backend may still be finishing its
        // abort when the round ends).
        let mut recovered = 0u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            recovered += scalar::<i64>(
                &mut c,
                "SELECT count(*) FROM sharding.recover_prepared_transactions() WHERE action IN ('committed', 'rolled back')",
            ) as u64;
            if prepared_on_workers(&self.cluster) == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "prepared transactions left on the workers after recovery");
            thread::sleep(Duration::from_millis(200));
        }
        let total: i64 = scalar(&mut c, "SELECT sum(balance)::bigint FROM accounts");
        assert_eq!(total, ACCOUNTS as i64 * INITIAL, "the total balance changed");
        let mismatched: i64 = scalar(
            &mut c,
            &format!(
                "SELECT count(*) FROM accounts a LEFT JOIN (SELECT account_id, sum(delta) AS d FROM ledger GROUP BY account_id) l
                   ON l.account_id = a.id WHERE a.balance <> {INITIAL} + coalesce(l.d, 0)"
            ),
        );
        assert_eq!(mismatched, 0, "balances disagree with the ledger");
        let visible: BTreeMap<i64, (i64, i64)> = c
            .query("SELECT transfer_id, count(*), sum(delta)::bigint FROM ledger GROUP BY transfer_id", &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        for (id, (rows, sum)) in &visible {
            assert_eq!((*rows, *sum), (2, 0), "transfer {id} is half applied");
        }
        for (id, outcome) in outcomes {
            let seen = visible.contains_key(&(*id as i64));
            match outcome {
                Outcome::Committed => assert!(seen, "transfer {id} was reported committed but is not visible"),
                Outcome::Aborted => assert!(!seen, "transfer {id} was reported failed but is visible"),
                Outcome::Unknown => {}
            }
        }
        let records: i64 = scalar(&mut c, "SELECT count(*) FROM sharding.dist_transaction");
        assert_eq!(records, 0, "resolved commit records are deleted");
        recovered
    }
}

/// Where the fault strikes.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Worker 2 killed while a transaction waits before PREPARE.
    WorkerBeforePrepare,
    /// Worker 2 killed after PREPARE, before the commit record.
    WorkerAfterPrepare,
    /// Worker 2 killed after the commit record (and the local commit), before COMMIT PREPARED.
    WorkerBeforeCommitPrepared,
    /// The coordinator killed with transactions at both sides of the local commit.
    Coordinator,
}

/// Waits until the backend `pid` sits at a fault-injection pause.
fn wait_paused(observer: &mut Client, pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let paused: i64 = scalar(
            observer,
            &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid} AND wait_event = 'PgSleep'"),
        );
        if paused == 1 {
            return;
        }
        assert!(Instant::now() < deadline, "backend {pid} never reached its fault point");
        thread::sleep(Duration::from_millis(10));
    }
}

/// A client that pauses at `point` in its next commit; returns its thread (the transfer's id
/// and outcome) once the backend is paused.
fn paused_transfer(bank: &Arc<Bank>, point: &str, pause_ms: u64, pick: usize) -> thread::JoinHandle<(u64, Outcome)> {
    let mut client = bank.cluster.coordinator();
    client.batch_execute(&format!("SET sharding.fault_injection = '{point}:pause:{pause_ms}'")).unwrap();
    let pid: i32 = scalar(&mut client, "SELECT pg_backend_pid()");
    let worker_bank = bank.clone();
    let handle = thread::spawn(move || {
        // Its own accounts (the `pick`th of each worker), so two probes never wait for each other.
        let (a, b) = (worker_bank.by_worker[0][pick], worker_bank.by_worker[1][pick]);
        worker_bank.transfer(&mut client, a, b, 7)
    });
    let mut observer = bank.cluster.coordinator();
    wait_paused(&mut observer, pid);
    handle
}

fn round(bank: &Arc<Bank>, fault: Fault, seed: u64) -> Counts {
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Mutex::new(BTreeMap::<u64, Outcome>::new()));
    let workload = if soak() { Duration::from_millis(1500) } else { Duration::from_millis(250) };
    let clients: Vec<_> = (0..3u64)
        .map(|n| {
            let (bank, stop, outcomes) = (bank.clone(), stop.clone(), outcomes.clone());
            thread::spawn(move || {
                let mut rng = Rng((seed * 7 + n * 1_000_003) | 1);
                let mut client: Option<Client> = None;
                while !stop.load(Ordering::SeqCst) {
                    if client.is_none() {
                        match pg_sharding_multinode::Client::connect(
                            &format!("host=127.0.0.1 port={} user=postgres dbname=postgres", bank.cluster.port),
                            pg_sharding_multinode::NoTls,
                        ) {
                            Ok(c) => client = Some(c),
                            Err(_) => {
                                thread::sleep(Duration::from_millis(50));
                                continue;
                            }
                        }
                    }
                    let (a, b) = bank.pick(&mut rng);
                    let amount = (rng.next() % 10 + 1) as i64;
                    let (id, outcome) = bank.transfer(client.as_mut().unwrap(), a, b, amount);
                    outcomes.lock().unwrap().insert(id, outcome);
                    match outcome {
                        Outcome::Unknown => client = None,
                        Outcome::Aborted => thread::sleep(Duration::from_millis(5)),
                        Outcome::Committed => {}
                    }
                }
            })
        })
        .collect();
    thread::sleep(workload);

    let mut probes: Vec<(thread::JoinHandle<(u64, Outcome)>, Option<Outcome>)> = Vec::new();
    match fault {
        Fault::WorkerBeforePrepare | Fault::WorkerAfterPrepare | Fault::WorkerBeforeCommitPrepared => {
            let (point, expected) = match fault {
                // The PREPARE that follows fails on the dead worker: the client sees a failure.
                Fault::WorkerBeforePrepare => ("before_prepare", Outcome::Aborted),
                // Both nodes prepared: the decision is commit, the dead worker gets it later.
                Fault::WorkerAfterPrepare => ("after_prepare", Outcome::Committed),
                _ => ("before_commit_prepared", Outcome::Committed),
            };
            probes.push((paused_transfer(bank, point, 1000, 0), Some(expected)));
            bank.cluster.kill_worker(2);
            let probe = probes.pop().unwrap();
            let (id, outcome) = probe.0.join().unwrap();
            assert_eq!(Some(outcome), probe.1, "{fault:?}: transfer {id}");
            outcomes.lock().unwrap().insert(id, outcome);
            thread::sleep(workload / 2);
            bank.cluster.start_worker(2);
            thread::sleep(workload);
        }
        Fault::Coordinator => {
            // One transaction committed locally (COMMIT PREPARED pending), one prepared with
            // its record written but not committed: recovery must commit the first and roll
            // back the second.
            let committed = paused_transfer(bank, "before_commit_prepared", 5000, 0);
            let undecided = paused_transfer(bank, "after_commit_record", 5000, 1);
            bank.cluster.kill_coordinator();
            let (committed_id, outcome) = committed.join().unwrap();
            assert_eq!(outcome, Outcome::Unknown);
            let (undecided_id, outcome) = undecided.join().unwrap();
            assert_eq!(outcome, Outcome::Unknown);
            thread::sleep(workload / 2);
            bank.cluster.start_coordinator();
            // The maintenance worker runs recovery when the coordinator starts.
            let deadline = Instant::now() + Duration::from_secs(20);
            while prepared_on_workers(&bank.cluster) > 0 {
                assert!(Instant::now() < deadline, "the background worker did not recover after the restart");
                thread::sleep(Duration::from_millis(50));
            }
            thread::sleep(workload);
            stop.store(true, Ordering::SeqCst);
            for client in clients {
                client.join().unwrap();
            }
            let outcomes = outcomes.lock().unwrap().clone();
            let recovered = bank.verify(&outcomes);
            let mut c = bank.cluster.coordinator();
            let seen = |c: &mut Client, id: u64| scalar::<i64>(c, &format!("SELECT count(*) FROM ledger WHERE transfer_id = {id}"));
            assert_eq!(seen(&mut c, committed_id), 2, "committed before the crash: recovery commits it everywhere");
            assert_eq!(seen(&mut c, undecided_id), 0, "undecided at the crash: recovery rolls it back");
            return counts(&outcomes, recovered);
        }
    }
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.join().unwrap();
    }
    let outcomes = outcomes.lock().unwrap().clone();
    let recovered = bank.verify(&outcomes);
    counts(&outcomes, recovered)
}

fn counts(outcomes: &BTreeMap<u64, Outcome>, recovered: u64) -> Counts {
    let mut counts = Counts { attempted: outcomes.len() as u64, recovered, ..Default::default() };
    for outcome in outcomes.values() {
        match outcome {
            Outcome::Committed => counts.committed += 1,
            Outcome::Aborted => counts.aborted += 1,
            Outcome::Unknown => counts.unknown += 1,
        }
    }
    counts
}

fn scenario(fault: Fault) {
    let bank = Arc::new(Bank::open());
    let mut total = Counts::default();
    let started = Instant::now();
    for n in 0..rounds() {
        total.add(round(&bank, fault, 0x9E37_79B9 + n as u64 * 104_729));
    }
    // What the maintenance worker recovered (at the coordinator's restarts) is in its log.
    total.recovered += bank.cluster.log("coordinator").matches("pg_sharding recovery: ").count() as u64;
    // The figures of the closing note.
    println!(
        "bank {fault:?}: {} rounds in {:.1} s: attempted {}, committed {}, aborted {}, unknown (08007 or coordinator lost) {}, recovered {}",
        rounds(),
        started.elapsed().as_secs_f64(),
        total.attempted,
        total.committed,
        total.aborted,
        total.unknown,
        total.recovered
    );
    assert!(total.committed > 0, "the workload committed nothing");
}

#[test]
fn bank_transfers_survive_a_worker_killed_before_prepare() {
    scenario(Fault::WorkerBeforePrepare);
}

#[test]
fn bank_transfers_survive_a_worker_killed_after_prepare() {
    scenario(Fault::WorkerAfterPrepare);
}

#[test]
fn bank_transfers_survive_a_worker_killed_before_commit_prepared() {
    scenario(Fault::WorkerBeforeCommitPrepared);
}

#[test]
fn bank_transfers_survive_the_coordinator_killed() {
    scenario(Fault::Coordinator);
}

#[test]
fn set_constraints_all_reaches_the_shards() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    c.batch_execute(
        "CREATE TABLE dc (id int, a int, CONSTRAINT dc_u UNIQUE (id, a) DEFERRABLE INITIALLY IMMEDIATE);
         SELECT create_distributed_table('dc', 'id', shard_count => 4);
         INSERT INTO dc VALUES (1, 1), (2, 2);",
    )
    .unwrap();
    // Deferred: a duplicate in the middle of the transaction is fine when it is gone by COMMIT.
    c.batch_execute(
        "BEGIN; SET CONSTRAINTS ALL DEFERRED; INSERT INTO dc VALUES (1, 1); DELETE FROM dc WHERE id = 1;
         INSERT INTO dc VALUES (1, 1); COMMIT",
    )
    .unwrap();
    // One left at COMMIT fails there, and nothing is committed.
    let (code, ..) = expect_error(&mut c, "BEGIN; SET CONSTRAINTS ALL DEFERRED; INSERT INTO dc VALUES (2, 2), (3, 3); COMMIT");
    assert_eq!(code, "23505");
    let _ = c.batch_execute("ROLLBACK");
    assert_eq!(scalar::<i64>(&mut c, "SELECT count(*) FROM dc"), 2);
    // Without SET CONSTRAINTS the check is immediate, at the INSERT.
    c.batch_execute("BEGIN").unwrap();
    let (code, ..) = expect_error(&mut c, "INSERT INTO dc VALUES (2, 2)");
    assert_eq!(code, "23505");
    c.batch_execute("ROLLBACK").unwrap();
}
