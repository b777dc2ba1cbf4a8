//! The home page: every project with its jobsets' latest state.

use super::*;

#[derive(Template)]
#[template(path = "home.html")]
struct HomePage {
    title: String,
    nav: Nav,
    public_key: String,
    base_url: String,
    projects: Vec<ProjectLine>,
    queued: i64,
    running: usize,
    recent: Vec<Row>,
}

struct ProjectLine {
    name: String,
    display: String,
    description: String,
    jobsets: usize,
    error: Option<String>,
}

#[utoipa::path(get, path = "/", tag = "pages",
    responses((status = 200, description = "the projects that are not hidden", content((Vec<api::ProjectView> = "application/json"), (String = "text/html")))))]
pub async fn home(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, WebError> {
    if wants_json(&headers) {
        return Ok(axum::Json(api::list_projects(&s).await?).into_response());
    }
    let mut c = s.db.conn().await?;
    let list: Vec<_> = projects::list(c.ex()).await?.into_iter().filter(|p| !p.hidden).collect();
    let mut shown: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
    for (project, _, hidden) in jobsets::names(c.ex()).await? {
        *shown.entry(project).or_default() += usize::from(!hidden);
    }
    let mut lines = Vec::new();
    for p in list {
        let n = shown.get(&p.id).copied().unwrap_or(0);
        lines.push(ProjectLine {
            display: if p.display_name.is_empty() { p.name.clone() } else { p.display_name.clone() },
            name: p.name,
            description: p.description,
            jobsets: n,
            error: p.error,
        });
    }
    let queued = builds::count_unfinished(c.ex()).await?;
    let running = steps::running(c.ex()).await?.len();
    let recent = builds::recent(c.ex(), 20).await?.into_iter().map(row).collect();
    html(HomePage {
        nav: nav(&s, &headers),
        title: "Kiln".into(),
        public_key: s.public_key.to_string(),
        base_url: s.config.base_url(),
        projects: lines,
        queued,
        running,
        recent,
    })
}
