//! The `jobsets` table: what to evaluate in a project (branch or pull
//! request, flake attributes, systems) and when (interval, triggers).

use serde::Serialize;

use super::{Ex, Result, now, run};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Jobset {
    pub id: i64,
    pub project_id: i64,
    pub name: String,
    /// `None`: the repository's default branch.
    pub branch: Option<String>,
    pub pr_number: Option<i64>,
    pub flake_dir: String,
    /// JSON array of attribute names (`["hydraJobs"]`).
    pub attributes: String,
    /// JSON array of systems to keep; empty keeps all.
    pub systems: String,
    pub check_interval: i64,
    pub scheduling_shares: i64,
    pub keep_evaluations: i64,
    pub enabled: bool,
    pub hidden: bool,
    pub config_hash: String,
    pub last_checked_at: Option<i64>,
    pub trigger_at: Option<i64>,
    /// Counts triggers; a check clears only those it saw (see [`mark_checked`]).
    pub trigger_seq: i64,
    pub force_eval: bool,
    pub error: Option<String>,
    pub error_at: Option<i64>,
    pub created_at: i64,
    /// A template for per-pull-request jobsets; never evaluated itself.
    pub pull_requests: bool,
    /// JSON array of the `author_association`s whose pull requests need no
    /// approval (a template's setting, copied to its pull requests).
    pub trusted_associations: String,
    /// An approval covers one head only: each push waits again.
    pub approve_each_push: bool,
    /// A pull request's author, the author's association with the
    /// repository, and its latest head, as the last webhook said.
    pub pr_author: Option<String>,
    pub pr_association: Option<String>,
    pub pr_head_sha: Option<String>,
    /// Who approved the pull request, and its head then.
    pub approved_by: Option<String>,
    pub approved_sha: Option<String>,
    /// A template for merge groups' jobsets; never evaluated itself.
    pub merge_queue: bool,
    /// The name statuses use instead of the jobset's (a merge group's
    /// template: one context for every group).
    pub report_as: Option<String>,
    /// The template a pull request's or merge group's jobset was made from.
    pub template: Option<String>,
}

impl Jobset {
    pub fn attribute_list(&self) -> Vec<String> {
        serde_json::from_str(&self.attributes).unwrap_or_default()
    }
    pub fn system_list(&self) -> Vec<String> {
        serde_json::from_str(&self.systems).unwrap_or_default()
    }
    /// A template (pull requests, merge groups): never evaluated itself.
    pub fn is_template(&self) -> bool {
        self.pull_requests || self.merge_queue
    }

    /// The name its statuses go by.
    pub fn reported_name(&self) -> &str {
        self.report_as.as_deref().unwrap_or(&self.name)
    }

    /// The name of its checks that never changes: its template's for a pull
    /// request or merge group (one name for all of them), else its own.
    pub fn stable_name(&self) -> &str {
        self.template.as_deref().unwrap_or(&self.name)
    }

    pub fn trusted_list(&self) -> Vec<String> {
        serde_json::from_str(&self.trusted_associations).unwrap_or_default()
    }

    /// Whether this pull request's author is trusted without approval. An
    /// author Kiln has not been told about (a jobset from before the gate)
    /// is not.
    pub fn author_trusted(&self) -> bool {
        self.pr_association.as_ref().is_some_and(|a| self.trusted_list().iter().any(|t| t.eq_ignore_ascii_case(a)))
    }

    /// Whether `rev` of this jobset may be fetched and evaluated: always
    /// for a branch or a trusted author's pull request; else once approved
    /// (at that very head when each push needs approval).
    pub fn approved_for(&self, rev: Option<&str>) -> bool {
        if self.pr_number.is_none() || self.author_trusted() {
            return true;
        }
        match (&self.approved_by, self.approve_each_push) {
            (None, _) => false,
            (Some(_), false) => true,
            (Some(_), true) => {
                let approved = self.approved_sha.as_deref();
                approved.is_some() && approved == rev.or(self.pr_head_sha.as_deref())
            }
        }
    }
}

/// GitHub's values of `author_association`.
pub const ASSOCIATIONS: &[&str] =
    &["OWNER", "MEMBER", "COLLABORATOR", "CONTRIBUTOR", "FIRST_TIME_CONTRIBUTOR", "FIRST_TIMER", "MANNEQUIN", "NONE"];

