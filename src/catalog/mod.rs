//! The pg_sharding catalog: tables in schema `sharding` (see sql/catalog.sql), typed access to
//! their rows, and the backend-local cache that hot paths read instead of running SPI.

pub mod cache;
pub mod nodes;

/// Schema that holds the catalog and the extension's functions.
pub const SCHEMA: &str = "sharding";

/// Catalog tables whose changes invalidate the metadata cache.
pub const CATALOG_TABLES: &[&str] =
    &["dist_node", "dist_colocation", "dist_table", "dist_shard", "dist_placement"];
