//! GitHub check runs (the Checks API), which a GitHub App reports through
//! instead of commit statuses: `kiln/<jobset>` for the evaluation, with a
//! Markdown table of every job and the evaluation errors as annotations on
//! the file and line Nix names; `kiln/<stable>/all`, whose name never
//! changes with the jobs or the pull request (its template's name), for
//! branch protection; and `kiln/<jobset>/<job>` for each failed job, up to
//! a budget. Like statuses, every state is composed in the transaction of
//! the change that calls for it and queued in the outbox; the sender
//! ([`deliver`]) creates a run the first time and updates it after (the
//! run's id is in `check_runs`), and sends annotations once, 50 a request.
//! A re-run forgets the run, so the next state makes a new one.

use serde::{Deserialize, Serialize};

use crate::db::builds::BuildStatus;
use crate::db::evaluations::Cell;
use crate::db::{Db, DbError, Ex, check_runs, jobsets, now, outbox, projects};

use super::sender::{Outcome, classify};
use super::statuses::{Policy, Tally, Target, is_sha};
use super::{Credentials, Repo};

/// The outbox `kind` of a check run's state.
pub const KIND: &str = "github_check";
/// GitHub's limits: `output.summary` and `output.text` in characters,
/// annotations per request, the title of an annotation.
const MAX_OUTPUT: usize = 65535;
pub const ANNOTATIONS_PER_REQUEST: usize = 50;
/// The `requested_action` identifier of the approval button.
pub const APPROVE: &str = "approve";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Annotation {
    pub path: String,
    pub start_line: u32,
    pub end_line: u32,
    pub annotation_level: String,
    pub title: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Action {
    pub label: String,
    pub description: String,
    pub identifier: String,
}

/// One state of one check run, as queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRun {
    pub owner: String,
    pub repo: String,
    pub sha: String,
    pub name: String,
    /// `eval:<id>` or `build:<id>`: what a Re-run restarts.
    pub external_id: String,
    pub details_url: String,
    /// `queued`, `in_progress` or `completed`.
    pub status: String,
    /// With `completed`: `success`, `failure`, `cancelled`, `action_required`.
    pub conclusion: Option<String>,
    pub title: String,
    pub summary: String,
    pub text: Option<String>,
    /// Every annotation of the run; the sender sends those GitHub lacks.
    pub annotations: Vec<Annotation>,
    pub actions: Vec<Action>,
}

impl CheckRun {
    /// The outbox target: one commit of one repository (as statuses).
    pub fn target(&self) -> String {
        format!("{}/{}@{}", self.owner, self.repo, self.sha)
    }
}

/// The check run names of a target.
pub fn eval_name(jobset: &str) -> String {
    super::statuses::summary_context(jobset)
}
pub fn all_name(stable: &str) -> String {
    format!("kiln/{stable}/all")
}
pub fn job_name(jobset: &str, job: &str) -> String {
    super::statuses::job_context(jobset, job)
}

fn base(t: &Target, name: String, external_id: String, details_url: String) -> CheckRun {
    CheckRun {
        owner: t.repo.owner.clone(),
        repo: t.repo.name.clone(),
        sha: t.sha.clone(),
        name,
        external_id,
        details_url,
        status: "in_progress".into(),
        conclusion: None,
        title: String::new(),
        summary: String::new(),
        text: None,
        annotations: Vec::new(),
        actions: Vec::new(),
    }
}

async fn queue(ex: Ex<'_>, run: &CheckRun) -> Result<(), DbError> {
    let payload = serde_json::to_string(run).map_err(|e| DbError::Invalid(e.to_string()))?;
    outbox::enqueue(ex, KIND, &run.target(), &run.name, &payload).await?;
    Ok(())
}

