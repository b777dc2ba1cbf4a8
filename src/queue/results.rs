//! Results: what a finished attempt does to its step, its builds and its
//! machine. A build failure finishes the builds that need the step; a
//! machine fault is retried elsewhere; the coordinator's own fault is
//! reported as itself and never blamed on the machine.

use super::*;

/// Walks again after inputs promised by an upstream did not arrive.
const MAX_REWALKS: u32 = 3;

const FAILED_OUTPUT: &str = "the build marked its output as failed ($out/nix-support/failed)";

/// A finished attempt whose result is not in the database yet.
pub(super) struct Unrecorded {
    id: i64,
    uri: String,
    outcome: Result<Outcome, String>,
    log_file: Option<String>,
    secs: f64,
}

impl Runner {
    pub(super) async fn step_done(&mut self, id: i64, end: AttemptEnd) -> Result<(), DbError> {
        let AttemptEnd { attempt, machine, outcome, log_file, secs, conn } = end;
        let (uri, log_file) = (machine.as_str(), log_file.as_deref());
        if self.attempts.get(&id).is_none_or(|a| a.no != attempt) {
            // Cancelled (its slot was freed then), or left running when
            // this runner stepped down: nothing waits for it.
            self.detached.remove(&attempt);
            debug!(step = id, machine = uri, "a stopped attempt ended");
            return Ok(());
        }
        self.attempts.remove(&id);
        if let Some(ms) = self.machines.iter_mut().find(|m| m.m.uri == uri) {
            ms.running = ms.running.saturating_sub(1);
            if let Some(c) = conn {
                ms.idle.push(*c);
            }
        }
        let jobsets: HashSet<i64> = self
            .steps
            .get(&id)
            .map(|s| s.builds.iter().filter_map(|b| self.builds.get(b).map(|lb| lb.jobset)).collect())
            .unwrap_or_default();
        for j in jobsets {
            *self.usage.entry(j).or_default() += secs;
        }
        let Some(step) = self.steps.get_mut(&id) else { return Ok(()) };
        step.running = false;
        // The machine's part is settled now, once: it must not count twice
        // should the step's transition have to be tried again.
        match &outcome {
            Ok(Outcome::Built { .. } | Outcome::Failed { .. }) => self.machine_ok(uri).await,
            Ok(Outcome::MachineFault { error }) | Err(error) => self.machine_failed(uri, error).await,
            Ok(Outcome::CoordinatorFault { .. } | Outcome::Unsubstitutable { .. }) => {}
        }
        let result = Unrecorded { id, uri: uri.to_string(), outcome, log_file: log_file.map(str::to_string), secs };
        if let Err(e) = self.record(&result).await {
            // Neither running nor queued until the database takes it: kept,
            // and tried again each tick (the build is not run again).
            warn!(step = id, error = %e, "cannot record a step's result; trying again");
            self.unrecorded.push(result);
        }
        self.idle_check();
        Ok(())
    }

    /// Tries again to record the results the database refused.
    pub(super) async fn record_unrecorded(&mut self) {
        for result in std::mem::take(&mut self.unrecorded) {
            if !self.steps.contains_key(&result.id) {
                continue; // its builds were cancelled meanwhile
            }
            match self.record(&result).await {
                Ok(()) => info!(step = result.id, "recorded a step's result the database had refused"),
                Err(e) => {
                    debug!(step = result.id, error = %e, "still cannot record a step's result");
                    self.unrecorded.push(result);
                }
            }
        }
        self.idle_check();
    }

    /// Applies a finished attempt to its step and builds: each path writes
    /// the database in one transaction before it changes anything held in
    /// memory, so that on an error it can simply be applied again.
    async fn record(&mut self, r: &Unrecorded) -> Result<(), DbError> {
        let (id, uri, secs, log_file) = (r.id, r.uri.as_str(), r.secs, r.log_file.as_deref());
        let Some(drv) = self.steps.get(&id).map(|s| s.drv_path.clone()) else { return Ok(()) };
        match &r.outcome {
            Ok(Outcome::Built { outputs, failed_output, products, metrics }) => {
                // Written first, and again if this is applied again (they
                // replace the step's own): the builds' pages show them.
                if !products.is_empty() || !metrics.is_empty() {
                    let mut tx = self.db.begin().await?;
                    crate::db::products::set(tx.ex(), id, products, metrics).await?;
                    tx.commit().await?;
                }
                if *failed_output {
                    // Hydra's "failed with output": the outputs are kept and
                    // served, the builds that need them fail.
                    self.fail_step_with(id, BuildStatus::FailedWithOutput, FAILED_OUTPUT, log_file, outputs).await?;
                } else {
                    self.step_built(id, &drv, uri, outputs, log_file, secs).await?;
                }
            }
            Ok(Outcome::Failed { status, error }) => self.fail_step(id, *status, error, log_file).await?,
            // Its log is kept as an earlier attempt's.
            Ok(Outcome::MachineFault { error }) => self.retry_or_abort(id, uri, error).await?,
            Ok(Outcome::CoordinatorFault { error }) => {
                // Neither the machine's fault nor the derivation's: the
                // builds end as aborted with the reason (the log's last
                // line), the machine is not blamed, and a restart builds
                // the step again.
                warn!(step = id, drv = %drv, machine = %uri, %error, "the coordinator could not finish a step");
                self.fail_step(id, BuildStatus::Aborted, error, log_file).await?;
            }
            Ok(Outcome::Unsubstitutable { paths, error }) => self.unsubstitutable(id, &drv, paths, error).await?,
            Err(error) => self.retry_or_abort(id, uri, error).await?,
        }
        Ok(())
    }

