//! History: what Kiln keeps of the past, and for how long. Finished steps
//! no build names, the webhook deliveries remembered to ignore GitHub's
//! redeliveries, and the outbox's delivered or superseded statuses grow
//! with every build and every push; on a schedule (`[history]`), the old
//! ones go, with the logs of the steps that go (their earlier attempts'
//! too). Builds, evaluations and cache paths have their own retention
//! (evaluations per jobset, the cache's collector).

use std::time::Duration;

use thiserror::Error;
use tracing::{info, warn};

use crate::config::HistoryConfig;
use crate::db::{self, Db, DbError};
use crate::logs::Logs;

#[derive(Debug, Error)]
pub enum HistoryError {
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What one pruning removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pruned {
    pub steps: u64,
    pub logs: u64,
    pub webhook_deliveries: u64,
    pub outbox: u64,
}

/// Rows per statement: each batch is a short transaction of its own, so
/// pruning a large backlog never holds the database for long.
const BATCH: i64 = 5_000;

const DAY: i64 = 86_400;

/// Removes what `config` says is old at `now` (Unix seconds).
pub async fn prune(db: &Db, logs: &Logs, config: &HistoryConfig, now: i64) -> Result<Pruned, HistoryError> {
    let mut r = Pruned::default();
    if config.steps_days > 0 {
        let before = now - config.steps_days as i64 * DAY;
        loop {
            let files = {
                let mut c = db.conn().await?;
                db::steps::prune_finished(c.ex(), before, BATCH).await?
            };
            r.steps += files.len() as u64;
            for (drv, file) in &files {
                match logs.remove_all(drv, file.as_deref()) {
                    Ok(n) => r.logs += n,
                    Err(e) => warn!(drv, error = %e, "cannot delete an old step's logs"),
                }
            }
            logs.unpublish(files.iter().map(|(drv, _)| drv.as_str())).await;
            if (files.len() as i64) < BATCH {
                break;
            }
        }
    }
    let mut c = db.conn().await?;
    if config.webhook_deliveries_days > 0 {
        let before = now - config.webhook_deliveries_days as i64 * DAY;
        r.webhook_deliveries = db::webhook_deliveries::prune(c.ex(), before).await?;
    }
    if config.outbox_days > 0 {
        let before = now - config.outbox_days as i64 * DAY;
        r.outbox = db::outbox::prune(c.ex(), before).await?;
    }
    Ok(r)
}

/// Prunes every `prune_interval_s` until `stop` (in the `queue` role only:
/// one process of a deployment is enough).
pub async fn run(db: Db, logs: Logs, config: HistoryConfig, stop: impl std::future::Future<Output = ()>) {
    if config.prune_interval_s == 0 {
        return;
    }
    let every = Duration::from_secs(config.prune_interval_s);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(every) => {}
        }
        match prune(&db, &logs, &config, db::now()).await {
            Ok(p) => info!(
                steps = p.steps,
                logs = p.logs,
                webhook_deliveries = p.webhook_deliveries,
                outbox = p.outbox,
                "old history pruned"
            ),
            Err(e) => warn!(error = %e, "pruning old history failed"),
        }
    }
}
