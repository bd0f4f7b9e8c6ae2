//! Scheduled jobs as a device runs them: the definition ([`JobSpec`]), read
//! and validated the same way from the agent's `[[job]]` config tables and
//! from the `jobs` list of the hub's desired state, and what a run reports
//! ([`JobRun`]).
//!
//! Schedules are cron expressions with seconds (six fields, or seven with a
//! year; evaluated in UTC so one schedule means the same instant across a
//! fleet in many time zones) or `@every <duration>` (elapsed time, unaffected
//! by clock changes). Cron expressions are parsed exactly as
//! tokio-cron-scheduler parses them, so what validation accepts the
//! scheduler runs, and the next-run times shown are the ones it uses.

use crate::config::{ConfigError, FromConfig, Section};
use crate::time::Timestamp;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

/// Longest captured output a job may keep.
pub const MAX_OUTPUT_LIMIT: u64 = 1 << 20;
/// Most retries a job may ask for.
pub const MAX_RETRIES: u32 = 100;
/// Shortest `@every` interval.
pub const MIN_EVERY: Duration = Duration::from_secs(1);
/// Longest delay between two attempts, however the backoff grows.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(3600);
/// Longest `@every` interval (a year; longer schedules are cron's).
pub const MAX_EVERY: Duration = Duration::from_secs(366 * 86_400);
/// Longest time one attempt of a job may run.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 86_400);

/// When a job runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Schedule {
    /// A cron expression with seconds, in UTC.
    Cron(String),
    /// Every so long, counted from the previous scheduled run.
    Every(Duration),
}

impl Schedule {
    /// Parses `@every 30s` or a cron expression with seconds.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("@every") {
            let d = crate::config::parse_duration(rest, MAX_EVERY)
                .map_err(|e| format!("invalid interval in {text:?}: {e}; write e.g. \"@every 30s\""))?;
            if d < MIN_EVERY {
                return Err(format!("{text:?}: the shortest interval is 1s"));
            }
            return Ok(Schedule::Every(d));
        }
        cron(text)?;
        Ok(Schedule::Cron(text.to_owned()))
    }

    /// The first scheduled time strictly after `after`, for cron schedules;
    /// `@every` schedules count from their previous run instead (see
    /// [`Schedule::next_every`]).
    pub fn next_cron_after(&self, after: Timestamp) -> Option<Timestamp> {
        let Schedule::Cron(text) = self else { return None };
        let cron = cron(text).ok()?;
        let start: DateTime<Utc> = DateTime::from_timestamp_millis(i64::try_from(after.0).ok()?)?;
        let next = cron.find_next_occurrence(&start, false).ok()?;
        Some(Timestamp(u64::try_from(next.timestamp_millis()).ok()?))
    }

    /// The next time a job with this schedule is due: for cron, the next
    /// occurrence after `now`; for `@every`, one interval after `last` (the
    /// previous scheduled run, or when the job was set up).
    pub fn next_due(&self, last: Option<Timestamp>, now: Timestamp) -> Option<Timestamp> {
        match self {
            Schedule::Cron(_) => self.next_cron_after(now),
            Schedule::Every(d) => Some(Self::next_every(*d, last.unwrap_or(now))),
        }
    }

    /// One `@every` interval after `last`.
    pub fn next_every(interval: Duration, last: Timestamp) -> Timestamp {
        last.saturating_add(interval)
    }

    /// True if a run was due after `since` and at or before `now`: the
    /// device missed it (catch-up).
    pub fn missed_between(&self, since: Timestamp, now: Timestamp) -> bool {
        match self {
            Schedule::Cron(_) => self.next_cron_after(since).is_some_and(|t| t <= now),
            Schedule::Every(d) => Self::next_every(*d, since) <= now,
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Cron(text) => f.write_str(text),
            Schedule::Every(d) => write!(f, "@every {}", humantime::format_duration(*d)),
        }
    }
}

/// Parses a cron expression the way tokio-cron-scheduler does.
pub fn cron(text: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(text)
        .map_err(|e| {
            format!("invalid cron expression {text:?} ({e}); six fields with seconds first, e.g. \"0 */5 * * * *\", or \"@every 30s\"")
        })
}

