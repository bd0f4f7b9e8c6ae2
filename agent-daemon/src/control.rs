//! The local control socket: `outpost-agent jobs` and `run-job` talk to the
//! running daemon through it, with no hub involved.
//!
//! A Unix socket at `<data_dir>/control.sock`, mode 0600 (the data dir is
//! the agent's own). One request per connection, one JSON line; the answer
//! is one or more JSON lines, then the daemon closes the connection:
//! - `{"op":"jobs"}` → `{"jobs":[JobView...]}`
//! - `{"op":"peers"}` → `{"peers":[PeerEntry...]}`
//! - `{"op":"run_job","name":N,"wait":true}` → `{"started":RUN_ID}`, then
//!   with `wait` one `{"attempt":JobRun}` per attempt until the last.
//! - errors: `{"error":"..."}`.

use crate::jobs::{JobView, Jobs};
use crate::peers::PeerTable;
use outpost_shared::job::{JobRun, Trigger};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

/// Longest request line.
const MAX_REQUEST: usize = 4096;

/// The socket's path for a data dir.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// A request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// List the jobs.
    Jobs,
    /// List the LAN peers.
    Peers,
    /// Run a job now.
    RunJob {
        /// Its name.
        name: String,
        /// Stream each attempt's record until the run ends.
        #[serde(default)]
        wait: bool,
    },
}

/// One line of an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// The jobs.
    Jobs(Vec<JobView>),
    /// The LAN peers.
    Peers(Vec<outpost_shared::peers::PeerEntry>),
    /// The run started with this id.
    Started(u64),
    /// An attempt ended.
    Attempt(Box<JobRun>),
    /// The request failed.
    Error(String),
}

/// Serves the socket until `cancel`.
pub async fn serve(data_dir: PathBuf, jobs: Jobs, peers: PeerTable, cancel: CancellationToken) {
    let path = socket_path(&data_dir);
    let listener = match bind(&path).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "Cannot open the control socket.");
            // Ending lets the supervisor retry later.
            tokio::time::sleep(Duration::from_secs(5)).await;
            return;
        }
    };
    tracing::info!(path = %path.display(), "Control socket ready.");
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (jobs, peers, cancel) = (jobs.clone(), peers.clone(), cancel.clone());
                    tokio::spawn(async move {
                        tokio::select! {
                            () = handle(stream, &jobs, &peers) => {}
                            () = cancel.cancelled() => {}
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Control socket accept failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Binds the socket, replacing a stale one (a live daemon answering on it
/// means another agent uses this data dir: refused).
async fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, "another agent answers on it"));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn handle(stream: UnixStream, jobs: &Jobs, peers: &PeerTable) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST as u64));
    let request = match reader.read_line(&mut line).await {
        Ok(_) => serde_json::from_str::<Request>(&line).map_err(|e| format!("bad request: {e}")),
        Err(e) => Err(format!("cannot read the request: {e}")),
    };
    let mut send = async |reply: Reply| {
        let mut text = serde_json::to_string(&reply).unwrap_or_default();
        text.push('\n');
        write.write_all(text.as_bytes()).await.is_ok()
    };
    match request {
        Err(e) => {
            send(Reply::Error(e)).await;
        }
        Ok(Request::Jobs) => {
            send(jobs.list().await.map_or_else(|e| Reply::Error(e.to_string()), Reply::Jobs)).await;
        }
        Ok(Request::Peers) => {
            send(Reply::Peers(peers.snapshot())).await;
        }
        Ok(Request::RunJob { name, wait }) => {
            // Subscribe first so no attempt can end unseen.
            let mut finished = jobs.subscribe();
            let run_id = match jobs.run_now(&name, Trigger::Manual).await {
                Ok(id) => id,
                Err(e) => {
                    send(Reply::Error(e.to_string())).await;
                    return;
                }
            };
            if !send(Reply::Started(run_id)).await || !wait {
                return;
            }
            loop {
                match finished.recv().await {
                    Ok((run, last)) if run.run_id == run_id => {
                        if !send(Reply::Attempt(Box::new(run))).await || last {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if !jobs.is_running(run_id) {
                            let lost = "the run ended while its records were crowded out; see `outpost-agent jobs`";
                            send(Reply::Error(lost.into())).await;
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    }
}

/// Sends one request and returns the reply lines, calling `each` on each
/// as it arrives (the `outpost-agent` client side).
pub async fn request(data_dir: &Path, request: &Request, mut each: impl FnMut(&Reply)) -> Result<(), String> {
    let path = socket_path(data_dir);
    let stream = UnixStream::connect(&path).await.map_err(|e| {
        format!(
            "cannot reach the agent at {} ({e}); is `outpost-agent run` running with this data dir?",
            path.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut text = serde_json::to_string(request).map_err(|e| e.to_string())?;
    text.push('\n');
    write.write_all(text.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        let reply: Reply = serde_json::from_str(&line).map_err(|e| format!("unexpected reply from the agent: {e}"))?;
        each(&reply);
    }
    Ok(())
}
