//! Dispatch: takes the best runnable step of each platform to the machine
//! that fits with the lowest load, and runs one attempt of it on a task
//! of its own, whose result comes back to the runner as an event.

use super::*;

impl Runner {
    pub(super) async fn dispatch(&mut self) {
        if self.draining {
            if !self.steps.values().any(|s| s.running) {
                for w in self.drain_waiters.drain(..) {
                    let _ = w.send(());
                }
            }
            return;
        }
        let platforms: Vec<Platform> = self.ready.iter().filter(|(_, r)| r.len > 0).map(|(p, _)| p.clone()).collect();
        for platform in platforms {
            let mut skip = HashSet::new();
            while let Some(step) = self.best_of(&platform, &skip) {
                let avoid = self.steps[&step].avoid.clone();
                let Some(mi) = self.pick_machine(&platform, &avoid, self.resume_on.get(&step).map(String::as_str))
                else {
                    // This step waits for a machine; lower ones might not.
                    skip.insert(step);
                    if skip.len() > 32 {
                        break;
                    }
                    continue;
                };
                if let Err(e) = self.start_step(step, mi).await {
                    warn!(step, error = %e, "cannot start a step");
                    break;
                }
            }
        }
    }

    pub(super) async fn start_step(&mut self, id: i64, mi: usize) -> Result<(), DbError> {
        let uri = self.machines[mi].m.uri.clone();
        self.resume_on.remove(&id);
        {
            // One time for the step and the builds it is the first step of,
            // so that a build never starts after its first step.
            let at = db::now();
            let mut tx = self.db.begin().await?;
            steps::mark_running(tx.ex(), id, &uri, at).await?;
            let of: Vec<i64> = self.steps.get(&id).map(|s| s.builds.iter().copied().collect()).unwrap_or_default();
            builds::set_started(tx.ex(), &of, at).await?;
            tx.commit().await?;
        }
        if let Some(s) = self.steps.get(&id) {
            let builds = s.builds.iter().copied().collect();
            self.announce(Announce::StepStarted { step: id, drv: s.drv_path.clone(), machine: uri.clone(), builds });
        }
        self.unqueue(id);
        if let Some(since) = self.steps.get(&id).and_then(|s| s.runnable_since) {
            self.latencies.push(since.elapsed().as_secs_f64());
        }
        let (drv_path, timeout, max_silent) = {
            let s = self.steps.get_mut(&id).expect("live step");
            s.running = true;
            s.tries += 1;
            let (t, ms) = s
                .builds
                .iter()
                .filter_map(|b| self.builds.get(b))
                .fold((0i64, 0i64), |(t, ms), b| (t.max(b.timeout), ms.max(b.max_silent)));
            (s.drv_path.clone(), if t > 0 { t } else { 36000 }, if ms > 0 { ms } else { 7200 })
        };
        let note = self.steps.get(&id).and_then(|s| s.note.clone());
        let ms = &mut self.machines[mi];
        ms.running += 1;
        let conn = ms.idle.pop();
        let machine = ms.m.clone();
        let parts = Parts {
            sessions: self.sessions.clone(),
            cache: self.cache.clone(),
            upstreams: self.upstreams.clone(),
            logs: self.logs.clone(),
            db: self.db.clone(),
        };
        let tx = self.tx.clone();
        self.next_attempt += 1;
        let attempt = self.next_attempt;
        let (cancel, cancelled) = oneshot::channel::<()>();
        self.attempts.insert(id, RunningAttempt { no: attempt, machine: uri.clone(), cancel });
        let job = Job {
            step: id,
            drv_path,
            timeout,
            max_silent,
            max_log: self.config.max_log_mib.saturating_mul(1 << 20),
            builders_substitute: self.config.builders_use_substitutes,
            mirror_upstream: self.cache.mirror_upstream(),
            note,
        };
        debug!(step = id, drv = %job.drv_path, machine = %uri, "dispatching");
        tokio::spawn(
            async move {
                let start = Instant::now();
                let (outcome, conn) = tokio::select! {
                    r = run_attempt(&parts, &machine, conn, &job) => r,
                    // The sender went: the step was cancelled (or the
                    // runner ended). Dropping the attempt ends it remotely.
                    _ = cancelled => return,
                };
                let _ = tx.send(Event::Done {
                    step: id,
                    attempt,
                    machine: machine.uri.clone(),
                    outcome,
                    secs: start.elapsed().as_secs_f64(),
                    conn: conn.map(Box::new),
                });
            }
            .instrument(info_span!("step", step = id)),
        );
        Ok(())
    }
}

/// What an attempt works with.
pub(super) struct Parts {
    sessions: Arc<Sessions>,
    cache: Cache,
    upstreams: Upstreams,
    logs: Logs,
    db: Db,
}

/// One attempt's step and settings.
pub(super) struct Job {
    step: i64,
    drv_path: String,
    timeout: i64,
    max_silent: i64,
    max_log: u64,
    builders_substitute: bool,
    mirror_upstream: bool,
    note: Option<String>,
}

/// One attempt of a step on a machine, with its connection (reused if it
/// is still good afterwards).
pub(super) async fn run_attempt(
    parts: &Parts,
    machine: &Machine,
    conn: Option<Connection>,
    job: &Job,
) -> (Result<Outcome, String>, Option<Connection>) {
    let mut conn = match conn {
        Some(c) => c,
        None => match parts.sessions.connect(machine).await {
            Ok(c) => c,
            Err(e) => return (Err(e.to_string()), None),
        },
    };
    let spec = StepSpec {
        drv_path: &job.drv_path,
        max_silent_s: job.max_silent.max(0) as u64,
        timeout_s: job.timeout.max(0) as u64,
        max_log_bytes: job.max_log,
        builders_substitute: job.builders_substitute,
        mirror_upstream: job.mirror_upstream,
        note: job.note.as_deref(),
    };
    let (ptx, mut prx) = mpsc::unbounded_channel::<&'static str>();
    let db2 = parts.db.clone();
    let step = job.step;
    let phases = tokio::spawn(async move {
        while let Some(p) = prx.recv().await {
            if let Ok(mut c) = db2.conn().await {
                let _ = steps::set_phase(c.ex(), step, p).await;
            }
        }
    });
    let r = run::run_step(&mut conn, &parts.cache, &parts.upstreams, &parts.logs, &spec, |p| {
        let _ = ptx.send(p);
    })
    .await;
    drop(ptx);
    let _ = phases.await;
    match r {
        // Only a clean ending leaves the connection in a known state.
        Ok(o @ (Outcome::Built { .. } | Outcome::Failed { .. })) => (Ok(o), Some(conn)),
        Ok(o) => (Ok(o), None),
        Err(e) => {
            let mut msg = e.to_string();
            let tail = conn.stderr_tail();
            if !tail.trim().is_empty() {
                msg.push_str(": ");
                msg.push_str(tail.trim().lines().last().unwrap_or(""));
            }
            (Err(msg), None)
        }
    }
}
