//! What this coordinator keeps in shared memory for operators: per-shard read and write
//! counters (`sharding.shard_stats`) and the progress of running shard operations
//! (`sharding.rebalance_progress`). The counter table itself is plain logic in
//! `sharding_core::counters`.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};
use sharding_core::counters::CounterTable;

use crate::error::{OrRaise, Result, ShardingError};

/// How many shard operations (rebalance, drain, split) can report progress at once.
const PROGRESS_SLOTS: usize = 8;

/// The progress of one running operation; `pid == 0` marks a free slot.
#[derive(Clone, Copy, Default)]
#[repr(C)]
pub struct Progress {
    pub pid: i32,
    operation: [u8; 16],
    pub started_at: i64,
    pub moves_total: i32,
    pub moves_done: i32,
    pub bytes_total: i64,
    pub bytes_done: i64,
    /// The move under way: a shard of its group (0: between moves), nodes, size, start.
    pub shard_id: i64,
    pub from_node: i32,
    pub to_node: i32,
    pub shard_bytes: i64,
    pub move_started_at: i64,
}

impl Progress {
    pub fn operation(&self) -> String {
        let end = self.operation.iter().position(|b| *b == 0).unwrap_or(self.operation.len());
        String::from_utf8_lossy(&self.operation[..end]).into_owned()
    }
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Shared {
    counters: CounterTable,
    progress: [Progress; PROGRESS_SLOTS],
}

impl Default for Shared {
    fn default() -> Self {
        Shared { counters: CounterTable::new(), progress: [Progress::default(); PROGRESS_SLOTS] }
    }
}

// SAFETY: plain data (integers and byte arrays), no pointers: valid in every process.
unsafe impl PGRXSharedMemory for Shared {}

// SAFETY: the name is ours alone.
static SHARED: PgLwLock<Shared> = unsafe { PgLwLock::new(c"pg_sharding_stats") };

/// Reserves the shared memory; called from `_PG_init` while preloading.
#[allow(unexpected_cfgs)] // the macro tests pgrx's feature names, which are not ours
pub fn init() {
    pg_shmem_init!(SHARED = Shared::default());
}

fn now() -> i64 {
    // SAFETY: reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Counts one read statement on each of `shard_ids`.
pub fn count_reads(shard_ids: &[i64]) {
    let mut shared = SHARED.exclusive();
    for id in shard_ids {
        shared.counters.add(*id, 1, 0);
    }
}

/// Counts `writes` writes (statements, or rows for INSERT and COPY) on each of `shard_ids`.
pub fn count_writes(shard_ids: &[i64], writes: u64) {
    let mut shared = SHARED.exclusive();
    for id in shard_ids {
        shared.counters.add(*id, 0, writes);
    }
}

/// (reads, writes) of a shard since the last reset.
pub fn counts(shard_id: i64) -> (u64, u64) {
    let entry = SHARED.share().counters.get(shard_id);
    (entry.reads, entry.writes)
}

/// A progress slot, held by the operation for as long as it runs (freed on drop, also when
/// an error unwinds).
pub struct ProgressSlot(usize);

impl ProgressSlot {
    pub fn start(operation: &str, moves_total: usize, bytes_total: u64) -> Result<ProgressSlot> {
        // SAFETY: reads our own process id.
        let pid = unsafe { pg_sys::MyProcPid };
        let mut shared = SHARED.exclusive();
        let index = shared.progress.iter().position(|p| p.pid == 0 || p.pid == pid).ok_or_else(|| {
            ShardingError::new(PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED, "too many shard operations are running")
        })?;
        let mut progress = Progress {
            pid,
            started_at: now(),
            moves_total: moves_total as i32,
            bytes_total: bytes_total as i64,
            ..Progress::default()
        };
        let bytes = operation.as_bytes();
        let length = bytes.len().min(progress.operation.len() - 1);
        progress.operation[..length].copy_from_slice(&bytes[..length]);
        shared.progress[index] = progress;
        Ok(ProgressSlot(index))
    }

    /// A move starts.
    pub fn moving(&self, shard_id: i64, from: i32, to: i32, bytes: u64) {
        let slot = &mut SHARED.exclusive().progress[self.0];
        slot.shard_id = shard_id;
        slot.from_node = from;
        slot.to_node = to;
        slot.shard_bytes = bytes as i64;
        slot.move_started_at = now();
    }

    /// The move under way is done.
    pub fn moved(&self) {
        let slot = &mut SHARED.exclusive().progress[self.0];
        slot.moves_done += 1;
        slot.bytes_done += slot.shard_bytes;
        slot.shard_id = 0;
    }
}

impl Drop for ProgressSlot {
    fn drop(&mut self) {
        SHARED.exclusive().progress[self.0] = Progress::default();
    }
}

/// Frees the slots of backends that are gone (a crash skips the drop).
fn running_progress() -> Vec<Progress> {
    let slots: Vec<Progress> = SHARED.share().progress.iter().filter(|p| p.pid != 0).copied().collect();
    slots
        .into_iter()
        .filter(|p| {
            // SAFETY: looks the pid up in the proc array.
            let alive = unsafe { !pg_sys::BackendPidGetProc(p.pid).is_null() };
            if !alive {
                let mut shared = SHARED.exclusive();
                if let Some(slot) = shared.progress.iter_mut().find(|s| s.pid == p.pid) {
                    *slot = Progress::default();
                }
            }
            alive
        })
        .collect()
}

fn timestamp(value: i64) -> Option<TimestampWithTimeZone> {
    (value != 0).then(|| TimestampWithTimeZone::try_from(value).ok()).flatten()
}

/// The read and write counters of every shard this coordinator routed statements to since
/// the last reset (backs the `sharding.shard_stats` view).
#[pg_extern(volatile, parallel_safe)]
fn shard_counters() -> TableIterator<'static, (name!(shard_id, i64), name!(reads, i64), name!(writes, i64))> {
    let rows: Vec<(i64, i64, i64)> =
        SHARED.share().counters.iter().map(|c| (c.shard_id, c.reads as i64, c.writes as i64)).collect();
    TableIterator::new(rows)
}

/// Zeroes the shard counters; returns when they had last been reset (NULL: at server start).
#[pg_extern(volatile, parallel_unsafe)]
fn reset_shard_stats() -> Option<TimestampWithTimeZone> {
    (|| -> Result<Option<TimestampWithTimeZone>> {
        crate::commands::require_superuser("reset_shard_stats")?;
        let mut shared = SHARED.exclusive();
        let previous = shared.counters.reset_at_us;
        shared.counters.reset(now());
        Ok(timestamp(previous))
    })()
    .or_raise()
}

/// The running shard operations (backs the `sharding.rebalance_progress` view).
#[pg_extern(volatile, parallel_safe)]
fn operations_in_progress() -> TableIterator<
    'static,
    (
        name!(pid, i32),
        name!(operation, String),
        name!(started_at, Option<TimestampWithTimeZone>),
        name!(moves_done, i32),
        name!(moves_total, i32),
        name!(bytes_done, i64),
        name!(bytes_total, i64),
        name!(shard_id, Option<i64>),
        name!(from_node, Option<i32>),
        name!(to_node, Option<i32>),
        name!(shard_bytes, Option<i64>),
        name!(move_started_at, Option<TimestampWithTimeZone>),
    ),
> {
    let rows: Vec<_> = running_progress()
        .into_iter()
        .map(|p| {
            let current = p.shard_id != 0;
            (
                p.pid,
                p.operation(),
                timestamp(p.started_at),
                p.moves_done,
                p.moves_total,
                p.bytes_done,
                p.bytes_total,
                current.then_some(p.shard_id),
                current.then_some(p.from_node),
                current.then_some(p.to_node),
                current.then_some(p.shard_bytes),
                if current { timestamp(p.move_started_at) } else { None },
            )
        })
        .collect();
    TableIterator::new(rows)
}
