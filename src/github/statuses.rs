//! Which commit statuses a state change calls for, written to the outbox in
//! the caller's transaction. Each function first takes a write lock on the
//! evaluations it reports on (a no-op UPDATE: a row lock on PostgreSQL, the
//! write lock on SQLite), so two transactions reporting on one evaluation
//! run one after the other and the later always reads what the earlier
//! wrote: the last status queued for a context is the true one.

use serde::{Deserialize, Serialize};

use crate::config::StatusMode;
use crate::db::builds::BuildStatus;
use crate::db::evaluations::{self, Cell};
use crate::db::{DbError, Ex, jobsets, outbox, projects};

use super::Repo;

/// The outbox `kind` of a GitHub commit status.
pub const KIND: &str = "github_status";
/// GitHub cuts a status description at 140 characters.
const MAX_DESCRIPTION: usize = 140;
/// A build in more evaluations than this reports to the newest ones only.
const MAX_EVALS_PER_BUILD: usize = 5;

/// How statuses are written: where their links point and how many.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Kiln's public URL, for `target_url`.
    pub base_url: String,
    pub mode: StatusMode,
    /// Beyond this many jobs in one evaluation, per-job statuses are sent
    /// for failures only (GitHub's secondary rate limits); with checks, at
    /// most this many failed jobs get a run of their own.
    pub max_job_statuses: usize,
    /// Check runs instead of commit statuses ([`super::checks`]).
    pub checks: bool,
    /// The App whose check events are Kiln's own.
    pub app_id: Option<u64>,
    /// Whether GitHub is configured (else only forges' projects get statuses).
    pub github: bool,
    /// Gitea and Forgejo hosts: their projects' statuses go there.
    pub forges: Vec<crate::forge::ForgeRef>,
}

impl Policy {
    /// Where a project's statuses go: its forge's name (none: GitHub) and
    /// repository; none when it is on neither.
    pub fn repo_of(&self, project: &projects::Project) -> Option<(Option<String>, Repo)> {
        if let Some((f, r)) = crate::forge::forge_of(&self.forges, &project.repo) {
            return Some((Some(f.name.clone()), r));
        }
        if !self.github {
            return None;
        }
        super::repo_of(project).map(|r| (None, r))
    }
}

/// One commit status as GitHub's `POST /repos/{owner}/{repo}/statuses/{sha}` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The forge it goes to (`[[forges]]`); none: GitHub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forge: Option<String>,
    pub owner: String,
    pub repo: String,
    pub sha: String,
    pub state: String,
    pub context: String,
    pub description: String,
    pub target_url: String,
}

impl Status {
    /// The outbox target: one commit of one repository.
    pub fn target(&self) -> String {
        format!("{}/{}@{}", self.owner, self.repo, self.sha)
    }
}

/// Cuts a description to GitHub's limit, on a character boundary.
pub fn describe(s: &str) -> String {
    if s.chars().count() <= MAX_DESCRIPTION {
        return s.to_string();
    }
    let mut out: String = s.chars().take(MAX_DESCRIPTION - 1).collect();
    out.push('…');
    out
}

/// The context of a jobset's summary status.
pub fn summary_context(jobset: &str) -> String {
    format!("kiln/{jobset}")
}

/// The context of one job's status.
pub fn job_context(jobset: &str, job: &str) -> String {
    format!("kiln/{jobset}/{job}")
}

/// Where an evaluation reports, if anywhere: its repository, commit and jobset.
pub(super) struct Target {
    pub repo: Repo,
    pub sha: String,
    /// The name its statuses and checks go by.
    pub jobset: String,
    /// The name of its check that never changes (its template's).
    pub stable: String,
    pub eval: evaluations::Evaluation,
    /// The forge it reports to; none: GitHub.
    pub forge: Option<String>,
}

pub(super) async fn target(mut ex: Ex<'_>, p: &Policy, eval_id: i64) -> Result<Option<Target>, DbError> {
    let Some(eval) = evaluations::get(ex.re(), eval_id).await? else { return Ok(None) };
    let Some(jobset) = jobsets::get_by_id(ex.re(), eval.jobset_id).await? else { return Ok(None) };
    // A closed pull request's jobset is disabled: its commits get no more statuses.
    if !jobset.enabled {
        return Ok(None);
    }
    let Some(project) = projects::get_by_id(ex.re(), jobset.project_id).await? else { return Ok(None) };
    let Some((forge, repo)) = p.repo_of(&project) else { return Ok(None) };
    if !is_sha(&eval.commit_sha) {
        return Ok(None);
    }
    // A merge group reports under its template's name: one context that
    // branch protection can require of every group.
    Ok(Some(Target {
        repo,
        sha: eval.commit_sha.clone(),
        jobset: jobset.reported_name().to_string(),
        stable: jobset.stable_name().to_string(),
        eval,
        forge,
    }))
}

