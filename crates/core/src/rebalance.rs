//! Rebalance planning: which shard groups to move where so that nodes hold about the same.
//!
//! The unit is a shard group (the shards of one index in one colocation group: they move
//! together). Two strategies:
//! - `ByShardCount`: node group counts end up differing by at most one; each move takes the
//!   smallest group of the fullest node to the emptiest node (fewest bytes moved);
//! - `ByDiskSize`: node sizes end up within 10% of the mean where moves can get them there; each
//!   move takes, from the largest node to the smallest, the group that best evens the pair.
//!
//! The plan is a list of moves to run one after another; planning never reads anything.

use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    ByShardCount,
    ByDiskSize,
}

impl Strategy {
    pub fn parse(text: &str) -> Option<Strategy> {
        match text.trim().to_ascii_lowercase().as_str() {
            "by_shard_count" => Some(Strategy::ByShardCount),
            "by_disk_size" => Some(Strategy::ByDiskSize),
            _ => None,
        }
    }
}

/// One shard group as it is placed now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlacement {
    /// Any shard of the group (the move takes the others with it).
    pub shard_id: i64,
    pub node: i32,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    pub shard_id: i64,
    pub from: i32,
    pub to: i32,
    pub bytes: u64,
}

/// Plans the moves. `nodes`: the nodes that may hold shards (groups on other nodes are moved
/// off them first, as by a drain). The result is deterministic for the same input.
pub fn plan(nodes: &[i32], groups: &[GroupPlacement], strategy: Strategy) -> Vec<Move> {
    plan_with_base(nodes, groups, strategy, &BTreeMap::new())
}

/// Plans the moves for several colocation groups (`sets`, each the shard groups of one).
/// `ByShardCount` balances every colocation group on its own (each table ends up within one
/// shard of even), breaking ties towards the nodes holding fewer groups overall, so the totals
/// even out too; `ByDiskSize` balances the node totals over all groups together.
pub fn plan_colocated(nodes: &[i32], sets: &[Vec<GroupPlacement>], strategy: Strategy) -> Vec<Move> {
    if strategy == Strategy::ByDiskSize {
        let all: Vec<GroupPlacement> = sets.iter().flatten().cloned().collect();
        return plan(nodes, &all, strategy);
    }
    let mut base: BTreeMap<i32, u64> = nodes.iter().map(|n| (*n, 0)).collect();
    for group in sets.iter().flatten() {
        if let Some(count) = base.get_mut(&group.node) {
            *count += 1;
        }
    }
    let mut moves = Vec::new();
    for set in sets {
        let planned = plan_with_base(nodes, set, strategy, &base);
        for m in &planned {
            if let Some(count) = base.get_mut(&m.from) {
                *count -= 1;
            }
            *base.entry(m.to).or_default() += 1;
        }
        moves.extend(planned);
    }
    moves
}

/// `plan`, with ties between nodes of equal load broken by `base` (lower first for a target,
/// higher first for a source).
fn plan_with_base(nodes: &[i32], groups: &[GroupPlacement], strategy: Strategy, base: &BTreeMap<i32, u64>) -> Vec<Move> {
    if nodes.is_empty() {
        return Vec::new();
    }
    let mut on: BTreeMap<i32, Vec<GroupPlacement>> = nodes.iter().map(|n| (*n, Vec::new())).collect();
    let mut moves = Vec::new();
    let mut stranded: Vec<GroupPlacement> = Vec::new();
    for group in groups {
        match on.get_mut(&group.node) {
            Some(list) => list.push(group.clone()),
            None => stranded.push(group.clone()),
        }
    }
    // Groups on nodes that may not hold shards go to the emptiest allowed node first.
    stranded.sort_by_key(|g| (std::cmp::Reverse(g.bytes), g.shard_id));
    for group in stranded {
        let to = lightest(&on, strategy, base);
        moves.push(Move { shard_id: group.shard_id, from: group.node, to, bytes: group.bytes });
        on.get_mut(&to).expect("known node").push(GroupPlacement { node: to, ..group });
    }
    // Each move strictly reduces the spread, so this ends; the bound is a safety net.
    for _ in 0..=groups.len() * nodes.len() {
        let Some(next) = next_move(&on, strategy, base) else { break };
        let list = on.get_mut(&next.from).expect("known node");
        let at = list.iter().position(|g| g.shard_id == next.shard_id).expect("group on its node");
        let group = list.remove(at);
        on.get_mut(&next.to).expect("known node").push(GroupPlacement { node: next.to, ..group });
        moves.push(next);
    }
    moves
}

