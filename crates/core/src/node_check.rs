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
    IsCoordinator,
    SameServerAs { node_id: i32, host: String, port: i32 },
}

/// Decides whether a node with `facts`, listening on `port`, may join a coordinator running
/// `coordinator_version` whose own system identifier is `coordinator_system_id`.
///
/// Two servers are taken to be the same when they share system identifier and port: copies of
/// one data directory share the identifier, but on one port only one of them can listen per host.
pub fn check_node(
    facts: &NodeFacts,
    port: i32,
    coordinator_version: &str,
    coordinator_system_id: i64,
    coordinator_port: i32,
    known: &[KnownNode],
) -> Result<(), Rejection> {
    let node_version = facts.extension_version.as_deref().ok_or(Rejection::ExtensionMissing)?;
    if node_version != coordinator_version {
        return Err(Rejection::VersionMismatch {
            coordinator: coordinator_version.to_string(),
            node: node_version.to_string(),
        });
    }
    if facts.system_identifier == coordinator_system_id && port == coordinator_port {
        return Err(Rejection::IsCoordinator);
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
    if facts.in_recovery {
        return Err(Rejection::InRecovery);
    }
    if facts.max_prepared_transactions <= 0 {
        return Err(Rejection::PreparedTransactionsDisabled);
    }
    Ok(())
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
        }
    }

    fn check(facts: &NodeFacts, known: &[KnownNode]) -> Result<(), Rejection> {
        check_node(facts, 9701, "0.1.0", 7, 9700, known)
    }

    #[test]
    fn healthy_node_is_admitted() {
        assert_eq!(check(&healthy(), &[]), Ok(()));
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
    fn coordinator_cannot_be_its_own_worker() {
        let facts = NodeFacts { system_identifier: 7, ..healthy() };
        assert_eq!(check_node(&facts, 9700, "0.1.0", 7, 9700, &[]), Err(Rejection::IsCoordinator));
        // Same identifier on another port is a copy of the data directory, not the coordinator.
        assert_eq!(check_node(&facts, 9701, "0.1.0", 7, 9700, &[]), Ok(()));
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
        assert_eq!(check(&healthy(), &other_port), Ok(()));
    }
}
