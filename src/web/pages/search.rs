//! The search page.

use super::*;

/// Search results as JSON, in Hydra's shape.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct SearchView {
    projects: Vec<crate::web::api::ProjectView>,
    jobsets: Vec<JobsetRef>,
    /// Builds whose job or output path matches.
    builds: Vec<build_api::BuildSummary>,
    /// Builds whose derivation path matches.
    buildsdrv: Vec<build_api::BuildSummary>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct JobsetRef {
    project: String,
    name: String,
}

#[derive(Template)]
#[template(path = "search.html")]
struct SearchPage {
    title: String,
    nav: Nav,
    q: String,
    projects: Vec<projects::Project>,
    jobsets: Vec<(String, String)>,
    builds: Vec<Row>,
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct SearchQuery {
    /// At least two characters (Hydra's name for it).
    query: Option<String>,
    /// The same, as Kiln's own pages send it.
    q: Option<String>,
}

/// Projects, jobsets, jobs, derivations and store paths containing `q`.
#[utoipa::path(get, path = "/search", tag = "pages", params(SearchQuery),
    responses((status = 400, description = "a malformed parameter", body = ErrorBody), (status = 200, description = "projects, jobsets and builds matching `q`", content((SearchView = "application/json"), (String = "text/html")))))]
pub async fn search(
    State(s): State<AppState>,
    Query(q): Query<SearchQuery>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    let q = q.query.or(q.q).unwrap_or_default().trim().to_string();
    let mut c = s.db.conn().await?;
    let (mut found_projects, mut found_jobsets, mut found) = (Vec::new(), Vec::new(), Vec::new());
    if q.len() >= 2 {
        let lower = q.to_lowercase();
        for p in projects::list(c.ex()).await? {
            for j in jobsets::list_for_project(c.ex(), p.id).await? {
                if j.name.to_lowercase().contains(&lower) {
                    found_jobsets.push((p.name.clone(), j.name));
                }
            }
            if p.name.to_lowercase().contains(&lower) || p.display_name.to_lowercase().contains(&lower) {
                found_projects.push(p);
            }
        }
        found = builds::search(c.ex(), &q, 50).await?;
    }
    if wants_json(&headers) {
        let mut projects = Vec::new();
        for p in &found_projects {
            let names = jobsets::list_for_project(c.ex(), p.id).await?.into_iter().map(|j| j.name).collect();
            projects.push(crate::web::api::project_view(p.clone(), names));
        }
        let buildsdrv = if q.len() >= 2 { builds::search_drv(c.ex(), &q, 50).await? } else { Vec::new() };
        return Ok(axum::Json(SearchView {
            projects,
            jobsets: found_jobsets.iter().map(|(p, j)| JobsetRef { project: p.clone(), name: j.clone() }).collect(),
            builds: found.into_iter().map(Into::into).collect(),
            buildsdrv: buildsdrv.into_iter().map(Into::into).collect(),
        })
        .into_response());
    }
    html(SearchPage {
        nav: nav(&s, &headers),
        title: format!("Search {q} · Kiln"),
        q,
        projects: found_projects,
        jobsets: found_jobsets,
        builds: found.into_iter().map(row).collect(),
    })
}
