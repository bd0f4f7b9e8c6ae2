//! Running a program for a command or a job: its own process group, a
//! timeout, output capture with a cap, and the whole group killed when the
//! run ends.
//!
//! Output: stdout and stderr are read together as they come and only the
//! last `max_output` bytes are kept; reading never stops, so a program that
//! floods its output is never blocked on a full pipe, and memory stays at
//! the cap. When the program exits, is timed out or is stopped, whatever is
//! left of its process group is killed (as systemd does when a oneshot
//! service ends), so no child outlives its run.

use crate::cgroup::RunGroup;
use std::collections::{BTreeMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio_util::sync::CancellationToken;

/// How long to wait for the output pipes to close after the group is gone
/// (a process that left the group may still hold them).
const PIPE_GRACE: Duration = Duration::from_secs(2);

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

/// Makes glibc hand freed heap back to the OS instead of keeping it for
/// reuse. An agent idles for weeks after a burst of start-up allocations
/// (config parsing, the first job list); kept, that heap is resident memory
/// for nothing. Measured idle with 1000 jobs: 16.5 MiB with glibc's
/// defaults, 14.3 MiB with a 128 KiB trim threshold, 10.3 MiB with 32 KiB
/// (docs/BENCHMARKS.md). Fixing the trim threshold also stops glibc from
/// raising its mmap threshold, so large buffers are returned when freed.
/// Call first thing in `main`.
#[allow(unsafe_code)]
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 10);
        libc::mallopt(libc::M_TOP_PAD, 0);
    }
}

/// Restores the default action of SIGPIPE (end the process), which Rust's
/// runtime sets to "ignore": for one-shot commands whose output may be
/// piped into a reader that stops early (`| head`). Call first thing in
/// `main`.
#[allow(unsafe_code)]
pub fn default_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_DFL installs no
    // handler; called before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// When process `pid` started, in clock ticks since boot (field 22 of
/// `/proc/<pid>/stat`): with the pid it names one process even after the
/// pid is reused.
pub fn start_time(pid: u32) -> Option<u64> {
    stat_field(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?, 22)
}

/// The process group of `pid` (field 5 of `/proc/<pid>/stat`).
fn process_group(pid: u32) -> Option<i32> {
    stat_field(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?, 5)
}

/// Field `n` (from 1) of a `/proc/<pid>/stat` line, for `n` past the
/// command name (field 2, in parentheses, which may hold spaces and
/// parentheses).
fn stat_field<T: std::str::FromStr>(stat: &str, n: usize) -> Option<T> {
    stat.rsplit_once(')')?.1.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// The process groups of every process this user may read whose
/// environment holds `entry` (`NAME=value`, a run's marker): what is left
/// of a job an agent started just before it died, before it could record
/// the job's process id.
pub fn groups_with_env(entry: &str) -> Vec<i32> {
    let mut groups: Vec<i32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == entry.as_bytes()))
        })
        .filter_map(process_group)
        .filter(|pgid| *pgid > 1)
        .collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// What to run.
#[derive(Debug)]
pub struct ProcessSpec<'a> {
    /// Program and arguments.
    pub argv: &'a [String],
    /// Extra environment variables.
    pub env: &'a BTreeMap<String, String>,
    /// Working directory.
    pub working_dir: Option<&'a Path>,
    /// The run's cgroup, which the program is started in (`cgroup`) and
    /// which is emptied and removed when it ends.
    pub cgroup: Option<RunGroup>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcessEnd {
    /// Exit status.
    Exited(i32),
    /// Killed by a signal the agent did not send.
    Signaled(i32),
    /// Killed with its group at the timeout.
    TimedOut,
    /// Killed with its group because the caller asked.
    Stopped,
}

/// A finished run.
#[derive(Debug, Clone)]
pub struct ProcessResult {
    /// How it ended.
    pub end: ProcessEnd,
    /// The last bytes of its output, stdout and stderr interleaved.
    pub output: String,
    /// All bytes it wrote.
    pub output_bytes: u64,
    /// Processes still in its cgroup after its process group was killed
    /// (what left the group), killed with the cgroup.
    pub strays: usize,
}

/// A started program.
#[derive(Debug)]
pub struct Spawned {
    child: tokio::process::Child,
    pid: u32,
    cgroup: Option<RunGroup>,
}

