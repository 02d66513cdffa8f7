//! Running tasks (one statement per shard or shard group) on the workers at the same time.
//!
//! Each node's tasks go over that node's connection of the distributed transaction (so a
//! transaction reads its own writes), one after another; different nodes work in parallel,
//! multiplexed in one wait loop over non-blocking libpq. Rows are handed to the caller as they
//! arrive.

use std::collections::VecDeque;
use std::ffi::CString;
use std::rc::Rc;

use crate::catalog::nodes::Node;
use crate::connection::{wait_any_readable, Poll, RemoteConnection, RemoteResult, ResultKind, TaskParam};
use crate::error::Result;
use crate::transaction::remote;

pub struct Task {
    pub node: Node,
    pub sql: CString,
    /// This task's own parameters, instead of the ones all tasks share (rows meant for its
    /// shard only, see remote_scan.rs).
    pub params: Option<Vec<TaskParam>>,
}

struct NodeQueue<'a> {
    node: &'a Node,
    connection: Rc<RemoteConnection>,
    waiting: VecDeque<&'a Task>,
    running: bool,
    /// A task was just sent: its answer cannot be there yet, so wait before reading.
    just_sent: bool,
    /// Statements may be prepared on this connection (the node's session keeps track of them).
    prepared: bool,
}

/// Runs every task; `on_row` gets each row (a single-row result). Returns the sum of the
/// affected-row counts of the tasks' command tags. The first error (from a node or from
/// `on_row`) ends the run; the transaction's abort then cancels what still runs.
///
/// `access`: how the tasks use the nodes (see `remote::Access`): reads outside the
/// distributed transaction may spread over several connections per node.
/// Tasks with parameters use statements prepared once per connection.
pub fn run(
    tasks: &[Task],
    params: &[TaskParam],
    binary: bool,
    access: remote::Access,
    mut on_row: impl FnMut(&RemoteResult) -> Result<()>,
) -> Result<u64> {
    let mut queues: Vec<NodeQueue<'_>> = Vec::new();
    let mut nodes: Vec<(&Node, Vec<&Task>)> = Vec::new();
    for task in tasks {
        match nodes.iter_mut().find(|(node, _)| node.node_id == task.node.node_id) {
            Some((_, list)) => list.push(task),
            None => nodes.push((&task.node, vec![task])),
        }
    }
    let per_node = crate::guc::MAX_CONNECTIONS_PER_NODE.get().max(1) as usize;
    for (node, list) in nodes {
        let session = remote::for_statement(node, access)?;
        // Reads outside the distributed transaction may spread a node's tasks over several
        // connections; otherwise the node's session runs them one after another.
        let mut connections = vec![(session, true)];
        if access == remote::Access::Autocommit && !remote::in_transaction_on(node) && list.len() > 1 && per_node > 1 {
            for extra in remote::extra_connections(node, (per_node - 1).min(list.len() - 1))? {
                connections.push((extra, false));
            }
        }
        let count = connections.len();
        for (i, (connection, is_session)) in connections.into_iter().enumerate() {
            queues.push(NodeQueue {
                node,
                connection,
                waiting: list.iter().skip(i).step_by(count).copied().collect(),
                running: false,
                just_sent: false,
                prepared: is_session,
            });
        }
    }
    let mut affected = 0u64;
    // Statements of the distributed transaction (they hold and wait for row locks) look for a
    // distributed deadlock once they have waited this long, and again after each period.
    let deadlock_after = match crate::guc::DISTRIBUTED_DEADLOCK_TIMEOUT.get() {
        ms if ms > 0 && access != remote::Access::Autocommit => Some(std::time::Duration::from_millis(ms as u64)),
        _ => None,
    };
    let mut next_check: Option<std::time::Instant> = None;
    loop {
        let mut progress = false;
        for queue in queues.iter_mut() {
            if !queue.running {
                if let Some(task) = queue.waiting.pop_front() {
                    let params = task.params.as_deref().unwrap_or(params);
                    let sent = if params.is_empty() || !queue.prepared {
                        queue.connection.send_task(&task.sql, params, binary)
                    } else {
                        let types: Vec<u32> = params.iter().map(|p| p.type_oid).collect();
                        let name = remote::prepared_statement(queue.node, &queue.connection, &task.sql, &types)?;
                        queue.connection.send_prepared_task(&name, params, binary)
                    };
                    sent.map_err(|e| remote::remote_error(queue.node, e))?;
                    queue.running = true;
                    queue.just_sent = true;
                    progress = true;
                }
                continue;
            }
            if std::mem::take(&mut queue.just_sent) {
                continue;
            }
            loop {
                match queue.connection.poll().map_err(|e| remote::remote_error(queue.node, e))? {
                    Poll::Busy => break,
                    Poll::Ready(None) => {
                        queue.running = false;
                        progress = true;
                        break;
                    }
                    Poll::Ready(Some(result)) => {
                        progress = true;
                        match result.kind() {
                            ResultKind::Row => on_row(&result)?,
                            ResultKind::EndOfRows { affected: n } => affected += n,
                            ResultKind::Command { affected: n } => affected += n,
                            ResultKind::Error(error) => return Err(remote::remote_error(queue.node, error)),
                        }
                    }
                }
            }
        }
        if queues.iter().all(|q| !q.running && q.waiting.is_empty()) {
            return Ok(affected);
        }
        if !progress {
            let busy: Vec<&RemoteConnection> = queues.iter().filter(|q| q.running).map(|q| &*q.connection).collect();
            let Some(period) = deadlock_after else {
                wait_any_readable(&busy, None).map_err(|e| remote::remote_error(queues[0].node, e))?;
                continue;
            };
            let due = *next_check.get_or_insert_with(|| std::time::Instant::now() + period);
            let left = due.saturating_duration_since(std::time::Instant::now());
            wait_any_readable(&busy, Some(left)).map_err(|e| remote::remote_error(queues[0].node, e))?;
            if std::time::Instant::now() >= due {
                crate::transaction::deadlock::check()?;
                next_check = Some(std::time::Instant::now() + period);
            }
        } else {
            next_check = None;
        }
    }
}
