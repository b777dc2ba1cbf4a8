//! The step graph: which unfinished builds need which steps, and the steps'
//! edges to the steps they wait for. Builds join it from the database (at
//! start, after a rescan, or when recorded) and leave it when they finish.

use super::*;

pub(super) struct Step {
    pub(super) id: i64,
    pub(super) drv_path: String,
    pub(super) platform: Platform,
    pub(super) deps: HashSet<i64>,
    pub(super) dependents: HashSet<i64>,
    /// Unfinished builds that need this step (directly or through others).
    pub(super) builds: HashSet<i64>,
    pub(super) running: bool,
    pub(super) tries: u32,
    pub(super) not_before: Option<Instant>,
    pub(super) avoid: HashSet<String>,
    pub(super) queued_since: Instant,
    /// When it last entered a ready queue.
    pub(super) runnable_since: Option<Instant>,
    pub(super) key: Option<(i64, Key)>,
    /// Said first in its log (why an upstream's copy was not used).
    pub(super) note: Option<String>,
    /// Machines that built its inputs in this run, one entry per input:
    /// a machine that already holds them is preferred, so fewer inputs
    /// cross between builders (see `pick_machine`).
    pub(super) inputs_on: Vec<Arc<str>>,
}

pub(super) struct LiveBuild {
    /// What roots its derivation against Nix's garbage collector while it
    /// is live (see [`builds::Build::root`]).
    pub(super) root: String,
    pub(super) jobset: i64,
    pub(super) top: i64,
    pub(super) global: i64,
    pub(super) priority: i64,
    pub(super) timeout: i64,
    pub(super) max_silent: i64,
    /// Finishes only when its constituents have (see `aggregates.rs`).
    pub(super) aggregate: bool,
}

/// What a walked derivation comes to.
pub(super) enum Resolved {
    /// A live step builds it.
    Live(i64),
    /// Its outputs are in the cache.
    Cached,
    /// Its outputs come from an upstream; the step row records that.
    Substituted(i64),
    /// It, or something it needs, failed before (that step).
    Failed(i64),
    /// Its outputs are in the cache, from a build that marked them failed.
    FailedOutput(i64),
    /// It, or something it needs, has no `.drv` any more.
    Missing(String),
}

/// A build that finishes as it is added: (build, jobset, status, cached,
/// failed step, message).
type Finished = (i64, i64, BuildStatus, bool, Option<i64>, Option<String>);

/// Builds walked together when many join at once (start, rescan).
const ADD_BATCH: usize = 1000;

impl Runner {
    // ------------------------------------------------------------ building the graph

    /// Loads every unfinished build (after a start or a crash).
    pub(super) async fn recover(&mut self) -> Result<(), DbError> {
        let (unfinished, drvs) = {
            let mut c = self.db.conn().await?;
            let left = steps::reset_running(c.ex()).await?;
            if !left.is_empty() {
                info!(steps = left.len(), "steps left running by the last run go back to the queue");
            }
            // Their builds may still run there (Nix goes on after its
            // client is gone): sent back to the same machine, a step waits
            // on Nix's lock for that build instead of building again
            // elsewhere.
            self.resume_on = left.into_iter().filter_map(|(id, m)| Some((id, m?))).collect();
            (builds::unfinished_ids(c.ex()).await?, builds::unfinished_roots(c.ex()).await?)
        };
        // Roots of builds that ended while no runner was here go, and those
        // of Kilns whose state is gone (in the background: it may be many).
        let roots = self.roots.clone();
        let _ = tokio::task::spawn_blocking(move || roots.reconcile(&drvs.into_iter().collect())).await;
        let roots = self.roots.clone();
        tokio::task::spawn_blocking(move || roots.remove_orphans());
        // Logs of attempts the last run left building are kept as the
        // attempts they were (the steps go back to the queue above).
        // Before any attempt starts here: salvage takes every live log
        // this process is not writing.
        let logs = self.logs.clone();
        let n = tokio::task::spawn_blocking(move || logs.salvage()).await.unwrap_or(0);
        if n > 0 {
            info!(logs = n, "logs of attempts the last run left building were kept");
        }
        for chunk in unfinished.chunks(ADD_BATCH) {
            self.add_builds(chunk).await?;
        }
        Ok(())
    }

