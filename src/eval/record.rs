//! Recording an evaluation: jobs arrive from the evaluator as a stream and
//! are written in small transactions as they come (so the queue can start
//! on them while the evaluation runs): one member per job, and one build per
//! job that is new. A job whose derivation already has a build in this
//! jobset reuses it, as Hydra does. At the end the evaluation learns its
//! diff against the previous one, and old evaluations are pruned.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::Job;
use crate::db::builds::{self, NewBuild};
use crate::db::evaluations::{self, Diff, Member, Outcome};
use crate::db::{Db, DbError};

/// Jobs written per transaction, and the longest a job waits to be written.
const BATCH: usize = 1000;
const FLUSH_AFTER: Duration = Duration::from_millis(200);

#[derive(Debug, Default, Clone)]
pub struct Recorded {
    pub jobs: i64,
    pub errors: i64,
    pub new_builds: i64,
    /// Builds created by this evaluation, for the queue.
    pub build_ids: Vec<i64>,
}

/// What recording does besides writing.
#[derive(Default, Clone)]
pub struct Hooks {
    /// Told the ids of builds as soon as they are written (the queue).
    pub new_builds: Option<mpsc::UnboundedSender<Vec<i64>>>,
    /// Make a new build even when the jobset has one of the same
    /// derivation (`kiln build` reports every job of its own run).
    pub fresh_builds: bool,
    /// Where new builds' derivations are rooted against Nix's garbage
    /// collector, as soon as they are recorded (the queue lets them go).
    pub roots: Option<crate::gcroots::GcRoots>,
}

/// Writes every job from `rx` as a member of evaluation `eval_id`.
pub async fn record_stream(
    db: &Db,
    jobset_id: i64,
    eval_id: i64,
    rx: mpsc::UnboundedReceiver<Job>,
) -> Result<Recorded, DbError> {
    record_stream_with(db, jobset_id, eval_id, rx, Hooks::default()).await
}

pub async fn record_stream_with(
    db: &Db,
    jobset_id: i64,
    eval_id: i64,
    mut rx: mpsc::UnboundedReceiver<Job>,
    hooks: Hooks,
) -> Result<Recorded, DbError> {
    let mut r = Recorded::default();
    // A jobset without builds has none to reuse: its first evaluation (on
    // a nixpkgs project, 250,000 jobs) skips the lookups. Its evaluations
    // run one at a time, and this one's own jobs have distinct names.
    let lookup = !hooks.fresh_builds && builds::any_in_jobset(db.conn().await?.ex(), jobset_id).await?;
    let mut batch = Vec::with_capacity(BATCH);
    // Aggregates are linked once every job of the evaluation is known.
    let mut by_drv: HashMap<String, i64> = HashMap::new();
    let mut aggregates: Vec<(i64, Vec<String>)> = Vec::new();
    let mut deadline = None::<Instant>;
    // The first job of the next group, taken while completing a batch.
    let mut carry = None::<Job>;
    loop {
        let next = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), rx.recv()).await,
            None => Ok(rx.recv().await),
        };
        let mut done = match next {
            Ok(Some(job)) => {
                deadline.get_or_insert_with(|| Instant::now() + FLUSH_AFTER);
                batch.push(job);
                false
            }
            Ok(None) => true,
            Err(_) => false, // flush time
        };
        if !batch.is_empty() && (done || batch.len() >= BATCH || deadline.is_some_and(|d| Instant::now() >= d)) {
            // A group of jobs shares one GC root, which the queue lets go
            // when the group's last build it holds ends: the whole group
            // goes in one batch, so it joins the queue at once (its jobs
            // were sent together, so the rest is in the channel already).
            while !done && batch.last().is_some_and(|j| j.gc_root.is_some()) {
                match rx.try_recv() {
                    Ok(job) if job.gc_root.as_ref() == batch.last().and_then(|j| j.gc_root.as_ref()) => batch.push(job),
                    Ok(job) => {
                        carry = Some(job);
                        break;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => done = true,
                }
            }
            let t = Instant::now();
            let n = batch.len();
            let before = r.build_ids.len();
            // Rooted while the batch is written (the links are the kernel's
            // work, the rows the database's): one link per group of jobs.
            let rooting = hooks.roots.clone().map(|roots| {
                let keys: std::collections::BTreeSet<String> = batch
                    .iter()
                    .filter(|j| j.error.is_none())
                    .filter_map(|j| j.gc_root.clone().or_else(|| j.drv_path.clone()))
                    .collect();
                tokio::task::spawn_blocking(move || roots.add_all(keys.iter().map(String::as_str)))
            });
            write_batch(db, jobset_id, eval_id, &mut batch, &mut r, &mut by_drv, &mut aggregates, lookup).await?;
            if let Some(rooting) = rooting {
                let _ = rooting.await;
            }
            tracing::debug!(jobs = n, ms = t.elapsed().as_millis() as u64, "recorded a batch");
            if let Some(tx) = &hooks.new_builds {
                let _ = tx.send(r.build_ids[before..].to_vec());
            }
            deadline = None;
            let mut c = db.conn().await?;
            evaluations::set_progress(c.ex(), eval_id, r.jobs, r.errors, r.new_builds).await?;
            if let Some(job) = carry.take() {
                deadline = Some(Instant::now() + FLUSH_AFTER);
                batch.push(job);
            }
        }
        if done {
            break;
        }
    }
    if !aggregates.is_empty() {
        let mut tx = db.begin().await?;
        for (agg, drvs) in aggregates {
            for d in drvs {
                if let Some(&id) = by_drv.get(&d) {
                    builds::add_constituent(tx.ex(), agg, id).await?;
                }
            }
        }
        tx.commit().await?;
    }
    Ok(r)
}

