//! Distributed deadlocks: a wait-for graph between coordinator transactions, gathered from
//! every node's lock waits, and the choice of the transaction to cancel.
//!
//! Each node only sees its own waits; a cycle that runs through several nodes is visible only
//! once the edges of all of them are joined under the coordinator transactions that own the
//! remote backends. Every transaction in the cycle that waits long enough looks at the graph;
//! only the youngest (latest start, then highest id) cancels itself, so one cycle costs one
//! transaction.

use std::collections::{BTreeMap, BTreeSet};

/// The transaction to cancel for a cycle through `me`: the youngest on some cycle that
/// contains `me`, or None when `me` is on no cycle. `edges`: (waiter, holder) pairs of
/// coordinator backends; `started`: each backend's transaction start (missing: oldest).
pub fn victim(edges: &[(i32, i32)], me: i32, started: &BTreeMap<i32, i64>) -> Option<i32> {
    let mut next: BTreeMap<i32, BTreeSet<i32>> = BTreeMap::new();
    for (waiter, holder) in edges {
        if waiter != holder {
            next.entry(*waiter).or_default().insert(*holder);
        }
    }
    // Backends that `me` waits for, directly or not, and that wait for `me` in turn: exactly
    // the members of the cycles through `me`.
    let reach_from_me = reachable(&next, me);
    if !reach_from_me.contains(&me) {
        return None;
    }
    let mut back: BTreeMap<i32, BTreeSet<i32>> = BTreeMap::new();
    for (waiter, holders) in &next {
        for holder in holders {
            back.entry(*holder).or_default().insert(*waiter);
        }
    }
    let reach_to_me = reachable(&back, me);
    reach_from_me
        .intersection(&reach_to_me)
        .copied()
        .max_by_key(|pid| (started.get(pid).copied().unwrap_or(i64::MIN), *pid))
}

/// Nodes reachable from `start` in one or more steps.
fn reachable(next: &BTreeMap<i32, BTreeSet<i32>>, start: i32) -> BTreeSet<i32> {
    let mut seen = BTreeSet::new();
    let mut pending: Vec<i32> = next.get(&start).map(|s| s.iter().copied().collect()).unwrap_or_default();
    while let Some(node) = pending.pop() {
        if seen.insert(node) {
            if let Some(more) = next.get(&node) {
                pending.extend(more.iter().copied());
            }
        }
    }
    seen
}

/// The coordinator backend that owns a worker connection, from the connection's
/// application_name (`<prefix><pid>`).
pub fn owner_pid(application_name: &str, prefix: &str) -> Option<i32> {
    application_name.strip_prefix(prefix)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(list: &[(i32, i64)]) -> BTreeMap<i32, i64> {
        list.iter().copied().collect()
    }

    #[test]
    fn no_cycle_no_victim() {
        let s = started(&[(1, 10), (2, 20), (3, 30)]);
        assert_eq!(victim(&[(1, 2), (2, 3)], 1, &s), None);
        assert_eq!(victim(&[], 1, &s), None);
        assert_eq!(victim(&[(1, 1)], 1, &s), None, "a backend never waits for itself");
    }

    #[test]
    fn the_youngest_of_the_cycle_is_chosen_by_everyone_in_it() {
        let s = started(&[(1, 10), (2, 30), (3, 20), (4, 99)]);
        // 1 -> 2 -> 3 -> 1, and 4 waits for 1 outside the cycle (younger, but not in it).
        let edges = [(1, 2), (2, 3), (3, 1), (4, 1)];
        for me in [1, 2, 3] {
            assert_eq!(victim(&edges, me, &s), Some(2), "seen from {me}");
        }
        assert_eq!(victim(&edges, 4, &s), None, "4 only waits; the cycle is not its to break");
    }

    #[test]
    fn ties_on_start_time_go_by_pid() {
        let s = started(&[(5, 7), (6, 7)]);
        assert_eq!(victim(&[(5, 6), (6, 5)], 5, &s), Some(6));
        assert_eq!(victim(&[(5, 6), (6, 5)], 6, &s), Some(6));
    }

    #[test]
    fn owners_come_from_application_names() {
        assert_eq!(owner_pid("pg_sharding:42:1234", "pg_sharding:42:"), Some(1234));
        assert_eq!(owner_pid("pg_sharding:43:1234", "pg_sharding:42:"), None, "another coordinator");
        assert_eq!(owner_pid("psql", "pg_sharding:42:"), None);
    }
}