    /// A step built: its outputs recorded, the builds it tops finished,
    /// its dependents one input closer to runnable.
    async fn step_built(
        &mut self,
        id: i64,
        drv: &str,
        uri: &str,
        outputs: &[(String, String)],
        log_file: Option<&str>,
        secs: f64,
    ) -> Result<(), DbError> {
        let topped: Vec<(i64, i64, bool)> = self
            .steps
            .get(&id)
            .map(|s| {
                s.builds
                    .iter()
                    .filter_map(|b| {
                        self.builds.get(b).filter(|lb| lb.top == id).map(|lb| (*b, lb.jobset, lb.aggregate))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let finished: Vec<i64> = topped.iter().filter(|t| !t.2).map(|t| t.0).collect();
        let mut tx = self.db.begin().await?;
        for (name, path) in outputs {
            steps::set_output(tx.ex(), id, name, path).await?;
        }
        steps::finish(tx.ex(), id, 0, None, log_file).await?;
        for b in &finished {
            builds::finish(tx.ex(), *b, BuildStatus::Succeeded, false, None, None).await?;
            self.report(tx.ex(), *b).await?;
        }
        tx.commit().await?;
        self.done += 1;
        info!(step = id, drv = %drv, machine = %uri, secs = format!("{secs:.2}"), "built");
        for b in finished {
            self.announce_finished(b, BuildStatus::Succeeded);
            self.forget_build(b);
        }
        for (b, jobset, _) in topped.into_iter().filter(|t| t.2) {
            self.forget_build(b);
            self.hold_aggregate(b, jobset);
        }
        let dependents: Vec<i64> =
            self.steps.get(&id).map(|s| s.dependents.iter().copied().collect()).unwrap_or_default();
        self.remove_step(id);
        let built_on: Arc<str> = Arc::from(uri);
        for d in dependents {
            if let Some(s) = self.steps.get_mut(&d) {
                s.deps.remove(&id);
                s.inputs_on.push(built_on.clone());
            }
            self.requeue(d);
        }
        Ok(())
    }

    /// Inputs an upstream offered did not arrive: they are not
    /// substitutable after all, so the builds that need the step are
    /// walked again and build them instead. A step that keeps meeting
    /// this is aborted rather than walked forever.
    async fn unsubstitutable(&mut self, id: i64, drv: &str, paths: &[String], error: &str) -> Result<(), DbError> {
        for p in paths {
            if let Ok(sp) = StorePath::parse(p) {
                self.upstreams.forget_found(&sp, error);
            }
        }
        let rounds = self.rewalks.get(drv).copied().unwrap_or(0) + 1;
        if rounds > MAX_REWALKS {
            let msg = format!("inputs promised by an upstream never arrived: {error}");
            return self.fail_step(id, BuildStatus::Aborted, &msg, None).await;
        }
        info!(step = id, drv, error, "upstream inputs could not be had: building them instead");
        {
            let mut c = self.db.conn().await?;
            steps::transition(c.ex(), id, "running", "waiting").await?;
        }
        self.rewalks.insert(drv.to_string(), rounds);
        let builds: Vec<i64> = self.steps.get(&id).map(|s| s.builds.iter().copied().collect()).unwrap_or_default();
        for b in &builds {
            self.drop_build(*b, false);
        }
        self.remove_step(id);
        self.add_builds(&builds).await
    }

    pub(super) async fn retry_or_abort(&mut self, id: i64, uri: &str, error: &str) -> Result<(), DbError> {
        let tries = self.steps.get(&id).map(|s| s.tries).unwrap_or(0);
        if tries >= self.config.max_tries {
            warn!(step = id, tries, error, "giving up on a step after machine failures");
            return self
                .fail_step(id, BuildStatus::Aborted, &format!("aborted after {tries} attempts: {error}"), None)
                .await;
        }
        // Another machine that has not failed this step takes it at once;
        // the backoff is for trying again where it failed.
        let elsewhere = self.steps.get(&id).is_some_and(|s| {
            let now = Instant::now();
            self.machines.iter().any(|m| {
                m.m.uri != uri
                    && !s.avoid.contains(&m.m.uri)
                    && m.m.fits(&s.platform.0, &s.platform.1)
                    && m.paused_until.is_none_or(|t| t <= now)
            })
        });
        let delay = if elsewhere {
            0
        } else {
            self.config.retry_delay_s.saturating_mul(3u64.saturating_pow(tries.saturating_sub(1)))
        };
        {
            let mut c = self.db.conn().await?;
            steps::retry_later(c.ex(), id, error, db::now() + delay as i64).await?;
        }
        info!(step = id, machine = uri, tries, retry_in_s = delay, error, "step will be retried");
        if let Some(s) = self.steps.get_mut(&id) {
            s.avoid.insert(uri.to_string());
            s.not_before = (delay > 0).then(|| Instant::now() + Duration::from_secs(delay));
        }
        self.requeue(id);
        Ok(())
    }

    /// A step's failure finishes every build that needs it: the one it is
    /// the top of with the step's status, the others as "dependency failed".
    pub(super) async fn fail_step(
        &mut self,
        id: i64,
        status: BuildStatus,
        error: &str,
        log_file: Option<&str>,
    ) -> Result<(), DbError> {
        self.fail_step_with(id, status, error, log_file, &[]).await
    }

    /// [`Runner::fail_step`] for a step whose outputs are kept anyway.
    async fn fail_step_with(
        &mut self,
        id: i64,
        status: BuildStatus,
        error: &str,
        log_file: Option<&str>,
        outputs: &[(String, String)],
    ) -> Result<(), DbError> {
        let builds: Vec<i64> = self.steps.get(&id).map(|s| s.builds.iter().copied().collect()).unwrap_or_default();
        let mut tx = self.db.begin().await?;
        for (name, path) in outputs {
            steps::set_output(tx.ex(), id, name, path).await?;
        }
        steps::finish(tx.ex(), id, status as i64, Some(error), log_file).await?;
        for b in &builds {
            let top = self.builds.get(b).is_some_and(|lb| lb.top == id);
            let (st, msg) = if top {
                (status, error.to_string())
            } else {
                (BuildStatus::DepFailed, format!("a dependency failed: {error}"))
            };
            builds::finish(tx.ex(), *b, st, false, Some(id), Some(&msg)).await?;
            self.report(tx.ex(), *b).await?;
        }
        tx.commit().await?;
        self.failed += 1;
        warn!(step = id, status = status.label(), builds = builds.len(), "step failed");
        for b in builds {
            let top = self.builds.get(&b).is_some_and(|lb| lb.top == id);
            self.announce_finished(b, if top { status } else { BuildStatus::DepFailed });
            self.drop_build(b, false);
        }
        self.remove_step(id);
        Ok(())
    }

    /// Steps no machine could ever take fail after the grace period.
    pub(super) async fn fail_unsupported(&mut self) -> Result<(), DbError> {
        let grace = Duration::from_secs(self.config.unsupported_grace_s);
        let hopeless: Vec<i64> = self
            .steps
            .values()
            .filter(|s| s.key.is_some() && s.queued_since.elapsed() >= grace)
            .filter(|s| !self.machines.iter().any(|m| m.m.fits(&s.platform.0, &s.platform.1)))
            .map(|s| s.id)
            .collect();
        for id in hopeless {
            let p = self.steps[&id].platform.clone();
            let what =
                if p.1.is_empty() { p.0.to_string() } else { format!("{} with features {}", p.0, p.1.join(", ")) };
            let msg = format!("no machine builds for {what}");
            let builds: Vec<i64> = self.steps[&id].builds.iter().copied().collect();
            let mut tx = self.db.begin().await?;
            // Not remembered as failed: tried again when a machine appears.
            steps::finish(tx.ex(), id, BuildStatus::Unsupported as i64, Some(&msg), None).await?;
            for b in &builds {
                builds::finish(tx.ex(), *b, BuildStatus::Unsupported, false, Some(id), Some(&msg)).await?;
                self.report(tx.ex(), *b).await?;
            }
            tx.commit().await?;
            warn!(step = id, %msg, "unsupported");
            for b in builds {
                self.announce_finished(b, BuildStatus::Unsupported);
                self.drop_build(b, false);
            }
            self.remove_step(id);
        }
        Ok(())
    }
}
