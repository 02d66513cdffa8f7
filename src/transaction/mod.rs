//! Distributed transactions: worker connections that join the coordinator's transaction.

pub mod remote;
