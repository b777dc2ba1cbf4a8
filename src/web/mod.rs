//! The HTTP side of `kiln serve`: routes, pages (askama templates from
//! `templates/`), static files, and the JSON forms of pages. Handlers build
//! a plain struct and render it; templates stay dumb.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use serde::Serialize;

use crate::config::Config;
use crate::db::{self, Db};
use crate::nix::PublicKey;
use crate::trigger::Evaluator;

pub mod actions;
pub mod agent;
pub mod ansi;
pub mod api;
pub mod auth;
pub mod badges;
pub mod builds;
pub mod cache;
pub mod channel;
pub mod hydra;
pub mod live;
pub mod memo;
pub mod openapi;
pub mod pages;
pub mod session;
pub mod webhooks;

#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub config: Arc<Config>,
    pub public_key: PublicKey,
    pub evaluator: Arc<Evaluator>,
    pub cache: crate::cache::Cache,
    pub logs: crate::logs::Logs,
    pub queue: crate::queue::Queue,
    pub session_key: session::SessionKey,
    pub events: crate::events::Events,
    /// The GitHub webhook secret, when `github.webhook_secret_file` is set.
    pub webhook_secret: Option<Arc<String>>,
    /// Gitea and Forgejo hosts, with their secrets.
    pub forges: Arc<Vec<crate::forge::Forge>>,
    pub memo: Memos,
}

/// What the busiest pages read, kept until their jobset changes.
#[derive(Clone)]
pub struct Memos {
    pub jobsets: Arc<memo::Memo<(String, String), pages::JobsetData>>,
    pub evals: Arc<memo::Memo<i64, pages::EvalData>>,
}

impl Memos {
    /// Memos that follow `events`.
    pub fn new(events: &crate::events::Events) -> Memos {
        let g = memo::Generations::follow(events);
        Memos { jobsets: Arc::new(memo::Memo::new(g.clone())), evals: Arc::new(memo::Memo::new(g)) }
    }

    /// Forgets everything (after an action, which may change what pages show
    /// without an event).
    pub fn forget(&self) {
        self.jobsets.generations().bump_all();
    }
}

pub fn router(state: AppState) -> Router {
    use axum::routing::post;
    Router::new()
        .route("/", get(pages::home))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/project/{name}", get(pages::project).put(api::put_project).delete(api::delete_project))
        .route("/jobset/{project}/{jobset}", get(pages::jobset))
        .route("/jobset/{project}/{jobset}/evals", get(api::get_jobset_evals))
        .route("/jobset/{project}/{jobset}/badge.svg", get(badges::jobset))
        .route("/jobset/{project}/{jobset}/{action}", post(actions::jobset_action))
        .route("/eval/{id}", get(pages::eval))
        .route("/eval/{id}/{action}", post(actions::eval_action))
        .route("/api/push", post(api::push))
        .route(
            "/api/webhooks/github",
            post(webhooks::github).layer(axum::extract::DefaultBodyLimit::max(crate::github::webhook::MAX_BODY)),
        )
        .route(
            "/api/webhooks/forge/{forge}",
            post(webhooks::forge).layer(axum::extract::DefaultBodyLimit::max(crate::github::webhook::MAX_BODY)),
        )
        .route("/api/events", get(live::events))
        .route("/api/jobsets", get(hydra::jobsets))
        .route("/api/latestbuilds", get(hydra::latest_builds))
        .route("/api/queue", get(hydra::queue))
        .route("/api/nrbuilds", get(hydra::nr_builds))
        .route("/queue-summary", get(hydra::queue_summary))
        .route("/job/{project}/{jobset}/{job}/latest-finished", get(hydra::latest_finished))
        .route("/job/{project}/{jobset}/{job}/latest-for/{system}", get(hydra::latest_for))
        .route("/job/{project}/{jobset}/{job}/shield", get(hydra::shield))
        .route("/eval/{id}/job/{job}", get(hydra::eval_job))
        .route("/build/{id}/constituents", get(hydra::constituents))
        .route("/build/{id}/download/{nr}/{file}", get(hydra::download))
        .route("/jobset/{project}/{jobset}/channel/latest", get(channel::jobset_latest))
        .route("/jobset/{project}/{jobset}/channel/latest/{file}", get(channel::jobset_latest_file))
        .route("/job/{project}/{jobset}/{job}/channel/latest", get(channel::job_latest))
        .route("/job/{project}/{jobset}/{job}/channel/latest/{file}", get(channel::job_latest_file))
        .route("/api/openapi.json", get(openapi::openapi_json))
        .route("/build/{id}", get(pages::build))
        .route("/build/{id}/log", get(pages::build_log))
        .route("/build/{id}/{action}", post(actions::build_action))
        .route("/build/{id}/keep/{flag}", post(actions::build_keep))
        .route("/login", get(actions::login_page).post(actions::login))
        .route("/logout", post(actions::logout))
        .route("/job/{project}/{jobset}/{job}", get(pages::job))
        .route("/job/{project}/{jobset}/{job}/badge.svg", get(badges::job))
        .route("/queue", get(pages::queue))
        .route("/environments", get(pages::environments))
        .route("/environment/{project}/{name}", get(pages::environment))
        .route("/environment/{project}/{name}/deploy", post(actions::environment_deploy))
        .route("/deployment/{id}", get(pages::deployment))
        .route("/deployment/{id}/{action}", post(actions::deployment_action))
        .route("/api/agent/{host}/next", get(agent::next))
        .route("/api/agent/{host}/deployment/{id}", post(agent::report))
        .route("/search", get(pages::search))
        .route("/machines", get(pages::machines))
        .route("/machines/{machine}/{action}", post(actions::machine_action))
        .route("/static/kiln.js", get(script))
        .route("/job/{project}/{jobset}/{job}/latest", get(builds::job_latest))
        .route("/job/{project}/{jobset}/{job}/latest/output/{output}", get(builds::job_latest_output))
        .route("/nix-cache-info", get(cache::cache_info))
        .route("/{file}", get(cache::get_narinfo).put(cache::put_narinfo))
        .route("/nar/{file}", get(cache::get_nar).put(cache::put_nar))
        .route("/log/{drv}", get(cache::get_log))
        .route("/static/style.css", get(style))
        .layer(axum::middleware::from_fn_with_state(state.clone(), private_guard))
        .layer(axum::middleware::from_fn_with_state(state.clone(), error_bodies))
        .layer(axum::middleware::from_fn_with_state(state.clone(), live_sessions))
        .with_state(state)
}

