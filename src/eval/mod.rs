//! Evaluation: turns a flake's outputs into jobs. `evaluate` runs N worker
//! processes of the real `nix` in parallel over slices of the job tree,
//! streams each job out as soon as a worker has evaluated it, and isolates
//! errors: catchable ones (`throw`, `assert`) are caught per job and the job
//! is re-evaluated alone for Nix's message; the others (`abort`, infinite
//! recursion, type errors, running out of memory) stop a worker, whose slice
//! is then retried in halves until the broken job stands alone and is
//! recorded with its own error. Every other job is still evaluated.
//!
//! The tree is walked the way Hydra walks `hydraJobs` (nested attribute
//! sets, derivations as leaves), and by the flake schema for `checks`,
//! `packages` and friends (`<system>.<name>`).

pub mod expr;
pub mod nix_eval_jobs;
pub mod record;
pub mod worker;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{Notify, mpsc};
use tracing::{Instrument, debug, info_span};

use expr::Unit;
use worker::{Failure, Limits, RawJob, Traced};

/// Longest job name Kiln accepts; longer ones are that job's error.
pub const MAX_JOB_NAME: usize = 1024;
/// Slices per worker: more balances uneven trees, fewer saves process starts.
const CHUNKS_PER_WORKER: usize = 1;

#[derive(Debug, Error)]
pub enum EvalError {
    /// The evaluation as a whole failed (no flake, syntax error, missing
    /// attribute): Nix's message.
    #[error("{0}")]
    Failed(String),
    #[error("evaluation timed out after {0} s")]
    Timeout(u64),
    #[error("cannot lock flake reference {reference}: {message}")]
    Lock { reference: String, message: String },
}

/// One job, with the fields of nix-eval-jobs' JSON lines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub attr: String,
    #[serde(rename = "attrPath")]
    pub attr_path: Vec<String>,
    #[serde(rename = "drvPath", skip_serializing_if = "Option::is_none")]
    pub drv_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outputs: Option<BTreeMap<String, String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub constituents: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A store file referencing this job's derivation, to be rooted
    /// instead of the derivation itself (see [`crate::gcroots`]).
    #[serde(skip)]
    pub gc_root: Option<String>,
}

impl Job {
    fn error(attr_path: Vec<String>, message: String) -> Job {
        Job {
            attr: attr_name(&attr_path),
            attr_path,
            drv_path: None,
            outputs: None,
            system: None,
            name: None,
            meta: None,
            constituents: None,
            error: Some(message),
            gc_root: None,
        }
    }

    pub fn meta_str(&self, key: &str) -> Option<String> {
        self.meta.as_ref()?.get(key)?.as_str().map(str::to_string)
    }

    pub fn meta_int(&self, key: &str) -> Option<i64> {
        self.meta.as_ref()?.get(key)?.as_i64()
    }
}

