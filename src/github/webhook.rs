//! GitHub webhooks: the signature check (HMAC-SHA256 of the raw body with
//! the shared secret, compared in constant time, before anything is
//! parsed), the events Kiln uses, and what each does to the database, in
//! one transaction with the record of its delivery id so a redelivery does
//! nothing twice. `push` triggers the jobsets that follow the pushed
//! branch; `pull_request` makes, triggers or disables a per-PR jobset from
//! the project's pull-request template. A PR jobset takes its settings
//! from that template, which comes from the default branch's `.kiln.toml`:
//! a fork's own `.kiln.toml` is never read.

use hmac::{KeyInit, Mac};
use serde::Deserialize;
use thiserror::Error;

use crate::db::jobsets::{self, Jobset, JobsetSpec};
use crate::db::{DbError, Ex, builds, check_runs, outbox, projects, webhook_deliveries};

/// GitHub's payloads are at most 25 MB; what Kiln reads is far smaller.
pub const MAX_BODY: usize = 5 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum WebhookError {
    #[error("missing X-Hub-Signature-256")]
    NoSignature,
    #[error("the signature does not match the body and the configured secret")]
    BadSignature,
    #[error("malformed {event} payload: {reason}")]
    Malformed { event: String, reason: String },
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Checks `X-Hub-Signature-256: sha256=<hex>` against the body.
pub fn verify(secret: &[u8], body: &[u8], header: Option<&str>) -> Result<(), WebhookError> {
    let header = header.ok_or(WebhookError::NoSignature)?;
    let hex = header.trim().strip_prefix("sha256=").ok_or(WebhookError::BadSignature)?;
    verify_hex(secret, body, hex)
}

/// Checks a hex HMAC-SHA256 of the body (Gitea's and Forgejo's form).
pub fn verify_hex(secret: &[u8], body: &[u8], hex: &str) -> Result<(), WebhookError> {
    let given = crate::nix::hash::from_hex(hex).filter(|b| b.len() == 32).ok_or(WebhookError::BadSignature)?;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&given).map_err(|_| WebhookError::BadSignature)
}

/// The signature GitHub would send for `body` (for tests and tools).
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    format!("sha256={}", crate::nix::hash::to_hex(&bytes))
}

/// The events Kiln acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Ping,
    Push {
        repo: String,
        default_branch: String,
        branch: Option<String>,
        deleted: bool,
    },
    PullRequest {
        repo: String,
        action: String,
        number: i64,
        head_sha: String,
        /// The author's login and `author_association` with the repository.
        author: String,
        association: String,
    },
    /// A merge queue's group: `checks_requested` when GitHub wants its
    /// head (on a `gh-readonly-queue/...` branch) checked, `destroyed` when
    /// it was merged or left the queue.
    MergeGroup {
        repo: String,
        action: String,
        head_sha: String,
        head_ref: String,
    },
    /// A check run: `rerequested` (GitHub's Re-run) or `requested_action`
    /// (a button of the run: Approve).
    CheckRun {
        repo: String,
        action: String,
        /// The App that made the run: only Kiln's are Kiln's to act on.
        app_id: Option<u64>,
        head_sha: String,
        name: String,
        external_id: String,
        identifier: Option<String>,
        sender: String,
    },
    /// A check suite: `rerequested` (Re-run all) re-evaluates the commit.
    CheckSuite {
        repo: String,
        action: String,
        app_id: Option<u64>,
        head_sha: String,
    },
    /// Anything else: acknowledged, nothing done.
    Other,
}

/// The `repository` of an event (GitHub's, Gitea's and Forgejo's alike).
#[derive(Deserialize)]
pub(crate) struct Repository {
    pub full_name: String,
    #[serde(default)]
    pub default_branch: Option<String>,
}

#[derive(Deserialize)]
struct PushPayload {
    #[serde(rename = "ref")]
    git_ref: String,
    #[serde(default)]
    deleted: bool,
    repository: Repository,
}

