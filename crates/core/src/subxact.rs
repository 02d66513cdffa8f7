//! Savepoints of one remote transaction, following the coordinator's subtransactions.
//!
//! Savepoints are created lazily: a remote transaction gets `SAVEPOINT` only for the
//! coordinator subtransactions that are open when it is next used, so a PL/pgSQL exception
//! block that never touches a node costs that node nothing. Subtransaction ids grow
//! monotonically and a child's id is larger than its parent's, which is all the bookkeeping
//! below relies on.
//!
//! A committed (released) subtransaction's savepoint is not released at once: the release is
//! sent with the next savepoint created (one round trip for both), or never, when the remote
//! transaction ends first or an outer savepoint is rolled back to.

pub type SubId = u32;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteSavepoints {
    /// The coordinator subtransaction that was current when the remote transaction began.
    opened_in: SubId,
    /// Subtransactions that have a savepoint on the node, outermost first.
    created: Vec<SubId>,
    /// Savepoints of committed subtransactions still to be released on the node.
    to_release: Vec<SubId>,
}

/// What the node must do when a coordinator subtransaction rolls back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnAbort {
    /// The remote transaction began inside the subtransaction: roll it back whole.
    RollbackTransaction,
    /// `ROLLBACK TO SAVEPOINT` and `RELEASE SAVEPOINT` of this subtransaction's savepoint.
    RollbackTo(SubId),
    /// The node did nothing inside the subtransaction.
    Nothing,
}

/// Statements that bring the node's savepoints in line before it is used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catchup {
    pub release: Option<SubId>,
    pub create: Vec<SubId>,
}

impl Catchup {
    pub fn is_empty(&self) -> bool {
        self.release.is_none() && self.create.is_empty()
    }
}

impl RemoteSavepoints {
    /// A remote transaction begun while `current` was the coordinator's subtransaction.
    pub fn begun_in(current: SubId) -> Self {
        Self { opened_in: current, created: Vec::new(), to_release: Vec::new() }
    }

    /// Before the node is used while `open` (the coordinator's open subtransactions, outermost
    /// first) are in progress: the savepoints to create, and a release to send first. Call
    /// `caught_up` once the node has run them.
    pub fn catchup(&self, open: &[SubId]) -> Catchup {
        let create: Vec<SubId> =
            open.iter().copied().filter(|id| *id > self.opened_in && !self.created.contains(id)).collect();
        // Releasing the outermost pending savepoint releases every one above it too.
        let release = if create.is_empty() { None } else { self.to_release.iter().copied().min() };
        Catchup { release, create }
    }

    pub fn caught_up(&mut self, done: &Catchup) {
        if done.release.is_some() {
            self.to_release.clear();
        }
        self.created.extend(done.create.iter().copied());
    }

    /// The coordinator subtransaction `id` committed: its work now belongs to its parent.
    pub fn subtransaction_committed(&mut self, id: SubId) {
        if let Some(at) = self.created.iter().position(|s| *s == id) {
            self.created.remove(at);
            self.to_release.push(id);
        }
    }

    /// The coordinator subtransaction `id` rolled back (its children have ended already).
    pub fn subtransaction_aborted(&mut self, id: SubId) -> OnAbort {
        if self.opened_in >= id {
            self.created.clear();
            self.to_release.clear();
            return OnAbort::RollbackTransaction;
        }
        // Savepoints above `id` vanish with the rollback, released or not.
        self.to_release.retain(|s| *s < id);
        match self.created.iter().position(|s| *s == id) {
            Some(at) => {
                self.created.truncate(at);
                OnAbort::RollbackTo(id)
            }
            None => {
                self.created.retain(|s| *s < id);
                OnAbort::Nothing
            }
        }
    }
}

/// The savepoint name used on the nodes for a coordinator subtransaction.
pub fn savepoint_name(id: SubId) -> String {
    format!("pgs_savepoint_{id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn savepoints_are_created_only_for_open_subtransactions_after_the_begin() {
        let mut s = RemoteSavepoints::begun_in(2);
        assert!(s.catchup(&[2]).is_empty(), "begun inside 2: no savepoint for it");
        let c = s.catchup(&[2, 3, 4]);
        assert_eq!(c, Catchup { release: None, create: vec![3, 4] });
        s.caught_up(&c);
        assert!(s.catchup(&[2, 3, 4]).is_empty());
    }

    #[test]
    fn rollback_to_a_savepoint_drops_it_and_those_above() {
        let mut s = RemoteSavepoints::begun_in(1);
        let c = s.catchup(&[2, 3]);
        s.caught_up(&c);
        assert_eq!(s.subtransaction_aborted(3), OnAbort::RollbackTo(3));
        assert_eq!(s.subtransaction_aborted(2), OnAbort::RollbackTo(2));
        assert_eq!(s.catchup(&[5]).create, vec![5]);
    }

    #[test]
    fn a_transaction_begun_in_an_aborted_subtransaction_rolls_back_whole() {
        let mut s = RemoteSavepoints::begun_in(4);
        let c = s.catchup(&[4, 6]);
        s.caught_up(&c);
        assert_eq!(s.subtransaction_aborted(6), OnAbort::RollbackTo(6));
        assert_eq!(s.subtransaction_aborted(4), OnAbort::RollbackTransaction);
    }

    #[test]
    fn untouched_subtransactions_cost_nothing() {
        let mut s = RemoteSavepoints::begun_in(1);
        assert_eq!(s.subtransaction_aborted(7), OnAbort::Nothing);
        s.subtransaction_committed(8);
        assert!(s.catchup(&[]).is_empty());
    }

    #[test]
    fn released_savepoints_go_out_with_the_next_savepoint() {
        // A loop of exception blocks: each iteration's savepoint is released by the next.
        let mut s = RemoteSavepoints::begun_in(1);
        for id in 2..6 {
            let c = s.catchup(&[id]);
            assert_eq!(c.create, vec![id]);
            assert_eq!(c.release, if id == 2 { None } else { Some(id - 1) });
            s.caught_up(&c);
            s.subtransaction_committed(id);
        }
        // A rollback of an outer savepoint makes pending releases moot.
        let mut s = RemoteSavepoints::begun_in(1);
        let c = s.catchup(&[2, 3]);
        s.caught_up(&c);
        s.subtransaction_committed(3);
        assert_eq!(s.subtransaction_aborted(2), OnAbort::RollbackTo(2));
        assert_eq!(s.catchup(&[9]), Catchup { release: None, create: vec![9] });
    }

    #[test]
    fn committed_child_work_rolls_back_with_its_parent() {
        let mut s = RemoteSavepoints::begun_in(1);
        let c = s.catchup(&[2, 3]);
        s.caught_up(&c);
        s.subtransaction_committed(3);
        // Parent 2 still has its savepoint: rolling it back undoes the child's work too.
        assert_eq!(s.subtransaction_aborted(2), OnAbort::RollbackTo(2));
        // A child savepoint created only after its parent's (parent used first, then child).
        let mut s = RemoteSavepoints::begun_in(1);
        let c = s.catchup(&[2]);
        s.caught_up(&c);
        let c = s.catchup(&[2, 5]);
        assert_eq!(c.create, vec![5]);
        s.caught_up(&c);
        s.subtransaction_committed(5);
        let c = s.catchup(&[2, 6]);
        assert_eq!(c, Catchup { release: Some(5), create: vec![6] });
    }
}
