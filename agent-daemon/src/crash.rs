//! Crash points: a test hook that proves a multi-step change on disk is
//! safe to interrupt anywhere.
//!
//! In debug builds, `OUTPOST_CRASH_AT=<step>` makes the process abort when
//! it reaches `<step>`: no destructor runs and nothing more is written, as
//! after a SIGKILL or a power cut at that instant. The end-to-end tests
//! restart the agent and check that it comes back. Release builds compile
//! every crash point to nothing.

/// Aborts the process here if `OUTPOST_CRASH_AT` names `step` (debug
/// builds only).
#[inline]
pub fn point(step: &'static str) {
    #[cfg(debug_assertions)]
    if std::env::var_os("OUTPOST_CRASH_AT").is_some_and(|at| at == step) {
        tracing::warn!(step, "Crash point reached (OUTPOST_CRASH_AT): aborting.");
        std::process::abort();
    }
    #[cfg(not(debug_assertions))]
    let _ = step;
}
