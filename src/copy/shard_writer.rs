//! Buffers rows per shard (COPY text format) and streams them into the shard's placements with
//! `COPY ... FROM STDIN`, inside the distributed transaction. Memory stays bounded: a shard's
//! buffer is flushed when it passes `FLUSH_BYTES`.
//!
//! Flushes are pipelined: the coordinator does not wait for a node to finish inserting a batch
//! before it goes on parsing; it collects that COPY's outcome just before the node's next
//! batch (one COPY in flight per node connection), and all of them at the end.

use std::collections::HashMap;
use std::rc::Rc;

use crate::catalog::cache;
use crate::catalog::nodes::Node;
use crate::deparse::quote;
use crate::error::{Result, ShardingError};
use crate::transaction::remote;
use pgrx::PgSqlErrorCode;

/// A shard's buffer is sent once it holds this much (times 1 to 2, staggered per shard so that
/// shards filling at the same rate do not all flush at the same moment)...
const FLUSH_BYTES: usize = 512 * 1024;
/// ...unless its node is still inserting the previous batch: then it keeps buffering, up to
/// this much, before the coordinator waits. Memory is bounded by shards x MAX_BUFFER_BYTES.
const MAX_BUFFER_BYTES: usize = 2 * 1024 * 1024;

struct Target {
    copy_sql: String,
    nodes: Vec<Node>,
    buffer: Vec<u8>,
    flush_at: usize,
    /// Rows sent to this shard (for the shard counters).
    rows: u64,
}

pub struct ShardWriter {
    targets: HashMap<i64, Target>,
    /// Nodes with a COPY whose outcome has not been read yet.
    in_flight: HashMap<i32, Node>,
    pub rows: u64,
    /// The role whose connections take the rows (see `connection::run_as`); 0: the current one.
    pub run_as: u32,
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
            let stagger = (targets.len() % 32) * FLUSH_BYTES / 32;
            targets.insert(
                *shard_id,
                Target {
                    copy_sql: format!("COPY {name} ({column_list}) FROM STDIN"),
                    nodes,
                    buffer: Vec::new(),
                    flush_at: FLUSH_BYTES + stagger,
                    rows: 0,
                },
            );
        }
        Ok(ShardWriter { targets, in_flight: HashMap::new(), rows: 0, run_as: 0 })
    }

    /// Appends one encoded row (ending in a newline) for `shard_id`.
    pub fn push(&mut self, shard_id: i64, row: &[u8]) -> Result<()> {
        let target = self
            .targets
            .get_mut(&shard_id)
            .ok_or_else(|| ShardingError::internal(format!("no COPY target for shard {shard_id}")))?;
        target.buffer.extend_from_slice(row);
        target.rows += 1;
        self.rows += 1;
        if target.buffer.len() >= target.flush_at
            && (target.buffer.len() >= MAX_BUFFER_BYTES || !any_busy(target, &self.in_flight)?)
        {
            flush(target, &mut self.in_flight, self.run_as)?;
        }
        Ok(())
    }

    /// Sends everything still buffered and waits for every node to finish.
    pub fn finish(mut self) -> Result<u64> {
        for target in self.targets.values_mut() {
            flush(target, &mut self.in_flight, self.run_as)?;
        }
        for (_, node) in std::mem::take(&mut self.in_flight) {
            settle(&node)?;
        }
        for (shard_id, target) in &self.targets {
            if target.rows > 0 {
                crate::stats::count_writes(&[*shard_id], target.rows);
            }
        }
        Ok(self.rows)
    }
}

/// True when a placement node of `target` is still busy with an earlier batch.
fn any_busy(target: &Target, in_flight: &HashMap<i32, Node>) -> Result<bool> {
    for node in &target.nodes {
        if in_flight.contains_key(&node.node_id)
            && remote::open_connection(node)?.is_busy().map_err(|e| remote::remote_error(node, e))?
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Reads the outcome of the COPY in flight on `node`'s connection.
fn settle(node: &Node) -> Result<()> {
    let connection = remote::open_connection(node)?;
    connection.drain_results().map(|_| ()).map_err(|e| remote::remote_error(node, e))
}

fn flush(target: &mut Target, in_flight: &mut HashMap<i32, Node>, run_as: u32) -> Result<()> {
    if target.buffer.is_empty() {
        return Ok(());
    }
    for node in &target.nodes {
        if let Some(previous) = in_flight.remove(&node.node_id) {
            settle(&previous)?;
        }
        let connection = {
            let _role = crate::connection::run_as(run_as);
            remote::in_transaction(node)?
        };
        connection.copy_start(&target.copy_sql).map_err(|e| remote::remote_error(node, e))?;
        if let Err(error) = connection.copy_data(&target.buffer) {
            let _ = connection.copy_end(Some("pg_sharding: sending rows failed"));
            return Err(remote::remote_error(node, error));
        }
        connection.copy_end_async().map_err(|e| remote::remote_error(node, e))?;
        in_flight.insert(node.node_id, node.clone());
    }
    target.buffer.clear();
    Ok(())
}
