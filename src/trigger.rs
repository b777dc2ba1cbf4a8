//! Triggers: decides when a jobset is evaluated and runs fetch → eval →
//! record for it inside `kiln serve`. A jobset is due when its check
//! interval has passed or when it was triggered (`POST /api/push`, later
//! webhooks); triggers that arrive before the evaluator gets to the jobset
//! collapse into one. Evaluations run at most `eval.max_concurrent` at a
//! time, one per jobset, each with a timeout. Anything that goes wrong (an
//! unreachable repository, a missing branch, a broken `.kiln.toml` or flake)
//! becomes an error on the project, jobset or evaluation; the previous
//! evaluation and configuration stay, and the server carries on.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::sync::{Notify, Semaphore};
use tracing::{Instrument, info, info_span, warn};

use crate::config::Config;
use crate::db::evaluations::{self, NewEvaluation, Outcome};
use crate::db::jobsets::{self, Jobset};
use crate::db::projects::{self, Project, ProjectSpec};
use crate::db::{self, Db, DbError};
use crate::eval::{self, EvalRequest, Root};
use crate::events::Event;
use crate::fetch::{self, FetchError, Mirror, Mirrors};
use crate::repo_config;

/// How long an evaluation's new builds gather before the queue takes them
/// together (all of them at once when the evaluation ends sooner).
const FEED_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum TriggerError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    RepoConfig(#[from] repo_config::RepoConfigError),
}

/// What a check of a jobset did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// Evaluated; the evaluation's id.
    Evaluated(i64),
    /// The evaluation failed as a whole; its id.
    Failed(i64),
    /// Same commit and configuration as the last evaluation.
    Unchanged,
    /// Disabled, removed, or an error before evaluating (on the jobset).
    Skipped,
}

pub struct Evaluator {
    db: Db,
    config: Arc<Config>,
    /// Where new builds go as they are recorded (none in tests of evaluation alone).
    queue: Option<crate::queue::Queue>,
    events: crate::events::Events,
    mirrors: Mirrors,
    running: Mutex<HashSet<i64>>,
    slots: Arc<Semaphore>,
    wake: Notify,
    /// Where commit statuses go (none without `[github]`).
    statuses: Option<crate::github::statuses::Policy>,
    /// GitHub credentials, for fetching private repositories.
    github: Option<crate::github::Credentials>,
    /// Where recorded builds' derivations are rooted.
    roots: crate::gcroots::GcRoots,
}

/// The marker in a commit message that asks not to build it, if any.
pub fn skip_marker(message: &str) -> Option<&'static str> {
    let lower = message.to_ascii_lowercase();
    ["[skip ci]", "[ci skip]"].into_iter().find(|m| lower.contains(m))
}

/// What a pull request waiting for approval shows as its jobset's state.
pub fn awaiting_note(j: &jobsets::Jobset) -> String {
    format!(
        "waiting for approval: pull request #{} by @{} ({}) is built once a maintainer approves it{}",
        j.pr_number.unwrap_or_default(),
        j.pr_author.as_deref().unwrap_or("unknown"),
        j.pr_association.as_deref().unwrap_or("association unknown"),
        if j.approve_each_push { " (each push needs approval)" } else { "" }
    )
}

fn short(rev: &str) -> &str {
    &rev[..rev.len().min(12)]
}

/// How often due jobsets are looked for when nothing wakes the loop.
const TICK: Duration = Duration::from_secs(1);
/// A project whose repository could not be read is tried again after this.
const RESYNC_S: i64 = 60;

