//! What may change while the agent runs, and how the actors that depend on
//! it follow it: the hub's desired state (applied by the inbox) and the
//! config (read again on SIGHUP) publish [`Settings`] on a watch channel;
//! the telemetry sampler and the job scheduler follow it
//! ([`follow_settings`]). The config's part is [`Defaults`], shared by both
//! publishers.

use outpost_shared::desired::DesiredDoc;
use outpost_shared::job::JobSpec;
use std::time::Duration;
use tokio::sync::watch;

/// Settings the hub's desired state or a config reload may change at run
/// time.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Telemetry sampling interval.
    pub telemetry_interval: Duration,
    /// Jobs from the hub (they replace config jobs of the same name).
    pub hub_jobs: Vec<JobSpec>,
    /// Jobs from the config (`[[job]]` and the backup sets' schedules).
    pub config_jobs: Vec<JobSpec>,
}

/// The config's settings (no hub jobs), replaced by a config reload.
pub type Defaults = std::sync::Arc<std::sync::RwLock<Settings>>;

/// The config's settings now.
pub fn defaults_now(defaults: &Defaults) -> Settings {
    defaults.read().unwrap_or_else(|p| p.into_inner()).clone()
}

impl Settings {
    /// `defaults` (the config's) with what `doc` sets, if this device lets
    /// the hub set it ([`hub_jobs_allowed`]).
    pub(crate) fn with(defaults: &Settings, doc: DesiredDoc, allow_exec: bool) -> Result<Settings, String> {
        hub_jobs_allowed(&doc, allow_exec)?;
        Ok(Settings {
            telemetry_interval: doc.telemetry_interval.unwrap_or(defaults.telemetry_interval),
            hub_jobs: doc.jobs,
            config_jobs: defaults.config_jobs.clone(),
        })
    }
}

/// The one rule for programs the hub may start on a device: only with
/// `commands.allow_exec = true`. That switch covers `exec` commands and
/// jobs in desired state alike, so a device whose operator turned it off
/// runs no program the hub names. Without it a hub job may still be a
/// built-in kind (`store-check`), or switch a job off (`enabled = false`).
pub fn hub_jobs_allowed(doc: &DesiredDoc, allow_exec: bool) -> Result<(), String> {
    if allow_exec {
        return Ok(());
    }
    let refused: Vec<String> = doc
        .jobs
        .iter()
        .filter(|j| j.enabled && matches!(j.action, outpost_shared::job::Action::Command { .. }))
        .map(|j| format!("jobs[{}].command", j.name))
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}: this device does not run programs named by the hub (commands.allow_exec = false in its config)",
            refused.join(", ")
        ))
    }
}

/// Calls `on_change` on the actor each time the settings in `rx` change,
/// for as long as the actor runs (it reads the new value from its own
/// receiver).
pub fn follow_settings<A>(
    ctx: &mut actix::Context<A>,
    mut rx: watch::Receiver<Settings>,
    on_change: fn(&mut A, &mut actix::Context<A>),
) where
    A: actix::Actor<Context = actix::Context<A>>,
{
    use actix::{ActorFutureExt, AsyncContext};
    let changed = async move {
        let ok = rx.changed().await.is_ok();
        (ok, rx)
    };
    ctx.spawn(actix::fut::wrap_future::<_, A>(changed).map(move |(ok, rx), act, ctx| {
        if ok {
            on_change(act, ctx);
            follow_settings(ctx, rx, on_change);
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_jobs_run_programs_only_where_exec_is_allowed() {
        let doc = |jobs: &str| DesiredDoc::parse(&format!(r#"{{"jobs":[{jobs}]}}"#)).unwrap();
        let program = r#"{"name":"id","schedule":"@every 5s","command":["sh","-c","id"]}"#;
        let err = hub_jobs_allowed(&doc(program), false).unwrap_err();
        assert!(err.starts_with("jobs[id].command: ") && err.contains("commands.allow_exec = false"), "{err}");
        assert!(hub_jobs_allowed(&doc(program), true).is_ok());
        let builtin = r#"{"name":"check","schedule":"@every 5s","kind":"store-check"}"#;
        let off = r#"{"name":"nightly","schedule":"@every 5s","command":["x"],"enabled":false}"#;
        assert!(hub_jobs_allowed(&doc(&format!("{builtin},{off}")), false).is_ok());
    }
}
