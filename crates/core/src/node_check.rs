//! Rules for admitting a server into the cluster as a worker node.
//!
//! The extension gathers facts about a candidate node over libpq; this module decides, so the
//! rules are testable without servers. Each rejection maps to one SQLSTATE and one hint.

/// What the coordinator learned about a candidate node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// `extversion` of pg_sharding on the node, `None` when the extension is not installed.
    pub extension_version: Option<String>,
    /// `max_prepared_transactions` on the node (two-phase commit needs it above zero).
    pub max_prepared_transactions: i64,
    /// True when the node is a hot standby (read-only, cannot hold shards).
    pub in_recovery: bool,
    /// `system_identifier` from pg_control_system(): the same server reached by another address
    /// reports the same value.
    pub system_identifier: i64,
    /// When the node's postmaster started (`pg_postmaster_start_time()`, in microseconds): tells
    /// this coordinator apart from a copy of its data directory listening on the same port
    /// elsewhere.
    pub started_at: i64,
}

/// The coordinator running the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoordinatorFacts {
    pub version: String,
    pub system_identifier: i64,
    pub port: i32,
    pub started_at: i64,
}

/// What an admitted node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Worker,
    /// This coordinator itself: its placements run in the coordinator's backends, inside their
    /// own transactions (no remote transaction, so no prepared transactions needed).
    Coordinator,
}

/// A node the catalog already knows, as far as admission is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownNode {
    pub node_id: i32,
    pub host: String,
    pub port: i32,
    pub system_identifier: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    ExtensionMissing,
    VersionMismatch { coordinator: String, node: String },
    PreparedTransactionsDisabled,
    InRecovery,
    SameServerAs { node_id: i32, host: String, port: i32 },
}

/// Decides whether a node with `facts`, listening on `port`, may join `coordinator`, and
/// whether it is the coordinator itself (same system identifier, port and start time).
///
/// Two servers are taken to be the same when they share system identifier and port: copies of
/// one data directory share the identifier, but on one port only one of them can listen per host.
pub fn check_node(facts: &NodeFacts, port: i32, coordinator: &CoordinatorFacts, known: &[KnownNode]) -> Result<Admission, Rejection> {
    let node_version = facts.extension_version.as_deref().ok_or(Rejection::ExtensionMissing)?;
    if node_version != coordinator.version {
        return Err(Rejection::VersionMismatch {
            coordinator: coordinator.version.clone(),
            node: node_version.to_string(),
        });
    }
    if let Some(same) = known
        .iter()
        .find(|n| n.system_identifier == Some(facts.system_identifier) && n.port == port)
    {
        return Err(Rejection::SameServerAs {
            node_id: same.node_id,
            host: same.host.clone(),
            port: same.port,
        });
    }
    if facts.system_identifier == coordinator.system_identifier && port == coordinator.port && facts.started_at == coordinator.started_at {
        return Ok(Admission::Coordinator);
    }
    if facts.in_recovery {
        return Err(Rejection::InRecovery);
    }
    if facts.max_prepared_transactions <= 0 {
        return Err(Rejection::PreparedTransactionsDisabled);
    }
    Ok(Admission::Worker)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> NodeFacts {
        NodeFacts {
            extension_version: Some("0.1.0".into()),
            max_prepared_transactions: 100,
            in_recovery: false,
            system_identifier: 42,
            started_at: 1000,
        }
    }

    fn coordinator() -> CoordinatorFacts {
        CoordinatorFacts { version: "0.1.0".into(), system_identifier: 7, port: 9700, started_at: 500 }
    }

    fn check(facts: &NodeFacts, known: &[KnownNode]) -> Result<Admission, Rejection> {
        check_node(facts, 9701, &coordinator(), known)
    }

    #[test]
    fn healthy_node_is_admitted() {
        assert_eq!(check(&healthy(), &[]), Ok(Admission::Worker));
    }

    #[test]
    fn missing_extension_comes_first() {
        let facts = NodeFacts { extension_version: None, max_prepared_transactions: 0, ..healthy() };
        assert_eq!(check(&facts, &[]), Err(Rejection::ExtensionMissing));
    }

    #[test]
    fn version_must_match_exactly() {
        let facts = NodeFacts { extension_version: Some("0.0.9".into()), ..healthy() };
        assert_eq!(
            check(&facts, &[]),
            Err(Rejection::VersionMismatch { coordinator: "0.1.0".into(), node: "0.0.9".into() })
        );
    }

    #[test]
    fn prepared_transactions_must_be_enabled() {
        let facts = NodeFacts { max_prepared_transactions: 0, ..healthy() };
        assert_eq!(check(&facts, &[]), Err(Rejection::PreparedTransactionsDisabled));
    }

    #[test]
    fn standby_is_refused() {
        let facts = NodeFacts { in_recovery: true, ..healthy() };
        assert_eq!(check(&facts, &[]), Err(Rejection::InRecovery));
    }

    #[test]
    fn the_coordinator_itself_is_admitted_as_such() {
        // Its own placements need no prepared transactions (they are part of its transactions).
        let facts = NodeFacts { system_identifier: 7, started_at: 500, max_prepared_transactions: 0, ..healthy() };
        assert_eq!(check_node(&facts, 9700, &coordinator(), &[]), Ok(Admission::Coordinator));
        // Same identifier on another port is a copy of the data directory, not the coordinator.
        let copy = NodeFacts { system_identifier: 7, started_at: 500, ..healthy() };
        assert_eq!(check_node(&copy, 9701, &coordinator(), &[]), Ok(Admission::Worker));
        // So is a copy listening on the same port on another host (it started at another time).
        let elsewhere = NodeFacts { system_identifier: 7, started_at: 900, ..healthy() };
        assert_eq!(check_node(&elsewhere, 9700, &coordinator(), &[]), Ok(Admission::Worker));
        // Registered twice under two names: a duplicate.
        let known = vec![KnownNode { node_id: 1, host: "localhost".into(), port: 9700, system_identifier: Some(7) }];
        assert!(matches!(check_node(&facts, 9700, &coordinator(), &known), Err(Rejection::SameServerAs { node_id: 1, .. })));
    }

    #[test]
    fn same_server_under_another_address_is_a_duplicate() {
        let known = vec![KnownNode {
            node_id: 3,
            host: "localhost".into(),
            port: 9701,
            system_identifier: Some(42),
        }];
        assert_eq!(
            check(&healthy(), &known),
            Err(Rejection::SameServerAs { node_id: 3, host: "localhost".into(), port: 9701 })
        );
        let other_port = vec![KnownNode { port: 9702, ..known[0].clone() }];
        assert_eq!(check(&healthy(), &other_port), Ok(Admission::Worker));
    }
}
