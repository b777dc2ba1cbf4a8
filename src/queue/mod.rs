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

pub mod leader;
pub mod run;

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::builder::connection::{Connection, Sessions};
use crate::builder::machines::{self, Machine};
use crate::cache::Cache;
use crate::config::QueueConfig;
use crate::db::builds::{self, BuildStatus};
use crate::db::{self, Db, DbError, machines as machine_db, steps};
use crate::events::{Event as Announce, Events};
use crate::logs::Logs;
use crate::nix::{Derivation, StorePath};
use run::{Outcome, StepSpec};

/// Where machines come from: a file (reloaded when it changes) or a list.
#[derive(Clone, Debug)]
pub enum MachineSource {
    File(PathBuf),
    List(Vec<Machine>),
}

/// A queue of steps for one platform, grouped by jobset for fair shares.
#[derive(Default)]
struct Ready {
    by_jobset: HashMap<i64, BTreeSet<Key>>,
    bumped: BTreeSet<Key>,
    len: usize,
}

/// Order within a jobset: scheduling priority (high first), then age.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    global: Reverse<i64>,
    priority: Reverse<i64>,
    build: i64,
    step: i64,
}

type Platform = (Arc<str>, Vec<String>);

struct Step {
    id: i64,
    drv_path: String,
    platform: Platform,
    deps: HashSet<i64>,
    dependents: HashSet<i64>,
    /// Unfinished builds that need this step (directly or through others).
    builds: HashSet<i64>,
    running: bool,
    tries: u32,
    not_before: Option<Instant>,
    avoid: HashSet<String>,
    queued_since: Instant,
    /// When it last entered a ready queue.
    runnable_since: Option<Instant>,
    key: Option<(i64, Key)>,
}

struct LiveBuild {
    jobset: i64,
    top: i64,
    global: i64,
    priority: i64,
    timeout: i64,
    max_silent: i64,
}

struct MachineState {
    m: Machine,
    running: u32,
    failures: u32,
    paused_until: Option<Instant>,
    idle: Vec<Connection>,
}

enum Event {
    Enqueue(Vec<i64>, oneshot::Sender<()>),
    Done {
        step: i64,
        machine: String,
        outcome: Result<Outcome, String>,
        secs: f64,
        conn: Option<Box<Connection>>,
    },
    Cancel(i64),
    Restart(i64),
    Bump(i64),
    WhenIdle(oneshot::Sender<()>),
    /// Answered once everything sent before it is handled.
    Flush(oneshot::Sender<()>),
    /// Stop dispatching; answered when no step is running any more.
    Drain(oneshot::Sender<()>),
    /// End the runner (after a drain), releasing the queue's lock.
    Stop,
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
    pub machine_errors: Vec<String>,
    /// Seconds from runnable to dispatched, for every dispatched step.
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
            latencies: Vec::new(),
            done: 0,
            failed: 0,
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
    /// Taken once, at start: the runner waits to lead before it runs.
    leadership: Option<leader::Leadership>,
    source: MachineSource,
    source_mtime: Option<std::time::SystemTime>,
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
    latencies: Vec<f64>,
    done: u64,
    failed: u64,
}

