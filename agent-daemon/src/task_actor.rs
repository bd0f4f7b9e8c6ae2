//! An actor that owns one long-running task: the task is spawned on the
//! runtime when the actor starts, tracked by the agent's task tracker, and
//! cancelled when the agent shuts down or the actor goes away (even after a
//! panic, through a drop guard). If the task ends on its own (an error it
//! cannot handle), the actor stops, and the supervisor restarts both.

use actix::prelude::*;
use std::future::Future;
use std::pin::Pin;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

type TaskFactory = Box<dyn Fn(CancellationToken) -> Pin<Box<dyn Future<Output = ()> + Send>>>;

/// Owner of one task.
pub struct TaskActor {
    name: &'static str,
    factory: TaskFactory,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    guard: Option<DropGuard>,
}

impl std::fmt::Debug for TaskActor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskActor").field("name", &self.name).finish()
    }
}

impl TaskActor {
    /// An actor running `task(cancel)`; `cancel` fires on `shutdown` or when
    /// the actor is dropped.
    pub fn new<F, Fut>(name: &'static str, tasks: TaskTracker, shutdown: CancellationToken, task: F) -> Self
    where
        F: Fn(CancellationToken) -> Fut + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        TaskActor { name, factory: Box::new(move |c| Box::pin(task(c))), tasks, shutdown, guard: None }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct TaskEnded;

impl Actor for TaskActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let token = self.shutdown.child_token();
        let task = (self.factory)(token.clone());
        let me = ctx.address();
        let name = self.name;
        let watch = token.clone();
        self.tasks.spawn(async move {
            task.await;
            if !watch.is_cancelled() {
                tracing::warn!(task = name, "Task ended by itself.");
                me.do_send(TaskEnded);
            }
        });
        self.guard = Some(token.drop_guard());
    }
}

impl Handler<TaskEnded> for TaskActor {
    type Result = ();
    fn handle(&mut self, _: TaskEnded, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
