//! Buffers rows per shard (COPY text format) and streams them into the shard's placements with
//! `COPY ... FROM STDIN`, inside the distributed transaction. Memory stays bounded: a shard's
//! buffer is flushed when it passes `FLUSH_BYTES`.

use std::collections::HashMap;
use std::rc::Rc;

use crate::catalog::cache;
use crate::catalog::nodes::Node;
use crate::deparse::quote;
use crate::error::{Result, ShardingError};
use crate::transaction::remote;
use pgrx::PgSqlErrorCode;

const FLUSH_BYTES: usize = 256 * 1024;

struct Target {
    copy_sql: String,
    nodes: Vec<Node>,
    buffer: Vec<u8>,
}

pub struct ShardWriter {
    targets: HashMap<i64, Target>,
    pub rows: u64,
}

impl ShardWriter {
    /// `shards`: (shard id, qualified shard name, placement node ids); `columns`: the column
    /// names the rows carry, in order.
    pub fn new(shards: &[(i64, String, Vec<i32>)], columns: &[String]) -> Result<ShardWriter> {
        let all_nodes: Rc<Vec<Node>> = cache::nodes()?;
        let column_list = columns.iter().map(|c| quote::ident(c)).collect::<Vec<_>>().join(", ");
        let mut targets = HashMap::new();
        for (shard_id, name, placements) in shards {
            let nodes = placements
                .iter()
                .map(|id| {
                    all_nodes.iter().find(|n| n.node_id == *id).cloned().ok_or_else(|| {
                        ShardingError::new(
                            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
                            format!("shard {shard_id} is placed on node {id}, which is not registered"),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            targets.insert(
                *shard_id,
                Target { copy_sql: format!("COPY {name} ({column_list}) FROM STDIN"), nodes, buffer: Vec::new() },
            );
        }
        Ok(ShardWriter { targets, rows: 0 })
    }

    /// Appends one encoded row (ending in a newline) for `shard_id`.
    pub fn push(&mut self, shard_id: i64, row: &[u8]) -> Result<()> {
        let target = self
            .targets
            .get_mut(&shard_id)
            .ok_or_else(|| ShardingError::internal(format!("no COPY target for shard {shard_id}")))?;
        target.buffer.extend_from_slice(row);
        self.rows += 1;
        if target.buffer.len() >= FLUSH_BYTES {
            flush(target)?;
        }
        Ok(())
    }

    /// Sends everything still buffered.
    pub fn finish(mut self) -> Result<u64> {
        for target in self.targets.values_mut() {
            flush(target)?;
        }
        Ok(self.rows)
    }
}

fn flush(target: &mut Target) -> Result<()> {
    if target.buffer.is_empty() {
        return Ok(());
    }
    for node in &target.nodes {
        let connection = remote::in_transaction(node)?;
        connection.copy_start(&target.copy_sql).map_err(|e| remote::remote_error(node, e))?;
        if let Err(error) = connection.copy_data(&target.buffer) {
            let _ = connection.copy_end(Some("pg_sharding: sending rows failed"));
            return Err(remote::remote_error(node, error));
        }
        connection.copy_end(None).map_err(|e| remote::remote_error(node, e))?;
    }
    target.buffer.clear();
    Ok(())
}