impl Evaluator {
    pub fn new(
        db: Db,
        config: Arc<Config>,
        queue: Option<crate::queue::Queue>,
        events: crate::events::Events,
    ) -> Arc<Self> {
        let github = config.github.as_ref().and_then(|gh| match crate::github::Credentials::from_config(gh) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "GitHub credentials: private repositories cannot be fetched");
                None
            }
        });
        Arc::new(Evaluator {
            roots: crate::gcroots::GcRoots::open(&config.state_dir),
            statuses: crate::github::policy(&config),
            github,
            queue,
            events,
            mirrors: Mirrors::new(&config.state_dir, Duration::from_secs(config.eval.timeout_s.max(60))),
            slots: Arc::new(Semaphore::new(config.eval.max_concurrent.max(1))),
            db,
            config,
            running: Mutex::new(HashSet::new()),
            wake: Notify::new(),
        })
    }

    /// Wakes the loop now (after a trigger or a new project).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Creates or updates the projects declared in kiln.toml.
    pub async fn sync_config_projects(&self) -> Result<(), DbError> {
        let mut c = self.db.conn().await?;
        for p in &self.config.projects {
            projects::upsert(
                c.ex(),
                &ProjectSpec {
                    name: p.name.clone(),
                    display_name: p.display_name.clone().unwrap_or_default(),
                    description: p.description.clone().unwrap_or_default(),
                    repo: p.repo.clone(),
                    github_repo: p.github.clone(),
                    enabled: p.enabled,
                    hidden: false,
                    declared_in: "config".into(),
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Runs until `stop` resolves: reads new projects' repositories and
    /// starts the evaluations that are due.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        {
            if let Ok(mut c) = self.db.conn().await {
                match evaluations::fail_interrupted(c.ex()).await {
                    Ok(n) if n > 0 => warn!(n, "evaluations interrupted by the last shutdown marked failed"),
                    Err(e) => warn!(error = %e, "cannot mark interrupted evaluations"),
                    _ => {}
                }
            }
        }
        tokio::pin!(stop);
        loop {
            if let Err(e) = self.clone().tick().await {
                warn!(error = %e, "evaluation scheduler");
            }
            tokio::select! {
                _ = &mut stop => return,
                _ = self.wake.notified() => {},
                _ = tokio::time::sleep(TICK) => {},
            }
        }
    }

    async fn tick(self: Arc<Self>) -> Result<(), DbError> {
        let (new_projects, due) = {
            let mut c = self.db.conn().await?;
            let p = projects::needing_sync(c.ex(), db::now() - RESYNC_S).await?;
            let d = jobsets::due(c.ex(), db::now()).await?;
            (p, d)
        };
        for p in new_projects {
            if let Err(e) = self.sync_project(&p).await {
                warn!(project = %p.name, error = %e, "cannot read the project's repository");
            }
        }
        for j in due {
            if !self.running.lock().expect("running").insert(j.id) {
                continue;
            }
            let this = self.clone();
            tokio::spawn(async move {
                let _slot = this.slots.clone().acquire_owned().await;
                let id = j.id;
                match this.check(id).await {
                    Ok(_) => {}
                    Err(e) => warn!(jobset = id, error = %e, "jobset check failed"),
                }
                this.running.lock().expect("running").remove(&id);
            });
        }
        Ok(())
    }

    /// Fetches the project and brings its jobsets in line with the
    /// repository's `.kiln.toml` (from the default branch). New jobsets are
    /// triggered at once.
    pub async fn sync_project(&self, p: &Project) -> Result<Mirror, TriggerError> {
        let r = self.sync_project_inner(p).await;
        let mut c = self.db.conn().await?;
        match &r {
            Ok(_) => projects::set_synced(c.ex(), p.id, None).await?,
            Err(e) => projects::set_synced(c.ex(), p.id, Some(&e.to_string())).await?,
        }
        r
    }

    async fn sync_project_inner(&self, p: &Project) -> Result<Mirror, TriggerError> {
        let auth = self.git_auth(p).await;
        let mirror = self.mirrors.fetch_with(&p.name, &p.repo, auth.as_ref()).await?;
        let head = self.mirrors.rev(&mirror, &mirror.default_branch).await?;
        let decls = match self.mirrors.read_file(&mirror, &head, repo_config::FILE).await? {
            Some(bytes) => repo_config::parse(&String::from_utf8_lossy(&bytes))?,
            None => repo_config::defaults(),
        };
        let mut tx = self.db.begin().await?;
        let existing: HashSet<String> =
            jobsets::list_for_project(tx.ex(), p.id).await?.into_iter().map(|j| j.name).collect();
        for spec in &decls.jobsets {
            let j = jobsets::upsert(tx.ex(), p.id, spec).await?;
            if !existing.contains(&spec.name) && spec.enabled && !spec.pull_requests && !spec.merge_queue {
                jobsets::trigger(tx.ex(), j.id, false).await?;
            }
        }
        let names: Vec<String> = decls.jobsets.iter().map(|d| d.name.clone()).collect();
        jobsets::disable_undeclared(tx.ex(), p.id, &names).await?;
        crate::db::environments::sync(tx.ex(), p.id, &decls.environments).await?;
        tx.commit().await?;
        Ok(mirror)
    }

    /// Checks one jobset now: fetch, read configuration, evaluate if the
    /// commit or configuration changed (or the trigger forces it), record.
    pub async fn check(&self, jobset_id: i64) -> Result<Checked, TriggerError> {
        let (jobset, project) = {
            let mut c = self.db.conn().await?;
            let Some(j) = jobsets::get_by_id(c.ex(), jobset_id).await? else { return Ok(Checked::Skipped) };
            let Some(p) = projects::get_by_id(c.ex(), j.project_id).await? else { return Ok(Checked::Skipped) };
            (j, p)
        };
        // Triggers up to here are what this check answers; later ones stay.
        let seen = jobset.trigger_seq;
        let span = info_span!("check", project = %project.name, jobset = %jobset.name);
        async {
            if !project.enabled {
                self.mark(jobset.id, None, seen).await?;
                return Ok(Checked::Skipped);
            }
            let mirror = match self.sync_project(&project).await {
                Ok(m) => m,
                Err(TriggerError::Db(e)) => return Err(e.into()),
                Err(e) => {
                    self.mark(jobset.id, Some(&e.to_string()), seen).await?;
                    return Ok(Checked::Skipped);
                }
            };
            // The configuration may just have changed.
            let jobset = {
                let mut c = self.db.conn().await?;
                match jobsets::get_by_id(c.ex(), jobset.id).await? {
                    Some(j) if j.enabled && !j.is_template() => j,
                    _ => return Ok(Checked::Skipped),
                }
            };
            // An outside contributor's pull request runs arbitrary Nix on
            // this machine when evaluated: nothing of it is fetched before
            // a maintainer approves it.
            if !jobset.approved_for(None) {
                let note = awaiting_note(&jobset);
                info!(pr = jobset.pr_number, author = jobset.pr_author.as_deref(), "not fetched: awaiting approval");
                self.mark(jobset.id, Some(&note), seen).await?;
                return Ok(Checked::Skipped);
            }
            // A pull request's head is fetched as its own ref; a branch is in the mirror.
            let (git_ref, local_ref) = match jobset.pr_number {
                Some(n) => {
                    let auth = self.git_auth(&project).await;
                    if let Err(e) = self.mirrors.fetch_pull(&project.name, &project.repo, n, auth.as_ref()).await {
                        self.mark(jobset.id, Some(&e.to_string()), seen).await?;
                        return Ok(Checked::Skipped);
                    }
                    (format!("refs/pull/{n}/head"), fetch::pull_ref(n))
                }
                None => {
                    let branch = jobset.branch.clone().unwrap_or_else(|| mirror.default_branch.clone());
                    (format!("refs/heads/{branch}"), format!("refs/heads/{branch}"))
                }
            };
            let rev = match self.mirrors.rev_of(&mirror, &local_ref).await {
                Ok(r) => r,
                Err(e) => {
                    self.mark(jobset.id, Some(&e.to_string()), seen).await?;
                    return Ok(Checked::Skipped);
                }
            };
            // Approved at one head only: a later push waits again.
            if !jobset.approved_for(Some(&rev)) {
                let note = awaiting_note(&jobset);
                info!(rev, "not evaluated: this head is not the approved one");
                self.mark(jobset.id, Some(&note), seen).await?;
                return Ok(Checked::Skipped);
            }
            let last = {
                let mut c = self.db.conn().await?;
                evaluations::latest(c.ex(), jobset.id, 1).await?.into_iter().next()
            };
            if !jobset.force_eval
                && let Some(l) = &last
                && l.commit_sha == rev
                && l.config_hash == jobset.config_hash
            {
                self.mark(jobset.id, None, seen).await?;
                return Ok(Checked::Unchanged);
            }
            // As GitHub Actions and buildbot-nix do: a commit that asks
            // not to be built is not evaluated (a forced check still is).
            if !jobset.force_eval
                && let Ok(message) = self.mirrors.message_of(&mirror, &rev).await
                && let Some(marker) = skip_marker(&message)
            {
                info!(rev, marker, "not evaluated: the commit asks to skip CI");
                let note = format!("commit {} not evaluated: its message says {marker}", short(&rev));
                self.mark(jobset.id, Some(&note), seen).await?;
                return Ok(Checked::Skipped);
            }
            let flake_ref = fetch::flake_ref(&mirror, &local_ref, &rev, &jobset.flake_dir);
            self.evaluate(&jobset, &git_ref, &rev, &flake_ref, seen).await
        }
        .instrument(span)
        .await
    }

    /// Credentials for fetching a project over HTTP(S): its forge's token,
    /// or GitHub's if Kiln has some and the URL is GitHub's.
    async fn git_auth(&self, p: &Project) -> Option<fetch::GitAuth> {
        // A forge's token goes to its own projects' URLs only.
        if let Some(f) = self.config.forges.iter().find(|f| crate::forge::ForgeRef::of(f).repo_of(&p.repo).is_some()) {
            return match crate::forge::Forge::load(f) {
                Ok(forge) => forge.git_auth(),
                Err(e) => {
                    warn!(project = %p.name, error = %e, "no forge token for fetching");
                    None
                }
            };
        }
        let creds = self.github.as_ref()?;
        let api = &self.config.github.as_ref()?.api_url;
        let repo = crate::github::repo_of(p)?;
        if !crate::github::may_send_token(&p.repo, api) {
            return None;
        }
        match creds.git_token(&repo).await {
            Ok(t) => Some(fetch::GitAuth::github_token(&t)),
            Err(e) => {
                warn!(project = %p.name, error = %e, "no GitHub token for fetching");
                None
            }
        }
    }

    async fn mark(&self, jobset_id: i64, error: Option<&str>, seen: i64) -> Result<(), DbError> {
        let mut c = self.db.conn().await?;
        jobsets::mark_checked(c.ex(), jobset_id, error, seen).await
    }

    async fn evaluate(
        &self,
        jobset: &Jobset,
        git_ref: &str,
        rev: &str,
        flake_ref: &str,
        seen: i64,
    ) -> Result<Checked, TriggerError> {
        let start = Instant::now();
        let workers = self.config.eval.workers;
        let ev = {
            let mut tx = self.db.begin().await?;
            let ev = evaluations::create(
                tx.ex(),
                &NewEvaluation {
                    jobset_id: jobset.id,
                    commit_sha: rev,
                    git_ref,
                    flake_ref,
                    config_hash: &jobset.config_hash,
                    workers: workers as i64,
                    forced: jobset.force_eval,
                },
            )
            .await?;
            if let Some(p) = &self.statuses {
                crate::github::statuses::eval_started(tx.ex(), p, ev.id).await?;
            }
            tx.commit().await?;
            ev
        };
        info!(eval = ev.id, rev, "evaluating");
        self.events.send(Event::EvalStarted { eval: ev.id, jobset: jobset.id });
        let timeout = Duration::from_secs(self.config.eval.timeout_s);
        let result = tokio::time::timeout(timeout, self.run_eval(jobset, ev.id, flake_ref, start)).await;
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(EvalFailure::Db(e))) => Some(e.to_string()),
            Ok(Err(EvalFailure::Eval(e))) => Some(e.to_string()),
            Err(_) => Some(eval::EvalError::Timeout(timeout.as_secs()).to_string()),
        };
        match failure {
            None => {
                self.mark(jobset.id, None, seen).await?;
                self.events.send(Event::EvalFinished { eval: ev.id, jobset: jobset.id, error: None });
                self.cancel_superseded(jobset.id, ev.id, rev).await?;
                Ok(Checked::Evaluated(ev.id))
            }
            Some(message) => {
                let summary = message.lines().next().unwrap_or("evaluation failed").to_string();
                let mut tx = self.db.begin().await?;
                evaluations::finish(
                    tx.ex(),
                    ev.id,
                    eval::millis_since(start),
                    &Outcome { error: Some(&summary), stderr: Some(&message), ..Default::default() },
                )
                .await?;
                let error = format!("evaluation {} failed: {summary}", ev.id);
                jobsets::mark_checked(tx.ex(), jobset.id, Some(&error), seen).await?;
                if let Some(p) = &self.statuses {
                    crate::github::statuses::eval_finished(tx.ex(), p, ev.id).await?;
                }
                tx.commit().await?;
                warn!(eval = ev.id, error = %summary, "evaluation failed");
                self.events.send(Event::EvalFinished { eval: ev.id, jobset: jobset.id, error: Some(summary) });
                Ok(Checked::Failed(ev.id))
            }
        }
    }

    /// Cancels the jobset's unfinished builds that its new evaluation
    /// `eval_id` no longer has (an earlier commit's): recorded first, so a
    /// crash cannot bring them back; then the queue stops the steps that
    /// no other live build needs (a step another jobset shares goes on).
    async fn cancel_superseded(&self, jobset_id: i64, eval_id: i64, rev: &str) -> Result<(), DbError> {
        let why = format!("cancelled: superseded by evaluation {eval_id} (commit {})", short(rev));
        let mut c = self.db.conn().await?;
        let ids = crate::db::builds::cancel_unfinished_of_jobset(c.ex(), jobset_id, Some(eval_id), &why).await?;
        drop(c);
        if ids.is_empty() {
            return Ok(());
        }
        info!(eval = eval_id, builds = ids.len(), "superseded builds cancelled");
        if let Some(q) = &self.queue {
            for id in ids {
                q.cancel(id);
            }
        }
        Ok(())
    }

    async fn run_eval(
        &self,
        jobset: &Jobset,
        eval_id: i64,
        flake_ref: &str,
        start: Instant,
    ) -> Result<(), EvalFailure> {
        // The reference is already locked; this only learns its source hash,
        // alongside the default attribute when the jobset names none.
        let attributes = jobset.attribute_list();
        let (locked, default) = tokio::join!(eval::lock(flake_ref), async {
            if attributes.is_empty() { Some(eval::default_root(flake_ref).await) } else { None }
        });
        let locked = locked?;
        let roots = match default {
            Some(root) => vec![Root::parse(root?, false)],
            None => {
                let prefix = attributes.len() > 1;
                attributes.iter().map(|a| Root::parse(a, prefix)).collect()
            }
        };
        let req = EvalRequest {
            flake_ref: flake_ref.to_string(),
            roots,
            systems: jobset.system_list(),
            workers: self.config.eval.workers,
            max_memory_mib: self.config.eval.max_memory_mib,
            timeout: Duration::from_secs(self.config.eval.timeout_s),
            evaluator: self.config.eval.evaluator,
            group_roots: true,
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let db = self.db.clone();
        let jobset_id = jobset.id;
        // New builds enter the queue while the evaluation runs (see the
        // feeder below): a long evaluation's builds start before it ends.
        let (new_tx, mut new_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<i64>>();
        let hooks =
            eval::record::Hooks { new_builds: Some(new_tx), fresh_builds: false, roots: Some(self.roots.clone()) };
        let recorder =
            tokio::spawn(async move { eval::record::record_stream_with(&db, jobset_id, eval_id, rx, hooks).await });
        let queue = self.queue.clone();
        // The recorder roots what it records (one root per group of jobs,
        // which the queue finds in place). The queue takes what ten
        // seconds brought at once, and the rest once the evaluation is
        // finished: one walk of the closures and one
        // write instead of one per batch, none while the evaluators and
        // the recorder need the cores, and none holding the database while
        // the evaluation's last transaction waits; builds of a long
        // evaluation start up to ten seconds later for it.
        let (finished_tx, finished_rx) = tokio::sync::oneshot::channel::<()>();
        let feeder = tokio::spawn(async move {
            let feed = |ids: Vec<i64>| {
                let queue = queue.clone();
                async move {
                    if let Some(q) = &queue
                        && !ids.is_empty()
                    {
                        q.enqueue(ids).await;
                    }
                }
            };
            let mut ids: Vec<i64> = Vec::new();
            let mut due = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    more = new_rx.recv() => match more {
                        Some(more) => {
                            if ids.is_empty() {
                                due = tokio::time::Instant::now() + FEED_EVERY;
                            }
                            ids.extend(more);
                        }
                        None => break,
                    },
                    _ = tokio::time::sleep_until(due), if !ids.is_empty() => feed(std::mem::take(&mut ids)).await,
                }
            }
            let _ = finished_rx.await;
            feed(ids).await;
        });
        let stats = eval::evaluate(&req, tx).await;
        let recorded = recorder.await.map_err(|e| EvalFailure::Db(DbError::Invalid(e.to_string())))??;
        // The feeder goes on handing the queue what was recorded; the
        // evaluation is done when its jobs are recorded, not when the queue
        // has walked their closures (which is the queue's work, and may take
        // a while on a nixpkgs-sized evaluation).
        drop(feeder);
        stats?;
        let diff = eval::record::finish(
            &self.db,
            jobset.id,
            eval_id,
            eval::millis_since(start),
            locked.nar_hash.as_deref(),
            &recorded,
            jobset.keep_evaluations,
            self.statuses.as_ref(),
        )
        .await?;
        drop(finished_tx);
        info!(
            eval = eval_id,
            jobs = recorded.jobs,
            errors = recorded.errors,
            new_builds = recorded.new_builds,
            new = diff.new.len(),
            removed = diff.removed.len(),
            changed = diff.changed.len(),
            "evaluation finished"
        );
        Ok(())
    }
}

#[derive(Debug, Error)]
enum EvalFailure {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Eval(#[from] eval::EvalError),
}
