//! `kiln build`: evaluate a flake attribute and build every job through the
//! same queue and builders as `kiln serve`, without a server. Builds start
//! as the evaluator streams jobs out. Its state (database, logs, SSH control
//! sockets, signing key) lives in a temporary directory removed at exit, or
//! in `--state DIR`: never in `kiln serve`'s state directory nor, unasked,
//! in the working directory. The machine list is read once, so a step no
//! machine fits fails within a second, not after the grace `serve` gives a
//! machines file that may change. A progress line goes to stderr (redrawn in
//! place on a terminal); the result is a table (or JSON lines) of every job.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::builder::machines::{self, Machine};
use crate::cache::Cache;
use crate::config::Config;
use crate::db::builds::BuildStatus;
use crate::db::evaluations::{self, NewEvaluation};
use crate::db::jobsets::{self, JobsetSpec};
use crate::db::projects::{self, ProjectSpec};
use crate::db::{Db, DbError, builds, steps};
use crate::eval::{self, EvalRequest, Root};
use crate::logs::Logs;
use crate::queue::{MachineSource, Queue, Status};

#[derive(Debug, Error)]
pub enum BuildError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Eval(#[from] eval::EvalError),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    #[error(transparent)]
    Upstream(#[from] crate::upstream::UpstreamError),
    #[error("{file}: {reason}")]
    Machines { file: String, reason: String },
    #[error(
        "another Kiln runs the queue on this database (a kiln serve?): kiln build needs a state of its own \
         (--state DIR, or none for a temporary one); to build on the server, push or use its web UI"
    )]
    QueueBusy,
}

/// One job's result, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct JobResult {
    pub job: String,
    #[serde(rename = "drvPath")]
    pub drv_path: Option<String>,
    pub buildstatus: Option<i64>,
    pub status: String,
    /// Only for a job that has them: succeeded (0) or failed with output (6).
    pub outputs: BTreeMap<String, String>,
    pub machine: Option<String>,
    pub error: Option<String>,
    /// The binary cache (`file://…`) holding the outputs, when it outlives the run.
    pub cache: Option<String>,
    /// The end of the log of the step that failed the job, if it has one.
    #[serde(skip)]
    pub failed_log: Option<FailedLog>,
}

#[derive(Debug, Clone)]
pub struct FailedLog {
    pub drv_path: String,
    pub tail: String,
}

/// Lines of a failed step's log shown after the run (Nix's `log-lines`).
const LOG_LINES: usize = 10;

/// Where one `kiln build` keeps its state and its cache.
pub struct Places {
    pub state: PathBuf,
    pub cache: PathBuf,
    /// The cache outlives the run: `--cache`, or inside `--state`.
    pub cache_kept: bool,
    /// The state directory when no `--state` was given; removed on drop.
    temp: Option<tempfile::TempDir>,
}

