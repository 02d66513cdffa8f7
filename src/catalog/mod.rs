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

/// Reads one value of the first row, through read-only SPI. (pgrx's `Spi::get_one` helpers
/// run in read-write mode, which assigns a transaction id: every metadata read would make the
/// transaction a writing one, and DROP INDEX CONCURRENTLY would refuse to run after it.)
pub fn read_one<T: pgrx::FromDatum + pgrx::IntoDatum>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> crate::error::Result<Option<T>> {
    Ok(pgrx::Spi::connect(|client| client.select(sql, Some(1), args)?.first().get_one::<T>())?)
}

/// Two values of the first row, through read-only SPI.
pub fn read_two<A, B>(sql: &str, args: &[pgrx::datum::DatumWithOid<'_>]) -> crate::error::Result<(Option<A>, Option<B>)>
where
    A: pgrx::FromDatum + pgrx::IntoDatum,
    B: pgrx::FromDatum + pgrx::IntoDatum,
{
    Ok(pgrx::Spi::connect(|client| client.select(sql, Some(1), args)?.first().get_two::<A, B>())?)
}

/// The first row's first three columns of `sql`.
pub fn read_three<A, B, C>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> crate::error::Result<(Option<A>, Option<B>, Option<C>)>
where
    A: pgrx::FromDatum + pgrx::IntoDatum,
    B: pgrx::FromDatum + pgrx::IntoDatum,
    C: pgrx::FromDatum + pgrx::IntoDatum,
{
    Ok(pgrx::Spi::connect(|client| client.select(sql, Some(1), args)?.first().get_three::<A, B, C>())?)
}

/// Runs catalog writes with the extension owner's rights when the caller is not a superuser:
/// the commands check what the caller may do (ownership of the table), and the catalog itself
/// stays closed to direct writes. The previous user is restored afterwards (and by abort).
pub fn as_catalog_owner<T>(f: impl FnOnce() -> crate::error::Result<T>) -> crate::error::Result<T> {
    use pgrx::prelude::*;
    // SAFETY: reads the current user's superuser flag.
    if unsafe { pg_sys::superuser() } {
        return f();
    }
    let owner = read_one::<pg_sys::Oid>(
        "SELECT (SELECT extowner FROM pg_catalog.pg_extension WHERE extname = 'pg_sharding')",
        &[],
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
