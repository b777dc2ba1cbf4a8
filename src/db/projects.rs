//! The `projects` table: a named git repository and how it is shown.

use serde::Serialize;

use super::{Ex, Result, now, run};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Project {
    pub id: i64,
    pub name: String,
    pub display_name: String,
    pub description: String,
    pub repo: String,
    pub github_repo: Option<String>,
    pub enabled: bool,
    pub hidden: bool,
    /// `config` (from kiln.toml) or `api`.
    pub declared_in: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// Why the last fetch or `.kiln.toml` read failed, if it did.
    pub error: Option<String>,
    pub last_synced_at: Option<i64>,
}

/// What a caller sets; the rest is Kiln's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectSpec {
    pub name: String,
    pub display_name: String,
    pub description: String,
    pub repo: String,
    pub github_repo: Option<String>,
    pub enabled: bool,
    pub hidden: bool,
    pub declared_in: String,
}

macro_rules! cols {
    () => {
        "id, name, display_name, description, repo, github_repo, enabled, hidden, declared_in, created_at, updated_at, \
         error, last_synced_at"
    };
}

/// Creates or updates the project named `spec.name`.
pub async fn upsert(ex: Ex<'_>, spec: &ProjectSpec) -> Result<Project> {
    let t = now();
    let sql = concat!(
        "INSERT INTO projects (name, display_name, description, repo, github_repo, enabled, hidden, declared_in, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
         ON CONFLICT (name) DO UPDATE SET display_name = excluded.display_name, description = excluded.description,
             repo = excluded.repo, github_repo = excluded.github_repo, enabled = excluded.enabled,
             hidden = excluded.hidden, declared_in = excluded.declared_in, updated_at = excluded.updated_at
         RETURNING ",
        cols!()
    );
    Ok(run!(ex, c => sqlx::query_as(sql)
        .bind(&spec.name).bind(&spec.display_name).bind(&spec.description).bind(&spec.repo)
        .bind(&spec.github_repo).bind(spec.enabled).bind(spec.hidden).bind(&spec.declared_in).bind(t)
        .fetch_one(&mut *c).await?))
}

pub async fn get(ex: Ex<'_>, name: &str) -> Result<Option<Project>> {
    let sql = concat!("SELECT ", cols!(), " FROM projects WHERE name = $1");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(name).fetch_optional(&mut *c).await?))
}

pub async fn list(ex: Ex<'_>) -> Result<Vec<Project>> {
    match ex {
        Ex::Sqlite(c) => {
            type Row = (
                i64,
                String,
                String,
                String,
                String,
                Option<String>,
                i64,
                i64,
                String,
                i64,
                i64,
                Option<String>,
                Option<i64>,
            );
            let mut rows: Vec<Row> =
                super::sqlite_json_rows(c, concat!("json_array(", cols!(), ")"), "FROM projects ORDER BY name", &[])
                    .await?;
            rows.sort_by(|a, b| a.1.cmp(&b.1));
            Ok(rows
                .into_iter()
                .map(|r| Project {
                    id: r.0,
                    name: r.1,
                    display_name: r.2,
                    description: r.3,
                    repo: r.4,
                    github_repo: r.5,
                    enabled: r.6 != 0,
                    hidden: r.7 != 0,
                    declared_in: r.8,
                    created_at: r.9,
                    updated_at: r.10,
                    error: r.11,
                    last_synced_at: r.12,
                })
                .collect())
        }
        Ex::Postgres(c) => {
            Ok(sqlx::query_as(concat!("SELECT ", cols!(), " FROM projects ORDER BY name")).fetch_all(&mut *c).await?)
        }
    }
}

/// Deletes a project with its jobsets, evaluations and builds. Returns
/// whether it existed.
pub async fn delete(ex: Ex<'_>, name: &str) -> Result<bool> {
    let n = run!(ex, c => sqlx::query("DELETE FROM projects WHERE name = $1").bind(name).execute(&mut *c).await?.rows_affected());
    Ok(n > 0)
}

pub async fn get_by_id(ex: Ex<'_>, id: i64) -> Result<Option<Project>> {
    let sql = concat!("SELECT ", cols!(), " FROM projects WHERE id = $1");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(id).fetch_optional(&mut *c).await?))
}

/// Records the outcome of reading the project's repository.
pub async fn set_synced(ex: Ex<'_>, id: i64, error: Option<&str>) -> Result<()> {
    run!(ex, c => sqlx::query("UPDATE projects SET last_synced_at = $2, error = $3 WHERE id = $1")
        .bind(id).bind(now()).bind(error).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Enabled projects never read, or without jobsets and last read before
/// `older_than` (a repository that could not be fetched is tried again).
pub async fn needing_sync(ex: Ex<'_>, older_than: i64) -> Result<Vec<Project>> {
    let sql = concat!(
        "SELECT ",
        cols!(),
        " FROM projects p WHERE enabled = TRUE AND (last_synced_at IS NULL
             OR (last_synced_at < $1 AND NOT EXISTS (SELECT 1 FROM jobsets j WHERE j.project_id = p.id)))
         ORDER BY id"
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(older_than).fetch_all(&mut *c).await?))
}