impl Places {
    /// `--state` and `--cache` as given; a temporary state directory
    /// without `--state`, and the cache in the state directory without
    /// `--cache`.
    pub fn new(state: Option<PathBuf>, cache: Option<PathBuf>) -> std::io::Result<Places> {
        let (state, temp) = match state {
            Some(s) => (std::path::absolute(s)?, None),
            None => {
                let t = tempfile::Builder::new().prefix("kiln-build-").tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let cache_kept = cache.is_some() || temp.is_none();
        let cache = match cache {
            Some(c) => std::path::absolute(c)?,
            None => state.join("cache"),
        };
        Ok(Places { state, cache, cache_kept, temp })
    }

    /// Whether the state goes away at the end of the run.
    pub fn temporary(&self) -> bool {
        self.temp.is_some()
    }

    /// The configuration `kiln build` runs with: everything it writes goes
    /// to these places, whatever `state_dir`, `database_url`, `cache.dir`
    /// and `cache.secret_key_file` say (they are `kiln serve`'s, and its
    /// database holds `serve`'s queue, which this run would otherwise
    /// take over).
    pub fn configure(&self, mut config: Config) -> Config {
        config.state_dir = self.state.clone();
        config.database_url = None;
        config.cache.dir = Some(self.cache.clone());
        config.cache.secret_key_file = None;
        // The machines are read once (see `load_machines`): a step that no
        // machine fits now never will be during this run.
        config.queue.unsupported_grace_s = 0;
        config
    }

    /// The cache as a Nix store URL, when it outlives the run.
    pub fn cache_url(&self) -> Option<String> {
        self.cache_kept.then(|| format!("file://{}", self.cache.display()))
    }
}

/// The coordinator itself as a builder, when no machines file is given.
pub fn local_machine() -> Machine {
    let jobs = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    Machine::local(jobs)
}

/// Machines from `--machines`, else the configured file, else this machine.
pub fn machine_source(config: &Config, explicit: Option<PathBuf>) -> MachineSource {
    match explicit.or_else(|| config.machines_file()) {
        Some(f) => MachineSource::File(f),
        None => MachineSource::List(vec![local_machine()]),
    }
}

/// The machines of one run, read once: a file that cannot be read, or
/// that lists no usable machine, is an error; bad lines are skipped.
pub fn load_machines(config: &Config, explicit: Option<PathBuf>) -> Result<Vec<Machine>, BuildError> {
    let file = match machine_source(config, explicit) {
        MachineSource::List(l) => return Ok(l),
        MachineSource::File(f) => f,
    };
    let err = |reason: String| BuildError::Machines { file: file.display().to_string(), reason };
    let (list, errors) = machines::load(&file).map_err(|e| err(e.to_string()))?;
    for e in &errors {
        tracing::warn!(file = %file.display(), "machines file {e}; skipped");
    }
    if list.is_empty() {
        return Err(err("no usable machine in it".into()));
    }
    Ok(list)
}

pub async fn run(
    config: &Config,
    db: Db,
    cache: Cache,
    machines: Vec<Machine>,
    installable: &str,
    progress: Option<Arc<Progress>>,
) -> Result<Vec<JobResult>, BuildError> {
    let start = Instant::now();
    let (reference, attr) = match installable.rsplit_once('#') {
        Some((r, a)) => (r.to_string(), Some(a.to_string())),
        None => (installable.to_string(), None),
    };
    // Before anything is written: the unfinished builds below would be
    // another process's.
    let _lock = crate::queue::leader::try_acquire(&db, &config.state_dir).await?.ok_or(BuildError::QueueBusy)?;
    let locked = eval::lock(&reference).await?;
    let attr = match attr.filter(|a| !a.is_empty()) {
        Some(a) => a,
        None => eval::default_root(&locked.url).await?.to_string(),
    };
    {
        // A run interrupted earlier (same `--state`) left builds unfinished;
        // this run builds what it evaluates now, not what that one wanted.
        let mut c = db.conn().await?;
        for b in builds::unfinished(c.ex()).await? {
            let why = "left unfinished by an earlier kiln build";
            builds::finish(c.ex(), b.id, BuildStatus::Cancelled, false, None, Some(why)).await?;
        }
    }
    let logs = Logs::new(&config.state_dir);
    let queue = Queue::start(
        db.clone(),
        cache,
        logs.clone(),
        MachineSource::List(machines),
        config.queue.clone(),
        config.state_dir.clone(),
        Default::default(),
        None,
        crate::queue::leader::Leadership::Alone,
        crate::upstream::Upstreams::from_config(config)?,
    );

    let (jobset_id, eval_id) = {
        let mut c = db.conn().await?;
        let p = projects::upsert(
            c.ex(),
            &ProjectSpec {
                name: "kiln-build".into(),
                display_name: "kiln build".into(),
                description: "builds started with `kiln build`".into(),
                repo: reference.clone(),
                github_repo: None,
                enabled: false,
                hidden: true,
                declared_in: "cli".into(),
            },
        )
        .await?;
        let mut spec = JobsetSpec::new("cli");
        spec.check_interval = 0;
        spec.enabled = false;
        let j = jobsets::upsert(c.ex(), p.id, &spec).await?;
        let ev = evaluations::create(
            c.ex(),
            &NewEvaluation {
                jobset_id: j.id,
                commit_sha: "",
                git_ref: "",
                flake_ref: &locked.url,
                config_hash: "",
                workers: config.eval.workers as i64,
                forced: true,
            },
        )
        .await?;
        (j.id, ev.id)
    };

    let req = EvalRequest {
        flake_ref: locked.url.clone(),
        roots: vec![Root::parse(&attr, false)],
        systems: vec![],
        workers: config.eval.workers,
        max_memory_mib: config.eval.max_memory_mib,
        timeout: Duration::from_secs(config.eval.timeout_s),
        evaluator: config.eval.evaluator,
        group_roots: true,
    };
    let (job_tx, job_rx) = tokio::sync::mpsc::unbounded_channel();
    let (new_tx, mut new_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<i64>>();
    // Fresh builds: each run's builds are checked against this run's cache.
    // The queue roots their derivations as it takes them.
    let hooks = eval::record::Hooks { new_builds: Some(new_tx), fresh_builds: true, roots: None };
    let db2 = db.clone();
    let recorder =
        tokio::spawn(async move { eval::record::record_stream_with(&db2, jobset_id, eval_id, job_rx, hooks).await });
    // Builds go to the queue as they are recorded.
    let q2 = queue.clone();
    let feeder = tokio::spawn(async move {
        while let Some(ids) = new_rx.recv().await {
            q2.enqueue(ids).await;
        }
    });
    let ticker = progress.clone().map(|p| {
        let status = queue.status.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                p.show(&counts(&status), start.elapsed(), false);
            }
        })
    });
    let evaluated = eval::evaluate(&req, job_tx).await;
    let recorded = recorder.await.map_err(|e| DbError::Invalid(e.to_string()))??;
    let _ = feeder.await;
    let stats = evaluated?;
    eval::record::finish(
        &db,
        jobset_id,
        eval_id,
        eval::millis_since(start),
        locked.nar_hash.as_deref(),
        &recorded,
        1_000_000,
        None,
    )
    .await?;
    queue.wait_idle().await;
    // The runner answers "idle" before it publishes the status that says
    // so; the last progress line and the latencies need that status.
    let deadline = Instant::now() + Duration::from_secs(2);
    while queue.status.lock().expect("status").builds_unfinished > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(p) = &progress {
        p.show(&counts(&queue.status), start.elapsed(), true);
    }
    let mut lat = queue.status.lock().expect("status").dispatch_latencies.clone();
    if !lat.is_empty() {
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        let pick = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize] * 1000.0;
        tracing::info!(
            steps = lat.len(),
            median_ms = format!("{:.1}", pick(0.5)),
            p99_ms = format!("{:.1}", pick(0.99)),
            secs = format!("{:.2}", start.elapsed().as_secs_f64()),
            "dispatch latency (runnable to started)"
        );
    }
    tracing::debug!(jobs = stats.jobs, "evaluation finished");

    // The table: every job of this evaluation.
    let mut c = db.conn().await?;
    let mut out = Vec::new();
    for m in evaluations::members(c.ex(), eval_id).await? {
        let Some(bid) = m.build_id else {
            out.push(JobResult {
                job: m.job,
                drv_path: None,
                buildstatus: None,
                status: "evaluation error".into(),
                outputs: Default::default(),
                machine: None,
                error: m.error,
                cache: None,
                failed_log: None,
            });
            continue;
        };
        let Some(b) = builds::get(c.ex(), bid).await? else { continue };
        let status = b.status();
        // A build's outputs are recorded when it is evaluated; only a job
        // that produced them shows them.
        let has_outputs = matches!(status, Some(BuildStatus::Succeeded | BuildStatus::FailedWithOutput));
        let outputs = if has_outputs {
            builds::outputs(c.ex(), bid).await?.into_iter().map(|o| (o.name, o.path)).collect()
        } else {
            BTreeMap::new()
        };
        let machine = match b.top_step_id {
            Some(s) => steps::get(c.ex(), s).await?.and_then(|s| s.machine),
            None => None,
        };
        let failed_log = match (status, b.failed_step_id) {
            (Some(s), Some(step)) if s != BuildStatus::Succeeded => {
                let drv = steps::get(c.ex(), step).await?.map(|s| s.drv_path);
                drv.and_then(|d| log_tail(&logs, &d).map(|tail| FailedLog { drv_path: d, tail }))
            }
            _ => None,
        };
        out.push(JobResult {
            job: b.job.clone(),
            drv_path: Some(b.drv_path.clone()),
            buildstatus: b.build_status,
            // `is_cached` is this run's verdict: its builds are fresh, and
            // the queue found their outputs in this run's cache.
            status: match (status, b.is_cached) {
                (Some(BuildStatus::Succeeded), true) => "cached".into(),
                (Some(s), _) => s.label().into(),
                (None, _) => "unfinished".into(),
            },
            outputs,
            machine,
            error: b.error,
            cache: None,
            failed_log,
        });
    }
    Ok(out)
}

