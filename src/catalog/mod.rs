//! The pg_sharding catalog: tables in schema `sharding` (see sql/catalog.sql), typed access to
//! their rows, and the backend-local cache that hot paths read instead of running SPI.

pub mod cache;
pub mod nodes;
pub mod tables;

/// Schema that holds the catalog and the extension's functions.
pub const SCHEMA: &str = "sharding";

/// Catalog tables whose changes invalidate the metadata cache.
pub const CATALOG_TABLES: &[&str] =
    &["dist_node", "dist_colocation", "dist_table", "dist_shard", "dist_placement"];

/// Runs catalog writes with the extension owner's rights when the caller is not a superuser:
/// the commands check what the caller may do (ownership of the table), and the catalog itself
/// stays closed to direct writes. The previous user is restored afterwards (and by abort).
pub fn as_catalog_owner<T>(f: impl FnOnce() -> crate::error::Result<T>) -> crate::error::Result<T> {
    use pgrx::prelude::*;
    // SAFETY: reads the current user's superuser flag.
    if unsafe { pg_sys::superuser() } {
        return f();
    }
    let owner = Spi::get_one::<pg_sys::Oid>(
        "SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'pg_sharding'",
    )?
    .ok_or_else(|| crate::error::ShardingError::internal("pg_sharding is not installed"))?;
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: saves and switches the user id the way SECURITY DEFINER functions do.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(owner, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    // SAFETY: restores exactly what was saved above.
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
    match result {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}