/// Who is trusted when `.kiln.toml` does not say: people with write access.
pub fn default_trusted() -> Vec<String> {
    ["OWNER", "MEMBER", "COLLABORATOR"].iter().map(|s| s.to_string()).collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsetSpec {
    pub name: String,
    pub branch: Option<String>,
    pub pr_number: Option<i64>,
    pub flake_dir: String,
    pub attributes: Vec<String>,
    pub systems: Vec<String>,
    pub check_interval: i64,
    pub scheduling_shares: i64,
    pub keep_evaluations: i64,
    pub enabled: bool,
    pub pull_requests: bool,
    pub config_hash: String,
    pub trusted_associations: Vec<String>,
    pub approve_each_push: bool,
    pub merge_queue: bool,
    pub report_as: Option<String>,
    pub template: Option<String>,
}

impl JobsetSpec {
    /// Hydra's defaults: the default branch's `hydraJobs`, checked every
    /// 300 s, 100 shares, 3 evaluations kept.
    pub fn new(name: &str) -> Self {
        JobsetSpec {
            name: name.to_string(),
            branch: None,
            pr_number: None,
            flake_dir: String::new(),
            attributes: vec!["hydraJobs".to_string()],
            systems: Vec::new(),
            check_interval: 300,
            scheduling_shares: 100,
            keep_evaluations: 3,
            enabled: true,
            pull_requests: false,
            config_hash: String::new(),
            trusted_associations: default_trusted(),
            approve_each_push: false,
            merge_queue: false,
            report_as: None,
            template: None,
        }
    }
}

macro_rules! cols {
    () => {
        "id, project_id, name, branch, pr_number, flake_dir, attributes, systems, check_interval, \
         scheduling_shares, keep_evaluations, enabled, hidden, config_hash, last_checked_at, trigger_at, \
         trigger_seq, force_eval, error, error_at, created_at, pull_requests, trusted_associations, \
         approve_each_push, pr_author, pr_association, pr_head_sha, approved_by, approved_sha, merge_queue, report_as, \
         template"
    };
}

pub async fn upsert(ex: Ex<'_>, project_id: i64, spec: &JobsetSpec) -> Result<Jobset> {
    let attrs = serde_json::to_string(&spec.attributes).expect("strings serialise");
    let systems = serde_json::to_string(&spec.systems).expect("strings serialise");
    let trusted = serde_json::to_string(&spec.trusted_associations).expect("strings serialise");
    let sql = concat!(
        "INSERT INTO jobsets (project_id, name, branch, pr_number, flake_dir, attributes, systems, check_interval,
             scheduling_shares, keep_evaluations, enabled, config_hash, created_at, pull_requests,
             trusted_associations, approve_each_push, merge_queue, report_as, template)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)
         ON CONFLICT (project_id, name) DO UPDATE SET branch = excluded.branch, pr_number = excluded.pr_number,
             flake_dir = excluded.flake_dir, attributes = excluded.attributes, systems = excluded.systems,
             check_interval = excluded.check_interval, scheduling_shares = excluded.scheduling_shares,
             keep_evaluations = excluded.keep_evaluations, enabled = excluded.enabled,
             config_hash = excluded.config_hash, pull_requests = excluded.pull_requests,
             trusted_associations = excluded.trusted_associations, approve_each_push = excluded.approve_each_push,
             merge_queue = excluded.merge_queue, report_as = excluded.report_as, template = excluded.template
         RETURNING ",
        cols!()
    );
    Ok(run!(ex, c => sqlx::query_as(sql)
        .bind(project_id).bind(&spec.name).bind(&spec.branch).bind(spec.pr_number).bind(&spec.flake_dir)
        .bind(&attrs).bind(&systems).bind(spec.check_interval).bind(spec.scheduling_shares)
        .bind(spec.keep_evaluations).bind(spec.enabled).bind(&spec.config_hash).bind(now()).bind(spec.pull_requests)
        .bind(&trusted).bind(spec.approve_each_push).bind(spec.merge_queue).bind(&spec.report_as)
        .bind(&spec.template)
        .fetch_one(&mut *c).await?))
}

pub async fn get(ex: Ex<'_>, project: &str, name: &str) -> Result<Option<Jobset>> {
    let sql = concat!(
        "SELECT ",
        cols!(),
        " FROM jobsets WHERE name = $2 AND project_id = (SELECT id FROM projects WHERE name = $1)"
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(project).bind(name).fetch_optional(&mut *c).await?))
}

pub async fn get_in_project(ex: Ex<'_>, project_id: i64, name: &str) -> Result<Option<Jobset>> {
    let sql = concat!("SELECT ", cols!(), " FROM jobsets WHERE project_id = $1 AND name = $2");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(project_id).bind(name).fetch_optional(&mut *c).await?))
}

pub async fn get_by_id(ex: Ex<'_>, id: i64) -> Result<Option<Jobset>> {
    let sql = concat!("SELECT ", cols!(), " FROM jobsets WHERE id = $1");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(id).fetch_optional(&mut *c).await?))
}

