//! Harness for the multi-node suite: a real coordinator and workers, each a PostgreSQL 15
//! server on its own free loopback port, in a temporary directory, started and stopped through
//! scripts/cluster.sh. Dropping a `Cluster` (also when a test panics) destroys it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub use postgres::{Client, Error, NoTls};

static CLUSTERS_STARTED: AtomicU32 = AtomicU32::new(0);

pub struct Cluster {
    dir: PathBuf,
    pub port: u16,
    pub workers: usize,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

fn cluster_script() -> PathBuf {
    repo_root().join("scripts/cluster.sh")
}

fn ports_free(base: u16, count: u16) -> bool {
    (base..=base + count).all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok())
}

/// A base port with `count` free ports after it, below Linux's ephemeral range (32768 and up:
/// client sockets take ports there at any moment). Spread by process id and a counter so that
/// parallel tests (and parallel test processes) do not pick the same range.
fn free_port_range(count: u16) -> u16 {
    let seed = std::process::id() * 7919 + CLUSTERS_STARTED.fetch_add(1, Ordering::SeqCst) * 16;
    for attempt in 0..500u32 {
        let base = 20000 + ((seed + attempt * 16) % 12000) as u16;
        if ports_free(base, count) {
            return base;
        }
    }
    panic!("no free range of {count} loopback ports found");
}

