//! The `steps`, `step_deps` and `step_outputs` tables: one step per
//! derivation, shared by every build that needs it, with the edges to the
//! steps it depends on and the outputs it produced.

use serde::Serialize;

use super::{Ex, Result, now, run};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Step {
    pub id: i64,
    pub drv_path: String,
    pub system: String,
    /// Space-separated `requiredSystemFeatures`.
    pub required_features: String,
    /// `waiting`, `runnable`, `running`, `succeeded`, `failed` (remembered
    /// as a cached failure), `aborted` (not remembered) or `substituted`.
    pub state: String,
    pub build_status: Option<i64>,
    pub phase: Option<String>,
    pub machine: Option<String>,
    pub tries: i64,
    pub next_try_at: Option<i64>,
    pub timeout: Option<i64>,
    pub max_silent: Option<i64>,
    pub created_at: i64,
    pub start_time: Option<i64>,
    pub stop_time: Option<i64>,
    pub error: Option<String>,
    pub log_file: Option<String>,
}

macro_rules! cols {
    () => {
        "id, drv_path, system, required_features, state, build_status, phase, machine, tries, next_try_at, \
         timeout, max_silent, created_at, start_time, stop_time, error, log_file"
    };
}

/// Returns the step for `drv_path`, creating it in `state` if there is none;
/// the flag says whether it was created. Concurrent callers get one step.
pub async fn get_or_create(
    mut ex: Ex<'_>,
    drv_path: &str,
    system: &str,
    required_features: &str,
    state: &str,
) -> Result<(Step, bool)> {
    let insert = concat!(
        "INSERT INTO steps (drv_path, system, required_features, state, created_at) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (drv_path) DO NOTHING RETURNING ",
        cols!()
    );
    let created: Option<Step> = run!(ex.re(), c => sqlx::query_as(insert)
        .bind(drv_path).bind(system).bind(required_features).bind(state).bind(now())
        .fetch_optional(&mut *c).await?);
    if let Some(s) = created {
        return Ok((s, true));
    }
    let existing = get_by_drv(ex, drv_path).await?;
    existing.map(|s| (s, false)).ok_or_else(|| super::DbError::NotFound(format!("step for {drv_path}")))
}

pub async fn get(ex: Ex<'_>, id: i64) -> Result<Option<Step>> {
    let sql = concat!("SELECT ", cols!(), " FROM steps WHERE id = $1");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(id).fetch_optional(&mut *c).await?))
}

pub async fn get_by_drv(ex: Ex<'_>, drv_path: &str) -> Result<Option<Step>> {
    let sql = concat!("SELECT ", cols!(), " FROM steps WHERE drv_path = $1");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(drv_path).fetch_optional(&mut *c).await?))
}

