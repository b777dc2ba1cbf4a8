//! Running a deployment: its waves in order (hosts of one wave in
//! parallel), a bake time between waves, and on the first host that fails,
//! no further wave (and, with `on_failure = "rollback-all"`, the earlier
//! waves' hosts back to their previous closures). Each host's step is
//! recorded before it is taken, so a deployment interrupted by a restart
//! resumes: a host left mid-switch has its old watchdog ended and is
//! switched again, from the previous closure recorded the first time.

use std::time::{Duration, Instant};

use futures::future::join_all;
use tracing::{Instrument, info, info_span, warn};

use super::host::{CheckResult, HostError, Ssh, Target};
use super::spec::{self, OnFailure};
use crate::db::deployment_hosts::{self as dh, HostRow};
use crate::db::deployments;
use crate::db::{Db, DbError};

/// What a deployment needs besides its rows.
#[derive(Clone)]
pub struct Ctx {
    pub db: Db,
    pub ssh: Ssh,
    pub activate_timeout: Duration,
    /// Where a host substitutes a closure it lacks, with the key to trust.
    pub substituter: Option<(String, String)>,
    pub events: Option<crate::events::Events>,
}

impl Ctx {
    fn changed(&self, deployment: i64) {
        if let Some(e) = &self.events {
            e.deployment_changed(deployment);
        }
    }
}

/// Runs deployment `id` of an environment declared as `env` to its end.
pub async fn run(ctx: &Ctx, env: &spec::Environment, id: i64) -> Result<String, DbError> {
    let span = info_span!("deployment", deployment = id);
    async {
        {
            let mut c = ctx.db.conn().await?;
            deployments::start(c.ex(), id).await?;
        }
        ctx.changed(id);
        let rows = {
            let mut c = ctx.db.conn().await?;
            dh::of_deployment(c.ex(), id).await?
        };
        let waves = rows.iter().map(|r| r.wave).max().map_or(0, |w| w + 1);
        let mut failure: Option<String> = None;
        for wave in 0..waves {
            let hosts: Vec<&HostRow> = rows.iter().filter(|r| r.wave == wave).collect();
            if hosts.is_empty() {
                continue;
            }
            let started = hosts.iter().any(|h| h.status != dh::PENDING);
            if wave > 0 && env.bake_s > 0 && !started {
                info!(wave, secs = env.bake_s, "baking before the next wave");
                tokio::time::sleep(Duration::from_secs(env.bake_s)).await;
            }
            info!(wave, hosts = hosts.len(), "wave starting");
            let results = join_all(hosts.iter().map(|h| switch_host(ctx, env, id, h))).await;
            let mut failed = Vec::new();
            for (h, r) in hosts.iter().zip(results) {
                let status = r?;
                if !matches!(status.as_str(), dh::SUCCEEDED | dh::SKIPPED) {
                    failed.push(format!("{} {status}", h.host));
                }
            }
            if !failed.is_empty() {
                failure = Some(format!("wave {} failed: {}", wave + 1, failed.join(", ")));
                break;
            }
        }
        let status = match &failure {
            None => deployments::SUCCEEDED,
            Some(why) => {
                let mut c = ctx.db.conn().await?;
                let rows = dh::of_deployment(c.ex(), id).await?;
                for r in rows.iter().filter(|r| r.status == dh::PENDING) {
                    dh::set_status(c.ex(), id, &r.host, dh::NOT_STARTED, Some("an earlier wave failed")).await?;
                }
                drop(c);
                if env.on_failure == OnFailure::RollbackAll {
                    roll_back_all(ctx, env, id, &rows).await?;
                }
                warn!(error = %why, "deployment failed");
                deployments::FAILED
            }
        };
        {
            let mut c = ctx.db.conn().await?;
            deployments::finish(c.ex(), id, status, failure.as_deref()).await?;
        }
        ctx.changed(id);
        info!(status, "deployment ended");
        Ok(status.to_string())
    }
    .instrument(span)
    .await
}

/// Hosts this deployment switched go back to what they had.
async fn roll_back_all(ctx: &Ctx, env: &spec::Environment, id: i64, rows: &[HostRow]) -> Result<(), DbError> {
    for r in rows.iter().filter(|r| r.status == dh::SUCCEEDED) {
        let Some(h) = env.hosts.get(&r.host) else { continue };
        let Some(prev) = &r.previous_path else { continue };
        let (status, log, error) = match Target::new(&r.host, &h.target, h.host_key.as_deref()) {
            Ok(t) => match ctx.ssh.roll_back(&t, prev, &h.profile, &h.activate, ctx.activate_timeout).await {
                Ok(o) => (
                    dh::ROLLED_BACK,
                    o.text(),
                    "rolled back: a later wave failed (on_failure = \"rollback-all\")".to_string(),
                ),
                Err(e) => (dh::ROLLBACK_FAILED, String::new(), format!("rolling back after a later wave failed: {e}")),
            },
            Err(e) => (dh::ROLLBACK_FAILED, String::new(), e.to_string()),
        };
        let mut c = ctx.db.conn().await?;
        dh::append_log(c.ex(), id, &r.host, &log).await?;
        dh::set_status(c.ex(), id, &r.host, status, Some(&error)).await?;
        ctx.changed(id);
    }
    Ok(())
}

