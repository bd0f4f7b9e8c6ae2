//! `outpost-agent`: enroll, validate a config, or run the daemon.

use clap::{Parser, Subcommand};
use outpost_agent::config::AgentConfig;
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
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Enroll { token, data_dir, name } => enroll(&token, data_dir, name),
        Command::Validate { config } => AgentConfig::validate_command(&config),
        Command::Run { config } => match AgentConfig::load_or_exit(&config) {
            Ok(config) => {
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
