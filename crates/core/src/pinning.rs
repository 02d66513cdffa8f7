//! Which shard group a statement is pinned to: equivalence classes of distribution columns.
//!
//! The planner reports facts it found in a statement's predicates: "column key A equals column
//! key B" (a join on distribution columns) and "column key A equals value V" (a constant or a
//! parameter). A statement can run on one shard group when every distributed table's
//! distribution column lies in one class that holds at least one value: then every row any part
//! of the statement can see hashes to that value's shard. Which facts are sound to report
//! (conjuncts of WHERE and inner joins, not the inside of an outer join's nullable side) is the
//! caller's business; this module only does the bookkeeping.

use std::collections::HashMap;
use std::hash::Hash;

#[derive(Debug)]
pub struct Pinning<K, V> {
    parent: Vec<usize>,
    ids: HashMap<K, usize>,
    values: Vec<(usize, V)>,
}

impl<K: Eq + Hash + Clone, V: Clone> Default for Pinning<K, V> {
    fn default() -> Self {
        Self { parent: Vec::new(), ids: HashMap::new(), values: Vec::new() }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Pinning<K, V> {
    fn id(&mut self, key: &K) -> usize {
        if let Some(&id) = self.ids.get(key) {
            return id;
        }
        let id = self.parent.len();
        self.parent.push(id);
        self.ids.insert(key.clone(), id);
        id
    }

    fn root(&mut self, mut id: usize) -> usize {
        while self.parent[id] != id {
            self.parent[id] = self.parent[self.parent[id]];
            id = self.parent[id];
        }
        id
    }

    /// `a = b` holds for every row the statement produces.
    pub fn equal(&mut self, a: &K, b: &K) {
        let (a, b) = (self.id(a), self.id(b));
        let (a, b) = (self.root(a), self.root(b));
        if a != b {
            self.parent[a] = b;
        }
    }

    /// `key = value` holds for every row the statement produces.
    pub fn pin(&mut self, key: &K, value: V) {
        let id = self.id(key);
        self.values.push((id, value));
    }

    /// The values pinning all of `keys` to one class, or `None` when the keys are not all in
    /// one class or that class has no value. (With several values, the statement's predicates
    /// require them to be equal: any one of them names the shard group.)
    pub fn single_group(&mut self, keys: &[K]) -> Option<Vec<V>> {
        let first = keys.first()?;
        let first = self.id(first);
        let root = self.root(first);
        for key in &keys[1..] {
            let id = self.id(key);
            if self.root(id) != root {
                return None;
            }
        }
        let values: Vec<(usize, V)> = self.values.clone();
        let pinned: Vec<V> = values.into_iter().filter(|(id, _)| self.root(*id) == root).map(|(_, v)| v).collect();
        (!pinned.is_empty()).then_some(pinned)
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Pinning<K, V> {
    /// Whether all `keys` lie in one class (values or not).
    pub fn connected(&mut self, keys: &[K]) -> bool {
        let Some(first) = keys.first() else { return false };
        let first = self.id(first);
        let root = self.root(first);
        keys[1..].iter().all(|key| {
            let id = self.id(key);
            self.root(id) == root
        })
    }

    /// The values of each key's class, when every key's class holds at least one.
    pub fn values_per_key(&mut self, keys: &[K]) -> Option<Vec<Vec<V>>> {
        let values: Vec<(usize, V)> = self.values.clone();
        let mut out = Vec::new();
        for key in keys {
            let id = self.id(key);
            let root = self.root(id);
            let mine: Vec<V> = values.iter().filter(|(v, _)| self.root(*v) == root).map(|(_, v)| v.clone()).collect();
            if mine.is_empty() {
                return None;
            }
            out.push(mine);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_table_pinned_by_a_value() {
        let mut p: Pinning<&str, i32> = Pinning::default();
        p.pin(&"a.id", 5);
        assert_eq!(p.single_group(&["a.id"]), Some(vec![5]));
        assert_eq!(p.single_group(&["b.id"]), None);
    }

    #[test]
    fn joins_carry_the_pin() {
        let mut p: Pinning<&str, i32> = Pinning::default();
        p.equal(&"a.id", &"b.user_id");
        p.equal(&"b.user_id", &"c.user_id");
        p.pin(&"c.user_id", 7);
        assert_eq!(p.single_group(&["a.id", "b.user_id", "c.user_id"]), Some(vec![7]));
    }

    #[test]
    fn separate_classes_are_not_one_group() {
        let mut p: Pinning<&str, i32> = Pinning::default();
        p.pin(&"a.id", 1);
        p.pin(&"b.id", 1);
        // Equal values, but nothing says the rows meet: two groups as far as planning knows.
        assert_eq!(p.single_group(&["a.id", "b.id"]), None);
    }

    #[test]
    fn several_values_are_all_reported() {
        let mut p: Pinning<&str, i32> = Pinning::default();
        p.pin(&"a.id", 1);
        p.equal(&"a.id", &"b.id");
        p.pin(&"b.id", 2);
        assert_eq!(p.single_group(&["a.id", "b.id"]), Some(vec![1, 2]));
    }

    #[test]
    fn values_per_key_needs_every_key_pinned() {
        let mut p: Pinning<&str, i32> = Pinning::default();
        p.pin(&"a.id", 1);
        p.pin(&"b.id", 2);
        assert_eq!(p.values_per_key(&["a.id", "b.id"]), Some(vec![vec![1], vec![2]]));
        assert_eq!(p.values_per_key(&["a.id", "c.id"]), None);
    }

    #[test]
    fn connected_without_values() {
        let mut p: Pinning<&str, i32> = Pinning::default();
        p.equal(&"a.id", &"b.id");
        assert!(p.connected(&["a.id", "b.id"]));
        assert!(!p.connected(&["a.id", "c.id"]));
        assert!(!p.connected(&[]));
    }

    #[test]
    fn no_keys_no_group() {
        let mut p: Pinning<&str, i32> = Pinning::default();
        assert_eq!(p.single_group(&[]), None);
    }
}