/// Joins an attribute path as Nix would write it, quoting odd components.
pub fn attr_name(path: &[String]) -> String {
    path.iter()
        .map(|c| {
            let plain = c.chars().next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
                && c.chars().all(|ch| ch.is_ascii_alphanumeric() || "_'-".contains(ch));
            if plain { c.clone() } else { serde_json::to_string(c).expect("strings serialise") }
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// How deep the flake schema nests derivations under a top-level output;
/// `None` walks every nested set, as Hydra does for `hydraJobs`.
pub fn schema_depth(output: &str) -> Option<u32> {
    match output {
        "checks" | "packages" | "devShells" | "legacyPackages" => Some(2),
        "formatter" => Some(1),
        _ => None,
    }
}

/// One root attribute to evaluate, e.g. `["hydraJobs"]` or `["checks", "x86_64-linux"]`.
#[derive(Debug, Clone)]
pub struct Root {
    pub path: Vec<String>,
    /// Put the root path in front of job names (when a jobset evaluates
    /// several attributes).
    pub prefix: bool,
}

impl Root {
    pub fn parse(attr: &str, prefix: bool) -> Root {
        Root { path: split_attr(attr), prefix }
    }

    fn depth(&self) -> Option<u32> {
        let top = self.path.first().map(String::as_str).unwrap_or("");
        schema_depth(top).map(|d| d.saturating_sub(self.path.len() as u32 - 1))
    }
}

/// Splits `a.b."c.d"` into its components.
pub fn split_attr(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '.' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if !cur.is_empty() || !out.is_empty() {
        out.push(cur);
    }
    out
}

#[derive(Debug, Clone)]
pub struct EvalRequest {
    /// A locked flake reference (see [`lock`]).
    pub flake_ref: String,
    pub roots: Vec<Root>,
    /// Systems to keep; empty keeps all.
    pub systems: Vec<String>,
    pub workers: usize,
    pub max_memory_mib: u64,
    pub timeout: Duration,
    pub evaluator: crate::config::Evaluator,
    /// Have the workers write one store file per group of jobs that
    /// references their derivations, for the recorder to root (`kiln eval`
    /// roots nothing, so it does not ask).
    pub group_roots: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EvalStats {
    pub jobs: usize,
    pub errors: usize,
    /// Jobs for systems the jobset does not keep.
    pub filtered: usize,
    pub processes: usize,
}

/// A flake reference pinned to one revision, and the hash of its source.
#[derive(Debug, Clone)]
pub struct Locked {
    pub url: String,
    pub nar_hash: Option<String>,
}

/// Pins a flake reference (`.`, `path:…`, `git+file://…`) with
/// `nix flake metadata`, so every worker evaluates the same source.
pub async fn lock(reference: &str) -> Result<Locked, EvalError> {
    let out = crate::nix::command::output("nix", ["flake", "metadata", "--json", "--no-write-lock-file", reference])
        .await
        .map_err(|e| EvalError::Lock { reference: reference.to_string(), message: lock_message(&e) })?;
    #[derive(Deserialize)]
    struct Meta {
        url: String,
        locked: Option<serde_json::Value>,
    }
    let m: Meta = serde_json::from_slice(&out)
        .map_err(|e| EvalError::Lock { reference: reference.to_string(), message: e.to_string() })?;
    let nar_hash = m.locked.and_then(|l| l.get("narHash").and_then(|h| h.as_str().map(str::to_string)));
    Ok(Locked { url: m.url, nar_hash })
}

fn lock_message(e: &crate::nix::command::NixCommandError) -> String {
    match e {
        crate::nix::command::NixCommandError::Failed { stderr, .. } => worker::error_message(stderr),
        other => other.to_string(),
    }
}

/// The jobset default: `hydraJobs` if the flake has it, else `checks`.
pub async fn default_root(flake_ref: &str) -> Result<&'static str, EvalError> {
    let e = format!("(builtins.getFlake {}).outputs ? hydraJobs", expr::nix_string(flake_ref));
    let out =
        worker::run(&e, "-", &Limits { max_memory_mib: 0 }, |_| {}).await.map_err(|f| EvalError::Failed(f.message))?;
    Ok(if out.starts_with(b"true") { "hydraJobs" } else { "checks" })
}

/// Evaluates every root, sending jobs to `tx` as they are found.
pub async fn evaluate(req: &EvalRequest, tx: mpsc::UnboundedSender<Job>) -> Result<EvalStats, EvalError> {
    let span = info_span!("eval", flake = %req.flake_ref);
    if req.evaluator == crate::config::Evaluator::NixEvalJobs {
        return match tokio::time::timeout(req.timeout, nix_eval_jobs::evaluate(req, tx)).instrument(span).await {
            Ok(r) => r,
            Err(_) => Err(EvalError::Timeout(req.timeout.as_secs())),
        };
    }
    let fut = async {
        let pool = Pool::new(req, tx);
        let plan = async {
            for (i, root) in req.roots.iter().enumerate() {
                pool.plan_root(i, root).await?;
            }
            pool.run().await;
            pool.finish().await;
            Ok::<_, EvalError>(())
        };
        match tokio::time::timeout(req.timeout, plan).await {
            Ok(r) => r?,
            Err(_) => return Err(EvalError::Timeout(req.timeout.as_secs())),
        }
        Ok(pool.stats.lock().expect("stats").clone())
    };
    fut.instrument(span).await
}

enum Task {
    Walk {
        root: usize,
        units: Vec<Unit>,
    },
    /// A single child whose slice failed: find out what it is.
    Child {
        root: usize,
        unit: Unit,
        failure: String,
    },
    /// A job whose evaluation threw: evaluate it alone for the message.
    Explain {
        root: usize,
        path: Vec<String>,
    },
}

struct Queue {
    tasks: VecDeque<Task>,
    running: usize,
}

struct Pool<'a> {
    req: &'a EvalRequest,
    tx: mpsc::UnboundedSender<Job>,
    nonce: String,
    queue: Mutex<Queue>,
    wake: Notify,
    seen: Mutex<HashSet<(usize, Vec<String>)>>,
    explaining: Mutex<HashSet<(usize, Vec<String>)>>,
    /// Aggregates whose named constituents are resolved at the end.
    named: Mutex<Vec<(Job, Vec<String>)>>,
    /// Job name to derivation, for named constituents.
    found: Mutex<std::collections::HashMap<String, String>>,
    stats: Mutex<EvalStats>,
}

impl<'a> Pool<'a> {
    fn new(req: &'a EvalRequest, tx: mpsc::UnboundedSender<Job>) -> Self {
        let mut n = [0u8; 8];
        let _ = getrandom::fill(&mut n);
        Pool {
            req,
            tx,
            nonce: format!("KILN-{}:", crate::nix::hash::to_hex(&n)),
            queue: Mutex::new(Queue { tasks: VecDeque::new(), running: 0 }),
            wake: Notify::new(),
            seen: Mutex::new(HashSet::new()),
            explaining: Mutex::new(HashSet::new()),
            named: Mutex::new(Vec::new()),
            found: Mutex::new(std::collections::HashMap::new()),
            stats: Mutex::new(EvalStats::default()),
        }
    }

    fn limits(&self) -> Limits {
        Limits { max_memory_mib: self.req.max_memory_mib }
    }

    async fn nix(&self, expr: &str, mut on: impl FnMut(Traced)) -> Result<Vec<u8>, Failure> {
        self.stats.lock().expect("stats").processes += 1;
        worker::run(expr, &self.nonce, &self.limits(), &mut on).await
    }

    fn root(&self, i: usize) -> &Root {
        &self.req.roots[i]
    }

    /// The first-level name filter: systems, under a schema output's root.
    fn only_for(&self, root: &Root) -> Option<Vec<String>> {
        let top = root.path.first().map(String::as_str).unwrap_or("");
        (schema_depth(top).is_some() && root.path.len() == 1 && !self.req.systems.is_empty())
            .then(|| self.req.systems.clone())
    }

    async fn classify(&self, root: &Root, path: &[String], only: Option<&[String]>) -> Result<Kind, Failure> {
        let e = expr::classify(&self.req.flake_ref, &root.path, &self.nonce, path, only);
        let out = self.nix(&e, |_| {}).await?;
        serde_json::from_slice(&out)
            .map_err(|e| Failure { message: format!("unexpected evaluator output: {e}"), out_of_memory: false })
    }

    async fn plan_root(&self, i: usize, root: &Root) -> Result<(), EvalError> {
        let only = self.only_for(root);
        let kind = self.classify(root, &[], only.as_deref()).await.map_err(|f| EvalError::Failed(f.message))?;
        let mut units = match kind {
            Kind { kind, .. } if kind == "drv" => {
                let e = expr::walk_root(&self.req.flake_ref, &root.path, &self.nonce, self.req.group_roots);
                let r = self.nix(&e, |t| {
                    if let Traced::Job(j) = t {
                        self.on_job(i, j);
                    }
                });
                if let Err(f) = r.await {
                    self.emit(i, Job::error(vec![], f.message));
                }
                return Ok(());
            }
            Kind { kind, n: Some(n), .. } if kind == "set" => {
                vec![Unit { path: vec![], only, from: 0, to: n, depth: root.depth().map(|d| d.saturating_sub(1)) }]
            }
            _ => {
                return Err(EvalError::Failed(format!(
                    "attribute '{}' is neither a derivation nor an attribute set",
                    attr_name(&root.path)
                )));
            }
        };
        // Descend through single-child sets (hydraJobs.x86_64-linux.*) until
        // there is enough to share among the workers.
        let target = self.req.workers.max(1) * CHUNKS_PER_WORKER;
        for _ in 0..4 {
            let total: usize = units.iter().map(Unit::len).sum();
            if self.req.workers <= 1 || total >= target {
                break;
            }
            let Some(pos) = units.iter().position(|u| u.len() == 1 && u.depth != Some(0)) else {
                break;
            };
            let u = units[pos].clone();
            let e = expr::classify_child(&self.req.flake_ref, &root.path, &self.nonce, &u, u.from);
            match self.nix(&e, |_| {}).await {
                Ok(out) => match serde_json::from_slice::<Kind>(&out) {
                    Ok(Kind { kind, n: Some(n), name: Some(name) }) if kind == "set" => {
                        let mut path = u.path.clone();
                        path.push(name);
                        units[pos] =
                            Unit { path, only: None, from: 0, to: n, depth: u.depth.map(|d| d.saturating_sub(1)) };
                    }
                    _ => break,
                },
                // Leave it to the walk, which will isolate the error.
                Err(_) => break,
            }
        }
        let chunks = split_units(&units, target);
        let mut q = self.queue.lock().expect("queue");
        for c in chunks {
            q.tasks.push_back(Task::Walk { root: i, units: c });
        }
        Ok(())
    }

    async fn run(&self) {
        let workers = self.req.workers.max(1);
        let mut all = Vec::new();
        for _ in 0..workers {
            all.push(self.worker());
        }
        futures::future::join_all(all).await;
    }

    async fn worker(&self) {
        enum Next {
            Run(Task),
            Wait,
            Done,
        }
        loop {
            // Registered before looking at the queue, so a wake-up between
            // the look and the wait is not lost.
            let notified = self.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = {
                let mut q = self.queue.lock().expect("queue");
                match q.tasks.pop_front() {
                    Some(t) => {
                        q.running += 1;
                        Next::Run(t)
                    }
                    None if q.running == 0 => Next::Done,
                    None => Next::Wait,
                }
            };
            match next {
                Next::Done => {
                    self.wake.notify_waiters();
                    return;
                }
                Next::Wait => notified.await,
                Next::Run(task) => {
                    let more = self.run_task(task).await;
                    {
                        let mut q = self.queue.lock().expect("queue");
                        for t in more.into_iter().rev() {
                            q.tasks.push_front(t);
                        }
                        q.running -= 1;
                    }
                    self.wake.notify_waiters();
                }
            }
        }
    }

    async fn run_task(&self, task: Task) -> Vec<Task> {
        match task {
            Task::Walk { root, units } => {
                let e = expr::walk(
                    &self.req.flake_ref,
                    &self.root(root).path,
                    &self.nonce,
                    true,
                    self.req.group_roots,
                    &units,
                );
                match self
                    .nix(&e, |t| {
                        if let Traced::Job(j) = t {
                            self.on_job(root, j);
                        }
                    })
                    .await
                {
                    Ok(_) => vec![],
                    Err(f) => {
                        debug!(units = units.len(), error = %f.message, "worker failed; splitting its slice");
                        let total: usize = units.iter().map(Unit::len).sum();
                        if total > 1 {
                            let (a, b) = halve(&units);
                            vec![Task::Walk { root, units: a }, Task::Walk { root, units: b }]
                        } else if let Some(u) = units.into_iter().find(|u| u.len() == 1) {
                            vec![Task::Child { root, unit: u, failure: f.message }]
                        } else {
                            vec![]
                        }
                    }
                }
            }
            Task::Child { root, unit, failure } => {
                let r = self.root(root).path.clone();
                let mut name = None;
                let e = expr::classify_child(&self.req.flake_ref, &r, &self.nonce, &unit, unit.from);
                let out = self
                    .nix(&e, |t| {
                        if let Traced::Name(n) = t {
                            name = Some(n);
                        }
                    })
                    .await;
                let child_path = |n: &str| {
                    let mut p = unit.path.clone();
                    p.push(n.to_string());
                    p
                };
                match out {
                    Err(f) => {
                        let path = match &name {
                            Some(n) => child_path(n),
                            None => unit.path.clone(),
                        };
                        self.emit(root, Job::error(path, f.message));
                        vec![]
                    }
                    Ok(out) => match serde_json::from_slice::<Kind>(&out) {
                        Ok(Kind { kind, n: Some(n), name: Some(name) }) if kind == "set" && unit.depth != Some(0) => {
                            vec![Task::Walk {
                                root,
                                units: vec![Unit {
                                    path: child_path(&name),
                                    only: None,
                                    from: 0,
                                    to: n,
                                    depth: unit.depth.map(|d| d.saturating_sub(1)),
                                }],
                            }]
                        }
                        Ok(Kind { name: Some(name), .. }) => {
                            self.emit(root, Job::error(child_path(&name), failure));
                            vec![]
                        }
                        _ => {
                            self.emit(root, Job::error(unit.path.clone(), failure));
                            vec![]
                        }
                    },
                }
            }
            Task::Explain { root, path } => {
                let (last, parent) = path.split_last().expect("a job has a name");
                let unit =
                    Unit { path: parent.to_vec(), only: Some(vec![last.clone()]), from: 0, to: 1, depth: Some(0) };
                let e = expr::walk(
                    &self.req.flake_ref,
                    &self.root(root).path,
                    &self.nonce,
                    false,
                    self.req.group_roots,
                    &unit_vec(unit),
                );
                let mut found = false;
                let r = self
                    .nix(&e, |t| {
                        if let Traced::Job(j) = t {
                            found = true;
                            self.on_job(root, j);
                        }
                    })
                    .await;
                match r {
                    Err(f) => self.emit(root, Job::error(path, f.message)),
                    Ok(_) if !found => self.emit(
                        root,
                        Job::error(
                            path.clone(),
                            if path.iter().any(|c| c.contains('\u{fffd}')) {
                                "job name is not valid UTF-8".to_string()
                            } else {
                                "evaluating this job alone gave no result".to_string()
                            },
                        ),
                    ),
                    Ok(_) => {}
                }
                vec![]
            }
        }
    }

    /// A job line from a worker.
    fn on_job(&self, root: usize, raw: RawJob) {
        if raw.error && !raw.bad_utf8 {
            let key = (root, raw.attr_path.clone());
            if self.seen.lock().expect("seen").contains(&key) {
                return;
            }
            if self.explaining.lock().expect("explaining").insert(key) {
                self.queue.lock().expect("queue").tasks.push_back(Task::Explain { root, path: raw.attr_path });
                self.wake.notify_waiters();
            }
            return;
        }
        if raw.bad_utf8 {
            self.emit(root, Job::error(raw.attr_path, "job name is not valid UTF-8".into()));
            return;
        }
        if !self.req.systems.is_empty()
            && let Some(sys) = &raw.system
            && !self.req.systems.contains(sys)
        {
            self.stats.lock().expect("stats").filtered += 1;
            self.seen.lock().expect("seen").insert((root, raw.attr_path));
            return;
        }
        let job = Job {
            attr: attr_name(&raw.attr_path),
            attr_path: raw.attr_path,
            drv_path: raw.drv_path,
            outputs: raw.outputs,
            system: raw.system,
            name: raw.name,
            meta: raw.meta,
            constituents: raw.constituents,
            error: None,
            gc_root: raw.gc_root,
        };
        match raw.named_constituents {
            Some(names) if !names.is_empty() => {
                let key = (root, job.attr_path.clone());
                if self.seen.lock().expect("seen").insert(key) {
                    self.named.lock().expect("named").push((job, names));
                }
            }
            _ => self.emit(root, job),
        }
    }

    /// Sends a job once: a retried slice may report it again, and the first
    /// report (job or error) wins.
    fn emit(&self, root: usize, job: Job) {
        if !self.seen.lock().expect("seen").insert((root, job.attr_path.clone())) {
            return;
        }
        let job = finalize(self.root(root), job);
        if let (None, Some(drv)) = (&job.error, &job.drv_path) {
            self.found.lock().expect("found").insert(job.attr.clone(), drv.clone());
        }
        {
            let mut s = self.stats.lock().expect("stats");
            if job.error.is_some() { s.errors += 1 } else { s.jobs += 1 }
        }
        // A receiver that went away wants no more jobs; the evaluation ends anyway.
        let _ = self.tx.send(job);
    }

    /// Resolves aggregates' named constituents to the jobs' derivations.
    async fn finish(&self) {
        let named = std::mem::take(&mut *self.named.lock().expect("named"));
        if named.is_empty() {
            return;
        }
        // Jobs emitted so far are the whole evaluation now.
        let by_name = self.found.lock().expect("found").clone();
        for (mut job, names) in named {
            let mut drvs = job.constituents.take().unwrap_or_default();
            let mut missing = Vec::new();
            for n in &names {
                match by_name.get(n) {
                    Some(d) => drvs.push(d.clone()),
                    None => missing.push(n.clone()),
                }
            }
            let root = 0;
            self.seen.lock().expect("seen").remove(&(root, job.attr_path.clone()));
            if missing.is_empty() {
                job.constituents = Some(drvs);
                self.emit(root, job);
            } else {
                self.emit(
                    root,
                    Job::error(
                        job.attr_path,
                        format!("aggregate refers to jobs that do not exist: {}", missing.join(", ")),
                    ),
                );
            }
        }
    }
}

/// Names a job under its root: the root's path in front when the jobset
/// evaluates several attributes, and over-long names cut short (the job
/// then carries that as its error).
pub(crate) fn finalize(r: &Root, mut job: Job) -> Job {
    if r.prefix {
        let mut p = r.path.clone();
        p.extend(job.attr_path);
        job.attr_path = p;
    } else if job.attr_path.is_empty() {
        job.attr_path = r.path.last().cloned().into_iter().collect();
    }
    job.attr = attr_name(&job.attr_path);
    if job.attr.len() > MAX_JOB_NAME {
        let n = job.attr.len();
        let short = shorten(&job.attr);
        if job.error.is_none() {
            job = Job::error(job.attr_path, format!("job name is {n} bytes long; at most {MAX_JOB_NAME} are allowed"));
        }
        job.attr = short;
    }
    job
}

fn unit_vec(u: Unit) -> Vec<Unit> {
    vec![u]
}

fn shorten(s: &str) -> String {
    let mut end = 200;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…{}", &s[..end], &crate::nix::Hash::sha256(s.as_bytes()).to_hex()[..12])
}

#[derive(Debug, Deserialize)]
struct Kind {
    kind: String,
    n: Option<usize>,
    name: Option<String>,
}

/// Splits units into about `target` chunks of similar child counts.
fn split_units(units: &[Unit], target: usize) -> Vec<Vec<Unit>> {
    let total: usize = units.iter().map(Unit::len).sum();
    if total == 0 {
        return vec![];
    }
    let per = total.div_ceil(target.max(1)).max(1);
    let mut chunks = Vec::new();
    let mut cur: Vec<Unit> = Vec::new();
    let mut cur_len = 0;
    for u in units {
        let mut from = u.from;
        while from < u.to {
            let take = (per - cur_len).min(u.to - from);
            cur.push(Unit { from, to: from + take, ..u.clone() });
            from += take;
            cur_len += take;
            if cur_len == per {
                chunks.push(std::mem::take(&mut cur));
                cur_len = 0;
            }
        }
    }
    if !cur.is_empty() {
        chunks.push(cur);
    }
    chunks
}

/// Splits a failed slice in two halves by child count.
fn halve(units: &[Unit]) -> (Vec<Unit>, Vec<Unit>) {
    let total: usize = units.iter().map(Unit::len).sum();
    let mut parts = split_units(units, 2);
    if parts.len() < 2 {
        // total == 1 never reaches here; keep the types simple.
        parts.push(vec![]);
    }
    debug_assert_eq!(parts.iter().flatten().map(Unit::len).sum::<usize>(), total);
    let b = parts.pop().expect("two parts");
    let a = parts.into_iter().flatten().collect();
    (a, b)
}

/// Time since `start` in milliseconds, for recording.
pub fn millis_since(start: Instant) -> i64 {
    start.elapsed().as_millis() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_names_quote_odd_components() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(attr_name(&p(&["hello", "x86_64-linux"])), "hello.x86_64-linux");
        assert_eq!(attr_name(&p(&["a.b", "1x", ""])), "\"a.b\".\"1x\".\"\"");
        assert_eq!(split_attr("checks.x86_64-linux.\"a.b\""), p(&["checks", "x86_64-linux", "a.b"]));
        assert_eq!(split_attr("hydraJobs"), p(&["hydraJobs"]));
    }

    #[test]
    fn slices_split_evenly_and_completely() {
        let u = |from, to| Unit { path: vec![], only: None, from, to, depth: None };
        let chunks = split_units(&[u(0, 10), u(0, 3)], 4);
        assert_eq!(chunks.len(), 4);
        let total: usize = chunks.iter().flatten().map(Unit::len).sum();
        assert_eq!(total, 13);
        let (a, b) = halve(&[u(0, 5)]);
        assert_eq!((a.iter().map(Unit::len).sum::<usize>(), b.iter().map(Unit::len).sum::<usize>()), (3, 2));
        assert_eq!(Root::parse("checks", false).depth(), Some(2));
        assert_eq!(Root::parse("checks.x86_64-linux", false).depth(), Some(1));
        assert_eq!(Root::parse("hydraJobs", false).depth(), None);
    }
}
