//! The standby: while another process runs the queue, actions taken here
//! go to the database, where that process's rescan finds them.

use super::*;

impl Runner {
    /// While another process runs the queue: actions go to the database,
    /// where that process's rescan finds them; nothing waits on a runner.
    pub(super) async fn handle_standby(&mut self, ev: Event) -> Result<(), DbError> {
        match ev {
            Event::Enqueue(_, done) => {
                let _ = done.send(());
            }
            Event::Cancel(id) => {
                let mut tx = self.db.begin().await?;
                if builds::get(tx.ex(), id).await?.is_some_and(|b| !b.finished) {
                    builds::finish(tx.ex(), id, BuildStatus::Cancelled, false, None, Some("cancelled")).await?;
                    self.report(tx.ex(), id).await?;
                }
                tx.commit().await?;
            }
            Event::Restart(id) => {
                self.reopen(id).await?;
            }
            Event::Bump(id) => {
                let mut c = self.db.conn().await?;
                builds::bump(c.ex(), id).await?;
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
