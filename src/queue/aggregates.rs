//! Aggregates: a job with `_hydraAggregate = true` and `constituents`
//! succeeds only when its own derivation is built and every constituent
//! build succeeded, as in Hydra. Its derivation need not depend on the
//! constituents (named constituents are job names), so the runner holds
//! the build once its derivation is done and finishes it when the last
//! constituent has finished: "dependency failed" naming the constituents
//! that did not succeed, or succeeded. Held builds are checked each
//! second; they are few, and constituents may be finished elsewhere.

use super::*;

impl Runner {
    /// The aggregate's own derivation is done: it waits for its constituents.
    pub(super) fn hold_aggregate(&mut self, build: i64, jobset: i64) {
        debug!(build, "aggregate waits for its constituents");
        self.held.insert(build, jobset);
    }

    /// Finishes the held aggregates whose constituents have all finished.
    pub(super) async fn check_held(&mut self) -> Result<(), DbError> {
        let held: Vec<(i64, i64)> = self.held.iter().map(|(b, j)| (*b, *j)).collect();
        for (b, jobset) in held {
            let states = {
                let mut c = self.db.conn().await?;
                builds::constituent_states(c.ex(), b).await?
            };
            if states.iter().any(|(_, _, finished, _)| !finished) {
                continue;
            }
            let failed: Vec<&str> =
                states.iter().filter(|(_, _, _, st)| *st != Some(0)).map(|(_, job, _, _)| job.as_str()).collect();
            let (status, msg) = if failed.is_empty() {
                (BuildStatus::Succeeded, None)
            } else {
                (BuildStatus::DepFailed, Some(format!("constituents did not succeed: {}", failed.join(", "))))
            };
            let mut tx = self.db.begin().await?;
            builds::finish(tx.ex(), b, status, false, None, msg.as_deref()).await?;
            self.report(tx.ex(), b).await?;
            tx.commit().await?;
            self.held.remove(&b);
            info!(build = b, status = status.label(), "aggregate finished");
            self.announce(Announce::BuildFinished { build: b, jobset: Some(jobset), buildstatus: status as i64 });
        }
        self.idle_check();
        Ok(())
    }
}
