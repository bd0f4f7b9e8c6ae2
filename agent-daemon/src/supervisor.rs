//! The supervisor: starts each actor, learns from the actor itself when it
//! has stopped (or panicked), and restarts it after a backoff that grows
//! while it keeps failing and resets once it has run for a minute.
//!
//! Each child is started with a guard spawned into its own context; the
//! context drops it when the actor stops, and so does the unwinding of a
//! panic, so the supervisor hears of every end without polling.
//!
//! It also speaks to systemd: `WATCHDOG=1` only while every child is alive
//! and none is wedged (every `WatchdogSec`/2), and `STATUS=` when it
//! changes: at once when the caller's signal (the uplink's state) changes,
//! else at most every 30 s. Under a watchdog each child's context beats
//! every `WatchdogSec`/4 (an interval in the actor's own context, which a
//! wedged actor — blocked in a handler, or held by a future it waits on —
//! does not run); a child silent for `WatchdogSec`/2 is wedged: the pings
//! stop, so systemd restarts the agent, and STATUS names the child. Without
//! a watchdog nothing beats (an idle agent sleeps).
//!
//! `OUTPOST_TEST_WEDGE=<child>` wedges that child's context a second after
//! it starts: a test-only switch, to prove the above.

use crate::backoff::Backoff;
use actix::prelude::*;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Longest time between two looks at the status line, when nothing signals
/// a change (the backlog counts in it change without a signal).
const STATUS_EVERY: Duration = Duration::from_secs(30);
/// A child that ran this long is considered healthy again.
const STABLE_AFTER: Duration = Duration::from_secs(60);

type Factory = Box<dyn Fn(Addr<SupervisorActor>, usize, u64, Option<Beat>)>;

/// A child's sign of life: when its context last ran its beat, and how
/// often it beats.
#[derive(Clone)]
struct Beat {
    last: std::sync::Arc<std::sync::Mutex<Instant>>,
    every: Duration,
}

impl Beat {
    fn new(every: Duration) -> Self {
        Beat { last: std::sync::Arc::new(std::sync::Mutex::new(Instant::now())), every }
    }

    fn now(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn silent_for(&self) -> Duration {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
    }
}

/// The children silent for longer than `limit`, by name, with how long.
/// Pure.
pub fn wedged<'a>(silences: impl Iterator<Item = (&'a str, Duration)>, limit: Duration) -> Vec<(&'a str, Duration)> {
    silences.filter(|(_, silent)| *silent > limit).collect()
}

struct ChildSlot {
    name: &'static str,
    start: Factory,
    /// Its sign of life, under a watchdog.
    beat: Option<Beat>,
    /// When the running instance started; `None` while waiting to restart.
    running: Option<Instant>,
    /// Counts starts, so the end of an instance already replaced is ignored.
    generation: u64,
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

type StatusSource = Box<dyn Fn() -> String>;
/// Sends [`StatusChanged`] each time the caller's signal changes.
type StatusWatch = Box<dyn FnOnce(Addr<SupervisorActor>) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>>;

/// Supervises the agent's actors.
pub struct SupervisorActor {
    children: Vec<ChildSlot>,
    policy: RestartPolicy,
    status: Option<StatusSource>,
    status_watch: Option<StatusWatch>,
    last_status: String,
    watchdog: Option<Duration>,
}

impl std::fmt::Debug for SupervisorActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.children.iter().map(|c| c.name).collect();
        f.debug_struct("SupervisorActor").field("children", &names).finish()
    }
}

/// Tells the supervisor that a child's instance has ended, when dropped.
struct EndGuard {
    supervisor: Addr<SupervisorActor>,
    index: usize,
    generation: u64,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.supervisor.do_send(Ended { index: self.index, generation: self.generation });
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Ended {
    index: usize,
    generation: u64,
}

impl SupervisorActor {
    /// A supervisor with no children yet.
    pub fn new(policy: RestartPolicy) -> Self {
        SupervisorActor {
            children: Vec::new(),
            policy,
            status: None,
            status_watch: None,
            last_status: String::new(),
            watchdog: sd_notify::watchdog_enabled(),
        }
    }

    /// Watches its children as under a systemd watchdog of `every` (what
    /// `WATCHDOG_USEC` says, when set); before any child is added.
    pub fn watchdog(mut self, every: Option<Duration>) -> Self {
        self.watchdog = every;
        self
    }