pub async fn add_dep(ex: Ex<'_>, step_id: i64, dep_id: i64) -> Result<()> {
    run!(ex, c => sqlx::query("INSERT INTO step_deps (step_id, dep_id) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .bind(step_id).bind(dep_id).execute(&mut *c).await?.rows_affected());
    Ok(())
}

pub async fn deps(ex: Ex<'_>, step_id: i64) -> Result<Vec<i64>> {
    Ok(run!(ex, c => sqlx::query_scalar("SELECT dep_id FROM step_deps WHERE step_id = $1 ORDER BY dep_id")
        .bind(step_id).fetch_all(&mut *c).await?))
}

/// Steps that depend on `dep_id`.
pub async fn dependents(ex: Ex<'_>, dep_id: i64) -> Result<Vec<i64>> {
    Ok(run!(ex, c => sqlx::query_scalar("SELECT step_id FROM step_deps WHERE dep_id = $1 ORDER BY step_id")
        .bind(dep_id).fetch_all(&mut *c).await?))
}

/// Moves a step from one state to another; false if it was not in `from`
/// (someone else moved it first).
pub async fn transition(ex: Ex<'_>, id: i64, from: &str, to: &str) -> Result<bool> {
    let n = run!(ex, c => sqlx::query("UPDATE steps SET state = $3 WHERE id = $1 AND state = $2")
        .bind(id).bind(from).bind(to).execute(&mut *c).await?.rows_affected());
    Ok(n == 1)
}

pub async fn set_output(ex: Ex<'_>, step_id: i64, name: &str, path: &str) -> Result<()> {
    run!(ex, c => sqlx::query(
        "INSERT INTO step_outputs (step_id, name, path) VALUES ($1, $2, $3)
         ON CONFLICT (step_id, name) DO UPDATE SET path = excluded.path")
        .bind(step_id).bind(name).bind(path).execute(&mut *c).await?.rows_affected());
    Ok(())
}

pub async fn outputs(ex: Ex<'_>, step_id: i64) -> Result<Vec<(String, String)>> {
    Ok(run!(ex, c => sqlx::query_as("SELECT name, path FROM step_outputs WHERE step_id = $1 ORDER BY name")
        .bind(step_id).fetch_all(&mut *c).await?))
}

/// Count of steps per state, for the queue summary.
pub async fn count_by_state(ex: Ex<'_>) -> Result<Vec<(String, i64)>> {
    Ok(run!(ex, c => sqlx::query_as("SELECT state, COUNT(*) FROM steps GROUP BY state ORDER BY state")
        .fetch_all(&mut *c).await?))
}

/// Marks a step dispatched to `machine` at `at` (one more try).
pub async fn mark_running(ex: Ex<'_>, id: i64, machine: &str, at: i64) -> Result<()> {
    run!(ex, c => sqlx::query(
        "UPDATE steps SET state = 'running', machine = $2, tries = tries + 1, start_time = $3, stop_time = NULL,
             phase = 'connecting', next_try_at = NULL WHERE id = $1")
        .bind(id).bind(machine).bind(at).execute(&mut *c).await?.rows_affected());
    Ok(())
}

pub async fn set_phase(ex: Ex<'_>, id: i64, phase: &str) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE steps SET phase = $2 WHERE id = $1 AND state = 'running'")
        .bind(id).bind(phase).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// A finished step: `succeeded` (status 0), `failed` (the derivation's own
/// failure, 1 or 6: remembered, so other builds of it are cached failures
/// until a restart) or `aborted` (any other status: timed out, a limit, a
/// machine or coordinator fault; built again when a build needs it).
pub async fn finish(
    mut ex: Ex<'_>,
    id: i64,
    build_status: i64,
    error: Option<&str>,
    log_file: Option<&str>,
) -> Result<()> {
    let state = match build_status {
        0 => "succeeded",
        1 | 6 => "failed",
        _ => "aborted",
    };
    let took: Option<Option<i64>> = run!(ex.re(), c => sqlx::query_scalar(
        "UPDATE steps SET state = $2, build_status = $3, error = $4, log_file = COALESCE($5, log_file), stop_time = $6,
             phase = NULL WHERE id = $1 RETURNING stop_time - start_time")
        .bind(id).bind(state).bind(build_status).bind(error).bind(log_file).bind(now())
        .fetch_optional(&mut *c).await?);
    // What /metrics shows of builds: those that ran to a result.
    if let Some(Some(secs)) = took
        && state != "aborted"
    {
        super::histograms::observe(ex, super::histograms::STEP_DURATION, secs as f64).await?;
    }
    Ok(())
}

/// Puts a step back in the queue after a machine-side failure.
pub async fn retry_later(ex: Ex<'_>, id: i64, error: &str, next_try_at: i64) -> Result<()> {
    run!(ex, c => sqlx::query(
        "UPDATE steps SET state = 'runnable', error = $2, next_try_at = $3, phase = NULL, stop_time = $4 WHERE id = $1")
        .bind(id).bind(error).bind(next_try_at).bind(now()).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Sets a step's state (waiting or runnable) without touching the rest.
pub async fn set_state(ex: Ex<'_>, id: i64, state: &str) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE steps SET state = $2 WHERE id = $1").bind(id).bind(state).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Steps a crash left running go back to the queue.
/// Steps a runner that died left running go back to the queue; which
/// they are, with the machine each ran on.
pub async fn reset_running(ex: Ex<'_>) -> Result<Vec<(i64, Option<String>)>> {
    Ok(run!(ex, c => sqlx::query_as(
        "UPDATE steps SET state = 'runnable', phase = NULL WHERE state = 'running' RETURNING id, machine")
        .fetch_all(&mut *c).await?))
}

/// Forgets a failure so the step is built again (restart).
pub async fn reset_failed(ex: Ex<'_>, id: i64) -> Result<()> {
    run!(ex, c => sqlx::query(
        "UPDATE steps SET state = 'waiting', build_status = NULL, tries = 0, error = NULL, next_try_at = NULL
         WHERE id = $1 AND state = 'failed'")
        .bind(id).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Running steps with their machine and phase, for the status pages.
pub async fn running(ex: Ex<'_>) -> Result<Vec<Step>> {
    let sql = concat!("SELECT ", cols!(), " FROM steps WHERE state = 'running' ORDER BY start_time, id");
    Ok(run!(ex, c => sqlx::query_as(sql).fetch_all(&mut *c).await?))
}

/// Every step a build needs (its top step's closure), newest first.
pub async fn closure_of(ex: Ex<'_>, top: i64) -> Result<Vec<Step>> {
    let sql = concat!(
        "WITH RECURSIVE closure(id) AS (SELECT $1 UNION SELECT d.dep_id FROM step_deps d JOIN closure c ON d.step_id = c.id)
         SELECT ",
        cols!(),
        " FROM steps WHERE id IN (SELECT id FROM closure) ORDER BY start_time DESC, id DESC"
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(top).fetch_all(&mut *c).await?))
}

/// Runnable steps, oldest first, for the queue page.
pub async fn runnable(ex: Ex<'_>, limit: i64) -> Result<Vec<Step>> {
    let sql = concat!("SELECT ", cols!(), " FROM steps WHERE state = 'runnable' ORDER BY id LIMIT $1");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(limit).fetch_all(&mut *c).await?))
}

/// Recently failed steps of a machine.
pub async fn failed_on(ex: Ex<'_>, machine: &str, limit: i64) -> Result<Vec<Step>> {
    let sql = concat!(
        "SELECT ",
        cols!(),
        " FROM steps WHERE machine = $1 AND state IN ('failed', 'aborted') ORDER BY stop_time DESC LIMIT $2"
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(machine).bind(limit).fetch_all(&mut *c).await?))
}

/// A step to create if its derivation has none.
pub struct NewStep<'a> {
    pub drv_path: &'a str,
    pub system: &'a str,
    pub required_features: String,
    pub state: &'a str,
}

const ROWS_PER_STATEMENT: usize = 200;

/// What the queue's walk needs of a step row: a few fields, since a walk
/// may hold a hundred thousand of them at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRef {
    pub id: i64,
    pub state: String,
    pub build_status: Option<i64>,
    pub tries: i64,
    pub next_try_at: Option<i64>,
}

type RefRow = (String, i64, String, Option<i64>, i64, Option<i64>);

fn by_drv(rows: Vec<RefRow>) -> impl Iterator<Item = (String, StepRef)> {
    rows.into_iter().map(|(d, id, state, build_status, tries, next_try_at)| {
        (d, StepRef { id, state, build_status, tries, next_try_at })
    })
}

/// Creates the steps that do not exist yet (one multi-row statement per
/// few hundred) and returns every asked-for step by derivation: the walk of
/// a whole batch of builds costs a few round trips, not one per derivation.
pub async fn get_or_create_many(
    mut ex: Ex<'_>,
    new: &[NewStep<'_>],
) -> Result<std::collections::HashMap<String, StepRef>> {
    let t = now();
    let mut out: std::collections::HashMap<String, StepRef> = std::collections::HashMap::with_capacity(new.len());
    for chunk in new.chunks(ROWS_PER_STATEMENT) {
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO steps (drv_path, system, required_features, state, created_at) VALUES {}
             ON CONFLICT (drv_path) DO NOTHING RETURNING drv_path, id, state, build_status, tries, next_try_at",
            super::builds::values_placeholders(ex.backend(), chunk.len(), 5, 1)
        ));
        let created: Vec<RefRow> = run!(ex.re(), c => {
            let mut q = sqlx::query_as(sql);
            for s in chunk {
                q = q.bind(s.drv_path).bind(s.system).bind(&s.required_features).bind(s.state).bind(t);
            }
            q.fetch_all(&mut *c).await?
        });
        out.extend(by_drv(created));
    }
    // Those that existed already.
    let rest: Vec<&str> = new.iter().map(|s| s.drv_path).filter(|d| !out.contains_key(*d)).collect();
    out.extend(get_many_by_drv(ex, &rest).await?);
    Ok(out)
}

/// The steps of these derivations that exist, by derivation.
pub async fn get_many_by_drv(mut ex: Ex<'_>, drvs: &[&str]) -> Result<Vec<(String, StepRef)>> {
    let mut out = Vec::with_capacity(drvs.len());
    for chunk in drvs.chunks(ROWS_PER_STATEMENT) {
        let sql = sqlx::AssertSqlSafe(format!(
            "SELECT drv_path, id, state, build_status, tries, next_try_at FROM steps WHERE drv_path IN {}",
            super::builds::values_placeholders(ex.backend(), 1, chunk.len(), 1)
        ));
        let rows: Vec<RefRow> = run!(ex.re(), c => {
            // Not prepared, as `builds::find_many_in_jobset`: the table grows
            // from nothing within one evaluation.
            let mut q = sqlx::query_as(sql).persistent(false);
            for d in chunk {
                q = q.bind(*d);
            }
            q.fetch_all(&mut *c).await?
        });
        out.extend(by_drv(rows));
    }
    Ok(out)
}

/// Adds edges (step, the step it depends on), skipping those that exist.
pub async fn add_deps_many(mut ex: Ex<'_>, edges: &[(i64, i64)]) -> Result<()> {
    for chunk in edges.chunks(ROWS_PER_STATEMENT) {
        let sql = sqlx::AssertSqlSafe(format!(
            "INSERT INTO step_deps (step_id, dep_id) VALUES {} ON CONFLICT DO NOTHING",
            super::builds::values_placeholders(ex.backend(), chunk.len(), 2, 1)
        ));
        run!(ex.re(), c => {
            let mut q = sqlx::query(sql);
            for (s, d) in chunk {
                q = q.bind(*s).bind(*d);
            }
            q.execute(&mut *c).await?.rows_affected()
        });
    }
    Ok(())
}

/// Moves the given steps to `to`, except those in one of `unless` states
/// (at least one).
pub async fn set_state_many(mut ex: Ex<'_>, ids: &[i64], to: &str, unless: &[&str]) -> Result<u64> {
    assert!(!unless.is_empty(), "set_state_many needs a state to leave alone");
    let mut n = 0;
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let b = ex.backend();
        let sql = sqlx::AssertSqlSafe(format!(
            "UPDATE steps SET state = {} WHERE state NOT IN {} AND id IN {}",
            super::builds::values_placeholders(b, 1, 1, 1),
            super::builds::values_placeholders(b, 1, unless.len(), 2),
            super::builds::values_placeholders(b, 1, chunk.len(), 2 + unless.len())
        ));
        n += run!(ex.re(), c => {
            let mut q = sqlx::query(sql).bind(to);
            for u in unless {
                q = q.bind(*u);
            }
            for id in chunk {
                q = q.bind(*id);
            }
            q.execute(&mut *c).await?.rows_affected()
        });
    }
    Ok(n)
}

/// Forgets every failure remembered in the closure of step `top` (a
/// restart): those steps are built again.
pub async fn reset_failed_closure(ex: Ex<'_>, top: i64) -> Result<u64> {
    Ok(run!(ex, c => sqlx::query(
        "WITH RECURSIVE closure(id) AS (SELECT $1 UNION SELECT d.dep_id FROM step_deps d JOIN closure c ON d.step_id = c.id)
         UPDATE steps SET state = 'waiting', build_status = NULL, tries = 0, error = NULL, next_try_at = NULL
         WHERE state = 'failed' AND id IN (SELECT id FROM closure)")
        .bind(top).execute(&mut *c).await?.rows_affected()))
}

/// Moves those of `ids` that are in state `from` to `to`; returns how many.
pub async fn transition_many(mut ex: Ex<'_>, ids: &[i64], from: &str, to: &str) -> Result<u64> {
    let mut n = 0;
    for chunk in ids.chunks(ROWS_PER_STATEMENT) {
        let b = ex.backend();
        let sql = sqlx::AssertSqlSafe(format!(
            "UPDATE steps SET state = {} WHERE state = {} AND id IN {}",
            super::builds::values_placeholders(b, 1, 1, 1),
            super::builds::values_placeholders(b, 1, 1, 2),
            super::builds::values_placeholders(b, 1, chunk.len(), 3)
        ));
        n += run!(ex.re(), c => {
            let mut q = sqlx::query(sql).bind(to).bind(from);
            for id in chunk {
                q = q.bind(*id);
            }
            q.execute(&mut *c).await?.rows_affected()
        });
    }
    Ok(n)
}

/// Deletes up to `limit` finished steps that ended before `before` and that
/// no build names (as its top step or its failed step), with their edges
/// and outputs; returns their derivations and the log files they had. A
/// failure forgotten this way is built again if a build needs it.
pub async fn prune_finished(ex: Ex<'_>, before: i64, limit: i64) -> Result<Vec<(String, Option<String>)>> {
    Ok(run!(ex, c => sqlx::query_as(
        "DELETE FROM steps WHERE id IN (
           SELECT id FROM steps
           WHERE state IN ('succeeded', 'failed', 'aborted', 'substituted')
             AND COALESCE(stop_time, created_at) < $1
             AND id NOT IN (SELECT top_step_id FROM builds WHERE top_step_id IS NOT NULL)
             AND id NOT IN (SELECT failed_step_id FROM builds WHERE failed_step_id IS NOT NULL)
           LIMIT $2)
         RETURNING drv_path, log_file")
        .bind(before).bind(limit).fetch_all(&mut *c).await?))
}
