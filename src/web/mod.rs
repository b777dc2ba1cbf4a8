//! The HTTP side of `kiln serve`: routes, pages (askama templates from
//! `templates/`), static files, and the JSON forms of pages. Handlers build
//! a plain struct and render it; templates stay dumb.

use std::sync::Arc;

use askama::Template;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use serde::Serialize;

use crate::config::Config;
use crate::db::{self, Db};
use crate::nix::PublicKey;
use crate::trigger::Evaluator;

pub mod api;
pub mod auth;
pub mod builds;
pub mod cache;

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub config: Arc<Config>,
    pub public_key: PublicKey,
    pub evaluator: Arc<Evaluator>,
    pub cache: crate::cache::Cache,
    pub logs: crate::logs::Logs,
    pub queue: crate::queue::Queue,
}

pub fn router(state: AppState) -> Router {
    use axum::routing::post;
    Router::new()
        .route("/", get(home))
        .route("/healthz", get(healthz))
        .route("/project/{name}", get(api::get_project).put(api::put_project).delete(api::delete_project))
        .route("/jobset/{project}/{jobset}", get(api::get_jobset))
        .route("/jobset/{project}/{jobset}/evals", get(api::get_jobset_evals))
        .route("/eval/{id}", get(api::get_eval))
        .route("/api/push", post(api::push))
        .route("/build/{id}", get(builds::get_build))
        .route("/job/{project}/{jobset}/{job}/latest", get(builds::job_latest))
        .route("/job/{project}/{jobset}/{job}/latest/output/{output}", get(builds::job_latest_output))
        .route("/nix-cache-info", get(cache::cache_info))
        .route("/{file}", get(cache::get_narinfo).put(cache::put_narinfo))
        .route("/nar/{file}", get(cache::get_nar).put(cache::put_nar))
        .route("/log/{drv}", get(cache::get_log))
        .route("/static/style.css", get(style))
        .with_state(state)
}

/// Whether the client asked for JSON (`Accept: application/json`).
pub fn wants_json(headers: &HeaderMap) -> bool {
    headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("application/json"))
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    database: bool,
}

/// Liveness and database reachability; 503 when the database is down.
async fn healthz(State(s): State<AppState>) -> Response {
    let database = s.db.ping().await;
    let code = if database { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(Health { status: if database { "ok" } else { "degraded" }, database })).into_response()
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")],
        include_str!("../../static/style.css"),
    )
        .into_response()
}

#[derive(Template)]
#[template(path = "home.html")]
struct HomePage {
    title: String,
    public_key: String,
    base_url: String,
    projects: Vec<db::projects::Project>,
}

async fn home(State(s): State<AppState>, headers: HeaderMap) -> Result<Response, WebError> {
    let mut c = s.db.conn().await?;
    let projects: Vec<_> = db::projects::list(c.ex()).await?.into_iter().filter(|p| !p.hidden).collect();
    if wants_json(&headers) {
        return Ok(Json(projects).into_response());
    }
    let page = HomePage {
        title: "Kiln".into(),
        public_key: s.public_key.to_string(),
        base_url: s.config.base_url(),
        projects,
    };
    Ok(Html(page.render()?).into_response())
}

/// Errors of handlers, mapped to HTTP in one place.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("rendering: {0}")]
    Render(#[from] askama::Error),
    #[error("{0} not found")]
    NotFound(String),
    #[error("this needs a valid API token (Authorization: Bearer …)")]
    Unauthorized,
    #[error("this needs a valid API token (Authorization: Bearer …, or Basic with the token as password)")]
    UnauthorizedBasic,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("the body is larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("{0}")]
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let code = match &self {
            WebError::NotFound(_) => StatusCode::NOT_FOUND,
            WebError::Unauthorized => StatusCode::UNAUTHORIZED,
            WebError::UnauthorizedBasic => StatusCode::UNAUTHORIZED,
            WebError::BadRequest(_) => StatusCode::BAD_REQUEST,
            WebError::Forbidden(_) => StatusCode::FORBIDDEN,
            WebError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            WebError::Db(_) | WebError::Render(_) | WebError::Internal(_) => {
                tracing::error!(error = %self, "request failed");
                let body = ErrorBody { error: "internal error; see the server log".into() };
                return (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response();
            }
        };
        let mut r = (code, Json(ErrorBody { error: self.to_string() })).into_response();
        // Nix retries an upload with its netrc credentials only when asked
        // for Basic auth.
        let challenge = match self {
            WebError::Unauthorized => Some("Bearer"),
            WebError::UnauthorizedBasic => Some("Basic realm=\"kiln\""),
            _ => None,
        };
        if let Some(c) = challenge {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static(c));
        }
        r
    }
}
