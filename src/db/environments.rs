//! The `environments` table: each project's deployment environments as its
//! default branch declares them (the spec as JSON), and the lease that lets
//! one process at a time run an environment's deployments.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Ex, Result, now, run};
use crate::deploy::spec;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct Environment {
    pub id: i64,
    pub project_id: i64,
    pub name: String,
    pub spec: String,
    /// False once the default branch no longer declares it (kept for its
    /// history, never deployed).
    pub declared: bool,
    pub lease_owner: Option<String>,
    pub lease_until: Option<i64>,
    pub created_at: i64,
}

impl Environment {
    pub fn spec(&self) -> Result<spec::Environment> {
        serde_json::from_str(&self.spec).map_err(|e| super::DbError::Invalid(format!("environment {}: {e}", self.name)))
    }
}

macro_rules! cols {
    () => {
        "id, project_id, name, spec, declared, lease_owner, lease_until, created_at"
    };
}

/// Makes the project's environments what its file declares.
pub async fn sync(mut ex: Ex<'_>, project_id: i64, envs: &BTreeMap<String, spec::Environment>) -> Result<()> {
    for (name, e) in envs {
        let text = serde_json::to_string(e).expect("a spec serialises");
        run!(ex.re(), c => sqlx::query(
            "INSERT INTO environments (project_id, name, spec, declared, created_at) VALUES ($1, $2, $3, TRUE, $4)
             ON CONFLICT (project_id, name) DO UPDATE SET spec = excluded.spec, declared = TRUE")
            .bind(project_id).bind(name).bind(&text).bind(now()).execute(&mut *c).await?.rows_affected());
    }
    let names = serde_json::to_string(&envs.keys().collect::<Vec<_>>()).expect("strings serialise");
    let sql = match ex.backend() {
        super::Backend::Sqlite => {
            "UPDATE environments SET declared = FALSE WHERE project_id = $1 AND declared = TRUE
             AND name NOT IN (SELECT value FROM json_each($2))"
        }
        super::Backend::Postgres => {
            "UPDATE environments SET declared = FALSE WHERE project_id = $1 AND declared = TRUE
             AND name NOT IN (SELECT jsonb_array_elements_text($2::jsonb))"
        }
    };
    run!(ex, c => sqlx::query(sql).bind(project_id).bind(&names).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Every declared environment with its project's name, by project and name.
pub async fn list(ex: Ex<'_>) -> Result<Vec<(String, Environment)>> {
    let sql = "SELECT p.name AS project, e.id, e.project_id, e.name, e.spec, e.declared, e.lease_owner, e.lease_until,
                   e.created_at
               FROM environments e JOIN projects p ON p.id = e.project_id WHERE e.declared = TRUE ORDER BY p.name, e.name";
    #[derive(sqlx::FromRow)]
    struct Row {
        project: String,
        #[sqlx(flatten)]
        env: Environment,
    }
    let rows: Vec<Row> = run!(ex, c => sqlx::query_as(sql).fetch_all(&mut *c).await?);
    Ok(rows.into_iter().map(|r| (r.project, r.env)).collect())
}

pub async fn get(ex: Ex<'_>, project: &str, name: &str) -> Result<Option<Environment>> {
    let sql = concat!(
        "SELECT ",
        cols!(),
        " FROM environments WHERE name = $2 AND project_id = (SELECT id FROM projects WHERE name = $1)"
    );
    Ok(run!(ex, c => sqlx::query_as(sql).bind(project).bind(name).fetch_optional(&mut *c).await?))
}

pub async fn get_by_id(ex: Ex<'_>, id: i64) -> Result<Option<Environment>> {
    let sql = concat!("SELECT ", cols!(), " FROM environments WHERE id = $1");
    Ok(run!(ex, c => sqlx::query_as(sql).bind(id).fetch_optional(&mut *c).await?))
}

/// Takes (or renews) the environment's lease for `owner` until `until`:
/// false when another owner holds a lease that has not run out.
pub async fn take_lease(ex: Ex<'_>, id: i64, owner: &str, until: i64) -> Result<bool> {
    let n = run!(ex, c => sqlx::query(
        "UPDATE environments SET lease_owner = $2, lease_until = $3
         WHERE id = $1 AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until < $4)")
        .bind(id).bind(owner).bind(until).bind(now()).execute(&mut *c).await?.rows_affected());
    Ok(n == 1)
}

pub async fn release_lease(ex: Ex<'_>, id: i64, owner: &str) -> Result<()> {
    run!(ex, c => sqlx::query(
        "UPDATE environments SET lease_owner = NULL, lease_until = NULL WHERE id = $1 AND lease_owner = $2")
        .bind(id).bind(owner).execute(&mut *c).await?.rows_affected());
    Ok(())
}
