//! `outpost-agent`: enroll, validate a config, or run the daemon.

use clap::{CommandFactory, Parser, Subcommand};
use outpost_agent::backup::{BackupError, HubLink, Repository, RestoreTo, SnapshotInfo};
use outpost_agent::config::AgentConfig;
use outpost_agent::control::{self, Reply, Request};
use outpost_agent::jobs::JobView;
use outpost_agent::keyfile::{KeyFileError, read_key};
use outpost_shared::DeviceId;
use outpost_shared::cli::{self, Doc, Shell};
use outpost_shared::config::ConfigFile;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "outpost-agent", version, about = "Outpost edge agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum BackupCmd {
    /// Back up a set now.
    Run {
        /// The set's name (`[[backup]] name`).
        set: String,
    },
    /// List the snapshots.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot into a directory, from this device's repository
    /// or, with `--from-device`, from the hub.
    Restore {
        /// Snapshot name, or `latest` (the default).
        #[arg(conflicts_with = "snapshot_opt")]
        snapshot: Option<String>,
        /// The same, as an option.
        #[arg(long = "snapshot", id = "snapshot_opt", value_name = "SNAPSHOT")]
        snapshot_opt: Option<String>,
        /// Fetch the snapshot of this device (this one, or the dead device
        /// this one replaces: an operator grants it with `outpostctl backups
        /// grant OLD --to NEW`) from the hub.
        #[arg(long)]
        from_device: Option<String>,
        /// Directory to restore into: a file backed up as /srv/data/x is
        /// restored as DIR/srv/data/x.
        #[arg(long, required_unless_present = "in_place")]
        target: Option<PathBuf>,
        /// Restore every file to the path it was backed up from.
        #[arg(long, conflicts_with = "target")]
        in_place: bool,
        /// Replace existing files that differ from the backup (without it
        /// they are kept and reported, and the restore exits 1).
        #[arg(long)]
        overwrite: bool,
        /// With `latest`: the newest snapshot of this set.
        #[arg(long)]
        set: Option<String>,
        /// Only this path and what is under it (repeatable).
        #[arg(long = "path")]
        paths: Vec<String>,
    },
    /// Re-read, decrypt and re-hash every chunk; name the bad ones.
    Verify,
    /// Send the hub the chunks and snapshots of uploading sets it lacks.
    Upload,
    /// Keep what each set's retention says; drop chunks no snapshot needs.
    Prune,
}