/// Starts `spec` in a new process group (and its cgroup, if it has one)
/// with stdin from /dev/null.
#[allow(unsafe_code)]
pub fn spawn(spec: ProcessSpec<'_>) -> Result<Spawned, String> {
    let Some((program, args)) = spec.argv.split_first() else {
        return Err("no program given".into());
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .envs(spec.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    if let Some(dir) = spec.working_dir {
        command.current_dir(dir);
    }
    if let Some(group) = &spec.cgroup {
        let procs = group.procs().map_err(|e| format!("cannot open {}: {e}", group.path().display()))?;
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls write(2) on a descriptor opened before the fork.
        unsafe {
            command.pre_exec(move || crate::cgroup::enter(&procs));
        }
    }
    let started = command.spawn().map_err(|e| format!("cannot start {program:?}: {e}"));
    let child = match started {
        Ok(child) => child,
        Err(e) => {
            if let Some(group) = spec.cgroup {
                group.close();
            }
            return Err(e);
        }
    };
    let pid = child.id().ok_or_else(|| format!("{program:?} exited before it could be watched"))?;
    Ok(Spawned { child, pid, cgroup: spec.cgroup })
}

impl Spawned {
    /// The process id, which is also its process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the end (at most `timeout`, or until `stop`), keeping the
    /// last `max_output` bytes of output; then kills what is left of the
    /// group, and of its cgroup if it has one.
    pub async fn wait(mut self, timeout: Duration, max_output: usize, stop: &CancellationToken) -> ProcessResult {
        let tail = Arc::new(Mutex::new(Tail::new(max_output)));
        let readers = [
            self.child.stdout.take().map(|s| tokio::spawn(drain(s, tail.clone()))),
            self.child.stderr.take().map(|s| tokio::spawn(drain(s, tail.clone()))),
        ];
        let pgid = i32::try_from(self.pid).unwrap_or(0);
        let end = tokio::select! {
            status = self.child.wait() => match status {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(code), _) => ProcessEnd::Exited(code),
                    (None, Some(signal)) => ProcessEnd::Signaled(signal),
                    (None, None) => ProcessEnd::Exited(-1),
                },
                Err(_) => ProcessEnd::Exited(-1),
            },
            () = tokio::time::sleep(timeout) => ProcessEnd::TimedOut,
            () = stop.cancelled() => ProcessEnd::Stopped,
        };
        kill_group(pgid);
        let _ = self.child.wait().await;
        // What left the group but not the cgroup goes now, before the
        // pipes it may hold are waited for.
        let strays = match self.cgroup.take() {
            // What left the group: the group's own processes were killed
            // just before and may still be exiting.
            Some(group) => group.close_off_thread(move |pid| process_group(pid).is_some_and(|g| g != pgid)).await,
            None => 0,
        };
        for reader in readers.into_iter().flatten() {
            let abort = reader.abort_handle();
            if tokio::time::timeout(PIPE_GRACE, reader).await.is_err() {
                abort.abort();
            }
        }
        let tail = tail.lock().unwrap_or_else(|p| p.into_inner());
        ProcessResult { end, output: tail.text(), output_bytes: tail.total, strays }
    }
}

/// The last `cap` bytes of a stream, and how many bytes it had.
#[derive(Debug)]
struct Tail {
    cap: usize,
    bytes: VecDeque<u8>,
    total: u64,
}

impl Tail {
    fn new(cap: usize) -> Self {
        Tail { cap, bytes: VecDeque::new(), total: 0 }
    }

    fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        let data = &data[data.len().saturating_sub(self.cap)..];
        let overflow = (self.bytes.len() + data.len()).saturating_sub(self.cap);
        self.bytes.drain(..overflow.min(self.bytes.len()));
        self.bytes.extend(data);
    }

    fn text(&self) -> String {
        let (a, b) = self.bytes.as_slices();
        String::from_utf8_lossy(&[a, b].concat()).into_owned()
    }
}

