//! `outpost-hub`: initialise a data dir, make enrollment tokens, serve.

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use outpost_hub::config::HubConfig;
use outpost_hub::store::StoreConfig;
use outpost_shared::cli::{self, Doc, Shell};
use outpost_shared::config::ConfigFile;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "outpost-hub", version, about = "Outpost cloud hub")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the fleet CA and a first admin API token in a new data dir
    /// (sled), or in the data dir and database a config file names.
    Init {
        /// The hub's data directory (the store is sled under it).
        #[arg(long, required_unless_present = "config", conflicts_with = "config")]
        data_dir: Option<PathBuf>,
        /// A config file: its `data_dir` and `[store]` are initialised.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Apply pending database migrations (`[store] backend = "postgres"`);
    /// `serve` applies them too.
    Migrate {
        /// Config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Break glass: print a new admin API token made straight in the store
    /// (when no admin token is left). Stop the hub first on sled.
    AdminToken {
        /// Config file.
        #[arg(long)]
        config: PathBuf,
        /// How long the token stays valid.
        #[arg(long, default_value = "1d", value_parser = humantime::parse_duration)]
        valid_for: Duration,
    },
    /// The fleet CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Enrollment tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Serve agents (QUIC) and the API (HTTP).
    Serve {
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
    /// The manual page (roff), printed (e.g. `outpost-hub man | man -l -`).
    Man,
    /// Shell completions, printed (e.g. `outpost-hub completions bash`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: Shell,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Rotate the fleet CA: a new CA signs device certificates from now on;
    /// both are trusted for the overlap, in which devices receive the new
    /// CA and renew onto it. Restart the hub (and copy the `ca*` files to
    /// every other hub, then restart them) for it to take effect.
    Rotate {
        /// The hub's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// How long the current CA stays trusted: longer than any device is
        /// expected to stay offline.
        #[arg(long, default_value = "90d", value_parser = humantime::parse_duration)]
        overlap: Duration,
    },
    /// Show the CAs of a data dir and the state of a rotation.
    Show {
        /// The hub's data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new enrollment token.
    Create {
        /// The hub's data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// How long the token stays valid (e.g. 1h, 7d).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many devices may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// host:port devices dial; default: the address `serve` recorded.
        #[arg(long)]
        hub_addr: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Man => cli::print(Doc::Man, Cli::command()),
        Command::Completions { shell } => cli::print(Doc::Completions(shell), Cli::command()),
        Command::Init { data_dir: Some(data_dir), .. } => report(init(&data_dir, None)),
        Command::Init { config: Some(path), .. } => match HubConfig::load_or_exit(&path) {
            Ok(config) => report(init(&config.data_dir.clone(), Some(config))),
            Err(code) => code,
        },
        Command::Init { .. } => ExitCode::from(64),
        Command::Migrate { config } => match HubConfig::load_or_exit(&config) {
            Ok(config) => report(migrate(&config)),
            Err(code) => code,
        },
        Command::Token { command: TokenCommand::Create { data_dir, ttl, uses, hub_addr } } => report(
            outpost_hub::service::enroll::create_token(&data_dir, ttl, uses, hub_addr)
                .map(|t| println!("{t}"))
                .map_err(Into::into),
        ),
        Command::Ca { command: CaCommand::Rotate { data_dir, overlap } } => report(rotate(&data_dir, overlap)),
        Command::Ca { command: CaCommand::Show { data_dir } } => report(show_ca(&data_dir)),
        Command::AdminToken { config, valid_for } => match HubConfig::load_checked_or_exit(&config) {
            Ok(config) => report(runtime().and_then(|rt| {
                let (token, name) = rt.block_on(outpost_hub::break_glass(&config, valid_for))?;
                println!("Admin API token {name:?} (shown once, stored only as a hash):");
                println!("{token}");
                Ok(())
            })),
            Err(code) => code,
        },
        Command::Validate { config } => validate(&config),
        Command::Serve { config: path } => match HubConfig::load_checked_or_exit(&path) {
            Ok(config) => report(serve(config, &path)),
            Err(code) => code,
        },
    }
}

/// Exit status when the database cannot be reached (EX_UNAVAILABLE): not a
/// config error, so systemd keeps restarting the hub until it can.
const EXIT_UNAVAILABLE: u8 = 69;

/// `validate`: the file (exit 64 with every error), then, for PostgreSQL,
/// that the database answers with a schema this hub can run on (exit 69).
fn validate(path: &std::path::Path) -> ExitCode {
    let config = match HubConfig::load_checked_or_exit(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    if let StoreConfig::Postgres { url, .. } = &config.store
        && let Err(message) = outpost_hub::store::postgres::check_reachable(url)
    {
        eprintln!("{}: store.url: {message}", path.display());
        return ExitCode::from(EXIT_UNAVAILABLE);
    }
    println!("{}: ok", path.display());
    ExitCode::SUCCESS
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpost-hub: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn init(data_dir: &std::path::Path, config: Option<HubConfig>) -> anyhow::Result<()> {
    let token = match config {
        Some(config) => runtime()?.block_on(outpost_hub::init_with(data_dir, &config.store))?,
        None => outpost_hub::init(data_dir)?,
    };
    println!("Initialised {}.", data_dir.display());
    println!("Admin API token (shown once, stored only as a hash):");
    println!("{token}");
    Ok(())
}

fn rotate(data_dir: &std::path::Path, overlap: Duration) -> anyhow::Result<()> {
    if overlap < Duration::from_secs(1) || overlap > Duration::from_secs(3650 * 86_400) {
        anyhow::bail!("--overlap must be between 1s and 3650d");
    }
    let until = outpost_hub::service::ca::FleetCa::rotate(data_dir, overlap)?;
    let ca = outpost_hub::service::ca::FleetCa::load(data_dir)?;
    println!(
        "New fleet CA {} signs device certificates from now on.",
        outpost_shared::Fingerprint::of_der(ca.cert_der())
    );
    println!("The previous CA stays trusted until {}.", outpost_shared::time::Timestamp::from_system(until).rfc3339());
    println!("Restart the hub; with several hubs, copy ca.crt, ca.key and ca-previous.* to each and restart them.");
    Ok(())
}

fn show_ca(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let ca = outpost_hub::service::ca::FleetCa::load(data_dir)?;
    let now = std::time::SystemTime::now();
    for (i, cert) in ca.trusted(now).iter().enumerate() {
        let role = if i == 0 { "current (signs device certificates)" } else { "previous (trusted during the overlap)" };
        println!("{}  {role}", outpost_shared::Fingerprint::of_der(cert));
    }
    match ca.overlap_until(now) {
        Some(until) => println!(
            "Rotation under way: the previous CA authenticates the hub and is trusted until {}.",
            outpost_shared::time::Timestamp::from_system(until).rfc3339()
        ),
        None => println!("No rotation under way."),
    }
    Ok(())
}

fn migrate(config: &HubConfig) -> anyhow::Result<()> {
    match &config.store {
        StoreConfig::Sled => {
            println!("The sled store needs no migration.");
            Ok(())
        }
        StoreConfig::Postgres { url, .. } => {
            let (before, after) = runtime()?.block_on(outpost_hub::store::postgres::migrate(url))?;
            if before == after {
                println!("Schema at version {after}: nothing to do.");
            } else {
                println!("Schema migrated from version {before} to {after}.");
            }
            Ok(())
        }
    }
}

/// SIGHUP: the config file read again; its log level, alert rules and
/// receivers and retention periods take effect, and the HTTPS certificate
/// and key are read again. A config with errors is refused and the one in force stays.
/// Other changes wait for a restart.
fn reload(hub: &outpost_hub::RunningHub, path: &std::path::Path) {
    match HubConfig::load(path) {
        Ok(new) => {
            if let Err(e) = outpost_shared::logging::set_filter(&new.log) {
                tracing::error!(error = %e, "Log level not changed.");
            }
            hub.reload(&new);
            tracing::info!(
                file = %path.display(),
                log = %new.log,
                "Config reloaded (log level, alert rules, retention, backup quota and reserve, HTTPS certificate)."
            );
        }
        Err(errors) => {
            for e in &errors.errors {
                tracing::error!(file = %path.display(), key = %e.path, error = %e.message, "Config not reloaded.");
            }
        }
    }
    hub.reload_tls();
}

/// How often the STATUS line is looked at when systemd wants no watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(30);

fn serve(config: HubConfig, path: &std::path::Path) -> anyhow::Result<()> {
    outpost_shared::logging::init(&config.log);
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the tokio runtime: {e}"))
    });
    system.block_on(async move {
        let hub = outpost_hub::start(&config).await.context("hub failed to start")?;
        // Every listener is bound and every task runs: READY for systemd
        // (Type=notify), then STATUS on each look and the watchdog ping at
        // half of WatchdogSec, only while every part of the hub still runs.
        let mut status = hub.status();
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
        let watchdog = sd_notify::watchdog_enabled();
        let every = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
        let signal = outpost_shared::logging::wait_for_signal();
        tokio::pin!(signal);
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("listen for SIGHUP")?;
        loop {
            tokio::select! {
                () = &mut signal => break,
                Some(()) = hangup.recv() => reload(&hub, path),
                () = tokio::time::sleep(every) => {
                    let now = hub.status();
                    if now != status {
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&now)]);
                        status = now;
                    }
                    match hub.dead_part() {
                        None if watchdog.is_some() => {
                            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                        }
                        None => {}
                        Some(part) => tracing::error!(part, "A part of the hub stopped; the watchdog is no longer pinged."),
                    }
                }
            }
        }
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        tracing::info!("Shutting down.");
        hub.stop(Duration::from_secs(10)).await;
        Ok(())
    })
}