/// What to do when a run is due while the previous one still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Skip the new run.
    Forbid,
    /// Start it alongside.
    Allow,
    /// Kill the running one (its whole process group), then start.
    Replace,
}

impl FromConfig for Overlap {
    fn from_config(value: &toml::Value) -> Result<Self, String> {
        match value.as_str() {
            Some("forbid") => Ok(Overlap::Forbid),
            Some("allow") => Ok(Overlap::Allow),
            Some("replace") => Ok(Overlap::Replace),
            _ => Err(format!("expected \"forbid\", \"allow\" or \"replace\", found {value}")),
        }
    }
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Overlap::Forbid => "forbid",
            Overlap::Allow => "allow",
            Overlap::Replace => "replace",
        })
    }
}

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Runs a program with arguments (no shell unless the user writes one)
    /// in its own process group.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
        /// Extra environment variables.
        env: BTreeMap<String, String>,
        /// Working directory (absolute); default: the agent's data dir.
        working_dir: Option<PathBuf>,
    },
    /// A task built into the agent.
    Builtin(Builtin),
}

/// Tasks built into the agent, scheduled like commands. Backup, verify and
/// prune join these with the backup feature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Builtin {
    /// Reads every record of the agent's store and checks that it decodes.
    StoreCheck,
}

impl Builtin {
    /// Every built-in kind with its config name.
    pub const ALL: &[(&str, Builtin)] = &[("store-check", Builtin::StoreCheck)];

    /// The kind's config name.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, b)| *b == self).map_or("?", |(n, _)| n)
    }
}

/// One scheduled job, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Unique name on the device; the hub's job of the same name replaces
    /// the config's.
    pub name: String,
    /// When it runs.
    pub schedule: Schedule,
    /// What it does.
    pub action: Action,
    /// A run (one attempt) is killed with its process group after this long.
    pub timeout: Duration,
    /// Further attempts after a failed one.
    pub retries: u32,
    /// Delay before the first retry; doubles per retry, at most an hour.
    pub retry_backoff: Duration,
    /// Policy when a run is due while one still runs.
    pub overlap: Overlap,
    /// Run once at start if a run was missed while the agent was stopped.
    pub catch_up: bool,
    /// Scheduled runs start after a random delay up to this long.
    pub jitter: Duration,
    /// Bytes of output kept (the tail of stdout and stderr together).
    pub max_output: u64,
    /// False to switch a job off (a hub job can switch off a config job).
    pub enabled: bool,
}

