//! Status badges for READMEs: `/jobset/{p}/{j}/badge.svg` (the latest
//! evaluation: passing, failing or how many of how many) and
//! `/job/{p}/{j}/{job}/badge.svg` (the latest finished build).

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{AppState, ErrorBody, WebError};
use crate::db::{builds, evaluations, jobsets};

fn svg(label: &str, value: &str, color: &str) -> Response {
    // About 7 px a character in Verdana 11, as shields.io badges are drawn.
    let lw = 6 + 7 * label.chars().count();
    let vw = 6 + 7 * value.chars().count();
    let w = lw + vw;
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let (label, value) = (esc(label), esc(value));
    let body = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="20" role="img" aria-label="{label}: {value}"><title>{label}: {value}</title><rect width="{lw}" height="20" fill="#555"/><rect x="{lw}" width="{vw}" height="20" fill="{color}"/><g fill="#fff" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11"><text x="{lx}" y="14">{label}</text><text x="{vx}" y="14">{value}</text></g></svg>"##,
        lx = 4,
        vx = lw + 4
    );
    ([(header::CONTENT_TYPE, "image/svg+xml"), (header::CACHE_CONTROL, "public, max-age=60")], body).into_response()
}

const GREEN: &str = "#2e7d32";
const RED: &str = "#c62828";
const GREY: &str = "#9e9e9e";
const YELLOW: &str = "#b58900";

#[utoipa::path(get, path = "/jobset/{project}/{jobset}/badge.svg", tag = "badges", params(("project" = String, Path, description = "project name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("jobset" = String, Path, description = "jobset name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "an SVG badge", content_type = "image/svg+xml", body = String), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn jobset(
    State(s): State<AppState>,
    Path((project, jobset)): Path<(String, String)>,
) -> Result<Response, WebError> {
    let mut c = s.db.conn().await?;
    let j = jobsets::get(c.ex(), &project, &jobset)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("jobset {project}:{jobset}")))?;
    let Some(e) = evaluations::latest(c.ex(), j.id, 5).await?.into_iter().find(|e| e.status != "running") else {
        return Ok(svg(&jobset, "unknown", GREY));
    };
    if e.status == "failed" {
        return Ok(svg(&jobset, "evaluation failed", RED));
    }
    let cells = evaluations::cells(c.ex(), &[e.id]).await?;
    let total = cells.len();
    let ok = cells.iter().filter(|c| c.finished == Some(true) && c.build_status == Some(0)).count();
    let pending = cells.iter().filter(|c| c.error.is_none() && c.finished == Some(false)).count();
    Ok(if pending > 0 {
        svg(&jobset, &format!("building {ok}/{total}"), YELLOW)
    } else if ok == total {
        svg(&jobset, "passing", GREEN)
    } else {
        svg(&jobset, &format!("failing {ok}/{total}"), RED)
    })
}

#[utoipa::path(get, path = "/job/{project}/{jobset}/{job}/badge.svg", tag = "badges", params(("project" = String, Path, description = "project name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("jobset" = String, Path, description = "jobset name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("job" = String, Path, description = "job name (attribute path)")),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "an SVG badge", content_type = "image/svg+xml", body = String), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn job(
    State(s): State<AppState>,
    Path((project, jobset, job)): Path<(String, String, String)>,
) -> Result<Response, WebError> {
    let mut c = s.db.conn().await?;
    let j = jobsets::get(c.ex(), &project, &jobset)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("jobset {project}:{jobset}")))?;
    let last = builds::job_history(c.ex(), j.id, &job, i64::MAX, 20).await?.into_iter().find(|b| b.finished);
    Ok(match last.and_then(|b| b.build_status) {
        None => svg(&job, "unknown", GREY),
        Some(0) => svg(&job, "passing", GREEN),
        Some(n) => svg(&job, builds::BuildStatus::from_i64(n).map(|s| s.label()).unwrap_or("failing"), RED),
    })
}