/// An evaluation started: its run and the stable one are in progress.
pub(super) async fn started(mut ex: Ex<'_>, p: &Policy, t: &Target) -> Result<(), DbError> {
    let url = format!("{}/eval/{}", p.base_url, t.eval.id);
    for name in [eval_name(&t.jobset), all_name(&t.stable)] {
        let mut run = base(t, name, format!("eval:{}", t.eval.id), url.clone());
        run.title = "Evaluating…".into();
        run.summary = format!("Kiln is evaluating commit `{}`: [evaluation {}]({url}).", t.sha, t.eval.id);
        queue(ex.re(), &run).await?;
    }
    Ok(())
}

/// The evaluation's run, the stable run and the failed jobs' runs (all of
/// them up to the budget, or only `build`'s when one build changed).
pub(super) async fn report(
    mut ex: Ex<'_>,
    p: &Policy,
    t: &Target,
    cells: &[Cell],
    build: Option<i64>,
) -> Result<(), DbError> {
    let eval_url = format!("{}/eval/{}", p.base_url, t.eval.id);
    let (status, conclusion, title) = outcome(t, cells);
    let mut run = base(t, eval_name(&t.jobset), format!("eval:{}", t.eval.id), eval_url.clone());
    run.status = status.into();
    run.conclusion = conclusion.map(str::to_string);
    run.title = title.clone();
    run.summary = format!("{title}. Every job, with its build and log, is on [evaluation {}]({eval_url}).", t.eval.id);
    run.text = Some(table(p, cells, &eval_url));
    run.annotations = annotations(t, cells);
    queue(ex.re(), &run).await?;

    let mut all = base(t, all_name(&t.stable), format!("eval:{}", t.eval.id), eval_url.clone());
    all.status = run.status.clone();
    all.conclusion = run.conclusion.clone();
    all.title = title;
    all.summary = format!("All jobs of [evaluation {}]({eval_url}) (`{}`).", t.eval.id, t.jobset);
    queue(ex.re(), &all).await?;

    let failed: Vec<&Cell> = cells
        .iter()
        .filter(|c| c.build_id.is_some() && c.finished == Some(true) && c.build_status != Some(0))
        .take(p.max_job_statuses)
        .collect();
    for c in failed.into_iter().filter(|c| build.is_none() || c.build_id == build) {
        let id = c.build_id.expect("filtered");
        let url = format!("{}/build/{id}", p.base_url);
        let mut r = base(t, job_name(&t.jobset, &c.job), format!("build:{id}"), url.clone());
        let label = c.build_status.and_then(BuildStatus::from_i64).map(|s| s.label()).unwrap_or("failed");
        r.status = "completed".into();
        r.conclusion = Some(if c.build_status == Some(4) { "cancelled" } else { "failure" }.into());
        r.title = format!("Build {id}: {label}");
        r.summary = format!("Job `{}`: {label}. [Build {id}]({url}), [its log]({url}/log).", c.job);
        queue(ex.re(), &r).await?;
    }
    // A job that has a run (it failed) and was restarted: queued again (a
    // new run, as GitHub shows a re-run), then its new result.
    if let Some(b) = build
        && let Some(c) = cells.iter().find(|c| c.build_id == Some(b))
        && (c.finished != Some(true) || c.build_status == Some(0))
    {
        let url = format!("{}/build/{b}", p.base_url);
        let mut r = base(t, job_name(&t.jobset, &c.job), format!("build:{b}"), url.clone());
        if c.finished == Some(true) {
            r.status = "completed".into();
            r.conclusion = Some("success".into());
            r.title = format!("Build {b} succeeded");
            r.summary = format!("Job `{}` succeeded: [build {b}]({url}).", c.job);
        } else {
            r.title = format!("Build {b} is queued again");
            r.summary = format!("Job `{}` was restarted: [build {b}]({url}).", c.job);
        }
        if check_runs::get(ex.re(), &r.target(), &r.name).await?.is_some() {
            queue(ex, &r).await?;
        }
    }
    Ok(())
}