fn run_script(args: &[&str]) -> Result<String, String> {
    let output = Command::new("bash")
        .arg(cluster_script())
        .args(args)
        .output()
        .map_err(|e| format!("could not run cluster.sh: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!("cluster.sh {} failed:\n{text}", args.join(" ")))
    }
}

impl Cluster {
    /// Starts a coordinator and `workers` workers, with pg_sharding created everywhere and the
    /// workers registered. Extra postgresql.conf settings go in `settings` as "name=value".
    pub fn start_with(workers: usize, settings: &[&str]) -> Cluster {
        // A port found free can still be taken before the server binds it: try another range.
        let mut last_error = String::new();
        for _ in 0..3 {
            match Cluster::try_start(workers, settings) {
                Ok(cluster) => return cluster,
                Err(message) if message.contains("Address already in use") => last_error = message,
                Err(message) => panic!("{message}"),
            }
        }
        panic!("{last_error}");
    }

    fn try_start(workers: usize, settings: &[&str]) -> Result<Cluster, String> {
        let port = free_port_range(workers as u16);
        let dir = std::env::temp_dir().join(format!("pgsh-{}-{port}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let cluster = Cluster { dir, port, workers };
        let port_text = port.to_string();
        let workers_text = workers.to_string();
        let dir_text = cluster.dir.to_string_lossy().to_string();
        let mut args = vec![
            "start",
            "--port",
            &port_text,
            "--workers",
            &workers_text,
            "--dir",
            &dir_text,
            // Process kills do not lose the OS page cache: fsync buys nothing in these tests.
            "--set",
            "fsync=off",
        ];
        for setting in settings {
            args.push("--set");
            args.push(setting);
        }
        run_script(&args)?;
        Ok(cluster)
    }

    pub fn start(workers: usize) -> Cluster {
        Cluster::start_with(workers, &[])
    }

    pub fn worker_port(&self, worker: usize) -> u16 {
        assert!((1..=self.workers).contains(&worker), "no worker {worker}");
        self.port + worker as u16
    }

    pub fn connect_port(&self, port: u16) -> Client {
        let config = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
        Client::connect(&config, NoTls).unwrap_or_else(|e| panic!("connect to port {port}: {e}"))
    }

    pub fn coordinator(&self) -> Client {
        self.connect_port(self.port)
    }

    pub fn worker(&self, worker: usize) -> Client {
        self.connect_port(self.worker_port(worker))
    }

    fn node_name(worker: usize) -> String {
        format!("worker{worker}")
    }

    fn node_command(&self, args: &[&str]) {
        let dir = self.dir.to_string_lossy().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--dir", &dir]);
        if let Err(message) = run_script(&all) {
            panic!("{message}");
        }
    }

    /// Clean shutdown of one worker (pg_ctl stop -m fast).
    pub fn stop_worker(&self, worker: usize) {
        self.node_command(&["node-stop", &Self::node_name(worker), "--mode", "fast"]);
    }

    /// Crash of one worker (pg_ctl stop -m immediate).
    pub fn kill_worker(&self, worker: usize) {
        self.node_command(&["node-stop", &Self::node_name(worker), "--mode", "immediate"]);
    }

    pub fn start_worker(&self, worker: usize) {
        self.node_command(&["node-start", &Self::node_name(worker)]);
    }

    /// The server log of one node ("coordinator", "worker1", ...).
    pub fn log(&self, node: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{node}.log"))).unwrap_or_default()
    }

    /// Crash of the coordinator (pg_ctl stop -m immediate).
    pub fn kill_coordinator(&self) {
        self.node_command(&["node-stop", "coordinator", "--mode", "immediate"]);
    }

    pub fn start_coordinator(&self) {
        self.node_command(&["node-start", "coordinator"]);
    }

    /// Restarts one worker so that postgresql.conf / ALTER SYSTEM changes take effect.
    pub fn restart_worker(&self, worker: usize) {
        self.stop_worker(worker);
        self.start_worker(worker);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let dir = self.dir.to_string_lossy().to_string();
        if let Err(message) = run_script(&["destroy", "--dir", &dir]) {
            eprintln!("{message}");
        }
    }
}

/// The SQLSTATE of a failed statement, as its five-character code.
pub fn sqlstate(error: &Error) -> String {
    error.code().map(|c| c.code().to_string()).unwrap_or_else(|| format!("no SQLSTATE: {error}"))
}

/// Runs `sql` expecting it to fail; returns (SQLSTATE, message, hint, detail).
pub fn expect_error(client: &mut Client, sql: &str) -> (String, String, String, String) {
    match client.batch_execute(sql) {
        Ok(()) => panic!("expected an error from: {sql}"),
        Err(error) => {
            let db = error.as_db_error();
            (
                sqlstate(&error),
                db.map(|d| d.message().to_string()).unwrap_or_else(|| error.to_string()),
                db.and_then(|d| d.hint()).unwrap_or_default().to_string(),
                db.and_then(|d| d.detail()).unwrap_or_default().to_string(),
            )
        }
    }
}

/// A single value of a one-row query.
pub fn scalar<T>(client: &mut Client, sql: &str) -> T
where
    T: for<'a> postgres::types::FromSql<'a>,
{
    let row = client.query_one(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e}"));
    row.get(0)
}

/// One shard placement as the coordinator's catalog lists it.
#[derive(Debug, Clone)]
pub struct Placement {
    pub shard_id: i64,
    pub port: u16,
    pub shard_name: String,
}

impl Cluster {
    /// Placements of `table` (schema public), from sharding.shards.
    pub fn placements(&self, table: &str) -> Vec<Placement> {
        let mut coordinator = self.coordinator();
        coordinator
            .query(
                "SELECT shard_id, port FROM sharding.shards WHERE table_name = $1::text::regclass ORDER BY shard_index, port",
                &[&table],
            )
            .unwrap()
            .iter()
            .map(|row| {
                let shard_id: i64 = row.get(0);
                Placement { shard_id, port: row.get::<_, i32>(1) as u16, shard_name: format!("{table}_{shard_id}") }
            })
            .collect()
    }

    /// Rows in each placement of `table`, counted on the workers themselves.
    pub fn rows_per_placement(&self, table: &str) -> Vec<(Placement, i64)> {
        self.placements(table)
            .into_iter()
            .map(|placement| {
                let mut worker = self.connect_port(placement.port);
                let count: i64 = scalar(&mut worker, &format!("SELECT count(*) FROM public.\"{}\"", placement.shard_name));
                (placement, count)
            })
            .collect()
    }

    /// Tables on every worker whose name starts with `prefix` followed by '_' and digits.
    pub fn shard_tables_on_workers(&self, prefix: &str) -> i64 {
        (1..=self.workers)
            .map(|w| {
                let mut worker = self.worker(w);
                worker
                    .query_one(
                        "SELECT count(*) FROM pg_tables WHERE tablename ~ ('^' || $1 || '_[0-9]+$')",
                        &[&prefix],
                    )
                    .unwrap()
                    .get::<_, i64>(0)
            })
            .sum()
    }
}

/// How many shards of `table` each registered node holds, in node order.
pub fn shards_per_node(client: &mut Client, table: &str) -> Vec<i64> {
    client
        .query(
            "SELECT (SELECT count(*) FROM sharding.dist_placement p
                       JOIN sharding.dist_shard s ON s.shard_id = p.shard_id
                      WHERE p.node_id = n.node_id AND s.logicalrelid = $1::text::regclass)
               FROM sharding.dist_node n ORDER BY n.node_id",
            &[&table],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Sends `data` with `COPY ... FROM STDIN`; returns the row count the server reported.
pub fn copy_in(client: &mut Client, sql: &str, data: &[u8]) -> Result<u64, Error> {
    use std::io::Write;
    let mut writer = client.copy_in(sql)?;
    writer.write_all(data).expect("write COPY data");
    writer.finish()
}

/// Reads everything `COPY ... TO STDOUT` sends.
pub fn copy_out(client: &mut Client, sql: &str) -> Result<Vec<u8>, Error> {
    use std::io::Read;
    let mut reader = client.copy_out(sql)?;
    let mut data = Vec::new();
    reader.read_to_end(&mut data).expect("read COPY data");
    Ok(data)
}