    /// Brings the queue in line with the database: unfinished builds it
    /// does not hold (recorded or reopened by another process) join it,
    /// held builds the database has finished (cancelled elsewhere, or
    /// deleted with their project) leave it.
    pub(super) async fn rescan(&mut self) -> Result<(), DbError> {
        let ids: HashSet<i64> = {
            let mut c = self.db.conn().await?;
            builds::unfinished_ids(c.ex()).await?.into_iter().collect()
        };
        let gone: Vec<i64> = self.builds.keys().filter(|b| !ids.contains(b)).copied().collect();
        self.held.retain(|b, _| ids.contains(b));
        for b in gone {
            self.drop_build(b, true);
        }
        let mut new: Vec<i64> =
            ids.into_iter().filter(|b| !self.builds.contains_key(b) && !self.held.contains_key(b)).collect();
        new.sort_unstable();
        for chunk in new.chunks(ADD_BATCH) {
            self.add_builds(chunk).await?;
        }
        Ok(())
    }

    /// Adds unfinished builds to the graph, walking all their closures
    /// together (see [`walk`]): a build whose outputs are all in the cache
    /// or substitutable finishes at once, one that needs a step that failed
    /// before finishes as a cached or dependency failure, one whose
    /// derivation is gone fails alone with the path named; the others wait
    /// for their steps.
    pub(super) async fn add_builds(&mut self, ids: &[i64]) -> Result<(), DbError> {
        let ids: Vec<i64> =
            ids.iter().copied().filter(|id| !self.builds.contains_key(id) && !self.held.contains_key(id)).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let list: Vec<builds::Build> = {
            let mut c = self.db.conn().await?;
            let list: Vec<builds::Build> =
                builds::get_many(c.ex(), &ids).await?.into_iter().filter(|b| !b.finished).collect();
            for b in &list {
                if let std::collections::hash_map::Entry::Vacant(e) = self.shares.entry(b.jobset_id) {
                    let j = crate::db::jobsets::get_by_id(c.ex(), b.jobset_id).await?;
                    e.insert(j.map(|j| j.scheduling_shares).unwrap_or(100).max(1));
                }
            }
            list
        };
        if list.is_empty() {
            return Ok(());
        }
        let t0 = Instant::now();
        let tops: Vec<String> = list.iter().map(|b| b.drv_path.clone()).collect();
        // Rooted before anything is read, so a collection cannot take them:
        // the roots no live build holds yet (a recorder in this process has
        // made them already; the link is then one failed call per group).
        self.flush_released().await;
        let top_drvs = tops.clone();
        let new_roots: BTreeSet<String> =
            list.iter().map(|b| b.root()).filter(|r| !self.live_roots.contains_key(*r)).map(str::to_string).collect();
        if !new_roots.is_empty() {
            let roots = self.roots.clone();
            let _ = tokio::task::spawn_blocking(move || roots.add_all(new_roots.iter().map(String::as_str))).await;
        }
        let by_drv = &self.by_drv;
        let nodes = walk::explore(tops, |d| by_drv.contains_key(d), &self.cache, &self.upstreams)
            .await
            .map_err(|e| DbError::Invalid(format!("looking up the cache: {e}")))?;
        let walked = t0.elapsed();
        let rows = self.record_nodes(&nodes).await?;
        let recorded = t0.elapsed();
        let resolved = self.resolve(&nodes, &rows, top_drvs.iter().map(String::as_str));

        let build_roots: HashMap<i64, String> = list.iter().map(|b| (b.id, b.root().to_string())).collect();
        let list_len = list.len();
        let mut finished: Vec<Finished> = Vec::new();
        let mut tops: Vec<(i64, i64)> = Vec::new();
        let mut queued: Vec<(builds::Build, i64)> = Vec::new();
        let mut hold: Vec<(i64, i64)> = Vec::new();
        for b in list {
            let top_row = rows.get(&b.drv_path).map(|r| r.id);
            match resolved.get(b.drv_path.as_str()) {
                Some(Resolved::Live(top)) => {
                    tops.push((b.id, *top));
                    queued.push((b, *top));
                }
                Some(Resolved::Cached) | None if b.is_aggregate => hold.push((b.id, b.jobset_id)),
                Some(Resolved::Cached) | None => {
                    finished.push((b.id, b.jobset_id, BuildStatus::Succeeded, true, None, None));
                }
                Some(Resolved::FailedOutput(step)) => {
                    // As Hydra does: the kept outputs are the result, failed.
                    tops.push((b.id, *step));
                    let msg = "the build marked its output as failed ($out/nix-support/failed)".to_string();
                    finished.push((b.id, b.jobset_id, BuildStatus::FailedWithOutput, true, Some(*step), Some(msg)));
                }
                Some(Resolved::Substituted(step)) => {
                    tops.push((b.id, *step));
                    if b.is_aggregate {
                        hold.push((b.id, b.jobset_id));
                    } else {
                        finished.push((b.id, b.jobset_id, BuildStatus::Succeeded, true, None, None));
                    }
                }
                Some(Resolved::Failed(step)) => {
                    let top = top_row.is_none_or(|t| t == *step);
                    let status = if top { BuildStatus::CachedFailure } else { BuildStatus::DepFailed };
                    let msg = "a step failed before (not retried); restart the build to try again".to_string();
                    if let Some(t) = top_row {
                        tops.push((b.id, t));
                    }
                    finished.push((b.id, b.jobset_id, status, false, Some(*step), Some(msg)));
                }
                Some(Resolved::Missing(msg)) => {
                    warn!(build = b.id, error = %msg, "a derivation of the build is missing");
                    if let Some(t) = top_row {
                        tops.push((b.id, t));
                    }
                    finished.push((b.id, b.jobset_id, BuildStatus::Aborted, false, None, Some(msg.clone())));
                }
            }
        }
        {
            let mut tx = self.db.begin().await?;
            builds::set_top_steps(tx.ex(), &tops).await?;
            for (b, _, status, cached, step, msg) in &finished {
                builds::finish(tx.ex(), *b, *status, *cached, *step, msg.as_deref()).await?;
                self.report(tx.ex(), *b).await?;
            }
            tx.commit().await?;
        }
        let written = t0.elapsed();
        debug!(
            builds = list_len,
            derivations = nodes.len(),
            walk_ms = walked.as_millis() as u64,
            steps_ms = (recorded - walked).as_millis() as u64,
            builds_ms = (written - recorded).as_millis() as u64,
            "builds added to the queue"
        );
        for (b, jobset, status, ..) in finished {
            if let Some(root) = build_roots.get(&b) {
                self.release(root);
            }
            debug!(build = b, status = status.label(), "finished without building");
            self.announce(Announce::BuildFinished { build: b, jobset: Some(jobset), buildstatus: status as i64 });
        }
        for (b, jobset) in hold {
            if let Some(root) = build_roots.get(&b) {
                self.release(root);
            }
            self.hold_aggregate(b, jobset);
        }
        for (b, top) in queued {
            *self.live_roots.entry(b.root().to_string()).or_default() += 1;
            self.builds.insert(
                b.id,
                LiveBuild {
                    root: b.root().to_string(),
                    jobset: b.jobset_id,
                    top,
                    global: b.global_priority,
                    priority: b.priority,
                    timeout: b.timeout,
                    max_silent: b.max_silent,
                    aggregate: b.is_aggregate,
                },
            );
            self.announce(Announce::BuildQueued { build: b.id, jobset: Some(b.jobset_id) });
            // The build needs every step of its closure; those with nothing
            // left to wait for are runnable.
            let mut stack = vec![top];
            let mut ready = Vec::new();
            let mut joins_running = false;
            while let Some(s) = stack.pop() {
                if let Some(st) = self.steps.get_mut(&s)
                    && st.builds.insert(b.id)
                {
                    joins_running |= st.running;
                    if st.deps.is_empty() && !st.running {
                        ready.push(s);
                    }
                    stack.extend(st.deps.iter().copied());
                }
            }
            // A step it needs is already building for another build: this
            // build's work has started too.
            if joins_running {
                let mut c = self.db.conn().await?;
                builds::set_started(c.ex(), &[b.id], db::now()).await?;
            }
            for s in ready {
                self.requeue(s);
            }
        }
        Ok(())
    }

