//! The `histograms` table: Prometheus histograms of durations, kept as
//! steps and evaluations finish (a count and a sum per bucket), so that
//! `/metrics` reads a few rows instead of scanning every step. The
//! buckets are [`crate::metrics::BUCKETS`]'s.

use super::{Ex, Result, run};

/// A step's build, from its start to its result.
pub const STEP_DURATION: &str = "step_duration";
/// An evaluation, from its start to its end.
pub const EVALUATION_DURATION: &str = "evaluation_duration";

/// Counts one observation of `secs`.
pub async fn observe(ex: Ex<'_>, name: &str, secs: f64) -> Result<()> {
    let bucket = crate::metrics::bucket_of(secs) as i64;
    run!(ex, c => sqlx::query(
        "INSERT INTO histograms (name, bucket, count, sum) VALUES ($1, $2, 1, $3)
         ON CONFLICT (name, bucket) DO UPDATE SET count = histograms.count + 1, sum = histograms.sum + excluded.sum")
        .bind(name).bind(bucket).bind(secs).execute(&mut *c).await?.rows_affected());
    Ok(())
}

/// Counts per bucket (`buckets` of them, the last above the last bound)
/// and the sum of every observation.
pub async fn read(ex: Ex<'_>, name: &str, buckets: usize) -> Result<(Vec<i64>, f64)> {
    let rows: Vec<(i64, i64, f64)> = run!(ex, c => sqlx::query_as(
        "SELECT bucket, count, sum FROM histograms WHERE name = $1")
        .bind(name).fetch_all(&mut *c).await?);
    let mut counts = vec![0i64; buckets];
    let mut sum = 0.0;
    for (b, n, s) in rows {
        if let Some(c) = counts.get_mut(b.clamp(0, buckets as i64 - 1) as usize) {
            *c += n;
        }
        sum += s;
    }
    Ok((counts, sum))
}
