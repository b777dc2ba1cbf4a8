//! Planning: which evaluation an environment goes to next. An environment
//! takes the newest evaluation of its jobset once every host's job and
//! every required job has built successfully ("green"); a newer plan
//! supersedes one that has not started, and an evaluation whose closures
//! are what each host already runs plans nothing. Manual environments plan
//! the same way and wait for Promote.

use crate::db::deployment_hosts::{self, Planned};
use crate::db::deployments::{self, Deployment};
use crate::db::environments::Environment;
use crate::db::{Db, DbError, Ex, builds, evaluations, jobsets};

use super::spec::{self, Mode};

/// One host's part in a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlan {
    pub host: String,
    pub wave: i64,
    pub job: String,
    pub build_id: i64,
    pub path: String,
}

/// Whether an evaluation can be deployed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Some job is still building.
    NotYet(String),
    /// Some job failed or is missing: this evaluation is never deployed.
    Never(String),
    Ready(Vec<HostPlan>),
}

/// What each host of `env` would get from evaluation `eval_id`.
pub async fn readiness(mut ex: Ex<'_>, env: &spec::Environment, eval_id: i64) -> Result<Readiness, DbError> {
    let mut jobs: Vec<String> = env.hosts.values().map(|h| h.job.clone()).collect();
    jobs.extend(env.required_jobs.iter().cloned());
    jobs.sort();
    jobs.dedup();
    let members = evaluations::members_named(ex.re(), eval_id, &jobs).await?;
    let mut outs = std::collections::HashMap::new();
    for job in &jobs {
        let Some(m) = members.iter().find(|m| &m.job == job) else {
            return Ok(Readiness::Never(format!("evaluation {eval_id} has no job {job}")));
        };
        if let Some(e) = &m.error {
            return Ok(Readiness::Never(format!("job {job} failed to evaluate: {e}")));
        }
        let Some(b) = (match m.build_id {
            Some(id) => builds::get(ex.re(), id).await?,
            None => None,
        }) else {
            return Ok(Readiness::Never(format!("job {job} has no build")));
        };
        if !b.finished {
            return Ok(Readiness::NotYet(format!("job {job} (build {}) is not built yet", b.id)));
        }
        if b.build_status != Some(0) {
            return Ok(Readiness::Never(format!("job {job} (build {}) failed", b.id)));
        }
        let o = builds::outputs(ex.re(), b.id).await?;
        let path = o.iter().find(|o| o.name == "out").or(o.first()).map(|o| o.path.clone());
        outs.insert(job.clone(), (b.id, path));
    }
    let mut hosts = Vec::new();
    for (name, h) in &env.hosts {
        let (build_id, path) = outs[&h.job].clone();
        let Some(path) = path else {
            return Ok(Readiness::Never(format!("job {} (build {build_id}) has no output", h.job)));
        };
        let wave = env.wave_of(name).unwrap_or(0) as i64;
        hosts.push(HostPlan { host: name.clone(), wave, job: h.job.clone(), build_id, path });
    }
    Ok(Readiness::Ready(hosts))
}

/// What a planning tick came to.
#[derive(Debug)]
pub enum Tick {
    Planned(Deployment),
    /// The newest evaluation is settled: planned already, never
    /// deployable, or what every host runs. Nothing changes that until a
    /// newer evaluation, a new deployment or a new declaration: the key
    /// is the evaluation and the environment's newest deployment, given
    /// only while no deployment is open (an open one changes hosts).
    Settled(Settled),
    /// Not decided yet (an evaluation running, builds unfinished).
    Later,
}

/// What a settled tick is keyed on: `(evaluation, newest deployment)`.
pub type Settled = (i64, Option<i64>);

/// Plans the environment's next deployment if a newer green evaluation
/// changes some host. `settled` is what an earlier tick settled, which is
/// not worked out again.
pub async fn tick(db: &Db, env: &Environment, settled: Option<Settled>) -> Result<Tick, DbError> {
    let spec = env.spec()?;
    let mut c = db.conn().await?;
    let Some(jobset) = jobsets::get_in_project(c.ex(), env.project_id, &spec.jobset).await? else {
        return Ok(Tick::Later);
    };
    let Some(eval) = evaluations::latest(c.ex(), jobset.id, 1).await?.into_iter().next() else {
        return Ok(Tick::Later);
    };
    let (newest, open) = deployments::newest_and_open(c.ex(), env.id).await?;
    let key = (eval.id, newest);
    if settled == Some(key) {
        return Ok(Tick::Settled(key));
    }
    let settle = if open { Tick::Later } else { Tick::Settled(key) };
    match eval.status.as_str() {
        "succeeded" => {}
        "running" => return Ok(Tick::Later),
        _ => return Ok(settle),
    }
    if deployments::newest_planned_eval(c.ex(), env.id).await?.is_some_and(|e| e >= eval.id) {
        return Ok(settle);
    }
    let hosts = match readiness(c.ex(), &spec, eval.id).await? {
        Readiness::Ready(hosts) => hosts,
        Readiness::NotYet(_) => return Ok(Tick::Later),
        Readiness::Never(_) => return Ok(settle),
    };
    let current = deployment_hosts::current(c.ex(), env.id).await?;
    let unchanged =
        hosts.iter().all(|h| current.iter().any(|(n, on, _)| n == &h.host && on.as_deref() == Some(&h.path)));
    if unchanged {
        return Ok(settle);
    }
    drop(c);
    let status = match spec.mode {
        Mode::Auto => deployments::QUEUED,
        Mode::Manual => deployments::WAITING,
    };
    create(db, env.id, eval.id, &hosts, status, "auto").await.map(Tick::Planned)
}

/// Records a deployment of `hosts` and supersedes the environment's
/// deployments that have not started.
pub async fn create(
    db: &Db,
    environment_id: i64,
    eval_id: i64,
    hosts: &[HostPlan],
    status: &str,
    reason: &str,
) -> Result<Deployment, DbError> {
    let mut tx = db.begin().await?;
    let d = deployments::create(tx.ex(), environment_id, eval_id, status, reason).await?;
    let planned: Vec<Planned<'_>> = hosts
        .iter()
        .map(|h| Planned { host: &h.host, wave: h.wave, job: &h.job, build_id: Some(h.build_id), store_path: &h.path })
        .collect();
    deployment_hosts::add(tx.ex(), d.id, &planned).await?;
    deployments::supersede_unstarted(tx.ex(), environment_id, d.id).await?;
    tx.commit().await?;
    tracing::info!(deployment = d.id, environment = environment_id, eval = eval_id, status, "deployment planned");
    Ok(d)
}
