//! Node catalog and management across real servers: sharding.add_node / remove_node /
//! nodes / node_health, the preload requirement, and catalog cache invalidation between backends.

use pg_sharding_multinode::{expect_error, scalar, Cluster};

fn node_count(client: &mut pg_sharding_multinode::Client) -> i64 {
    scalar(client, "SELECT count(*) FROM sharding.dist_node")
}

#[test]
fn started_cluster_has_healthy_registered_workers() {
    let cluster = Cluster::start(2);
    let mut coordinator = cluster.coordinator();

    let nodes: Vec<(i32, String, i32, Option<String>, bool)> = coordinator
        .query("SELECT node_id, host, port, region, is_active FROM sharding.nodes", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    assert_eq!(nodes.len(), 2);
    for (i, (_, host, port, region, active)) in nodes.iter().enumerate() {
        assert_eq!(host, "127.0.0.1");
        assert_eq!(*port, cluster.worker_port(i + 1) as i32);
        assert_eq!(*region, None);
        assert!(*active);
    }

    let health = coordinator
        .query("SELECT port, reachable, latency_ms, extension_version, error FROM sharding.node_health()", &[])
        .unwrap();
    assert_eq!(health.len(), 2);
    for row in &health {
        assert!(row.get::<_, bool>(1), "worker on port {} unreachable", row.get::<_, i32>(0));
        let latency: f64 = row.get(2);
        assert!(latency > 0.0 && latency < 1000.0, "latency {latency}");
        assert_eq!(row.get::<_, String>(3), "0.1.0");
        assert_eq!(row.get::<_, Option<String>>(4), None);
    }
}

#[test]
fn add_remove_round_trip_and_errors_record_nothing() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    let w2 = cluster.worker_port(2);

    // Round trip: remove, add back with a region, remove again, add again.
    c.execute("SELECT sharding.remove_node('127.0.0.1', $1)", &[&(w2 as i32)]).unwrap();
    assert_eq!(node_count(&mut c), 1);
    let id: i32 = c
        .query_one("SELECT sharding.add_node('127.0.0.1', $1, 'eu-west')", &[&(w2 as i32)])
        .unwrap()
        .get(0);
    let region: String =
        c.query_one("SELECT region FROM sharding.nodes WHERE node_id = $1", &[&id]).unwrap().get(0);
    assert_eq!(region, "eu-west");
    c.execute("SELECT sharding.remove_node('127.0.0.1', $1)", &[&(w2 as i32)]).unwrap();
    let id2: i32 =
        c.query_one("SELECT sharding.add_node('127.0.0.1', $1)", &[&(w2 as i32)]).unwrap().get(0);
    assert!(id2 > id, "node ids are not reused: {id2} after {id}");
    assert_eq!(node_count(&mut c), 2);

    // Duplicate: same address, and the same server reached through another host name.
    let (code, message, ..) = expect_error(&mut c, &format!("SELECT sharding.add_node('127.0.0.1', {w2})"));
    assert_eq!(code, "42710");
    assert!(message.contains("already registered"), "{message}");
    let (code, message, ..) = expect_error(&mut c, &format!("SELECT sharding.add_node('localhost', {w2})"));
    assert_eq!(code, "42710");
    assert!(message.contains("same server"), "{message}");

    // Unreachable: libpq's own message comes through in DETAIL.
    let dead_port = cluster.port + 40;
    let (code, message, hint, detail) =
        expect_error(&mut c, &format!("SELECT sharding.add_node('127.0.0.1', {dead_port})"));
    assert_eq!(code, "08001");
    assert!(message.contains(&format!("127.0.0.1:{dead_port}")), "{message}");
    assert!(detail.contains("Connection refused"), "detail: {detail}");
    assert!(!hint.is_empty());

    // The coordinator itself: admitted as such (its placements run in its own backends), once.
    let port = cluster.port as i32;
    c.execute("SELECT sharding.add_node('127.0.0.1', $1)", &[&port]).unwrap();
    let flags: Vec<bool> =
        c.query("SELECT is_coordinator FROM sharding.nodes ORDER BY node_id", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(flags, [false, false, true]);
    let (code, message, ..) = expect_error(&mut c, &format!("SELECT sharding.add_node('localhost', {port})"));
    assert_eq!(code, "42710", "{message}");
    c.execute("SELECT sharding.remove_node('127.0.0.1', $1)", &[&port]).unwrap();

    // Removing an unknown node.
    let (code, ..) = expect_error(&mut c, &format!("SELECT sharding.remove_node('127.0.0.1', {dead_port})"));
    assert_eq!(code, "42704");

    // A failed add inside a transaction block aborts it, and nothing is recorded.
    assert_eq!(node_count(&mut c), 2);

    // Only superusers manage nodes.
    c.batch_execute("CREATE ROLE app LOGIN").unwrap();
    c.batch_execute("GRANT USAGE ON SCHEMA sharding TO app").unwrap();
    let (code, ..) = expect_error(
        &mut c,
        &format!("SET ROLE app; SELECT sharding.remove_node('127.0.0.1', {w2})"),
    );
    assert_eq!(code, "42501");
    c.batch_execute("RESET ROLE").unwrap();
    let (code, ..) = expect_error(
        &mut c,
        "SET ROLE app; INSERT INTO sharding.dist_node (node_id, host, port) VALUES (77, 'x', 1)",
    );
    assert_eq!(code, "42501");
    c.batch_execute("RESET ROLE").unwrap();
    assert_eq!(node_count(&mut c), 2);
}

#[test]
fn nodes_that_cannot_serve_are_refused() {
    let cluster = Cluster::start(3);
    let mut c = cluster.coordinator();
    for worker in 1..=3 {
        let port = cluster.worker_port(worker) as i32;
        c.execute("SELECT sharding.remove_node('127.0.0.1', $1)", &[&port]).unwrap();
    }
    assert_eq!(node_count(&mut c), 0);

    // worker1: extension missing.
    cluster.worker(1).batch_execute("DROP EXTENSION pg_sharding").unwrap();
    let (code, message, hint, _) =
        expect_error(&mut c, &format!("SELECT sharding.add_node('127.0.0.1', {})", cluster.worker_port(1)));
    assert_eq!(code, "42704");
    assert!(message.contains("not installed"), "{message}");
    assert!(hint.contains("CREATE EXTENSION pg_sharding"), "{hint}");

    // worker2: another extension version (faked in the worker's catalog).
    cluster
        .worker(2)
        .batch_execute("UPDATE pg_extension SET extversion = '0.0.1' WHERE extname = 'pg_sharding'")
        .unwrap();
    let (code, message, ..) =
        expect_error(&mut c, &format!("SELECT sharding.add_node('127.0.0.1', {})", cluster.worker_port(2)));
    assert_eq!(code, "55000");
    assert!(message.contains("version mismatch") && message.contains("0.0.1"), "{message}");

    // worker3: max_prepared_transactions = 0.
    cluster.worker(3).batch_execute("ALTER SYSTEM SET max_prepared_transactions = 0").unwrap();
    cluster.restart_worker(3);
    let (code, message, hint, _) =
        expect_error(&mut c, &format!("SELECT sharding.add_node('127.0.0.1', {})", cluster.worker_port(3)));
    assert_eq!(code, "55000");
    assert!(message.contains("max_prepared_transactions"), "{message}");
    assert!(hint.contains("max_prepared_transactions"), "{hint}");

    assert_eq!(node_count(&mut c), 0, "a refused node must leave no catalog row");

    // Fixed nodes are accepted.
    cluster.worker(1).batch_execute("CREATE EXTENSION pg_sharding").unwrap();
    cluster.worker(3).batch_execute("ALTER SYSTEM RESET max_prepared_transactions").unwrap();
    cluster.restart_worker(3);
    for worker in [1, 3] {
        let port = cluster.worker_port(worker) as i32;
        c.execute("SELECT sharding.add_node('127.0.0.1', $1)", &[&port]).unwrap();
    }
    assert_eq!(node_count(&mut c), 2);
}

#[test]
fn node_with_placements_cannot_be_removed() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    let w1 = cluster.worker_port(1) as i32;
    // Placements are written by create_distributed_table in a later layer; here they are
    // written directly (as superuser) to exercise the guard.
    c.batch_execute(&format!(
        "CREATE TABLE t (id int);
         INSERT INTO sharding.dist_colocation VALUES (1, 3, 'int4', 1);
         INSERT INTO sharding.dist_table VALUES ('t', 'hash', 1, 1, 1);
         INSERT INTO sharding.dist_shard (shard_id, logicalrelid, shard_index, min_hash, max_hash)
             VALUES (1, 't', 0, -2147483648, -1), (2, 't', 1, 0, 1000), (3, 't', 2, 1001, 2147483647);
         INSERT INTO sharding.dist_placement (placement_id, shard_id, node_id)
             SELECT s, s, (SELECT node_id FROM sharding.nodes WHERE port = {w1}) FROM generate_series(1, 3) s;"
    ))
    .unwrap();
    let (code, message, hint, _) =
        expect_error(&mut c, &format!("SELECT sharding.remove_node('127.0.0.1', {w1})"));
    assert_eq!(code, "2BP01");
    assert!(message.contains("3 shard placements"), "{message}");
    assert!(hint.to_lowercase().contains("drain"), "{hint}");
    assert_eq!(node_count(&mut c), 2);

    c.batch_execute("DELETE FROM sharding.dist_placement").unwrap();
    c.execute("SELECT sharding.remove_node('127.0.0.1', $1)", &[&w1]).unwrap();
    assert_eq!(node_count(&mut c), 1);
}

