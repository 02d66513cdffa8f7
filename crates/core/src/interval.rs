//! Hash-range shard intervals over the signed 32-bit hash space.
//!
//! A hash-distributed table with N shards owns N contiguous, non-overlapping intervals that
//! together cover every int32: the first starts at i32::MIN, the last ends at i32::MAX.

/// An inclusive range of int32 hash values owned by one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashInterval {
    pub min: i32,
    pub max: i32,
}

impl HashInterval {
    pub fn contains(&self, hash: i32) -> bool {
        self.min <= hash && hash <= self.max
    }
}

/// Splits the whole int32 space into `shard_count` intervals of (almost) equal width.
///
/// The width is 2^32 / shard_count; the remainder (if shard_count does not divide 2^32) is
/// spread one value at a time over the first intervals, so widths differ by at most one.
pub fn split_hash_space(shard_count: u32) -> Result<Vec<HashInterval>, IntervalError> {
    if shard_count == 0 {
        return Err(IntervalError::ZeroShards);
    }
    let total: u64 = 1 << 32;
    let base = total / shard_count as u64;
    let remainder = total % shard_count as u64;
    let mut intervals = Vec::with_capacity(shard_count as usize);
    let mut start: i64 = i32::MIN as i64;
    for index in 0..shard_count as u64 {
        let width = base + u64::from(index < remainder);
        let end = start + width as i64 - 1;
        intervals.push(HashInterval { min: start as i32, max: end as i32 });
        start = end + 1;
    }
    Ok(intervals)
}

/// Index of the interval containing `hash` in a sorted, gap-free list of intervals.
pub fn find_interval(intervals: &[HashInterval], hash: i32) -> Option<usize> {
    let index = intervals.partition_point(|interval| interval.max < hash);
    intervals.get(index).filter(|interval| interval.contains(hash)).map(|_| index)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntervalError {
    ZeroShards,
}

impl std::fmt::Display for IntervalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IntervalError::ZeroShards => write!(f, "shard count must be at least 1"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_covers_everything(intervals: &[HashInterval]) {
        assert_eq!(intervals.first().unwrap().min, i32::MIN);
        assert_eq!(intervals.last().unwrap().max, i32::MAX);
        for pair in intervals.windows(2) {
            assert_eq!(pair[0].max as i64 + 1, pair[1].min as i64, "gap or overlap: {pair:?}");
        }
    }

    #[test]
    fn one_shard_owns_everything() {
        let intervals = split_hash_space(1).unwrap();
        assert_eq!(intervals, vec![HashInterval { min: i32::MIN, max: i32::MAX }]);
    }

    #[test]
    fn thirty_two_shards_are_equal_and_contiguous() {
        let intervals = split_hash_space(32).unwrap();
        assert_eq!(intervals.len(), 32);
        assert_covers_everything(&intervals);
        for interval in &intervals {
            assert_eq!(interval.max as i64 - interval.min as i64 + 1, 1 << 27);
        }
        assert_eq!(intervals[0], HashInterval { min: -2147483648, max: -2013265921 });
        assert_eq!(intervals[16].min, 0);
    }

    #[test]
    fn uneven_counts_differ_by_at_most_one() {
        for count in [3u32, 7, 10, 100, 1000] {
            let intervals = split_hash_space(count).unwrap();
            assert_eq!(intervals.len(), count as usize);
            assert_covers_everything(&intervals);
            let widths: Vec<i64> =
                intervals.iter().map(|i| i.max as i64 - i.min as i64 + 1).collect();
            let (lo, hi) = (widths.iter().min().unwrap(), widths.iter().max().unwrap());
            assert!(hi - lo <= 1, "count {count}: widths {lo}..{hi}");
            assert_eq!(widths.iter().sum::<i64>(), 1i64 << 32);
        }
    }

    #[test]
    fn zero_shards_is_an_error() {
        assert_eq!(split_hash_space(0), Err(IntervalError::ZeroShards));
    }

    #[test]
    fn find_interval_hits_boundaries() {
        let intervals = split_hash_space(7).unwrap();
        for (index, interval) in intervals.iter().enumerate() {
            assert_eq!(find_interval(&intervals, interval.min), Some(index));
            assert_eq!(find_interval(&intervals, interval.max), Some(index));
        }
        assert_eq!(find_interval(&intervals, i32::MIN), Some(0));
        assert_eq!(find_interval(&intervals, i32::MAX), Some(6));
        assert_eq!(find_interval(&[], 5), None);
    }
}

/// The intervals a split of `interval` at `points` gives: each point is the last hash value
/// of a piece (Citus's convention), so points must increase strictly and lie in
/// `[interval.min, interval.max - 1]`.
pub fn split_interval(interval: HashInterval, points: &[i32]) -> Result<Vec<HashInterval>, SplitError> {
    if points.is_empty() {
        return Err(SplitError::NoPoints);
    }
    let mut pieces = Vec::with_capacity(points.len() + 1);
    let mut start = interval.min;
    for &point in points {
        if point < start || point >= interval.max {
            return Err(SplitError::OutOfRange { point, min: start, max: interval.max - 1 });
        }
        pieces.push(HashInterval { min: start, max: point });
        start = point + 1;
    }
    pieces.push(HashInterval { min: start, max: interval.max });
    Ok(pieces)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitError {
    NoPoints,
    /// `point` is not in `[min, max]` (the range left for it after the points before it).
    OutOfRange { point: i32, min: i32, max: i32 },
}

impl std::fmt::Display for SplitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SplitError::NoPoints => write!(f, "at least one split point is needed"),
            SplitError::OutOfRange { point, min, max } if min > max => {
                write!(f, "split point {point} leaves no room: the shard's interval cannot be split there")
            }
            SplitError::OutOfRange { point, min, max } => {
                write!(f, "split point {point} must be between {min} and {max} (points increase, each ends a piece)")
            }
        }
    }
}

#[cfg(test)]
mod split_tests {
    use super::*;

    #[test]
    fn split_in_two_at_a_point() {
        let whole = HashInterval { min: -100, max: 100 };
        assert_eq!(
            split_interval(whole, &[0]).unwrap(),
            vec![HashInterval { min: -100, max: 0 }, HashInterval { min: 1, max: 100 }]
        );
    }

    #[test]
    fn split_the_whole_space_in_three() {
        let whole = HashInterval { min: i32::MIN, max: i32::MAX };
        let pieces = split_interval(whole, &[-10, 10]).unwrap();
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces[0], HashInterval { min: i32::MIN, max: -10 });
        assert_eq!(pieces[2], HashInterval { min: 11, max: i32::MAX });
    }

    #[test]
    fn bad_points_are_refused() {
        let whole = HashInterval { min: 0, max: 10 };
        assert_eq!(split_interval(whole, &[]), Err(SplitError::NoPoints));
        assert!(split_interval(whole, &[10]).is_err(), "the last value cannot end a piece: nothing left");
        assert!(split_interval(whole, &[-1]).is_err());
        assert!(split_interval(whole, &[5, 5]).is_err(), "points must increase");
        assert!(split_interval(whole, &[6, 3]).is_err());
        assert_eq!(split_interval(whole, &[0, 9]).unwrap().len(), 3);
        assert!(split_interval(HashInterval { min: 3, max: 3 }, &[3]).is_err());
    }
}
