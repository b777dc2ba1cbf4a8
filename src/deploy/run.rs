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
use super::record::{RecordError, Recorder};
use super::spec::{self, HealthCheck, OnFailure};
use crate::db::Db;
use crate::db::deployment_hosts::{self as dh, HostRow};
use crate::db::deployments;

/// What a deployment needs besides its rows.
#[derive(Clone)]
pub struct Ctx {
    pub db: Db,
    pub ssh: Ssh,
    pub activate_timeout: Duration,
    /// Where a host substitutes a closure it lacks, with the key to trust.
    pub substituter: Option<(String, String)>,
    /// How long a pull host's wave waits for its agent to take the closure.
    pub agent_wait: Duration,
    pub events: Option<crate::events::Events>,
}

impl Ctx {
    fn changed(&self, deployment: i64) {
        if let Some(e) = &self.events {
            e.deployment_changed(deployment);
        }
    }

    /// Switching a push host over SSH, recorded by `rec`.
    fn switch<'a>(&'a self, rec: &'a Recorder) -> Switch<'a> {
        Switch {
            ssh: &self.ssh,
            rec,
            activate_timeout: self.activate_timeout,
            substituter: self.substituter.as_ref().map(|(u, k)| (u.as_str(), k.as_str())),
        }
    }

    fn recorder(&self) -> Recorder {
        Recorder::Db { db: self.db.clone(), events: self.events.clone() }
    }
}

/// What switching one host needs: how to run commands on it, and where its
/// steps are recorded.
pub struct Switch<'a> {
    pub ssh: &'a Ssh,
    pub rec: &'a Recorder,
    pub activate_timeout: Duration,
    pub substituter: Option<(&'a str, &'a str)>,
}