#[allow(clippy::too_many_arguments)]
async fn write_batch(
    db: &Db,
    jobset_id: i64,
    eval_id: i64,
    batch: &mut Vec<Job>,
    r: &mut Recorded,
    by_drv: &mut HashMap<String, i64>,
    aggregates: &mut Vec<(i64, Vec<String>)>,
    lookup: bool,
) -> Result<(), DbError> {
    // A retried slice cannot repeat a job (the evaluator sends each once),
    // but two roots could name one job: the first wins, as in the members.
    let mut seen = std::collections::HashSet::new();
    batch.retain(|j| seen.insert(j.attr.clone()));
    let t0 = Instant::now();
    let mut tx = db.begin().await?;
    let wanted: Vec<(&str, &str)> = batch
        .iter()
        .filter(|j| j.error.is_none())
        .filter_map(|j| j.drv_path.as_deref().map(|d| (j.attr.as_str(), d)))
        .collect();
    let existing =
        if lookup { builds::find_many_in_jobset(tx.ex(), jobset_id, &wanted).await? } else { HashMap::new() };
    let new: Vec<NewBuild> = batch
        .iter()
        .filter(|j| j.error.is_none() && j.drv_path.is_some())
        .filter(|j| !existing.contains_key(&(j.attr.clone(), j.drv_path.clone().unwrap_or_default())))
        .map(|j| new_build(jobset_id, j))
        .collect();
    let t1 = t0.elapsed();
    let created = builds::create_many(tx.ex(), &new).await?;
    let t2 = t0.elapsed();
    let mut members = Vec::with_capacity(batch.len());
    for job in batch.drain(..) {
        let (build_id, is_new, error) = match (&job.error, &job.drv_path) {
            (None, Some(drv)) => {
                let (id, new) = match created.get(&job.attr) {
                    Some(id) => (*id, true),
                    None => (existing[&(job.attr.clone(), drv.clone())], false),
                };
                if new {
                    r.new_builds += 1;
                    r.build_ids.push(id);
                }
                by_drv.insert(drv.clone(), id);
                if let Some(c) = &job.constituents {
                    aggregates.push((id, c.clone()));
                }
                r.jobs += 1;
                (Some(id), new, None)
            }
            (Some(e), _) => {
                r.errors += 1;
                (None, false, Some(e.clone()))
            }
            (None, None) => {
                r.errors += 1;
                (None, false, Some("the evaluator returned no derivation for this job".to_string()))
            }
        };
        members.push(Member { eval_id, job: job.attr, build_id, is_new, error });
    }
    evaluations::add_members(tx.ex(), &members).await?;
    let t3 = t0.elapsed();
    tx.commit().await?;
    tracing::debug!(
        find_ms = t1.as_millis() as u64,
        create_ms = (t2 - t1).as_millis() as u64,
        members_ms = (t3 - t2).as_millis() as u64,
        commit_ms = (t0.elapsed() - t3).as_millis() as u64,
        "batch written"
    );
    Ok(())
}

fn new_build(jobset_id: i64, job: &Job) -> NewBuild {
    NewBuild {
        jobset_id,
        job: job.attr.clone(),
        drv_path: job.drv_path.clone().unwrap_or_default(),
        nix_name: job.name.clone().unwrap_or_default(),
        system: job.system.clone().unwrap_or_default(),
        description: job.meta_str("description"),
        license: job.meta_str("license"),
        maintainers: job.meta_str("maintainers"),
        homepage: job.meta_str("homepage"),
        // Hydra's defaults: 10 h timeout, 2 h without output.
        timeout: job.meta_int("timeout").unwrap_or(36000),
        max_silent: job.meta_int("maxSilent").unwrap_or(7200),
        priority: job.meta_int("schedulingPriority").unwrap_or(100),
        is_aggregate: job.constituents.is_some(),
        outputs: job.outputs.clone().unwrap_or_default().into_iter().collect(),
        gc_root: job.gc_root.clone(),
    }
}

/// Finishes a recorded evaluation: its diff against the previous succeeded
/// evaluation, its counts, pruning beyond `keep`, and (with a policy) the
/// commit statuses the result calls for, all in one transaction.
#[allow(clippy::too_many_arguments)] // each is one fact about the evaluation
pub async fn finish(
    db: &Db,
    jobset_id: i64,
    eval_id: i64,
    duration_ms: i64,
    lock_hash: Option<&str>,
    recorded: &Recorded,
    keep: i64,
    statuses: Option<&crate::github::statuses::Policy>,
) -> Result<Diff, DbError> {
    let t = Instant::now();
    let mut tx = db.begin().await?;
    let prev = evaluations::previous_succeeded(tx.ex(), jobset_id, eval_id).await?;
    let cur = evaluations::member_states(tx.ex(), eval_id).await?;
    let old = match &prev {
        Some(p) => evaluations::member_states(tx.ex(), p.id).await?,
        None => Vec::new(),
    };
    let diff = evaluations::diff(prev.as_ref().map(|p| p.id), &old, &cur);
    evaluations::finish(
        tx.ex(),
        eval_id,
        duration_ms,
        &Outcome {
            lock_hash,
            jobs: recorded.jobs + recorded.errors,
            error_jobs: recorded.errors,
            new_builds: recorded.new_builds,
            error: None,
            stderr: None,
            diff: diff.clone(),
        },
    )
    .await?;
    evaluations::prune(tx.ex(), jobset_id, keep).await?;
    if let Some(p) = statuses {
        crate::github::statuses::eval_finished(tx.ex(), p, eval_id).await?;
    }
    tx.commit().await?;
    tracing::debug!(ms = t.elapsed().as_millis() as u64, "evaluation diffed and finished");
    Ok(diff)
}