/// The last lines of a step's stored log.
fn log_tail(logs: &Logs, drv: &str) -> Option<String> {
    let r = logs.open(drv)?;
    let (tail, _) = crate::logs::lines_of(std::io::BufReader::new(r), Some(LOG_LINES));
    (!tail.trim().is_empty()).then_some(tail)
}

/// The progress line's text, without the clock.
fn counts(status: &Mutex<Status>) -> String {
    let s = status.lock().expect("status");
    let machines: Vec<String> = s.machines.iter().map(|(m, r, j)| format!("{} {r}/{j}", short(m))).collect();
    format!(
        "kiln: {} built, {} failed, {} running, {} queued [{}]",
        s.steps_done,
        s.steps_failed,
        s.running.len(),
        s.runnable + s.waiting,
        machines.join(", ")
    )
}

/// The progress line on stderr. On a terminal it is one line, redrawn in
/// place, with log messages printed above it (see [`Progress::log_writer`]);
/// elsewhere it is a plain line when the counts change, at most every
/// [`PLAIN_EVERY`], and every [`PLAIN_HEARTBEAT`] while nothing changes.
pub struct Progress {
    tty: bool,
    shown: Mutex<Shown>,
}

#[derive(Default)]
struct Shown {
    /// Nothing more is shown (the run ended or was interrupted).
    ended: bool,
    /// On a terminal: the line drawn now (empty: none).
    drawn: String,
    /// Elsewhere: the counts printed last, and when.
    printed: String,
    printed_at: Option<Instant>,
}

