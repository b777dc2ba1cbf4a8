//! Continuous deployment: environments declared by a repository's default
//! branch (`spec`), planned from green evaluations (`plan`), and run wave
//! by wave (`run`) by switching hosts over SSH with a watchdog on each
//! host that rolls it back unless Kiln confirms (`host`), or by the pull
//! host's own agent (`agent`), each step recorded as it happens (`record`).
//! The deployer is the loop that plans and starts deployments; an
//! environment's lease in the database lets one process at a time run its
//! deployments (a server, or `kiln deploy` when the server is unreachable:
//! `cli`, `progress`), and a deployment whose runner died is resumed by the
//! next one to take the lease.

pub mod agent;
pub mod cli;
pub mod host;
pub mod plan;
pub mod progress;
pub mod record;
pub mod run;
pub mod spec;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, warn};

use crate::db::{Db, DbError, deployments, environments};

/// How long a lease lasts without renewal; renewed at a third of it.
const LEASE: Duration = Duration::from_secs(15);
const TICK: Duration = Duration::from_secs(1);

/// Plans and runs deployments.
#[derive(Clone)]
pub struct Deployer {
    ctx: run::Ctx,
    /// Names this process in leases: a restarted server takes its own
    /// leases back at once.
    owner: String,
    /// Environments whose deployment runs in this process.
    active: Arc<Mutex<HashSet<i64>>>,
    /// Per environment, what planning settled (see [`plan::Tick`]) and the
    /// declaration it was settled under: not worked out again each tick.
    settled: Arc<Mutex<HashMap<i64, (plan::Settled, String)>>>,
}

impl Deployer {
    pub fn new(ctx: run::Ctx, owner: String) -> Deployer {
        Deployer { ctx, owner, active: Default::default(), settled: Default::default() }
    }

    /// Plans and starts deployments until `stop` resolves.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            if let Err(e) = self.tick().await {
                warn!(error = %e, "deployments: cannot read the database");
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(TICK) => {}
            }
        }
    }

    async fn tick(&self) -> Result<(), DbError> {
        let envs = {
            let mut c = self.ctx.db.conn().await?;
            environments::list(c.ex()).await?
        };
        for (_, env) in &envs {
            let settled = match self.settled.lock().expect("settled").get(&env.id) {
                Some((key, spec)) if *spec == env.spec => Some(*key),
                _ => None,
            };
            match plan::tick(&self.ctx.db, env, settled).await {
                Ok(plan::Tick::Settled(key)) => {
                    self.settled.lock().expect("settled").insert(env.id, (key, env.spec.clone()));
                }
                Ok(_) => {}
                Err(e) => warn!(environment = %env.name, error = %e, "cannot plan a deployment"),
            }
        }
        let runnable = {
            let mut c = self.ctx.db.conn().await?;
            deployments::runnable(c.ex()).await?
        };
        let mut seen = HashSet::new();
        for d in runnable {
            // The oldest of each environment runs first.
            if !seen.insert(d.environment_id) {
                continue;
            }
            self.start(d.environment_id, d.id).await?;
        }
        Ok(())
    }

    /// Runs deployment `id` in the background if this process can take
    /// its environment's lease.
    async fn start(&self, environment_id: i64, id: i64) -> Result<(), DbError> {
        if self.active.lock().expect("active").contains(&environment_id) {
            return Ok(());
        }
        let env = {
            let mut c = self.ctx.db.conn().await?;
            let Some(env) = environments::get_by_id(c.ex(), environment_id).await? else { return Ok(()) };
            if !environments::take_lease(c.ex(), environment_id, &self.owner, lease_until()).await? {
                return Ok(());
            }
            env
        };
        self.active.lock().expect("active").insert(environment_id);
        let this = self.clone();
        tokio::spawn(async move {
            let r = this.run_leased(&env, id).await;
            if let Err(e) = r {
                warn!(deployment = id, error = %e, "deployment stopped on a database error; it resumes on the next tick");
            }
            if let Ok(mut c) = this.ctx.db.conn().await {
                let _ = environments::release_lease(c.ex(), environment_id, &this.owner).await;
            }
            this.active.lock().expect("active").remove(&environment_id);
        });
        Ok(())
    }

    /// Runs the deployment while renewing the lease; stops if the lease is
    /// lost (another process took it after this one stalled).
    async fn run_leased(&self, env: &environments::Environment, id: i64) -> Result<(), record::RecordError> {
        let spec = env.spec()?;
        info!(deployment = id, environment = %env.name, "deployment starting");
        let work = run::run(&self.ctx, &spec, id);
        tokio::pin!(work);
        loop {
            tokio::select! {
                r = &mut work => return r.map(|_| ()),
                _ = tokio::time::sleep(LEASE / 3) => {
                    let mut c = self.ctx.db.conn().await?;
                    if !environments::take_lease(c.ex(), env.id, &self.owner, lease_until()).await? {
                        warn!(deployment = id, "lost the environment's lease: leaving the deployment to its new runner");
                        return Ok(());
                    }
                }
            }
        }
    }
}

