//! COPY between the coordinator and shards.

pub mod shard_writer;
