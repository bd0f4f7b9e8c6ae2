//! The supervisor: starts each actor, notices when one has stopped (or
//! panicked: its mailbox is then gone), and restarts it after a backoff that
//! grows while it keeps failing and resets once it has run for a minute.
//!
//! It also speaks to systemd: `WATCHDOG=1` only while every child is alive,
//! and `STATUS=` with the uplink's state.

use crate::backoff::Backoff;
use actix::prelude::*;
use std::time::{Duration, Instant};

/// How often children are checked.
const TICK: Duration = Duration::from_millis(200);
/// Least time between two `STATUS=` lines.
const STATUS_EVERY: Duration = Duration::from_secs(2);
/// A child that ran this long is considered healthy again.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// A running child, as the supervisor sees it.
pub trait Child {
    /// False once the actor has stopped or panicked.
    fn alive(&self) -> bool;
}

impl<A: Actor<Context = Context<A>>> Child for Addr<A> {
    fn alive(&self) -> bool {
        self.connected()
    }
}

type Factory = Box<dyn Fn() -> Box<dyn Child>>;

struct ChildSlot {
    name: &'static str,
    start: Factory,
    running: Option<(Box<dyn Child>, Instant)>,
    next_start: Instant,
    backoff: Backoff,
    restarts: u32,
}

/// Restart backoff of children.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// First restart delay.
    pub initial: Duration,
    /// Longest restart delay.
    pub max: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(30) }
    }
}

/// Supervises the agent's actors.
pub struct SupervisorActor {
    children: Vec<ChildSlot>,
    policy: RestartPolicy,
    status: Option<Box<dyn Fn() -> String>>,
    last_status: (String, Option<Instant>),
    watchdog: bool,
}

impl std::fmt::Debug for SupervisorActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.children.iter().map(|c| c.name).collect();
        f.debug_struct("SupervisorActor").field("children", &names).finish()
    }
}

impl SupervisorActor {
    /// A supervisor with no children yet.
    pub fn new(policy: RestartPolicy) -> Self {
        let watchdog = sd_notify::watchdog_enabled().is_some();
        SupervisorActor { children: Vec::new(), policy, status: None, last_status: (String::new(), None), watchdog }
    }

    /// Adds a child started (and restarted) by `start`.
    pub fn child<A, F>(mut self, name: &'static str, start: F) -> Self
    where
        A: Actor<Context = Context<A>>,
        F: Fn() -> Addr<A> + 'static,
    {
        self.children.push(ChildSlot {
            name,
            start: Box::new(move || Box::new(start())),
            running: None,
            next_start: Instant::now(),
            backoff: Backoff::new(self.policy.initial, self.policy.max),
            restarts: 0,
        });
        self
    }

    /// Reports what `status` says in systemd `STATUS=` lines, when it
    /// changes (at most every 2 s, so a busy device does not flood systemd).
    pub fn status_from(mut self, status: impl Fn() -> String + 'static) -> Self {
        self.status = Some(Box::new(status));
        self
    }

    fn tick(&mut self) {
        let now = Instant::now();
        for slot in &mut self.children {
            match &slot.running {
                Some((child, since)) if !child.alive() => {
                    if since.elapsed() >= STABLE_AFTER {
                        slot.backoff.reset();
                    }
                    let delay = slot.backoff.next_delay();
                    slot.restarts += 1;
                    tracing::error!(
                        actor = slot.name,
                        restarts = slot.restarts,
                        delay_ms = outpost_shared::time::millis(delay),
                        "Actor stopped; restarting."
                    );
                    slot.running = None;
                    slot.next_start = now + delay;
                }
                Some(_) => {}
                None if now >= slot.next_start => {
                    slot.running = Some(((slot.start)(), now));
                    tracing::debug!(actor = slot.name, "Actor started.");
                }
                None => {}
            }
        }
        let all_alive = self.children.iter().all(|c| c.running.as_ref().is_some_and(|(child, _)| child.alive()));
        if self.watchdog && all_alive {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
        if let Some(status) = &self.status {
            let text = status();
            let (last, when) = &self.last_status;
            if &text != last && when.is_none_or(|w| w.elapsed() >= STATUS_EVERY) {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&text)]);
                self.last_status = (text, Some(Instant::now()));
            }
        }
    }
}

impl Actor for SupervisorActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.tick();
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        ctx.run_interval(TICK, |act, _| act.tick());
    }
}

/// Restart counts per child, for status displays and tests.
#[derive(Message)]
#[rtype(result = "Vec<(&'static str, bool, u32)>")]
pub struct ChildStatus;

impl Handler<ChildStatus> for SupervisorActor {
    type Result = MessageResult<ChildStatus>;

    fn handle(&mut self, _: ChildStatus, _: &mut Self::Context) -> Self::Result {
        MessageResult(
            self.children
                .iter()
                .map(|c| (c.name, c.running.as_ref().is_some_and(|(child, _)| child.alive()), c.restarts))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Fragile {
        starts: Arc<AtomicU32>,
    }

    impl Actor for Fragile {
        type Context = Context<Self>;
        fn started(&mut self, _: &mut Self::Context) {
            self.starts.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct Explode;

    impl Handler<Explode> for Fragile {
        type Result = ();
        fn handle(&mut self, _: Explode, _: &mut Self::Context) {
            panic!("deliberate test panic");
        }
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct Quit;

    impl Handler<Quit> for Fragile {
        type Result = ();
        fn handle(&mut self, _: Quit, ctx: &mut Self::Context) {
            ctx.stop();
        }
    }

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[actix_rt::test]
    async fn restarts_an_actor_that_panicked_or_stopped() {
        let starts = Arc::new(AtomicU32::new(0));
        let current: Arc<std::sync::Mutex<Option<Addr<Fragile>>>> = Arc::default();
        let (s, c) = (starts.clone(), current.clone());
        let policy = RestartPolicy { initial: Duration::from_millis(10), max: Duration::from_millis(50) };
        let sup = SupervisorActor::new(policy)
            .child("fragile", move || {
                let addr = Fragile { starts: s.clone() }.start();
                *c.lock().unwrap() = Some(addr.clone());
                addr
            })
            .start();
        wait_for("first start", || starts.load(Ordering::SeqCst) == 1).await;

        current.lock().unwrap().as_ref().unwrap().do_send(Explode);
        wait_for("restart after a panic", || starts.load(Ordering::SeqCst) == 2).await;

        current.lock().unwrap().as_ref().unwrap().do_send(Quit);
        wait_for("restart after a stop", || starts.load(Ordering::SeqCst) == 3).await;

        let status = sup.send(ChildStatus).await.unwrap();
        assert_eq!(status, vec![("fragile", true, 2)]);
    }
}
