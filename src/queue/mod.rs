//! The queue runner: turns builds into steps (one per derivation, shared by
//! every build, jobset and project that needs it), keeps the runnable ones
//! in one queue per platform (system and required features), and
//! dispatches each to the machine that fits with the lowest load per speed
//! factor as soon as it becomes runnable: no polling loop, and choosing the
//! next step does not depend on the length of the queue. Order: bumped
//! builds first, then the jobset that used least machine time for its
//! scheduling shares, then `meta.schedulingPriority`, then age.
//!
//! Every state change is committed to the database before it is acted on,
//! so a runner killed at any moment and started again rebuilds this state
//! from the unfinished builds and finishes each exactly once.

mod aggregates;
mod dispatch;
mod graph;
mod inputs;
pub mod leader;
mod lifecycle;
mod machines;
mod ready;
mod record;
mod results;
pub mod run;
mod standby;
mod walk;

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::builder::connection::{Connection, Sessions};
use crate::builder::machines::Machine;
use crate::cache::Cache;
use crate::config::QueueConfig;
use crate::db::builds::{self, BuildStatus};
use crate::db::{self, Db, DbError, machines as machine_db, steps};
use crate::events::{Event as Announce, Events};
use crate::logs::Logs;
use crate::nix::StorePath;
use crate::upstream::Upstreams;
use graph::{LiveBuild, Step};
use machines::MachineState;
use ready::{Key, Platform, Ready};
use run::{Outcome, StepSpec};

/// Where machines come from: a file (reloaded when it changes) or a list.
#[derive(Clone, Debug)]
pub enum MachineSource {
    File(PathBuf),
    List(Vec<Machine>),
}

/// How an attempt ended, as its task reports it.
struct AttemptEnd {
    /// Which attempt of the step: one that was cancelled is stale.
    attempt: u64,
    machine: String,
    outcome: Result<Outcome, String>,
    /// The step's stored log, if the attempt ended the step.
    log_file: Option<String>,
    secs: f64,
    conn: Option<Box<Connection>>,
}

enum Event {
    /// Builds to add.
    Enqueue(Vec<i64>, oneshot::Sender<()>),
    /// An attempt of a step ended.
    Done(i64, AttemptEnd),
    Cancel(i64),
    Restart(i64),
    Bump(i64),
    /// A machine was enabled or disabled in the database.
    MachinesChanged,
    WhenIdle(oneshot::Sender<()>),
    /// Answered once everything sent before it is handled.
    Flush(oneshot::Sender<()>),
    /// Stop dispatching; answered when no step is running any more.
    Drain(oneshot::Sender<()>),
    /// End the runner (after a drain), releasing the queue's lock.
    Stop,
}

/// The last [`LATENCIES_KEPT`] dispatch latencies, and whether they
/// changed since last published.
#[derive(Default)]
struct Latencies {
    kept: std::collections::VecDeque<f64>,
    changed: bool,
}

impl Latencies {
    fn push(&mut self, secs: f64) {
        if self.kept.len() == LATENCIES_KEPT {
            self.kept.pop_front();
        }
        self.kept.push_back(secs);
        self.changed = true;
    }

    fn take_changed(&mut self) -> Option<Vec<f64>> {
        std::mem::take(&mut self.changed).then(|| self.kept.iter().copied().collect())
    }
}

/// Dispatch latencies kept for the status and `/metrics`: enough for
/// stable percentiles, bounded however long Kiln runs.
pub const LATENCIES_KEPT: usize = 10_000;

/// How long a runner that lost the lock waits before it tries again.
const REJOIN_AFTER: Duration = Duration::from_secs(5);

/// Why a runner stopped leading.
enum Ended {
    Stop,
    LostLock,
}

/// A step's attempt in progress on a machine.
struct RunningAttempt {
    no: u64,
    machine: String,
    /// Dropping the attempt's task drops its connection, which interrupts
    /// the remote build (see `Connection`'s `Drop`).
    cancel: oneshot::Sender<()>,
}

/// A handle on the running queue.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::UnboundedSender<Event>,
    pub status: Arc<Mutex<Status>>,
}

/// What the queue is doing, for progress lines and pages.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    /// This process runs the queue (another may, on the same database).
    pub leading: bool,
    pub runnable: usize,
    pub waiting: usize,
    pub running: Vec<(String, String)>,
    pub machines: Vec<(String, u32, u32)>,
    pub steps_done: u64,
    pub steps_failed: u64,
    pub builds_unfinished: usize,
    /// Finished steps whose results wait for the database (it refused
    /// them; they are written as soon as it takes them).
    pub unrecorded: usize,
    /// Seconds from runnable to dispatched, for the last
    /// [`LATENCIES_KEPT`] dispatched steps.
    pub dispatch_latencies: Vec<f64>,
}

