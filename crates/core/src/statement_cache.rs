//! The bookkeeping of the coordinator's prepared statements for its own placements: which
//! statements are worth keeping, and which one to let go when the cache is full.
//!
//! A statement is kept the second time it is seen, not the first: statements that carry their
//! values as literals (a router query sent with the simple protocol) are each seen once, and
//! keeping them would only cost a second preparation and an eviction per statement. The least
//! recently used statement is evicted; the caller frees what `insert` hands back.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

pub struct StatementCache<K, V> {
    capacity: usize,
    entries: HashMap<K, (V, u64)>,
    /// Hashes of the keys seen once and not kept; forgotten all at once when it is full.
    seen: HashSet<u64>,
    /// Advances on every use, for the least recently used order.
    clock: u64,
}

impl<K: Hash + Eq + Clone, V> StatementCache<K, V> {
    /// A cache of at most `capacity` statements (at least one).
    pub fn new(capacity: usize) -> Self {
        StatementCache { capacity: capacity.max(1), entries: HashMap::new(), seen: HashSet::new(), clock: 0 }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The statement kept under `key`, now the most recently used.
    pub fn get(&mut self, key: &K) -> Option<&V> {
        self.clock += 1;
        let clock = self.clock;
        self.entries.get_mut(key).map(|(value, used)| {
            *used = clock;
            &*value
        })
    }

    /// Whether a statement not in the cache should be kept: true when it was seen before.
    /// The first sight is remembered (up to four times the capacity of sights).
    pub fn admit(&mut self, key: &K) -> bool {
        let hash = hash_of(key);
        if self.seen.remove(&hash) {
            return true;
        }
        if self.seen.len() >= self.capacity * 4 {
            self.seen.clear();
        }
        self.seen.insert(hash);
        false
    }

    /// Keeps `value` under `key`; the statements let go to make room (and the one `key` held
    /// before), for the caller to free.
    pub fn insert(&mut self, key: K, value: V) -> Vec<V> {
        self.clock += 1;
        let mut released = Vec::new();
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            let oldest = self.entries.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone());
            if let Some((value, _)) = oldest.and_then(|k| self.entries.remove(&k)) {
                released.push(value);
            }
        }
        if let Some((previous, _)) = self.entries.insert(key, (value, self.clock)) {
            released.push(previous);
        }
        released
    }

    /// Lets every statement go, for the caller to free.
    pub fn clear(&mut self) -> Vec<V> {
        self.seen.clear();
        self.entries.drain().map(|(_, (value, _))| value).collect()
    }
}

fn hash_of<K: Hash>(key: &K) -> u64 {
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_is_kept_the_second_time_it_is_seen() {
        let mut cache: StatementCache<&str, u32> = StatementCache::new(4);
        assert!(!cache.admit(&"a"));
        assert!(!cache.admit(&"b"));
        assert!(cache.admit(&"a"));
        assert!(cache.insert("a", 1).is_empty());
        assert_eq!(cache.get(&"a"), Some(&1));
        assert_eq!(cache.get(&"b"), None);
        // Admission used the first sight up: a third sight of an evicted key starts again.
        assert!(!cache.admit(&"a"));
    }

    #[test]
    fn the_least_recently_used_statement_is_let_go() {
        let mut cache: StatementCache<&str, u32> = StatementCache::new(2);
        assert!(cache.insert("a", 1).is_empty());
        assert!(cache.insert("b", 2).is_empty());
        assert_eq!(cache.get(&"a"), Some(&1));
        assert_eq!(cache.insert("c", 3), vec![2]);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&"b"), None);
        assert_eq!(cache.get(&"a"), Some(&1));
        assert_eq!(cache.get(&"c"), Some(&3));
        // Replacing a key hands back its old value and evicts nothing else.
        assert_eq!(cache.insert("c", 4), vec![3]);
        assert_eq!(cache.len(), 2);
        let mut all = cache.clear();
        all.sort();
        assert_eq!(all, vec![1, 4]);
        assert!(cache.is_empty());
    }

    #[test]
    fn sights_are_forgotten_when_there_are_too_many() {
        let mut cache: StatementCache<u32, ()> = StatementCache::new(2);
        for k in 0..8 {
            assert!(!cache.admit(&k));
        }
        // The ninth sight clears the eight before it.
        assert!(!cache.admit(&100));
        assert!(!cache.admit(&0));
        assert!(cache.admit(&100));
    }
}
