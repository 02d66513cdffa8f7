//! Distributed transactions: worker connections that join the coordinator's transaction,
//! two-phase commit, and the recovery of what a failure left prepared.

pub mod deadlock;
pub mod fault;
pub mod maintenance;
pub mod recovery;
pub mod remote;
pub mod undo;
