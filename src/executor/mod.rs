//! Execution of statements on distributed tables. The ExecutorRun hook's entry point is in C
//! (src/hooks_c/hooks.c) and hands over only the plans this module claims.

pub mod insert;
mod on_conflict;