/// (status, conclusion, title) of an evaluation and its builds.
fn outcome(t: &Target, cells: &[Cell]) -> (&'static str, Option<&'static str>, String) {
    if t.eval.status == "failed" {
        let why = t.eval.error.as_deref().unwrap_or("evaluation failed");
        let first = why.lines().find(|l| !l.trim().is_empty()).unwrap_or(why);
        return ("completed", Some("failure"), cut(&format!("Evaluation failed: {first}"), 200));
    }
    match super::statuses::tally(cells) {
        Tally::Building(d) => ("in_progress", None, d),
        Tally::Failed(d) => ("completed", Some("failure"), d),
        Tally::Succeeded(d) => ("completed", Some("success"), d),
    }
}

/// Every job as a Markdown table row, cut on a row boundary to GitHub's
/// limit with a line that says how many rows were left out.
pub fn table(p: &Policy, cells: &[Cell], eval_url: &str) -> String {
    let mut out = String::from("| Job | Status | Duration | Build |\n| --- | --- | --- | --- |\n");
    // Room for the last line, whatever the count.
    let reserve = 200 + eval_url.len();
    for (i, c) in cells.iter().enumerate() {
        let (status, build) = match (&c.error, c.build_id) {
            (Some(e), _) => {
                let first = e.lines().find(|l| !l.trim().is_empty()).unwrap_or("error");
                (format!("evaluation error: {}", cut(first, 120)), String::new())
            }
            (None, Some(b)) => {
                let s = match (c.finished, c.build_status) {
                    (Some(true), s) => s.and_then(BuildStatus::from_i64).map(|s| s.label()).unwrap_or("failed"),
                    _ => "queued",
                };
                (s.to_string(), format!("[{b}]({}/build/{b}) · [log]({}/build/{b}/log)", p.base_url, p.base_url))
            }
            (None, None) => ("no derivation".into(), String::new()),
        };
        let secs = c.secs.map(duration).unwrap_or_default();
        let row = format!("| `{}` | {} | {secs} | {build} |\n", c.job.replace('|', "\\|"), status.replace('|', "\\|"));
        if out.chars().count() + row.chars().count() + reserve > MAX_OUTPUT {
            out.push_str(&format!("\n{} more jobs are on [the evaluation]({eval_url}).\n", cells.len() - i));
            break;
        }
        out.push_str(&row);
    }
    out
}