    /// What each walked derivation comes to, children before parents: live
    /// steps are made for what must be built and can be; a failure or a
    /// missing `.drv` below a derivation is its fate too.
    fn resolve<'a>(
        &mut self,
        nodes: &'a HashMap<String, walk::Node>,
        rows: &HashMap<String, steps::StepRef>,
        tops: impl Iterator<Item = &'a str>,
    ) -> HashMap<&'a str, Resolved> {
        // Keyed by borrowed names: a walk may hold a hundred thousand.
        let mut done: HashMap<&'a str, Resolved> = HashMap::new();
        for top in tops {
            let mut stack: Vec<(&str, bool)> = vec![(top, false)];
            while let Some((drv, inputs_done)) = stack.pop() {
                if done.contains_key(drv) {
                    continue;
                }
                if let Some(&id) = self.by_drv.get(drv) {
                    done.insert(drv, Resolved::Live(id));
                    continue;
                }
                let r = match nodes.get(drv) {
                    // Outputs kept from a build that marked them failed.
                    Some(walk::Node::Cached) => match rows.get(drv) {
                        Some(r) if r.state == "failed" && r.build_status == Some(6) => Resolved::FailedOutput(r.id),
                        _ => Resolved::Cached,
                    },
                    None => Resolved::Cached,
                    Some(walk::Node::Missing(m)) => Resolved::Missing(m.clone()),
                    Some(walk::Node::Substitutable) => match rows.get(drv) {
                        Some(row) => Resolved::Substituted(row.id),
                        None => Resolved::Cached,
                    },
                    Some(walk::Node::Build { inputs, system, features, note }) => {
                        if !inputs_done {
                            stack.push((drv, true));
                            stack.extend(
                                inputs.iter().filter(|i| !done.contains_key(i.as_str())).map(|i| (i.as_str(), false)),
                            );
                            continue;
                        }
                        let Some(row) = rows.get(drv) else {
                            done.insert(drv, Resolved::Missing(format!("no step for {drv}")));
                            continue;
                        };
                        if row.state == "failed" {
                            Resolved::Failed(row.id)
                        } else {
                            let mut deps = HashSet::new();
                            let mut bad = None;
                            for i in inputs {
                                match done.get(i.as_str()) {
                                    Some(Resolved::Live(id)) => {
                                        deps.insert(*id);
                                    }
                                    Some(Resolved::Failed(s) | Resolved::FailedOutput(s)) => {
                                        bad = Some(Resolved::Failed(*s))
                                    }
                                    Some(Resolved::Missing(m)) if bad.is_none() => {
                                        bad = Some(Resolved::Missing(m.clone()))
                                    }
                                    _ => {}
                                }
                            }
                            match bad {
                                Some(b) => b,
                                None => {
                                    self.make_step(row, drv, system, features, deps, note.clone());
                                    Resolved::Live(row.id)
                                }
                            }
                        }
                    }
                };
                done.insert(drv, r);
            }
        }
        done
    }

    fn make_step(
        &mut self,
        row: &steps::StepRef,
        drv: &str,
        system: &str,
        features: &[String],
        deps: HashSet<i64>,
        note: Option<String>,
    ) {
        let mut f = features.to_vec();
        f.sort();
        let platform: Platform = (Arc::from(system), f);
        for d in &deps {
            if let Some(s) = self.steps.get_mut(d) {
                s.dependents.insert(row.id);
            }
        }
        let now = db::now();
        self.steps.insert(
            row.id,
            Step {
                id: row.id,
                drv_path: drv.to_string(),
                platform,
                deps,
                dependents: HashSet::new(),
                builds: HashSet::new(),
                running: false,
                tries: row.tries.max(0) as u32,
                not_before: row
                    .next_try_at
                    .filter(|t| *t > now)
                    .map(|t| Instant::now() + Duration::from_secs((t - now) as u64)),
                avoid: HashSet::new(),
                queued_since: Instant::now(),
                runnable_since: None,
                key: None,
                note,
                inputs_on: Vec::new(),
            },
        );
        self.by_drv.insert(drv.to_string(), row.id);
    }

    /// Forgets a finished build, and the steps nothing else needs (only its
    /// own closure is looked at). When it was cancelled, those of them that
    /// are running stop too; a build that failed lets them finish, since
    /// their outputs serve the next attempt.
    pub(super) fn drop_build(&mut self, id: i64, cancelled: bool) {
        let Some(b) = self.forget_build(id) else {
            self.idle_check();
            return;
        };
        let mut orphans = Vec::new();
        let mut stop = Vec::new();
        let mut stack = vec![b.top];
        while let Some(s) = stack.pop() {
            if let Some(st) = self.steps.get_mut(&s)
                && st.builds.remove(&id)
            {
                if st.builds.is_empty() {
                    if !st.running {
                        orphans.push(s);
                    } else if cancelled {
                        stop.push(s);
                    }
                }
                stack.extend(st.deps.iter().copied());
            }
        }
        for s in stop {
            self.cancel_attempt(s);
        }
        for s in orphans {
            self.remove_step(s);
        }
        self.idle_check();
    }

    /// Takes an ended build out of the live set; its GC root goes unless
    /// another live build has the same one.
    pub(super) fn forget_build(&mut self, id: i64) -> Option<LiveBuild> {
        let b = self.builds.remove(&id)?;
        if let Some(n) = self.live_roots.get_mut(&b.root) {
            *n -= 1;
            if *n == 0 {
                self.live_roots.remove(&b.root);
            }
        }
        self.release(&b.root);
        Some(b)
    }

    /// Drops the GC root `root` if no live build needs it (written by
    /// [`Runner::flush_released`], before any root is added again).
    pub(super) fn release(&mut self, root: &str) {
        if !self.live_roots.contains_key(root) {
            self.released.push(root.to_string());
        }
    }

    /// Removes the GC roots released since the last call, off the runner's
    /// thread; a root that a live build holds again meanwhile stays.
    pub(super) async fn flush_released(&mut self) {
        let drvs: Vec<String> =
            std::mem::take(&mut self.released).into_iter().filter(|d| !self.live_roots.contains_key(d)).collect();
        if drvs.is_empty() {
            return;
        }
        let roots = self.roots.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for d in &drvs {
                roots.remove(d);
            }
        })
        .await;
    }

    /// Stops a running step's attempt: its machine slot is free at once,
    /// the remote build is interrupted, and the step leaves the queue.
    pub(super) fn cancel_attempt(&mut self, id: i64) {
        let Some(a) = self.attempts.remove(&id) else { return };
        let _ = a.cancel.send(());
        if let Some(ms) = self.machines.iter_mut().find(|m| m.m.uri == a.machine) {
            ms.running = ms.running.saturating_sub(1);
        }
        if let Some(s) = self.steps.get_mut(&id) {
            s.running = false;
        }
        info!(step = id, machine = %a.machine, "stopped a running step: no live build needs it");
        self.remove_step(id);
    }

    pub(super) fn remove_step(&mut self, id: i64) {
        self.resume_on.remove(&id);
        self.unqueue(id);
        self.became_idle.push(id);
        if let Some(s) = self.steps.remove(&id) {
            self.by_drv.remove(&s.drv_path);
            for d in s.deps {
                if let Some(ds) = self.steps.get_mut(&d) {
                    ds.dependents.remove(&id);
                }
            }
        }
    }

    pub(super) async fn restart(&mut self, id: i64) -> Result<(), DbError> {
        if self.reopen(id).await? {
            self.add_builds(&[id]).await?;
        }
        Ok(())
    }

    /// Reopens a finished build in the database, the failures remembered
    /// in its closure forgotten; false if it was not finished.
    pub(super) async fn reopen(&self, id: i64) -> Result<bool, DbError> {
        let mut tx = self.db.begin().await?;
        let Some(b) = builds::get(tx.ex(), id).await? else { return Ok(false) };
        if !b.finished {
            return Ok(false);
        }
        let top = match b.top_step_id {
            Some(t) => Some(t),
            None => steps::get_by_drv(tx.ex(), &b.drv_path).await?.map(|s| s.id),
        };
        if let Some(top) = top {
            steps::reset_failed_closure(tx.ex(), top).await?;
        }
        builds::reopen(tx.ex(), id).await?;
        self.report(tx.ex(), id).await?;
        tx.commit().await?;
        Ok(true)
    }
}
