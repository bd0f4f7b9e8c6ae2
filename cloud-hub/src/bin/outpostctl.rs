//! `outpostctl`: the fleet manager's CLI for the hub's API. Everything the
//! console does, for scripts: human-readable output by default, `--json`
//! for programs, and exit statuses scripts can test (see `--help`).

use clap::{CommandFactory, Parser, Subcommand};
use outpost_hub::api::{CommandRequest, CommandStateView, CommandView, OutcomeView};
use outpost_hub::client::{Client, ClientError, render_jobs, render_table, seg};
use outpost_hub::human::ago_text;
use outpost_shared::cli::{self, Doc, Shell};
use outpost_shared::table::render;
use outpost_shared::time::Timestamp;
use std::process::ExitCode;

/// Exit status when a `--wait` ran out before the outcome.
const EXIT_TIMEOUT: u8 = 124;
/// Exit status for input the CLI cannot use (bad JSON, bad label).
const EXIT_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "outpostctl",
    version,
    about = "Manage an Outpost fleet through the hub's API",
    after_help = "Devices may be named by id or by name (refused if two devices share it). \
Times accept RFC 3339, milliseconds since the epoch, or an age such as 90s, 1h, 2d.\n\n\
Exit status: 0 done; 1 the hub refused or the command/job failed; 2 usage; \
64 unusable input; 124 a --wait ran out before the outcome."
)]
struct Cli {
    /// The hub's API address (`hub.example:8080` means http://;
    /// `https://hub.example:8443` for a hub with `[http] tls_cert`).
    #[arg(long, env = "OUTPOST_HUB", default_value = "http://127.0.0.1:8080", global = true)]
    hub: String,
    /// The CA (PEM) that issued an HTTPS hub's certificate, when the public
    /// web's CAs did not.
    #[arg(long, env = "OUTPOST_CA_FILE", global = true)]
    ca_file: Option<std::path::PathBuf>,
    /// API bearer token (`outpostctl tokens create`, or `outpost-hub init`'s).
    #[arg(long, env = "OUTPOST_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Print JSON (the API's answers) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::enum_variant_names)] // `outpostctl command` is the natural verb.
enum Command {
    /// The fleet at a glance: online, offline, alarms, failed runs, backlogs.
    Overview,
    /// List devices, filtered: id, name, state, last seen, version, labels.
    Devices {
        /// Label selector (`env=prod,site=berlin`, `tier!=db`, `gpu`, `!retired`).
        #[arg(long, short)]
        selector: Option<String>,
        /// online, offline, never, alarmed, expired (certificate expired), revoked, refused (desired state)
        /// or failing (a job).
        #[arg(long)]
        status: Option<String>,
        /// Only this agent version.
        #[arg(long)]
        version: Option<String>,
        /// Text in the name, id or address.
        #[arg(long)]
        search: Option<String>,
        /// name, last_seen, version or behind.
        #[arg(long)]
        sort: Option<String>,
    },
    /// Show one device.
    Device {
        /// Device id or name.
        device: String,
    },
    /// Let a device whose certificate expired connect once more, to renew
    /// it (admin token). Its id, records, jobs and backups stay.
    Readmit {
        /// Device id or name.
        device: String,
        /// How long it may take to come back (default 7d, 1m to 90d).
        #[arg(long)]
        within: Option<String>,
    },
    /// Refuse a device for good (a stolen or retired one; admin token): its
    /// connections close at once, its records and backups stay.
    Revoke {
        /// Device id or name.
        device: String,
    },
    /// A device's labels: show, set, add, remove.
    Labels {
        #[command(subcommand)]
        command: LabelsCmd,
    },
    /// Commands: send, bulk, list, show.
    Command {
        #[command(subcommand)]
        command: CommandCmd,
    },
    /// Desired state: get, set, patch, bulk.
    Desired {
        #[command(subcommand)]
        command: DesiredCmd,
    },
    /// A device's LAN peers as it last reported them: trust, uplink, addresses.
    Peers {
        /// Device id or name.
        device: String,
    },
    /// Backups at the hub: list, verify, prune, delete, grant.
    Backups {
        #[command(subcommand)]
        command: BackupsCmd,
    },
    /// A device's jobs: schedule, next run, last run.
    Jobs {
        /// Device id or name.
        device: String,
    },
    /// The newest attempts of one job on a device.
    JobRuns {
        /// Device id or name.
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
        /// Device id or name.
        device: String,
        /// Job name.
        job: String,
        /// Give up waiting after this long (the run goes on; exit 124).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
        /// Give up if undelivered after this long.
        #[arg(long, default_value = "1h")]
        expires_in: String,
    },
    /// A device's event log: command results, desired-state reports, alarms.
    Events {
        /// Device id or name.
        device: String,
        /// Most events, newest first.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Telemetry history of a device, read page by page.
    Metrics {
        /// Device id or name.
        device: String,
        /// Earliest sample (RFC 3339, ms since the epoch, or an age: 1h).
        #[arg(long)]
        since: Option<String>,
        /// Latest sample, exclusive.
        #[arg(long)]
        until: Option<String>,
        /// Most samples.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// API tokens: create, list, revoke (admin role).
    Tokens {
        #[command(subcommand)]
        command: TokensCmd,
    },
    /// Alerts (firing, pending, recently resolved) and their silences.
    Alerts {
        #[command(subcommand)]
        command: Option<AlertsCmd>,
    },
    /// The audit log, newest first: changes, commands, sign-ins, refusals.
    Audit {
        /// Only this token name.
        #[arg(long)]
        who: Option<String>,
        /// Only this target (device id, `selector ...`, `token ...`).
        #[arg(long)]
        target: Option<String>,
        /// Only actions containing this text.
        #[arg(long)]
        action: Option<String>,
        /// ok, refused or failed.
        #[arg(long)]
        outcome: Option<String>,
        /// Only since (RFC 3339 or an age: 24h).
        #[arg(long)]
        since: Option<String>,
        /// Most entries.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Entries older than this id (the `before=` a page names).
        #[arg(long)]
        before: Option<u64>,
    },
    /// A one-time console sign-in link (admin role).
    ConsoleLink {
        /// Role of the console session it opens.
        #[arg(long, default_value = "viewer")]
        role: String,
        /// How long the link stays valid (at most 1d).
        #[arg(long, default_value = "15m")]
        expires: String,
    },
    /// Shell completions, printed (e.g. `outpostctl completions bash > /etc/bash_completion.d/outpostctl`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: Shell,
    },
    /// The manual page (roff), printed (e.g. `outpostctl man | man -l -`).
    Man,
}

#[derive(Subcommand)]
enum LabelsCmd {
    /// A device's labels.
    Show {
        /// Device id or name.
        device: String,
    },
    /// Replace all of a device's labels.
    Set {
        /// Device id or name.
        device: String,
        /// key=value, as many as needed (none: remove all).
        labels: Vec<String>,
    },
    /// Add or change some labels, keep the others.
    Add {
        /// Device id or name.
        device: String,
        /// key=value.
        #[arg(required = true)]
        labels: Vec<String>,
    },
    /// Remove labels by key.
    Remove {
        /// Device id or name.
        device: String,
        /// Keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

#[derive(Subcommand)]
enum AlertsCmd {
    /// Alerts, firing first (the default).
    List {
        /// Most alerts.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Only those in this state: firing, pending or resolved.
        #[arg(long)]
        state: Option<String>,
        /// Only this device's (id or name).
        #[arg(long)]
        device: Option<String>,
    },
    /// Silences in force and those ended in the last day.
    Silences,
    /// Hold back the alerts whose labels match (LABEL=VALUE...: alertname,
    /// device, device_name, severity) for a while.
    Silence {
        /// LABEL=VALUE, one or more.
        #[arg(required = true)]
        matchers: Vec<String>,
        /// How long (e.g. 2h; 1m to 90d).
        #[arg(long = "for")]
        duration: String,
        /// Why.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// End a silence now.
    Unsilence {
        /// Its id (sil-...).
        id: String,
    },
}

#[derive(clap::Subcommand, Debug)]
enum TokensCmd {
    /// Make a token; its secret is printed once.
    Create {
        /// A unique name (it appears in the audit log).
        name: String,
        /// viewer (reads), operator (acts on devices) or admin (also tokens).
        #[arg(long)]
        role: String,
        /// Lifetime, required (e.g. 30d; at most 366d).
        #[arg(long)]
        expires: String,
    },
    /// Every token: role, expiry, last use.
    List,
    /// Revoke a token by id (tok-...) or name.
    Revoke {
        /// Id or name.
        #[arg(value_name = "TOKEN")]
        which: String,
    },
}
#[derive(Subcommand)]
enum BackupsCmd {
    /// A device's uploaded snapshots.
    List {
        /// Device id or name.
        device: String,
    },
    /// Re-read and re-hash every chunk of a device at the hub; exits 1 and
    /// names each bad chunk if any.
    Verify {
        /// Device id or name.
        device: String,
    },
    /// Delete everything the hub holds of a device's backups (a retired
    /// device whose data was restored elsewhere). Admin role.
    Delete {
        /// Device id or name.
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
        /// Device id or name.
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
        /// Device id or name.
        device: String,
        /// `echo` or `exec`.
        kind: String,
        /// Arguments (for exec: the program and its arguments).
        args: Vec<String>,
        /// Give up if undelivered after this long.
        #[arg(long, default_value = "1h")]
        expires_in: String,
        /// Wait this long for the outcome and print it (exit 1 if the
        /// command failed, 124 if the wait ran out).
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<std::time::Duration>,
    },
    /// One command for every device a label selector matches (an empty or
    /// unknown selector is refused).
    Bulk {
        /// Label selector (`env=prod,site=berlin`).
        #[arg(long, short)]
        selector: String,
        /// echo, exec, run_job or backup.
        kind: String,
        /// Arguments.
        args: Vec<String>,
        /// Give up if undelivered after this long.
        #[arg(long, default_value = "1h")]
        expires_in: String,
        /// Only count the devices it would reach.
        #[arg(long)]
        dry_run: bool,
    },
    /// A device's commands.
    List {
        /// Device id or name.
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
        /// Device id or name.
        device: String,
    },
    /// Replace the whole desired state (optimistic: fails if it changed
    /// meanwhile). Keys and jobs the new document lacks are removed, and
    /// named on standard error; use `patch` to change one key.
    Set {
        /// Device id or name.
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
        /// Device id or name.
        device: String,
        /// The patch, a JSON object.
        patch: String,
    },
    /// The same merge patch on every device a label selector matches; if
    /// it would make one document invalid, none changes.
    Bulk {
        /// Label selector (`env=prod,site=berlin`).
        #[arg(long, short)]
        selector: String,
        /// The patch, a JSON object.
        patch: String,
        /// Only count the devices it would reach.
        #[arg(long)]
        dry_run: bool,
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
    match &cli.command {
        Command::Completions { shell } => return cli::print(Doc::Completions(*shell), Cli::command()),
        Command::Man => return cli::print(Doc::Man, Cli::command()),
        _ => {}
    }
    let Some(token) = cli.token.clone().filter(|t| !t.is_empty()) else {
        eprintln!("outpostctl: no token: pass --token or set OUTPOST_TOKEN (`outpostctl tokens create` makes one)");
        return ExitCode::from(2);
    };
    let client = match &cli.ca_file {
        Some(ca) => match Client::with_ca(&cli.hub, &token, ca) {
            Ok(client) => client,
            Err(e) => {
                eprintln!("outpostctl: --ca-file: {e}");
                return ExitCode::from(64);
            }
        },
        None => Client::new(&cli.hub, &token),
    };
    match run(&cli, &client) {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("outpostctl: {e}");
    ExitCode::FAILURE
}

/// Prints `value` as JSON with `--json`, else as `text` renders it.
fn show<T: serde::Serialize>(json: bool, value: &T, text: impl FnOnce(&T) -> String) {
    if json {
        print_json(value);
    } else {
        print!("{}", text(value));
    }
}

fn parse_json(what: &str, text: &str) -> Result<serde_json::Value, ExitCode> {
    serde_json::from_str(text).map_err(|e| {
        eprintln!("outpostctl: the {what} is not JSON: {e}");
        ExitCode::from(EXIT_USAGE)
    })
}

fn parse_labels(pairs: &[String]) -> Result<outpost_hub::store::Labels, ExitCode> {
    let mut labels = outpost_hub::store::Labels::new();
    for pair in pairs {
        let Some((k, v)) = pair.split_once('=') else {
            eprintln!("outpostctl: {pair:?}: write labels as key=value");
            return Err(ExitCode::from(EXIT_USAGE));
        };
        labels.insert(k.to_owned(), v.to_owned());
    }
    Ok(labels)
}

fn query(pairs: &[(&str, &Option<String>)]) -> String {
    pairs.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", seg(v)))).collect::<Vec<_>>().join("&")
}

#[allow(clippy::too_many_lines)] // One arm per subcommand reads best as one match.
fn run(cli: &Cli, client: &Client) -> Result<ExitCode, ClientError> {
    let json = cli.json;
    let ok = Ok(ExitCode::SUCCESS);
    match &cli.command {
        Command::Completions { .. } | Command::Man => {}
        Command::Overview => show(json, &client.overview()?, render_overview),
        Command::Devices { selector, status, version, search, sort } => {
            let q = query(&[
                ("selector", selector),
                ("status", status),
                ("version", version),
                ("q", search),
                ("sort", sort),
            ]);
            show(json, &client.devices_where(&q)?, |d| render_table(d));
        }
        Command::Device { device } => show(json, &client.device(device)?, render_device),
        Command::Revoke { device } => show(json, &client.revoke(device)?, render_device),
        Command::Readmit { device, within } => show(json, &client.readmit(device, within.as_deref())?, render_device),
        Command::Labels { command } => {
            let (device, labels) = match command {
                LabelsCmd::Show { device } => (device, None),
                LabelsCmd::Set { device, labels } => match parse_labels(labels) {
                    Ok(l) => (device, Some(l)),
                    Err(code) => return Ok(code),
                },
                LabelsCmd::Add { device, labels } => match parse_labels(labels) {
                    Ok(add) => {
                        let mut l = client.device(device)?.labels;
                        l.extend(add);
                        (device, Some(l))
                    }
                    Err(code) => return Ok(code),
                },
                LabelsCmd::Remove { device, keys } => {
                    let mut l = client.device(device)?.labels;
                    l.retain(|k, _| !keys.contains(k));
                    (device, Some(l))
                }
            };
            let view = match labels {
                Some(labels) => client.set_labels(device, &labels)?,
                None => client.device(device)?,
            };
            show(json, &view.labels, |l| l.iter().map(|(k, v)| format!("{k}={v}\n")).collect());
        }
        Command::Metrics { device, since, until, limit } => {
            print_metrics(client, device, since.clone(), until.clone(), *limit, json)?;
        }
        Command::Events { device, limit } => show(json, &client.events(device, *limit)?, |e| render_events(e)),
        Command::Command { command } => match command {
            CommandCmd::List { device } => show(json, &client.commands(device)?, |c| render_commands(c)),
            CommandCmd::Show { id } => {
                let view = client.command(*id)?;
                show(json, &view, render_command);
                return Ok(command_status(&view));
            }
            CommandCmd::Send { device, kind, args, expires_in, wait } => {
                let request =
                    CommandRequest { kind: kind.clone(), args: args.clone(), expires_in: Some(expires_in.clone()) };
                return send_and_wait(client, device, &request, *wait, json);
            }
            CommandCmd::Bulk { selector, kind, args, expires_in, dry_run } => {
                let request =
                    CommandRequest { kind: kind.clone(), args: args.clone(), expires_in: Some(expires_in.clone()) };
                show(json, &client.bulk_command(selector, &request, *dry_run)?, render_bulk);
            }
        },
        Command::Desired { command } => match command {
            DesiredCmd::Get { device } => show(json, &client.desired(device)?, render_desired),
            DesiredCmd::Set { device, doc, version } => {
                let doc = match parse_json("document", doc) {
                    Ok(d) => d,
                    Err(code) => return Ok(code),
                };
                let current = client.desired(device)?;
                let removed = outpost_shared::desired::removed_by(&current.doc, &doc);
                let view = client.put_desired(device, version.unwrap_or(current.version), doc)?;
                if !removed.is_empty() {
                    eprintln!("outpostctl: removed from the desired state: {}", removed.join(", "));
                }
                show(json, &view, render_desired);
            }
            DesiredCmd::Patch { device, patch } => match parse_json("patch", patch) {
                Ok(patch) => show(json, &client.patch_desired(device, patch)?, render_desired),
                Err(code) => return Ok(code),
            },
            DesiredCmd::Bulk { selector, patch, dry_run } => match parse_json("patch", patch) {
                Ok(patch) => show(json, &client.bulk_desired(selector, patch, *dry_run)?, render_bulk),
                Err(code) => return Ok(code),
            },
        },
        Command::Peers { device } => {
            show(json, &client.peers(device)?, |p| outpost_hub::client::render_peers(&p.peers));
        }
        Command::Backups { command } => return backups(client, command, json),
        Command::Jobs { device } => show(json, &client.jobs(device)?, render_jobs),
        Command::JobRuns { device, job, limit } => {
            show(json, &client.job_runs(device, job, *limit)?, |r| render_runs(r))
        }
        Command::RunJob { device, job, wait, expires_in } => {
            return Ok(run_job(client, device, job, *wait, expires_in.clone()));
        }
        Command::Alerts { command } => {
            match command.as_ref().unwrap_or(&AlertsCmd::List { limit: 100, state: None, device: None }) {
                AlertsCmd::List { limit, state, device } => {
                    show(json, &client.alerts_where(*limit, state.as_deref(), device.as_deref())?, |a| render_alerts(a))
                }
                AlertsCmd::Silences => show(json, &client.silences()?, |s| render_silences(s)),
                AlertsCmd::Silence { matchers, duration, comment } => {
                    let mut parsed = std::collections::BTreeMap::new();
                    for m in matchers {
                        // Without '=', an empty value: the hub says what is wrong.
                        let (k, v) = m.split_once('=').unwrap_or((m, ""));
                        parsed.insert(k.trim().to_owned(), v.trim().to_owned());
                    }
                    let request = outpost_hub::api::SilenceRequest {
                        matchers: parsed,
                        duration: duration.clone(),
                        comment: comment.clone(),
                    };
                    show(json, &client.silence(&request)?, |s| format!("silence {} until {}\n", s.id, s.ends_at));
                }
                AlertsCmd::Unsilence { id } => {
                    show(json, &client.end_silence(id)?, |s| format!("silence {} ended\n", s.id));
                }
            }
        }
        Command::Tokens { command } => match command {
            TokensCmd::List => show(json, &client.tokens()?, |t| render_tokens(t)),
            TokensCmd::Create { name, role, expires } => {
                let made = client.create_token(name, role, expires)?;
                show(json, &made, |t| {
                    format!(
                        "{}\n\nToken {} ({}, {}) made; it expires {}. The secret above is shown only now.\n",
                        t.secret.as_deref().unwrap_or_default(),
                        t.name,
                        t.id,
                        t.role,
                        t.expires_at.as_deref().unwrap_or("never")
                    )
                });
            }
            TokensCmd::Revoke { which } => {
                show(json, &client.revoke_token(which)?, |t| format!("revoked {} ({})\n", t.name, t.id));
            }
        },
        Command::Audit { who, target, action, outcome, since, limit, before } => {
            let (limit, before) = (Some(limit.to_string()), before.map(|b| b.to_string()));
            let q = query(&[
                ("who", who),
                ("target", target),
                ("action", action),
                ("outcome", outcome),
                ("since", since),
                ("limit", &limit),
                ("before", &before),
            ]);
            show(json, &client.audit(&q)?, render_audit);
        }
        Command::ConsoleLink { role, expires } => {
            let link = client.sign_in_link(role, expires)?;
            show(json, &link, |l| format!("{}{}\n(one use, until {})\n", client.base(), l.path, l.expires_at));
        }
    }
    ok
}

fn backups(client: &Client, command: &BackupsCmd, json: bool) -> Result<ExitCode, ClientError> {
    match command {
        BackupsCmd::List { device } => show(json, &client.backups(device)?, render_backups),
        BackupsCmd::Verify { device } => {
            let report = client.verify_backups(device)?;
            show(json, &report, |r| {
                let mut out: String = r.problems.iter().map(|p| format!("{p}\n")).collect();
                out.push_str(&format!(
                    "{} chunk(s), {} bytes checked, {} problem(s)\n",
                    r.chunks,
                    r.bytes,
                    r.problems.len()
                ));
                out
            });
            return Ok(if report.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
        }
        BackupsCmd::Prune { device, dry_run } => show(json, &client.prune_backups(device, *dry_run)?, |r| {
            let verb = if r.dry_run { "would remove" } else { "removed" };
            let mut out: String = r.snapshots_removed.iter().map(|n| format!("{verb} snapshot {n}\n")).collect();
            out.push_str(&format!(
                "{verb} {} snapshot(s) and {} chunk(s), {} bytes; {} snapshot(s) kept\n",
                r.snapshots_removed.len(),
                r.chunks_removed,
                r.bytes_freed,
                r.snapshots_kept
            ));
            if let Some(why) = &r.chunks_kept_because {
                out.push_str(&format!("no chunk removed: {why}\n"));
            }
            out
        }),
        BackupsCmd::Delete { device, yes: false } => {
            eprintln!("outpostctl: deleting {device}'s backups at the hub cannot be undone; add --yes");
            return Ok(ExitCode::from(2));
        }
        BackupsCmd::Delete { device, yes: true } => show(json, &client.delete_backups(device)?, |d| {
            format!("deleted {} snapshot(s), {} chunk(s), {} bytes of {}\n", d.snapshots, d.chunks, d.bytes, d.device)
        }),
        BackupsCmd::Grant { device, to, valid_for } => {
            show(json, &client.grant_backups(device, to, valid_for.as_deref())?, |g| {
                format!("{} may fetch {}'s backups until {} (granted by {})\n", g.reader, g.owner, g.expires_at, g.by)
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn render_overview(o: &outpost_hub::service::listing::Overview) -> String {
    let mut out = format!(
        "{} devices: {} online, {} offline, {} never connected\n{} with alarms, {} failed job runs in 24 h on {} devices, {} with overdue backups\n{} with a failing job, {} refused their desired state\n",
        o.devices,
        o.online,
        o.offline,
        o.never_connected,
        o.alarmed,
        o.failed_runs_24h,
        o.devices_with_failed_runs,
        o.overdue_backups,
        o.failing,
        o.desired_refused
    );
    if !o.furthest_behind.is_empty() {
        out.push_str("\nFurthest behind:\n");
        let rows: Vec<Vec<String>> = o
            .furthest_behind
            .iter()
            .map(|b| {
                vec![
                    b.id.clone(),
                    b.name.clone(),
                    outpost_hub::human::duration(b.behind_secs),
                    if b.online { "online".into() } else { "offline".into() },
                ]
            })
            .collect();
        out.push_str(&render(&["ID", "NAME", "BEHIND", "STATE"], &rows));
    }
    out
}

fn render_device(d: &outpost_hub::api::DeviceView) -> String {
    let now = Timestamp::now();
    let mut out = String::new();
    let state = match d.state() {
        "never" => "never connected",
        "expired" => "offline: its certificate expired (`outpostctl readmit` lets it renew)",
        "revoked" => "revoked: refused for good",
        state => state,
    };
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<12} {v}\n"));
    line("id", d.id.clone());
    line("name", d.name.clone());
    line("state", format!("{state}{}", d.transport.as_ref().map(|t| format!(" over {t}")).unwrap_or_default()));
    line(
        "last seen",
        format!("{} ({})", ago_text(d.last_seen.as_deref(), now), d.last_seen.as_deref().unwrap_or("never")),
    );
    line("version", d.agent_version.clone().unwrap_or_else(|| "-".into()));
    line("address", d.address.clone().unwrap_or_else(|| "-".into()));
    line("enrolled", d.enrolled_at.clone());
    if let Some(at) = &d.certificate_expired {
        line("certificate", format!("expired: refused at {at}"));
    }
    if let Some(at) = &d.revoked {
        line("revoked", at.clone());
    }
    if let Some(until) = &d.readmitted_until {
        line("readmitted", format!("until {until}, to renew its certificate"));
    }
    line("labels", d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", "));
    line(
        "cpu / mem",
        format!(
            "{} % / {} %",
            d.cpu_percent.map_or("-".into(), |c| format!("{c:.1}")),
            d.mem_percent.map_or("-".into(), |m| format!("{m:.1}"))
        ),
    );
    line("behind", d.behind_secs.map_or("-".into(), outpost_hub::human::duration));
    line("last seq", d.last_seq.to_string());
    line("failed runs", format!("{} in 24 h", d.failed_runs_24h));
    if !d.overdue_backups.is_empty() {
        line("overdue", d.overdue_backups.join(", "));
    }
    for a in &d.alarms {
        line("alarm", format!("{} {} {}: {}", a.at, a.alarm, if a.raised { "raised" } else { "cleared" }, a.message));
    }
    out
}

fn command_state(c: &CommandView) -> String {
    match &c.state {
        CommandStateView::Queued => "queued".into(),
        CommandStateView::Delivered { .. } => "delivered".into(),
        CommandStateView::Expired { .. } => "expired".into(),
        CommandStateView::Completed { outcome, exit_code, .. } => {
            let outcome =
                serde_json::to_value(outcome).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
            format!("{outcome}{}", exit_code.map(|c| format!(" (exit {c})")).unwrap_or_default())
        }
    }
}

fn render_commands(commands: &[CommandView]) -> String {
    let rows: Vec<Vec<String>> = commands
        .iter()
        .map(|c| {
            vec![
                c.id.to_string(),
                c.kind.clone(),
                c.args.join(" "),
                command_state(c),
                c.created_at.clone(),
                c.created_by.clone(),
            ]
        })
        .collect();
    render(&["ID", "KIND", "ARGS", "STATE", "CREATED", "BY"], &rows)
}

/// A command's state, then its output as the text it is.
fn render_command(c: &CommandView) -> String {
    let mut out =
        format!("command {} ({} {}) for {}: {}\n", c.id, c.kind, c.args.join(" "), c.device, command_state(c));
    if let CommandStateView::Completed { output, .. } = &c.state
        && !output.is_empty()
    {
        out.push_str(output);
        if !output.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// 0 once a command succeeded, 1 if it failed or expired, 124 while it has
/// no outcome yet.
fn command_status(c: &CommandView) -> ExitCode {
    match &c.state {
        CommandStateView::Completed { outcome: OutcomeView::Succeeded, .. } => ExitCode::SUCCESS,
        CommandStateView::Completed { .. } | CommandStateView::Expired { .. } => ExitCode::FAILURE,
        _ => ExitCode::from(EXIT_TIMEOUT),
    }
}

fn render_desired(d: &outpost_hub::api::DesiredView) -> String {
    let mut out = format!(
        "version {} set; the device runs version {}{}\n",
        d.version,
        d.reported_version,
        if d.in_sync { " (in sync)" } else { " (not yet applied)" }
    );
    if let Some(e) = &d.reported_error {
        out.push_str(&format!("the device refused the latest: {e}\n"));
    }
    out.push_str(&serde_json::to_string_pretty(&d.doc).unwrap_or_default());
    out.push('\n');
    out
}

fn render_bulk(b: &outpost_hub::api::BulkView) -> String {
    let mut out = format!("selector {:?} matched {} device(s)\n", b.selector, b.matched);
    for c in &b.commands {
        out.push_str(&format!("command {} queued for {}\n", c.id, c.device));
    }
    for (device, version) in &b.versions {
        out.push_str(&format!("desired state version {version} set on {device}\n"));
    }
    if b.commands.is_empty() && b.versions.is_empty() {
        out.extend(b.devices.iter().map(|d| format!("{d}\n")));
    }
    out
}

fn render_runs(runs: &[outpost_hub::api::JobRunView]) -> String {
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                format!("{}/{}", r.run_id, r.attempt),
                r.trigger.clone(),
                r.started.clone(),
                format!("{} ms", r.duration_ms),
                r.outcome.clone(),
                r.output.lines().last().unwrap_or_default().to_owned(),
            ]
        })
        .collect();
    render(&["RUN", "TRIGGER", "STARTED", "TOOK", "OUTCOME", "LAST OUTPUT LINE"], &rows)
}

fn render_events(events: &[outpost_hub::api::EventView]) -> String {
    use outpost_hub::api::EventKindView;
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            let (kind, text) = match &e.event {
                EventKindView::CommandResult { command, output, .. } => {
                    ("command", format!("command {command}: {}", output.lines().next().unwrap_or_default()))
                }
                EventKindView::StateReport { applied_version, error } => (
                    "desired",
                    format!(
                        "runs version {applied_version}{}",
                        error.as_ref().map(|e| format!(", refused: {e}")).unwrap_or_default()
                    ),
                ),
                EventKindView::Alarm { alarm, raised, message } => {
                    ("alarm", format!("{alarm} {}: {message}", if *raised { "raised" } else { "cleared" }))
                }
                EventKindView::Other { record } => ("other", record.clone()),
            };
            vec![e.seq.to_string(), e.at.clone(), kind.into(), text]
        })
        .collect();
    render(&["SEQ", "AT", "KIND", "WHAT"], &rows)
}

fn render_alerts(alerts: &[outpost_hub::api::AlertView]) -> String {
    let rows: Vec<Vec<String>> = alerts
        .iter()
        .map(|a| {
            let held = match (a.silenced, a.inhibited) {
                (true, _) => " (silenced)",
                (_, true) => " (inhibited)",
                _ => "",
            };
            vec![
                format!("{}{held}", a.state),
                a.rule.clone(),
                a.device_name.clone(),
                a.severity.clone(),
                a.fired_at.clone().unwrap_or_else(|| a.since.clone()),
                a.description.clone(),
            ]
        })
        .collect();
    render(&["STATE", "RULE", "DEVICE", "SEVERITY", "SINCE", "WHY"], &rows)
}

fn render_silences(silences: &[outpost_hub::api::SilenceView]) -> String {
    let rows: Vec<Vec<String>> = silences
        .iter()
        .map(|s| {
            let matchers: Vec<String> = s.matchers.iter().map(|(k, v)| format!("{k}={v}")).collect();
            vec![
                s.id.clone(),
                matchers.join(","),
                if s.active { s.ends_at.clone() } else { format!("ended {}", s.ends_at) },
                s.created_by.clone(),
                s.comment.clone(),
            ]
        })
        .collect();
    render(&["ID", "MATCHERS", "ENDS", "BY", "COMMENT"], &rows)
}

fn render_tokens(tokens: &[outpost_hub::api::TokenView]) -> String {
    let now = Timestamp::now();
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.name.clone(),
                t.role.clone(),
                if t.expired { "expired".into() } else { t.expires_at.clone().unwrap_or_else(|| "never".into()) },
                ago_text(t.last_used_at.as_deref(), now),
                t.last_used_from.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    render(&["ID", "NAME", "ROLE", "EXPIRES", "LAST USED", "FROM"], &rows)
}

fn render_audit(page: &outpost_hub::api::AuditPage) -> String {
    let rows: Vec<Vec<String>> = page
        .entries
        .iter()
        .map(|e| {
            vec![
                e.at.clone(),
                e.who.clone(),
                e.action.clone(),
                e.target.clone(),
                e.matched.map(|m| m.to_string()).unwrap_or_default(),
                e.from.clone(),
                format!("{} ({})", e.outcome, e.status),
            ]
        })
        .collect();
    let mut out = render(&["AT", "WHO", "ACTION", "TARGET", "MATCHED", "FROM", "OUTCOME"], &rows);
    if let Some(next) = page.next {
        out.push_str(&format!("(older entries: --before {next})\n"));
    }
    out
}

fn send_and_wait(
    client: &Client,
    device: &str,
    request: &CommandRequest,
    wait: Option<std::time::Duration>,
    json: bool,
) -> Result<ExitCode, ClientError> {
    let record = client.send_command(device, request)?;
    let Some(wait) = wait else {
        show(json, &record, |c| format!("command {} queued for {}\n", c.id, c.device));
        return Ok(ExitCode::SUCCESS);
    };
    let deadline = std::time::Instant::now() + wait;
    loop {
        let now = client.command(record.id)?;
        if now.state.is_final() || std::time::Instant::now() >= deadline {
            show(json, &now, render_command);
            if !now.state.is_final() {
                eprintln!(
                    "outpostctl: no outcome within {}; the command stays queued",
                    humantime::format_duration(wait)
                );
            }
            return Ok(command_status(&now));
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

/// Queues `run_job`, then follows the run's attempts at the hub until the
/// last one (success, no retries left, or replaced/interrupted).
fn run_job(client: &Client, device: &str, job: &str, wait: std::time::Duration, expires_in: String) -> ExitCode {
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
    eprintln!("outpostctl: gave up waiting; the run goes on (see `outpostctl job-runs`)");
    ExitCode::from(EXIT_TIMEOUT)
}

/// Prints the samples as the pages arrive (a table, or with `--json`
/// `{"device": ..., "samples": [...]}`), so a history of any length streams
/// through in one page of memory.
fn print_metrics(
    client: &Client,
    id: &str,
    since: Option<String>,
    until: Option<String>,
    limit: Option<usize>,
    json: bool,
) -> Result<(), ClientError> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut left = limit.unwrap_or(usize::MAX);
    let mut first = true;
    if json {
        let _ = write!(out, "{{\"device\": {}, \"samples\": [", serde_json::Value::from(id));
    } else {
        let _ = writeln!(out, "{:<24} {:>7} {:>7} {:>7} {:>7}", "AT", "CPU %", "MEM %", "LOAD 1", "SEQ");
    }
    let result = client.metrics_pages(id, since.as_deref(), until.as_deref(), |page| {
        for sample in page.samples.iter().take(left) {
            if json {
                let text = serde_json::to_string(sample).unwrap_or_default();
                let _ = write!(out, "{}\n  {text}", if first { "" } else { "," });
            } else {
                let s = &sample.sample;
                let _ = writeln!(
                    out,
                    "{:<24} {:>7.1} {:>7.1} {:>7.2} {:>7}",
                    sample.at,
                    s.cpu_percent,
                    s.mem_percent(),
                    s.load[0],
                    sample.seq
                );
            }
            first = false;
        }
        left = left.saturating_sub(page.samples.len());
        left > 0
    });
    if json {
        let _ = writeln!(out, "\n]}}");
    }
    let _ = out.flush();
    result
}

fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("outpostctl: cannot print JSON: {e}"),
    }
}