async fn drain(mut stream: impl AsyncRead + Unpin, tail: Arc<Mutex<Tail>>) {
    let mut buf = vec![0u8; 16 << 10];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
        tail.lock().unwrap_or_else(|p| p.into_inner()).push(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(script: &str) -> Vec<String> {
        vec!["sh".into(), "-c".into(), script.into()]
    }

    async fn run(script: &str, timeout: Duration, cap: usize) -> ProcessResult {
        let argv = argv(script);
        let env = BTreeMap::new();
        let spawned = spawn(ProcessSpec { argv: &argv, env: &env, working_dir: None, cgroup: None }).unwrap();
        spawned.wait(timeout, cap, &CancellationToken::new()).await
    }

    fn alive(pid: u32) -> bool {
        // A zombie waits for a reaper that may be slow; it runs no more.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
    }

    /// Where this machine has cgroup v2 and root: a program started in a
    /// run's cgroup, whose child leaves its process group and scrubs its
    /// environment (so the marker cannot find it), is still in the cgroup,
    /// and closing the cgroup kills it and removes the cgroup.
    #[tokio::test]
    async fn a_child_that_escaped_its_group_and_marker_dies_with_the_runs_cgroup() {
        let Some(mount) = std::fs::read_to_string("/proc/self/mountinfo").ok().and_then(|m| {
            m.lines()
                .find(|l| l.contains(" - cgroup2 "))
                .and_then(|l| l.split_whitespace().nth(4).map(std::path::PathBuf::from))
        }) else {
            eprintln!("skipped: no cgroup v2 here");
            return;
        };
        let parent = mount.join(format!("outpost-unit-{}", std::process::id()));
        if std::fs::create_dir(&parent).is_err() {
            eprintln!("skipped: cannot make a cgroup here (not root?)");
            return;
        }
        let subtree = crate::cgroup::Subtree::at(parent.clone());
        let group = subtree.run(7).unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let pid_file = scratch.path().join("escaped.pid");
        // The child writes its pid once it has left the group; the run waits
        // for that, or it could end (and kill its group) first.
        let pid_path = pid_file.display();
        let argv = argv(&format!(
            "setsid env -i sh -c 'echo $$ > {pid_path}; exec sleep 303' & until [ -s {pid_path} ]; do sleep 0.05; done"
        ));
        let env = BTreeMap::new();
        let path = group.path().to_owned();
        let spec = ProcessSpec { argv: &argv, env: &env, working_dir: None, cgroup: Some(group) };
        let result = spawn(spec).unwrap().wait(Duration::from_secs(10), 1024, &CancellationToken::new()).await;
        assert_eq!(result.end, ProcessEnd::Exited(0), "{result:?}");
        assert_eq!(result.strays, 1, "the setsid child was in the run's cgroup");
        let escaped: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while alive(escaped) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(escaped), "the escaped child outlived its run's cgroup");
        assert!(!path.exists(), "the run's cgroup was not removed");
        // A run cgroup an agent that died left behind is found and cleared.
        drop(subtree.run(8).unwrap());
        assert!(subtree.left(9).is_none());
        assert_eq!(subtree.left(8).unwrap().close(), 0);
        assert!(!parent.join("run-8").exists());
        std::fs::remove_dir(&parent).unwrap();
    }

    #[tokio::test]
    async fn a_marked_group_is_found_by_its_environment_and_killed() {
        let marker = format!("OUTPOST_JOB_RUN=/test/{}#7", std::process::id());
        let (name, value) = marker.split_once('=').unwrap();
        let env: BTreeMap<String, String> = [(name.to_owned(), value.to_owned())].into_iter().collect();
        // A child of the job too (it inherits the marker and the group).
        let argv = argv("sleep 300 & sleep 300");
        let spawned = spawn(ProcessSpec { argv: &argv, env: &env, working_dir: None, cgroup: None }).unwrap();
        let pgid = i32::try_from(spawned.pid()).unwrap();
        let found = (0..100)
            .find_map(|_| {
                let groups = groups_with_env(&marker);
                if groups.is_empty() {
                    std::thread::sleep(Duration::from_millis(10));
                    None
                } else {
                    Some(groups)
                }
            })
            .unwrap();
        assert_eq!(found, [pgid], "the marked group, and nothing else");
        assert!(groups_with_env("OUTPOST_JOB_RUN=/test/none#7").is_empty());
        kill_group(pgid);
        let result = spawned.wait(Duration::from_secs(10), 64, &CancellationToken::new()).await;
        assert_eq!(result.end, ProcessEnd::Signaled(libc::SIGKILL));
    }

    #[test]
    fn tail_keeps_the_last_bytes() {
        let mut t = Tail::new(4);
        t.push(b"abc");
        t.push(b"def");
        assert_eq!(t.text(), "cdef");
        t.push(b"0123456789");
        assert_eq!(t.text(), "6789");
        assert_eq!(t.total, 16);
    }

    #[tokio::test]
    async fn exit_status_signal_and_output() {
        let r = run("echo out; echo err >&2; exit 3", Duration::from_secs(10), 1024).await;
        assert_eq!(r.end, ProcessEnd::Exited(3));
        assert!(r.output.contains("out") && r.output.contains("err"), "{:?}", r.output);
        let r = run("kill -TERM $$", Duration::from_secs(10), 1024).await;
        assert_eq!(r.end, ProcessEnd::Signaled(libc::SIGTERM));
    }

    #[tokio::test]
    async fn flood_is_capped_and_does_not_block() {
        let r = run("head -c 5000000 /dev/zero | tr '\\0' x; echo END", Duration::from_secs(30), 100).await;
        assert_eq!(r.end, ProcessEnd::Exited(0));
        assert_eq!(r.output_bytes, 5_000_004);
        assert_eq!(r.output.len(), 100);
        assert!(r.output.ends_with("xEND\n"));
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let r = run(&script, Duration::from_millis(500), 1024).await;
        assert_eq!(r.end, ProcessEnd::TimedOut);
        let pid: u32 = std::fs::read_to_string(&pidfile).unwrap().trim().parse().unwrap();
        // Killed and reaped by init (or a zombie of a dead parent): no longer running.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z")) {
            assert!(std::time::Instant::now() < deadline, "the background child survived the timeout");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        let stat = "4242 (a (b) c) S 1 777 777 0 -1 4194560 100 0 0 0";
        assert_eq!(stat_field::<i32>(stat, 5), Some(777));
        assert_eq!(stat_field::<u64>(stat, 3), None, "the state is a letter");
        assert_eq!(stat_field::<i32>("4242 (x", 5), None);
        // A child that leads a group of its own.
        let mut child =
            std::os::unix::process::CommandExt::process_group(std::process::Command::new("sleep").arg("30"), 0)
                .spawn()
                .unwrap();
        let pid = child.id();
        assert_eq!(process_group(pid), i32::try_from(pid).ok());
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(process_group(pid), None, "reaped: no such process");
    }

    #[test]
    fn start_time_names_a_process() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
        assert_eq!(start_time(me), start_time(me));
        assert!(start_time(u32::MAX).is_none());
    }
}
