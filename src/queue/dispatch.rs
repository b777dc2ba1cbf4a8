//! Dispatch: takes the best runnable step of each platform to the machine
//! that fits with the lowest load, and runs one attempt of it on a task
//! of its own, whose result comes back to the runner as an event.

use super::*;
use crate::logs::{Kept, LiveLog};

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
                let s = &self.steps[&step];
                let (avoid, inputs_on) = (s.avoid.clone(), s.inputs_on.clone());
                let resume = self.resume_on.get(&step).map(String::as_str);
                let Some(mi) = self.pick_machine(&platform, &avoid, resume, &inputs_on) else {
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
        let (drv_path, timeout, max_silent, try_no) = {
            let s = self.steps.get_mut(&id).expect("live step");
            s.running = true;
            s.tries += 1;
            let (t, ms) = s
                .builds
                .iter()
                .filter_map(|b| self.builds.get(b))
                .fold((0i64, 0i64), |(t, ms), b| (t.max(b.timeout), ms.max(b.max_silent)));
            (s.drv_path.clone(), if t > 0 { t } else { 36000 }, if ms > 0 { ms } else { 7200 }, s.tries)
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
            try_no,
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
                let (outcome, log_file, conn) = tokio::select! {
                    r = run_attempt(&parts, &machine, conn, &job) => r,
                    // The sender went: the step was cancelled (or the
                    // runner ended). Dropping the attempt ends it remotely.
                    _ = cancelled => return,
                };
                let _ = tx.send(Event::Done(
                    id,
                    AttemptEnd {
                        attempt,
                        machine: machine.uri.clone(),
                        outcome,
                        log_file,
                        secs: start.elapsed().as_secs_f64(),
                        conn: conn.map(Box::new),
                    },
                ));
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
    try_no: u32,
    timeout: i64,
    max_silent: i64,
    max_log: u64,
    builders_substitute: bool,
    mirror_upstream: bool,
    note: Option<String>,
}

/// One attempt of a step on a machine: its outcome, the stored log that
/// is the step's if the attempt ended it, and its connection (reused if it
/// is still good afterwards).
pub(super) async fn run_attempt(
    parts: &Parts,
    machine: &Machine,
    conn: Option<Connection>,
    job: &Job,
) -> (Result<Outcome, String>, Option<String>, Option<Connection>) {
    let mut conn = match conn {
        Some(c) => c,
        None => match parts.sessions.connect(machine).await {
            Ok(c) => c,
            Err(e) => return (Err(e.to_string()), None, None),
        },
    };
    let spec = StepSpec {
        drv_path: &job.drv_path,
        try_no: job.try_no,
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
    let mut live = None;
    let r = run::run_step(&mut conn, &parts.cache, &parts.upstreams, &parts.logs, &spec, &mut live, |p| {
        let _ = ptx.send(p);
    })
    .await;
    drop(ptx);
    let _ = phases.await;
    // Only a clean ending leaves the connection in a known state.
    let kept = matches!(r, Ok(Outcome::Built { .. } | Outcome::Failed { .. }));
    let r = r.map_err(|e| {
        let mut msg = e.to_string();
        let tail = conn.stderr_tail();
        if !tail.trim().is_empty() {
            msg.push_str(": ");
            msg.push_str(tail.trim().lines().last().unwrap_or(""));
        }
        msg
    });
    // A connection that is not kept goes before the log ends: its stderr
    // then reaches its end, which is when a log the attempt could not end
    // cleanly is complete.
    let conn = if kept {
        Some(conn)
    } else {
        drop(conn);
        None
    };
    let log_file = end_log(&parts.logs, job, &r, live).await;
    (r, log_file, conn)
}

/// Ends an attempt's log: the step's log if the attempt ended the step,
/// else kept as an earlier attempt's. A step that built nothing gets the
/// few lines there are (a note, the coordinator's error) as its log.
async fn end_log(logs: &Logs, job: &Job, r: &Result<Outcome, String>, live: Option<LiveLog>) -> Option<String> {
    let final_log = matches!(r, Ok(Outcome::Built { .. } | Outcome::Failed { .. } | Outcome::CoordinatorFault { .. }));
    let coordinator_error = match r {
        Ok(Outcome::CoordinatorFault { error }) => Some(format!("kiln: {error}\n")),
        _ => None,
    };
    let stored = match live {
        Some(live) => {
            if let Some(e) = &coordinator_error {
                live.append(e).await;
            }
            let kept = if final_log { Kept::Final } else { Kept::Attempt };
            live.finish(kept).await.map(Some)
        }
        None if final_log => {
            let mut text = job.note.as_ref().map(|n| format!("kiln: {n}\n")).unwrap_or_default();
            text.push_str(coordinator_error.as_deref().unwrap_or(""));
            let (logs, drv, try_no) = (logs.clone(), job.drv_path.clone(), job.try_no);
            tokio::task::spawn_blocking(move || {
                logs.forget_attempts_from(&drv, try_no);
                // An empty log is kept too: "it printed nothing" is an answer.
                logs.write(&drv, text.as_bytes())
            })
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map(Some)
        }
        None => Ok(None),
    };
    match stored {
        Ok(Some(p)) if final_log => {
            logs.publish(&job.drv_path).await;
            Some(p.display().to_string())
        }
        Ok(None) if final_log => None,
        Ok(_) => None,
        Err(e) => {
            warn!(drv = %job.drv_path, error = %e, "cannot store a build log");
            None
        }
    }
}
