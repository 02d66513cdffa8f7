//! The maintenance background worker: runs recovery of prepared transactions when the server
//! starts and every `sharding.recovery_interval` seconds after that.
//!
//! A launcher (connected to the `postgres` database) lists the databases and, for each one,
//! starts a short-lived worker connected to it that runs recovery if pg_sharding is installed
//! there and nodes are registered, then exits. One database at a time, so the launcher never
//! holds more than one extra worker slot.

use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::prelude::*;

/// Registers the launcher; called from _PG_init (the library is preloaded).
pub fn register() {
    BackgroundWorkerBuilder::new("pg_sharding maintenance launcher")
        .set_type("pg_sharding maintenance")
        .set_library("pg_sharding")
        .set_function("pg_sharding_maintenance_launcher")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(10)))
        .load();
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_sharding_maintenance_launcher(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some("postgres"), None);
    loop {
        let databases: Vec<pg_sys::Oid> = BackgroundWorker::transaction(|| {
            Spi::connect(|client| {
                client
                    .select("SELECT oid FROM pg_catalog.pg_database WHERE datallowconn AND NOT datistemplate ORDER BY oid", None, &[])
                    .map(|rows| rows.filter_map(|row| row.get::<pg_sys::Oid>(1).ok().flatten()).collect())
                    .unwrap_or_default()
            })
        });
        for database in databases {
            // SAFETY: reads this process's pid.
            let pid = unsafe { pg_sys::MyProcPid };
            let started = BackgroundWorkerBuilder::new("pg_sharding recovery")
                .set_type("pg_sharding recovery")
                .set_library("pg_sharding")
                .set_function("pg_sharding_recovery_worker")
                .enable_spi_access()
                .set_argument(Some(pg_sys::Datum::from(database.to_u32())))
                .set_notify_pid(pid)
                .load_dynamic();
            match started {
                Ok(worker) => {
                    let _ = worker.wait_for_shutdown();
                }
                Err(_) => pgrx::log!("pg_sharding: no background worker slot for recovery; trying again later"),
            }
            if BackgroundWorker::sigterm_received() {
                return;
            }
        }
        let seconds = crate::guc::RECOVERY_INTERVAL.get();
        // Off (0): look again in a minute whether it was turned on.
        let wait = Duration::from_secs(if seconds > 0 { seconds as u64 } else { 60 });
        if !BackgroundWorker::wait_latch(Some(wait)) {
            return;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloads postgresql.conf in this process, as any backend does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if crate::guc::RECOVERY_INTERVAL.get() <= 0 {
            continue;
        }
    }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_sharding_recovery_worker(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGTERM);
    let database = pg_sys::Oid::from(arg.value() as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    if crate::guc::RECOVERY_INTERVAL.get() <= 0 {
        return;
    }
    // Recovery needs READ COMMITTED, whatever the server's default.
    // SAFETY: sets a GUC of this process before its transaction starts.
    unsafe {
        pg_sys::SetConfigOption(
            c"default_transaction_isolation".as_ptr(),
            c"read committed".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
        )
    };
    BackgroundWorker::transaction(|| {
        let installed = crate::catalog::read_one::<bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_sharding')
                AND pg_catalog.to_regclass('sharding.dist_transaction') IS NOT NULL",
            &[],
        )
        .ok()
        .flatten()
        .unwrap_or(false);
        if !installed {
            return;
        }
        let has_nodes = crate::catalog::read_one::<bool>("SELECT EXISTS (SELECT 1 FROM sharding.dist_node)", &[])
            .ok()
            .flatten()
            .unwrap_or(false);
        if !has_nodes {
            return;
        }
        match crate::commands::shard_ops::cleanup_old_placements() {
            Ok(0) => {}
            Ok(n) => pgrx::log!("pg_sharding: dropped {n} old shard placement(s) left by moves"),
            Err(error) => pgrx::log!("pg_sharding: cleanup of old placements failed: {}", error.message),
        }
        match crate::commands::leftovers::clear(false) {
            Ok(0) => {}
            Ok(n) => pgrx::log!("pg_sharding: removed {n} object(s) left by interrupted moves and splits"),
            Err(error) => pgrx::log!("pg_sharding: cleanup after interrupted moves and splits failed: {}", error.message),
        }
        match super::recovery::recover() {
            Ok(outcomes) => {
                for outcome in outcomes.iter().filter(|o| o.action != "in progress") {
                    pgrx::log!("pg_sharding recovery: {} {} on node {}", outcome.action, outcome.gid, outcome.node);
                }
            }
            Err(error) => pgrx::log!("pg_sharding recovery failed: {}", error.message),
        }
    });
}