impl JobSpec {
    /// The kind as written in config (`command`, `store-check`).
    pub fn kind(&self) -> &'static str {
        match &self.action {
            Action::Command { .. } => "command",
            Action::Builtin(b) => b.name(),
        }
    }

    /// Delay before attempt `attempt` (2 and up).
    pub fn retry_delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(2).min(30);
        self.retry_backoff.saturating_mul(1 << doublings).min(MAX_RETRY_DELAY)
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Reads one job from its section, recording every problem in it.
pub fn read_job(s: &Section<'_>) -> Option<JobSpec> {
    let name: Option<String> = s.require("name");
    if let Some(n) = &name {
        s.check("name", valid_name(n), "must be 1 to 64 letters, digits, '-', '_' or '.'");
    }
    let schedule = s.require::<String>("schedule").and_then(|text| match Schedule::parse(&text) {
        Ok(schedule) => Some(schedule),
        Err(e) => {
            s.error("schedule", e);
            None
        }
    });
    let kind: String = s.get_or("kind", "command".to_owned());
    let argv: Option<Vec<String>> = s.get("command");
    let env: BTreeMap<String, String> = s.get_or("env", BTreeMap::new());
    let working_dir: Option<PathBuf> = s.get("working_dir");
    let action = if kind == "command" {
        match &argv {
            None => {
                s.error("command", "missing required key (a list: program and arguments)");
                None
            }
            Some(a) if a.first().is_none_or(|p| p.is_empty()) => {
                s.error("command", "must start with the program to run");
                None
            }
            Some(a) => Some(Action::Command { argv: a.clone(), env, working_dir: working_dir.clone() }),
        }
    } else if let Some((_, builtin)) = Builtin::ALL.iter().find(|(n, _)| *n == kind) {
        for key in ["command", "env", "working_dir"] {
            s.check(key, !s.has(key), &format!("not used by a job of kind {kind:?}"));
        }
        Some(Action::Builtin(*builtin))
    } else {
        let known: Vec<&str> = std::iter::once("command").chain(Builtin::ALL.iter().map(|(n, _)| *n)).collect();
        s.error("kind", format!("unknown job kind {kind:?}; known kinds: {}", known.join(", ")));
        None
    };
    if let Some(dir) = &working_dir {
        s.check("working_dir", dir.is_absolute(), "must be an absolute path");
    }
    let timeout = s.get_or("timeout", Duration::from_secs(3600));
    s.check("timeout", !timeout.is_zero(), "must be more than zero");
    s.check("timeout", timeout <= MAX_TIMEOUT, "must be at most 30 days");
    let retries = s.get_or("retries", 0u32);
    s.check("retries", retries <= MAX_RETRIES, &format!("must be at most {MAX_RETRIES}"));
    let retry_backoff = s.get_or("retry_backoff", Duration::from_secs(10));
    s.check("retry_backoff", retry_backoff <= MAX_RETRY_DELAY, "must be at most 1h");
    let overlap = s.get_or("overlap", Overlap::Forbid);
    let catch_up = s.get_or("catch_up", false);
    let jitter = s.get_or("jitter", Duration::ZERO);
    if let Some(Schedule::Every(d)) = &schedule {
        s.check("jitter", jitter < *d, "must be shorter than the interval");
    }
    let max_output = s.get_or("max_output", crate::config::ByteSize(64 << 10)).0;
    s.check("max_output", max_output <= MAX_OUTPUT_LIMIT, "must be at most 1 MiB");
    let enabled = s.get_or("enabled", true);
    s.finish();
    Some(JobSpec {
        name: name?,
        schedule: schedule?,
        action: action?,
        timeout,
        retries,
        retry_backoff,
        overlap,
        catch_up,
        jitter,
        max_output,
        enabled,
    })
}

/// Reads the list of jobs under `key` (`job` in the agent config, `jobs` in
/// desired state), with duplicate names reported.
pub fn read_jobs(parent: &Section<'_>, key: &str) -> Vec<JobSpec> {
    let mut seen = BTreeSet::new();
    let mut jobs = Vec::new();
    for section in parent.array(key) {
        if let Some(job) = read_job(&section) {
            if seen.insert(job.name.clone()) {
                jobs.push(job);
            } else {
                section.error("name", format!("duplicate job name {:?}", job.name));
            }
        }
    }
    jobs
}

/// Formats errors of a JSON document as one line, for a 422 or a state
/// report.
pub fn describe_errors(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(|e| if e.path.is_empty() { e.message.clone() } else { format!("{}: {}", e.path, e.message) })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why a run started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// Its schedule.
    Schedule,
    /// At start, for a run missed while the agent was stopped.
    CatchUp,
    /// `outpost-agent run-job` on the device.
    Manual,
    /// A `run_job` command from the hub.
    Command {
        /// The command's id.
        id: u64,
    },
}

/// How one attempt ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunOutcome {
    /// The process exited with this status (0 is success).
    Exited {
        /// Exit status.
        code: i32,
    },
    /// The process was killed by this signal (not by the agent).
    Signaled {
        /// Signal number.
        signal: i32,
    },
    /// Killed with its process group at the timeout.
    TimedOut,
    /// It could not be started (no such program, bad working directory...).
    FailedToStart {
        /// Why.
        error: String,
    },
    /// Killed because a newer run replaced it (`overlap = "replace"`).
    Replaced,
    /// The agent stopped (or died) while it ran; it is not resumed.
    Interrupted,
    /// A built-in task failed.
    Failed {
        /// Why.
        error: String,
    },
}

