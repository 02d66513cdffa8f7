//! Per-shard read and write counters in a fixed-size table (it lives in shared memory, so no
//! allocation, no pointers): open addressing on the shard id, linear probing, no removal
//! except a reset of the whole table.

/// Room for this many shards; further shards are counted in `overflow` only.
pub const SLOTS: usize = 8192;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ShardCounts {
    /// 0 marks a free slot (shard ids start at 1).
    pub shard_id: i64,
    pub reads: u64,
    pub writes: u64,
}

#[derive(Clone, Copy)]
#[repr(C)]
pub struct CounterTable {
    slots: [ShardCounts; SLOTS],
    /// Counts that found no free slot.
    pub overflow: u64,
    /// Microseconds since the Unix epoch of the last reset (0: since the server started).
    pub reset_at_us: i64,
}

impl Default for CounterTable {
    fn default() -> Self {
        Self::new()
    }
}

impl CounterTable {
    pub const fn new() -> Self {
        CounterTable { slots: [ShardCounts { shard_id: 0, reads: 0, writes: 0 }; SLOTS], overflow: 0, reset_at_us: 0 }
    }

    fn home(shard_id: i64) -> usize {
        // Fibonacci hashing spreads consecutive ids over the table.
        ((shard_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 51) as usize % SLOTS
    }

    /// Adds to the counts of `shard_id`; false when the table is full (counted in `overflow`).
    pub fn add(&mut self, shard_id: i64, reads: u64, writes: u64) -> bool {
        if shard_id <= 0 {
            return false;
        }
        let start = Self::home(shard_id);
        for step in 0..SLOTS {
            let slot = &mut self.slots[(start + step) % SLOTS];
            if slot.shard_id == shard_id || slot.shard_id == 0 {
                slot.shard_id = shard_id;
                slot.reads += reads;
                slot.writes += writes;
                return true;
            }
        }
        self.overflow += reads + writes;
        false
    }

    pub fn get(&self, shard_id: i64) -> ShardCounts {
        let start = Self::home(shard_id);
        for step in 0..SLOTS {
            let slot = &self.slots[(start + step) % SLOTS];
            if slot.shard_id == shard_id {
                return *slot;
            }
            if slot.shard_id == 0 {
                break;
            }
        }
        ShardCounts { shard_id, reads: 0, writes: 0 }
    }

    /// Every shard with counts, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &ShardCounts> {
        self.slots.iter().filter(|s| s.shard_id != 0)
    }

    pub fn reset(&mut self, now_us: i64) {
        *self = CounterTable::new();
        self.reset_at_us = now_us;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_shard() {
        let mut table = Box::new(CounterTable::new());
        table.add(102008, 1, 0);
        table.add(102008, 2, 5);
        table.add(102009, 0, 1);
        assert_eq!(table.get(102008), ShardCounts { shard_id: 102008, reads: 3, writes: 5 });
        assert_eq!(table.get(102009).writes, 1);
        assert_eq!(table.get(7).reads, 0);
        assert_eq!(table.iter().count(), 2);
    }

    #[test]
    fn a_full_table_counts_overflow_and_keeps_existing_shards() {
        let mut table = Box::new(CounterTable::new());
        for id in 1..=SLOTS as i64 {
            assert!(table.add(id, 1, 0));
        }
        assert!(!table.add(SLOTS as i64 + 1, 1, 1));
        assert_eq!(table.overflow, 2);
        assert!(table.add(17, 0, 4));
        assert_eq!(table.get(17), ShardCounts { shard_id: 17, reads: 1, writes: 4 });
        assert_eq!(table.get(SLOTS as i64 + 1).reads, 0);
    }

    #[test]
    fn reset_empties_and_stamps() {
        let mut table = Box::new(CounterTable::new());
        table.add(5, 1, 1);
        table.reset(42);
        assert_eq!(table.iter().count(), 0);
        assert_eq!(table.reset_at_us, 42);
        assert!(!table.add(0, 1, 1), "0 is the free marker, not a shard");
    }
}
