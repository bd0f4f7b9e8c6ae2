//! A cgroup (v2) of its own for each job run, when systemd delegated the
//! agent's cgroup to it (`Delegate=yes` in the shipped unit).
//!
//! A process group ends with its run, but a child can leave it (`setsid`,
//! a double fork) and scrub its environment of the run's marker; it cannot
//! leave its cgroup, which only a process allowed to write a cgroup's
//! `cgroup.procs` can change. So, with a delegated subtree, every run is
//! started straight into `<agent's cgroup>/run-<id>` (the child moves
//! itself before it executes the program) and when the run ends, however
//! it ends, everything still in that cgroup is killed (`cgroup.kill`) and
//! the cgroup removed. Without one (no systemd, no delegation, cgroup v1
//! only) runs fall back to their process group and marker (`jobs::run`).
//!
//! Delegation is recognised by systemd's `trusted.delegate` or
//! `user.delegate` attribute on the agent's cgroup or, for an agent that
//! is not root (which cannot read `trusted.*`), by the cgroup being its
//! own: systemd gives a delegated cgroup to the unit's user. The agent
//! never touches a cgroup it was not given, nor the root cgroup.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a killed cgroup may take to empty before it is left behind.
const EMPTY_WAIT: Duration = Duration::from_secs(2);

/// The agent's own cgroup, under which it makes one per run.
#[derive(Debug, Clone)]
pub struct Subtree {
    dir: PathBuf,
}

/// The cgroup path of this process on the unified hierarchy (the `0::`
/// line of `/proc/self/cgroup`).
fn own_path(proc_self_cgroup: &str) -> Option<&str> {
    proc_self_cgroup.lines().find_map(|line| line.strip_prefix("0::"))
}