impl Queue {
    /// Starts the runner; it loads every unfinished build from the database.
    #[allow(clippy::too_many_arguments)] // the parts it drives, each once
    pub fn start(
        db: Db,
        cache: Cache,
        logs: Logs,
        machines: MachineSource,
        config: QueueConfig,
        state_dir: PathBuf,
        events: Events,
        statuses: Option<crate::github::statuses::Policy>,
        leadership: leader::Leadership,
        upstreams: Upstreams,
    ) -> Queue {
        let (tx, rx) = mpsc::unbounded_channel();
        let alone = matches!(leadership, leader::Leadership::Alone);
        let status = Arc::new(Mutex::new(Status { leading: alone, ..Default::default() }));
        let runner = Runner {
            db,
            cache,
            logs,
            events,
            sessions: Arc::new(Sessions::new(
                &state_dir,
                Duration::from_secs(config.connect_timeout_s),
                Duration::from_secs(config.progress_timeout_s),
            )),
            config,
            statuses,
            upstreams,
            leadership: Some(leadership),
            source: machines,
            source_mtime: None,
            machines: Vec::new(),
            steps: HashMap::new(),
            by_drv: HashMap::new(),
            builds: HashMap::new(),
            ready: HashMap::new(),
            usage: HashMap::new(),
            shares: HashMap::new(),
            tx: tx.clone(),
            status: status.clone(),
            idle_waiters: Vec::new(),
            draining: false,
            drain_waiters: Vec::new(),
            latencies: Latencies::default(),
            done: 0,
            failed: 0,
            became_runnable: Vec::new(),
            became_idle: Vec::new(),
            held: HashMap::new(),
            attempts: HashMap::new(),
            next_attempt: 0,
            rewalks: HashMap::new(),
            roots: crate::gcroots::GcRoots::open(&state_dir),
            live_roots: HashMap::new(),
            released: Vec::new(),
            unrecorded: Vec::new(),
            uncancelled: Vec::new(),
            resume_on: HashMap::new(),
            detached: HashMap::new(),
            rescan_soon: false,
        };
        tokio::spawn(runner.main(rx).instrument(info_span!("queue")));
        Queue { tx, status }
    }

