//! Actions that change things: restart, cancel, bump and pin (keep) a
//! build; restart the failed builds of an evaluation, cancel or bump it;
//! trigger, enable and disable a jobset; enable and disable a machine.
//! Scripts use a bearer token; the UI a signed-in session plus the form's
//! CSRF token. Anyone else is told "not allowed".

use std::collections::HashMap;

use askama::Template;
use axum::extract::{Form, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Serialize;

use super::session::{self, COOKIE};
use super::{AppState, ErrorBody, WebError, auth};
use crate::db::{self, api_tokens, builds, jobsets, machines};

/// Who may write, and how they asked.
pub enum Via {
    Bearer,
    Form,
}

/// The session's CSRF token, if the request is signed in. The
/// [`super::live_sessions`] layer has already removed a cookie whose token
/// is gone, so the signature and expiry are all that is left to check.
pub fn signed_in(s: &AppState, headers: &HeaderMap) -> Option<String> {
    let c = session::cookie(headers)?;
    s.session_key.check(&c, db::now())?;
    Some(s.session_key.csrf(&c))
}

/// Whether a session cookie is signed, unexpired, and made from a token
/// Kiln still has. A database error counts as no.
pub async fn session_is_live(s: &AppState, value: &str) -> bool {
    let Some(binding) = s.session_key.check(value, db::now()) else {
        return false;
    };
    let digests = async {
        let mut c = s.db.conn().await?;
        api_tokens::digests(c.ex()).await
    };
    match digests.await {
        Ok(d) => s.session_key.of_token(&binding, d.iter().map(String::as_str)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot check a session's token");
            false
        }
    }
}

/// Checks that the request may write: a valid bearer token, or a session
/// with the matching CSRF token.
pub async fn authorize(s: &AppState, headers: &HeaderMap, csrf: Option<&str>) -> Result<Via, WebError> {
    if auth::presented(headers).is_some() {
        auth::require(s, headers).await?;
        return Ok(Via::Bearer);
    }
    match (signed_in(s, headers), csrf) {
        (Some(expected), Some(got)) if expected == got => Ok(Via::Form),
        (Some(_), _) => Err(WebError::Forbidden(
            "not allowed: the form is stale or was not sent from Kiln's page; reload it".into(),
        )),
        (None, _) => Err(WebError::Unauthorized),
    }
}

/// What an action did, for scripts.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Done {
    ok: bool,
    action: String,
    affected: usize,
}

fn done(via: Via, action: &str, affected: usize, back: String) -> Response {
    match via {
        Via::Bearer => axum::Json(Done { ok: true, action: action.into(), affected }).into_response(),
        Via::Form => Redirect::to(&back).into_response(),
    }
}

/// A form body, or none (scripts post nothing).
type FormData = Result<Form<HashMap<String, String>>, axum::extract::rejection::FormRejection>;

fn csrf_of(form: &FormData) -> Option<&str> {
    form.as_ref().ok().and_then(|f| f.get("csrf")).map(String::as_str)
}