    /// Adds a child: `make` builds a fresh actor for each (re)start.
    pub fn child<A, F>(mut self, name: &'static str, make: F) -> Self
    where
        A: Actor<Context = Context<A>>,
        F: Fn() -> A + 'static,
    {
        let wedge = std::env::var("OUTPOST_TEST_WEDGE").is_ok_and(|w| w == name);
        let beat = self.watchdog.map(|w| Beat::new(w / 4));
        self.children.push(ChildSlot {
            name,
            start: Box::new(move |supervisor, index, generation, beat| {
                let actor = make();
                A::create(move |ctx| {
                    let guard = EndGuard { supervisor, index, generation };
                    // Never completes: dropped with the context, whether the
                    // actor stopped or its task unwound from a panic.
                    ctx.spawn(actix::fut::wrap_future(async move {
                        let _guard = guard;
                        std::future::pending::<()>().await;
                    }));
                    if let Some(beat) = beat {
                        beat.now();
                        let every = beat.every;
                        ctx.run_interval(every, move |_, _| beat.now());
                    }
                    if wedge {
                        ctx.run_later(Duration::from_secs(1), |_, ctx| {
                            tracing::warn!("Wedging this actor (OUTPOST_TEST_WEDGE).");
                            ctx.wait(actix::fut::wrap_future(std::future::pending::<()>()));
                        });
                    }
                    actor
                });
            }),
            beat,
            running: None,
            generation: 0,
            backoff: Backoff::new(self.policy.initial, self.policy.max),
            restarts: 0,
        });
        self
    }

    /// Reports what `status` says in systemd `STATUS=` lines, when it
    /// changes: looked at whenever `changed` signals, and every 30 s.
    pub fn status_from<T: 'static>(
        mut self,
        mut changed: watch::Receiver<T>,
        status: impl Fn() -> String + 'static,
    ) -> Self {
        self.status = Some(Box::new(status));
        self.status_watch = Some(Box::new(move |me| {
            Box::pin(async move {
                while changed.changed().await.is_ok() {
                    me.do_send(StatusChanged);
                }
            })
        }));
        self
    }

    fn start_child(&mut self, index: usize, ctx: &mut Context<Self>) {
        let slot = &mut self.children[index];
        slot.generation += 1;
        slot.running = Some(Instant::now());
        if let Some(beat) = &slot.beat {
            beat.now();
        }
        (slot.start)(ctx.address(), index, slot.generation, slot.beat.clone());
        tracing::debug!(actor = slot.name, "Actor started.");
    }

    fn ended(&mut self, index: usize, generation: u64, ctx: &mut Context<Self>) {
        let Some(slot) = self.children.get_mut(index) else { return };
        let Some(since) = slot.running.filter(|_| slot.generation == generation) else { return };
        if since.elapsed() >= STABLE_AFTER {
            slot.backoff.reset();
        }
        let delay = slot.backoff.next_delay();
        slot.restarts += 1;
        slot.running = None;
        tracing::error!(
            actor = slot.name,
            restarts = slot.restarts,
            delay_ms = outpost_shared::time::millis(delay),
            "Actor stopped; restarting."
        );
        ctx.run_later(delay, move |act, ctx| act.start_child(index, ctx));
    }

    fn all_alive(&self) -> bool {
        self.children.iter().all(|c| c.running.is_some())
    }

    /// The running children that have not beaten for half the watchdog.
    fn wedged(&self) -> Vec<(&'static str, Duration)> {
        let Some(watchdog) = self.watchdog else { return Vec::new() };
        let silences = self
            .children
            .iter()
            .filter(|c| c.running.is_some())
            .filter_map(|c| Some((c.name, c.beat.as_ref()?.silent_for())));
        wedged(silences, watchdog / 2)
    }

    /// The periodic look: the watchdog ping (only while every child is
    /// alive and none is wedged) and the status line.
    fn tick(&mut self) {
        let wedged = self.wedged();
        for (name, silent) in &wedged {
            tracing::error!(
                actor = name,
                silent_ms = outpost_shared::time::millis(*silent),
                "Actor wedged; watchdog pings stop."
            );
        }
        if self.watchdog.is_some() && self.all_alive() && wedged.is_empty() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
        self.report_status();
    }

    fn report_status(&mut self) {
        if let Some(status) = &self.status {
            let mut text = status();
            for (name, silent) in self.wedged() {
                text.push_str(&format!("; WEDGED actor {name}: no sign of life for {} s", silent.as_secs()));
            }
            if text != self.last_status {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&text)]);
                self.last_status = text;
            }
        }
    }
}

