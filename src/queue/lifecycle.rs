//! The runner's life: it waits for the queue's lock (handling what a
//! standby can meanwhile), leads while it holds the lock (events, ticks,
//! dispatch), and steps down the moment the lock may be another's,
//! dropping everything it held so that the new leader starts clean.

use super::*;

impl Runner {
    pub(super) async fn main(mut self, mut rx: mpsc::UnboundedReceiver<Event>) {
        let leadership = self.leadership.take().expect("taken once");
        let mut wait = Duration::ZERO;
        loop {
            let Some(mut guard) = self.stand_by(&leadership, wait, &mut rx).await else { return };
            if wait > Duration::ZERO {
                info!("leading the queue again");
            }
            match self.lead(&mut guard, &mut rx).await {
                Ended::Stop => return,
                Ended::LostLock => {
                    self.step_down();
                    // Standbys first: they found the lock free already,
                    // and this process's connection may be what failed.
                    wait = REJOIN_AFTER;
                }
            }
        }
    }

    /// Waits for the queue's lock, handling what a standby can meanwhile;
    /// `None` when told to stop.
    async fn stand_by(
        &mut self,
        leadership: &leader::Leadership,
        wait: Duration,
        rx: &mut mpsc::UnboundedReceiver<Event>,
    ) -> Option<leader::Guard> {
        let acquire = async {
            tokio::time::sleep(wait).await;
            loop {
                match leadership.acquire().await {
                    Ok(g) => return g,
                    Err(e) => {
                        warn!(error = %e, "cannot learn which process runs the queue");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        };
        tokio::pin!(acquire);
        loop {
            tokio::select! {
                g = &mut acquire => return Some(g),
                ev = rx.recv() => match ev {
                    Some(Event::Stop) | None => return None,
                    Some(ev) => {
                        if let Err(e) = self.handle_standby(ev).await {
                            warn!(error = %e, "queue action on a standby");
                        }
                    }
                },
            }
        }
    }

    /// Runs the queue while `guard` holds the lock.
    async fn lead(&mut self, guard: &mut leader::Guard, rx: &mut mpsc::UnboundedReceiver<Event>) -> Ended {
        self.status.lock().expect("status").leading = true;
        self.reload_machines();
        if let Err(e) = self.load_machine_states().await {
            warn!(error = %e, "cannot read the machines' pauses and enabled flags");
        }
        if let Err(e) = self.recover().await {
            warn!(error = %e, "cannot load the queue from the database");
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks = 0u64;
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut remote = self.events.subscribe_remote();
        loop {
            if let Err(e) = self.write_runnable().await {
                warn!(error = %e, "recording runnable steps");
            }
            self.flush_released().await;
            self.dispatch().await;
            self.publish();
            tokio::select! {
                ev = rx.recv() => match ev {
                    Some(Event::Stop) | None => return Ended::Stop,
                    Some(ev) => {
                        if let Err(e) = self.handle(ev).await {
                            warn!(error = %e, "queue event failed");
                        }
                        // Take everything already waiting before dispatching.
                        while let Ok(ev) = rx.try_recv() {
                            if matches!(ev, Event::Stop) {
                                return Ended::Stop;
                            }
                            if let Err(e) = self.handle(ev).await {
                                warn!(error = %e, "queue event failed");
                            }
                        }
                    }
                },
                r = remote.recv() => match r {
                    Ok(ev) => {
                        if let Err(e) = self.remote_event(ev).await {
                            warn!(error = %e, "another node's event");
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.rescan_soon = true,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {}
                },
                _ = tick.tick() => {
                    // Fencing: once the lock may be another's, nothing more
                    // is dispatched or recorded here.
                    if !guard.still_held().await {
                        warn!("lost the queue's lock (its database connection ended): stopping this runner, standing by");
                        return Ended::LostLock;
                    }
                    ticks += 1;
                    if !self.unrecorded.is_empty() || !self.uncancelled.is_empty() {
                        self.retry_transitions().await;
                    }
                    // Builds other processes recorded, reopened or finished.
                    let due = ticks.is_multiple_of(RESCAN_TICKS) || std::mem::take(&mut self.rescan_soon);
                    if due && let Err(e) = self.rescan().await {
                        warn!(error = %e, "rescanning unfinished builds");
                    }
                    // Another process (a web-only one) may have enabled or
                    // disabled a machine: read the flags at each rescan too.
                    if (self.reload_machines() || ticks.is_multiple_of(RESCAN_TICKS))
                        && let Err(e) = self.load_machine_states().await
                    {
                        warn!(error = %e, "cannot read the machines' pauses and enabled flags");
                    }
                    if let Err(e) = self.fail_unsupported().await {
                        warn!(error = %e, "checking unsupported steps");
                    }
                    self.decay_usage();
                    if !self.held.is_empty() && let Err(e) = self.check_held().await {
                        warn!(error = %e, "checking aggregates' constituents");
                    }
                }
            }
        }
    }

    /// After the lock was lost: nothing more is recorded here and the
    /// queue is forgotten; the runner that holds the lock now starts the
    /// running steps again, and this one, should it lead again, reloads
    /// everything from the database. The attempts under way are left to
    /// end on their machines, their results ignored: started again on the
    /// same machine, a step waits on Nix's lock for the build under way and
    /// finds its output. Stopping them instead raced the new attempt: a
    /// cancelled local build's builder outlived its `nix-store` and wrote
    /// the output under the new build (seen as the derivation failing).
    fn step_down(&mut self) {
        for (_, a) in self.attempts.drain() {
            self.detached.insert(a.no, a.cancel);
        }
        for m in &mut self.machines {
            m.running = 0;
            m.idle.clear();
        }
        self.steps.clear();
        self.by_drv.clear();
        self.builds.clear();
        self.ready.clear();
        self.held.clear();
        self.became_runnable.clear();
        self.became_idle.clear();
        self.live_roots.clear();
        // The runner that holds the lock now runs those steps again.
        self.unrecorded.clear();
        self.uncancelled.clear();
        self.resume_on.clear();
        let mut st = self.status.lock().expect("status");
        st.leading = false;
        st.running.clear();
    }
}
