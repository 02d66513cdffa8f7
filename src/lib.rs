//! pg_sharding: turns a coordinator and worker PostgreSQL servers into one distributed database.
//!
//! This file is the extension's entry point and nothing else: `_PG_init` refuses to load unless
//! the library is preloaded, defines the GUCs and registers every callback and hook in one place.

use pgrx::prelude::*;

mod catalog;
mod commands;
mod connection;
mod copy;
mod deparse;
mod error;
mod executor;
mod guc;
mod planner;
mod routing;
mod stats;
mod transaction;

pgrx::pg_module_magic!(name, version);

// Catalog tables first, so functions and views can refer to them.
pgrx::extension_sql_file!("../sql/catalog.sql", name = "catalog", bootstrap);
// Triggers and privileges last, once every function exists.
pgrx::extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

/// The extension version the SQL objects were created with must match this library.
pub const EXTENSION_VERSION: &str = env!("CARGO_PKG_VERSION");

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: reading a plain bool global set by the postmaster; backends are single-threaded.
    let preloading = unsafe { *std::ptr::addr_of!(pg_sys::process_shared_preload_libraries_in_progress) };
    if !preloading {
        error::ShardingError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_sharding must be loaded via shared_preload_libraries",
        )
        .hint(
            "Add pg_sharding to shared_preload_libraries in postgresql.conf \
             (shared_preload_libraries = 'pg_sharding') and restart the server.",
        )
        .raise();
    }
    guc::define();
    stats::init();
    catalog::cache::register_invalidation_callback();
    transaction::fault::define();
    transaction::remote::register_callbacks();
    transaction::maintenance::register();
    commands::utility::install();
    executor::remote_scan::register();
    planner::scan_path::install();
}

// The in-database test tier lives in pgrx-tests/ at the top of the repository.
#[cfg(any(test, feature = "pg_test"))]
#[path = "../pgrx-tests/mod.rs"]
mod pgrx_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["shared_preload_libraries = 'pg_sharding'", "max_prepared_transactions = 10"]
    }
}