/// The commit a status is for.
struct Commit<'a> {
    repo: &'a Repo,
    sha: &'a str,
    forge: Option<&'a str>,
}

impl Target {
    fn commit(&self) -> Commit<'_> {
        Commit { repo: &self.repo, sha: &self.sha, forge: self.forge.as_deref() }
    }
}

pub(super) fn is_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

async fn queue(
    ex: Ex<'_>,
    t: &Commit<'_>,
    state: &str,
    context: String,
    description: &str,
    url: String,
) -> Result<(), DbError> {
    let s = Status {
        forge: t.forge.map(str::to_string),
        owner: t.repo.owner.clone(),
        repo: t.repo.name.clone(),
        sha: t.sha.to_string(),
        state: state.to_string(),
        context,
        description: describe(description),
        target_url: url,
    };
    let payload = serde_json::to_string(&s).map_err(|e| DbError::Invalid(e.to_string()))?;
    let kind = if s.forge.is_some() { crate::forge::KIND } else { KIND };
    outbox::enqueue(ex, kind, &s.target(), &s.context, &payload).await?;
    Ok(())
}

/// A pull request from an outside contributor waits for approval: its head
/// says so, with a link to the page that approves it.
pub async fn awaiting_approval(
    ex: Ex<'_>,
    p: &Policy,
    project: &projects::Project,
    jobset: &jobsets::Jobset,
    head_sha: &str,
) -> Result<(), DbError> {
    let Some((forge, repo)) = p.repo_of(project) else { return Ok(()) };
    if p.checks && forge.is_none() {
        return super::checks::awaiting_approval(ex, p, project, jobset, head_sha).await;
    }
    if !is_sha(head_sha) {
        return Ok(());
    }
    let t = Commit { repo: &repo, sha: head_sha, forge: forge.as_deref() };
    let url = format!("{}/jobset/{}/{}", p.base_url, project.name, jobset.name);
    let who = jobset.pr_author.as_deref().unwrap_or("an outside contributor");
    let description = format!("Waiting for approval: @{who} is not a member; a maintainer approves on Kiln");
    queue(ex, &t, "pending", summary_context(&jobset.name), &description, url).await
}

/// An evaluation started: its summary is pending.
pub async fn eval_started(mut ex: Ex<'_>, p: &Policy, eval_id: i64) -> Result<(), DbError> {
    evaluations::lock(ex.re(), &[eval_id]).await?;
    let Some(t) = target(ex.re(), p, eval_id).await? else { return Ok(()) };
    if p.checks && t.forge.is_none() {
        return super::checks::started(ex, p, &t).await;
    }
    let url = format!("{}/eval/{eval_id}", p.base_url);
    queue(ex, &t.commit(), "pending", summary_context(&t.jobset), "Evaluating…", url).await
}

/// An evaluation ended (recorded, or failed as a whole): the summary and,
/// by the policy, every job's status.
pub async fn eval_finished(mut ex: Ex<'_>, p: &Policy, eval_id: i64) -> Result<(), DbError> {
    evaluations::lock(ex.re(), &[eval_id]).await?;
    let Some(t) = target(ex.re(), p, eval_id).await? else { return Ok(()) };
    let cells = evaluations::cells(ex.re(), &[eval_id]).await?;
    if p.checks && t.forge.is_none() {
        return super::checks::report(ex, p, &t, &cells, None).await;
    }
    let per_job = p.per_job(cells.len());
    for c in &cells {
        if per_job == PerJob::All || (per_job == PerJob::Failures && failed(c)) {
            job_status(ex.re(), p, &t, c).await?;
        }
    }
    summary(ex, p, &t, &cells).await
}

