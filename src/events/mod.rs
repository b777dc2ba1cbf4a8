//! Events: every change of state that a page shows (an evaluation starts or
//! ends, a build is queued or finishes, a step starts on a machine) is
//! announced here, in process, to whoever listens: the web UI's
//! `/api/events` stream today. Nothing is stored; a listener that falls
//! behind is told so and reloads what it shows. The durable GitHub outbox is
//! separate, because a lost status there is a bug and a lost event here is not.
//! On PostgreSQL, [`relay`] carries them between Kiln processes (LISTEN/NOTIFY),
//! so a web node's live pages and memos follow what another node does.

pub mod relay;

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// What happened. `jobset` is the jobset's id, so a page can pick what concerns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    EvalStarted {
        eval: i64,
        jobset: i64,
    },
    EvalFinished {
        eval: i64,
        jobset: i64,
        error: Option<String>,
    },
    BuildQueued {
        build: i64,
        jobset: Option<i64>,
    },
    StepStarted {
        step: i64,
        drv: String,
        machine: String,
        builds: Vec<i64>,
    },
    BuildFinished {
        build: i64,
        jobset: Option<i64>,
        buildstatus: i64,
    },
    /// A deployment or one of its hosts changed (status, log, checks).
    DeploymentChanged {
        deployment: i64,
    },
}

impl Event {
    /// The name of the event in the stream (`event:` in server-sent events).
    pub fn name(&self) -> &'static str {
        match self {
            Event::EvalStarted { .. } => "eval_started",
            Event::EvalFinished { .. } => "eval_finished",
            Event::BuildQueued { .. } => "build_queued",
            Event::StepStarted { .. } => "step_started",
            Event::BuildFinished { .. } => "build_finished",
            Event::DeploymentChanged { .. } => "deployment_changed",
        }
    }

    /// Whether the event concerns a build, an evaluation or a jobset (by id).
    pub fn concerns(&self, build: Option<i64>, eval: Option<i64>, jobset: Option<i64>) -> bool {
        let (b, e, j): (&[i64], Option<i64>, Option<i64>) = match self {
            Event::EvalStarted { eval, jobset } | Event::EvalFinished { eval, jobset, .. } => {
                (&[], Some(*eval), Some(*jobset))
            }
            Event::BuildQueued { build, jobset } | Event::BuildFinished { build, jobset, .. } => {
                (std::slice::from_ref(build), None, *jobset)
            }
            Event::StepStarted { builds, .. } => (builds.as_slice(), None, None),
            // Deployment pages follow every stream of their own kind.
            Event::DeploymentChanged { .. } => (&[], None, None),
        };
        build.is_some_and(|x| b.contains(&x)) || (eval.is_some() && eval == e) || (jobset.is_some() && jobset == j)
    }
}

/// The announcer; cheap to clone.
#[derive(Clone, Debug)]
pub struct Events {
    tx: broadcast::Sender<Event>,
    /// Set when the server stops, so open streams end and do not hold up
    /// the graceful shutdown.
    closed: tokio::sync::watch::Sender<bool>,
    /// Where events also go for other processes (see [`relay`]).
    relay: Arc<OnceLock<tokio::sync::mpsc::UnboundedSender<Event>>>,
    /// The events other processes announced, for the queue: it acts on
    /// what another node did (a build recorded, bumped, restarted or
    /// cancelled there), never on its own announcements.
    remote: broadcast::Sender<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

impl Events {
    pub fn new() -> Events {
        // Enough for a burst of cached builds finishing at once; a listener
        // further behind is told it lagged.
        let (tx, _) = broadcast::channel(4096);
        let (remote, _) = broadcast::channel(4096);
        Events { tx, closed: tokio::sync::watch::Sender::new(false), relay: Default::default(), remote }
    }

    /// Announces `ev` here and, with a relay, to the other processes.
    pub fn send(&self, ev: Event) {
        if let Some(r) = self.relay.get() {
            let _ = r.send(ev.clone());
        }
        self.send_local(ev);
    }

    /// Announces `ev` in this process only (one another process relayed).
    pub fn send_local(&self, ev: Event) {
        // No listener is not an error.
        let _ = self.tx.send(ev);
    }

    /// Announces, in this process, an event another process sent.
    pub fn send_remote(&self, ev: Event) {
        let _ = self.remote.send(ev.clone());
        self.send_local(ev);
    }

    /// The events other processes announced (see [`Events::send_remote`]).
    pub fn subscribe_remote(&self) -> broadcast::Receiver<Event> {
        self.remote.subscribe()
    }

    pub fn deployment_changed(&self, deployment: i64) {
        self.send(Event::DeploymentChanged { deployment });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// Ends every open stream: the server is stopping.
    /// Whether Kiln is shutting down.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Resolves once [`Events::close`] is called.
    pub fn closing(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.closed.subscribe();
        async move {
            let _ = rx.wait_for(|c| *c).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialises_with_a_type_tag() {
        let e = Event::BuildFinished { build: 7, jobset: Some(2), buildstatus: 1 };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v, serde_json::json!({"type": "build_finished", "build": 7, "jobset": 2, "buildstatus": 1}));
        assert_eq!(e.name(), "build_finished");
    }

    #[test]
    fn picks_what_concerns_a_page() {
        let step =
            Event::StepStarted { step: 1, drv: "/nix/store/x.drv".into(), machine: "m".into(), builds: vec![3, 4] };
        assert!(step.concerns(Some(4), None, None));
        assert!(!step.concerns(Some(5), None, Some(1)));
        let ev = Event::EvalFinished { eval: 9, jobset: 2, error: None };
        assert!(ev.concerns(None, Some(9), None));
        assert!(ev.concerns(None, None, Some(2)));
        assert!(!ev.concerns(Some(9), None, Some(3)));
    }

    #[tokio::test]
    async fn listeners_receive_in_order() {
        let events = Events::new();
        let mut rx = events.subscribe();
        events.send(Event::BuildQueued { build: 1, jobset: None });
        events.send(Event::BuildFinished { build: 1, jobset: None, buildstatus: 0 });
        assert_eq!(rx.recv().await.unwrap().name(), "build_queued");
        assert_eq!(rx.recv().await.unwrap(), Event::BuildFinished { build: 1, jobset: None, buildstatus: 0 });
    }
}