impl Deployer {
    /// Runs the environment's open deployments here, oldest first, until
    /// deployment `id` has ended (`kiln deploy`): true when it ran here,
    /// false when another process holds the environment's lease (it runs
    /// them, this one included).
    pub async fn run_here(&self, environment_id: i64, id: i64) -> Result<bool, record::RecordError> {
        loop {
            let (env, next) = {
                let mut c = self.ctx.db.conn().await?;
                let Some(env) = environments::get_by_id(c.ex(), environment_id).await? else { return Ok(false) };
                if !environments::take_lease(c.ex(), environment_id, &self.owner, lease_until()).await? {
                    return Ok(false);
                }
                let next = deployments::runnable(c.ex()).await?.into_iter().find(|d| d.environment_id == env.id);
                (env, next)
            };
            let Some(next) = next.filter(|d| d.id <= id) else {
                let mut c = self.ctx.db.conn().await?;
                environments::release_lease(c.ex(), environment_id, &self.owner).await?;
                return Ok(true);
            };
            self.run_leased(&env, next.id).await?;
        }
    }
}

fn lease_until() -> i64 {
    crate::db::now() + LEASE.as_secs() as i64
}

/// Promote: a deployment waiting for it is queued.
pub async fn promote(db: &Db, id: i64) -> Result<bool, DbError> {
    let mut c = db.conn().await?;
    deployments::promote(c.ex(), id).await
}

/// Plans a deployment of `env` now (the API's and `kiln deploy`'s path):
/// of evaluation `eval` (default: the jobset's newest that succeeded),
/// only `hosts` if given. Unchanged hosts are skipped when it runs. The
/// inner error says why the evaluation cannot be deployed.
pub async fn deploy_now(
    db: &Db,
    env: &environments::Environment,
    eval: Option<i64>,
    hosts: Option<&[String]>,
    reason: &str,
) -> Result<Result<deployments::Deployment, String>, DbError> {
    let spec = env.spec()?;
    let eval_id = {
        let mut c = db.conn().await?;
        let Some(jobset) = crate::db::jobsets::get_in_project(c.ex(), env.project_id, &spec.jobset).await? else {
            return Ok(Err(format!("the jobset {} does not exist", spec.jobset)));
        };
        match eval {
            Some(id) => match crate::db::evaluations::get(c.ex(), id).await? {
                Some(e) if e.jobset_id == jobset.id => id,
                _ => return Ok(Err(format!("evaluation {id} is not one of jobset {}", spec.jobset))),
            },
            None => match crate::db::evaluations::latest(c.ex(), jobset.id, 20)
                .await?
                .into_iter()
                .find(|e| e.status == "succeeded")
            {
                Some(e) => e.id,
                None => return Ok(Err(format!("jobset {} has no evaluation that succeeded", spec.jobset))),
            },
        }
    };
    if let Some(list) = hosts
        && let Some(h) = list.iter().find(|h| !spec.hosts.contains_key(*h))
    {
        return Ok(Err(format!("{h:?} is not a host of environment {}", env.name)));
    }
    let plan = {
        let mut c = db.conn().await?;
        plan::readiness(c.ex(), &spec, eval_id).await?
    };
    let mut planned = match plan {
        plan::Readiness::Ready(h) => h,
        plan::Readiness::NotYet(why) => return Ok(Err(format!("evaluation {eval_id} is not built yet: {why}"))),
        plan::Readiness::Never(why) => return Ok(Err(format!("evaluation {eval_id} cannot be deployed: {why}"))),
    };
    if let Some(list) = hosts {
        planned.retain(|h| list.contains(&h.host));
    }
    plan::create(db, env.id, eval_id, &planned, deployments::QUEUED, reason).await.map(Ok)
}
