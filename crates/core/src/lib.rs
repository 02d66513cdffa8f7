//! The parts of pg_sharding that are plain logic: no PostgreSQL, no I/O.
//! Everything here is unit-tested with `cargo test -p sharding_core` in milliseconds;
//! the extension crate only feeds it facts read from catalogs and remote nodes.

pub mod array_literal;
pub mod copy_text;
pub mod counters;
pub mod foreign_key;
pub mod hash;
pub mod interval;
pub mod node_check;
pub mod pinning;
pub mod rebalance;
pub mod sql_template;
pub mod statement_cache;
pub mod subxact;
pub mod table_def;
pub mod twophase;
pub mod waitgraph;
