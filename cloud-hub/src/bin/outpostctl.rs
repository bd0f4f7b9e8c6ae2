//! `outpostctl`: the fleet manager's CLI for the hub's API.

use clap::{Parser, Subcommand};
use outpost_hub::client::{Client, render_table};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "outpostctl",
    version,
    about = "Manage an Outpost fleet through the hub's API"
)]
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let client = Client::new(&cli.hub, &cli.token);
    let result = match cli.command {
        Command::Devices { json: false } => {
            client.devices().map(|d| print!("{}", render_table(&d)))
        }
        Command::Devices { json: true } => client.devices().map(|d| print_json(&d)),
        Command::Device { id } => client.device(&id).map(|d| print_json(&d)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpostctl: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("outpostctl: cannot print JSON: {e}"),
    }
}