/// Runs deployment `id` of an environment declared as `env` to its end.
pub async fn run(ctx: &Ctx, env: &spec::Environment, id: i64) -> Result<String, RecordError> {
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
        let rec = ctx.recorder();
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
            let results = join_all(hosts.iter().map(|h| host_part(ctx, &rec, env, id, h))).await;
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
                    roll_back_all(ctx, &rec, env, id, &rows).await?;
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

/// One host's part: switched over SSH, or left to its agent.
async fn host_part(
    ctx: &Ctx,
    rec: &Recorder,
    env: &spec::Environment,
    id: i64,
    row: &HostRow,
) -> Result<String, RecordError> {
    if row.is_done() {
        return Ok(row.status.clone());
    }
    let Some(h) = env.hosts.get(&row.host) else {
        return finish(rec, id, &row.host, dh::FAILED, format!("{} is no longer declared", row.host)).await;
    };
    if h.pull {
        return await_agent(ctx, env, id, row).await;
    }
    let t = match Target::of(&row.host, h) {
        Ok(t) => t,
        Err(e) => return finish(rec, id, &row.host, dh::FAILED, e.to_string()).await,
    };
    switch_host(&ctx.switch(rec), h, &t, env.confirm_timeout_s, &env.checks_of(&row.host), id, row).await
}

/// A pull host: offered to its agent when its wave comes, then followed
/// through the agent's reports until it ends. An agent that does not take
/// it within `agent_wait`, or stops reporting, fails the host.
async fn await_agent(ctx: &Ctx, env: &spec::Environment, id: i64, row: &HostRow) -> Result<String, RecordError> {
    {
        let mut c = ctx.db.conn().await?;
        dh::set_status_if(c.ex(), id, &row.host, &[dh::PENDING], dh::WAITING, None).await?;
    }
    ctx.changed(id);
    info!(host = %row.host, "waiting for the host's agent");
    let checks: u64 = env.checks_of(&row.host).iter().map(|c| c.timeout_s + 30).sum();
    let working = ctx.activate_timeout + Duration::from_secs(env.confirm_timeout_s + checks + 300);
    let offered = Instant::now();
    let mut taken: Option<Instant> = None;
    loop {
        let now = {
            let mut c = ctx.db.conn().await?;
            dh::get(c.ex(), id, &row.host).await?
        };
        let Some(now) = now else { return Ok(dh::FAILED.to_string()) };
        if now.is_done() {
            return Ok(now.status);
        }
        let (from, why) = if now.status == dh::WAITING {
            (dh::WAITING, format!("its agent did not take the closure within {} s", ctx.agent_wait.as_secs()))
        } else {
            taken.get_or_insert_with(Instant::now);
            (now.status.as_str(), format!("its agent stopped reporting for {} s", working.as_secs()))
        };
        let late = match taken {
            None => offered.elapsed() > ctx.agent_wait,
            Some(t) => t.elapsed() > working,
        };
        if late {
            let mut c = ctx.db.conn().await?;
            if dh::set_status_if(c.ex(), id, &row.host, &[from], dh::FAILED, Some(&why)).await? {
                drop(c);
                ctx.changed(id);
                warn!(host = %row.host, error = %why, "pull host failed");
                return Ok(dh::FAILED.to_string());
            }
            continue;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A pull host goes back through its agent, which takes the part again as
/// `rolling-back`; an agent that does not report the rollback within the
/// activation timeout (and a minute) leaves the host `rollback-failed`.
async fn agent_roll_back(ctx: &Ctx, id: i64, host: &str) -> Result<(), RecordError> {
    let why = "rolling back: a later wave failed (on_failure = \"rollback-all\")";
    {
        let mut c = ctx.db.conn().await?;
        if !dh::set_status_if(c.ex(), id, host, &[dh::SUCCEEDED], dh::ROLLING_BACK, Some(why)).await? {
            return Ok(());
        }
    }
    ctx.changed(id);
    let deadline = Instant::now() + ctx.activate_timeout + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut c = ctx.db.conn().await?;
        match dh::get(c.ex(), id, host).await? {
            Some(r) if r.status == dh::ROLLING_BACK => {}
            _ => return Ok(()),
        }
        if Instant::now() >= deadline {
            let why = format!("its agent did not roll back within {} s", (ctx.activate_timeout.as_secs() + 60));
            dh::set_status_if(c.ex(), id, host, &[dh::ROLLING_BACK], dh::ROLLBACK_FAILED, Some(&why)).await?;
            drop(c);
            ctx.changed(id);
            warn!(host, error = %why, "pull host not rolled back");
            return Ok(());
        }
    }
}

/// Hosts this deployment switched go back to what they had.
async fn roll_back_all(
    ctx: &Ctx,
    rec: &Recorder,
    env: &spec::Environment,
    id: i64,
    rows: &[HostRow],
) -> Result<(), RecordError> {
    for r in rows.iter().filter(|r| r.status == dh::SUCCEEDED) {
        let Some(h) = env.hosts.get(&r.host) else { continue };
        let Some(prev) = &r.previous_path else { continue };
        if h.pull {
            agent_roll_back(ctx, id, &r.host).await?;
            continue;
        }
        match Target::of(&r.host, h) {
            Ok(t) => {
                let sw = Switch { ssh: &ctx.ssh, rec, activate_timeout: ctx.activate_timeout, substituter: None };
                later_wave_roll_back(&sw, h, &t, id, &r.host, prev).await?;
            }
            Err(e) => rec.set(id, &r.host, dh::ROLLBACK_FAILED, Some(&e.to_string())).await?,
        }
    }
    Ok(())
}

/// Sets a host that succeeded back to `prev` because a later wave failed
/// (`on_failure = "rollback-all"`): Kiln over SSH for a push host, the
/// agent on the host for a pull host. Returns the host's status.
pub async fn later_wave_roll_back(
    sw: &Switch<'_>,
    h: &spec::Host,
    t: &Target,
    id: i64,
    host: &str,
    prev: &str,
) -> Result<&'static str, RecordError> {
    let (status, error) = match sw.ssh.roll_back(t, prev, &h.profile, &h.activate, sw.activate_timeout).await {
        Ok(o) => {
            sw.rec.log(id, host, &o.text()).await?;
            (dh::ROLLED_BACK, "rolled back: a later wave failed (on_failure = \"rollback-all\")".to_string())
        }
        Err(e) => (dh::ROLLBACK_FAILED, format!("rolling back after a later wave failed: {e}")),
    };
    sw.rec.set(id, host, status, Some(&error)).await?;
    Ok(status)
}

/// A fresh host-side directory for one switch.
fn work_dir() -> String {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the OS has randomness");
    format!("/tmp/kiln-deploy-{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
}

async fn finish(rec: &Recorder, id: i64, host: &str, status: &str, error: String) -> Result<String, RecordError> {
    rec.set(id, host, status, (!error.is_empty()).then_some(error.as_str())).await?;
    info!(host, status, error = %error, "host done");
    Ok(status.to_string())
}

/// Switches one host (`t`: over SSH, or here for the agent) and records
/// each step; returns its final status.
pub async fn switch_host(
    sw: &Switch<'_>,
    h: &spec::Host,
    t: &Target,
    confirm_timeout_s: u64,
    checks: &[HealthCheck],
    id: i64,
    row: &HostRow,
) -> Result<String, RecordError> {
    let span = info_span!("host", host = %row.host);
    let rec = sw.rec;
    let r = async {
        // An earlier attempt (before a restart) may have left a watchdog.
        if let Some(old) = &row.work_dir {
            match sw.ssh.disarm(t, old).await {
                Ok(true) if rec.is_agent() => {
                    // The agent lost Kiln after activating: switching
                    // again would most likely cut it off again.
                    rec.log(id, &row.host, "kiln: the earlier attempt's watchdog had rolled back\n").await?;
                    return Ok((
                        dh::ROLLED_BACK,
                        "not confirmed: the agent could not reach Kiln after activating; the host's watchdog rolled back"
                            .to_string(),
                    ));
                }
                Ok(true) => rec.log(id, &row.host, "kiln: the earlier attempt's watchdog had rolled back\n").await?,
                Ok(false) => {}
                Err(e) => return Ok((dh::FAILED, e.to_string())),
            }
        }
        let current = match sw.ssh.current(t, &h.profile).await {
            Ok(c) => c,
            Err(e) => return Ok((dh::FAILED, e.to_string())),
        };
        if row.work_dir.is_none() && current.as_deref() == Some(row.store_path.as_str()) {
            rec.log(id, &row.host, &format!("kiln: {} already runs {}\n", row.host, row.store_path)).await?;
            return Ok((dh::SKIPPED, "unchanged: the host already runs this closure".to_string()));
        }
        let dir = work_dir();
        let previous = rec.begin_switch(id, &row.host, current.as_deref(), &dir).await?;
        if previous.is_none() {
            rec.log(id, &row.host, "kiln: first deployment of this host: there is nothing to roll back to\n").await?;
        }
        let row = HostRow { previous_path: previous.clone(), work_dir: Some(dir.clone()), ..row.clone() };
        let started = sw
            .ssh
            .start_switch(
                t,
                &row.store_path,
                previous.as_deref(),
                &h.profile,
                &h.activate,
                &dir,
                confirm_timeout_s,
                sw.activate_timeout.as_secs(),
                sw.substituter,
            )
            .await;
        match started {
            Ok(o) => rec.log(id, &row.host, &o.text()).await?,
            // Refused before the profile changed (the closure cannot be
            // had, the profile cannot be set): nothing to undo.
            Err(e @ HostError::Failed { .. }) => return Ok((dh::FAILED, e.to_string())),
            Err(e) => return after_failure(sw, h, t, id, &row, &dir, e.to_string()).await,
        }
        let activation = sw.ssh.wait_activation(t, &dir, sw.activate_timeout).await;
        let activated_at = Instant::now();
        let activation_log = match activation {
            Ok(o) if o.ok() => o.text(),
            Ok(o) => {
                rec.log(id, &row.host, &o.text()).await?;
                let why =
                    format!("activation failed (exit status {})", o.code.map_or("none".into(), |c| c.to_string()));
                return after_failure(sw, h, t, id, &row, &dir, why).await;
            }
            Err(e) => return after_failure(sw, h, t, id, &row, &dir, e.to_string()).await,
        };
        let deadline = activated_at + Duration::from_secs(confirm_timeout_s);
        // The first word to Kiln after activating, within the confirmation
        // time: for the agent, its link to Kiln is what it confirms, and
        // without it the watchdog decides. (The activation's log comes
        // after, so a host cut off does not spend that time retrying it.)
        if let Err(e) = rec.set_within(id, &row.host, dh::CHECKING, None, Duration::from_secs(confirm_timeout_s)).await {
            if !rec.is_agent() {
                return Err(e);
            }
            let why = format!("cannot reach Kiln after activation ({e})");
            return watchdog_result(sw, t, id, &row.host, &dir, why, &activation_log).await;
        }
        rec.log(id, &row.host, &activation_log).await?;
        // Confirmed over a new connection: a host that no longer lets Kiln
        // in is left to its watchdog.
        let confirmed = loop {
            match sw.ssh.confirm(t, &dir).await {
                Ok(c) => break Ok(c),
                Err(e) if Instant::now() >= deadline => break Err(e),
                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        };
        match confirmed {
            Ok(true) => {}
            Ok(false) => return watchdog_result(sw, t, id, &row.host, &dir, "not confirmed in time".into(), "").await,
            Err(e) => {
                let why = format!("unreachable after activation ({e})");
                if previous.is_none() {
                    return Ok((dh::FAILED, format!("{why}; first deployment of this host: nothing to roll back to")));
                }
                return watchdog_result(sw, t, id, &row.host, &dir, why, "").await;
            }
        }
        let mut results: Vec<CheckResult> = Vec::new();
        for c in checks {
            let r = sw.ssh.check(t, c, &row.store_path, &h.profile).await;
            let ok = r.ok;
            results.push(r);
            rec.set_checks(id, &row.host, &results).await?;
            if !ok {
                let why = format!("health check failed: {}", c.command);
                return roll_back(sw, h, t, id, &row, why).await;
            }
        }
        Ok((dh::SUCCEEDED, String::new()))
    }
    .instrument(span)
    .await;
    let (status, error) = r?;
    finish(rec, id, &row.host, status, error).await
}

/// After a failure once the profile may have changed: Kiln takes the
/// decision from the watchdog and rolls back itself.
async fn after_failure(
    sw: &Switch<'_>,
    h: &spec::Host,
    t: &Target,
    id: i64,
    row: &HostRow,
    dir: &str,
    why: String,
) -> Result<(&'static str, String), RecordError> {
    if row.previous_path.is_some() {
        match sw.ssh.confirm(t, dir).await {
            Ok(true) => {}
            Ok(false) => return watchdog_result(sw, t, id, &row.host, dir, why, "").await,
            Err(e) => return watchdog_result(sw, t, id, &row.host, dir, format!("{why}; then {e}"), "").await,
        }
    }
    roll_back(sw, h, t, id, row, why).await
}

/// Kiln's own rollback to the recorded previous closure.
async fn roll_back(
    sw: &Switch<'_>,
    h: &spec::Host,
    t: &Target,
    id: i64,
    row: &HostRow,
    why: String,
) -> Result<(&'static str, String), RecordError> {
    let Some(prev) = &row.previous_path else {
        return Ok((dh::FAILED, format!("{why}; first deployment of this host: nothing to roll back to")));
    };
    match sw.ssh.roll_back(t, prev, &h.profile, &h.activate, sw.activate_timeout).await {
        Ok(o) => {
            sw.rec.log(id, &row.host, &o.text()).await?;
            Ok((dh::ROLLED_BACK, format!("{why}; rolled back to {prev}")))
        }
        Err(e) => Ok((dh::ROLLBACK_FAILED, format!("{why}; rollback to {prev} failed: {e}"))),
    }
}

/// The watchdog decided: waits (as long as a rollback may take) to read
/// what it did; `unlogged` is log text not recorded yet (the activation's,
/// when Kiln could not be told), recorded before the watchdog's.
async fn watchdog_result(
    sw: &Switch<'_>,
    t: &Target,
    id: i64,
    host: &str,
    dir: &str,
    why: String,
    unlogged: &str,
) -> Result<(&'static str, String), RecordError> {
    let deadline = Instant::now() + sw.activate_timeout + Duration::from_secs(60);
    loop {
        match sw.ssh.watchdog_outcome(t, dir, sw.activate_timeout + Duration::from_secs(120)).await {
            Ok(Some(o)) => {
                sw.rec
                    .log(id, host, &format!("{unlogged}kiln: the host's watchdog rolled back:\n{}", o.text()))
                    .await?;
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
