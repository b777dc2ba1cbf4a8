//! The `machines` table: what Kiln remembers about each builder across
//! restarts (pause, failure streak, last error). Which machines exist comes
//! from the machines file, not from here.

use serde::Serialize;

use super::{Ex, Result, now, run};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct MachineState {
    pub name: String,
    pub enabled: bool,
    pub paused_until: Option<i64>,
    pub consecutive_failures: i64,
    pub last_failure_at: Option<i64>,
    pub last_error: Option<String>,
    pub steps_done: i64,
    pub updated_at: i64,
}

macro_rules! cols {
    () => {
        "name, enabled, paused_until, consecutive_failures, last_failure_at, last_error, steps_done, updated_at"
    };
}

pub async fn get(ex: Ex<'_>, name: &str) -> Result<Option<MachineState>> {
    let sql = concat!("SELECT ", cols!(), " FROM machines WHERE name = $1");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(name).fetch_optional(&mut *c).await?))
}

pub async fn list(ex: Ex<'_>) -> Result<Vec<MachineState>> {
    let sql = concat!("SELECT ", cols!(), " FROM machines ORDER BY name");
    Ok(run!(ex, c => sqlx::query_as(sql).fetch_all(&mut *c).await?))
}

/// A step finished on the machine without a machine fault: the streak ends.
pub async fn record_success(ex: Ex<'_>, name: &str) -> Result<()> {
    run!(ex, c => sqlx::query(
        "INSERT INTO machines (name, steps_done, updated_at) VALUES ($1, 1, $2)
         ON CONFLICT (name) DO UPDATE SET consecutive_failures = 0, steps_done = machines.steps_done + 1,
             updated_at = excluded.updated_at")
        .bind(name).bind(now()).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// A machine fault (connection lost, protocol error). Pauses the machine
/// until `pause_until` when given. Returns the failure streak.
pub async fn record_failure(ex: Ex<'_>, name: &str, error: &str, pause_until: Option<i64>) -> Result<i64> {
    Ok(run!(ex, c => sqlx::query_scalar(
        "INSERT INTO machines (name, consecutive_failures, last_failure_at, last_error, paused_until, updated_at)
         VALUES ($1, 1, $2, $3, $4, $2)
         ON CONFLICT (name) DO UPDATE SET consecutive_failures = machines.consecutive_failures + 1,
             last_failure_at = excluded.last_failure_at, last_error = excluded.last_error,
             paused_until = COALESCE(excluded.paused_until, machines.paused_until), updated_at = excluded.updated_at
         RETURNING consecutive_failures")
        .bind(name).bind(now()).bind(error).bind(pause_until).fetch_one(&mut *c).await?))
}

/// An operator's choice. Enabling also ends a pause, so that the machine
/// is used again at once; disabling keeps the pause to show.
pub async fn set_enabled(ex: Ex<'_>, name: &str, enabled: bool) -> Result<()> {
    run!(ex, c => sqlx::query(
        "INSERT INTO machines (name, enabled, updated_at) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE SET enabled = excluded.enabled,
             paused_until = CASE WHEN excluded.enabled THEN NULL ELSE machines.paused_until END,
             updated_at = excluded.updated_at")
        .bind(name).bind(enabled).bind(now()).execute(&mut *c).await?.rows_affected());
    Ok(())
}
