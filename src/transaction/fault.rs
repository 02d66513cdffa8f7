//! Fault-injection points for the failure tests of two-phase commit. Compiled only with the
//! `fault_injection` feature (the debug build `make test` installs); in other builds
//! `point` is empty and the setting does not exist.
//!
//! `SET sharding.fault_injection = 'after_prepare:pause:2000'` makes the backend stop for
//! 2000 ms when it reaches that point (shown as wait event PgSleep in pg_stat_activity, so a
//! test can see it and kill a server meanwhile); `'...:crash'` ends the backend process
//! abruptly, which makes the postmaster restart the coordinator as after a crash; `'...:error'`
//! raises an ERROR there. Points: before_commit (one-phase), before_prepare, after_prepare,
//! after_commit_record, before_commit_prepared; in shard operations split_after_trigger,
//! split_before_switch, move_after_copy; in queries after_chosen_rows (an UPDATE or DELETE
//! whose rows the coordinator chose, before the shards change them).

#[cfg(feature = "fault_injection")]
mod enabled {
    use std::ffi::CString;

    use pgrx::prelude::*;
    use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

    pub static FAULT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

    pub fn define() {
        GucRegistry::define_string_guc(
            c"sharding.fault_injection",
            c"Test builds only: stop or crash at a point of the commit protocol.",
            c"point:pause:milliseconds or point:crash.",
            &FAULT,
            GucContext::Userset,
            GucFlags::default(),
        );
    }

    pub fn point(name: &str) {
        let Some(spec) = FAULT.get() else { return };
        let spec = spec.to_string_lossy().into_owned();
        for item in spec.split(',') {
            let mut parts = item.trim().split(':');
            if parts.next() != Some(name) {
                continue;
            }
            match parts.next() {
                Some("pause") => pause(parts.next().and_then(|ms| ms.parse().ok()).unwrap_or(1000)),
                Some("crash") => std::process::abort(),
                Some("error") => crate::error::ShardingError::new(
                    PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    format!("fault injected at {name}"),
                )
                .raise(),
                _ => {}
            }
        }
    }

    fn pause(ms: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(ms);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            // SAFETY: waits on our own latch; WaitLatch reports the wait event itself.
            unsafe {
                pg_sys::WaitLatch(
                    *std::ptr::addr_of!(pg_sys::MyLatch),
                    (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                    left.as_millis().max(1) as _,
                    pg_sys::WaitEventTimeout::WAIT_EVENT_PG_SLEEP,
                );
                pg_sys::ResetLatch(*std::ptr::addr_of!(pg_sys::MyLatch));
            }
            pgrx::check_for_interrupts!();
        }
    }
}

#[cfg(feature = "fault_injection")]
pub use enabled::{define, point};

#[cfg(not(feature = "fault_injection"))]
pub fn define() {}

#[cfg(not(feature = "fault_injection"))]
pub fn point(_name: &str) {}
