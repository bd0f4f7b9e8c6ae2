//! The hub's rules, between the web front ends (the API and the console) and the
//! store: how a device is named, what a command, a desired-state change or
//! a restore grant must satisfy, and how a change is made and announced to
//! the device's session. Answers are views and [`ServiceError`], never HTTP:
//! each front end maps them to its own form.

pub mod admission;
pub mod alerts;
pub mod backups;
pub mod ca;
pub mod describe;
pub mod enroll;
pub mod fleet;
pub mod index;
pub mod listing;
pub mod pace;
pub mod reads;
pub mod throttle;

use crate::api::{CommandRequest, CommandView, DesiredView, GrantView};
use crate::service::fleet::Fleet;
use crate::service::listing::{Selector, check_labels};
use crate::store::{ApiToken, Labels, MadeBy, NewCommand, Role, StoreError, TokenKind};
use outpost_shared::DeviceId;
use outpost_shared::desired::DesiredDoc;
use outpost_shared::protocol::CommandKind;
use outpost_shared::time::Timestamp;
use std::time::Duration;

/// SHA-256 of a bearer token, the key it is stored under.
pub fn token_hash(secret: &str) -> [u8; 32] {
    outpost_shared::Fingerprint::of_der(secret.as_bytes()).0
}

/// Largest command (kind and arguments) the hub accepts.
pub const MAX_COMMAND_BYTES: usize = 64 << 10;

/// Longest a command may wait for its device.
pub const MAX_COMMAND_TTL: Duration = Duration::from_secs(30 * 86400);

/// Lifetime of a command when the caller names none.
pub const DEFAULT_COMMAND_TTL: Duration = Duration::from_secs(3600);

/// How long a restore grant lasts when the caller names no length.
pub const DEFAULT_GRANT: Duration = Duration::from_secs(24 * 3600);

/// Why a request was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// No such device, command or snapshot.
    #[error("{0} not found")]
    NotFound(String),
    /// The request is not acceptable as it stands (names what is wrong).
    #[error("{0}")]
    Invalid(String),
    /// The desired state changed since the caller read it.
    #[error("desired state is at version {current}; read it again and retry")]
    Conflict {
        /// The version in force.
        current: u64,
    },
    /// The thing to make exists already.
    #[error("{0} exists already")]
    Exists(String),
    /// The store failed or is unavailable.
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::VersionConflict { current, .. } => ServiceError::Conflict { current },
            other => ServiceError::Store(other),
        }
    }
}

