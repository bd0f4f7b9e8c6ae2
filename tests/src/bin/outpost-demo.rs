//! `outpost-demo`: a hub and N agents on this machine, in one process, with
//! throw-away data dirs. Enrollment is done for real (token, CSR, mutual
//! TLS); each agent runs its own actix System on its own thread, exactly as
//! `outpost-agent run` would. Prints the API URL and a live fleet table until
//! Ctrl-C, or for `--for` and then a summary (exit status 1 if any agent
//! never came online).

use anyhow::Context;
use clap::Parser;
use outpost_agent::config::AgentConfig;
use outpost_hub::client::{Client, render_table};
use outpost_hub::config::HubConfig;
use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "outpost-demo", about = "A hub and agents on this machine, nothing to install")]
struct Cli {
    /// How many agents to start.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=200))]
    agents: u16,
    /// Stop after this long (e.g. 30s) and print a summary.
    #[arg(long = "for", value_parser = humantime::parse_duration)]
    run_for: Option<Duration>,
    /// Keep the data dirs in this directory instead of a temporary one.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

struct RunningAgent {
    name: String,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<Result<(), outpost_agent::AgentError>>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    outpost_shared::logging::init("warn");
    let temp = match tempfile::Builder::new().prefix("outpost-demo-").tempdir() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("outpost-demo: cannot make a temporary directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    let root = cli.data_dir.clone().unwrap_or_else(|| temp.path().to_owned());
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot start the tokio runtime: {e}"))
    });
    match system.block_on(demo(cli, root)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("outpost-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(cli: Cli, root: std::path::PathBuf) -> anyhow::Result<bool> {
    let hub_dir = root.join("hub");
    let admin_token =
        outpost_hub::init_with(&hub_dir, &outpost_hub::store::StoreConfig::Sled).await.context("initialise the hub")?;
    let mut hub_config = HubConfig::ephemeral(hub_dir.clone());
    hub_config.heartbeat_timeout = Duration::from_secs(5);
    let hub = outpost_hub::start(&hub_config).await.context("start the hub")?;
    let api = format!("http://{}", hub.http_addr);

    let mut agents = Vec::new();
    for i in 0..cli.agents {
        agents.push(start_agent(&root, &hub_dir, &format!("demo-agent-{i}")).await?);
    }

    println!("Outpost demo: hub and {} agents on this machine (data in {}).", agents.len(), root.display());
    println!("  API:   {api}   (QUIC for agents on {})", hub.quic_addr);
    println!("  Token: {admin_token}");
    println!("  Try:   cargo run --bin outpostctl -- --hub {api} --token {admin_token} devices");
    let client = Client::new(&api, &admin_token);
    let c = client.clone();
    let console = match tokio::task::spawn_blocking(move || c.sign_in_link("admin", "1h")).await? {
        Ok(link) => format!("{api}{}", link.path),
        Err(e) => format!("{api}/console/ (sign in with the token above; no link: {e})"),
    };
    println!("  Console: {console}");
    println!("           (a one-time sign-in link, valid for an hour; open it in a browser)");
    println!();

    let ids_wanted = agents.len();
    let mut ever_online = BTreeSet::new();
    let deadline = cli.run_for.map(|d| Instant::now() + d);
    let tty = std::io::stdout().is_terminal();
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    let signal = outpost_shared::logging::wait_for_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            () = &mut signal => break,
            _ = ticker.tick() => {}
        }
        let c = client.clone();
        match tokio::task::spawn_blocking(move || c.devices()).await? {
            Ok(devices) => {
                ever_online.extend(devices.iter().filter(|d| d.online).map(|d| d.id.clone()));
                if tty {
                    print!("\x1b[2J\x1b[H");
                    println!("API {api}  token {admin_token}  (Ctrl-C to stop)");
                    println!("Console {console}\n");
                }
                print!("{}", render_table(&devices));
                println!();
            }
            Err(e) => eprintln!("outpost-demo: API call failed: {e}"),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }

    // Each agent runs a scheduled job (the built-in store check every 2 s);
    // count the runs the hub has received.
    let c = client.clone();
    let ids: Vec<String> = ever_online.iter().cloned().collect();
    let job_runs = tokio::task::spawn_blocking(move || {
        ids.iter().map(|id| c.job_runs(id, "store-check", 1000).map_or(0, |r| r.len())).sum::<usize>()
    })
    .await?;
    println!("Stopping.");
    for agent in &agents {
        tracing::debug!(agent = %agent.name, "Stopping agent.");
    }
    let mut failures = 0;
    for agent in agents {
        let _ = agent.stop.send(());
        match tokio::task::spawn_blocking(move || agent.thread.join()).await? {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("outpost-demo: {} failed: {e}", agent.name);
                failures += 1;
            }
            Err(_) => {
                eprintln!("outpost-demo: {} panicked", agent.name);
                failures += 1;
            }
        }
    }
    hub.stop(Duration::from_secs(5)).await;
    let all_online = ever_online.len() == ids_wanted;
    println!(
        "Summary: {} of {ids_wanted} agents came online{}.",
        ever_online.len(),
        if failures > 0 { format!(", {failures} failed") } else { String::new() }
    );
    println!("Jobs: {job_runs} scheduled runs of store-check reached the hub.");
    Ok(all_online && failures == 0)
}

async fn start_agent(root: &Path, hub_dir: &Path, name: &str) -> anyhow::Result<RunningAgent> {
    let token = outpost_hub::service::enroll::create_token(hub_dir, Duration::from_secs(600), 1, None)?;
    let data_dir = root.join(name);
    outpost_agent::enroll::enroll(&token, &data_dir, name).await.with_context(|| format!("enroll {name}"))?;
    let mut config = AgentConfig::with_data_dir(data_dir);
    config.name = Some(name.to_owned());
    config.uplink.heartbeat = Duration::from_secs(1);
    config.telemetry.interval = Duration::from_secs(2);
    // The demo's agents share one host, where LAN discovery shows nothing
    // a fleet manager would want to see; `tests/tests/peers.rs` shows it.
    config.peers.enabled = false;
    let job = "[[job]]\nname = \"store-check\"\nschedule = \"@every 2s\"\nkind = \"store-check\"\n";
    let table: toml::Table = job.parse().context("demo job")?;
    config.jobs = outpost_shared::config::read_table(&table, |root| outpost_shared::job::read_jobs(root, "job"))
        .map_err(|e| anyhow::anyhow!("demo job: {e:?}"))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            outpost_agent::run(config, async move {
                let _ = stopped.await;
            })
        })
        .context("start an agent thread")?;
    Ok(RunningAgent { name: name.to_owned(), stop, thread })
}
