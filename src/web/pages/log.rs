//! A build's log page, whole or followed live.

use super::*;

#[derive(Template)]
#[template(path = "log.html")]
struct LogPage {
    title: String,
    nav: Nav,
    build: i64,
    drv: String,
    lines_html: String,
    truncated: usize,
    live: bool,
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct LogQuery {
    /// Which derivation of the build (default: the build's own), as a store path or base name.
    drv: Option<String>,
    /// Any value: the whole log (up to 16 MiB on the page), not its tail.
    full: Option<String>,
    /// Any value: raw text, streamed live while the step builds.
    follow: Option<String>,
}

/// Lines shown by default for a large log: its tail.
const TAIL_LINES: usize = 2000;

#[utoipa::path(get, path = "/build/{id}/log", tag = "pages", params(("id" = i64, Path, description = "build id", minimum = 1), LogQuery),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "the log: a page for `Accept: text/html` (its tail unless `full`), else raw text",
        content((String = "text/html"), (String = "text/plain"))), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn build_log(
    State(s): State<AppState>,
    Path(id): Path<i64>,
    Query(q): Query<LogQuery>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let mut c = s.db.conn().await?;
    let b = builds::get(c.ex(), id).await?.ok_or_else(|| WebError::NotFound(format!("build {id}")))?;
    let drv = match q.drv {
        Some(d) if d.ends_with(".drv") => {
            if d.starts_with('/') {
                d
            } else {
                format!("/nix/store/{d}")
            }
        }
        _ => b.drv_path.clone(),
    };
    drop(c);
    if q.follow.is_some() {
        return Ok(crate::web::live::follow_log(&s, &drv).await);
    }
    let plain =
        !headers.get(axum::http::header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/html"));
    let tail = if q.full.is_some() { None } else { Some(TAIL_LINES) };
    // A stored log is streamed, or read through keeping only what is shown.
    let (shown, truncated) = match s.logs.open(&drv) {
        Some(r) if plain => {
            let body = crate::web::live::stream_reader(r);
            return Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response());
        }
        Some(_) => {
            let (logs, d) = (s.logs.clone(), drv.clone());
            tokio::task::spawn_blocking(move || logs.lines(&d, tail)).await.ok().flatten().unwrap_or_default()
        }
        None => {
            let (so_far, _) = s.logs.follow(&drv).ok_or_else(|| WebError::NotFound(format!("a log of {drv}")))?;
            if plain {
                return Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], so_far).into_response());
            }
            crate::logs::lines_of(&so_far[..], tail)
        }
    };
    let start = truncated;
    let live = s.logs.follow(&drv).is_some();
    html(LogPage {
        nav: nav(&s, &headers),
        title: format!("Log of build {id} · Kiln"),
        build: id,
        drv: drv.trim_start_matches("/nix/store/").to_string(),
        lines_html: crate::web::ansi::to_html(&shown, start + 1),
        truncated,
        live,
    })
}