#[derive(Deserialize)]
struct PrHead {
    sha: String,
}

#[derive(Deserialize)]
struct PrUser {
    login: String,
}

#[derive(Deserialize)]
struct PrPayload {
    number: i64,
    head: PrHead,
    user: Option<PrUser>,
    /// Missing means unknown, which is not trusted.
    #[serde(default)]
    author_association: Option<String>,
}

#[derive(Deserialize)]
struct PullRequestPayload {
    action: String,
    pull_request: PrPayload,
    repository: Repository,
}

#[derive(Deserialize)]
struct MergeGroupPayload {
    action: String,
    merge_group: MergeGroupInner,
    repository: Repository,
}

#[derive(Deserialize)]
struct MergeGroupInner {
    head_sha: String,
    head_ref: String,
}

#[derive(Deserialize)]
struct AppRef {
    id: u64,
}

#[derive(Deserialize)]
struct Sender {
    login: String,
}

#[derive(Deserialize)]
struct CheckRunInner {
    head_sha: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    external_id: Option<String>,
    app: Option<AppRef>,
}

#[derive(Deserialize)]
struct RequestedAction {
    identifier: String,
}

#[derive(Deserialize)]
struct CheckRunPayload {
    action: String,
    check_run: CheckRunInner,
    requested_action: Option<RequestedAction>,
    repository: Repository,
    sender: Option<Sender>,
}

#[derive(Deserialize)]
struct CheckSuiteInner {
    head_sha: String,
    app: Option<AppRef>,
}

#[derive(Deserialize)]
struct CheckSuitePayload {
    action: String,
    check_suite: CheckSuiteInner,
    repository: Repository,
}

/// Parses a verified body by its `X-GitHub-Event`.
pub fn parse(event: &str, body: &[u8]) -> Result<Event, WebhookError> {
    let bad = |e: serde_json::Error| WebhookError::Malformed { event: event.to_string(), reason: e.to_string() };
    match event {
        "ping" => {
            serde_json::from_slice::<serde_json::Value>(body).map_err(bad)?;
            Ok(Event::Ping)
        }
        "push" => {
            let p: PushPayload = serde_json::from_slice(body).map_err(bad)?;
            Ok(Event::Push {
                branch: p.git_ref.strip_prefix("refs/heads/").map(str::to_string),
                default_branch: p.repository.default_branch.unwrap_or_default(),
                repo: p.repository.full_name,
                deleted: p.deleted,
            })
        }
        "pull_request" => {
            let p: PullRequestPayload = serde_json::from_slice(body).map_err(bad)?;
            Ok(Event::PullRequest {
                repo: p.repository.full_name,
                action: p.action,
                number: p.pull_request.number,
                head_sha: p.pull_request.head.sha,
                author: p.pull_request.user.map(|u| u.login).unwrap_or_default(),
                association: p.pull_request.author_association.unwrap_or_else(|| "NONE".into()),
            })
        }
        "merge_group" => {
            let p: MergeGroupPayload = serde_json::from_slice(body).map_err(bad)?;
            Ok(Event::MergeGroup {
                repo: p.repository.full_name,
                action: p.action,
                head_sha: p.merge_group.head_sha,
                head_ref: p.merge_group.head_ref,
            })
        }
        "check_run" => {
            let p: CheckRunPayload = serde_json::from_slice(body).map_err(bad)?;
            Ok(Event::CheckRun {
                repo: p.repository.full_name,
                action: p.action,
                app_id: p.check_run.app.map(|a| a.id),
                head_sha: p.check_run.head_sha,
                name: p.check_run.name,
                external_id: p.check_run.external_id.unwrap_or_default(),
                identifier: p.requested_action.map(|a| a.identifier),
                sender: p.sender.map(|s| s.login).unwrap_or_default(),
            })
        }
        "check_suite" => {
            let p: CheckSuitePayload = serde_json::from_slice(body).map_err(bad)?;
            Ok(Event::CheckSuite {
                repo: p.repository.full_name,
                action: p.action,
                app_id: p.check_suite.app.map(|a| a.id),
                head_sha: p.check_suite.head_sha,
            })
        }
        _ => Ok(Event::Other),
    }
}

