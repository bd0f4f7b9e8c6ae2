//! What the console's actions did: the commands of a bulk action, live
//! until all are done; the commands waiting for their devices; and the
//! lines of a device's command panel.

use super::{ConsoleError, Nav, User, html};
use crate::api::DeviceView;
use crate::human::ago;
use crate::service::fleet::Fleet;
use crate::store::{CommandRecord, CommandState};
use actix_web::{HttpResponse, web};
use askama::Template;
use outpost_shared::protocol::Outcome;
use outpost_shared::time::Timestamp;
use serde::Deserialize;
use std::collections::HashMap;

/// Most commands one page lists.
pub const SHOWN: usize = 500;

/// One command as the console lists it.
pub struct CommandLine {
    pub id: u64,
    pub device: String,
    pub device_name: String,
    /// `online`, `offline` (or `never`, `revoked`...): the device's state.
    pub device_state: &'static str,
    pub kind: String,
    /// Its arguments as one would type them.
    pub args: String,
    pub created_at: String,
    pub created_ago: String,
    pub by: String,
    /// `queued`, `delivered` or `done`: whether it may still change.
    pub state: &'static str,
    /// Where it stands, in words.
    pub state_text: String,
    /// The CSS class of the state: `online` (went well), `bad`, `warn`.
    pub class: &'static str,
    /// Since when it stands there.
    pub when: String,
    pub output: String,
}

impl CommandLine {
    /// The line of `c`, whose device is `device` (if known), at `now`.
    pub fn new(c: CommandRecord, device: Option<&DeviceView>, now: Timestamp) -> Self {
        let online = device.is_some_and(|d| d.online);
        let (state, state_text, class, at, output) = match &c.state {
            CommandState::Queued if c.expires_at <= now => {
                ("queued", "expired, not delivered".to_owned(), "bad", None, String::new())
            }
            CommandState::Queued if !online => {
                ("queued", "waits for the device (offline)".to_owned(), "warn", None, String::new())
            }
            CommandState::Queued => ("queued", "queued".to_owned(), "warn", None, String::new()),
            CommandState::Delivered { at } => {
                ("delivered", "delivered, running".to_owned(), "warn", Some(*at), String::new())
            }
            CommandState::Completed { at, outcome, output } => {
                let (text, class) = match outcome {
                    Outcome::Succeeded => ("succeeded".to_owned(), "online"),
                    Outcome::Failed { code } => (format!("failed (exit {code})"), "bad"),
                    Outcome::Expired => ("expired before it started".to_owned(), "bad"),
                    Outcome::Interrupted => ("interrupted (the agent stopped)".to_owned(), "bad"),
                    Outcome::Rejected => ("rejected by the device".to_owned(), "bad"),
                };
                ("done", text, class, Some(*at), output.clone())
            }
            CommandState::Expired { at } => {
                ("done", "expired before delivery".to_owned(), "bad", Some(*at), String::new())
            }
        };
        let tail = output.chars().count().saturating_sub(300);
        CommandLine {
            id: c.id,
            device: c.device.to_string(),
            device_name: device.map_or_else(|| c.device.to_string(), |d| d.name.clone()),
            device_state: device.map_or("unknown", DeviceView::state),
            args: crate::service::describe::words(&c.args),
            kind: c.kind,
            created_at: crate::human::utc(c.created_at),
            created_ago: ago(Some(c.created_at), now),
            by: c.created_by,
            state,
            state_text,
            class,
            when: at.map(|t| ago(Some(t), now)).unwrap_or_default(),
            output: output.chars().skip(tail).collect(),
        }
    }
}

/// "12 commands: 3 waiting (2 for offline devices), 1 delivered, 7
/// succeeded, 1 failed". Pure.
pub fn summary(lines: &[CommandLine]) -> String {
    let mut counts: Vec<(String, usize)> = Vec::new();
    let mut count = |what: String| match counts.iter_mut().find(|(w, _)| *w == what) {
        Some((_, n)) => *n += 1,
        None => counts.push((what, 1)),
    };
    let mut offline = 0;
    for l in lines {
        match l.state {
            "queued" if l.state_text.starts_with("waits") => {
                offline += 1;
                count("waiting".into());
            }
            "queued" if l.class == "bad" => count("expired".into()),
            "queued" => count("waiting".into()),
            "delivered" => count("delivered".into()),
            _ => count(l.state_text.split(' ').next().unwrap_or_default().to_owned()),
        }
    }
    let parts: Vec<String> = counts
        .into_iter()
        .map(|(what, n)| match what.as_str() {
            "waiting" if offline > 0 => format!("{n} waiting ({offline} for offline devices)"),
            _ => format!("{n} {what}"),
        })
        .collect();
    let noun = if lines.len() == 1 { "command" } else { "commands" };
    if parts.is_empty() { format!("No {noun}.") } else { format!("{} {noun}: {}.", lines.len(), parts.join(", ")) }
}

