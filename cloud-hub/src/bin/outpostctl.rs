//! `outpostctl`: the fleet manager's CLI for the hub's API.

use clap::{Parser, Subcommand};
use outpost_hub::api::CommandRequest;
use outpost_hub::api::{CommandStateView, OutcomeView};
use outpost_hub::client::{Client, render_jobs, render_table};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "outpostctl", version, about = "Manage an Outpost fleet through the hub's API")]
struct Cli {
    /// The hub's API base URL.
    #[arg(long, env = "OUTPOST_HUB", default_value = "http://127.0.0.1:8080")]
    hub: String,
    /// API bearer token.
    #[arg(long, env = "OUTPOST_TOKEN", hide_env_values = true)]
    token: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::enum_variant_names)] // `outpostctl command` is the natural verb.
enum Command {
    /// List devices: id, name, online, last seen, version, CPU %, memory %.
    Devices {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one device in full (JSON).
    Device {
        /// Device id.
        id: String,
    },
    /// Commands: send, list, show.
    Command {
        #[command(subcommand)]
        command: CommandCmd,
    },
    /// Desired state: get, set.
    Desired {
        #[command(subcommand)]
        command: DesiredCmd,
    },
    /// A device's LAN peers as it last reported them: trust, uplink, addresses.
    Peers {
        /// Device id.
        device: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Backups at the hub: list, verify, grant.
    Backups {
        #[command(subcommand)]
        command: BackupsCmd,
    },
    /// A device's jobs: schedule, next run, last run.
    Jobs {
        /// Device id.
        device: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The newest attempts of one job on a device (JSON).
    JobRuns {
        /// Device id.
        device: String,
        /// Job name.
        job: String,
        /// Most attempts.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Run a job on a device now (a `run_job` command), wait for its
    /// attempts and print them; exits 0 if the run succeeded.
    RunJob {
        /// Device id.
        device: String,
        /// Job name.
        job: String,
        /// Give up waiting after this long (the run goes on).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
        /// Give up if undelivered after this long.
        #[arg(long, default_value = "1h")]
        expires_in: String,
    },
    /// Telemetry history of a device (JSON, read and printed page by page).
    Metrics {
        /// Device id.
        id: String,
        /// Earliest sample (RFC 3339 or ms since the epoch).
        #[arg(long)]
        since: Option<String>,
        /// Latest sample, exclusive.
        #[arg(long)]
        until: Option<String>,
        /// Most samples.
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[derive(Subcommand)]
enum BackupsCmd {
    /// A device's uploaded snapshots.
    List {
        /// Device id.
        device: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-read and re-hash every chunk of a device at the hub; exits 1 and
    /// names each bad chunk if any.
    Verify {
        /// Device id.
        device: String,
    },
    /// Delete everything the hub holds of a device's backups (a retired
    /// device whose data was restored elsewhere). Admin role.
    Delete {
        /// Device id.
        device: String,
        /// Required: there is no undo.
        #[arg(long)]
        yes: bool,
    },
    /// Apply the hub's retention (`[backups.retention]` in hub.toml) to a
    /// device now: drop the snapshots it does not keep and the chunks no
    /// kept snapshot needs. Admin role; `--dry-run` (operator) only says
    /// what would go.
    Prune {
        /// Device id.
        device: String,
        /// Report only.
        #[arg(long)]
        dry_run: bool,
    },
    /// Let another device (a replacement) fetch a device's backups, for
    /// `outpost-agent backup restore --from-device DEVICE` on it.
    Grant {
        /// Whose backups.
        device: String,
        /// The device that may fetch them.
        #[arg(long)]
        to: String,
        /// For how long (default 24h).
        #[arg(long)]
        valid_for: Option<String>,
    },
}

#[derive(Subcommand)]
enum CommandCmd {
    /// Queue a command; it is delivered when the device is online, once.
    Send {
        /// Device id.
        device: String,
        /// `echo` or `exec`.
        kind: String,
        /// Arguments (for exec: the program and its arguments).
        args: Vec<String>,
        /// Give up if undelivered after this long.
        #[arg(long, default_value = "1h")]
        expires_in: String,
        /// Wait this long for the outcome and print it.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<std::time::Duration>,
    },
    /// A device's commands.
    List {
        /// Device id.
        device: String,
    },
    /// One command.
    Show {
        /// Command id.
        id: u64,
    },
}

#[derive(Subcommand)]
enum DesiredCmd {
    /// Desired and reported state side by side.
    Get {
        /// Device id.
        device: String,
    },
    /// Replace the whole desired state (optimistic: fails if it changed
    /// meanwhile). Keys and jobs the new document lacks are removed, and
    /// named on standard error; use `patch` to change one key.
    Set {
        /// Device id.
        device: String,
        /// The document, JSON (e.g. '{"telemetry_interval":"30s"}').
        doc: String,
        /// Version the change is based on; default: the current one.
        #[arg(long)]
        version: Option<u64>,
    },
    /// Change part of the desired state: a JSON merge patch (RFC 7396) on
    /// the current document; `null` removes a key
    /// (e.g. '{"telemetry_interval":"30s"}' keeps the jobs).
    Patch {
        /// Device id.
        device: String,
        /// The patch, a JSON object.
        patch: String,
    },
}

fn render_backups(view: &outpost_hub::api::BackupsView) -> String {
    let rows: Vec<Vec<String>> = view
        .snapshots
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.set.clone(),
                s.started.clone(),
                s.entries.to_string(),
                s.bytes.to_string(),
                s.problems.to_string(),
                s.uploaded_at.clone(),
            ]
        })
        .collect();
    let mut out = outpost_shared::table::render(
        &["SNAPSHOT", "SET", "STARTED", "ENTRIES", "BYTES", "PROBLEMS", "UPLOADED"],
        &rows,
    );
    out.push_str(&format!("{} chunk(s), {} bytes at the hub\n", view.stored_chunks, view.stored_bytes));
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = Client::new(&cli.hub, &cli.token);
    let result = match cli.command {
        Command::Devices { json: false } => client.devices().map(|d| print!("{}", render_table(&d))),
        Command::Devices { json: true } => client.devices().map(|d| print_json(&d)),
        Command::Device { id } => client.device(&id).map(|d| print_json(&d)),
        Command::Metrics { id, since, until, limit } => print_metrics(&client, &id, since, until, limit),
        Command::Command { command: CommandCmd::List { device } } => client.commands(&device).map(|c| print_json(&c)),
        Command::Command { command: CommandCmd::Show { id } } => client.command(id).map(|c| print_json(&c)),
        Command::Command { command: CommandCmd::Send { device, kind, args, expires_in, wait } } => {
            let request = CommandRequest { kind, args, expires_in: Some(expires_in) };
            send_and_wait(&client, &device, &request, wait)
        }
        Command::Peers { device, json: false } => {
            client.peers(&device).map(|p| print!("{}", outpost_hub::client::render_peers(&p.peers)))
        }
        Command::Peers { device, json: true } => client.peers(&device).map(|p| print_json(&p)),
        Command::Backups { command: BackupsCmd::List { device, json: false } } => {
            client.backups(&device).map(|b| print!("{}", render_backups(&b)))
        }
        Command::Backups { command: BackupsCmd::List { device, json: true } } => {
            client.backups(&device).map(|b| print_json(&b))
        }
        Command::Backups { command: BackupsCmd::Verify { device } } => match client.verify_backups(&device) {
            Ok(report) => {
                for p in &report.problems {
                    println!("{p}");
                }
                println!(
                    "{} chunk(s), {} bytes checked, {} problem(s)",
                    report.chunks,
                    report.bytes,
                    report.problems.len()
                );
                return if report.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE };
            }
            Err(e) => Err(e),
        },
        Command::Backups { command: BackupsCmd::Prune { device, dry_run } } => {
            client.prune_backups(&device, dry_run).map(|r| {
                let verb = if r.dry_run { "would remove" } else { "removed" };
                for name in &r.snapshots_removed {
                    println!("{verb} snapshot {name}");
                }
                println!(
                    "{verb} {} snapshot(s) and {} chunk(s), {} bytes; {} snapshot(s) kept",
                    r.snapshots_removed.len(),
                    r.chunks_removed,
                    r.bytes_freed,
                    r.snapshots_kept
                );
                if let Some(why) = &r.chunks_kept_because {
                    println!("no chunk removed: {why}");
                }
            })
        }
        Command::Backups { command: BackupsCmd::Delete { device, yes: false } } => {
            eprintln!("outpostctl: deleting {device}'s backups at the hub cannot be undone; add --yes");
            return ExitCode::from(2);
        }
        Command::Backups { command: BackupsCmd::Delete { device, yes: true } } => {
            client.delete_backups(&device).map(|d| {
                println!(
                    "deleted {} snapshot(s), {} chunk(s), {} bytes of {}",
                    d.snapshots, d.chunks, d.bytes, d.device
                )
            })
        }
        Command::Backups { command: BackupsCmd::Grant { device, to, valid_for } } => {
            client.grant_backups(&device, &to, valid_for.as_deref()).map(|g| {
                println!("{} may fetch {}'s backups until {} (granted by {})", g.reader, g.owner, g.expires_at, g.by)
            })
        }
        Command::Jobs { device, json: false } => client.jobs(&device).map(|j| print!("{}", render_jobs(&j))),
        Command::Jobs { device, json: true } => client.jobs(&device).map(|j| print_json(&j)),
        Command::JobRuns { device, job, limit } => client.job_runs(&device, &job, limit).map(|r| print_json(&r)),
        Command::RunJob { device, job, wait, expires_in } => {
            return run_job(&client, &device, &job, wait, expires_in);
        }
        Command::Desired { command: DesiredCmd::Get { device } } => client.desired(&device).map(|d| print_json(&d)),
        Command::Desired { command: DesiredCmd::Set { device, doc, version } } => match serde_json::from_str(&doc) {
            Err(e) => {
                eprintln!("outpostctl: the document is not JSON: {e}");
                return ExitCode::from(64);
            }
            Ok(doc) => client.desired(&device).and_then(|current| {
                let removed = outpost_shared::desired::removed_by(&current.doc, &doc);
                let view = client.put_desired(&device, version.unwrap_or(current.version), doc)?;
                if !removed.is_empty() {
                    eprintln!("outpostctl: removed from the desired state: {}", removed.join(", "));
                }
                print_json(&view);
                Ok(())
            }),
        },
        Command::Desired { command: DesiredCmd::Patch { device, patch } } => match serde_json::from_str(&patch) {
            Err(e) => {
                eprintln!("outpostctl: the patch is not JSON: {e}");
                return ExitCode::from(64);
            }
            Ok(patch) => client.patch_desired(&device, patch).map(|d| print_json(&d)),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpostctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn send_and_wait(
    client: &Client,
    device: &str,
    request: &CommandRequest,
    wait: Option<std::time::Duration>,
) -> Result<(), outpost_hub::client::ClientError> {
    let record = client.send_command(device, request)?;
    let Some(wait) = wait else {
        print_json(&record);
        return Ok(());
    };
    let deadline = std::time::Instant::now() + wait;
    loop {
        let now = client.command(record.id)?;
        let settled = now.state.is_final();
        if settled || std::time::Instant::now() >= deadline {
            print_json(&now);
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Queues `run_job`, then follows the run's attempts at the hub until the
/// last one (success, no retries left, or replaced/interrupted).
fn run_job(client: &Client, device: &str, job: &str, wait: std::time::Duration, expires_in: String) -> ExitCode {
    let fail = |e: &dyn std::fmt::Display| {
        eprintln!("outpostctl: {e}");
        ExitCode::FAILURE
    };
    let retries = match client.jobs(device) {
        Ok(jobs) => match jobs.jobs.iter().find(|j| j.name == job) {
            Some(j) => j.retries,
            None => return fail(&format!("device {device} has reported no job named {job:?}")),
        },
        Err(e) => return fail(&e),
    };
    let request = CommandRequest { kind: "run_job".into(), args: vec![job.into()], expires_in: Some(expires_in) };
    let command = match client.send_command(device, &request) {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    println!("command {} queued", command.id);
    let deadline = std::time::Instant::now() + wait;
    let mut shown = 0;
    while std::time::Instant::now() < deadline {
        match client.command(command.id) {
            Ok(c) => match c.state {
                CommandStateView::Completed { outcome: OutcomeView::Succeeded, .. } => {}
                CommandStateView::Completed { output, .. } => return fail(&format!("the device refused: {output}")),
                CommandStateView::Expired { .. } => return fail(&"the command expired before the device got it"),
                _ => {
                    std::thread::sleep(std::time::Duration::from_millis(250));
                    continue;
                }
            },
            Err(e) => return fail(&e),
        }
        let mut runs = match client.job_runs(device, job, 200) {
            Ok(r) => r,
            Err(e) => return fail(&e),
        };
        runs.retain(|r| r.command_id == Some(command.id));
        runs.sort_by_key(|r| r.attempt);
        for run in runs.iter().skip(shown) {
            println!("run {} attempt {}: {} ({} ms)", run.run_id, run.attempt, run.outcome, run.duration_ms);
            if !run.output.is_empty() {
                println!("{}", run.output.trim_end());
            }
        }
        shown = runs.len();
        if let Some(last) = runs.last() {
            let over = last.ends_run || last.attempt > retries;
            if over {
                return if last.succeeded { ExitCode::SUCCESS } else { ExitCode::FAILURE };
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    fail(&"gave up waiting; the run goes on (see `outpostctl job-runs`)")
}

/// Prints `{"device": ..., "samples": [...]}` as the pages arrive, so a
/// history of any length streams through in one page of memory.
fn print_metrics(
    client: &Client,
    id: &str,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
) -> Result<(), outpost_hub::client::ClientError> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut left = limit.unwrap_or(usize::MAX);
    let mut first = true;
    let _ = write!(out, "{{\"device\": {}, \"samples\": [", serde_json::Value::from(id));
    let result = client.metrics_pages(id, since.as_deref(), until.as_deref(), |page| {
        for sample in page.samples.iter().take(left) {
            let text = serde_json::to_string(sample).unwrap_or_default();
            let _ = write!(out, "{}\n  {text}", if first { "" } else { "," });
            first = false;
        }
        left = left.saturating_sub(page.samples.len());
        left > 0
    });
    let _ = writeln!(out, "\n]}}");
    let _ = out.flush();
    result
}

fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("outpostctl: cannot print JSON: {e}"),
    }
}
