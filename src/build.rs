//! `kiln build`: evaluate a flake attribute and build every job through the
//! same queue and builders as `kiln serve`, without a server. Builds start
//! as the evaluator streams jobs out. A live progress line goes to stderr;
//! the result is a table (or JSON lines) of every job.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::builder::machines::Machine;
use crate::cache::Cache;
use crate::config::Config;
use crate::db::evaluations::{self, NewEvaluation};
use crate::db::jobsets::{self, JobsetSpec};
use crate::db::projects::{self, ProjectSpec};
use crate::db::{Db, DbError, builds, steps};
use crate::eval::{self, EvalRequest, Root};
use crate::logs::Logs;
use crate::queue::{MachineSource, Queue};

#[derive(Debug, Error)]
pub enum BuildError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Eval(#[from] eval::EvalError),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
}

/// One job's result, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct JobResult {
    pub job: String,
    #[serde(rename = "drvPath")]
    pub drv_path: Option<String>,
    pub buildstatus: Option<i64>,
    pub status: String,
    pub outputs: std::collections::BTreeMap<String, String>,
    pub machine: Option<String>,
    pub error: Option<String>,
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

pub async fn run(
    config: &Config,
    db: Db,
    cache: Cache,
    machines: MachineSource,
    installable: &str,
    progress: bool,
) -> Result<Vec<JobResult>, BuildError> {
    let start = Instant::now();
    let (reference, attr) = match installable.rsplit_once('#') {
        Some((r, a)) => (r.to_string(), Some(a.to_string())),
        None => (installable.to_string(), None),
    };
    let locked = eval::lock(&reference).await?;
    let attr = match attr.filter(|a| !a.is_empty()) {
        Some(a) => a,
        None => eval::default_root(&locked.url).await?.to_string(),
    };
    let logs = Logs::new(&config.state_dir);
    let queue = Queue::start(
        db.clone(),
        cache,
        logs,
        machines,
        config.queue.clone(),
        config.state_dir.clone(),
        Default::default(),
        None,
        crate::queue::leader::Leadership::Alone,
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
    };
    let (job_tx, job_rx) = tokio::sync::mpsc::unbounded_channel();
    let (new_tx, mut new_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<i64>>();
    let hooks = eval::record::Hooks { new_builds: Some(new_tx), fresh_builds: true };
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
    let ticker = progress.then(|| {
        let status = queue.status.clone();
        tokio::spawn(async move {
            let mut last = String::new();
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let s = status.lock().expect("status").clone();
                let machines: Vec<String> =
                    s.machines.iter().map(|(m, r, j)| format!("{} {r}/{j}", short(m))).collect();
                let line = format!(
                    "kiln: {} built, {} failed, {} running, {} queued [{}] {:.0}s",
                    s.steps_done,
                    s.steps_failed,
                    s.running.len(),
                    s.runnable + s.waiting,
                    machines.join(", "),
                    start.elapsed().as_secs_f64()
                );
                if line != last {
                    eprintln!("{line}");
                    last = line;
                }
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
    if let Some(t) = ticker {
        t.abort();
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
            });
            continue;
        };
        let Some(b) = builds::get(c.ex(), bid).await? else { continue };
        let outputs = builds::outputs(c.ex(), bid).await?.into_iter().map(|o| (o.name, o.path)).collect();
        let machine = match b.top_step_id {
            Some(s) => steps::get(c.ex(), s).await?.and_then(|s| s.machine),
            None => None,
        };
        out.push(JobResult {
            job: b.job.clone(),
            drv_path: Some(b.drv_path.clone()),
            buildstatus: b.build_status,
            status: match (b.status(), b.is_cached) {
                (Some(builds::BuildStatus::Succeeded), true) => "cached".into(),
                (Some(s), _) => s.label().into(),
                (None, _) => "unfinished".into(),
            },
            outputs,
            machine,
            error: b.error,
        });
    }
    Ok(out)
}

fn short(uri: &str) -> &str {
    let s = uri.split("://").nth(1).unwrap_or(uri);
    s.split('?').next().unwrap_or(s)
}

/// Whether the results call for exit code 1.
pub fn any_failed(results: &[JobResult]) -> bool {
    results.iter().any(|r| r.buildstatus != Some(0))
}
