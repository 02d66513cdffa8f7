//! Two-phase commit: which protocol a transaction commits with, the global ids of its prepared
//! remote transactions, and what recovery does with a prepared transaction it finds.
//!
//! The protocol (carried out by the extension's transaction callbacks):
//! 1. pre-commit: every remote transaction that wrote gets `PREPARE TRANSACTION gid`;
//! 2. one commit record per prepared transaction goes into a coordinator table, in the local
//!    transaction, whose commit is the decision;
//! 3. after the local commit, `COMMIT PREPARED gid` on every node (best effort);
//! 4. recovery finishes whatever step 3 did not, and rolls back what never got a decision.
//!
//! A global id names the coordinator (system identifier and database), the coordinator's own
//! transaction id and that transaction's start time, so recovery can tell its own prepared
//! transactions from anyone else's and ask whether the transaction that prepared one is still
//! running. The start time matters: after a coordinator crash, a transaction id that never
//! reached the disk is handed out again, and the new transaction must not be mistaken for the
//! old one (its commit record would then commit the old one's prepared transactions).

/// How the coordinator's commit finishes the remote transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitProtocol {
    /// Nothing was written anywhere remote: read-only remote transactions are just committed.
    ReadOnly,
    /// Exactly one participant wrote (one node, and nothing local): its COMMIT is the decision.
    OnePhase,
    /// Several participants wrote: prepare them all, then decide with the local commit.
    TwoPhase,
}

/// `remote_writers`: nodes whose remote transaction wrote (or holds row locks);
/// `local_wrote`: the coordinator's own transaction wrote (has a transaction id). The
/// coordinator counts as a participant: committing one node and then failing the local commit
/// would leave the two apart.
pub fn commit_protocol(remote_writers: usize, local_wrote: bool) -> CommitProtocol {
    match (remote_writers, local_wrote) {
        (0, _) => CommitProtocol::ReadOnly,
        (1, false) => CommitProtocol::OnePhase,
        _ => CommitProtocol::TwoPhase,
    }
}

/// The identity of the coordinator that prepares transactions: its system identifier and the
/// database's OID (prepared transactions are per database on the workers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coordinator {
    pub system_id: u64,
    pub database: u32,
}

/// The parts of one of our global transaction ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gid {
    pub coordinator: Coordinator,
    /// The coordinator transaction's full (64-bit) transaction id.
    pub transaction: u64,
    /// The coordinator transaction's start time (microseconds since 2000-01-01).
    pub started: i64,
    pub node_id: i32,
}

const PREFIX: &str = "pgs";

impl Coordinator {
    /// Every gid this coordinator makes starts with this (usable with LIKE: no wildcards in it).
    pub fn gid_prefix(&self) -> String {
        format!("{PREFIX}:{}:{}:", self.system_id, self.database)
    }
}

impl Gid {
    pub fn format(&self) -> String {
        format!("{}{}:{}:{}", self.coordinator.gid_prefix(), self.transaction, self.started, self.node_id)
    }

    /// Parses a gid made by `format`; anything else (another coordinator's format, a user's
    /// own prepared transaction) is `None`.
    pub fn parse(text: &str) -> Option<Gid> {
        let mut parts = text.split(':');
        if parts.next()? != PREFIX {
            return None;
        }
        let system_id = parts.next()?.parse().ok()?;
        let database = parts.next()?.parse().ok()?;
        let transaction = parts.next()?.parse().ok()?;
        let started = parts.next()?.parse().ok()?;
        let node_id = parts.next()?.parse().ok()?;
        if parts.next().is_some() {
            return None;
        }
        let gid = Gid { coordinator: Coordinator { system_id, database }, transaction, started, node_id };
        // Only the canonical spelling (no leading zeros, no '+'), so the text round-trips.
        (gid.format() == text).then_some(gid)
    }
}

/// What recovery does with one prepared transaction of ours found on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Commit,
    Rollback,
    /// The coordinator transaction that prepared it is still running: it decides.
    Leave,
}

/// What recovery knows about one prepared transaction. Recovery reads the commit records
/// first, then lists the prepared transactions, then asks the questions below in this order,
/// which makes the answer safe against transactions committing meanwhile:
/// - `recorded_before`: a commit record was visible before the list was taken;
/// - `owner_running`: the coordinator transaction is still in progress (asked after the list;
///   a transaction that reuses the id after a crash also answers yes, which only delays);
/// - `recorded_now`: a commit record for this exact gid is visible now, in a snapshot taken
///   after `owner_running` said no. (The commit log is not asked: after a crash it may
///   describe another transaction that got the same id.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evidence {
    pub recorded_before: bool,
    pub owner_running: bool,
    pub recorded_now: bool,
}

