//! Running tasks (one statement per shard or shard group) on the workers at the same time.
//!
//! Each node's tasks go over that node's connection of the distributed transaction (so a
//! transaction reads its own writes), one after another; different nodes work in parallel,
//! multiplexed in one wait loop over non-blocking libpq. Rows are handed to the caller as they
//! arrive; a caller that streams them may pause the run after any row and resume it later.

use std::collections::VecDeque;
use std::rc::Rc;

use crate::catalog::nodes::Node;
use crate::connection::{wait_any_readable, Poll, RemoteConnection, RemoteResult, ResultKind, TaskParam};
use crate::error::Result;
use crate::transaction::remote;

pub struct Task {
    pub node: Node,
    pub sql: std::ffi::CString,
    /// This task's own parameters, instead of the ones all tasks share (rows meant for its
    /// shard only, see remote_scan.rs).
    pub params: Option<Vec<TaskParam>>,
    /// The role whose connections run it, when its tables are read with another role's
    /// rights (a view's owner's, see `connection::run_as`); 0: the current role.
    pub run_as: u32,
}

/// What the caller wants after a row.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// Return from `TaskRun::pump` now; the rest stays where it is until the next call.
    Pause,
}

struct NodeQueue {
    node: Node,
    connection: Rc<RemoteConnection>,
    /// Indexes of the tasks still to send.
    waiting: VecDeque<usize>,
    running: bool,
    /// A task was just sent: its answer cannot be there yet, so wait before reading.
    just_sent: bool,
    /// Statements may be prepared on this connection (the node's session keeps track of them).
    prepared: bool,
    /// The running task's last result (its command's end or error) has been read.
    ended: bool,
}

/// Tasks under way: the connections they use and the tasks each still has to send.
pub struct TaskRun {
    queues: Vec<NodeQueue>,
    /// The sum of the affected-row counts of the command tags read so far.
    affected: u64,
    deadlock_after: Option<std::time::Duration>,
    next_check: Option<std::time::Instant>,
    /// The queue that delivered the last row: reading resumes there, where libpq most likely
    /// has more rows buffered.
    current: usize,
    /// A streamed run's connections, given back to the pool when it ends.
    leases: Vec<remote::Leased>,
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
    let mut run = TaskRun::start(tasks, access)?;
    run.pump(tasks, params, binary, |row| on_row(row).map(|()| Flow::Continue))?;
    Ok(run.affected())
}

/// A node, the indexes of its tasks, and the connections to run them on (`true`: the node's
/// session).
type NodeConnections<'a> = (&'a Node, Vec<usize>, Vec<(Rc<RemoteConnection>, bool)>);

/// The tasks' indexes by node (and role), nodes in the order of their first task.
fn by_node(tasks: &[Task]) -> Vec<(&Node, Vec<usize>)> {
    let mut nodes: Vec<(&Node, Vec<usize>)> = Vec::new();
    for (index, task) in tasks.iter().enumerate() {
        match nodes.iter_mut().find(|(node, list)| node.node_id == task.node.node_id && tasks[list[0]].run_as == task.run_as) {
            Some((_, list)) => list.push(index),
            None => nodes.push((&task.node, vec![index])),
        }
    }
    nodes
}

impl TaskRun {
    /// Takes the connections for `tasks` (nothing is sent yet): each node's session, and for
    /// reads outside the distributed transaction extra connections to spread them over.
    pub fn start(tasks: &[Task], access: remote::Access) -> Result<Self> {
        let per_node = crate::guc::MAX_CONNECTIONS_PER_NODE.get().max(1) as usize;
        let mut connections = Vec::new();
        for (node, list) in by_node(tasks) {
            let _role = crate::connection::run_as(tasks[list[0]].run_as);
            let mut mine = vec![(remote::for_statement(node, access)?, true)];
            if access == remote::Access::Autocommit && !remote::in_transaction_on(node) && list.len() > 1 && per_node > 1 {
                for extra in remote::extra_connections(node, (per_node - 1).min(list.len() - 1))? {
                    mine.push((extra, false));
                }
            }
            connections.push((node, list, mine));
        }
        Ok(Self::new(connections, access, Vec::new()))
    }