pub const PLAIN_EVERY: Duration = Duration::from_secs(5);
pub const PLAIN_HEARTBEAT: Duration = Duration::from_secs(60);

impl Progress {
    /// `tty`: stderr is a terminal.
    pub fn new(tty: bool) -> Arc<Progress> {
        Arc::new(Progress { tty, shown: Mutex::new(Shown::default()) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shown> {
        // A panic while printing leaves nothing half-updated that matters.
        self.shown.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Shows `counts` and the time taken; `last` ends the line for good.
    fn show(&self, counts: &str, elapsed: Duration, last: bool) {
        let line = format!("{counts} {}s", elapsed.as_secs());
        let mut shown = self.lock();
        if shown.ended {
            return;
        }
        shown.ended = last;
        let mut err = std::io::stderr().lock();
        if self.tty {
            let line = fit(&line, terminal_width());
            if line == shown.drawn && !last {
                return;
            }
            let _ = write!(err, "\r{line}\x1b[K");
            if last {
                let _ = writeln!(err);
                shown.drawn.clear();
            } else {
                shown.drawn = line;
            }
        } else {
            let due = match shown.printed_at {
                None => true,
                Some(at) => {
                    let changed = counts != shown.printed;
                    (changed && (last || at.elapsed() >= PLAIN_EVERY)) || (!last && at.elapsed() >= PLAIN_HEARTBEAT)
                }
            };
            if due {
                let _ = writeln!(err, "{line}");
                shown.printed = counts.to_string();
                shown.printed_at = Some(Instant::now());
            }
        }
        let _ = err.flush();
    }

    /// Ends the line where it is (after an error or an interruption), so
    /// that what follows starts on a line of its own.
    pub fn end(&self) {
        let mut shown = self.lock();
        shown.ended = true;
        if !shown.drawn.is_empty() {
            eprintln!();
            shown.drawn.clear();
        }
    }

    /// A writer for log messages that keeps the progress line below them.
    pub fn log_writer(self: &Arc<Self>) -> LogWriter {
        LogWriter(self.clone())
    }
}

/// Log messages to stderr: on a terminal the progress line is cleared
/// before each and drawn again after it.
pub struct LogWriter(Arc<Progress>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut shown = self.0.lock();
        let mut err = std::io::stderr().lock();
        if shown.drawn.is_empty() {
            err.write_all(buf)?;
        } else {
            err.write_all(b"\r\x1b[K")?;
            err.write_all(buf)?;
            if buf.ends_with(b"\n") {
                err.write_all(shown.drawn.as_bytes())?;
            } else {
                // Mid-line: the next update draws the line afresh.
                shown.drawn.clear();
            }
        }
        err.flush()?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Columns of the terminal on stderr (80 if it cannot tell).
fn terminal_width() -> usize {
    let mut ws = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct it is given.
    let ok = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 { ws.ws_col as usize } else { 80 }
}

/// `line` cut to fit in `width` columns without wrapping (a wrapped line
/// cannot be redrawn in place).
fn fit(line: &str, width: usize) -> String {
    let max = width.saturating_sub(1).max(1);
    if line.chars().count() <= max { line.to_string() } else { line.chars().take(max).collect() }
}

fn short(uri: &str) -> &str {
    let s = uri.split("://").nth(1).unwrap_or(uri);
    s.split('?').next().unwrap_or(s)
}

/// Whether the results call for exit code 1.
pub fn any_failed(results: &[JobResult]) -> bool {
    results.iter().any(|r| r.buildstatus != Some(0))
}