fn duration(secs: i64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

/// Annotations for the evaluation's errors: on the file and line of the
/// repository that Nix names (`at /nix/store/<hash>-source/<path>:<line>:<col>:`).
/// Errors without such a place are on the run's text, not annotated.
fn annotations(t: &Target, cells: &[Cell]) -> Vec<Annotation> {
    let mut out = Vec::new();
    let whole = t.eval.error.iter().map(|e| ("evaluation", e.as_str()));
    for (job, error) in cells.iter().filter_map(|c| c.error.as_deref().map(|e| (c.job.as_str(), e))).chain(whole) {
        if let Some((path, line)) = location(error) {
            let first = error.lines().find(|l| !l.trim().is_empty()).unwrap_or("evaluation error");
            out.push(Annotation {
                path,
                start_line: line,
                end_line: line,
                annotation_level: "failure".into(),
                title: cut(&format!("{job}: {first}"), 255),
                message: cut(error.trim(), MAX_OUTPUT / 4),
            });
        }
    }
    out
}

/// The first place in the flake's source that a Nix error names.
pub fn location(error: &str) -> Option<(String, u32)> {
    for line in error.lines() {
        let Some(rest) = line.trim().strip_prefix("at ") else { continue };
        let rest = rest.trim_end_matches(':');
        let Some(after) = rest.strip_prefix("/nix/store/") else { continue };
        // <32-char hash>-source/<path>:<line>:<col>
        let (name, path) = after.split_once('/')?;
        if name.len() < 33 || !name[33..].starts_with("source") {
            continue;
        }
        let mut parts = path.rsplitn(3, ':');
        let (_col, line_no, file) = (parts.next()?, parts.next()?, parts.next()?);
        if let Ok(n) = line_no.parse::<u32>()
            && !file.is_empty()
            && !file.split('/').any(|c| c == "..")
        {
            return Some((file.to_string(), n.max(1)));
        }
    }
    None
}

/// A pull request waits for approval: its run asks for it, with GitHub's
/// button (shown only to people with write access).
pub async fn awaiting_approval(
    ex: Ex<'_>,
    p: &Policy,
    project: &projects::Project,
    jobset: &jobsets::Jobset,
    head_sha: &str,
) -> Result<(), DbError> {
    let Some(repo) = super::repo_of(project) else { return Ok(()) };
    if !is_sha(head_sha) {
        return Ok(());
    }
    let url = format!("{}/jobset/{}/{}", p.base_url, project.name, jobset.name);
    let who = jobset.pr_author.as_deref().unwrap_or("an outside contributor");
    let run = CheckRun {
        owner: repo.owner,
        repo: repo.name,
        sha: head_sha.to_string(),
        name: eval_name(jobset.reported_name()),
        external_id: format!("approve:{}", jobset.id),
        details_url: url.clone(),
        status: "completed".into(),
        conclusion: Some("action_required".into()),
        title: "Waiting for approval".into(),
        summary: format!(
            "@{who} is not a member of this repository, so nothing of this pull request is fetched, evaluated or \
             built until a maintainer approves it: the Approve button here, or [Kiln's page for it]({url}). \
             Read the changes first: evaluating a flake runs its Nix code on Kiln's machine."
        ),
        text: None,
        annotations: Vec::new(),
        actions: vec![Action {
            label: "Approve".into(),
            description: "Fetch, evaluate and build it".into(),
            identifier: APPROVE.into(),
        }],
    };
    queue(ex, &run).await
}

/// Delivers one state: creates the run, or updates the one GitHub has (a
/// new run when that one is completed and this state is not: GitHub shows
/// a re-run as a new run), then sends the annotations GitHub lacks.
pub async fn deliver(db: &Db, creds: &Credentials, run: &CheckRun) -> Result<Outcome, DbError> {
    let repo = Repo { owner: run.owner.clone(), name: run.repo.clone() };
    let client = match creds.client(&repo).await {
        Ok(c) => c,
        Err(e) => return Ok(Outcome::Retry(e.to_string())),
    };
    let target = run.target();
    let known = {
        let mut c = db.conn().await?;
        check_runs::state(c.ex(), &target, &run.name).await?
    };
    let completed = run.status == "completed";
    let reuse = known.filter(|k| !k.completed || completed);
    let mut sent = reuse.as_ref().map(|k| k.annotations_sent as usize).unwrap_or(0).min(run.annotations.len());
    let chunk =
        |from: usize| run.annotations[from..(from + ANNOTATIONS_PER_REQUEST).min(run.annotations.len())].to_vec();
    let mut output = serde_json::json!({"title": run.title, "summary": run.summary});
    if let Some(t) = &run.text {
        output["text"] = serde_json::json!(t);
    }
    let first = chunk(sent);
    output["annotations"] = serde_json::json!(first);
    let mut body = serde_json::json!({
        "name": run.name,
        "external_id": run.external_id,
        "details_url": run.details_url,
        "status": run.status,
        "output": output,
        "actions": run.actions,
    });
    if let Some(c) = &run.conclusion {
        body["conclusion"] = serde_json::json!(c);
    }
    let (status, headers, text) = match &reuse {
        Some(k) => {
            let route = format!("/repos/{}/{}/check-runs/{}", run.owner, run.repo, k.run_id);
            match super::sender::request(&client, http::Method::PATCH, route, &body).await {
                Ok(r) => r,
                Err(e) => return Ok(Outcome::Retry(e)),
            }
        }
        None => {
            body["head_sha"] = serde_json::json!(run.sha);
            let route = format!("/repos/{}/{}/check-runs", run.owner, run.repo);
            match super::sender::request(&client, http::Method::POST, route, &body).await {
                Ok(r) => r,
                Err(e) => return Ok(Outcome::Retry(e)),
            }
        }
    };
    if !(200..300).contains(&status) {
        return Ok(classify_check(status, &headers, &text));
    }
    let run_id = match &reuse {
        Some(k) => k.run_id,
        None => match serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v["id"].as_i64()) {
            Some(id) => id,
            None => return Ok(Outcome::GiveUp(format!("GitHub created a check run without an id: {text}"))),
        },
    };
    sent += first.len();
    {
        let mut c = db.conn().await?;
        check_runs::record(c.ex(), &target, &run.name, run_id, completed, sent as i64).await?;
    }
    // GitHub takes 50 annotations a request and appends those of each update.
    while sent < run.annotations.len() {
        let more = chunk(sent);
        let body = serde_json::json!({"output": {"title": run.title, "summary": run.summary, "annotations": more}});
        let route = format!("/repos/{}/{}/check-runs/{run_id}", run.owner, run.repo);
        let (status, headers, text) = match super::sender::request(&client, http::Method::PATCH, route, &body).await {
            Ok(r) => r,
            Err(e) => return Ok(Outcome::Retry(e)),
        };
        if !(200..300).contains(&status) {
            return Ok(classify_check(status, &headers, &text));
        }
        sent += more.len();
        let mut c = db.conn().await?;
        check_runs::record(c.ex(), &target, &run.name, run_id, completed, sent as i64).await?;
    }
    Ok(Outcome::Delivered)
}