pub fn resolve(evidence: Evidence) -> Resolution {
    if evidence.recorded_before {
        // The decision was commit, and it is durable.
        return Resolution::Commit;
    }
    if evidence.owner_running {
        // It may still write its record and commit: not ours to decide.
        return Resolution::Leave;
    }
    // The owner has ended: its record is visible now if and only if it committed.
    if evidence.recorded_now {
        Resolution::Commit
    } else {
        Resolution::Rollback
    }
}

/// Whether a commit record can be deleted: its prepared transaction is gone from its node
/// (committed earlier, by the coordinator or by recovery) or recovery just committed it.
/// `listed`: recovery got the node's list of prepared transactions (the node answered).
/// Records are read before the list is taken, so a record's transaction was prepared before
/// the list: absent from the list means already finished.
pub fn record_resolved(listed: bool, still_prepared: bool, committed_now: bool) -> bool {
    listed && (!still_prepared || committed_now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn coordinator() -> Coordinator {
        Coordinator { system_id: 7312345678901234567, database: 16384 }
    }

    #[test]
    fn protocol_counts_the_coordinator_as_a_participant() {
        assert_eq!(commit_protocol(0, false), CommitProtocol::ReadOnly);
        assert_eq!(commit_protocol(0, true), CommitProtocol::ReadOnly);
        assert_eq!(commit_protocol(1, false), CommitProtocol::OnePhase);
        assert_eq!(commit_protocol(1, true), CommitProtocol::TwoPhase);
        assert_eq!(commit_protocol(2, false), CommitProtocol::TwoPhase);
        assert_eq!(commit_protocol(5, true), CommitProtocol::TwoPhase);
    }

    #[test]
    fn gids_round_trip_and_name_their_coordinator() {
        let gid = Gid { coordinator: coordinator(), transaction: (3u64 << 32) + 912, started: 817_000_123_456_789, node_id: 4 };
        let text = gid.format();
        assert_eq!(text, "pgs:7312345678901234567:16384:12884902800:817000123456789:4");
        assert!(text.starts_with(&coordinator().gid_prefix()));
        assert!(text.len() < 200, "PostgreSQL limits gids to 200 bytes");
        assert_eq!(Gid::parse(&text), Some(gid));
        let other = Coordinator { system_id: 1, database: 16384 };
        assert!(!text.starts_with(&other.gid_prefix()));
    }

    #[test]
    fn foreign_or_malformed_gids_are_not_ours() {
        for text in [
            "",
            "my_transaction",
            "pgs:1:2:3:4",
            "pgs:1:2:3:4:5:6",
            "pgs:1:2:x:4:5",
            "pgs:-1:2:3:4:5",
            "pgs:01:2:3:4:5",
            "pgs:1:2:+3:4:5",
            "citus_0_1_2_3",
        ] {
            assert_eq!(Gid::parse(text), None, "{text}");
        }
        assert!(Gid::parse("pgs:1:2:3:4:-5").is_some(), "node ids are signed integers");
        let a = Gid { coordinator: coordinator(), transaction: 900, started: 1, node_id: 1 };
        let b = Gid { started: 2, ..a };
        assert_ne!(a.format(), b.format(), "a transaction id reused after a crash makes another gid");
    }

    #[test]
    fn resolution_table() {
        let cases = [
            // recorded_before, owner_running, recorded_now -> resolution
            ((true, false, true), Resolution::Commit),
            ((true, true, true), Resolution::Commit),
            ((false, true, false), Resolution::Leave),
            ((false, true, true), Resolution::Leave),
            ((false, false, true), Resolution::Commit),
            ((false, false, false), Resolution::Rollback),
        ];
        for ((recorded_before, owner_running, recorded_now), expected) in cases {
            let evidence = Evidence { recorded_before, owner_running, recorded_now };
            assert_eq!(resolve(evidence), expected, "{evidence:?}");
        }
    }

    #[test]
    fn records_are_kept_until_their_node_answered() {
        assert!(!record_resolved(false, false, false), "node unreachable: keep");
        assert!(record_resolved(true, false, false), "no longer prepared: committed before");
        assert!(!record_resolved(true, true, false), "still prepared and not committed: keep");
        assert!(record_resolved(true, true, true), "committed by this recovery");
    }
}