#[derive(Subcommand)]
enum Command {
    /// Enroll this device with a token from `outpost-hub token create`.
    Enroll {
        /// The enrollment token.
        #[arg(long, env = "OUTPOST_ENROLL_TOKEN", hide_env_values = true)]
        token: String,
        /// The agent's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Name to show in the fleet (default: host name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Run the daemon.
    Run {
        /// Config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a config file without starting.
    Validate {
        /// Config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Backups on this device (works with no hub and no daemon).
    Backup {
        /// Config file (backup sets, repository, key).
        #[arg(long)]
        config: PathBuf,
        #[command(subcommand)]
        op: BackupCmd,
    },
    /// List the running daemon's jobs with their next and last runs.
    Jobs {
        /// The daemon's config file (for its data dir).
        #[arg(long)]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the LAN peers the running daemon knows (works with no hub).
    Peers {
        /// The daemon's config file (for its data dir).
        #[arg(long)]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a job now through the running daemon; waits for it and exits 0
    /// if it succeeded.
    RunJob {
        /// The job's name.
        name: String,
        /// The daemon's config file (for its data dir).
        #[arg(long)]
        config: PathBuf,
        /// Return once the run has started.
        #[arg(long)]
        no_wait: bool,
    },
    /// The manual page (roff), printed (e.g. `outpost-agent man | man -l -`).
    Man,
    /// Shell completions, printed (e.g. `outpost-agent completions bash`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: Shell,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon gives freed heap back to the OS (it idles for months);
    // a one-shot backup command keeps glibc's adaptive defaults, which reuse
    // its chunk-sized buffers instead of mapping and faulting each one.
    if !matches!(cli.command, Command::Backup { .. }) {
        outpost_agent::process::return_freed_memory();
    }
    if !matches!(cli.command, Command::Run { .. }) {
        // A one-shot command piped into `head` ends quietly when the reader
        // goes, as Unix tools do, instead of panicking on EPIPE. The daemon
        // keeps Rust's default (SIGPIPE ignored, EPIPE as an error).
        outpost_agent::process::default_sigpipe();
    }
    match cli.command {
        Command::Man => cli::print(Doc::Man, Cli::command()),
        Command::Completions { shell } => cli::print(Doc::Completions(shell), Cli::command()),
        Command::Enroll { token, data_dir, name } => enroll(&token, data_dir, name),
        Command::Validate { config } => AgentConfig::validate_command(&config),
        Command::Jobs { config, json } => match AgentConfig::load_or_exit(&config) {
            Ok(config) => local(&config, Request::Jobs, |reply| match reply {
                Reply::Jobs(jobs) if json => println!("{}", serde_json::to_string_pretty(jobs).unwrap_or_default()),
                Reply::Jobs(jobs) => print!("{}", jobs_table(jobs)),
                _ => {}
            }),
            Err(code) => code,
        },
        Command::Peers { config, json } => match AgentConfig::load_or_exit(&config) {
            Ok(config) => local(&config, Request::Peers, |reply| match reply {
                Reply::Peers(peers) if json => println!("{}", serde_json::to_string_pretty(peers).unwrap_or_default()),
                Reply::Peers(peers) => print!("{}", outpost_shared::peers::render(peers)),
                _ => {}
            }),
            Err(code) => code,
        },
        Command::RunJob { name, config, no_wait } => match AgentConfig::load_or_exit(&config) {
            Ok(config) => {
                let mut ok = no_wait;
                let code = local(&config, Request::RunJob { name, wait: !no_wait }, |reply| match reply {
                    Reply::Started(id) => println!("run {id} started"),
                    Reply::Attempt(run) => {
                        println!("attempt {}: {} after {:?}", run.attempt, run.outcome, run.started.until(run.ended));
                        if !run.output.is_empty() {
                            println!("--- output ({} bytes, last {} shown) ---", run.output_bytes, run.output.len());
                            println!("{}", run.output.trim_end());
                        }
                        ok = run.outcome.succeeded();
                    }
                    _ => {}
                });
                if code == ExitCode::SUCCESS && !ok { ExitCode::FAILURE } else { code }
            }
            Err(code) => code,
        },
        Command::Backup { config, op } => match AgentConfig::load_or_exit(&config) {
            Ok(config) => {
                let op = match op {
                    BackupCmd::Run { set } => Operation::Run { set },
                    BackupCmd::List { json } => Operation::List { json },
                    BackupCmd::Restore {
                        snapshot,
                        snapshot_opt,
                        from_device,
                        target,
                        in_place,
                        overwrite,
                        set,
                        paths,
                    } => {
                        let snapshot = snapshot.or(snapshot_opt).unwrap_or_else(|| "latest".into());
                        let target = target.filter(|_| !in_place).unwrap_or_else(|| PathBuf::from("/"));
                        Operation::Restore { from_device, snapshot, target, set, paths, overwrite }
                    }
                    BackupCmd::Verify => Operation::Verify,
                    BackupCmd::Upload => Operation::Upload,
                    BackupCmd::Prune => Operation::Prune,
                };
                // What the backup code logs (an interrupted run recovered, an
                // upload not marked) reaches the operator's terminal, or the
                // output the daemon keeps of a scheduled or hub-sent run.
                outpost_shared::logging::init("warn");
                match backup_command(&config, op) {
                    Ok(code) => ExitCode::from(code),
                    Err(e) => {
                        eprintln!("outpost-agent backup: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(code) => code,
        },
        Command::Run { config: path } => match AgentConfig::load_checked_or_exit(&path) {
            Ok(mut config) => {
                config.config_path = Some(std::fs::canonicalize(&path).unwrap_or(path));
                outpost_shared::logging::init(&config.log);
                match outpost_agent::run(config, outpost_shared::logging::wait_for_signal()) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!(error = %e, "Agent cannot run.");
                        eprintln!("outpost-agent: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
            Err(code) => code,
        },
    }
}

/// Sends `request` to the daemon's control socket; prints errors.
fn local(config: &AgentConfig, request: Request, mut each: impl FnMut(&Reply)) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outpost-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    let result = runtime.block_on(control::request(&config.data_dir, &request, |reply| {
        if let Reply::Error(e) = reply {
            eprintln!("outpost-agent: {e}");
            failed = true;
        }
        each(reply);
    }));
    match result {
        Ok(()) if !failed => ExitCode::SUCCESS,
        Ok(()) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("outpost-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn jobs_table(jobs: &[JobView]) -> String {
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            let next = match (j.spec.enabled, j.next_run) {
                (false, _) => "disabled".into(),
                (true, Some(t)) => t.rfc3339(),
                (true, None) => "-".into(),
            };
            let last =
                j.last.as_ref().map_or_else(|| "never".into(), |l| format!("{} ({})", l.ended.rfc3339(), l.outcome));
            let running = if j.running.is_empty() { "-".into() } else { j.running.len().to_string() };
            vec![
                j.spec.name.clone(),
                j.source.to_string(),
                j.spec.kind().into(),
                j.spec.schedule.to_string(),
                j.spec.overlap.to_string(),
                next,
                running,
                last,
            ]
        })
        .collect();
    outpost_shared::table::render(
        &["NAME", "SOURCE", "KIND", "SCHEDULE", "OVERLAP", "NEXT RUN", "RUNNING", "LAST RUN"],
        &rows,
    )
}

fn enroll(token: &str, data_dir: PathBuf, name: Option<String>) -> ExitCode {
    let name = name.or_else(|| sysinfo::System::host_name().ok()).unwrap_or_else(|| "unnamed".into());
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outpost-agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(outpost_agent::enroll::enroll(token, &data_dir, &name)) {
        Ok(identity) => {
            println!("Enrolled as {} with hub {}.", identity.device_id, identity.hub);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("outpost-agent: enrollment failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What `outpost-agent backup` does.
#[derive(Debug, Clone)]
enum Operation {
    /// Back up one set now.
    Run {
        /// The set's name.
        set: String,
    },
    /// List the snapshots.
    List {
        /// As JSON.
        json: bool,
    },
    /// Send the hub what it lacks of every uploading set's snapshots.
    Upload,
    /// Restore a snapshot (a name or `latest`) into `target`.
    Restore {
        /// Restore another device's snapshot from the hub (needs a grant).
        from_device: Option<String>,
        /// Snapshot name or `latest`.
        snapshot: String,
        /// Where to write (`/` restores in place).
        target: PathBuf,
        /// With `latest`: of this set.
        set: Option<String>,
        /// Only these paths (and what is under them).
        paths: Vec<String>,
        /// Replace existing files that differ from the backup.
        overwrite: bool,
    },
    /// Re-read and check every chunk.
    Verify,
    /// Apply every set's retention and drop unneeded chunks.
    Prune,
}

/// Prints what a restore could not set, one line each; the exit status:
/// 3 when there was something (as for a snapshot with problems), else 0.
fn restore_problems(restored: &outpost_agent::backup::Restored) -> u8 {
    for p in &restored.problems {
        println!("not restored as it was: {}", p.escape_debug());
    }
    if restored.problems.is_empty() { 0 } else { 3 }
}

/// Runs a backup operation on the device's repository (no daemon and no hub needed; the
/// repository lock keeps it apart from a scheduled backup). Returns the
/// process exit status: 0 done, 1 failed, 3 a snapshot was written but some
/// paths could not be backed up (as restic does).
fn backup_command(config: &AgentConfig, op: Operation) -> Result<u8, BackupError> {
    let key_file =
        config.backup_repo.key_file.clone().ok_or_else(|| KeyFileError::BadKey(PathBuf::from("(not set)")))?;
    let key = read_key(&key_file)?;
    let dir = &config.backup_repo.dir;
    match op {
        Operation::Upload => {
            let repo = Repository::open_unlocked(dir, &key)?;
            let hub = HubLink::connect(&config.data_dir, &config.uplink)
                .map(|h| h.with_upload_rate(config.backup_repo.upload_rate))
                .inspect_err(|_| repo.mark_pending())?;
            let report = repo.upload(&config.backups, &hub);
            hub.close();
            let r = report?;
            println!(
                "uploaded {} snapshot(s): {} chunk(s) sent ({} bytes), {} already at the hub",
                r.snapshots.len(),
                r.chunks_sent,
                r.bytes_sent,
                r.chunks_present
            );
            Ok(0)
        }
        Operation::Restore { from_device: Some(owner), snapshot, target, set, paths, overwrite } => {
            let owner: DeviceId = owner.parse().map_err(|e| BackupError::Setup(format!("--from-device: {e}")))?;
            let repo = Repository::open_unlocked(dir, &key)?;
            let hub = HubLink::connect(&config.data_dir, &config.uplink)
                .map(|h| h.with_upload_rate(config.backup_repo.upload_rate))?;
            let to = RestoreTo { target: &target, only: &paths, overwrite };
            let restored = repo.restore_from_hub(&hub, &owner, &snapshot, set.as_deref(), &to);
            hub.close();
            let (name, r) = restored?;
            println!(
                "restored {} entries of {owner}'s snapshot {name} from the hub into {}",
                r.entries,
                target.display()
            );
            Ok(restore_problems(&r))
        }
        Operation::Run { set } => {
            let set = config.backups.iter().find(|s| s.name == set).ok_or(BackupError::NoSet(set))?;
            // Every line of the run names its set (the run is synchronous).
            let span = tracing::info_span!("backup", set = %set.name);
            let _run = span.enter();
            let repo = Repository::open(dir, &key)?;
            let s = repo.backup(set)?;
            println!(
                "snapshot {}: {} entries, {} bytes, {} files read, {} new chunks ({} bytes stored), {:.1}s",
                s.name,
                s.entries.len(),
                s.bytes,
                s.files_read,
                s.new_chunks,
                s.new_stored_bytes,
                s.started.until(s.ended).as_secs_f64()
            );
            let carries = outpost_agent::backup::Carries::of(&s.entries);
            if carries != outpost_agent::backup::Carries::default() {
                println!("carries: {carries}");
            }
            for p in &s.problems {
                println!("problem: {}", p.escape_debug());
            }
            for n in &s.notes {
                println!("note: {}", n.escape_debug());
            }
            // The set's retention applies after every run, so a device left
            // alone keeps what its config says without anyone running prune.
            let mut code = if s.problems.is_empty() { 0 } else { 3 };
            if set.retention != outpost_agent::config::Retention::default() {
                match repo.prune(std::slice::from_ref(set)) {
                    Ok((removed, chunks)) => {
                        println!("retention: {} snapshot(s) and {chunks} chunk(s) removed", removed.len())
                    }
                    Err(e) => {
                        println!("retention not applied: {e}");
                        code = 1;
                    }
                }
            }
            if set.upload {
                repo.mark_pending();
                drop(repo);
                // The snapshot is safe here; an upload that fails now is
                // retried by the daemon once the hub is reachable.
                match Repository::open_unlocked(dir, &key).and_then(|repo| {
                    let hub = HubLink::connect(&config.data_dir, &config.uplink)
                        .map(|h| h.with_upload_rate(config.backup_repo.upload_rate))
                        .inspect_err(|_| repo.mark_pending())?;
                    let report = repo.upload(&config.backups, &hub);
                    hub.close();
                    report
                }) {
                    Ok(r) => println!(
                        "uploaded to the hub: {} chunk(s) sent ({} bytes), {} already there",
                        r.chunks_sent, r.bytes_sent, r.chunks_present
                    ),
                    Err(e) => println!("upload pending ({e}); the agent retries when the hub is reachable"),
                }
            }
            Ok(code)
        }
        Operation::List { json } => {
            let repo = Repository::open(dir, &key)?;
            let infos: Vec<SnapshotInfo> = repo.snapshot_infos()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&infos).unwrap_or_default());
            } else {
                let rows: Vec<Vec<String>> = infos
                    .iter()
                    .map(|i| {
                        vec![
                            i.name.clone(),
                            i.set.clone(),
                            i.started.clone(),
                            i.entries.to_string(),
                            i.bytes.to_string(),
                            i.problems.to_string(),
                            i.carries.to_string(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    outpost_shared::table::render(
                        &["SNAPSHOT", "SET", "STARTED", "ENTRIES", "BYTES", "PROBLEMS", "CARRIES"],
                        &rows
                    )
                );
            }
            Ok(0)
        }
        Operation::Restore { from_device: None, snapshot, target, set, paths, overwrite } => {
            let repo = Repository::open(dir, &key)?;
            let s = repo.find(&snapshot, set.as_deref())?;
            let r = repo.restore(&s, &RestoreTo { target: &target, only: &paths, overwrite })?;
            println!("restored {} entries of snapshot {} into {}", r.entries, s.name, target.display());
            Ok(restore_problems(&r))
        }
        Operation::Verify => {
            let repo = Repository::open(dir, &key)?;
            let problems = repo.verify()?;
            // What each snapshot carries beside content (its head says).
            for i in repo.snapshot_infos()? {
                println!("snapshot {}: {} entries, {} bytes; carries: {}", i.name, i.entries, i.bytes, i.carries);
            }
            for p in &problems {
                println!("{p}");
            }
            if problems.is_empty() {
                println!("every chunk checks out");
                Ok(0)
            } else {
                println!("{} problem(s) found", problems.len());
                Ok(1)
            }
        }
        Operation::Prune => {
            let repo = Repository::open(dir, &key)?;
            let (removed, chunks) = repo.prune(&config.backups)?;
            for name in &removed {
                println!("removed snapshot {name}");
            }
            println!("{} snapshot(s) and {chunks} chunk(s) removed", removed.len());
            Ok(0)
        }
    }
}