    /// Adds builds (new, or unfinished after a restart); returns once they
    /// are in the queue (or finished because nothing needed building).
    pub async fn enqueue(&self, builds: Vec<i64>) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Event::Enqueue(builds, tx)).is_ok() {
            let _ = rx.await;
        }
    }

    pub fn cancel(&self, build: i64) {
        let _ = self.tx.send(Event::Cancel(build));
    }

    pub fn restart(&self, build: i64) {
        let _ = self.tx.send(Event::Restart(build));
    }

    pub fn bump(&self, build: i64) {
        let _ = self.tx.send(Event::Bump(build));
    }

    /// Has the runner read the machines' enabled flags and pauses again
    /// (after an operator changed them), rather than at its next rescan.
    pub fn machines_changed(&self) {
        let _ = self.tx.send(Event::MachinesChanged);
    }

    /// Cancels every unfinished build of an evaluation.
    pub async fn cancel_eval(&self, db: &Db, eval_id: i64) -> Result<usize, DbError> {
        let ids = eval_builds(db, eval_id).await?;
        let mut c = db.conn().await?;
        let open = builds::unfinished_of(c.ex(), &ids).await?;
        for b in &open {
            self.cancel(b.id);
        }
        Ok(open.len())
    }

    /// Restarts every failed build of an evaluation.
    pub async fn restart_eval(&self, db: &Db, eval_id: i64) -> Result<usize, DbError> {
        let ids = eval_builds(db, eval_id).await?;
        let mut c = db.conn().await?;
        let mut n = 0;
        for id in ids {
            if let Some(b) = builds::get(c.ex(), id).await?
                && b.finished
                && b.build_status != Some(0)
            {
                self.restart(id);
                n += 1;
            }
        }
        Ok(n)
    }

    /// Bumps every unfinished build of an evaluation.
    pub async fn bump_eval(&self, db: &Db, eval_id: i64) -> Result<usize, DbError> {
        let ids = eval_builds(db, eval_id).await?;
        let mut c = db.conn().await?;
        let open = builds::unfinished_of(c.ex(), &ids).await?;
        for b in &open {
            self.bump(b.id);
        }
        Ok(open.len())
    }

    /// Ends the runner, which lets go of the queue's lock (call after
    /// [`Queue::drain`]); another process may then take over.
    pub fn stop(&self) {
        let _ = self.tx.send(Event::Stop);
    }

    /// Stops dispatching and waits up to `timeout` for running steps to
    /// finish and be recorded; false if some were still running.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Event::Drain(tx)).is_err() {
            return true;
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }

    /// Returns once the runner has handled everything sent before (so a
    /// page loaded next shows a restarted build as queued).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Event::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Waits until no build is unfinished (after everything sent before).
    pub async fn wait_idle(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Event::WhenIdle(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Ticks (seconds) between rescans of the database's unfinished builds.
const RESCAN_TICKS: u64 = 5;

struct Runner {
    db: Db,
    cache: Cache,
    events: Events,
    logs: Logs,
    sessions: Arc<Sessions>,
    config: QueueConfig,
    /// Where commit statuses go (none without `[github]`).
    statuses: Option<crate::github::statuses::Policy>,
    /// Upstream caches whose signed outputs are substituted, not built.
    upstreams: Upstreams,
    /// Taken once, at start: the runner waits to lead before it runs.
    leadership: Option<leader::Leadership>,
    source: MachineSource,
    /// The machines file's mtime when last read (`None`: not read yet).
    source_mtime: Option<Option<std::time::SystemTime>>,
    machines: Vec<MachineState>,
    steps: HashMap<i64, Step>,
    by_drv: HashMap<String, i64>,
    builds: HashMap<i64, LiveBuild>,
    ready: HashMap<Platform, Ready>,
    /// Machine seconds per jobset, decaying: the fair-share measure.
    usage: HashMap<i64, f64>,
    shares: HashMap<i64, i64>,
    tx: mpsc::UnboundedSender<Event>,
    status: Arc<Mutex<Status>>,
    idle_waiters: Vec<oneshot::Sender<()>>,
    /// Shutting down: nothing new is dispatched.
    draining: bool,
    drain_waiters: Vec<oneshot::Sender<()>>,
    latencies: Latencies,
    done: u64,
    failed: u64,
    /// Steps queued as runnable, not yet written as such.
    became_runnable: Vec<i64>,
    /// Aggregate builds (by jobset) whose own derivation is done, waiting
    /// for their constituents to finish (see `aggregates.rs`).
    held: HashMap<i64, i64>,
    /// Steps no live build needs any more, not yet written as waiting.
    became_idle: Vec<i64>,
    /// The running attempt of each running step, to cancel it by.
    attempts: HashMap<i64, RunningAttempt>,
    next_attempt: u64,
    /// Times a derivation's builds were walked again because upstream
    /// inputs did not arrive.
    rewalks: HashMap<String, u32>,
    /// GC roots of live builds' derivations, and how many live builds
    /// hold each root.
    roots: crate::gcroots::GcRoots,
    live_roots: HashMap<String, u32>,
    /// Roots to drop at the next flush.
    released: Vec<String>,
    /// Finished attempts the database refused to record, tried again each
    /// tick; and cancellations likewise.
    unrecorded: Vec<results::Unrecorded>,
    uncancelled: Vec<i64>,
    /// Steps a dead runner left running, and the machine each ran on,
    /// until they are dispatched again (see `recover`).
    resume_on: HashMap<i64, String>,
    /// Attempts left running when this runner stepped down, by number:
    /// dropping one's sender would stop it (see `step_down`).
    detached: HashMap<u64, oneshot::Sender<()>>,
    /// Another node changed builds: rescan at the next tick.
    rescan_soon: bool,
}

impl Runner {
    async fn handle(&mut self, ev: Event) -> Result<(), DbError> {
        match ev {
            Event::Enqueue(ids, done) => {
                self.add_builds(&ids).await?;
                let _ = done.send(());
            }
            Event::Done(step, end) => self.step_done(step, end).await?,
            Event::Cancel(id) => {
                if let Err(e) = self.cancel_build(id).await {
                    self.uncancelled.push(id);
                    return Err(e);
                }
            }
            Event::Restart(id) => self.restart(id).await?,
            Event::MachinesChanged => self.load_machine_states().await?,
            Event::WhenIdle(tx) => self.idle_waiters.push(tx),
            Event::Flush(tx) => {
                let _ = tx.send(());
            }
            Event::Drain(tx) => {
                self.draining = true;
                self.drain_waiters.push(tx);
            }
            Event::Stop => {}
            Event::Bump(id) => {
                let mut c = self.db.conn().await?;
                builds::bump(c.ex(), id).await?;
                drop(c);
                self.refresh_priority(id).await?;
            }
        }
        Ok(())
    }

    /// Reads a held build's global priority again (a bump) and puts its
    /// runnable steps where that priority belongs.
    async fn refresh_priority(&mut self, id: i64) -> Result<(), DbError> {
        let b = {
            let mut c = self.db.conn().await?;
            builds::get(c.ex(), id).await?
        };
        if let Some(b) = b {
            if let Some(lb) = self.builds.get_mut(&id) {
                lb.global = b.global_priority;
            }
            let steps: Vec<i64> = self.steps.values().filter(|s| s.builds.contains(&id)).map(|s| s.id).collect();
            for s in steps {
                self.requeue(s);
            }
        }
        Ok(())
    }

    /// What another node announced: a build it queued, bumped or restarted
    /// (`BuildQueued`), or one it cancelled (`BuildFinished`). A build held
    /// here gets its priority read again at once; anything else has the
    /// database rescanned at the next tick (within a second) rather than
    /// at the next periodic rescan.
    async fn remote_event(&mut self, ev: crate::events::Event) -> Result<(), DbError> {
        use crate::events::Event as E;
        match ev {
            E::BuildQueued { build, .. } if self.builds.contains_key(&build) => {
                info!(build, "another node changed a queued build: its priority is read again");
                self.refresh_priority(build).await?;
            }
            E::BuildQueued { build, .. } | E::BuildFinished { build, .. } => {
                info!(build, "another node changed a build: rescanning");
                self.rescan_soon = true;
            }
            _ => {}
        }
        Ok(())
    }

    async fn cancel_build(&mut self, id: i64) -> Result<(), DbError> {
        let mut tx = self.db.begin().await?;
        builds::finish(tx.ex(), id, BuildStatus::Cancelled, false, None, Some("cancelled")).await?;
        self.report(tx.ex(), id).await?;
        tx.commit().await?;
        self.announce_finished(id, BuildStatus::Cancelled);
        self.held.remove(&id);
        self.drop_build(id, true);
        Ok(())
    }

    /// Transitions the database refused, tried again.
    async fn retry_transitions(&mut self) {
        for id in std::mem::take(&mut self.uncancelled) {
            if let Err(e) = self.cancel_build(id).await {
                debug!(build = id, error = %e, "still cannot record a cancellation");
                self.uncancelled.push(id);
            }
        }
        self.record_unrecorded().await;
    }

    /// Queues the commit statuses a build's change calls for, in the
    /// transaction that changed it.
    async fn report(&self, ex: crate::db::Ex<'_>, build: i64) -> Result<(), DbError> {
        match &self.statuses {
            Some(p) => crate::github::statuses::build_changed(ex, p, build).await,
            None => Ok(()),
        }
    }

    fn announce(&self, ev: Announce) {
        self.events.send(ev);
    }

    /// A build the runner holds has finished (call before dropping it).
    fn announce_finished(&self, build: i64, status: BuildStatus) {
        let jobset = self.builds.get(&build).map(|b| b.jobset);
        self.announce(Announce::BuildFinished { build, jobset, buildstatus: status as i64 });
    }

    fn decay_usage(&mut self) {
        // Half-life of about an hour: recent use counts, old use fades.
        for v in self.usage.values_mut() {
            *v *= 0.99981;
        }
    }

    fn idle_check(&mut self) {
        if self.builds.is_empty() && self.held.is_empty() {
            for w in self.idle_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn publish(&mut self) {
        let mut st = self.status.lock().expect("status");
        // From counts the runner keeps, not a scan of every step: this runs
        // after each event, and a big evaluation queues 100,000 steps.
        st.runnable = self.ready.values().map(|r| r.len).sum();
        st.waiting = self.steps.len().saturating_sub(st.runnable + self.attempts.len());
        st.running = self
            .attempts
            .iter()
            .filter_map(|(id, a)| self.steps.get(id).map(|s| (s.drv_path.clone(), a.machine.clone())))
            .collect();
        st.machines = self.machines.iter().map(|m| (m.m.uri.clone(), m.running, m.m.max_jobs)).collect();
        st.steps_done = self.done;
        st.steps_failed = self.failed;
        st.builds_unfinished = self.builds.len() + self.held.len();
        st.unrecorded = self.unrecorded.len() + self.uncancelled.len();
        if let Some(l) = self.latencies.take_changed() {
            st.dispatch_latencies = l;
        }
        drop(st);
        self.idle_check();
    }
}

async fn eval_builds(db: &Db, eval_id: i64) -> Result<Vec<i64>, DbError> {
    let mut c = db.conn().await?;
    Ok(crate::db::evaluations::members(c.ex(), eval_id).await?.into_iter().filter_map(|m| m.build_id).collect())
}

/// Checks a store path string, for callers building step outputs.
pub fn parse_output(p: &str) -> Option<StorePath> {
    StorePath::parse(p).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_latencies_stay_bounded_and_keep_the_newest() {
        let mut l = Latencies::default();
        assert_eq!(l.take_changed(), None);
        for i in 0..(LATENCIES_KEPT * 3) {
            l.push(i as f64);
        }
        let kept = l.take_changed().expect("changed");
        assert_eq!(kept.len(), LATENCIES_KEPT);
        assert_eq!(kept.first().copied(), Some((LATENCIES_KEPT * 2) as f64));
        assert_eq!(kept.last().copied(), Some((LATENCIES_KEPT * 3 - 1) as f64));
        assert_eq!(l.take_changed(), None, "published once until the next dispatch");
    }
}