/// A build finished or was queued again: its job's status in each
/// evaluation it belongs to (the newest few), and their summaries.
pub async fn build_changed(mut ex: Ex<'_>, p: &Policy, build_id: i64) -> Result<(), DbError> {
    let mut evals = evaluations::of_build(ex.re(), build_id).await?;
    evals.reverse();
    evals.truncate(MAX_EVALS_PER_BUILD);
    evals.sort_unstable();
    if evals.is_empty() {
        return Ok(());
    }
    // In id order, so two transactions never wait on each other in a circle.
    evaluations::lock(ex.re(), &evals).await?;
    for eval_id in evals {
        let Some(t) = target(ex.re(), p, eval_id).await? else { continue };
        // Statuses wait for the evaluation's end; it writes them all then.
        if t.eval.status != "succeeded" {
            continue;
        }
        let cells = evaluations::cells(ex.re(), &[eval_id]).await?;
        if p.checks && t.forge.is_none() {
            super::checks::report(ex.re(), p, &t, &cells, Some(build_id)).await?;
            continue;
        }
        let per_job = p.per_job(cells.len());
        for c in cells.iter().filter(|c| c.build_id == Some(build_id)) {
            if per_job == PerJob::All || (per_job == PerJob::Failures && failed(c)) {
                job_status(ex.re(), p, &t, c).await?;
            }
        }
        summary(ex.re(), p, &t, &cells).await?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PerJob {
    All,
    Failures,
    None,
}

impl Policy {
    fn per_job(&self, jobs: usize) -> PerJob {
        match self.mode {
            StatusMode::PerJob if jobs <= self.max_job_statuses => PerJob::All,
            StatusMode::PerJob | StatusMode::Failures => PerJob::Failures,
            StatusMode::Summary => PerJob::None,
        }
    }
}

fn failed(c: &Cell) -> bool {
    c.error.is_some() || (c.finished == Some(true) && c.build_status != Some(0))
}

async fn job_status(ex: Ex<'_>, p: &Policy, t: &Target, c: &Cell) -> Result<(), DbError> {
    let context = job_context(&t.jobset, &c.job);
    if let Some(e) = &c.error {
        let first = e.lines().find(|l| !l.trim().is_empty()).unwrap_or("evaluation error");
        let url = format!("{}/eval/{}", p.base_url, t.eval.id);
        return queue(ex, &t.commit(), "error", context, &format!("Evaluation error: {first}"), url).await;
    }
    let Some(build) = c.build_id else { return Ok(()) };
    let url = format!("{}/build/{build}", p.base_url);
    let (state, description) = match (c.finished, c.build_status) {
        (Some(true), Some(0)) => ("success", format!("Build {build} succeeded")),
        (Some(true), s) => {
            let label = s.and_then(BuildStatus::from_i64).map(|s| s.label()).unwrap_or("failed");
            ("failure", format!("Build {build}: {label}"))
        }
        _ => ("pending", format!("Build {build} is queued")),
    };
    queue(ex, &t.commit(), state, context, &description, url).await
}

/// Where an evaluation's jobs stand, with the counts in words.
pub(super) enum Tally {
    Building(String),
    Failed(String),
    Succeeded(String),
}

/// Counts an evaluation's builds and errors (for its summary status or run).
pub(super) fn tally(cells: &[Cell]) -> Tally {
    let errors = cells.iter().filter(|c| c.error.is_some()).count();
    let builds: Vec<&Cell> = cells.iter().filter(|c| c.build_id.is_some()).collect();
    let done = builds.iter().filter(|c| c.finished == Some(true)).count();
    let ok = builds.iter().filter(|c| c.finished == Some(true) && c.build_status == Some(0)).count();
    let bad = done - ok;
    let mut parts = vec![format!("{ok} succeeded")];
    if bad > 0 {
        parts.push(format!("{bad} failed"));
    }
    if errors > 0 {
        parts.push(format!("{errors} evaluation errors"));
    }
    if done < builds.len() {
        Tally::Building(format!("{done} of {} built: {}", builds.len(), parts.join(", ")))
    } else if bad > 0 || errors > 0 {
        Tally::Failed(parts.join(", "))
    } else {
        Tally::Succeeded(format!("{ok} jobs succeeded"))
    }
}

async fn summary(ex: Ex<'_>, p: &Policy, t: &Target, cells: &[Cell]) -> Result<(), DbError> {
    let url = format!("{}/eval/{}", p.base_url, t.eval.id);
    let context = summary_context(&t.jobset);
    if t.eval.status == "failed" {
        let why = t.eval.error.as_deref().unwrap_or("evaluation failed");
        return queue(ex, &t.commit(), "error", context, &format!("Evaluation failed: {why}"), url).await;
    }
    let (state, description) = match tally(cells) {
        Tally::Building(d) => ("pending", d),
        Tally::Failed(d) => ("failure", d),
        Tally::Succeeded(d) => ("success", d),
    };
    queue(ex, &t.commit(), state, context, &description, url).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_fit_githubs_limit_on_a_character_boundary() {
        let long = "é".repeat(300);
        let d = describe(&long);
        assert_eq!(d.chars().count(), 140);
        assert!(d.ends_with('…'));
        assert_eq!(describe("short"), "short");
    }

    #[test]
    fn per_job_statuses_are_bounded() {
        let p = Policy {
            base_url: String::new(),
            mode: StatusMode::PerJob,
            max_job_statuses: 50,
            checks: false,
            app_id: None,
            github: true,
            forges: Vec::new(),
        };
        assert_eq!(p.per_job(50), PerJob::All);
        assert_eq!(p.per_job(51), PerJob::Failures);
        let f = Policy { mode: StatusMode::Failures, ..p.clone() };
        assert_eq!(f.per_job(3), PerJob::Failures);
        let s = Policy { mode: StatusMode::Summary, ..p };
        assert_eq!(s.per_job(3), PerJob::None);
    }
}