fn load(list: &[GroupPlacement], strategy: Strategy) -> u64 {
    match strategy {
        Strategy::ByShardCount => list.len() as u64,
        Strategy::ByDiskSize => list.iter().map(|g| g.bytes).sum(),
    }
}

fn lightest(on: &BTreeMap<i32, Vec<GroupPlacement>>, strategy: Strategy, base: &BTreeMap<i32, u64>) -> i32 {
    *on.iter()
        .min_by_key(|(node, list)| (load(list, strategy), base.get(*node).copied().unwrap_or(0), **node))
        .map(|(node, _)| node)
        .expect("nodes")
}

fn heaviest(on: &BTreeMap<i32, Vec<GroupPlacement>>, strategy: Strategy, base: &BTreeMap<i32, u64>) -> i32 {
    *on.iter()
        .max_by_key(|(node, list)| (load(list, strategy), base.get(*node).copied().unwrap_or(0), std::cmp::Reverse(**node)))
        .map(|(node, _)| node)
        .expect("nodes")
}

fn next_move(on: &BTreeMap<i32, Vec<GroupPlacement>>, strategy: Strategy, base: &BTreeMap<i32, u64>) -> Option<Move> {
    let (from, to) = (heaviest(on, strategy, base), lightest(on, strategy, base));
    let (high, low) = (load(&on[&from], strategy), load(&on[&to], strategy));
    match strategy {
        Strategy::ByShardCount => {
            if high <= low + 1 {
                return None;
            }
            let group = on[&from].iter().min_by_key(|g| (g.bytes, g.shard_id))?;
            Some(Move { shard_id: group.shard_id, from, to, bytes: group.bytes })
        }
        Strategy::ByDiskSize => {
            let total: u64 = on.values().map(|l| load(l, strategy)).sum();
            let mean = total as f64 / on.len() as f64;
            if mean == 0.0 || (high as f64 - mean) <= mean * 0.10 && (mean - low as f64) <= mean * 0.10 {
                return None;
            }
            // The group that leaves the pair closest to even; it must shrink the gap.
            let gap = high - low;
            let group = on[&from]
                .iter()
                .filter(|g| g.bytes > 0 && g.bytes < gap)
                .min_by_key(|g| ((gap as i128 - 2 * g.bytes as i128).unsigned_abs(), g.shard_id))?;
            Some(Move { shard_id: group.shard_id, from, to, bytes: group.bytes })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_colocation_group_is_balanced_and_the_totals_too() {
        // A 12-shard table and a 3-shard table on nodes 1 and 2; node 3 new.
        let twelve: Vec<GroupPlacement> =
            (0..12).map(|i| GroupPlacement { shard_id: 100 + i, node: 1 + (i as i32 % 2), bytes: 10 }).collect();
        let three: Vec<GroupPlacement> =
            (0..3).map(|i| GroupPlacement { shard_id: 200 + i, node: 1 + (i as i32 % 2), bytes: 10 }).collect();
        let sets = vec![three.clone(), twelve.clone()];
        let moves = plan_colocated(&[1, 2, 3], &sets, Strategy::ByShardCount);
        let all: Vec<GroupPlacement> = sets.iter().flatten().cloned().collect();
        let per_set = |set: &[GroupPlacement]| {
            let moved: Vec<Move> = moves.iter().filter(|m| set.iter().any(|g| g.shard_id == m.shard_id)).cloned().collect();
            counts(&[1, 2, 3], set, &moved)
        };
        assert_eq!(per_set(&twelve).values().copied().collect::<Vec<_>>(), vec![4, 4, 4]);
        assert!(per_set(&three).values().all(|c| *c == 1), "{:?}", per_set(&three));
        assert_eq!(counts(&[1, 2, 3], &all, &moves).values().copied().collect::<Vec<_>>(), vec![5, 5, 5]);
        assert_eq!(moves.len(), 5, "as few moves as that takes: {moves:?}");
    }

    fn groups(spec: &[(i32, u64)]) -> Vec<GroupPlacement> {
        spec.iter().enumerate().map(|(i, (node, bytes))| GroupPlacement { shard_id: 100 + i as i64, node: *node, bytes: *bytes }).collect()
    }

    fn counts(nodes: &[i32], groups: &[GroupPlacement], moves: &[Move]) -> BTreeMap<i32, usize> {
        let mut at: BTreeMap<i64, i32> = groups.iter().map(|g| (g.shard_id, g.node)).collect();
        for m in moves {
            assert_eq!(at[&m.shard_id], m.from, "a move starts where the group is");
            at.insert(m.shard_id, m.to);
        }
        let mut out: BTreeMap<i32, usize> = nodes.iter().map(|n| (*n, 0)).collect();
        for node in at.values() {
            *out.get_mut(node).expect("moved to an allowed node") += 1;
        }
        out
    }

    #[test]
    fn a_new_empty_node_gets_its_share() {
        let nodes = [1, 2, 3];
        let g = groups(&[(1, 10), (1, 20), (1, 30), (1, 40), (2, 10), (2, 20), (2, 30), (2, 40)]);
        let moves = plan(&nodes, &g, Strategy::ByShardCount);
        let c = counts(&nodes, &g, &moves);
        let (min, max) = (c.values().min().unwrap(), c.values().max().unwrap());
        assert!(max - min <= 1, "{c:?}");
        assert_eq!(moves.len(), 2, "as few moves as possible: {moves:?}");
        assert!(moves.iter().all(|m| m.to == 3));
        assert!(moves.iter().all(|m| m.bytes == 10), "the smallest groups move: {moves:?}");
    }

    #[test]
    fn a_balanced_cluster_needs_no_moves() {
        let nodes = [1, 2];
        let g = groups(&[(1, 5), (2, 5), (1, 5)]);
        assert!(plan(&nodes, &g, Strategy::ByShardCount).is_empty());
        assert!(plan(&nodes, &[], Strategy::ByShardCount).is_empty());
        assert!(plan(&[], &g, Strategy::ByShardCount).is_empty());
    }

    #[test]
    fn groups_on_excluded_nodes_are_moved_off() {
        let nodes = [1, 2];
        let g = groups(&[(3, 1), (3, 2), (3, 3), (1, 1)]);
        let moves = plan(&nodes, &g, Strategy::ByShardCount);
        let c = counts(&nodes, &g, &moves);
        assert_eq!(c.values().sum::<usize>(), 4);
        assert!(c.values().max().unwrap() - c.values().min().unwrap() <= 1, "{c:?}");
    }

    #[test]
    fn disk_size_balances_bytes_not_counts() {
        let nodes = [1, 2];
        // Node 1: one huge group and small ones; node 2: small ones.
        let g = groups(&[(1, 1000), (1, 100), (1, 100), (2, 100), (2, 100), (2, 100)]);
        let moves = plan(&nodes, &g, Strategy::ByDiskSize);
        let mut size: BTreeMap<i32, u64> = BTreeMap::new();
        let mut at: BTreeMap<i64, i32> = g.iter().map(|x| (x.shard_id, x.node)).collect();
        for m in &moves {
            at.insert(m.shard_id, m.to);
        }
        for x in &g {
            *size.entry(at[&x.shard_id]).or_default() += x.bytes;
        }
        // 1500 bytes in all: the huge group cannot be split, so the best is 1000 / 500.
        assert_eq!(size[&1], 1000, "{moves:?}");
        assert_eq!(size[&2], 500);
        assert!(moves.iter().all(|m| m.bytes == 100), "only small groups move: {moves:?}");
    }

    #[test]
    fn strategies_parse() {
        assert_eq!(Strategy::parse("by_shard_count"), Some(Strategy::ByShardCount));
        assert_eq!(Strategy::parse(" BY_DISK_SIZE "), Some(Strategy::ByDiskSize));
        assert_eq!(Strategy::parse("random"), None);
    }
}

/// Coefficient of variation (standard deviation / mean, population) of per-node figures: 0
/// when perfectly even; None without nodes or when everything is zero.
pub fn coefficient_of_variation(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    if mean == 0.0 {
        return None;
    }
    let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
    Some(variance.sqrt() / mean)
}

#[cfg(test)]
mod cv_tests {
    use super::coefficient_of_variation as cv;

    #[test]
    fn coefficient_of_variation_measures_skew() {
        assert_eq!(cv(&[]), None);
        assert_eq!(cv(&[0.0, 0.0]), None);
        assert_eq!(cv(&[5.0, 5.0, 5.0]), Some(0.0));
        // mean 2, population stddev 2: cv 1.
        assert!((cv(&[0.0, 4.0]).unwrap() - 1.0).abs() < 1e-12);
        assert!((cv(&[1.0, 2.0, 3.0]).unwrap() - (2.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
    }
}
