//! The standby: while another process runs the queue, actions taken here
//! go to the database and are announced, so that process (on PostgreSQL,
//! through the event relay) acts on them within a second; its periodic
//! rescan finds them otherwise.

use super::*;

impl Runner {
    /// While another process runs the queue: actions go to the database,
    /// where that process's rescan finds them; nothing waits on a runner.
    pub(super) async fn handle_standby(&mut self, ev: Event) -> Result<(), DbError> {
        match ev {
            Event::Enqueue(ids, done) => {
                // One announcement for the batch: the leader rescans.
                if let Some(&build) = ids.last() {
                    self.events.send(crate::events::Event::BuildQueued { build, jobset: None });
                }
                let _ = done.send(());
            }
            Event::Cancel(id) => {
                let mut tx = self.db.begin().await?;
                if builds::get(tx.ex(), id).await?.is_some_and(|b| !b.finished) {
                    builds::finish(tx.ex(), id, BuildStatus::Cancelled, false, None, Some("cancelled")).await?;
                    self.report(tx.ex(), id).await?;
                }
                tx.commit().await?;
                let status = BuildStatus::Cancelled as i64;
                self.events.send(crate::events::Event::BuildFinished { build: id, jobset: None, buildstatus: status });
            }
            Event::Restart(id) => {
                self.reopen(id).await?;
                self.events.send(crate::events::Event::BuildQueued { build: id, jobset: None });
            }
            Event::Bump(id) => {
                let mut c = self.db.conn().await?;
                builds::bump(c.ex(), id).await?;
                self.events.send(crate::events::Event::BuildQueued { build: id, jobset: None });
            }
            Event::Flush(tx) | Event::Drain(tx) | Event::WhenIdle(tx) => {
                let _ = tx.send(());
            }
            // The runner that leads reads the flags at its next rescan.
            Event::Done(..) | Event::MachinesChanged | Event::Stop => {}
        }
        Ok(())
    }
}