/// The device `raw` names, if the fleet has it: its id, or its name when
/// exactly one device has that name.
pub async fn device(fleet: &Fleet, raw: &str) -> Result<DeviceId, ServiceError> {
    let not_found = || ServiceError::NotFound(format!("device {raw:?}"));
    if let Ok(id) = raw.parse::<DeviceId>()
        && fleet.store().device(&id).await?.is_some()
    {
        return Ok(id);
    }
    let named: Vec<DeviceId> =
        fleet.store().devices().await?.into_iter().filter(|d| d.name == raw).map(|d| d.id).collect();
    match named.as_slice() {
        [] => Err(not_found()),
        [id] => Ok(id.clone()),
        many => Err(ServiceError::Invalid(format!(
            "{} devices are named {raw:?} ({}); name one by its id",
            many.len(),
            many.iter().map(DeviceId::as_str).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Replaces `device`'s labels after checking them.
pub async fn set_labels(fleet: &Fleet, by: &str, device: &DeviceId, labels: &Labels) -> Result<String, ServiceError> {
    check_labels(labels).map_err(ServiceError::Invalid)?;
    let before = fleet.store().fleet_rows(Some(std::slice::from_ref(device))).await?.pop().map(|r| r.labels);
    if !fleet.store().set_labels(device, labels).await? {
        return Err(ServiceError::NotFound(format!("device {device}")));
    }
    tracing::info!(device = %device, ?labels, by, "Labels set.");
    Ok(describe::labels(&before.unwrap_or_default(), labels))
}

/// The devices a bulk action by `selector` acts on (refusing an empty or
/// unknown selector and one that matches nothing).
pub async fn bulk_targets(fleet: &Fleet, selector: &str) -> Result<(Selector, Vec<DeviceId>), ServiceError> {
    let selector = Selector::parse(selector).map_err(ServiceError::Invalid)?;
    let ids = fleet
        .with_briefs(|items| {
            let items: Vec<_> = items.collect();
            crate::service::listing::bulk_targets(&selector, &items)
                .map(|matched| matched.into_iter().map(|l| l.row.record.id.clone()).collect())
        })
        .await?
        .map_err(ServiceError::Invalid)?;
    Ok((selector, ids))
}

/// A change made to every device a selector matches: the API's
/// `POST /commands` and `PATCH /desired` and the console's bulk page all
/// carry theirs out through [`plan_bulk`], [`BulkPlan::check`] and
/// [`BulkPlan::apply`].
#[derive(Debug, Clone)]
pub enum BulkAction {
    /// The same command for each.
    Command(CommandRequest),
    /// The same JSON merge patch to each desired state.
    Desired(serde_json::Value),
}

/// The devices a bulk action reaches, found and not yet acted on.
#[derive(Debug)]
pub struct BulkPlan {
    /// The selector, parsed.
    pub selector: Selector,
    /// The devices it matches.
    pub ids: Vec<DeviceId>,
}

/// Finds the devices `selector` matches for `action`; a command that is
/// not valid is refused first. Nothing changes.
pub async fn plan_bulk(fleet: &Fleet, selector: &str, action: &BulkAction) -> Result<BulkPlan, ServiceError> {
    if let BulkAction::Command(command) = action {
        check_command(command).map_err(ServiceError::Invalid)?;
    }
    let (selector, ids) = bulk_targets(fleet, selector).await?;
    Ok(BulkPlan { selector, ids })
}

impl BulkPlan {
    /// Checks that `action` is valid for every device (a patch leaves each
    /// desired state valid); nothing changes.
    pub async fn check(&self, fleet: &Fleet, action: &BulkAction) -> Result<(), ServiceError> {
        match action {
            BulkAction::Command(_) => Ok(()),
            BulkAction::Desired(patch) => check_bulk_patch(fleet, &self.ids, patch).await,
        }
    }

    /// What the plan reaches, as the API shows it (a dry run's answer).
    pub fn view(&self) -> crate::api::BulkView {
        crate::api::BulkView {
            selector: self.selector.text().to_owned(),
            matched: self.ids.len(),
            devices: self.ids.iter().map(ToString::to_string).collect(),
            commands: Vec::new(),
            versions: Vec::new(),
        }
    }

    /// Carries `action` out on each device on behalf of `by`: the commands
    /// queued or the desired-state versions made, in the view.
    pub async fn apply(
        &self,
        fleet: &Fleet,
        by: &str,
        action: &BulkAction,
    ) -> Result<crate::api::BulkView, ServiceError> {
        let mut view = self.view();
        for id in &self.ids {
            match action {
                BulkAction::Command(command) => view.commands.push(send_command(fleet, by, id, command.clone()).await?),
                BulkAction::Desired(patch) => {
                    let (done, _) = patch_desired(fleet, by, id, patch).await?;
                    view.versions.push((id.to_string(), done.version));
                }
            }
        }
        Ok(view)
    }
}

/// Longest a token may live.
pub const MAX_TOKEN_LIFE: Duration = Duration::from_secs(366 * 86400);
/// Longest a console session lives (less when the token it was signed in
/// with expires sooner).
pub const CONSOLE_SESSION: Duration = Duration::from_secs(12 * 3600);
/// Longest a sign-in link stays valid.
pub const MAX_LINK_LIFE: Duration = Duration::from_secs(86400);

/// Checks a token request: name, role, lifetime. Pure.
pub fn check_token(name: &str, role: &str, valid_for: &str, max: Duration) -> Result<(Role, Duration), String> {
    let mut problems = Vec::new();
    if name.trim().is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        problems.push("name: 1-64 printable characters".to_owned());
    }
    if name.starts_with("tok-") {
        // Tokens are revoked by id (`tok-…`) or name: a name like an id
        // could make another token impossible to revoke by its id.
        problems.push("name: may not start with \"tok-\" (token ids do)".to_owned());
    }
    let role = Role::parse(role);
    if role.is_none() {
        problems.push("role: viewer, operator or admin".into());
    }
    let life = match humantime::parse_duration(valid_for) {
        Ok(d) if d >= Duration::from_secs(60) && d <= max => Some(d),
        Ok(_) => {
            problems.push(format!("expires_in: between 1m and {}", humantime::format_duration(max)));
            None
        }
        Err(e) => {
            problems.push(format!("expires_in: {valid_for:?}: {e}"));
            None
        }
    };
    match (role, life) {
        (Some(role), Some(life)) if problems.is_empty() => Ok((role, life)),
        _ => Err(problems.join("; ")),
    }
}

/// Makes a token; returns its secret (shown once) and record. Names are
/// unique among tokens.
pub async fn create_token(
    fleet: &Fleet,
    by: &str,
    name: &str,
    role: Role,
    life: Duration,
    kind: TokenKind,
    made_by: Option<MadeBy>,
) -> Result<(String, [u8; 32], ApiToken), ServiceError> {
    let now = Timestamp::now();
    let secret = new_secret();
    let hash = token_hash(&secret);
    let token = ApiToken {
        role,
        name: name.to_owned(),
        created_at: now,
        expires_at: Some(now.saturating_add(life)),
        last_used: None,
        kind,
        made_by,
    };
    if !fleet.store().insert_api_token(&hash, &token).await? {
        return Err(ServiceError::Exists(format!("a token named {name:?}")));
    }
    tracing::info!(token = name, role = role.name(), by, kind = kind.name(), "API token made.");
    Ok((secret, hash, token))
}

/// A fresh token secret: 32 random bytes, base64url, with a prefix that
/// secret scanners can recognise.
pub fn new_secret() -> String {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    format!("opt_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Removes expired sign-in links and console sessions, and API tokens
/// expired for [`crate::store::EXPIRED_TOKENS_KEPT`]; returns how many.
pub async fn drop_expired_tokens(fleet: &Fleet) -> Result<usize, ServiceError> {
    let now = Timestamp::now();
    let mut dropped = 0;
    for (hash, token) in fleet.store().api_tokens().await? {
        if token.to_drop(now) && fleet.store().take_api_token(&hash).await?.is_some() {
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// Revokes the token with id (`tok-...`) or name `which`.
pub async fn revoke_token(fleet: &Fleet, by: &str, which: &str) -> Result<([u8; 32], ApiToken), ServiceError> {
    let tokens = fleet.store().api_tokens().await?;
    let found: Vec<&([u8; 32], ApiToken)> =
        tokens.iter().filter(|(h, t)| ApiToken::id_of(h) == which || t.name == which).collect();
    let [(hash, chosen)] = found.as_slice() else {
        return Err(match found.len() {
            0 => ServiceError::NotFound(format!("token {which:?}")),
            n => ServiceError::Invalid(format!("{n} tokens are named {which:?}; revoke one by its id")),
        });
    };
    // Checked again as the token is removed, in one store step: two
    // revocations of the last two admin tokens cannot both pass.
    let refuse: crate::store::RefuseTake = |tokens, hash, now| {
        tokens.iter().find(|(h, _)| h == hash).is_some_and(|(_, chosen)| last_admin(tokens, hash, chosen, now))
    };
    let token = match fleet.store().take_api_token_unless(hash, refuse).await? {
        Ok(Some(token)) => token,
        Ok(None) => return Err(ServiceError::NotFound(format!("token {which:?}"))),
        Err(()) => {
            return Err(ServiceError::Invalid(format!(
                "{:?} is the last admin token: make another admin token first (or, on the hub machine, \
                 `outpost-hub admin-token --config …`)",
                chosen.name
            )));
        }
    };
    // Its links and console sessions are refused from now on; they go too.
    for (made, _) in tokens.iter().filter(|(_, t)| t.made_by.as_ref().is_some_and(|m| m.token == Some(*hash))) {
        fleet.store().take_api_token(made).await?;
    }
    tracing::info!(token = %token.name, by, "API token revoked.");
    Ok((*hash, token))
}

/// True if revoking `chosen` (whose hash is `hash`) would leave no usable
/// admin API token among `tokens` at `now`: then the fleet could only be
/// managed again from the hub machine.
pub fn last_admin(tokens: &[([u8; 32], ApiToken)], hash: &[u8; 32], chosen: &ApiToken, now: Timestamp) -> bool {
    let admin = |t: &ApiToken| t.role == Role::Admin && t.kind == TokenKind::Api && !t.expired(now);
    admin(chosen) && !tokens.iter().any(|(h, t)| h != hash && admin(t))
}

/// Makes a one-time console sign-in link for a session of `role`, valid
/// for `valid_for`, on behalf of `by`; returns its path and expiry.
pub async fn sign_in_link(
    fleet: &Fleet,
    by: MadeBy,
    role: &str,
    valid_for: &str,
) -> Result<(String, Timestamp), ServiceError> {
    let name = format!("sign-in link {}", &new_secret()[4..12]);
    let (role, life) = check_token(&name, role, valid_for, MAX_LINK_LIFE).map_err(ServiceError::Invalid)?;
    let (secret, _, token) =
        create_token(fleet, &by.name.clone(), &name, role, life, TokenKind::SignInLink, Some(by)).await?;
    Ok((format!("/console/sign-in?link={secret}"), token.expires_at.unwrap_or(token.created_at)))
}

/// False if `token` was made by an API token that is gone or expired at
/// `now` (see [`ApiToken::maker_holds`]).
pub async fn maker_holds(fleet: &Fleet, token: Option<&ApiToken>, now: Timestamp) -> Result<bool, StoreError> {
    let Some(token) = token else { return Ok(true) };
    let maker = match token.made_by.as_ref().and_then(|m| m.token) {
        Some(maker) => fleet.store().api_token(&maker).await?.map(|m| (maker, m)),
        None => None,
    };
    Ok(token.maker_holds(maker.as_ref(), now))
}

/// The name of a console session of `maker`: theirs, so that the audit log
/// says who acted, and a short random part that tells sessions apart.
/// Pure but for the random part.
pub fn session_name(maker: &str) -> String {
    let mut maker = maker.to_owned();
    if maker.len() > 40 {
        let mut end = 40;
        while !maker.is_char_boundary(end) {
            end -= 1;
        }
        maker.truncate(end);
        maker.push('…');
    }
    format!("{maker}{}{})", crate::store::SESSION_OF, &new_secret()[4..10])
}

/// How long a console session signed in with a token that expires at
/// `parent_expires` may live from `now`: [`CONSOLE_SESSION`], or less, so
/// that it never outlives the token. Pure.
pub fn session_life(now: Timestamp, parent_expires: Option<Timestamp>) -> Duration {
    let left = parent_expires.map_or(CONSOLE_SESSION, |at| Duration::from_millis(at.0.saturating_sub(now.0)));
    left.min(CONSOLE_SESSION)
}

/// Signs in to the console with the API token `caller` (whose hash is
/// `hash`): a console session of its role and its name is made, which ends
/// at sign-out, at its own expiry, or when the token is revoked or expires.
/// The token itself never goes into a cookie.
pub async fn token_session(fleet: &Fleet, caller: &ApiToken, hash: [u8; 32]) -> Result<String, ServiceError> {
    let life = session_life(Timestamp::now(), caller.expires_at);
    let made_by = MadeBy { name: caller.name.clone(), token: Some(hash) };
    let name = session_name(&caller.name);
    let (secret, _, _) =
        create_token(fleet, &caller.name, &name, caller.role, life, TokenKind::ConsoleSession, Some(made_by)).await?;
    Ok(secret)
}

/// Spends a one-time sign-in link: it is removed (of two uses, one wins)
/// and a console session token of its role is made, valid for
/// [`CONSOLE_SESSION`], in the name of whoever made the link. Returns the
/// session's secret and token.
pub async fn redeem_link(fleet: &Fleet, secret: &str) -> Result<(String, ApiToken), ServiceError> {
    let hash = token_hash(secret);
    let refused =
        || ServiceError::Invalid("this sign-in link is not valid: it was used, it expired, or it never existed".into());
    // Read first: a bearer token given as a link is refused untouched.
    let now = Timestamp::now();
    let known = fleet.store().api_token(&hash).await?.filter(|t| t.kind == TokenKind::SignInLink && !t.expired(now));
    if known.is_none() || !maker_holds(fleet, known.as_ref(), now).await? {
        return Err(refused());
    }
    let link = fleet.store().take_api_token(&hash).await?.ok_or_else(refused)?;
    let maker = link.made_by.clone().unwrap_or(MadeBy { name: link.name.clone(), token: None });
    let name = session_name(&maker.name);
    let (secret, _, token) =
        create_token(fleet, &link.name, &name, link.role, CONSOLE_SESSION, TokenKind::ConsoleSession, Some(maker))
            .await?;
    Ok((secret, token))
}

/// Which commands to list: a range of ids (a bulk action's), or all.
#[derive(Debug, Clone)]
pub enum CommandsWanted {
    /// Those with ids in the range made by `by` (any one when empty),
    /// oldest first.
    Bulk { ids: std::ops::RangeInclusive<u64>, by: String },
    /// The newest, all devices.
    Recent,
    /// The newest still waiting for their devices.
    Waiting,
}

/// The commands `wanted` names, at most `limit`.
pub async fn commands(
    fleet: &Fleet,
    wanted: &CommandsWanted,
    limit: usize,
) -> Result<Vec<crate::store::CommandRecord>, ServiceError> {
    let store = fleet.store();
    Ok(match wanted {
        CommandsWanted::Bulk { ids, .. } if ids.is_empty() => Vec::new(),
        CommandsWanted::Bulk { ids, by } => {
            let mut commands = store.commands_in(ids.clone(), false, limit).await?;
            commands.retain(|c| by.is_empty() || c.created_by == *by);
            commands.reverse();
            commands
        }
        CommandsWanted::Recent => store.commands_in(0..=u64::MAX, false, limit).await?,
        CommandsWanted::Waiting => store.commands_in(0..=u64::MAX, true, limit).await?,
    })
}

/// A device's desired state as stored, if one was set.
pub async fn desired_record(fleet: &Fleet, id: &DeviceId) -> Result<Option<crate::store::DesiredRecord>, ServiceError> {
    Ok(fleet.store().desired(id).await?)
}

/// A device's newest commands, newest first, at most `limit`.
pub async fn device_commands(
    fleet: &Fleet,
    id: &DeviceId,
    limit: usize,
) -> Result<Vec<crate::store::CommandRecord>, ServiceError> {
    Ok(fleet.store().newest_device_commands(id, limit).await?)
}

/// The token with hash `hash` if it may be used now as `kind`: not
/// expired, of that kind, and (a console session) its maker still holds.
pub async fn live_token(
    fleet: &Fleet,
    hash: &[u8; 32],
    kind: crate::store::TokenKind,
    now: Timestamp,
) -> Result<Option<ApiToken>, ServiceError> {
    let token = fleet.store().api_token(hash).await?.filter(|t| !t.expired(now) && t.kind == kind);
    let holds = maker_holds(fleet, token.as_ref(), now).await?;
    Ok(token.filter(|_| holds))
}

/// Records a token's use (its `last_used`).
pub async fn token_used(fleet: &Fleet, hash: &[u8; 32], token: &ApiToken) -> Result<(), ServiceError> {
    fleet.store().update_api_token(hash, token).await?;
    Ok(())
}

/// Appends an entry to the audit log.
pub async fn record_audit(fleet: &Fleet, entry: &crate::store::AuditEntry) -> Result<(), ServiceError> {
    fleet.store().append_audit(entry).await?;
    Ok(())
}

/// Ends a console session: its token is taken from the store.
pub async fn sign_out(fleet: &Fleet, session: &[u8; 32]) -> Result<(), ServiceError> {
    fleet.store().take_api_token(session).await?;
    Ok(())
}

/// Checks that a merge patch leaves every device's desired state valid,
/// before any is changed.
pub async fn check_bulk_patch(fleet: &Fleet, ids: &[DeviceId], patch: &serde_json::Value) -> Result<(), ServiceError> {
    if !patch.is_object() {
        return Err(ServiceError::Invalid("a merge patch of a desired state must be a JSON object".into()));
    }
    let mut problems = Vec::new();
    for id in ids {
        let mut doc = match fleet.store().desired(id).await? {
            Some(record) => serde_json::from_str(&record.doc).unwrap_or_else(|_| serde_json::json!({})),
            None => serde_json::json!({}),
        };
        outpost_shared::desired::merge_patch(&mut doc, patch);
        if let Err(e) = check_desired(&doc) {
            problems.push(format!("{id}: {e}"));
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(ServiceError::Invalid(problems.join("; "))) }
}

/// What a command request means: its kind and its lifetime, or what is
/// wrong with it. Pure.
pub fn check_command(request: &CommandRequest) -> Result<(CommandKind, Duration), String> {
    let kind = CommandKind::parse(&request.kind).ok_or_else(|| {
        let known: Vec<&str> = CommandKind::ALL.iter().map(|k| k.as_str()).collect();
        format!("unknown command kind {:?}; known: {known:?}", request.kind)
    })?;
    kind.check_args(&request.args)?;
    let size = request.kind.len() + request.args.iter().map(String::len).sum::<usize>();
    if size > MAX_COMMAND_BYTES {
        return Err(format!("command of {size} bytes exceeds {MAX_COMMAND_BYTES} bytes"));
    }
    let ttl = match &request.expires_in {
        Some(text) => {
            humantime::parse_duration(text).map_err(|e| format!("expires_in: invalid duration {text:?}: {e}"))?
        }
        None => DEFAULT_COMMAND_TTL,
    };
    if ttl < Duration::from_secs(1) || ttl > MAX_COMMAND_TTL {
        return Err("expires_in must be between 1s and 30d".into());
    }
    Ok((kind, ttl))
}

/// Queues a command for `device` on behalf of `by` and wakes its session.
pub async fn send_command(
    fleet: &Fleet,
    by: &str,
    device: &DeviceId,
    request: CommandRequest,
) -> Result<CommandView, ServiceError> {
    let (kind, ttl) = check_command(&request).map_err(ServiceError::Invalid)?;
    let record = fleet
        .store()
        .create_command(NewCommand {
            device: device.clone(),
            kind: kind.as_str().to_owned(),
            args: request.args,
            expires_at: Timestamp::now().saturating_add(ttl),
            created_by: by.to_owned(),
        })
        .await?;
    tracing::info!(device = %device, command = record.id, %kind, by, "Command queued.");
    fleet.changed(device).await;
    Ok(CommandView::from(record))
}

/// Checks a desired-state document with the type the agent applies it with.
pub fn check_desired(doc: &serde_json::Value) -> Result<String, String> {
    let text = doc.to_string();
    DesiredDoc::parse(&text).map_err(|e| format!("desired state refused: {e}"))?;
    Ok(text)
}

/// Replaces `device`'s desired state if it is still at `version`; returns
/// it and what changed, in words.
pub async fn set_desired(
    fleet: &Fleet,
    by: &str,
    device: &DeviceId,
    version: u64,
    doc: &serde_json::Value,
) -> Result<(DesiredView, String), ServiceError> {
    let text = check_desired(doc).map_err(ServiceError::Invalid)?;
    let before = fleet.store().desired(device).await?;
    let record = fleet.store().put_desired(device, version, text).await?;
    tracing::info!(device = %device, version = record.version, by, "Desired state changed.");
    fleet.changed(device).await;
    // The document replaced is the one at `version` (else the store refused).
    let old = before.filter(|b| b.version == version).and_then(|b| serde_json::from_str(&b.doc).ok());
    let change = describe::desired(version, &old.unwrap_or(serde_json::Value::Null), record.version, doc);
    Ok((DesiredView::new(Some(record), fleet.store().reported(device).await?), change))
}

/// Applies a JSON merge patch (RFC 7396) to `device`'s desired state,
/// validated like a whole document, as the next version; retried on a
/// concurrent change, so a patch never undoes another caller's change to
/// keys it does not name. A patch that changes nothing makes no new
/// version.
pub async fn patch_desired(
    fleet: &Fleet,
    by: &str,
    device: &DeviceId,
    patch: &serde_json::Value,
) -> Result<(DesiredView, String), ServiceError> {
    if !patch.is_object() {
        return Err(ServiceError::Invalid("a merge patch of a desired state must be a JSON object".into()));
    }
    let mut attempts = 0;
    loop {
        let current = fleet.store().desired(device).await?;
        let (version, mut doc) = match &current {
            Some(record) => {
                (record.version, serde_json::from_str(&record.doc).unwrap_or_else(|_| serde_json::json!({})))
            }
            None => (0, serde_json::json!({})),
        };
        let before = doc.clone();
        outpost_shared::desired::merge_patch(&mut doc, patch);
        let text = check_desired(&doc).map_err(ServiceError::Invalid)?;
        if current.is_some() && doc == before {
            // Nothing changes: no new version, nothing to deliver.
            let change = describe::desired(version, &before, version, &doc);
            return Ok((DesiredView::new(current, fleet.store().reported(device).await?), change));
        }
        match fleet.store().put_desired(device, version, text).await {
            Ok(record) => {
                tracing::info!(device = %device, version = record.version, by, "Desired state patched.");
                fleet.changed(device).await;
                let change = describe::desired(version, &before, record.version, &doc);
                return Ok((DesiredView::new(Some(record), fleet.store().reported(device).await?), change));
            }
            Err(StoreError::VersionConflict { .. }) if attempts < 5 => attempts += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

/// How long a grant lasts: `text` (e.g. `24h`) or the default.
pub fn grant_length(text: Option<&str>) -> Result<Duration, String> {
    let length = match text {
        Some(text) => humantime::parse_duration(text).map_err(|e| format!("valid_for {text:?}: {e}"))?,
        None => DEFAULT_GRANT,
    };
    if !(Duration::from_secs(60)..=Duration::from_secs(366 * 86400)).contains(&length) {
        return Err(format!("valid_for {}: must be between 1m and 366d", humantime::format_duration(length)));
    }
    Ok(length)
}

/// The re-admission window asked for (`"7d"` when absent).
pub fn readmit_window(text: Option<&str>) -> Result<Duration, String> {
    let within = match text {
        Some(text) => humantime::parse_duration(text).map_err(|e| format!("within {text:?}: {e}"))?,
        None => Duration::from_secs(7 * 86400),
    };
    if !(Duration::from_secs(60)..=Duration::from_secs(90 * 86400)).contains(&within) {
        return Err(format!("within {}: must be between 1m and 90d", humantime::format_duration(within)));
    }
    Ok(within)
}

/// Re-admits device `id` for `within` (see [`crate::service::admission`]); returns
/// the end. Every hub learns it from the store within seconds; this one at
/// once.
pub async fn readmit(fleet: &Fleet, id: &DeviceId, within: Duration) -> Result<Timestamp, ServiceError> {
    let until = Timestamp::now().saturating_add(within);
    let store = fleet.store();
    let mut admission = admission_of(store, id).await?;
    if admission.revoked_at.is_some() {
        return Err(ServiceError::Invalid(format!(
            "{id} is revoked: a revoked device comes back only by enrolling anew"
        )));
    }
    admission.readmit_until = Some(until);
    store.set_admission(id, &admission).await?;
    fleet.admissions().readmit(id, until);
    tracing::info!(device = %id, until = %until.rfc3339(), "Device re-admitted to renew its expired certificate.");
    Ok(until)
}

async fn admission_of(store: &crate::store::Store, id: &DeviceId) -> Result<crate::store::Admission, StoreError> {
    Ok(store.admissions().await?.into_iter().find(|(d, _)| d == id).map(|(_, a)| a).unwrap_or_default())
}

/// Revokes device `id` for good (see [`crate::service::admission`]): refused on
/// every path from now on, its open connections closed; its records and
/// backups stay (a replacement reads them through a grant). Returns when.
pub async fn revoke(fleet: &Fleet, id: &DeviceId) -> Result<Timestamp, StoreError> {
    let store = fleet.store();
    let mut admission = admission_of(store, id).await?;
    let at = *admission.revoked_at.get_or_insert_with(Timestamp::now);
    admission.readmit_until = None;
    store.set_admission(id, &admission).await?;
    fleet.admissions().revoke(id, at);
    tracing::warn!(device = %id, "Device revoked.");
    Ok(at)
}

/// Lets `reader` fetch `owner`'s backups for `valid_for` (a replacement
/// restoring a dead device's data).
pub async fn grant_backups(
    fleet: &Fleet,
    by: &str,
    owner: &DeviceId,
    reader: &DeviceId,
    valid_for: Duration,
) -> Result<GrantView, ServiceError> {
    let (backups, by_owned, r, o) = (fleet.backups().clone(), by.to_owned(), reader.clone(), owner.clone());
    let grant = tokio::task::spawn_blocking(move || backups.grant(&r, &o, valid_for, &by_owned))
        .await
        .map_err(|e| ServiceError::Store(StoreError::Unavailable(e.to_string())))?
        .map_err(|e| match e {
            crate::service::backups::BackupStoreError::Store(e) => ServiceError::from(e),
            other => ServiceError::Invalid(other.to_string()),
        })?;
    tracing::info!(%owner, %reader, by, expires_at = %grant.expires_at.rfc3339(), "Restore grant made.");
    Ok(GrantView {
        owner: owner.to_string(),
        reader: reader.to_string(),
        expires_at: grant.expires_at.rfc3339(),
        by: grant.by,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_usable_admin_api_token_is_the_one_that_cannot_go() {
        let now = Timestamp(1_000);
        let token = |role, kind, expires_at| ApiToken {
            role,
            name: "t".into(),
            created_at: Timestamp(0),
            expires_at,
            last_used: None,
            kind,
            made_by: None,
        };
        let admin = token(Role::Admin, TokenKind::Api, None);
        let tokens = |others: Vec<ApiToken>| {
            let mut all = vec![([0; 32], admin.clone())];
            all.extend(others.into_iter().enumerate().map(|(i, t)| ([i as u8 + 1; 32], t)));
            all
        };
        assert!(last_admin(&tokens(vec![]), &[0; 32], &admin, now));
        // Other admins that do not count: expired, a console session, a link.
        let useless = vec![
            token(Role::Admin, TokenKind::Api, Some(Timestamp(500))),
            token(Role::Admin, TokenKind::ConsoleSession, None),
            token(Role::Admin, TokenKind::SignInLink, None),
            token(Role::Operator, TokenKind::Api, None),
        ];
        assert!(last_admin(&tokens(useless), &[0; 32], &admin, now));
        assert!(!last_admin(&tokens(vec![admin.clone()]), &[0; 32], &admin, now));
        // Revoking a non-admin token is never refused for this.
        let viewer = token(Role::Viewer, TokenKind::Api, None);
        assert!(!last_admin(&tokens(vec![viewer.clone()]), &[1; 32], &viewer, now));
    }

    fn request(kind: &str, args: &[&str], expires_in: Option<&str>) -> CommandRequest {
        CommandRequest {
            kind: kind.into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            expires_in: expires_in.map(str::to_owned),
        }
    }

    #[test]
    fn commands_are_checked_before_they_are_queued() {
        assert_eq!(check_command(&request("echo", &["hi"], None)).unwrap(), (CommandKind::Echo, DEFAULT_COMMAND_TTL));
        assert_eq!(check_command(&request("run_job", &["tick"], Some("5m"))).unwrap().1, Duration::from_secs(300));
        let refused = [
            (request("reboot", &[], None), "unknown command kind"),
            (request("run_job", &[], None), "one argument"),
            (request("run_job", &["a", "b"], None), "one argument"),
            (request("exec", &[], None), "program"),
            (request("echo", &[], Some("0s")), "between 1s and 30d"),
            (request("echo", &[], Some("1ms")), "between 1s and 30d"),
            (request("echo", &[], Some("999ms")), "between 1s and 30d"),
            (request("echo", &[], Some("31d")), "between 1s and 30d"),
            (request("echo", &[], Some("soon")), "invalid duration"),
        ];
        for (req, why) in refused {
            let err = check_command(&req).unwrap_err();
            assert!(err.contains(why), "{req:?}: {err}");
        }
        let big = "x".repeat(MAX_COMMAND_BYTES);
        assert!(check_command(&request("echo", &[&big], None)).unwrap_err().contains("exceeds"));
    }

    #[test]
    fn grants_and_token_names_are_bounded() {
        assert_eq!(grant_length(None).unwrap(), DEFAULT_GRANT);
        assert_eq!(grant_length(Some("1h")).unwrap(), Duration::from_secs(3600));
        for bad in ["0s", "59s", "367d"] {
            assert!(grant_length(Some(bad)).unwrap_err().contains("between 1m and 366d"), "{bad}");
        }
        let err = check_token("tok-1234", "viewer", "1h", MAX_TOKEN_LIFE).unwrap_err();
        assert!(err.contains("tok-"), "{err}");
        assert!(check_token("token-ci", "viewer", "1h", MAX_TOKEN_LIFE).is_ok());
    }

    #[test]
    fn token_requests_need_a_name_a_role_and_a_bounded_life() {
        assert_eq!(
            check_token("ci", "operator", "30d", MAX_TOKEN_LIFE).unwrap(),
            (Role::Operator, Duration::from_secs(30 * 86400))
        );
        let err = check_token("", "root", "10y", MAX_TOKEN_LIFE).unwrap_err();
        assert!(
            err.contains("name") && err.contains("role") && err.contains("expires_in"),
            "every problem named: {err}"
        );
        assert!(check_token("x", "viewer", "2d", MAX_LINK_LIFE).is_err());
        assert!(new_secret().starts_with("opt_") && new_secret() != new_secret());
    }

    #[test]
    fn a_console_session_is_named_for_its_maker_and_never_outlives_its_token() {
        let name = session_name("ops-alice");
        assert!(name.starts_with("ops-alice (console ") && name.ends_with(')'), "{name}");
        assert_ne!(session_name("x"), session_name("x"), "sessions are told apart");
        let long = session_name(&"é".repeat(64));
        assert!(long.len() <= 64 && long.contains('…'), "{long}");
        let now = Timestamp(1_000_000);
        assert_eq!(session_life(now, None), CONSOLE_SESSION);
        assert_eq!(session_life(now, Some(Timestamp(1_060_000))), Duration::from_secs(60));
        assert_eq!(session_life(now, Some(Timestamp(u64::MAX))), CONSOLE_SESSION);
        assert_eq!(session_life(now, Some(Timestamp(5))), Duration::ZERO);
    }

    #[test]
    fn a_session_holds_while_the_token_that_made_it_does() {
        let now = Timestamp(1_000);
        let token = |kind, expires_at, made_by| ApiToken {
            role: Role::Operator,
            name: "t".into(),
            created_at: Timestamp(0),
            expires_at,
            last_used: None,
            kind,
            made_by,
        };
        let maker = token(TokenKind::Api, None, None);
        let by = |hash| Some(MadeBy { name: "t".into(), token: hash });
        let session = token(TokenKind::ConsoleSession, None, by(Some([1; 32])));
        assert!(session.maker_holds(Some(&([1; 32], maker.clone())), now));
        assert!(!session.maker_holds(None, now), "its token was revoked");
        assert!(!session.maker_holds(Some(&([2; 32], maker.clone())), now), "another token");
        let expired = token(TokenKind::Api, Some(Timestamp(999)), None);
        assert!(!session.maker_holds(Some(&([1; 32], expired)), now), "its token expired");
        let other_session = token(TokenKind::ConsoleSession, None, None);
        assert!(!session.maker_holds(Some(&([1; 32], other_session)), now), "only an API token makes sessions");
        assert!(token(TokenKind::ConsoleSession, None, by(None)).maker_holds(None, now), "made on the hub machine");
        assert!(maker.maker_holds(None, now), "an API token stands on its own");
    }

    #[test]
    fn tokens_stored_before_sessions_knew_their_maker_still_read() {
        let old = crate::store::TokenV2 {
            role: Role::Viewer,
            name: "console ab12cd34".into(),
            created_at: Timestamp(1),
            expires_at: Some(Timestamp(2)),
            last_used: Some((Timestamp(2), "10.0.0.1".into())),
            kind: TokenKind::ConsoleSession,
        };
        let read = ApiToken::decode(&postcard::to_stdvec(&old).unwrap()).unwrap();
        assert_eq!(
            (read.name.as_str(), read.kind, &read.made_by),
            ("console ab12cd34", TokenKind::ConsoleSession, &None)
        );
        assert_eq!(
            (read.expires_at, read.last_used.as_ref().map(|u| u.1.as_str())),
            (Some(Timestamp(2)), Some("10.0.0.1"))
        );
        let now = ApiToken { made_by: Some(MadeBy { name: "ops".into(), token: None }), ..read };
        assert_eq!(ApiToken::decode(&postcard::to_stdvec(&now).unwrap()).unwrap(), now);
    }

    #[test]
    fn links_and_sessions_go_at_expiry_api_tokens_a_month_later() {
        let t = |kind, expires: Option<u64>| ApiToken {
            role: Role::Viewer,
            name: "t".into(),
            created_at: Timestamp(0),
            expires_at: expires.map(Timestamp),
            last_used: None,
            kind,
            made_by: None,
        };
        let day = 86_400_000;
        assert!(t(TokenKind::SignInLink, Some(10)).to_drop(Timestamp(10)));
        assert!(!t(TokenKind::ConsoleSession, Some(10)).to_drop(Timestamp(9)));
        assert!(t(TokenKind::ConsoleSession, Some(10)).to_drop(Timestamp(11)));
        assert!(!t(TokenKind::Api, Some(10)).to_drop(Timestamp(10 + 29 * day)), "listed as expired for a while");
        assert!(t(TokenKind::Api, Some(10)).to_drop(Timestamp(10 + 30 * day)));
        assert!(!t(TokenKind::Api, None).to_drop(Timestamp(u64::MAX)), "the initial admin token never expires");
    }

    #[test]
    fn desired_documents_are_checked_with_the_agents_type() {
        assert!(check_desired(&serde_json::json!({"telemetry_interval": "5s"})).is_ok());
        assert!(check_desired(&serde_json::json!({"colour": "blue"})).unwrap_err().contains("refused"));
        assert_eq!(grant_length(None).unwrap(), DEFAULT_GRANT);
        assert!(grant_length(Some("forever")).is_err());
    }
}
