//! The `outbox` table: notifications (GitHub commit statuses) written in the
//! same transaction as the state change that causes them, and delivered by
//! a sender that may crash and resume. A newer message for the same target
//! and context supersedes older undelivered ones.

use serde::Serialize;

use super::{Ex, Result, now, run};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Message {
    pub id: i64,
    pub kind: String,
    pub target: String,
    pub context: String,
    pub payload: String,
    pub created_at: i64,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub delivered_at: Option<i64>,
    pub superseded: bool,
    pub last_error: Option<String>,
    pub given_up_at: Option<i64>,
}

macro_rules! cols {
    () => {
        "id, kind, target, context, payload, created_at, attempts, next_attempt_at, delivered_at, superseded, last_error, \
         given_up_at"
    };
}

/// Queues a message, superseding pending ones for the same target and context.
pub async fn enqueue(mut ex: Ex<'_>, kind: &str, target: &str, context: &str, payload: &str) -> Result<i64> {
    let t = now();
    run!(ex.re(), c => sqlx::query(
        "UPDATE outbox SET superseded = TRUE
         WHERE kind = $1 AND target = $2 AND context = $3 AND delivered_at IS NULL AND superseded = FALSE
           AND given_up_at IS NULL")
        .bind(kind).bind(target).bind(context).execute(&mut *c).await?.rows_affected());
    Ok(run!(ex, c => sqlx::query_scalar(
        "INSERT INTO outbox (kind, target, context, payload, created_at, next_attempt_at)
         VALUES ($1, $2, $3, $4, $5, $5) RETURNING id")
        .bind(kind).bind(target).bind(context).bind(payload).bind(t).fetch_one(&mut *c).await?))
}

/// Pending messages due at `at`, oldest first.
pub async fn due(ex: Ex<'_>, at: i64, limit: i64) -> Result<Vec<Message>> {
    let sql = concat!(
        "SELECT ",
        cols!(),
        " FROM outbox WHERE delivered_at IS NULL AND superseded = FALSE AND given_up_at IS NULL
         AND next_attempt_at <= $1
         ORDER BY next_attempt_at, id LIMIT $2"
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(at).bind(limit).fetch_all(&mut *c).await?))
}

pub async fn mark_delivered(ex: Ex<'_>, id: i64) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE outbox SET delivered_at = $2, attempts = attempts + 1 WHERE id = $1")
        .bind(id).bind(now()).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Records a failed attempt and when to try again.
pub async fn mark_failed(ex: Ex<'_>, id: i64, error: &str, retry_at: i64) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE outbox SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3 WHERE id = $1")
        .bind(id).bind(error).bind(retry_at).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Undelivered messages, for the status page and metrics.
pub async fn backlog(ex: Ex<'_>) -> Result<i64> {
    Ok(run!(ex, c => sqlx::query_scalar(
        "SELECT COUNT(*) FROM outbox WHERE delivered_at IS NULL AND superseded = FALSE AND given_up_at IS NULL")
        .fetch_one(&mut *c).await?))
}

/// Gives a message up for good, keeping why.
pub async fn give_up(ex: Ex<'_>, id: i64, error: &str) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE outbox SET attempts = attempts + 1, last_error = $2, given_up_at = $3 WHERE id = $1")
        .bind(id).bind(error).bind(now()).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Moves a message to `at` without counting an attempt (a rate limit).
pub async fn postpone(ex: Ex<'_>, id: i64, reason: &str, at: i64) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE outbox SET last_error = $2, next_attempt_at = $3 WHERE id = $1")
        .bind(id).bind(reason).bind(at).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Drops the undelivered messages whose context starts with `prefix`.
pub async fn drop_pending_context(ex: Ex<'_>, prefix: &str) -> Result<u64> {
    Ok(run!(ex, c => sqlx::query(
        "UPDATE outbox SET superseded = TRUE
         WHERE delivered_at IS NULL AND superseded = FALSE AND given_up_at IS NULL
           AND substr(context, 1, length($1)) = $1")
        .bind(prefix).execute(&mut *c).await?.rows_affected()))
}

/// The outbox at a glance, for the status page and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct Stats {
    /// Messages waiting to be delivered.
    pub pending: i64,
    /// Waiting messages that failed at least once.
    pub retrying: i64,
    /// Messages given up for good.
    pub given_up: i64,
    pub delivered: i64,
    /// When the oldest waiting message was written.
    pub oldest_pending_at: Option<i64>,
}

pub async fn stats(ex: Ex<'_>) -> Result<Stats> {
    Ok(run!(ex, c => sqlx::query_as(
        "SELECT
            COALESCE(SUM(CASE WHEN delivered_at IS NULL AND superseded = FALSE AND given_up_at IS NULL THEN 1 ELSE 0 END), 0) AS pending,
            COALESCE(SUM(CASE WHEN delivered_at IS NULL AND superseded = FALSE AND given_up_at IS NULL AND attempts > 0 THEN 1 ELSE 0 END), 0) AS retrying,
            COALESCE(SUM(CASE WHEN given_up_at IS NOT NULL THEN 1 ELSE 0 END), 0) AS given_up,
            COALESCE(SUM(CASE WHEN delivered_at IS NOT NULL THEN 1 ELSE 0 END), 0) AS delivered,
            MIN(CASE WHEN delivered_at IS NULL AND superseded = FALSE AND given_up_at IS NULL THEN created_at END) AS oldest_pending_at
         FROM outbox")
        .fetch_one(&mut *c).await?))
}

/// The reason of the newest message given up with a reason starting with
/// `prefix` (a permission GitHub wants granted), for `/machines`.
pub async fn last_given_up_with(ex: Ex<'_>, prefix: &str) -> Result<Option<String>> {
    Ok(run!(ex, c => sqlx::query_scalar(
        "SELECT last_error FROM outbox WHERE given_up_at IS NOT NULL AND substr(last_error, 1, length($1)) = $1
         ORDER BY id DESC LIMIT 1")
        .bind(prefix).fetch_optional(&mut *c).await?))
}

/// The messages for one target (a commit), oldest first: for tests and the API.
pub async fn for_target(ex: Ex<'_>, target: &str) -> Result<Vec<Message>> {
    let sql = concat!("SELECT ", cols!(), " FROM outbox WHERE target = $1 ORDER BY id");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(target).fetch_all(&mut *c).await?))
}

/// Deletes messages created before `before` that are done with: delivered,
/// superseded or given up. Pending ones stay, however old.
pub async fn prune(ex: Ex<'_>, before: i64) -> Result<u64> {
    Ok(run!(ex, c => sqlx::query(
        "DELETE FROM outbox WHERE created_at < $1
           AND (delivered_at IS NOT NULL OR superseded = TRUE OR given_up_at IS NOT NULL)")
        .bind(before).execute(&mut *c).await?.rows_affected()))
}