/// Whether the client asked for JSON (`Accept: application/json`).
/// Whether to answer JSON: `Accept` asks for it, or (as Hydra reads it, and
/// as hydra-cli sends its GETs) the request says `Content-Type: application/json`.
pub fn wants_json(headers: &HeaderMap) -> bool {
    let says = |h| {
        headers
            .get(h)
            .and_then(|v: &axum::http::HeaderValue| v.to_str().ok())
            .is_some_and(|v| v.contains("application/json"))
    };
    says(header::ACCEPT) || says(header::CONTENT_TYPE)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    status: &'static str,
    database: bool,
}

/// Liveness and database reachability; 503 when the database is down.
#[utoipa::path(get, path = "/healthz", tag = "service",
    responses((status = 200, description = "up", body = Health), (status = 503, description = "the database is unreachable", body = Health)))]
pub async fn healthz(State(s): State<AppState>) -> Response {
    let database = s.db.ping().await;
    let code = if database { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(Health { status: if database { "ok" } else { "degraded" }, database })).into_response()
}

/// Readiness: the database answers and Kiln is not shutting down; 503
/// otherwise, so a load balancer stops sending requests.
#[utoipa::path(get, path = "/readyz", tag = "service",
    responses((status = 200, description = "ready", body = Health), (status = 503, description = "not ready", body = Health)))]
pub async fn readyz(State(s): State<AppState>) -> Response {
    let database = s.db.ping().await;
    let ready = database && !s.events.is_closed();
    let code = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(Health { status: if ready { "ready" } else { "not ready" }, database })).into_response()
}

/// Prometheus metrics, in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain")))]
pub async fn metrics(State(s): State<AppState>) -> Result<Response, WebError> {
    let status = s.queue.status.lock().expect("status").clone();
    let text = crate::metrics::render(&s.db, &status).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response())
}

async fn style() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")],
        include_str!("../../static/style.css"),
    )
        .into_response()
}