    /// `start` for a read outside the distributed transaction whose rows the caller reads
    /// while other statements may run (a function evaluated per row may query the same
    /// nodes): its tasks use connections leased for it alone, not the node sessions. None when
    /// a node has no connection to spare (see `remote::extra_connections`).
    pub fn start_streamed(tasks: &[Task]) -> Result<Option<Self>> {
        let per_node = crate::guc::MAX_CONNECTIONS_PER_NODE.get().max(1) as usize;
        let mut connections = Vec::new();
        let mut leases = Vec::new();
        for (node, list) in by_node(tasks) {
            let _role = crate::connection::run_as(tasks[list[0]].run_as);
            let leased = remote::lease_connections(node, per_node.min(list.len()))?;
            if leased.is_empty() {
                leases.into_iter().for_each(remote::give_back);
                return Ok(None);
            }
            connections.push((node, list, leased.iter().map(|l| (l.connection.clone(), false)).collect()));
            leases.extend(leased);
        }
        Ok(Some(Self::new(connections, remote::Access::Autocommit, leases)))
    }

    /// Deals each node's tasks out over its connections (`true`: the node's session).
    fn new(connections: Vec<NodeConnections<'_>>, access: remote::Access, leases: Vec<remote::Leased>) -> Self {
        let mut queues = Vec::new();
        for (node, list, mine) in connections {
            let count = mine.len();
            for (i, (connection, is_session)) in mine.into_iter().enumerate() {
                queues.push(NodeQueue {
                    node: node.clone(),
                    connection,
                    waiting: list.iter().skip(i).step_by(count).copied().collect(),
                    running: false,
                    just_sent: false,
                    prepared: is_session && !node.is_coordinator,
                    ended: false,
                });
            }
        }
        // The coordinator's own placements run when their task is sent, in this backend: the
        // nodes' tasks go out first, so that they work meanwhile.
        queues.sort_by_key(|q| q.node.is_coordinator);
        // Statements of the distributed transaction (they hold and wait for row locks) look for
        // a distributed deadlock once they have waited this long, and again after each period.
        let deadlock_after = match crate::guc::DISTRIBUTED_DEADLOCK_TIMEOUT.get() {
            ms if ms > 0 && access != remote::Access::Autocommit => Some(std::time::Duration::from_millis(ms as u64)),
            _ => None,
        };
        TaskRun { queues, affected: 0, deadlock_after, next_check: None, current: 0, leases }
    }

    pub fn affected(&self) -> u64 {
        self.affected
    }

    /// Sends the tasks and reads their results until all have finished (true) or `on_row`
    /// asks for a pause (false). `tasks` and `params` are the ones given to `start`.
    pub fn pump(
        &mut self,
        tasks: &[Task],
        params: &[TaskParam],
        binary: bool,
        mut on_row: impl FnMut(&RemoteResult) -> Result<Flow>,
    ) -> Result<bool> {
        loop {
            let mut progress = false;
            let count = self.queues.len();
            for turn in 0..count {
                let at = (self.current + turn) % count.max(1);
                let queue = &mut self.queues[at];
                if !queue.running {
                    if let Some(index) = queue.waiting.pop_front() {
                        let task = &tasks[index];
                        let params = task.params.as_deref().unwrap_or(params);
                        let sent = if params.is_empty() || !queue.prepared {
                            queue.connection.send_task(&task.sql, params, binary)
                        } else {
                            let types: Vec<u32> = params.iter().map(|p| p.type_oid).collect();
                            let name = remote::prepared_statement(&queue.node, &queue.connection, &task.sql, &types)?;
                            queue.connection.send_prepared_task(&name, params, binary)
                        };
                        sent.map_err(|e| remote::remote_error(&queue.node, e))?;
                        queue.running = true;
                        queue.ended = false;
                        queue.just_sent = true;
                        progress = true;
                    }
                    continue;
                }
                if std::mem::take(&mut queue.just_sent) {
                    continue;
                }
                loop {
                    match queue.connection.poll().map_err(|e| remote::remote_error(&queue.node, e))? {
                        Poll::Busy => break,
                        Poll::Ready(None) if !queue.ended => {
                            // Never read as "no more rows": something else took the connection.
                            return Err(remote::remote_error(
                                &queue.node,
                                crate::connection::RemoteError::local("the connection ended a task's results before their end"),
                            ));
                        }
                        Poll::Ready(None) => {
                            queue.running = false;
                            progress = true;
                            break;
                        }
                        Poll::Ready(Some(result)) => {
                            progress = true;
                            match result.kind() {
                                ResultKind::Row => {
                                    if on_row(&result)? == Flow::Pause {
                                        self.current = at;
                                        return Ok(false);
                                    }
                                }
                                ResultKind::EndOfRows { affected: n } | ResultKind::Command { affected: n } => {
                                    self.affected += n;
                                    queue.ended = true;
                                }
                                ResultKind::Error(error) => return Err(remote::remote_error(&queue.node, error)),
                            }
                        }
                    }
                }
            }
            if self.queues.iter().all(|q| !q.running && q.waiting.is_empty()) {
                self.leases.drain(..).for_each(remote::give_back);
                return Ok(true);
            }
            if !progress {
                self.wait()?;
            } else {
                self.next_check = None;
                // While rows keep coming no wait notices a cancel or a timeout: here it does.
                pgrx::check_for_interrupts!();
            }
        }
    }

