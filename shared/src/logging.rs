//! Process-level plumbing both daemons share: log setup and waiting for a
//! termination signal.

/// The filter in force, replaceable while the process runs
/// ([`set_filter`]).
static FILTER: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

/// Prefix of the structured fields the daemons give journald:
/// `OUTPOST_DEVICE`, `OUTPOST_JOB`, `OUTPOST_PEER`, `OUTPOST_REQUEST_ID`…
/// (`journalctl OUTPOST_DEVICE=dev-…`).
pub const JOURNAL_FIELD_PREFIX: &str = "OUTPOST";

/// Sets up `tracing` with `filter` (overridden by `RUST_LOG`). Under
/// systemd (`JOURNAL_STREAM` set) events go to journald in its native
/// protocol, each with its spans' and its own fields as journal fields
/// (prefixed [`JOURNAL_FIELD_PREFIX`]) and its level as `PRIORITY`; if the
/// journal's socket cannot be reached they go to standard error without
/// timestamps (journald adds its own). Otherwise to standard error.
pub fn init(filter: &str) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    use std::io::IsTerminal;
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(!journal && std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter);
    let native = journal.then(tracing_journald::layer).and_then(Result::ok);
    let installed = match native {
        Some(layer) => registry.with(layer.with_field_prefix(Some(JOURNAL_FIELD_PREFIX.into()))).try_init(),
        None if journal => registry.with(fmt.without_time()).try_init(),
        None => registry.with(fmt).try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
    }
}

/// Replaces the log filter of a process set up by [`init`]: a config
/// reload, where the operator's edit wins over `RUST_LOG` from the start.
pub fn set_filter(filter: &str) -> Result<(), String> {
    let new = tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| format!("log {filter:?}: {e}"))?;
    let handle = FILTER.get().ok_or("logging was not set up")?;
    handle.reload(new).map_err(|e| e.to_string())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers the process still ends on a signal's
            // default action; wait forever.
            std::future::pending::<()>().await;
        }
    }
}
