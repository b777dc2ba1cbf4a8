//! A job's page: its builds across evaluations.

use super::*;

#[derive(Template)]
#[template(path = "job.html")]
struct JobPage {
    title: String,
    nav: Nav,
    project: String,
    jobset: String,
    job: String,
    builds: Vec<Row>,
    /// Points of the duration chart: (x, y, build id, label).
    chart: Vec<(f64, f64, i64, String)>,
    chart_max: String,
    first_failure: Option<i64>,
    older: Option<i64>,
    /// Each metric from `hydra-metrics` over the job's builds: its name,
    /// newest value with unit, and chart points (x, y, build id, label).
    metrics: Vec<MetricChart>,
}

struct MetricChart {
    name: String,
    latest: String,
    points: Vec<(f64, f64, i64, String)>,
}

/// The job's metrics as charts, oldest build on the left.
fn metric_charts(rows: Vec<(i64, String, f64, Option<String>)>) -> Vec<MetricChart> {
    let mut by_name: std::collections::BTreeMap<String, Vec<(i64, f64, Option<String>)>> = Default::default();
    for (id, name, value, unit) in rows {
        by_name.entry(name).or_default().push((id, value, unit));
    }
    by_name
        .into_iter()
        .map(|(name, values)| {
            let (lo, hi) = values.iter().fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v.1), hi.max(v.1)));
            let span = if hi > lo { hi - lo } else { 1.0 };
            let n = values.len().max(2) as f64 - 1.0;
            let label =
                |v: f64, u: &Option<String>| format!("{v}{}", u.as_ref().map(|u| format!(" {u}")).unwrap_or_default());
            let latest = values.last().map(|(_, v, u)| label(*v, u)).unwrap_or_default();
            let points = values
                .iter()
                .enumerate()
                .map(|(i, (id, v, u))| {
                    (10.0 + 580.0 * i as f64 / n, 110.0 - 100.0 * (v - lo) / span, *id, label(*v, u))
                })
                .collect();
            MetricChart { name, latest, points }
        })
        .collect()
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct Page {
    /// Builds older than this build id.
    before: Option<i64>,
}

#[utoipa::path(get, path = "/job/{project}/{jobset}/{job}", tag = "pages", params(("project" = String, Path, description = "project name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("jobset" = String, Path, description = "jobset name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("job" = String, Path, description = "job name (attribute path)"), Page),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "the job's builds, newest first, 50 a page", content((Vec<build_api::BuildSummary> = "application/json"), (String = "text/html"))), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn job(
    State(s): State<AppState>,
    Path((project, jobset, job)): Path<(String, String, String)>,
    Query(page): Query<Page>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let mut c = s.db.conn().await?;
    let j = jobsets::get(c.ex(), &project, &jobset)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("jobset {project}:{jobset}")))?;
    let list = builds::job_history(c.ex(), j.id, &job, page.before.unwrap_or(i64::MAX), 50).await?;
    if wants_json(&headers) {
        let list: Vec<build_api::BuildSummary> = list.into_iter().map(Into::into).collect();
        return Ok(axum::Json(list).into_response());
    }
    // The first failure of the current failing streak.
    let mut first_failure = None;
    for b in list.iter().filter(|b| b.finished) {
        if b.build_status == Some(0) {
            break;
        }
        first_failure = Some(b.id);
    }
    let durations: Vec<(i64, i64)> =
        list.iter().rev().filter_map(|b| Some((b.id, b.stop_time? - b.start_time?))).collect();
    let max = durations.iter().map(|(_, d)| *d).max().unwrap_or(1).max(1);
    let n = durations.len().max(2) as f64 - 1.0;
    let chart = durations
        .iter()
        .enumerate()
        .map(|(i, (id, d))| (10.0 + 580.0 * i as f64 / n, 110.0 - 100.0 * *d as f64 / max as f64, *id, duration(*d)))
        .collect();
    let older = (list.len() == 50).then(|| list.last().map(|b| b.id)).flatten();
    let metrics = metric_charts(crate::db::products::job_metrics(c.ex(), j.id, &job, 100).await?);
    html(JobPage {
        nav: nav(&s, &headers),
        title: format!("{job} in {project}:{jobset} · Kiln"),
        chart_max: duration(max),
        builds: list.into_iter().map(row).collect(),
        project,
        jobset,
        job,
        chart,
        first_failure,
        older,
        metrics,
    })
}
