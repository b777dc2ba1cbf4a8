//! The `check_runs` table: which GitHub check run a commit's check of one
//! name is, so later states update it instead of making another. Written
//! by the sender when GitHub creates a run; forgotten on a re-run, so the
//! next state makes a new run (GitHub shows a re-run only as a new run).

use super::{Ex, Result, now, run};

/// What GitHub has of a run.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Known {
    pub run_id: i64,
    pub completed: bool,
    pub annotations_sent: i64,
}

/// The run for `target` (a commit) and `context` (the name), if GitHub has one.
pub async fn state(ex: Ex<'_>, target: &str, context: &str) -> Result<Option<Known>> {
    Ok(run!(ex, c => sqlx::query_as(
        "SELECT run_id, completed, annotations_sent FROM check_runs WHERE target = $1 AND context = $2")
        .bind(target).bind(context).fetch_optional(&mut *c).await?))
}

/// GitHub's id of the run, if it has one.
pub async fn get(ex: Ex<'_>, target: &str, context: &str) -> Result<Option<i64>> {
    Ok(state(ex, target, context).await?.map(|k| k.run_id))
}

/// Notes what GitHub took: the run's id, whether completed, annotations so far.
pub async fn record(
    ex: Ex<'_>,
    target: &str,
    context: &str,
    run_id: i64,
    completed: bool,
    annotations_sent: i64,
) -> Result<()> {
    run!(ex, c => sqlx::query(
        "INSERT INTO check_runs (target, context, run_id, completed, annotations_sent, created_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (target, context) DO UPDATE SET run_id = excluded.run_id, completed = excluded.completed,
             annotations_sent = excluded.annotations_sent")
        .bind(target).bind(context).bind(run_id).bind(completed).bind(annotations_sent).bind(now())
        .execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Forgets the run of this name on this commit: the next state makes a new one.
pub async fn forget(ex: Ex<'_>, target: &str, context: &str) -> Result<()> {
    run!(ex, c => sqlx::query("DELETE FROM check_runs WHERE target = $1 AND context = $2")
        .bind(target).bind(context).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Forgets every run of a commit (a check suite's Re-run).
pub async fn forget_target(ex: Ex<'_>, target: &str) -> Result<()> {
    run!(ex, c => sqlx::query("DELETE FROM check_runs WHERE target = $1")
        .bind(target).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// The name and target of the run GitHub knows by `run_id`.
pub async fn by_run_id(ex: Ex<'_>, run_id: i64) -> Result<Option<(String, String)>> {
    Ok(run!(ex, c => sqlx::query_as("SELECT target, context FROM check_runs WHERE run_id = $1")
        .bind(run_id).fetch_optional(&mut *c).await?))
}