#[test]
fn stopped_and_killed_workers_show_as_unreachable() {
    let cluster = Cluster::start(2);
    let mut c = cluster.coordinator();
    let reachable = |c: &mut pg_sharding_multinode::Client| -> Vec<(i32, bool, Option<String>)> {
        c.query("SELECT port, reachable, error FROM sharding.node_health() ORDER BY port", &[])
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect()
    };
    let (w1, w2) = (cluster.worker_port(1) as i32, cluster.worker_port(2) as i32);

    cluster.stop_worker(1);
    let health = reachable(&mut c);
    assert_eq!((health[0].0, health[0].1), (w1, false));
    assert!(health[0].2.as_deref().unwrap_or("").contains("Connection refused"), "{health:?}");
    assert_eq!((health[1].0, health[1].1, health[1].2.clone()), (w2, true, None));

    cluster.kill_worker(2);
    let health = reachable(&mut c);
    assert!(!health[0].1 && !health[1].1, "{health:?}");

    cluster.start_worker(1);
    cluster.start_worker(2);
    let health = reachable(&mut c);
    assert!(health.iter().all(|(_, ok, error)| *ok && error.is_none()), "{health:?}");
}

#[test]
fn other_backends_see_catalog_changes_at_once() {
    let cluster = Cluster::start(2);
    let mut reader = cluster.coordinator();
    let mut writer = cluster.coordinator();
    let w2 = cluster.worker_port(2) as i32;
    let health_count = |c: &mut pg_sharding_multinode::Client| -> i64 {
        scalar(c, "SELECT count(*) FROM sharding.node_health()")
    };
    assert_eq!(health_count(&mut reader), 2); // fills the reader's cache
    let loads: i64 = scalar(&mut reader, "SELECT sharding.metadata_cache_loads()");

    writer.execute("SELECT sharding.remove_node('127.0.0.1', $1)", &[&w2]).unwrap();
    assert_eq!(health_count(&mut reader), 1);
    writer.execute("SELECT sharding.add_node('127.0.0.1', $1)", &[&w2]).unwrap();
    assert_eq!(health_count(&mut reader), 2);
    let reloads: i64 = scalar(&mut reader, "SELECT sharding.metadata_cache_loads()");
    assert_eq!(reloads, loads + 2, "one reload per committed change");

    // An uncommitted change is invisible to others; a rolled-back one leaves no trace.
    writer.batch_execute(&format!("BEGIN; SELECT sharding.remove_node('127.0.0.1', {w2})")).unwrap();
    assert_eq!(health_count(&mut reader), 2);
    assert_eq!(health_count(&mut writer), 1);
    writer.batch_execute("ROLLBACK").unwrap();
    assert_eq!(health_count(&mut writer), 2);
    assert_eq!(health_count(&mut reader), 2);
}