impl RunOutcome {
    /// The variant's name in snake case (`exited`, `timed_out`...), as the
    /// API's `outcome_kind` shows it.
    pub fn kind(&self) -> &'static str {
        match self {
            RunOutcome::Exited { .. } => "exited",
            RunOutcome::Signaled { .. } => "signaled",
            RunOutcome::TimedOut => "timed_out",
            RunOutcome::FailedToStart { .. } => "failed_to_start",
            RunOutcome::Replaced => "replaced",
            RunOutcome::Interrupted => "interrupted",
            RunOutcome::Failed { .. } => "failed",
        }
    }

    /// True for a successful run.
    pub fn succeeded(&self) -> bool {
        matches!(self, RunOutcome::Exited { code: 0 })
    }

    /// True if no retry follows, whatever the job's retries: it succeeded,
    /// or it was replaced or interrupted.
    pub fn ends_run(&self) -> bool {
        self.succeeded() || matches!(self, RunOutcome::Replaced | RunOutcome::Interrupted)
    }
}

impl std::fmt::Display for RunOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunOutcome::Exited { code: 0 } => f.write_str("succeeded"),
            RunOutcome::Exited { code } => write!(f, "exited with status {code}"),
            RunOutcome::Signaled { signal } => write!(f, "killed by signal {signal}"),
            RunOutcome::TimedOut => f.write_str("timed out (process group killed)"),
            RunOutcome::FailedToStart { error } => write!(f, "failed to start: {error}"),
            RunOutcome::Replaced => f.write_str("replaced by a newer run"),
            RunOutcome::Interrupted => f.write_str("interrupted (agent stopped)"),
            RunOutcome::Failed { error } => write!(f, "failed: {error}"),
        }
    }
}

/// The record of one attempt of one run, sent to the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRun {
    /// Unique on the device; all attempts of one run share it.
    pub run_id: u64,
    /// The job's name.
    pub job: String,
    /// Why it ran.
    pub trigger: Trigger,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When the attempt started.
    pub started: Timestamp,
    /// When it ended.
    pub ended: Timestamp,
    /// How it ended.
    pub outcome: RunOutcome,
    /// The tail of its output (stdout and stderr interleaved).
    pub output: String,
    /// Bytes of output it produced in all (more than `output` holds if it
    /// was capped).
    pub output_bytes: u64,
}

/// The names of the jobs that run a device's scheduled backups start with
/// this (`backup-<set>`): the hub's digest finds overdue backups by it and
/// the agent's metrics count backup runs by it.
pub const BACKUP_JOB_PREFIX: &str = "backup-";

/// Where a job's definition came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobSource {
    /// The agent's config file.
    Config,
    /// The hub's desired state (replaces a config job of the same name).
    Hub,
}

impl std::fmt::Display for JobSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobSource::Config => "config",
            JobSource::Hub => "hub",
        })
    }
}