/// Where the unified (v2) hierarchy is mounted, from `/proc/self/mountinfo`.
fn unified_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields before " - " are the mount's; the first after is its type.
        let (mount, fs) = line.split_once(" - ")?;
        (fs.split_whitespace().next()? == "cgroup2").then(|| mount.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// The effective user id, from `/proc/self/status` ("Uid: real effective
/// saved filesystem").
fn effective_uid(status: &str) -> Option<u32> {
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().nth(1)?.parse().ok()
}

/// Whether the agent may make cgroups under its own: systemd marked it
/// delegated, or (for a user that cannot read systemd's trusted mark) gave
/// it to this user. Never the root cgroup.
fn delegated(path: &str, marked: bool, owner: u32, euid: u32) -> bool {
    path != "/" && !path.is_empty() && (marked || (euid != 0 && owner == euid))
}

/// The name of job run `run_id`'s cgroup.
fn run_name(run_id: u64) -> String {
    format!("run-{run_id}")
}

/// The name of command `id`'s cgroup.
fn command_name(id: u64) -> String {
    format!("cmd-{id}")
}

impl Subtree {
    /// The agent's delegated cgroup, if it has one; the reason it has not
    /// otherwise (logged once at start).
    pub fn delegated() -> Result<Subtree, String> {
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
        let path = own_path(&cgroup).ok_or("no cgroup v2 hierarchy")?.trim().to_owned();
        let mountinfo =
            std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
        let mount = unified_mount(&mountinfo).ok_or("cgroup v2 is not mounted")?;
        let dir = mount.join(path.trim_start_matches('/'));
        let owner = std::os::unix::fs::MetadataExt::uid(
            &std::fs::metadata(&dir).map_err(|e| format!("{}: {e}", dir.display()))?,
        );
        let marked = ["trusted.delegate", "user.delegate"].iter().any(|name| {
            let mut value = [0u8; 8];
            rustix::fs::getxattr(&dir, *name, &mut value[..]).is_ok_and(|n| value[..n] == *b"1")
        });
        let status = std::fs::read_to_string("/proc/self/status").map_err(|e| format!("/proc/self/status: {e}"))?;
        let euid = effective_uid(&status).ok_or("no Uid line in /proc/self/status")?;
        if !delegated(&path, marked, owner, euid) {
            return Err(format!("{} is not delegated to the agent (Delegate=yes)", dir.display()));
        }
        // ProtectControlGroups=yes mounts the hierarchy read-only.
        rustix::fs::access(&dir, rustix::fs::Access::WRITE_OK)
            .map_err(|e| format!("{} is not writable: {e}", dir.display()))?;
        if !dir.join("cgroup.kill").exists() {
            return Err("the kernel has no cgroup.kill (Linux 5.14 or later)".into());
        }
        Ok(Subtree { dir })
    }

    /// A subtree at `dir` (tests).
    #[cfg(test)]
    pub(crate) fn at(dir: PathBuf) -> Subtree {
        Subtree { dir }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Makes job run `run_id`'s cgroup (emptying and replacing one left by
    /// an agent that died).
    pub fn run(&self, run_id: u64) -> std::io::Result<RunGroup> {
        self.make(&run_name(run_id))
    }

    /// Makes command `id`'s cgroup (an `exec` command's program).
    pub fn command(&self, id: u64) -> std::io::Result<RunGroup> {
        self.make(&command_name(id))
    }

    fn make(&self, name: &str) -> std::io::Result<RunGroup> {
        let dir = self.dir.join(name);
        if dir.exists() {
            RunGroup { dir: dir.clone() }.close();
        }
        std::fs::create_dir(&dir)?;
        Ok(RunGroup { dir })
    }

    /// The cgroup an agent that died left for run `run_id`, if there is
    /// one (under systemd the restart killed what it held; without, its
    /// processes may still run).
    pub fn left(&self, run_id: u64) -> Option<RunGroup> {
        self.left_named(&run_name(run_id))
    }

    /// The cgroup an agent that stopped left for command `id`, if there is
    /// one (an `exec` command is left to finish when the agent stops, and
    /// reported interrupted at the next start).
    pub fn left_command(&self, id: u64) -> Option<RunGroup> {
        self.left_named(&command_name(id))
    }

    fn left_named(&self, name: &str) -> Option<RunGroup> {
        let dir = self.dir.join(name);
        dir.is_dir().then_some(RunGroup { dir })
    }
}

/// One run's cgroup.
#[derive(Debug)]
pub struct RunGroup {
    dir: PathBuf,
}

impl RunGroup {
    /// `cgroup.procs`, opened before the child starts: the child writes its
    /// own pid ("0") into it before it executes the program.
    pub fn procs(&self) -> std::io::Result<File> {
        std::fs::OpenOptions::new().write(true).open(self.dir.join("cgroup.procs"))
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The processes in it.
    fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// How many processes are in it.
    fn count(&self) -> usize {
        self.pids().len()
    }

    /// Kills everything still in the cgroup, waits (briefly) for it to
    /// empty and removes it; returns how many processes it still held.
    pub fn close(self) -> usize {
        self.close_counting(|_| true)
    }

    /// Like [`RunGroup::close`], counting only the processes `stray` names
    /// (a run's own process group, killed with it just before and perhaps
    /// still exiting, is no stray).
    pub fn close_counting(self, stray: impl Fn(u32) -> bool) -> usize {
        let pids = self.pids();
        let left = pids.iter().filter(|pid| stray(**pid)).count();
        if !pids.is_empty() {
            if let Err(e) = std::fs::write(self.dir.join("cgroup.kill"), "1") {
                tracing::warn!(cgroup = %self.dir.display(), error = %e, "Cannot kill a run's cgroup.");
            }
            let deadline = Instant::now() + EMPTY_WAIT;
            while self.count() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            tracing::warn!(cgroup = %self.dir.display(), error = %e, "Cannot remove a run's cgroup.");
        }
        left
    }

    /// [`RunGroup::close_counting`] on tokio's blocking pool (it may wait
    /// up to 2 s for the cgroup to empty).
    pub async fn close_off_thread(self, stray: impl Fn(u32) -> bool + Send + 'static) -> usize {
        tokio::task::spawn_blocking(move || self.close_counting(stray)).await.unwrap_or(0)
    }
}

/// What a report says of the processes [`RunGroup::close`] found left in a
/// cgroup of a run or command cut off by a restart.
pub fn killed_note(left: usize) -> String {
    if left == 0 { String::new() } else { format!("; {left} process(es) left in its cgroup have been killed") }
}

/// In the child, between fork and exec: moves the calling process into the
/// cgroup whose `cgroup.procs` is `procs` (writing "0" names the writer).
/// Only write(2), which is async-signal-safe.
pub fn enter(mut procs: &File) -> std::io::Result<()> {
    procs.write_all(b"0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn what_a_stopped_agent_left_is_found_by_run_or_command_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let subtree = Subtree::at(dir.path().to_owned());
        for name in ["run-3", "cmd-3"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        assert!(subtree.left(4).is_none() && subtree.left_command(4).is_none());
        let command = subtree.left_command(3).unwrap();
        assert_eq!(command.path(), dir.path().join("cmd-3"));
        assert_eq!(command.close_off_thread(|_| true).await, 0, "nothing ran in it");
        assert!(!dir.path().join("cmd-3").exists() && dir.path().join("run-3").exists(), "only the command's");
        assert_eq!(killed_note(0), "");
        assert_eq!(killed_note(2), "; 2 process(es) left in its cgroup have been killed");
    }

    #[test]
    fn the_unified_line_of_proc_self_cgroup_names_the_agents_cgroup() {
        let hybrid =
            "9:name=systemd:/system.slice/outpost-agent.service\n4:memory:/x\n0::/system.slice/outpost-agent.service\n";
        assert_eq!(own_path(hybrid), Some("/system.slice/outpost-agent.service"));
        assert_eq!(own_path("0::/\n"), Some("/"));
        assert_eq!(own_path("4:memory:/\n1:cpu:/\n"), None, "cgroup v1 only");
    }

    #[test]
    fn the_cgroup2_mount_is_found_among_the_others() {
        let mountinfo = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
35 31 0:30 / /sys/fs/cgroup/memory rw,nosuid shared:15 - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
        assert_eq!(unified_mount(mountinfo), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(
            unified_mount("30 1 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(unified_mount("35 31 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"), None);
    }

    #[test]
    fn only_a_delegated_cgroup_other_than_the_root_is_used() {
        let service = "/system.slice/outpost-agent.service";
        // systemd's mark, readable by root.
        assert!(delegated(service, true, 0, 0));
        // The unit's user owns a cgroup systemd delegated to it.
        assert!(delegated(service, false, 998, 998));
        // Root owns every cgroup nobody delegated: ownership proves nothing.
        assert!(!delegated(service, false, 0, 0));
        // Another user's cgroup.
        assert!(!delegated(service, false, 0, 998));
        // Never the root cgroup, marked or not.
        assert!(!delegated("/", true, 0, 0));
    }

    #[test]
    fn the_effective_uid_is_the_second_of_the_uid_line() {
        assert_eq!(effective_uid("Name:\tagent\nUid:\t0\t998\t998\t998\nGid:\t0\t0\t0\t0\n"), Some(998));
        assert_eq!(effective_uid("Name:\tagent\n"), None);
    }

    #[test]
    fn runs_and_commands_are_named_by_their_ids_apart() {
        assert_eq!(run_name(42), "run-42");
        assert_eq!(command_name(42), "cmd-42");
    }
}