impl Actor for SupervisorActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        for index in 0..self.children.len() {
            self.start_child(index, ctx);
        }
        self.report_status();
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        // systemd wants a ping within WatchdogSec; every half of it leaves room.
        let every = self.watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
        ctx.run_interval(every, |act, _| act.tick());
        if let Some(watch) = self.status_watch.take() {
            ctx.spawn(actix::fut::wrap_future(watch(ctx.address())));
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct StatusChanged;

impl Handler<StatusChanged> for SupervisorActor {
    type Result = ();

    fn handle(&mut self, _: StatusChanged, _: &mut Self::Context) {
        self.report_status();
    }
}

impl Handler<Ended> for SupervisorActor {
    type Result = ();

    fn handle(&mut self, msg: Ended, ctx: &mut Self::Context) {
        self.ended(msg.index, msg.generation, ctx);
    }
}

/// Restart counts per child, for status displays and tests.
#[derive(Message)]
#[rtype(result = "Vec<(&'static str, bool, u32)>")]
pub struct ChildStatus;

impl Handler<ChildStatus> for SupervisorActor {
    type Result = MessageResult<ChildStatus>;

    fn handle(&mut self, _: ChildStatus, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.children.iter().map(|c| (c.name, c.running.is_some(), c.restarts)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Fragile {
        starts: Arc<AtomicU32>,
        current: Arc<std::sync::Mutex<Option<Addr<Fragile>>>>,
    }

    impl Actor for Fragile {
        type Context = Context<Self>;
        fn started(&mut self, ctx: &mut Self::Context) {
            *self.current.lock().unwrap() = Some(ctx.address());
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
            .child("fragile", move || Fragile { starts: s.clone(), current: c.clone() })
            .start();
        wait_for("first start", || starts.load(Ordering::SeqCst) == 1).await;

        current.lock().unwrap().as_ref().unwrap().do_send(Explode);
        wait_for("restart after a panic", || starts.load(Ordering::SeqCst) == 2).await;

        current.lock().unwrap().as_ref().unwrap().do_send(Quit);
        wait_for("restart after a stop", || starts.load(Ordering::SeqCst) == 3).await;

        let status = sup.send(ChildStatus).await.unwrap();
        assert_eq!(status, vec![("fragile", true, 2)]);
    }

    #[derive(Message)]
    #[rtype(result = "()")]
    struct Wedge;

    impl Handler<Wedge> for Fragile {
        type Result = ();
        fn handle(&mut self, _: Wedge, ctx: &mut Self::Context) {
            ctx.wait(actix::fut::wrap_future(std::future::pending::<()>()));
        }
    }

    #[derive(Message)]
    #[rtype(result = "Vec<&'static str>")]
    struct WhoIsWedged;

    impl Handler<WhoIsWedged> for SupervisorActor {
        type Result = MessageResult<WhoIsWedged>;
        fn handle(&mut self, _: WhoIsWedged, _: &mut Self::Context) -> Self::Result {
            MessageResult(self.wedged().into_iter().map(|(name, _)| name).collect())
        }
    }

    #[actix_rt::test]
    async fn a_wedged_actor_is_named_and_a_live_one_is_not() {
        let starts = Arc::new(AtomicU32::new(0));
        let current: Arc<std::sync::Mutex<Option<Addr<Fragile>>>> = Arc::default();
        let (s, c) = (starts.clone(), current.clone());
        let sup = SupervisorActor::new(RestartPolicy::default())
            .watchdog(Some(Duration::from_millis(400)))
            .child("fragile", move || Fragile { starts: s.clone(), current: c.clone() })
            .start();
        wait_for("the start", || starts.load(Ordering::SeqCst) == 1).await;
        // Alive and beating: not wedged, however long one waits.
        actix_rt::time::sleep(Duration::from_millis(500)).await;
        assert!(sup.send(WhoIsWedged).await.unwrap().is_empty());
        current.lock().unwrap().as_ref().unwrap().do_send(Wedge);
        let deadline = Instant::now() + Duration::from_secs(10);
        while sup.send(WhoIsWedged).await.unwrap() != ["fragile"] {
            assert!(Instant::now() < deadline, "the wedged actor was not named");
            actix_rt::time::sleep(Duration::from_millis(20)).await;
        }
        let silences = [("a", Duration::from_secs(1)), ("b", Duration::from_secs(3))];
        assert_eq!(wedged(silences.into_iter(), Duration::from_secs(2)), [("b", Duration::from_secs(3))]);
    }

    #[actix_rt::test]
    async fn looks_at_the_status_when_signalled_not_on_a_clock() {
        let looks = Arc::new(AtomicU32::new(0));
        let (tx, rx) = watch::channel(0u32);
        let l = looks.clone();
        let _sup = SupervisorActor::new(RestartPolicy::default())
            .status_from(rx, move || format!("look {}", l.fetch_add(1, Ordering::SeqCst)))
            .start();
        wait_for("the first look", || looks.load(Ordering::SeqCst) == 1).await;
        for n in 1..=3 {
            tx.send_replace(n);
            wait_for("a look after a signal", || looks.load(Ordering::SeqCst) == n + 1).await;
        }
    }
}