pub async fn list_for_project(ex: Ex<'_>, project_id: i64) -> Result<Vec<Jobset>> {
    let sql = concat!("SELECT ", cols!(), " FROM jobsets WHERE project_id = $1 ORDER BY name");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(project_id).fetch_all(&mut *c).await?))
}

/// Every jobset's project id, name and whether it is hidden, in one query
/// (for the list of projects).
pub async fn names(ex: Ex<'_>) -> Result<Vec<(i64, String, bool)>> {
    match ex {
        Ex::Sqlite(c) => {
            let mut rows: Vec<(i64, String, i64)> = super::sqlite_json_rows(
                c,
                "json_array(project_id, name, hidden)",
                "FROM jobsets ORDER BY project_id, name",
                &[],
            )
            .await?;
            rows.sort();
            Ok(rows.into_iter().map(|(p, n, h)| (p, n, h != 0)).collect())
        }
        Ex::Postgres(c) => Ok(sqlx::query_as("SELECT project_id, name, hidden FROM jobsets ORDER BY project_id, name")
            .fetch_all(&mut *c)
            .await?),
    }
}

/// Asks for an evaluation as soon as possible. Several requests before the
/// evaluator gets to it collapse into one.
pub async fn trigger(ex: Ex<'_>, id: i64, force: bool) -> Result<()> {
    run!(ex, c => sqlx::query(
        "UPDATE jobsets SET trigger_at = COALESCE(trigger_at, $2), trigger_seq = trigger_seq + 1,
             force_eval = (force_eval OR $3) WHERE id = $1")
        .bind(id).bind(now()).bind(force).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Records that the jobset was checked, and sets or clears its error. The
/// trigger is cleared only if no other came since the check began (when
/// `seen_seq` was read): a push during an evaluation is evaluated next.
pub async fn mark_checked(ex: Ex<'_>, id: i64, error: Option<&str>, seen_seq: i64) -> Result<()> {
    let t = now();
    run!(ex, c => sqlx::query(
        "UPDATE jobsets SET last_checked_at = $2,
             trigger_at = CASE WHEN trigger_seq = $4 THEN NULL ELSE trigger_at END,
             force_eval = CASE WHEN trigger_seq = $4 THEN FALSE ELSE force_eval END, error = $3,
             error_at = CASE WHEN $3 IS NULL THEN NULL ELSE $2 END WHERE id = $1")
        .bind(id).bind(t).bind(error).bind(seen_seq).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Enabled jobsets whose interval has passed or that were triggered, oldest first.
pub async fn due(ex: Ex<'_>, at: i64) -> Result<Vec<Jobset>> {
    let sql = concat!(
        "SELECT ",
        cols!(),
        " FROM jobsets WHERE enabled = TRUE AND pull_requests = FALSE AND merge_queue = FALSE AND (trigger_at IS NOT NULL
             OR (check_interval > 0 AND (last_checked_at IS NULL OR last_checked_at + check_interval <= $1)))
         ORDER BY COALESCE(trigger_at, last_checked_at, 0), id"
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(at).fetch_all(&mut *c).await?))
}

/// Disables the project's jobsets (other than those made for pull requests
/// and merge groups) that the repository no longer declares; their
/// history stays.
pub async fn disable_undeclared(mut ex: Ex<'_>, project_id: i64, declared: &[String]) -> Result<u64> {
    let mut n = 0;
    for j in list_for_project(ex.re(), project_id).await? {
        if j.pr_number.is_none() && j.report_as.is_none() && j.enabled && !declared.contains(&j.name) {
            n += run!(ex.re(), c => sqlx::query("UPDATE jobsets SET enabled = FALSE WHERE id = $1")
                .bind(j.id).execute(&mut *c).await?.rows_affected());
        }
    }
    Ok(n)
}

/// What the latest pull-request event said of its author and head. A new
/// head clears an approval that covered one head only.
pub async fn set_pr_head(ex: Ex<'_>, id: i64, author: &str, association: &str, head_sha: &str) -> Result<()> {
    run!(ex, c => sqlx::query(
        "UPDATE jobsets SET pr_author = $2, pr_association = $3, pr_head_sha = $4 WHERE id = $1")
        .bind(id).bind(author).bind(association).bind(head_sha).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Records an approval of the pull request at its latest head.
pub async fn approve(ex: Ex<'_>, id: i64, by: &str) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE jobsets SET approved_by = $2, approved_sha = pr_head_sha WHERE id = $1")
        .bind(id).bind(by).execute(&mut *c).await?.rows_affected());
    Ok(())
}

pub async fn set_enabled(ex: Ex<'_>, id: i64, enabled: bool) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE jobsets SET enabled = $2 WHERE id = $1").bind(id).bind(enabled).execute(&mut *c).await?.rows_affected());
    Ok(())
}
