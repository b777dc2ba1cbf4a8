//! The `webhook_deliveries` table: the `X-GitHub-Delivery` ids of webhooks
//! already handled, so a redelivery does nothing twice.

use super::{Ex, Result, now, run};

/// Records a delivery; false if it was recorded before.
pub async fn record(ex: Ex<'_>, delivery_id: &str) -> Result<bool> {
    let n = run!(ex, c => sqlx::query(
        "INSERT INTO webhook_deliveries (delivery_id, received_at) VALUES ($1, $2) ON CONFLICT (delivery_id) DO NOTHING")
        .bind(delivery_id).bind(now()).execute(&mut *c).await?.rows_affected());
    Ok(n == 1)
}

/// Forgets deliveries older than `before` (GitHub redelivers within days).
pub async fn prune(ex: Ex<'_>, before: i64) -> Result<u64> {
    Ok(run!(ex, c => sqlx::query("DELETE FROM webhook_deliveries WHERE received_at < $1")
        .bind(before).execute(&mut *c).await?.rows_affected()))
}
