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
    /// Which earlier attempt this page shows, if it shows one.
    attempt: Option<u32>,
    /// The tries whose logs are kept as earlier attempts.
    attempts: Vec<u32>,
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct LogQuery {
    /// Which derivation of the build (default: the build's own), as a store path or base name.
    drv: Option<String>,
    /// Any value: the whole log (up to 16 MiB on the page), not its tail.
    full: Option<String>,
    /// Any value: raw text, streamed live while the step builds.
    follow: Option<String>,
    /// The log of this earlier try of the step (one that ended in a machine fault, say), not the step's own.
    #[param(minimum = 1)]
    attempt: Option<u32>,
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
    if q.follow.is_some() && q.attempt.is_none() {
        return Ok(crate::web::live::follow_log(&s, &drv).await);
    }
    let plain =
        !headers.get(axum::http::header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/html"));
    let tail = if q.full.is_some() { None } else { Some(TAIL_LINES) };
    let text = |body| ([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response();
    // A live log first (a stored one may be an earlier build's of the same
    // derivation), then the stored one; each streamed, or read through
    // keeping only what the page shows.
    let live = if q.attempt.is_none() { s.logs.follow(&drv) } else { None };
    if live.is_none() {
        s.logs.fetch_shared(&drv).await;
    }
    let reader: Option<Box<dyn std::io::Read + Send>> = match (q.attempt, &live) {
        (Some(n), _) => Some(Box::new(
            s.logs.open_attempt(&drv, n).ok_or_else(|| WebError::NotFound(format!("attempt {n}'s log of {drv}")))?,
        )),
        (None, Some(f)) => Some(Box::new(f.so_far())),
        (None, None) => s.logs.open(&drv).map(|r| Box::new(r) as Box<dyn std::io::Read + Send>),
    };
    let logs = s.logs.clone();
    let d = drv.clone();
    let attempts = tokio::task::spawn_blocking(move || logs.attempts(&d)).await.unwrap_or_default();
    let reader = match reader {
        Some(r) => r,
        // A step given up after machine faults has no log of its own, but
        // the page still lists its attempts'.
        None if !plain && !attempts.is_empty() => Box::new(std::io::empty()),
        None => return Err(WebError::NotFound(format!("a log of {drv}"))),
    };
    if plain {
        return Ok(text(crate::web::live::stream_reader(reader)));
    }
    let (shown, truncated) =
        tokio::task::spawn_blocking(move || crate::logs::lines_of(std::io::BufReader::new(reader), tail))
            .await
            .unwrap_or_default();
    html(LogPage {
        nav: nav(&s, &headers),
        title: match q.attempt {
            Some(n) => format!("Log of build {id}, attempt {n} · Kiln"),
            None => format!("Log of build {id} · Kiln"),
        },
        build: id,
        drv: drv.trim_start_matches("/nix/store/").to_string(),
        lines_html: crate::web::ansi::to_html(&shown, truncated + 1),
        truncated,
        live: live.is_some_and(|f| !f.is_done()),
        attempt: q.attempt,
        attempts,
    })
}