/// The jobs in force on a device, sent to the hub when they change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobsReport {
    /// Each job with where it came from.
    pub jobs: Vec<(JobSpec, JobSource)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::read_table;

    fn jobs(text: &str) -> Result<Vec<JobSpec>, Vec<ConfigError>> {
        let table: toml::Table = text.parse().unwrap();
        read_table(&table, |root| read_jobs(root, "job"))
    }

    #[test]
    fn reads_jobs_with_defaults() {
        let j = jobs(
            "[[job]]\nname = \"a\"\nschedule = \"@every 30s\"\ncommand = [\"true\"]\n\
             [[job]]\nname = \"b\"\nschedule = \"0 */5 * * * *\"\nkind = \"store-check\"\noverlap = \"replace\"\n",
        )
        .unwrap();
        assert_eq!(j.len(), 2);
        assert_eq!(j[0].schedule, Schedule::Every(Duration::from_secs(30)));
        assert_eq!(j[0].overlap, Overlap::Forbid);
        assert_eq!(j[0].timeout, Duration::from_secs(3600));
        assert_eq!(j[1].action, Action::Builtin(Builtin::StoreCheck));
        assert_eq!(j[1].overlap, Overlap::Replace);
    }

    #[test]
    fn every_problem_is_reported_with_the_job_name() {
        let err = jobs(
            "[[job]]\nname = \"bad-cron\"\nschedule = \"*/5 * * * *\"\ncommand = [\"x\"]\n\
             [[job]]\nname = \"bad-kind\"\nschedule = \"@every 1m\"\nkind = \"teleport\"\n\
             [[job]]\nname = \"zero\"\nschedule = \"@every 1m\"\ncommand = [\"x\"]\ntimeout = \"0s\"\n\
             [[job]]\nname = \"zero\"\nschedule = \"@every 1m\"\ncommand = [\"x\"]\nbogus = 1\n",
        )
        .unwrap_err();
        let paths: Vec<_> = err.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["job[bad-cron].schedule", "job[bad-kind].kind", "job[zero].timeout", "job[zero].bogus", "job[zero].name"],
            "{err:?}"
        );
        assert!(err[0].message.contains("invalid cron expression"), "{}", err[0].message);
        assert!(err[1].message.contains("unknown job kind \"teleport\""));
        assert!(err[4].message.contains("duplicate"));
    }

    #[test]
    fn next_runs_and_missed_runs() {
        let s = Schedule::parse("0 0 * * * *").unwrap();
        // 1970-01-01T00:30:00Z -> next at 01:00.
        assert_eq!(s.next_cron_after(Timestamp(1_800_000)), Some(Timestamp(3_600_000)));
        assert!(s.missed_between(Timestamp(1_800_000), Timestamp(3_600_000)));
        assert!(!s.missed_between(Timestamp(1_800_000), Timestamp(3_599_999)));
        let e = Schedule::parse("@every 10s").unwrap();
        assert!(e.missed_between(Timestamp(0), Timestamp(10_000)));
        assert!(!e.missed_between(Timestamp(0), Timestamp(9_999)));
        assert_eq!(e.to_string(), "@every 10s");
        assert!(Schedule::parse("@every 10ms").unwrap_err().contains("shortest"));
    }

    #[test]
    fn absurd_intervals_and_timeouts_are_refused_with_their_key() {
        // The desired-state push that crash-looped devices: it must never
        // get past validation, on the hub or on the device.
        let err = Schedule::parse("@every 9223372036854775813s").unwrap_err();
        assert!(err.contains("too long"), "{err}");
        assert!(Schedule::parse("@every 366days").is_ok());
        let err = jobs(
            "[[job]]\nname = \"a\"\nschedule = \"@every 1m\"\ncommand = [\"true\"]\ntimeout = \"31days\"\nretry_backoff = \"2h\"\njitter = \"99999999999999999s\"\n",
        )
        .unwrap_err();
        let paths: Vec<&str> = err.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["job[a].timeout", "job[a].retry_backoff", "job[a].jitter"], "{err:?}");
    }

    #[test]
    fn schedule_arithmetic_saturates() {
        let e = Schedule::Every(Duration::from_secs(u64::MAX));
        assert_eq!(e.next_due(Some(Timestamp(1)), Timestamp(2)), Some(Timestamp(u64::MAX)));
        assert!(!e.missed_between(Timestamp(0), Timestamp(u64::MAX - 1)));
        let c = Schedule::parse("0 0 * * * *").unwrap();
        assert_eq!(c.next_cron_after(Timestamp(u64::MAX)), None);
    }

    #[test]
    fn retry_delay_doubles_up_to_an_hour() {
        let mut j = jobs("[[job]]\nname = \"a\"\nschedule = \"@every 30s\"\ncommand = [\"true\"]\n").unwrap().remove(0);
        j.retry_backoff = Duration::from_secs(1);
        assert_eq!(j.retry_delay(2), Duration::from_secs(1));
        assert_eq!(j.retry_delay(3), Duration::from_secs(2));
        assert_eq!(j.retry_delay(4), Duration::from_secs(4));
        assert_eq!(j.retry_delay(40), MAX_RETRY_DELAY);
    }
}
