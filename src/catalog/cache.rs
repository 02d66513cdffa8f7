//! Backend-local cache of catalog metadata.
//!
//! Loaded through SPI on first use and kept until a catalog table changes. Changes are noticed
//! through PostgreSQL's relcache invalidation: a statement trigger on each catalog table
//! (`sharding.catalog_changed`) sends an invalidation for that table, which every backend
//! receives at commit (and this backend at the next command, or again on abort), and the
//! callback registered in `_PG_init` drops the cache.

use std::cell::RefCell;
use std::ffi::CString;
use std::rc::Rc;

use pgrx::prelude::*;

use super::nodes::{self, Node};
use super::tables::{self, DistributedTable};

#[derive(Default)]
struct MetadataCache {
    /// OIDs of the catalog tables, resolved when the cache was filled.
    catalog_oids: Vec<pg_sys::Oid>,
    nodes: Option<Rc<Vec<Node>>>,
    /// Per relation: its distribution metadata, or `None` for "not distributed" (cached too,
    /// since every table a query touches is looked up).
    tables: std::collections::HashMap<pg_sys::Oid, Option<Rc<DistributedTable>>>,
    /// How many times the node list was loaded: exposed for tests of the invalidation path.
    loads: i64,
}

thread_local! {
    // Backends are single-threaded; thread_local keeps this free of `static mut`.
    static CACHE: RefCell<MetadataCache> = RefCell::new(MetadataCache::default());
    /// Set by the invalidation callback (which must not touch the cache itself: it may run in
    /// the middle of a load); readers drop the cache before using it. An invalidation arriving
    /// during a load leaves the flag set, so that load's result is dropped at the next read.
    static STALE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Counts invalidations of distributed tables (their definitions may have changed):
    /// statements prepared on the workers before are prepared again (transaction/remote.rs).
    static DEFINITIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Changes whenever a distributed table's definition may have changed.
pub fn definitions_generation() -> u64 {
    DEFINITIONS.with(|d| d.get())
}

fn drop_if_stale() {
    if STALE.with(|s| s.replace(false)) {
        CACHE.with(|c| {
            let mut cache = c.borrow_mut();
            cache.nodes = None;
            cache.tables.clear();
        });
    }
}

/// Runs a catalog load with the latest snapshot instead of the statement's: a statement that
/// waited for a lock (behind a shard move, say) took its snapshot before the wait, and metadata
/// read with it would be cached stale with no invalidation left to drop it. (PostgreSQL reads
/// its own catalogs the same way, with a fresh catalog snapshot.)
fn with_latest_snapshot<T>(load: impl FnOnce() -> crate::error::Result<T>) -> crate::error::Result<T> {
    // SAFETY: pushed here and popped below, also when the load unwinds.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(load));
    // SAFETY: pops exactly the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    match result {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Every registered node (active or not), from the cache.
pub fn nodes() -> crate::error::Result<Rc<Vec<Node>>> {
    drop_if_stale();
    if let Some(cached) = CACHE.with(|c| c.borrow().nodes.clone()) {
        return Ok(cached);
    }
    let loaded = Rc::new(with_latest_snapshot(nodes::load_all)?);
    let oids = catalog_oids();
    CACHE.with(|c| {
        let mut cache = c.borrow_mut();
        cache.catalog_oids = oids;
        cache.nodes = Some(loaded.clone());
        cache.loads += 1;
    });
    Ok(loaded)
}

/// Distribution metadata of `relid`, `None` when it is not a distributed or reference table.
pub fn table(relid: pg_sys::Oid) -> crate::error::Result<Option<Rc<DistributedTable>>> {
    drop_if_stale();
    if let Some(cached) = CACHE.with(|c| c.borrow().tables.get(&relid).cloned()) {
        if let Some(table) = &cached {
            table.check_snapshot()?;
        }
        return Ok(cached);
    }
    let loaded = with_latest_snapshot(|| tables::load(relid))?.map(Rc::new);
    let oids = catalog_oids();
    CACHE.with(|c| {
        let mut cache = c.borrow_mut();
        cache.catalog_oids = oids;
        cache.tables.insert(relid, loaded.clone());
    });
    if let Some(table) = &loaded {
        table.check_snapshot()?;
    }
    Ok(loaded)
}

thread_local! {
    /// True while metadata is being loaded: the planner hook sees the catalog's own queries
    /// then, and must not look them up again.
    static LOADING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `table()` for hooks: `None` while this backend is itself loading metadata.
pub fn table_unless_reentrant(relid: pg_sys::Oid) -> crate::error::Result<Option<Rc<DistributedTable>>> {
    if LOADING.with(|l| l.get()) {
        return Ok(None);
    }
    LOADING.with(|l| l.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| table(relid)));
    LOADING.with(|l| l.set(false));
    match result {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// True when pg_sharding's catalog exists in this database (hooks run in every database,
/// also before CREATE EXTENSION and during DROP EXTENSION). Two syscache lookups, no SPI.
pub fn extension_active() -> bool {
    let schema = CString::new(super::SCHEMA).expect("static name");
    let table = CString::new("dist_table").expect("static name");
    // SAFETY: syscache lookups with NUL-terminated names.
    unsafe {
        let namespace = pg_sys::get_namespace_oid(schema.as_ptr(), true);
        namespace != pg_sys::InvalidOid && pg_sys::get_relname_relid(table.as_ptr(), namespace) != pg_sys::InvalidOid
    }
}

fn catalog_oids() -> Vec<pg_sys::Oid> {
    let schema = CString::new(super::SCHEMA).expect("static name");
    // SAFETY: plain syscache lookups with NUL-terminated names, inside a transaction.
    unsafe {
        let namespace = pg_sys::get_namespace_oid(schema.as_ptr(), true);
        if namespace == pg_sys::InvalidOid {
            return Vec::new();
        }
        super::CATALOG_TABLES
            .iter()
            .map(|table| {
                let name = CString::new(*table).expect("static name");
                pg_sys::get_relname_relid(name.as_ptr(), namespace)
            })
            .filter(|oid| *oid != pg_sys::InvalidOid)
            .collect()
    }
}

/// Relcache callback: `relid` is the invalidated relation, or InvalidOid for "everything".
/// Must not access the catalog or raise errors: it only drops cached values. A distributed
/// table's own invalidation counts too: its cached name (and so its shards' names) may have
/// changed (ALTER TABLE ... RENAME).
#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let (ours, distributed) = CACHE.with(|c| match c.try_borrow() {
        Ok(cache) => {
            let distributed = relid == pg_sys::InvalidOid || matches!(cache.tables.get(&relid), Some(Some(_)));
            (distributed || cache.catalog_oids.contains(&relid), distributed)
        }
        Err(_) => (true, true),
    });
    if distributed {
        DEFINITIONS.with(|d| d.set(d.get() + 1));
    }
    if ours {
        STALE.with(|s| s.set(true));
    }
}

pub fn register_invalidation_callback() {
    // SAFETY: called once from _PG_init; the callback is a plain function that lives forever.
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_invalidation), pg_sys::Datum::from(0));
    }
}

/// Statement trigger on every catalog table: broadcast a relcache invalidation for the table,
/// which drops the metadata caches of all backends once this transaction commits.
#[pg_trigger]
fn catalog_changed<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let relid = trigger.relid()?;
    // SAFETY: relid is the trigger's own table, which exists for the whole statement.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relid) };
    Ok(None)
}

/// How many times this backend loaded the node list into its metadata cache (for tests of
/// invalidation: the count must not grow per statement, only per catalog change).
#[pg_extern(volatile, parallel_unsafe)]
fn metadata_cache_loads() -> i64 {
    CACHE.with(|c| c.borrow().loads)
}
