//! The `step_products` and `step_metrics` tables: what a built step's
//! outputs declared in `nix-support/` (see [`crate::products`]). Written
//! once when the step is recorded as built (again if it is rebuilt);
//! read for a build through its top step, and for a job's metrics over
//! its builds.

use serde::Serialize;

use super::{Ex, Result, run};
use crate::products::{Metric, Product};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ProductRow {
    pub nr: i64,
    pub kind: String,
    pub subtype: String,
    pub path: String,
    pub name: String,
    pub default_path: String,
    pub file_size: Option<i64>,
}

/// Replaces the step's products and metrics.
pub async fn set(mut ex: Ex<'_>, step_id: i64, products: &[Product], metrics: &[Metric]) -> Result<()> {
    run!(ex.re(), c => sqlx::query("DELETE FROM step_products WHERE step_id = $1").bind(step_id).execute(&mut *c).await?.rows_affected());
    run!(ex.re(), c => sqlx::query("DELETE FROM step_metrics WHERE step_id = $1").bind(step_id).execute(&mut *c).await?.rows_affected());
    for (i, p) in products.iter().enumerate() {
        run!(ex.re(), c => sqlx::query(
            "INSERT INTO step_products (step_id, nr, kind, subtype, path, name, default_path, file_size)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)")
            .bind(step_id).bind(i as i64 + 1).bind(&p.kind).bind(&p.subtype).bind(&p.path).bind(&p.name)
            .bind(&p.default_path).bind(p.file_size).execute(&mut *c).await?.rows_affected());
    }
    for m in metrics {
        run!(ex.re(), c => sqlx::query("INSERT INTO step_metrics (step_id, name, value, unit) VALUES ($1, $2, $3, $4)")
            .bind(step_id).bind(&m.name).bind(m.value).bind(&m.unit).execute(&mut *c).await?.rows_affected());
    }
    Ok(())
}

pub async fn products_of(ex: Ex<'_>, step_id: i64) -> Result<Vec<ProductRow>> {
    Ok(run!(ex, c => sqlx::query_as(
        "SELECT nr, kind, subtype, path, name, default_path, file_size FROM step_products WHERE step_id = $1 ORDER BY nr")
        .bind(step_id).fetch_all(&mut *c).await?))
}

pub async fn metrics_of(ex: Ex<'_>, step_id: i64) -> Result<Vec<Metric>> {
    let rows: Vec<(String, f64, Option<String>)> = run!(ex, c => sqlx::query_as(
        "SELECT name, value, unit FROM step_metrics WHERE step_id = $1 ORDER BY name")
        .bind(step_id).fetch_all(&mut *c).await?);
    Ok(rows.into_iter().map(|(name, value, unit)| Metric { name, value, unit }).collect())
}

/// A job's metrics over its newest finished builds, oldest first:
/// (build id, metric name, value, unit).
pub async fn job_metrics(
    ex: Ex<'_>,
    jobset_id: i64,
    job: &str,
    limit: i64,
) -> Result<Vec<(i64, String, f64, Option<String>)>> {
    let mut rows: Vec<(i64, String, f64, Option<String>)> = run!(ex, c => sqlx::query_as(
        "SELECT b.id, m.name, m.value, m.unit FROM step_metrics m
           JOIN builds b ON b.top_step_id = m.step_id
         WHERE b.jobset_id = $1 AND b.job = $2 AND b.finished = TRUE
           AND b.id IN (SELECT id FROM builds WHERE jobset_id = $1 AND job = $2 AND finished = TRUE ORDER BY id DESC LIMIT $3)
         ORDER BY b.id, m.name")
        .bind(jobset_id).bind(job).bind(limit).fetch_all(&mut *c).await?);
    rows.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
    Ok(rows)
}