#[utoipa::path(post, path = "/build/{id}/{action}", tag = "actions", security(("token" = [])),
    params(("id" = i64, Path, description = "build id", minimum = 1), ("action" = String, Path, description = "restart, cancel or bump")),
    responses((status = 200, description = "done (a form post is redirected back instead)", body = Done), (status = 303, description = "done, from a signed-in form"), (status = 400, description = "not possible in this state", body = ErrorBody), (status = 403, description = "a form without its CSRF token", body = ErrorBody), (status = 401, description = "no valid token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn build_action(
    State(s): State<AppState>,
    Path((id, action)): Path<(i64, String)>,
    headers: HeaderMap,
    form: FormData,
) -> Result<Response, WebError> {
    let via = authorize(&s, &headers, csrf_of(&form)).await?;
    let mut c = s.db.conn().await?;
    let b = builds::get(c.ex(), id).await?.ok_or_else(|| WebError::NotFound(format!("build {id}")))?;
    match action.as_str() {
        "restart" => {
            if !b.finished {
                return Err(WebError::BadRequest(format!("build {id} has not finished")));
            }
            s.queue.restart(id)
        }
        "cancel" => {
            if b.finished {
                return Err(WebError::BadRequest(format!("build {id} has finished")));
            }
            s.queue.cancel(id)
        }
        "bump" => s.queue.bump(id),
        other => return Err(WebError::NotFound(format!("action {other}"))),
    }
    s.queue.flush().await;
    s.memo.forget();
    Ok(done(via, &action, 1, format!("/build/{id}")))
}

#[utoipa::path(post, path = "/build/{id}/keep/{flag}", tag = "actions", security(("token" = [])),
    params(("id" = i64, Path, description = "build id", minimum = 1), ("flag" = i64, Path, description = "1 pins the build: garbage collection keeps its outputs' closure in the cache; 0 unpins it (Hydra's URL)", minimum = 0, maximum = 1)),
    responses((status = 200, description = "done (a form post is redirected back instead)", body = Done), (status = 303, description = "done, from a signed-in form"), (status = 400, description = "a flag other than 0 or 1", body = ErrorBody), (status = 403, description = "a form without its CSRF token", body = ErrorBody), (status = 401, description = "no valid token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn build_keep(
    State(s): State<AppState>,
    Path((id, flag)): Path<(i64, String)>,
    headers: HeaderMap,
    form: FormData,
) -> Result<Response, WebError> {
    let via = authorize(&s, &headers, csrf_of(&form)).await?;
    let keep = match flag.as_str() {
        "1" => true,
        "0" => false,
        other => return Err(WebError::BadRequest(format!("keep/{other}: use keep/1 to pin, keep/0 to unpin"))),
    };
    let mut c = s.db.conn().await?;
    builds::get(c.ex(), id).await?.ok_or_else(|| WebError::NotFound(format!("build {id}")))?;
    builds::set_keep(c.ex(), id, keep).await?;
    s.memo.forget();
    Ok(done(via, if keep { "keep" } else { "unkeep" }, 1, format!("/build/{id}")))
}

#[utoipa::path(post, path = "/eval/{id}/{action}", tag = "actions", security(("token" = [])),
    params(("id" = i64, Path, description = "evaluation id", minimum = 1), ("action" = String, Path, description = "restart (the failed builds), cancel or bump")),
    responses((status = 200, description = "done (a form post is redirected back instead)", body = Done), (status = 303, description = "done, from a signed-in form"), (status = 400, description = "not possible in this state", body = ErrorBody), (status = 403, description = "a form without its CSRF token", body = ErrorBody), (status = 401, description = "no valid token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn eval_action(
    State(s): State<AppState>,
    Path((id, action)): Path<(i64, String)>,
    headers: HeaderMap,
    form: FormData,
) -> Result<Response, WebError> {
    let via = authorize(&s, &headers, csrf_of(&form)).await?;
    let n = match action.as_str() {
        "restart" => s.queue.restart_eval(&s.db, id).await?,
        "cancel" => s.queue.cancel_eval(&s.db, id).await?,
        "bump" => s.queue.bump_eval(&s.db, id).await?,
        other => return Err(WebError::NotFound(format!("action {other}"))),
    };
    s.queue.flush().await;
    s.memo.forget();
    Ok(done(via, &action, n, format!("/eval/{id}")))
}

#[utoipa::path(post, path = "/jobset/{project}/{jobset}/{action}", tag = "actions", security(("token" = [])),
    params(("project" = String, Path, description = "project name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("jobset" = String, Path, description = "jobset name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("action" = String, Path, description = "trigger, enable, disable, or approve (a pull request from an outside contributor: it is fetched, evaluated and built from now on)")),
    responses((status = 200, description = "done (a form post is redirected back instead)", body = Done), (status = 303, description = "done, from a signed-in form"), (status = 400, description = "not possible in this state", body = ErrorBody), (status = 403, description = "a form without its CSRF token", body = ErrorBody), (status = 401, description = "no valid token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn jobset_action(
    State(s): State<AppState>,
    Path((project, name, action)): Path<(String, String, String)>,
    headers: HeaderMap,
    form: FormData,
) -> Result<Response, WebError> {
    let via = authorize(&s, &headers, csrf_of(&form)).await?;
    let mut c = s.db.conn().await?;
    let j = jobsets::get(c.ex(), &project, &name)
        .await?
        .ok_or_else(|| WebError::NotFound(format!("jobset {project}:{name}")))?;
    match action.as_str() {
        "trigger" => {
            jobsets::trigger(c.ex(), j.id, true).await?;
            s.evaluator.wake();
        }
        "enable" => jobsets::set_enabled(c.ex(), j.id, true).await?,
        "disable" => jobsets::set_enabled(c.ex(), j.id, false).await?,
        "approve" => {
            if j.pr_number.is_none() {
                return Err(WebError::BadRequest(format!("{project}:{name} is not a pull request")));
            }
            let by = match via {
                Via::Bearer => "an API token holder",
                Via::Form => "a signed-in operator",
            };
            approve(&mut c, &j, by).await?;
            s.evaluator.wake();
        }
        other => return Err(WebError::NotFound(format!("action {other}"))),
    }
    s.memo.forget();
    Ok(done(via, &action, 1, format!("/jobset/{project}/{name}")))
}

/// Approves a pull request and asks for its evaluation.
pub async fn approve(c: &mut crate::db::Conn, j: &jobsets::Jobset, by: &str) -> Result<(), crate::db::DbError> {
    // The check run that asked for approval is done: the evaluation gets a new one.
    if let Some(p) = crate::db::projects::get_by_id(c.ex(), j.project_id).await?
        && let Some(repo) = crate::github::repo_of(&p)
        && let Some(head) = &j.pr_head_sha
    {
        let target = format!("{}@{head}", repo.full_name());
        let name = crate::github::checks::eval_name(j.reported_name());
        crate::db::check_runs::forget(c.ex(), &target, &name).await?;
    }
    jobsets::approve(c.ex(), j.id, by).await?;
    jobsets::trigger(c.ex(), j.id, false).await?;
    tracing::info!(jobset = %j.name, pr = j.pr_number, author = j.pr_author.as_deref(), by, "pull request approved");
    Ok(())
}

#[utoipa::path(post, path = "/machines/{machine}/{action}", tag = "actions", security(("token" = [])),
    params(("machine" = String, Path, description = "the machine's URI as in the machines file, percent-encoded (its `path` on /machines), or the URI without its `?` settings when only one machine has it"), ("action" = String, Path, description = "disable (no new steps go there; running ones finish) or enable (used again at once, its pause ended)")),
    responses((status = 200, description = "done (a form post is redirected back instead)", body = Done), (status = 303, description = "done, from a signed-in form"), (status = 403, description = "a form without its CSRF token", body = ErrorBody), (status = 401, description = "no valid token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn machine_action(
    State(s): State<AppState>,
    Path((machine, action)): Path<(String, String)>,
    headers: HeaderMap,
    form: FormData,
) -> Result<Response, WebError> {
    let via = authorize(&s, &headers, csrf_of(&form)).await?;
    let enabled = match action.as_str() {
        "enable" => true,
        "disable" => false,
        other => return Err(WebError::NotFound(format!("action {other}"))),
    };
    let (list, _, _) = super::pages::configured_machines(&s.config);
    let by_name: Vec<_> = list.iter().filter(|m| m.uri.split('?').next() == Some(machine.as_str())).collect();
    let uri = match list.iter().find(|m| m.uri == machine) {
        Some(m) => m.uri.clone(),
        None if by_name.len() == 1 => by_name[0].uri.clone(),
        None => return Err(WebError::NotFound(format!("machine {machine}"))),
    };
    let mut c = s.db.conn().await?;
    machines::set_enabled(c.ex(), &uri, enabled).await?;
    drop(c);
    tracing::info!(machine = %uri, action = %action, "machine {action}d by an operator");
    s.queue.machines_changed();
    s.queue.flush().await;
    Ok(done(via, &action, 1, "/machines".into()))
}

/// `s` as one path segment: everything but unreserved characters
/// percent-encoded (machine URIs hold `/`, `?`, `%` and `=`).
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ------------------------------------------------------------------ signing in

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    title: String,
    error: Option<String>,
    nav: super::pages::Nav,
}

pub async fn login_page() -> Result<Response, WebError> {
    Ok(Html(LoginPage { title: "Sign in · Kiln".into(), error: None, nav: Default::default() }.render()?)
        .into_response())
}

pub async fn login(State(s): State<AppState>, Form(form): Form<HashMap<String, String>>) -> Result<Response, WebError> {
    let token = form.get("token").map(|t| t.trim()).unwrap_or("");
    let mut c = s.db.conn().await?;
    let Some(t) = (if token.is_empty() { None } else { api_tokens::check(c.ex(), token).await? }) else {
        let page = LoginPage {
            title: "Sign in · Kiln".into(),
            error: Some("That is not a valid token.".into()),
            nav: Default::default(),
        };
        return Ok((StatusCode::UNAUTHORIZED, Html(page.render()?)).into_response());
    };
    let value = s.session_key.issue(&t.token_sha256, db::now());
    let secure = if s.config.base_url().starts_with("https://") { "; Secure" } else { "" };
    let cookie =
        format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}", session::LIFETIME_S);
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response())
}

pub async fn logout() -> Response {
    ([(header::SET_COOKIE, format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"))], Redirect::to("/"))
        .into_response()
}

#[utoipa::path(post, path = "/deployment/{id}/{action}", tag = "actions", security(("token" = [])),
    params(("id" = i64, Path, description = "deployment id", minimum = 1), ("action" = String, Path, description = "promote (a deployment waiting for it) or cancel (one that has not started)")),
    responses((status = 200, description = "done (a form post is redirected back instead)", body = Done), (status = 303, description = "done, from a signed-in form"), (status = 400, description = "not possible in this state", body = ErrorBody), (status = 403, description = "a form without its CSRF token", body = ErrorBody), (status = 401, description = "no valid token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn deployment_action(
    State(s): State<AppState>,
    Path((id, action)): Path<(i64, String)>,
    headers: HeaderMap,
    form: FormData,
) -> Result<Response, WebError> {
    let via = authorize(&s, &headers, csrf_of(&form)).await?;
    let mut c = s.db.conn().await?;
    let d = db::deployments::get(c.ex(), id).await?.ok_or_else(|| WebError::NotFound(format!("deployment {id}")))?;
    match action.as_str() {
        "promote" => {
            if !db::deployments::promote(c.ex(), id).await? {
                return Err(WebError::BadRequest(format!(
                    "deployment {id} is {}, not waiting for promotion",
                    d.status
                )));
            }
        }
        "cancel" => {
            if !matches!(d.status.as_str(), db::deployments::WAITING | db::deployments::QUEUED) {
                return Err(WebError::BadRequest(format!(
                    "deployment {id} is {}: only one that has not started can be cancelled",
                    d.status
                )));
            }
            db::deployments::finish(c.ex(), id, db::deployments::CANCELLED, Some("cancelled")).await?;
        }
        other => return Err(WebError::NotFound(format!("action {other}"))),
    }
    s.events.deployment_changed(id);
    Ok(done(via, &action, 1, format!("/deployment/{id}")))
}

/// What `POST /environment/{project}/{name}/deploy` deploys.
#[derive(serde::Deserialize, utoipa::ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// The evaluation (default: the jobset's newest that succeeded). A
    /// number: JSON's `12.0` is 12, as JSON Schema counts it.
    #[schema(value_type = Option<i64>, minimum = 1)]
    pub eval: Option<serde_json::Number>,
    /// Only these hosts (default: all).
    pub hosts: Option<Vec<String>>,
}

/// The deployment a request started.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Started {
    pub deployment: i64,
}

#[utoipa::path(post, path = "/environment/{project}/{name}/deploy", tag = "actions", security(("token" = [])),
    params(("project" = String, Path, description = "project name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$"), ("name" = String, Path, description = "environment name", pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}$")),
    request_body(content = DeployRequest, content_type = "application/json"),
    responses((status = 200, description = "the deployment is queued", body = Started), (status = 400, description = "the evaluation cannot be deployed, or a malformed request", body = ErrorBody), (status = 401, description = "no valid token", body = ErrorBody), (status = 404, description = "not found", body = ErrorBody)))]
pub async fn environment_deploy(
    State(s): State<AppState>,
    Path((project, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, WebError> {
    auth::require(&s, &headers).await?;
    let env = {
        let mut c = s.db.conn().await?;
        db::environments::get(c.ex(), &project, &name)
            .await?
            .filter(|e| e.declared)
            .ok_or_else(|| WebError::NotFound(format!("environment {project}:{name}")))?
    };
    let req: DeployRequest = if body.is_empty() {
        DeployRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| WebError::BadRequest(format!("the request body: {e}")))?
    };
    let eval = match &req.eval {
        None => None,
        Some(n) => Some(
            n.as_i64()
                .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9e15).map(|f| f as i64))
                .ok_or_else(|| WebError::BadRequest(format!("eval: {n} is not an evaluation id")))?,
        ),
    };
    let d = crate::deploy::deploy_now(&s.db, &env, eval, req.hosts.as_deref(), "api")
        .await?
        .map_err(WebError::BadRequest)?;
    s.events.deployment_changed(d.id);
    Ok(axum::Json(Started { deployment: d.id }).into_response())
}
