//! Process-group signalling for commands the agent runs.

/// Sends SIGKILL to every process in group `pgid`.
#[allow(unsafe_code)]
pub fn kill_group(pgid: i32) {
    if pgid > 0 {
        // SAFETY: kill(2) with a negative pid signals a process group; no
        // memory is touched.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}