/// What a 403 without a rate limit means for check runs: the App lacks the
/// permission. Said once in the log (and kept on the message, which
/// `/machines` shows); not retried.
fn classify_check(status: u16, headers: &http::HeaderMap, text: &str) -> Outcome {
    match classify(status, headers, text, now()) {
        Outcome::GiveUp(why) if status == 403 => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::error!(
                    answer = %why,
                    "GitHub refused a check run: grant the GitHub App the permission \"Checks: read and write\""
                )
            });
            Outcome::GiveUp(format!("{PERMISSION_HINT} ({why})"))
        }
        other => other,
    }
}

/// What `/machines` shows when GitHub refused check runs for want of permission.
pub const PERMISSION_HINT: &str = "the GitHub App lacks the permission \"Checks: read and write\"";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_located_in_the_flake_source() {
        let e = "error: undefined variable 'oops'\n\n       at /nix/store/0123456789abcdfghijklmnpqrsvwxyz-source/sub/flake.nix:7:13:\n\n            6|";
        assert_eq!(location(e), Some(("sub/flake.nix".to_string(), 7)));
        assert_eq!(location("error: no place"), None);
        // Not the flake's source: nixpkgs or another input has its own name.
        assert_eq!(location("at /nix/store/0123456789abcdfghijklmnpqrsvwxyz-nixpkgs/lib/x.nix:1:1:"), None);
        assert_eq!(location("at /nix/store/0123456789abcdfghijklmnpqrsvwxyz-source/../etc/passwd:1:1:"), None);
    }

    #[test]
    fn the_job_table_is_cut_on_a_row_to_githubs_limit() {
        let p = Policy {
            base_url: "https://ci".into(),
            mode: crate::config::StatusMode::PerJob,
            max_job_statuses: 50,
            checks: true,
            app_id: None,
            github: true,
            forges: Vec::new(),
        };
        let cells: Vec<Cell> = (0..3000)
            .map(|i| Cell {
                eval_id: 1,
                job: format!("packages.x86_64-linux.job-number-{i}"),
                build_id: Some(i),
                finished: Some(true),
                build_status: Some(0),
                error: None,
                secs: Some(75),
            })
            .collect();
        let t = table(&p, &cells, "https://ci/eval/1");
        assert!(t.chars().count() <= MAX_OUTPUT, "{}", t.chars().count());
        assert!(t.contains("| `packages.x86_64-linux.job-number-0` | succeeded | 1 min 15 s |"));
        let rows = t.lines().filter(|l| l.starts_with("| `")).count();
        assert!(rows < 3000 && t.contains(&format!("{} more jobs are on [the evaluation]", 3000 - rows)), "{rows}");
        let small = table(&p, &cells[..2], "https://ci/eval/1");
        assert!(!small.contains("more jobs"));
    }
}