/// What a delivery did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Applied {
    /// The delivery id was seen before: nothing was done again.
    pub duplicate: bool,
    /// `project:jobset` of every jobset triggered.
    pub triggered: Vec<String>,
    /// `project:jobset` of every jobset disabled (closed pull requests).
    pub disabled: Vec<String>,
    /// Builds cancelled (those of closed pull requests).
    #[serde(default)]
    pub cancelled: Vec<i64>,
    /// `project:jobset` of pull requests from outside contributors that
    /// wait for approval: nothing of them is fetched until then.
    #[serde(default)]
    pub awaiting_approval: Vec<String>,
    /// Builds to restart (a check run's Re-run).
    #[serde(default)]
    pub restarted: Vec<i64>,
    /// `project:jobset` of pull requests approved (the check run's button).
    #[serde(default)]
    pub approved: Vec<String>,
}

/// Records the delivery and applies the event, in the caller's transaction
/// (with a status policy, a pull request that waits for approval says so on
/// its head).
pub async fn apply(
    mut ex: Ex<'_>,
    delivery: &str,
    event: &Event,
    statuses: Option<&super::statuses::Policy>,
    forge: Option<&crate::forge::ForgeRef>,
) -> Result<Applied, WebhookError> {
    if !webhook_deliveries::record(ex.re(), delivery).await? {
        return Ok(Applied { duplicate: true, ..Default::default() });
    }
    let mut applied = Applied::default();
    let (repo, act) = match event {
        Event::Push { repo, .. } | Event::PullRequest { repo, .. } | Event::MergeGroup { repo, .. } => (repo, event),
        Event::CheckRun { repo, app_id, .. } | Event::CheckSuite { repo, app_id, .. } => {
            // Other Apps' runs, and GitHub's echoes of Kiln's own suites
            // (requested, completed), are not Kiln's to act on.
            let ours = statuses.is_some_and(|p| p.checks && p.app_id.is_some() && p.app_id == *app_id);
            if !ours {
                return Ok(applied);
            }
            (repo, event)
        }
        Event::Ping | Event::Other => return Ok(applied),
    };
    for p in projects::list(ex.re()).await? {
        // A forge's event is about its projects; GitHub's about GitHub's.
        let on = match forge {
            Some(f) => f.repo_of(&p.repo),
            None => super::repo_of(&p)
                .filter(|_| statuses.is_none_or(|s| crate::forge::forge_of(&s.forges, &p.repo).is_none())),
        };
        if !p.enabled || !on.is_some_and(|r| r.same(repo)) {
            continue;
        }
        let js = jobsets::list_for_project(ex.re(), p.id).await?;
        match act {
            Event::Push { default_branch, branch: Some(branch), deleted: false, .. } => {
                for j in js.iter().filter(|j| j.enabled && !j.is_template() && j.pr_number.is_none()) {
                    let follows = j.branch.as_deref().unwrap_or(default_branch.as_str());
                    if follows == branch {
                        jobsets::trigger(ex.re(), j.id, false).await?;
                        applied.triggered.push(format!("{}:{}", p.name, j.name));
                    }
                }
            }
            Event::PullRequest { action, number, head_sha, author, association, .. } => {
                let templates: Vec<&Jobset> = js.iter().filter(|j| j.pull_requests && j.enabled).collect();
                for t in &templates {
                    let name = pr_jobset_name(&t.name, *number, templates.len());
                    match action.as_str() {
                        "opened" | "synchronize" | "reopened" => {
                            let j = jobsets::upsert(ex.re(), p.id, &pr_spec(t, &name, *number)).await?;
                            jobsets::set_pr_head(ex.re(), j.id, author, association, head_sha).await?;
                            let j = jobsets::get_by_id(ex.re(), j.id).await?.expect("just written");
                            if j.approved_for(None) {
                                jobsets::trigger(ex.re(), j.id, false).await?;
                                applied.triggered.push(format!("{}:{}", p.name, name));
                            } else {
                                if let Some(policy) = statuses {
                                    super::statuses::awaiting_approval(ex.re(), policy, &p, &j, head_sha).await?;
                                }
                                applied.awaiting_approval.push(format!("{}:{}", p.name, name));
                            }
                        }
                        "closed" => {
                            if let Some(j) = js.iter().find(|j| j.name == name && j.pr_number == Some(*number)) {
                                jobsets::set_enabled(ex.re(), j.id, false).await?;
                                let why = format!("cancelled: pull request #{number} was closed");
                                let cancelled = builds::cancel_unfinished_of_jobset(ex.re(), j.id, None, &why).await?;
                                applied.cancelled.extend(cancelled);
                                // Statuses still waiting to be sent for it are dropped.
                                let ctx = super::statuses::summary_context(&j.name);
                                outbox::drop_pending_context(ex.re(), &ctx).await?;
                                outbox::drop_pending_context(ex.re(), &format!("{ctx}/")).await?;
                                applied.disabled.push(format!("{}:{}", p.name, name));
                            }
                        }
                        _ => {}
                    }
                }
            }
            Event::CheckRun { action, external_id, identifier, sender, head_sha, name, .. } => {
                let (kind, id) = external_id.split_once(':').unwrap_or_default();
                let Ok(id) = id.parse::<i64>() else { continue };
                // A re-run is a new run on GitHub: the next state creates one.
                let target = super::repo_of(&p).map(|r| format!("{}@{head_sha}", r.full_name()));
                if action == "rerequested"
                    && let Some(t) = &target
                {
                    check_runs::forget(ex.re(), t, name).await?;
                }
                let mine = |jobset_id: i64| js.iter().find(|j| j.id == jobset_id);
                match (action.as_str(), kind, identifier.as_deref()) {
                    ("rerequested", "build", _) => {
                        if let Some(b) = builds::get(ex.re(), id).await?
                            && mine(b.jobset_id).is_some()
                            && b.finished
                        {
                            applied.restarted.push(b.id);
                        }
                    }
                    ("rerequested", "eval", _) => {
                        if let Some(e) = crate::db::evaluations::get(ex.re(), id).await?
                            && let Some(j) = mine(e.jobset_id)
                        {
                            if let Some(t) = &target {
                                check_runs::forget_target(ex.re(), t).await?;
                            }
                            jobsets::trigger(ex.re(), j.id, true).await?;
                            applied.triggered.push(format!("{}:{}", p.name, j.name));
                        }
                    }
                    ("requested_action", "approve", Some(super::checks::APPROVE)) => {
                        // GitHub shows the button to people with write access only.
                        if let Some(j) = mine(id).filter(|j| j.pr_number.is_some()) {
                            // The run that asked is done: the evaluation gets a new one.
                            if let Some(t) = &target {
                                check_runs::forget(ex.re(), t, name).await?;
                            }
                            jobsets::approve(ex.re(), j.id, &format!("@{sender} on GitHub")).await?;
                            jobsets::trigger(ex.re(), j.id, false).await?;
                            applied.approved.push(format!("{}:{}", p.name, j.name));
                            applied.triggered.push(format!("{}:{}", p.name, j.name));
                        }
                    }
                    _ => {}
                }
            }
            Event::CheckSuite { action, head_sha, .. } if action == "rerequested" => {
                if let Some(r) = super::repo_of(&p) {
                    check_runs::forget_target(ex.re(), &format!("{}@{head_sha}", r.full_name())).await?;
                }
                for id in crate::db::evaluations::jobsets_of_commit(ex.re(), head_sha).await? {
                    if let Some(j) = js.iter().find(|j| j.id == id && j.enabled) {
                        jobsets::trigger(ex.re(), j.id, true).await?;
                        applied.triggered.push(format!("{}:{}", p.name, j.name));
                    }
                }
            }
            Event::MergeGroup { action, head_ref, .. } => {
                let Some(branch) = merge_group_branch(head_ref) else { continue };
                for t in js.iter().filter(|j| j.merge_queue && j.enabled) {
                    let name = merge_group_jobset_name(&t.name, branch);
                    match action.as_str() {
                        // Whoever queued it has write access: no approval gate.
                        "checks_requested" => {
                            let j = jobsets::upsert(ex.re(), p.id, &merge_group_spec(t, &name, branch)).await?;
                            jobsets::trigger(ex.re(), j.id, false).await?;
                            applied.triggered.push(format!("{}:{}", p.name, name));
                        }
                        "destroyed" => {
                            if let Some(j) = js.iter().find(|j| j.name == name) {
                                jobsets::set_enabled(ex.re(), j.id, false).await?;
                                let why = format!("cancelled: merge group {branch} left the queue");
                                let cancelled = builds::cancel_unfinished_of_jobset(ex.re(), j.id, None, &why).await?;
                                applied.cancelled.extend(cancelled);
                                applied.disabled.push(format!("{}:{}", p.name, name));
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(applied)
}

/// The branch of a merge group's `head_ref`, if it is a merge queue's.
fn merge_group_branch(head_ref: &str) -> Option<&str> {
    let b = head_ref.strip_prefix("refs/heads/").unwrap_or(head_ref);
    b.starts_with("gh-readonly-queue/").then_some(b)
}

/// `<template>-<n>-<hash>`: the pull request's number and a short hash of
/// the whole branch (two groups of one pull request differ in their base).
pub fn merge_group_jobset_name(template: &str, branch: &str) -> String {
    let pr = branch.rsplit('/').next().and_then(|l| l.strip_prefix("pr-")).and_then(|r| r.split('-').next());
    let hash = crate::nix::Hash::sha256(branch.as_bytes()).to_hex();
    match pr.filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
        Some(n) => format!("{template}-{n}-{}", &hash[..8]),
        None => format!("{template}-{}", &hash[..8]),
    }
}

fn merge_group_spec(t: &Jobset, name: &str, branch: &str) -> JobsetSpec {
    JobsetSpec {
        name: name.to_string(),
        branch: Some(branch.to_string()),
        pr_number: None,
        flake_dir: t.flake_dir.clone(),
        attributes: t.attribute_list(),
        systems: t.system_list(),
        check_interval: 0,
        scheduling_shares: t.scheduling_shares,
        keep_evaluations: t.keep_evaluations,
        enabled: true,
        pull_requests: false,
        config_hash: t.config_hash.clone(),
        trusted_associations: Vec::new(),
        approve_each_push: false,
        merge_queue: false,
        report_as: Some(t.name.clone()),
        template: Some(t.name.clone()),
    }
}

/// `pr-<n>`, or `<template>-pr-<n>` when a project has several templates.
pub fn pr_jobset_name(template: &str, number: i64, templates: usize) -> String {
    if templates == 1 { format!("pr-{number}") } else { format!("{template}-pr-{number}") }
}

fn pr_spec(t: &Jobset, name: &str, number: i64) -> JobsetSpec {
    JobsetSpec {
        name: name.to_string(),
        branch: None,
        pr_number: Some(number),
        flake_dir: t.flake_dir.clone(),
        attributes: t.attribute_list(),
        systems: t.system_list(),
        check_interval: t.check_interval,
        scheduling_shares: t.scheduling_shares,
        keep_evaluations: t.keep_evaluations,
        enabled: true,
        pull_requests: false,
        config_hash: t.config_hash.clone(),
        trusted_associations: t.trusted_list(),
        approve_each_push: t.approve_each_push,
        merge_queue: false,
        report_as: None,
        template: Some(t.name.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_checked_against_the_body_and_secret() {
        let body = br#"{"zen":"Keep it logically awesome."}"#;
        let sig = sign(b"s3cret", body);
        assert!(verify(b"s3cret", body, Some(&sig)).is_ok());
        assert!(matches!(verify(b"other", body, Some(&sig)), Err(WebhookError::BadSignature)));
        assert!(matches!(verify(b"s3cret", b"{}", Some(&sig)), Err(WebhookError::BadSignature)));
        assert!(matches!(verify(b"s3cret", body, None), Err(WebhookError::NoSignature)));
        assert!(matches!(verify(b"s3cret", body, Some("sha1=abc")), Err(WebhookError::BadSignature)));
        assert!(matches!(verify(b"s3cret", body, Some("sha256=zz")), Err(WebhookError::BadSignature)));
    }

    #[test]
    fn githubs_documented_example_signature_verifies() {
        // From GitHub's "Validating webhook deliveries" page.
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(verify(b"It's a Secret to Everybody", b"Hello, World!", Some(sig)).is_ok());
    }

    #[test]
    fn events_parse_into_what_kiln_needs() {
        let push =
            br#"{"ref":"refs/heads/main","after":"abc","repository":{"full_name":"acme/w","default_branch":"main"}}"#;
        assert_eq!(
            parse("push", push).unwrap(),
            Event::Push {
                repo: "acme/w".into(),
                default_branch: "main".into(),
                branch: Some("main".into()),
                deleted: false
            }
        );
        let tag = br#"{"ref":"refs/tags/v1","repository":{"full_name":"acme/w"}}"#;
        assert!(matches!(parse("push", tag).unwrap(), Event::Push { branch: None, .. }));
        let pr = br#"{"action":"opened","number":5,"pull_request":{"number":5,"head":{"sha":"0123"},"user":{"login":"eve"},"author_association":"CONTRIBUTOR"},"repository":{"full_name":"acme/w"}}"#;
        assert!(matches!(
            parse("pull_request", pr).unwrap(),
            Event::PullRequest { number: 5, ref author, ref association, .. } if author == "eve" && association == "CONTRIBUTOR"
        ));
        let unknown = br#"{"action":"opened","number":5,"pull_request":{"number":5,"head":{"sha":"0123"}},"repository":{"full_name":"acme/w"}}"#;
        assert!(
            matches!(parse("pull_request", unknown).unwrap(), Event::PullRequest { ref association, .. } if association == "NONE")
        );
        assert!(matches!(parse("push", b"{not json"), Err(WebhookError::Malformed { .. })));
        assert!(matches!(parse("push", br#"{"ref":1}"#), Err(WebhookError::Malformed { .. })));
        assert_eq!(parse("issues", b"whatever").unwrap(), Event::Other);
        assert_eq!(pr_jobset_name("pulls", 5, 1), "pr-5");
        let mg = br#"{"action":"checks_requested","merge_group":{"head_sha":"abc","head_ref":"refs/heads/gh-readonly-queue/main/pr-12-0123abcd","base_ref":"refs/heads/main"},"repository":{"full_name":"acme/w"}}"#;
        let Event::MergeGroup { head_ref, .. } = parse("merge_group", mg).unwrap() else { panic!("not a merge group") };
        let branch = merge_group_branch(&head_ref).unwrap();
        assert_eq!(branch, "gh-readonly-queue/main/pr-12-0123abcd");
        let name = merge_group_jobset_name("queue", branch);
        assert!(name.starts_with("queue-12-") && crate::config::valid_name(&name), "{name}");
        assert_ne!(name, merge_group_jobset_name("queue", "gh-readonly-queue/main/pr-12-ffff0000"));
        assert_eq!(merge_group_branch("refs/heads/main"), None);
        assert_eq!(pr_jobset_name("pulls", 5, 2), "pulls-pr-5");
    }
}