/// The lines of `commands`, with their devices' names and states read in
/// one pass.
pub async fn lines(fleet: &Fleet, commands: Vec<CommandRecord>) -> Result<Vec<CommandLine>, ConsoleError> {
    let mut ids: Vec<_> = commands.iter().map(|c| c.device.clone()).collect();
    ids.sort();
    ids.dedup();
    let views: HashMap<String, DeviceView> =
        fleet.views(Some(&ids)).await?.into_iter().map(|v| (v.id.clone(), v)).collect();
    let now = Timestamp::now();
    Ok(commands
        .into_iter()
        .map(|c| {
            let device = views.get(c.device.as_str());
            CommandLine::new(c, device, now)
        })
        .collect())
}

#[derive(Template)]
#[template(path = "console/commands.html")]
struct CommandsPage {
    nav: Option<Nav>,
    notice: Option<String>,
    title: String,
    summary: String,
    bulk: bool,
    queued: bool,
    live: bool,
    show_device: bool,
    lines: Vec<CommandLine>,
}

#[derive(Debug, Default, Deserialize)]
struct CommandsQuery {
    /// A bulk action's commands: ids from..=to made by `by`.
    from: Option<u64>,
    to: Option<u64>,
    #[serde(default)]
    by: String,
    /// `all`: every recent command; else those waiting for their devices.
    #[serde(default)]
    state: String,
}

/// `GET /console/commands`: the commands waiting for their devices (the
/// default), the newest commands (`state=all`), or a bulk action's
/// commands (`from`, `to`, `by`), refreshed until all are done.
async fn commands_page(
    user: User,
    fleet: web::Data<Fleet>,
    query: web::Query<CommandsQuery>,
) -> Result<HttpResponse, ConsoleError> {
    use crate::service::CommandsWanted;
    let q = query.into_inner();
    let (title, wanted) = match (q.from, q.to) {
        (Some(from), Some(to)) => ("Bulk action", CommandsWanted::Bulk { ids: from..=to, by: q.by.clone() }),
        _ if q.state == "all" => ("Recent commands", CommandsWanted::Recent),
        _ => ("Commands waiting for their devices", CommandsWanted::Waiting),
    };
    let (bulk, queued) = (matches!(wanted, CommandsWanted::Bulk { .. }), matches!(wanted, CommandsWanted::Waiting));
    let lines = lines(&fleet, crate::service::commands(&fleet, &wanted, SHOWN).await?).await?;
    let title = title.to_owned();
    html(&CommandsPage {
        nav: Some((&user).into()),
        notice: None,
        summary: summary(&lines),
        live: bulk && lines.iter().any(|l| l.state != "done" && l.class != "bad"),
        title,
        bulk,
        queued,
        show_device: true,
        lines,
    })
}

/// The commands pages.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/commands", web::get().to(commands_page));
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_shared::DeviceId;

    fn record(id: u64, state: CommandState) -> CommandRecord {
        CommandRecord {
            id,
            device: "dev-1".parse::<DeviceId>().unwrap(),
            kind: "exec".into(),
            args: vec!["sh".into(), "-c".into(), "echo 'hi'".into()],
            created_at: Timestamp(1_000),
            expires_at: Timestamp(100_000),
            created_by: "ops".into(),
            state,
        }
    }

    #[test]
    fn a_command_says_where_it_stands_and_what_it_was() {
        let now = Timestamp(61_000);
        let line = CommandLine::new(record(1, CommandState::Queued), None, now);
        assert_eq!((line.kind.as_str(), line.args.as_str()), ("exec", r"sh -c 'echo '\''hi'\'''"));
        assert_eq!((line.state, line.state_text.as_str()), ("queued", "waits for the device (offline)"));
        let expired = CommandLine::new(record(2, CommandState::Queued), None, Timestamp(200_000));
        assert_eq!(expired.state_text, "expired, not delivered");
        let failed = CommandState::Completed {
            at: Timestamp(2_000),
            outcome: Outcome::Failed { code: 3 },
            output: "boom".into(),
        };
        let line = CommandLine::new(record(3, failed), None, now);
        assert_eq!((line.state, line.state_text.as_str(), line.class), ("done", "failed (exit 3)", "bad"));
        assert_eq!((line.when.as_str(), line.output.as_str()), ("59 s ago", "boom"));
        let ok = CommandState::Completed { at: Timestamp(2_000), outcome: Outcome::Succeeded, output: String::new() };
        let delivered = CommandState::Delivered { at: Timestamp(2_000) };
        let lines: Vec<CommandLine> = [
            record(1, CommandState::Queued),
            record(4, ok.clone()),
            record(5, ok),
            record(6, delivered),
            record(7, CommandState::Expired { at: Timestamp(9) }),
        ]
        .into_iter()
        .map(|r| CommandLine::new(r, None, now))
        .collect();
        assert_eq!(
            summary(&lines),
            "5 commands: 1 waiting (1 for offline devices), 2 succeeded, 1 delivered, 1 expired."
        );
        assert_eq!(summary(&[]), "No commands.");
    }
}