/// A fresh host-side directory for one switch.
fn work_dir() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS has randomness");
    format!("/tmp/kiln-deploy-{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}

/// Switches one host and records each step; returns its final status.
async fn switch_host(ctx: &Ctx, env: &spec::Environment, id: i64, row: &HostRow) -> Result<String, DbError> {
    if row.is_done() {
        return Ok(row.status.clone());
    }
    let span = info_span!("host", host = %row.host);
    let r = async {
        let Some(h) = env.hosts.get(&row.host) else {
            return Ok((dh::FAILED, format!("{} is no longer declared", row.host)));
        };
        let t = match Target::new(&row.host, &h.target, h.host_key.as_deref()) {
            Ok(t) => t,
            Err(e) => return Ok((dh::FAILED, e.to_string())),
        };
        // An earlier attempt (before a restart) may have left a watchdog.
        if let Some(old) = &row.work_dir {
            match ctx.ssh.disarm(&t, old).await {
                Ok(rolled_back) => {
                    if rolled_back {
                        log(ctx, id, &row.host, "kiln: the earlier attempt's watchdog had rolled back\n").await?;
                    }
                }
                Err(e) => return Ok((dh::FAILED, e.to_string())),
            }
        }
        let current = match ctx.ssh.current(&t, &h.profile).await {
            Ok(c) => c,
            Err(e) => return Ok((dh::FAILED, e.to_string())),
        };
        if row.work_dir.is_none() && current.as_deref() == Some(row.store_path.as_str()) {
            log(ctx, id, &row.host, &format!("kiln: {} already runs {}\n", row.host, row.store_path)).await?;
            return Ok((dh::SKIPPED, "unchanged: the host already runs this closure".to_string()));
        }
        let dir = work_dir();
        let row = {
            let mut c = ctx.db.conn().await?;
            dh::begin_switch(c.ex(), id, &row.host, current.as_deref(), &dir).await?
        };
        ctx.changed(id);
        let previous = row.previous_path.clone();
        if previous.is_none() {
            log(ctx, id, &row.host, "kiln: first deployment of this host: there is nothing to roll back to\n").await?;
        }
        let substituter = ctx.substituter.as_ref().map(|(u, k)| (u.as_str(), k.as_str()));
        match ctx
            .ssh
            .start_switch(
                &t,
                &row.store_path,
                previous.as_deref(),
                &h.profile,
                &h.activate,
                &dir,
                env.confirm_timeout_s,
                ctx.activate_timeout.as_secs(),
                substituter,
            )
            .await
        {
            Ok(o) => log(ctx, id, &row.host, &o.text()).await?,
            // Refused before the profile changed (the closure cannot be
            // had, the profile cannot be set): nothing to undo.
            Err(e @ HostError::Failed { .. }) => return Ok((dh::FAILED, e.to_string())),
            Err(e) => return after_failure(ctx, h, &t, id, &row, &dir, e.to_string()).await,
        }
        let activation = ctx.ssh.wait_activation(&t, &dir, ctx.activate_timeout).await;
        let activated_at = Instant::now();
        match activation {
            Ok(o) => {
                log(ctx, id, &row.host, &o.text()).await?;
                if !o.ok() {
                    let why =
                        format!("activation failed (exit status {})", o.code.map_or("none".into(), |c| c.to_string()));
                    return after_failure(ctx, h, &t, id, &row, &dir, why).await;
                }
            }
            Err(e) => return after_failure(ctx, h, &t, id, &row, &dir, e.to_string()).await,
        }
        set(ctx, id, &row.host, dh::CHECKING, None).await?;
        // Confirmed over a new connection: a host that no longer lets Kiln
        // in is left to its watchdog.
        let deadline = activated_at + Duration::from_secs(env.confirm_timeout_s);
        let confirmed = loop {
            match ctx.ssh.confirm(&t, &dir).await {
                Ok(c) => break Ok(c),
                Err(e) if Instant::now() >= deadline => break Err(e),
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        };
        match confirmed {
            Ok(true) => {}
            Ok(false) => return watchdog_result(ctx, &t, id, &row.host, &dir, "not confirmed in time".into()).await,
            Err(e) => {
                let why = format!("unreachable after activation ({e})");
                if previous.is_none() {
                    return Ok((dh::FAILED, format!("{why}; first deployment of this host: nothing to roll back to")));
                }
                return watchdog_result(ctx, &t, id, &row.host, &dir, why).await;
            }
        }
        let mut results: Vec<CheckResult> = Vec::new();
        for c in env.checks_of(&row.host) {
            let r = ctx.ssh.check(&t, &c, &row.store_path, &h.profile).await;
            let ok = r.ok;
            results.push(r);
            let mut conn = ctx.db.conn().await?;
            dh::set_checks(conn.ex(), id, &row.host, &serde_json::to_string(&results).expect("serialises")).await?;
            drop(conn);
            ctx.changed(id);
            if !ok {
                let why = format!("health check failed: {}", c.command);
                return roll_back(ctx, h, &t, id, &row, why).await;
            }
        }
        Ok((dh::SUCCEEDED, String::new()))
    }
    .instrument(span)
    .await;
    let (status, error) = r?;
    set(ctx, id, &row.host, status, (!error.is_empty()).then_some(error.as_str())).await?;
    info!(host = %row.host, status, error = %error, "host done");
    Ok(status.to_string())
}

/// After a failure once the profile may have changed: Kiln takes the
/// decision from the watchdog and rolls back itself.
async fn after_failure(
    ctx: &Ctx,
    h: &spec::Host,
    t: &Target,
    id: i64,
    row: &HostRow,
    dir: &str,
    why: String,
) -> Result<(&'static str, String), DbError> {
    if row.previous_path.is_some() {
        match ctx.ssh.confirm(t, dir).await {
            Ok(true) => {}
            Ok(false) => return watchdog_result(ctx, t, id, &row.host, dir, why).await,
            Err(e) => return watchdog_result(ctx, t, id, &row.host, dir, format!("{why}; then {e}")).await,
        }
    }
    roll_back(ctx, h, t, id, row, why).await
}

/// Kiln's own rollback to the recorded previous closure.
async fn roll_back(
    ctx: &Ctx,
    h: &spec::Host,
    t: &Target,
    id: i64,
    row: &HostRow,
    why: String,
) -> Result<(&'static str, String), DbError> {
    let Some(prev) = &row.previous_path else {
        return Ok((dh::FAILED, format!("{why}; first deployment of this host: nothing to roll back to")));
    };
    match ctx.ssh.roll_back(t, prev, &h.profile, &h.activate, ctx.activate_timeout).await {
        Ok(o) => {
            log(ctx, id, &row.host, &o.text()).await?;
            Ok((dh::ROLLED_BACK, format!("{why}; rolled back to {prev}")))
        }
        Err(e) => Ok((dh::ROLLBACK_FAILED, format!("{why}; rollback to {prev} failed: {e}"))),
    }
}

/// The watchdog decided: waits (as long as a rollback may take) to read
/// what it did.
async fn watchdog_result(
    ctx: &Ctx,
    t: &Target,
    id: i64,
    host: &str,
    dir: &str,
    why: String,
) -> Result<(&'static str, String), DbError> {
    let deadline = Instant::now() + ctx.activate_timeout + Duration::from_secs(60);
    loop {
        match ctx.ssh.watchdog_outcome(t, dir, ctx.activate_timeout + Duration::from_secs(120)).await {
            Ok(Some(o)) => {
                log(ctx, id, host, &format!("kiln: the host's watchdog rolled back:\n{}", o.text())).await?;
                return Ok(if o.ok() {
                    (dh::ROLLED_BACK, format!("{why}; the host's watchdog rolled back to the previous closure"))
                } else {
                    (dh::ROLLBACK_FAILED, format!("{why}; the host's watchdog could not roll back"))
                });
            }
            // The host answers, and no watchdog acted: Kiln decides.
            Ok(None) => {
                return Ok((dh::FAILED, format!("{why}; the host answers again but its watchdog did not act")));
            }
            Err(e) if Instant::now() >= deadline => {
                return Ok((
                    dh::FAILED,
                    format!(
                        "{why}; the host has not answered since ({e}): its watchdog restores the previous closure unless Kiln confirmed"
                    ),
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

async fn log(ctx: &Ctx, id: i64, host: &str, text: &str) -> Result<(), DbError> {
    if text.is_empty() {
        return Ok(());
    }
    let mut c = ctx.db.conn().await?;
    dh::append_log(c.ex(), id, host, text).await?;
    drop(c);
    ctx.changed(id);
    Ok(())
}

async fn set(ctx: &Ctx, id: i64, host: &str, status: &str, error: Option<&str>) -> Result<(), DbError> {
    let mut c = ctx.db.conn().await?;
    dh::set_status(c.ex(), id, host, status, error).await?;
    drop(c);
    ctx.changed(id);
    Ok(())
}