/// Removes a session cookie that is not a live session (forged, expired,
/// or made from a token no longer configured) before anything else looks
/// at the request. Done once here, before any handler holds a database
/// connection, rather than by each page: a page asking for a second
/// connection while it holds one could, with the pool busy, wait out the
/// pool's timeout.
async fn live_sessions(
    State(s): State<AppState>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(c) = session::cookie(req.headers())
        && !actions::session_is_live(&s, &c).await
    {
        session::drop_cookie(req.headers_mut());
    }
    next.run(req).await
}

/// With `private = true`, nothing but signing in, health and static files
/// is shown to a request without a token or session.
async fn private_guard(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !s.config.private {
        return next.run(req).await;
    }
    let path = req.uri().path();
    // GitHub signs its webhooks instead of sending a token.
    // Agents present their host's token, checked by their handlers.
    let open = matches!(path, "/login" | "/logout" | "/healthz" | "/readyz" | "/api/webhooks/github")
        || path.starts_with("/static/")
        || path.starts_with("/api/agent/");
    if open || actions::signed_in(&s, req.headers()).is_some() {
        return next.run(req).await;
    }
    if let Some(token) = auth::presented_upload(req.headers())
        && let Ok(mut c) = s.db.conn().await
        && matches!(db::api_tokens::check(c.ex(), &token).await, Ok(Some(_)))
    {
        return next.run(req).await;
    }
    let mut r =
        (StatusCode::UNAUTHORIZED, "this Kiln is private: sign in at /login, or send a token\n").into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Basic realm=\"kiln\""));
    r
}

#[derive(askama::Template)]
#[template(path = "error.html")]
struct ErrorPage {
    title: String,
    nav: pages::Nav,
    heading: String,
    message: String,
    code: u16,
}

/// Every error answers the same way, whoever produced it (a handler, an
/// extractor's rejection, the router): an HTML page for a browser, else
/// the JSON [`ErrorBody`] the API documents. Headers such as
/// `WWW-Authenticate` and `Allow` are kept.
async fn error_bodies(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // The binary cache speaks Nix's protocol, where only the status counts.
    let path = req.uri().path();
    if path.ends_with(".narinfo") || path.starts_with("/nar/") || path.starts_with("/log/") {
        return next.run(req).await;
    }
    let headers = req.headers().clone();
    let resp = next.run(req).await;
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let browser = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html") && !a.contains("application/json"));
    let content_type = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let json = content_type.starts_with("application/json");
    // A handler's own page (the sign-in form with its message) stays.
    if (json && !browser) || content_type.starts_with("text/html") {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 << 10).await.unwrap_or_default();
    let mut message = if json {
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_default()
    } else {
        String::from_utf8_lossy(&bytes).trim().to_string()
    };
    if message.is_empty() {
        message = status.canonical_reason().unwrap_or("error").to_lowercase();
    }
    parts.headers.remove(header::CONTENT_LENGTH);
    let (content_type, body) = if browser {
        let heading = match status {
            StatusCode::NOT_FOUND => "Not found".to_string(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => "Not allowed".to_string(),
            other => other.canonical_reason().unwrap_or("Error").to_string(),
        };
        let page = ErrorPage {
            title: format!("{heading} · Kiln"),
            nav: pages::nav(&s, &headers),
            heading,
            message,
            code: status.as_u16(),
        };
        ("text/html; charset=utf-8", askama::Template::render(&page).unwrap_or_default())
    } else {
        ("application/json", serde_json::to_string(&ErrorBody { error: message }).unwrap_or_default())
    };
    parts.headers.insert(header::CONTENT_TYPE, axum::http::HeaderValue::from_static(content_type));
    Response::from_parts(parts, axum::body::Body::from(body))
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), (header::CACHE_CONTROL, "public, max-age=3600")],
        include_str!("../../static/kiln.js"),
    )
        .into_response()
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
    /// A webhook without a valid signature.
    #[error("{0}")]
    Unsigned(String),
    #[error("the body is larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("{0}")]
    Conflict(String),
    /// Something Kiln depends on (the cache's bucket) is out of reach:
    /// the client should try again.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

/// The body of every error answer.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
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
            WebError::Unsigned(_) => StatusCode::UNAUTHORIZED,
            WebError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            WebError::Conflict(_) => StatusCode::CONFLICT,
            WebError::Unavailable(_) => {
                tracing::warn!(error = %self, "request failed");
                let body = ErrorBody { error: "service unavailable; try again".into() };
                return (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "5")], Json(body)).into_response();
            }
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