#[test]
fn create_extension_requires_preloading() {
    let cluster = Cluster::start(1);
    let mut w = cluster.worker(1);
    w.batch_execute("DROP EXTENSION pg_sharding").unwrap();
    // Any list without pg_sharding; an empty string would be read as a library named "".
    w.batch_execute("ALTER SYSTEM SET shared_preload_libraries = 'plpgsql'").unwrap();
    drop(w);
    cluster.restart_worker(1);
    let mut w = cluster.worker(1);
    let (code, message, hint, _) = expect_error(&mut w, "CREATE EXTENSION pg_sharding");
    assert_eq!(code, "55000");
    assert!(message.contains("shared_preload_libraries"), "{message}");
    assert!(hint.contains("shared_preload_libraries = 'pg_sharding'"), "{hint}");
    let installed: i64 = scalar(&mut w, "SELECT count(*) FROM pg_extension WHERE extname = 'pg_sharding'");
    assert_eq!(installed, 0);
}

#[test]
fn connecting_to_a_silent_server_is_bounded_and_cancellable() {
    let cluster = Cluster::start(1);
    let mut c = cluster.coordinator();
    // A socket that completes the TCP handshake (the kernel does) but never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port() as i32;

    c.batch_execute("SET sharding.node_connect_timeout = 1").unwrap();
    let started = std::time::Instant::now();
    let (code, _, _, detail) = expect_error(&mut c, &format!("SELECT sharding.add_node('127.0.0.1', {port})"));
    assert_eq!(code, "08001");
    assert!(detail.contains("timeout"), "{detail}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());

    c.batch_execute("SET sharding.node_connect_timeout = 60; SET statement_timeout = '700ms'").unwrap();
    let started = std::time::Instant::now();
    let (code, ..) = expect_error(&mut c, &format!("SELECT sharding.add_node('127.0.0.1', {port})"));
    assert_eq!(code, "57014", "statement_timeout interrupts the connection attempt");
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
    c.batch_execute("RESET statement_timeout").unwrap();
    assert_eq!(node_count(&mut c), 1);
    drop(silent);
}