impl Runner {
    async fn main(mut self, mut rx: mpsc::UnboundedReceiver<Event>) {
        let leadership = self.leadership.take().expect("taken once");
        let acquire = async {
            loop {
                match leadership.acquire().await {
                    Ok(g) => return g,
                    Err(e) => {
                        warn!(error = %e, "cannot learn which process runs the queue");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        };
        tokio::pin!(acquire);
        let _guard = loop {
            tokio::select! {
                g = &mut acquire => break g,
                ev = rx.recv() => match ev {
                    Some(Event::Stop) | None => return,
                    Some(ev) => {
                        if let Err(e) = self.handle_standby(ev).await {
                            warn!(error = %e, "queue action on a standby");
                        }
                    }
                },
            }
        };
        self.status.lock().expect("status").leading = true;
        self.reload_machines();
        if let Err(e) = self.recover().await {
            warn!(error = %e, "cannot load the queue from the database");
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks = 0u64;
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.dispatch().await;
            self.publish();
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(Event::Stop) | None => return,
                    Some(ev) => {
                        if let Err(e) = self.handle(ev).await {
                            warn!(error = %e, "queue event failed");
                        }
                        // Take everything already waiting before dispatching.
                        while let Ok(ev) = rx.try_recv() {
                            if matches!(ev, Event::Stop) {
                                return;
                            }
                            if let Err(e) = self.handle(ev).await {
                                warn!(error = %e, "queue event failed");
                            }
                        }
                    }
                },
                _ = tick.tick() => {
                    ticks += 1;
                    // Builds other processes recorded, reopened or finished.
                    if ticks.is_multiple_of(RESCAN_TICKS) && let Err(e) = self.rescan().await {
                        warn!(error = %e, "rescanning unfinished builds");
                    }
                    self.reload_machines();
                    if let Err(e) = self.fail_unsupported().await {
                        warn!(error = %e, "checking unsupported steps");
                    }
                    self.decay_usage();
                }
            }
        }
    }

    async fn handle(&mut self, ev: Event) -> Result<(), DbError> {
        match ev {
            Event::Enqueue(ids, done) => {
                for id in ids {
                    self.add_build(id).await?;
                }
                let _ = done.send(());
            }
            Event::Done { step, machine, outcome, secs, conn } => {
                self.step_done(step, &machine, outcome, secs, conn).await?
            }
            Event::Cancel(id) => {
                let mut tx = self.db.begin().await?;
                builds::finish(tx.ex(), id, BuildStatus::Cancelled, false, None, Some("cancelled")).await?;
                self.report(tx.ex(), id).await?;
                tx.commit().await?;
                self.announce_finished(id, BuildStatus::Cancelled);
                self.drop_build(id);
            }
            Event::Restart(id) => self.restart(id).await?,
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
                if let Some(b) = builds::get(c.ex(), id).await? {
                    drop(c);
                    if let Some(lb) = self.builds.get_mut(&id) {
                        lb.global = b.global_priority;
                    }
                    let steps: Vec<i64> =
                        self.steps.values().filter(|s| s.builds.contains(&id)).map(|s| s.id).collect();
                    for s in steps {
                        self.requeue(s);
                    }
                }
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ machines

    fn reload_machines(&mut self) {
        let list = match &self.source {
            MachineSource::List(l) => {
                if !self.machines.is_empty() || l.is_empty() {
                    return;
                }
                l.clone()
            }
            MachineSource::File(path) => {
                let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                if mtime == self.source_mtime && !self.machines.is_empty() {
                    return;
                }
                self.source_mtime = mtime;
                match machines::load(path) {
                    Ok((list, errors)) => {
                        for e in &errors {
                            warn!(file = %path.display(), "machines file {e}; skipped");
                        }
                        self.status.lock().expect("status").machine_errors =
                            errors.iter().map(|e| e.to_string()).collect();
                        list
                    }
                    Err(e) => {
                        warn!(file = %path.display(), error = %e, "cannot read the machines file");
                        return;
                    }
                }
            }
        };
        let mut old: HashMap<String, MachineState> = self.machines.drain(..).map(|m| (m.m.uri.clone(), m)).collect();
        for m in list {
            match old.remove(&m.uri) {
                Some(mut st) if st.m == m => {
                    st.m = m;
                    self.machines.push(st);
                }
                Some(st) => self.machines.push(MachineState {
                    m,
                    running: st.running,
                    failures: 0,
                    paused_until: None,
                    idle: vec![],
                }),
                None => {
                    self.machines.push(MachineState { m, running: 0, failures: 0, paused_until: None, idle: vec![] })
                }
            }
        }
        info!(machines = self.machines.len(), "machines loaded");
    }

    /// The free machine that fits, lowest load per speed factor, avoiding
    /// those that failed this step when another one could take it.
    fn pick_machine(&self, platform: &Platform, avoid: &HashSet<String>) -> Option<usize> {
        let now = Instant::now();
        let usable = |m: &MachineState| m.m.fits(&platform.0, &platform.1) && m.paused_until.is_none_or(|t| t <= now);
        let free = |m: &MachineState| m.running < m.m.max_jobs.max(1);
        let load = |m: &MachineState| m.running as f64 / m.m.max_jobs.max(1) as f64 / m.m.speed_factor;
        let best = |skip_avoided: bool| {
            self.machines
                .iter()
                .enumerate()
                .filter(|(_, m)| usable(m) && free(m) && !(skip_avoided && avoid.contains(&m.m.uri)))
                .min_by(|a, b| load(a.1).partial_cmp(&load(b.1)).unwrap_or(std::cmp::Ordering::Equal))
                .map(|(i, _)| i)
        };
        if let Some(i) = best(true) {
            return Some(i);
        }
        // Only avoided machines are free: wait if another could take it.
        let other_exists = self.machines.iter().any(|m| usable(m) && !avoid.contains(&m.m.uri));
        if other_exists { None } else { best(false) }
    }

    // ------------------------------------------------------------ building the graph

    /// Loads every unfinished build (after a start or a crash).
    async fn recover(&mut self) -> Result<(), DbError> {
        let unfinished = {
            let mut c = self.db.conn().await?;
            let n = steps::reset_running(c.ex()).await?;
            if n > 0 {
                info!(steps = n, "steps left running by the last run go back to the queue");
            }
            builds::unfinished(c.ex()).await?
        };
        for b in unfinished {
            self.add_build(b.id).await?;
        }
        Ok(())
    }

    /// Brings the queue in line with the database: unfinished builds it
    /// does not hold (recorded or reopened by another process) join it,
    /// held builds the database has finished (cancelled elsewhere, or
    /// deleted with their project) leave it.
    async fn rescan(&mut self) -> Result<(), DbError> {
        let ids: HashSet<i64> = {
            let mut c = self.db.conn().await?;
            builds::unfinished_ids(c.ex()).await?.into_iter().collect()
        };
        let gone: Vec<i64> = self.builds.keys().filter(|b| !ids.contains(b)).copied().collect();
        for b in gone {
            self.drop_build(b);
        }
        let mut new: Vec<i64> = ids.into_iter().filter(|b| !self.builds.contains_key(b)).collect();
        new.sort_unstable();
        for b in new {
            self.add_build(b).await?;
        }
        Ok(())
    }

    async fn add_build(&mut self, id: i64) -> Result<(), DbError> {
        if self.builds.contains_key(&id) {
            return Ok(());
        }
        let mut c = self.db.conn().await?;
        let Some(b) = builds::get(c.ex(), id).await? else { return Ok(()) };
        if b.finished {
            return Ok(());
        }
        if b.is_aggregate {
            // An aggregate's own derivation is trivial; it still builds.
        }
        let shares = {
            let j = crate::db::jobsets::get_by_id(c.ex(), b.jobset_id).await?;
            j.map(|j| j.scheduling_shares).unwrap_or(100)
        };
        drop(c);
        self.shares.insert(b.jobset_id, shares.max(1));
        match self.walk(&b.drv_path, id).await? {
            Walk::Done => {
                let mut tx = self.db.begin().await?;
                builds::finish(tx.ex(), id, BuildStatus::Succeeded, true, None, None).await?;
                self.report(tx.ex(), id).await?;
                tx.commit().await?;
                debug!(build = id, "all outputs already in the cache");
                self.announce(Announce::BuildFinished { build: id, jobset: Some(b.jobset_id), buildstatus: 0 });
            }
            Walk::Failed { step, top } => {
                let status = if top { BuildStatus::CachedFailure } else { BuildStatus::DepFailed };
                let mut tx = self.db.begin().await?;
                builds::finish(
                    tx.ex(),
                    id,
                    status,
                    false,
                    Some(step),
                    Some("a step failed before (not retried); restart the build to try again"),
                )
                .await?;
                self.report(tx.ex(), id).await?;
                tx.commit().await?;
                let buildstatus = status as i64;
                self.announce(Announce::BuildFinished { build: id, jobset: Some(b.jobset_id), buildstatus });
            }
            Walk::Step(top) => {
                self.builds.insert(
                    id,
                    LiveBuild {
                        jobset: b.jobset_id,
                        top,
                        global: b.global_priority,
                        priority: b.priority,
                        timeout: b.timeout,
                        max_silent: b.max_silent,
                    },
                );
                let mut c = self.db.conn().await?;
                builds::set_top_step(c.ex(), id, top).await?;
                drop(c);
                self.announce(Announce::BuildQueued { build: id, jobset: Some(b.jobset_id) });
                // The build needs every step of its closure.
                let mut stack = vec![top];
                while let Some(s) = stack.pop() {
                    if let Some(st) = self.steps.get_mut(&s)
                        && st.builds.insert(id)
                    {
                        stack.extend(st.deps.iter().copied());
                    }
                }
                let ready: Vec<i64> = {
                    let mut stack = vec![top];
                    let mut seen = HashSet::new();
                    let mut ready = Vec::new();
                    while let Some(s) = stack.pop() {
                        if !seen.insert(s) {
                            continue;
                        }
                        if let Some(st) = self.steps.get(&s) {
                            if st.deps.is_empty() && !st.running {
                                ready.push(s);
                            }
                            stack.extend(st.deps.iter().copied());
                        }
                    }
                    ready
                };
                for s in ready {
                    self.requeue(s);
                }
            }
        }
        Ok(())
    }

    /// Walks the derivation closure of `drv`, making live steps for what is
    /// not in the cache yet.
    async fn walk(&mut self, top_drv: &str, build: i64) -> Result<Walk, DbError> {
        // Depth-first, children before parents, iteratively.
        enum Visit {
            Enter(String),
            Exit(String, Vec<String>, String, Vec<String>),
        }
        let mut result: HashMap<String, Walk> = HashMap::new();
        let mut stack = vec![Visit::Enter(top_drv.to_string())];
        while let Some(v) = stack.pop() {
            match v {
                Visit::Enter(drv) => {
                    if result.contains_key(&drv) {
                        continue;
                    }
                    if let Some(&id) = self.by_drv.get(&drv) {
                        result.insert(drv, Walk::Step(id));
                        continue;
                    }
                    let parsed = match read_drv(&drv).await {
                        Ok(d) => d,
                        Err(e) => {
                            warn!(build, drv = %drv, error = %e, "cannot read a derivation");
                            return Err(DbError::Invalid(e));
                        }
                    };
                    if self.outputs_cached(&parsed).await? {
                        result.insert(drv, Walk::Done);
                        continue;
                    }
                    let inputs: Vec<String> = parsed.input_drvs.iter().map(|(p, _)| p.to_string()).collect();
                    stack.push(Visit::Exit(
                        drv.clone(),
                        inputs.clone(),
                        parsed.system.clone(),
                        parsed.required_features(),
                    ));
                    for i in inputs {
                        stack.push(Visit::Enter(i));
                    }
                }
                Visit::Exit(drv, inputs, system, features) => {
                    if result.contains_key(&drv) {
                        continue;
                    }
                    let mut deps = HashSet::new();
                    let mut failed = None;
                    for i in &inputs {
                        match result.get(i) {
                            Some(Walk::Step(id)) => {
                                deps.insert(*id);
                            }
                            Some(Walk::Failed { step, .. }) => failed = Some(*step),
                            _ => {}
                        }
                    }
                    let mut tx = self.db.begin().await?;
                    let (row, _) = steps::get_or_create(tx.ex(), &drv, &system, &features.join(" "), "waiting").await?;
                    for d in &deps {
                        steps::add_dep(tx.ex(), row.id, *d).await?;
                    }
                    tx.commit().await?;
                    if row.state == "failed" {
                        result.insert(drv, Walk::Failed { step: row.id, top: false });
                        continue;
                    }
                    if let Some(step) = failed {
                        result.insert(drv, Walk::Failed { step, top: false });
                        continue;
                    }
                    let platform: Platform = (Arc::from(system.as_str()), {
                        let mut f = features;
                        f.sort();
                        f
                    });
                    for d in &deps {
                        if let Some(s) = self.steps.get_mut(d) {
                            s.dependents.insert(row.id);
                        }
                    }
                    self.steps.insert(
                        row.id,
                        Step {
                            id: row.id,
                            drv_path: drv.clone(),
                            platform,
                            deps,
                            dependents: HashSet::new(),
                            builds: HashSet::new(),
                            running: false,
                            tries: row.tries.max(0) as u32,
                            not_before: row
                                .next_try_at
                                .filter(|t| *t > db::now())
                                .map(|t| Instant::now() + Duration::from_secs((t - db::now()) as u64)),
                            avoid: HashSet::new(),
                            queued_since: Instant::now(),
                            runnable_since: None,
                            key: None,
                        },
                    );
                    self.by_drv.insert(drv.clone(), row.id);
                    result.insert(drv, Walk::Step(row.id));
                }
            }
        }
        Ok(match result.remove(top_drv) {
            Some(Walk::Failed { step, .. }) => {
                let top = self.by_drv.get(top_drv).is_none_or(|s| *s == step);
                Walk::Failed { step, top }
            }
            Some(w) => w,
            None => Walk::Done,
        })
    }

    async fn outputs_cached(&self, drv: &Derivation) -> Result<bool, DbError> {
        let mut any = false;
        for (_, p) in drv.output_paths() {
            let Ok(p) = p else { return Ok(false) };
            any = true;
            if !self.cache.contains(&p).await.map_err(|e| DbError::Invalid(e.to_string()))? {
                return Ok(false);
            }
        }
        Ok(any)
    }

    // ------------------------------------------------------------ the ready queues

    /// (Re)places a step in its platform's queue with its current priority,
    /// if it is runnable.
    fn requeue(&mut self, id: i64) {
        self.unqueue(id);
        let Some(s) = self.steps.get(&id) else { return };
        if s.running || !s.deps.is_empty() || s.builds.is_empty() {
            return;
        }
        let mut best: Option<(i64, Key)> = None;
        for b in &s.builds {
            if let Some(lb) = self.builds.get(b) {
                let k = Key { global: Reverse(lb.global), priority: Reverse(lb.priority), build: *b, step: id };
                if best.is_none_or(|(_, bk)| k < bk) {
                    best = Some((lb.jobset, k));
                }
            }
        }
        let Some((jobset, key)) = best else { return };
        let platform = s.platform.clone();
        let ready = self.ready.entry(platform).or_default();
        if key.global.0 > 0 {
            ready.bumped.insert(key);
        }
        ready.by_jobset.entry(jobset).or_default().insert(key);
        ready.len += 1;
        let s = self.steps.get_mut(&id).expect("checked");
        s.key = Some((jobset, key));
        // A retry counts from when it may run again.
        s.runnable_since = Some(s.not_before.unwrap_or_else(Instant::now).max(Instant::now()));
        let db = self.db.clone();
        tokio::spawn(async move {
            if let Ok(mut c) = db.conn().await {
                let _ = steps::transition(c.ex(), id, "waiting", "runnable").await;
            }
        });
    }

    fn unqueue(&mut self, id: i64) {
        let Some(s) = self.steps.get_mut(&id) else { return };
        let Some((jobset, key)) = s.key.take() else { return };
        if let Some(r) = self.ready.get_mut(&s.platform) {
            r.bumped.remove(&key);
            if let Some(set) = r.by_jobset.get_mut(&jobset) {
                if set.remove(&key) {
                    r.len -= 1;
                }
                if set.is_empty() {
                    r.by_jobset.remove(&jobset);
                }
            }
        }
    }

    /// The next step of a platform: bumped first, then the jobset that used
    /// least machine time for its shares, then priority and age within it.
    /// Costs a look at each jobset with runnable steps, not at every step.
    fn best_of(&self, platform: &Platform, skip: &HashSet<i64>) -> Option<i64> {
        let r = self.ready.get(platform)?;
        let now = Instant::now();
        let eligible = |k: &Key| {
            !skip.contains(&k.step) && self.steps.get(&k.step).is_some_and(|s| s.not_before.is_none_or(|t| t <= now))
        };
        if let Some(k) = r.bumped.iter().find(|k| eligible(k)) {
            return Some(k.step);
        }
        let mut best: Option<(f64, Key)> = None;
        for (jobset, set) in &r.by_jobset {
            let Some(k) = set.iter().find(|k| eligible(k)) else { continue };
            let used = self.usage.get(jobset).copied().unwrap_or(0.0) / *self.shares.get(jobset).unwrap_or(&100) as f64;
            let better = match best {
                None => true,
                Some((bu, bk)) => used < bu || (used == bu && *k < bk),
            };
            if better {
                best = Some((used, *k));
            }
        }
        best.map(|(_, k)| k.step)
    }

    async fn dispatch(&mut self) {
        if self.draining {
            if !self.steps.values().any(|s| s.running) {
                for w in self.drain_waiters.drain(..) {
                    let _ = w.send(());
                }
            }
            return;
        }
        let platforms: Vec<Platform> = self.ready.iter().filter(|(_, r)| r.len > 0).map(|(p, _)| p.clone()).collect();
        for platform in platforms {
            let mut skip = HashSet::new();
            while let Some(step) = self.best_of(&platform, &skip) {
                let avoid = self.steps[&step].avoid.clone();
                let Some(mi) = self.pick_machine(&platform, &avoid) else {
                    // This step waits for a machine; lower ones might not.
                    skip.insert(step);
                    if skip.len() > 32 {
                        break;
                    }
                    continue;
                };
                if let Err(e) = self.start_step(step, mi).await {
                    warn!(step, error = %e, "cannot start a step");
                    break;
                }
            }
        }
    }

    async fn start_step(&mut self, id: i64, mi: usize) -> Result<(), DbError> {
        let uri = self.machines[mi].m.uri.clone();
        {
            let mut c = self.db.conn().await?;
            steps::mark_running(c.ex(), id, &uri).await?;
        }
        if let Some(s) = self.steps.get(&id) {
            let builds = s.builds.iter().copied().collect();
            self.announce(Announce::StepStarted { step: id, drv: s.drv_path.clone(), machine: uri.clone(), builds });
        }
        self.unqueue(id);
        if let Some(since) = self.steps.get(&id).and_then(|s| s.runnable_since) {
            self.latencies.push(since.elapsed().as_secs_f64());
        }
        let (drv_path, timeout, max_silent) = {
            let s = self.steps.get_mut(&id).expect("live step");
            s.running = true;
            s.tries += 1;
            let (t, ms) = s
                .builds
                .iter()
                .filter_map(|b| self.builds.get(b))
                .fold((0i64, 0i64), |(t, ms), b| (t.max(b.timeout), ms.max(b.max_silent)));
            (s.drv_path.clone(), if t > 0 { t } else { 36000 }, if ms > 0 { ms } else { 7200 })
        };
        let ms = &mut self.machines[mi];
        ms.running += 1;
        let conn = ms.idle.pop();
        let machine = ms.m.clone();
        let sessions = self.sessions.clone();
        let cache = self.cache.clone();
        let logs = self.logs.clone();
        let db = self.db.clone();
        let tx = self.tx.clone();
        let max_log = self.config.max_log_mib.saturating_mul(1 << 20);
        debug!(step = id, drv = %drv_path, machine = %uri, "dispatching");
        tokio::spawn(
            async move {
                let start = Instant::now();
                let (outcome, conn) =
                    attempt(&sessions, &machine, conn, &cache, &logs, &db, id, &drv_path, timeout, max_silent, max_log)
                        .await;
                let _ = tx.send(Event::Done {
                    step: id,
                    machine: machine.uri.clone(),
                    outcome,
                    secs: start.elapsed().as_secs_f64(),
                    conn: conn.map(Box::new),
                });
            }
            .instrument(info_span!("step", step = id)),
        );
        Ok(())
    }

    // ------------------------------------------------------------ results

    async fn step_done(
        &mut self,
        id: i64,
        uri: &str,
        outcome: Result<Outcome, String>,
        secs: f64,
        conn: Option<Box<Connection>>,
    ) -> Result<(), DbError> {
        if let Some(ms) = self.machines.iter_mut().find(|m| m.m.uri == uri) {
            ms.running = ms.running.saturating_sub(1);
            if let Some(c) = conn {
                ms.idle.push(*c);
            }
        }
        let jobsets: HashSet<i64> = self
            .steps
            .get(&id)
            .map(|s| s.builds.iter().filter_map(|b| self.builds.get(b).map(|lb| lb.jobset)).collect())
            .unwrap_or_default();
        for j in jobsets {
            *self.usage.entry(j).or_default() += secs;
        }
        let Some(step) = self.steps.get_mut(&id) else { return Ok(()) };
        step.running = false;
        let drv = step.drv_path.clone();
        match outcome {
            Ok(Outcome::Built { outputs, log }) => {
                let log_file = self.store_log(&drv, &log);
                self.machine_ok(uri).await?;
                let finished: Vec<i64> = self.builds.iter().filter(|(_, b)| b.top == id).map(|(b, _)| *b).collect();
                let mut tx = self.db.begin().await?;
                for (name, path) in &outputs {
                    steps::set_output(tx.ex(), id, name, path).await?;
                }
                steps::finish(tx.ex(), id, 0, None, log_file.as_deref()).await?;
                for b in &finished {
                    builds::finish(tx.ex(), *b, BuildStatus::Succeeded, false, None, None).await?;
                    self.report(tx.ex(), *b).await?;
                }
                tx.commit().await?;
                self.done += 1;
                info!(step = id, drv = %drv, machine = %uri, secs = format!("{secs:.2}"), "built");
                for b in finished {
                    self.announce_finished(b, BuildStatus::Succeeded);
                    self.builds.remove(&b);
                }
                let dependents: Vec<i64> = self.steps[&id].dependents.iter().copied().collect();
                self.remove_step(id);
                for d in dependents {
                    if let Some(s) = self.steps.get_mut(&d) {
                        s.deps.remove(&id);
                    }
                    self.requeue(d);
                }
            }
            Ok(Outcome::Failed { status, error, log }) => {
                let log_file = self.store_log(&drv, &log);
                self.machine_ok(uri).await?;
                self.fail_step(id, status, &error, log_file.as_deref()).await?;
            }
            Ok(Outcome::MachineFault { error, log }) => {
                let _ = log;
                self.machine_failed(uri, &error).await?;
                self.retry_or_abort(id, uri, &error).await?;
            }
            Err(error) => {
                self.machine_failed(uri, &error).await?;
                self.retry_or_abort(id, uri, &error).await?;
            }
        }
        self.idle_check();
        Ok(())
    }

    fn store_log(&self, drv: &str, log: &[u8]) -> Option<String> {
        // An empty log is kept too: "it printed nothing" is an answer.
        match self.logs.write(drv, log) {
            Ok(p) => Some(p.display().to_string()),
            Err(e) => {
                warn!(drv, error = %e, "cannot store a build log");
                None
            }
        }
    }

    async fn retry_or_abort(&mut self, id: i64, uri: &str, error: &str) -> Result<(), DbError> {
        let tries = self.steps.get(&id).map(|s| s.tries).unwrap_or(0);
        if tries >= self.config.max_tries {
            warn!(step = id, tries, error, "giving up on a step after machine failures");
            return self
                .fail_step(id, BuildStatus::Aborted, &format!("aborted after {tries} attempts: {error}"), None)
                .await;
        }
        let delay = self.config.retry_delay_s.saturating_mul(3u64.saturating_pow(tries.saturating_sub(1)));
        {
            let mut c = self.db.conn().await?;
            steps::retry_later(c.ex(), id, error, db::now() + delay as i64).await?;
        }
        info!(step = id, machine = uri, tries, retry_in_s = delay, error, "step will be retried");
        if let Some(s) = self.steps.get_mut(&id) {
            s.avoid.insert(uri.to_string());
            s.not_before = (delay > 0).then(|| Instant::now() + Duration::from_secs(delay));
        }
        self.requeue(id);
        Ok(())
    }

    /// A step's failure finishes every build that needs it: the one it is
    /// the top of with the step's status, the others as "dependency failed".
    async fn fail_step(
        &mut self,
        id: i64,
        status: BuildStatus,
        error: &str,
        log_file: Option<&str>,
    ) -> Result<(), DbError> {
        let builds: Vec<i64> = self.steps.get(&id).map(|s| s.builds.iter().copied().collect()).unwrap_or_default();
        let mut tx = self.db.begin().await?;
        steps::finish(tx.ex(), id, status as i64, Some(error), log_file).await?;
        for b in &builds {
            let top = self.builds.get(b).is_some_and(|lb| lb.top == id);
            let (st, msg) = if top {
                (status, error.to_string())
            } else {
                (BuildStatus::DepFailed, format!("a dependency failed: {error}"))
            };
            builds::finish(tx.ex(), *b, st, false, Some(id), Some(&msg)).await?;
            self.report(tx.ex(), *b).await?;
        }
        tx.commit().await?;
        self.failed += 1;
        warn!(step = id, status = status.label(), builds = builds.len(), "step failed");
        for b in builds {
            let top = self.builds.get(&b).is_some_and(|lb| lb.top == id);
            self.announce_finished(b, if top { status } else { BuildStatus::DepFailed });
            self.drop_build(b);
        }
        self.remove_step(id);
        Ok(())
    }

    /// Forgets a finished build, and the steps nothing else needs.
    fn drop_build(&mut self, id: i64) {
        self.builds.remove(&id);
        let orphans: Vec<i64> = self
            .steps
            .values_mut()
            .filter_map(|s| {
                s.builds.remove(&id);
                (s.builds.is_empty() && !s.running).then_some(s.id)
            })
            .collect();
        for s in orphans {
            self.remove_step(s);
        }
        self.idle_check();
    }

    fn remove_step(&mut self, id: i64) {
        self.unqueue(id);
        if let Some(s) = self.steps.remove(&id) {
            self.by_drv.remove(&s.drv_path);
            for d in s.deps {
                if let Some(ds) = self.steps.get_mut(&d) {
                    ds.dependents.remove(&id);
                }
            }
        }
    }

    async fn machine_ok(&mut self, uri: &str) -> Result<(), DbError> {
        if let Some(m) = self.machines.iter_mut().find(|m| m.m.uri == uri) {
            m.failures = 0;
        }
        let mut c = self.db.conn().await?;
        machine_db::record_success(c.ex(), uri).await
    }

    async fn machine_failed(&mut self, uri: &str, error: &str) -> Result<(), DbError> {
        let mut pause = None;
        if let Some(m) = self.machines.iter_mut().find(|m| m.m.uri == uri) {
            m.failures += 1;
            m.idle.clear();
            if m.failures >= self.config.pause_after_failures {
                m.paused_until = Some(Instant::now() + Duration::from_secs(self.config.pause_s));
                pause = Some(db::now() + self.config.pause_s as i64);
                warn!(machine = uri, failures = m.failures, pause_s = self.config.pause_s, "machine paused");
            }
            let m = m.m.clone();
            self.sessions.forget(&m).await;
        }
        let mut c = self.db.conn().await?;
        machine_db::record_failure(c.ex(), uri, error, pause).await?;
        Ok(())
    }

    /// Steps no machine could ever take fail after the grace period.
    async fn fail_unsupported(&mut self) -> Result<(), DbError> {
        let grace = Duration::from_secs(self.config.unsupported_grace_s);
        let hopeless: Vec<i64> = self
            .steps
            .values()
            .filter(|s| s.key.is_some() && s.queued_since.elapsed() >= grace)
            .filter(|s| !self.machines.iter().any(|m| m.m.fits(&s.platform.0, &s.platform.1)))
            .map(|s| s.id)
            .collect();
        for id in hopeless {
            let p = self.steps[&id].platform.clone();
            let what =
                if p.1.is_empty() { p.0.to_string() } else { format!("{} with features {}", p.0, p.1.join(", ")) };
            let msg = format!("no machine builds for {what}");
            let builds: Vec<i64> = self.steps[&id].builds.iter().copied().collect();
            let mut tx = self.db.begin().await?;
            steps::finish(tx.ex(), id, BuildStatus::Unsupported as i64, Some(&msg), None).await?;
            // The step may be tried again when a machine appears: not remembered as failed.
            steps::reset_failed(tx.ex(), id).await?;
            for b in &builds {
                builds::finish(tx.ex(), *b, BuildStatus::Unsupported, false, Some(id), Some(&msg)).await?;
                self.report(tx.ex(), *b).await?;
            }
            tx.commit().await?;
            warn!(step = id, %msg, "unsupported");
            for b in builds {
                self.announce_finished(b, BuildStatus::Unsupported);
                self.drop_build(b);
            }
            self.remove_step(id);
        }
        Ok(())
    }

    async fn restart(&mut self, id: i64) -> Result<(), DbError> {
        if self.reopen(id).await? {
            self.add_build(id).await?;
        }
        Ok(())
    }

    /// Reopens a finished build in the database, its closure's failures
    /// forgotten; false if it was not finished.
    async fn reopen(&self, id: i64) -> Result<bool, DbError> {
        let mut c = self.db.conn().await?;
        let Some(b) = builds::get(c.ex(), id).await? else { return Ok(false) };
        if !b.finished {
            return Ok(false);
        }
        // Forget the failures in its closure, then queue it again.
        let mut stack = vec![b.drv_path.clone()];
        let mut seen = HashSet::new();
        while let Some(drv) = stack.pop() {
            if !seen.insert(drv.clone()) {
                continue;
            }
            if let Some(s) = steps::get_by_drv(c.ex(), &drv).await?
                && s.state == "failed"
            {
                steps::reset_failed(c.ex(), s.id).await?;
            }
            if let Ok(d) = read_drv(&drv).await {
                stack.extend(d.input_drvs.iter().map(|(p, _)| p.to_string()));
            }
        }
        drop(c);
        let mut tx = self.db.begin().await?;
        builds::reopen(tx.ex(), id).await?;
        self.report(tx.ex(), id).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// While another process runs the queue: actions go to the database,
    /// where that process's rescan finds them; nothing waits on a runner.
    async fn handle_standby(&mut self, ev: Event) -> Result<(), DbError> {
        match ev {
            Event::Enqueue(_, done) => {
                let _ = done.send(());
            }
            Event::Cancel(id) => {
                let mut tx = self.db.begin().await?;
                if builds::get(tx.ex(), id).await?.is_some_and(|b| !b.finished) {
                    builds::finish(tx.ex(), id, BuildStatus::Cancelled, false, None, Some("cancelled")).await?;
                    self.report(tx.ex(), id).await?;
                }
                tx.commit().await?;
            }
            Event::Restart(id) => {
                self.reopen(id).await?;
            }
            Event::Bump(id) => {
                let mut c = self.db.conn().await?;
                builds::bump(c.ex(), id).await?;
            }
            Event::Flush(tx) | Event::Drain(tx) | Event::WhenIdle(tx) => {
                let _ = tx.send(());
            }
            Event::Done { .. } | Event::Stop => {}
        }
        Ok(())
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
        if self.builds.is_empty() {
            for w in self.idle_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn publish(&mut self) {
        let mut st = self.status.lock().expect("status");
        st.runnable = self.ready.values().map(|r| r.len).sum();
        st.waiting = self.steps.values().filter(|s| !s.running && s.key.is_none()).count();
        st.running = self.steps.values().filter(|s| s.running).map(|s| (s.drv_path.clone(), String::new())).collect();
        st.machines = self.machines.iter().map(|m| (m.m.uri.clone(), m.running, m.m.max_jobs)).collect();
        st.steps_done = self.done;
        st.steps_failed = self.failed;
        st.builds_unfinished = self.builds.len();
        if st.dispatch_latencies.len() != self.latencies.len() {
            st.dispatch_latencies = self.latencies.clone();
        }
        drop(st);
        self.idle_check();
    }
}

enum Walk {
    /// Everything is in the cache.
    Done,
    /// A live step builds it.
    Step(i64),
    /// It, or something it needs, failed before.
    Failed { step: i64, top: bool },
}

async fn eval_builds(db: &Db, eval_id: i64) -> Result<Vec<i64>, DbError> {
    let mut c = db.conn().await?;
    Ok(crate::db::evaluations::members(c.ex(), eval_id).await?.into_iter().filter_map(|m| m.build_id).collect())
}

async fn read_drv(path: &str) -> Result<Derivation, String> {
    let bytes = tokio::fs::read(path).await.map_err(|e| format!("cannot read {path}: {e}"))?;
    Derivation::parse(&bytes).map_err(|e| format!("{path}: {e}"))
}

/// One attempt of a step on a machine, with its connection (reused if it
/// is still good afterwards).
#[allow(clippy::too_many_arguments)]
async fn attempt(
    sessions: &Sessions,
    machine: &Machine,
    conn: Option<Connection>,
    cache: &Cache,
    logs: &Logs,
    db: &Db,
    step: i64,
    drv_path: &str,
    timeout: i64,
    max_silent: i64,
    max_log: u64,
) -> (Result<Outcome, String>, Option<Connection>) {
    let mut conn = match conn {
        Some(c) => c,
        None => match sessions.connect(machine).await {
            Ok(c) => c,
            Err(e) => return (Err(e.to_string()), None),
        },
    };
    let spec = StepSpec {
        drv_path,
        max_silent_s: max_silent.max(0) as u64,
        timeout_s: timeout.max(0) as u64,
        max_log_bytes: max_log,
    };
    let (ptx, mut prx) = mpsc::unbounded_channel::<&'static str>();
    let db2 = db.clone();
    let phases = tokio::spawn(async move {
        while let Some(p) = prx.recv().await {
            if let Ok(mut c) = db2.conn().await {
                let _ = steps::set_phase(c.ex(), step, p).await;
            }
        }
    });
    let r = run::run_step(&mut conn, cache, logs, &spec, |p| {
        let _ = ptx.send(p);
    })
    .await;
    drop(ptx);
    let _ = phases.await;
    match r {
        Ok(o @ Outcome::MachineFault { .. }) => (Ok(o), None),
        Ok(o) => (Ok(o), Some(conn)),
        Err(e) => {
            let mut msg = e.to_string();
            let tail = conn.stderr_tail();
            if !tail.trim().is_empty() {
                msg.push_str(": ");
                msg.push_str(tail.trim().lines().last().unwrap_or(""));
            }
            (Err(msg), None)
        }
    }
}

/// Checks a store path string, for callers building step outputs.
pub fn parse_output(p: &str) -> Option<StorePath> {
    StorePath::parse(p).ok()
}