    /// Waits for a running task to send something (and looks for distributed deadlocks when
    /// the wait is long).
    fn wait(&mut self) -> Result<()> {
        let busy: Vec<&RemoteConnection> = self.queues.iter().filter(|q| q.running).map(|q| &*q.connection).collect();
        let label = &self.queues[0].node;
        let Some(period) = self.deadlock_after else {
            return wait_any_readable(&busy, None).map_err(|e| remote::remote_error(label, e));
        };
        let due = *self.next_check.get_or_insert_with(|| std::time::Instant::now() + period);
        let left = due.saturating_duration_since(std::time::Instant::now());
        wait_any_readable(&busy, Some(left)).map_err(|e| remote::remote_error(label, e))?;
        if std::time::Instant::now() >= due {
            crate::transaction::deadlock::check()?;
            self.next_check = Some(std::time::Instant::now() + period);
        }
        Ok(())
    }

    /// Ends a run whose rows are no longer wanted: tasks not sent yet are dropped; running
    /// ones that finish within a moment (an EXISTS or LIMIT that stopped early usually leaves
    /// little) are read to their end, the others cancelled, which costs a new connection to
    /// the node each, and read to their end. The connections go back to the pool; one that
    /// does not get back to idle is closed.
    pub fn stop(&mut self) {
        let deadline = std::time::Instant::now() + STOP_GRACE;
        for queue in self.queues.iter_mut() {
            queue.waiting.clear();
        }
        loop {
            for queue in self.queues.iter_mut().filter(|q| q.running) {
                loop {
                    match queue.connection.poll() {
                        Ok(Poll::Busy) | Err(_) => break,
                        Ok(Poll::Ready(None)) => {
                            queue.running = false;
                            break;
                        }
                        Ok(Poll::Ready(Some(_))) => {}
                    }
                }
            }
            let busy: Vec<&RemoteConnection> = self.queues.iter().filter(|q| q.running).map(|q| &*q.connection).collect();
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if busy.is_empty() || left.is_zero() || wait_any_readable(&busy, Some(left)).is_err() {
                break;
            }
        }
        for queue in self.queues.iter_mut().filter(|q| q.running) {
            queue.running = false;
            queue.connection.cancel_and_drain(STOP_TIMEOUT);
        }
        self.leases.drain(..).for_each(remote::give_back);
    }
}

impl Drop for TaskRun {
    /// A streamed run dropped while its tasks run (an error ended the statement, or a
    /// subtransaction holding the cursor aborted): the nodes are told to cancel them, and
    /// the connections, not given back, close.
    fn drop(&mut self) {
        if self.leases.is_empty() {
            return;
        }
        for queue in self.queues.iter().filter(|q| q.running) {
            queue.connection.cancel();
        }
    }
}

/// How long `TaskRun::stop` reads what its tasks still send before it cancels them.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(5);
/// How long `TaskRun::stop` waits for a node to stop a task.
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
