//! What the daemon does with backups: scheduled sets as jobs, the upload
//! task, and `backup` commands from the hub, all as separate low-priority
//! processes of `outpost-agent backup`.

use super::*;

/// Keeps uploading what waits for upload: whenever the uplink is connected
/// (on connecting, then every `retry_every`) and the repository is marked
/// pending, runs `argv` (`outpost-agent backup ... upload`, low priority)
/// and waits for it, at most `timeout`.
pub async fn upload_task(
    argv: Vec<String>,
    flag: PathBuf,
    mut link: tokio::sync::watch::Receiver<crate::link::LinkState>,
    timeout: std::time::Duration,
    retry_every: std::time::Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    use crate::link::LinkState;
    let mut tick = tokio::time::interval(retry_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
            changed = link.changed() => if changed.is_err() { return },
        }
        if *link.borrow_and_update() != LinkState::Connected || !flag.exists() {
            continue;
        }
        let Some((program, args)) = argv.split_first() else { return };
        tracing::info!("Uploading pending backups.");
        let run = tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let outcome = tokio::select! {
            () = cancel.cancelled() => return,
            outcome = tokio::time::timeout(timeout, run) => outcome,
        };
        match outcome {
            Ok(Ok(out)) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout);
                tracing::info!(report = %text.trim(), "Pending backups uploaded.");
            }
            Ok(Ok(out)) => {
                let text = String::from_utf8_lossy(&out.stderr);
                tracing::warn!(status = %out.status, error = %text.trim(), "Backup upload failed; will retry.");
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "Backup upload could not start."),
            Err(_) => tracing::warn!(?timeout, "Backup upload timed out; will retry."),
        }
    }
}

/// The command line that runs `outpost-agent backup --config PATH` as a
/// separate, low-priority process: scheduled backups and backup commands
/// from the hub use it, so a backup never blocks the daemon and is limited
/// by `[backups] nice` and `io_class`. `None` without a config file.
pub fn command_prefix(config: &crate::config::AgentConfig) -> Option<Vec<String>> {
    let path = config.config_path.as_ref()?;
    let exe = std::env::current_exe().ok()?;
    let io_class = if config.backup_repo.io_class == "idle" { "3" } else { "2" };
    Some(vec![
        "nice".into(),
        "-n".into(),
        config.backup_repo.nice.to_string(),
        "ionice".into(),
        "-c".into(),
        io_class.into(),
        exe.display().to_string(),
        "backup".into(),
        "--config".into(),
        path.display().to_string(),
    ])
}

/// The command line of a low-priority upload of pending snapshots, if any
/// set uploads (see [`upload_task`]).
pub fn upload_command(config: &crate::config::AgentConfig) -> Option<Vec<String>> {
    if !config.backups.iter().any(|s| s.upload) {
        return None;
    }
    let mut argv = command_prefix(config)?;
    argv.push("upload".into());
    Some(argv)
}

/// A scheduled job per backup set with a `schedule`: `backup-<name>`,
/// running [`command_prefix`] + `run <name>`, never overlapping itself,
/// caught up after downtime. Its runs reach the hub as job runs.
pub fn scheduled_jobs(config: &crate::config::AgentConfig) -> Vec<outpost_shared::job::JobSpec> {
    use outpost_shared::job::{Action, JobSpec, Overlap, Schedule};
    let Some(prefix) = command_prefix(config) else { return Vec::new() };
    config
        .backups
        .iter()
        .filter_map(|set| {
            let schedule = Schedule::parse(set.schedule.as_deref()?).ok()?;
            let mut argv = prefix.clone();
            argv.extend(["run".to_owned(), set.name.clone()]);
            Some(JobSpec {
                name: format!("{}{}", outpost_shared::job::BACKUP_JOB_PREFIX, set.name),
                schedule,
                action: Action::Command { argv, env: Default::default(), working_dir: None },
                timeout: config.backup_repo.timeout,
                retries: 0,
                retry_backoff: std::time::Duration::from_secs(60),
                overlap: Overlap::Forbid,
                catch_up: true,
                jitter: std::time::Duration::ZERO,
                max_output: 64 << 10,
                enabled: true,
            })
        })
        .collect()
}

/// Checks the arguments of a `backup` command from the hub and returns the
/// full command line, or why it is refused. Accepted: `run SET`, `list`,
/// `verify`, `prune`, `upload`, `restore SNAPSHOT --target DIR|--in-place
/// [--set S] [--path P]... [--from-device ID] [--overwrite]`.
pub fn hub_command(prefix: &[String], args: &[String]) -> Result<Vec<String>, String> {
    let ok = match args.first().map(String::as_str) {
        Some("run") => args.len() == 2,
        Some("list") => args.len() == 1 || (args.len() == 2 && args[1] == "--json"),
        Some("verify" | "prune" | "upload") => args.len() == 1,
        Some("restore") => {
            let rest = args.get(2..).unwrap_or_default();
            let flag = |a: &&String| ["--in-place", "--overwrite"].contains(&a.as_str());
            let pairs: Vec<&String> = rest.iter().filter(|a| !flag(a)).collect();
            let in_place = rest.iter().any(|a| a == "--in-place");
            args.len() >= 3
                && pairs.chunks(2).all(|pair| {
                    pair.len() == 2 && ["--target", "--set", "--path", "--from-device"].contains(&pair[0].as_str())
                })
                && (pairs.iter().any(|a| *a == "--target") != in_place)
        }
        _ => false,
    };
    if !ok || args.iter().any(|a| a.starts_with("--config")) {
        return Err("backup takes: run SET | list [--json] | verify | prune | upload | \
                    restore SNAPSHOT --target DIR|--in-place [--set S] [--path P]... [--from-device ID] [--overwrite]"
            .into());
    }
    let mut argv = prefix.to_vec();
    argv.extend(args.iter().cloned());
    Ok(argv)
}
