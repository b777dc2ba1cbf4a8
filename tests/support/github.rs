//! A stand-in for GitHub's REST API on loopback that checks every request
//! the way GitHub does (credentials, path, JSON fields and their allowed
//! values, the 140-character description) and can answer with errors and
//! rate limits, or not at all; and the set-up of a Kiln that reports to it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::Kiln;

pub const TOKEN: &str = "ghp_kilntesttoken";
pub const SECRET: &str = "webhook-secret-1";
pub const REPO: &str = "acme/widgets";
pub const BASE: &str = "https://ci.example.org";

/// One status request as the stand-in saw it.
#[derive(Debug, Clone)]
pub struct Posted {
    pub sha: String,
    pub state: String,
    pub context: String,
    pub description: String,
    pub target_url: String,
    pub auth: String,
    /// What the stand-in answered.
    pub answered: u16,
}

#[derive(Default)]
pub struct Hub {
    pub statuses: Vec<Posted>,
    /// Requests GitHub would refuse, with why: every test asserts none.
    pub invalid: Vec<String>,
    /// Answers to give before accepting: (status, headers).
    pub script: VecDeque<(u16, Vec<(&'static str, String)>)>,
    /// App: installation tokens minted, and the app's public key.
    pub minted: Vec<String>,
    /// Tokens minted for a subset of the installation: (token, repositories, permissions).
    pub scoped: Vec<(String, Vec<String>, serde_json::Value)>,
    pub app_public_pem: Option<String>,
    pub token_lifetime_s: i64,
    /// Repositories (`owner/name`) whose status requests are taken and
    /// never answered, as by a connection that hangs; and how many came.
    pub hang: Vec<String>,
    pub hung: usize,
    /// Deployments created: (id, ref, environment).
    pub deployments: Vec<(i64, String, String)>,
    /// Deployment statuses accepted: (deployment id, state, log_url).
    pub deployment_statuses: Vec<(i64, String, String)>,
    /// Check runs created, with every update GitHub accepted.
    pub runs: Vec<CheckRun>,
    /// Answers to give check-run requests before accepting: (status, body).
    pub check_script: VecDeque<(u16, String)>,
}

/// A check run as the stand-in keeps it.
#[derive(Debug, Clone)]
pub struct CheckRun {
    pub id: i64,
    pub name: String,
    pub head_sha: String,
    pub external_id: String,
    pub status: String,
    pub conclusion: Option<String>,
    pub title: String,
    pub summary: String,
    pub text: String,
    /// Every annotation, appended request by request as GitHub does.
    pub annotations: Vec<serde_json::Value>,
    pub actions: Vec<serde_json::Value>,
    pub details_url: String,
    /// How many create and update requests it took.
    pub requests: usize,
}

#[derive(Clone)]
pub struct Fake {
    pub hub: Arc<Mutex<Hub>>,
    pub url: String,
    pub _task: Arc<tokio::task::JoinHandle<()>>,
}

impl Fake {
    pub async fn start() -> Fake {
        Self::start_on("http://127.0.0.1:0").await
    }

    /// On a given `http://host:port` (to come back where Kiln expects GitHub).
    pub async fn start_on(url: &str) -> Fake {
        let addr = url.strip_prefix("http://").unwrap().to_string();
        let hub = Arc::new(Mutex::new(Hub { token_lifetime_s: 3600, ..Default::default() }));
        let app = axum::Router::new()
            .route("/repos/{owner}/{repo}/statuses/{sha}", axum::routing::post(post_status))
            .route("/repos/{owner}/{repo}/deployments", axum::routing::post(post_deployment))
            .route("/repos/{owner}/{repo}/deployments/{id}/statuses", axum::routing::post(post_deployment_status))
            .route("/repos/{owner}/{repo}/check-runs", axum::routing::post(create_check_run))
            .route("/repos/{owner}/{repo}/check-runs/{id}", axum::routing::patch(update_check_run))
            .route("/app/installations/{id}/access_tokens", axum::routing::post(mint))
            .route("/repos/{owner}/{repo}/installation", axum::routing::get(installation))
            .fallback(|req: axum::extract::Request| async move {
                (StatusCode::NOT_FOUND, format!("the stand-in does not know {} {}", req.method(), req.uri()))
            })
            .with_state(hub.clone());
        let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Fake { hub, url, _task: Arc::new(task) }
    }

    pub fn statuses(&self) -> Vec<Posted> {
        self.hub.lock().unwrap().statuses.clone()
    }

    /// Accepted statuses for a commit and context, in order.
    pub fn accepted(&self, sha: &str, context: &str) -> Vec<Posted> {
        self.statuses().into_iter().filter(|p| p.sha == sha && p.context == context && p.answered == 201).collect()
    }

    /// Check runs of a commit and name, oldest first.
    pub fn runs(&self, sha: &str, name: &str) -> Vec<CheckRun> {
        self.hub.lock().unwrap().runs.iter().filter(|r| r.head_sha == sha && r.name == name).cloned().collect()
    }

    pub fn assert_valid(&self) {
        let h = self.hub.lock().unwrap();
        assert!(h.invalid.is_empty(), "requests GitHub would refuse: {:#?}", h.invalid);
    }
}

pub fn check_auth(hub: &Hub, headers: &HeaderMap) -> Result<String, String> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let token = auth.strip_prefix("Bearer ").or_else(|| auth.strip_prefix("token ")).unwrap_or("");
    let ok = token == TOKEN || hub.minted.iter().any(|m| m == token);
    if !ok {
        return Err(format!("bad credentials {auth:?}"));
    }
    if headers.get("user-agent").is_none() {
        return Err("no User-Agent (GitHub refuses those)".into());
    }
    Ok(token.to_string())
}

pub async fn post_status(
    State(hub): State<Arc<Mutex<Hub>>>,
    Path((owner, repo, sha)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let hang = {
        let mut h = hub.lock().unwrap();
        let hang = h.hang.contains(&format!("{owner}/{repo}"));
        h.hung += usize::from(hang);
        hang
    };
    if hang {
        return std::future::pending().await;
    }
    let mut h = hub.lock().unwrap();
    let token = match check_auth(&h, &headers) {
        Ok(t) => t,
        Err(e) => {
            h.invalid.push(e.clone());
            return (StatusCode::UNAUTHORIZED, Json(serde_json::json!({"message": "Bad credentials"}))).into_response();
        }
    };
    let v: serde_json::Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            h.invalid.push(format!("body is not JSON: {e}"));
            return (StatusCode::BAD_REQUEST, "Problems parsing JSON").into_response();
        }
    };
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    let mut problems = Vec::new();
    if format!("{owner}/{repo}") != REPO {
        problems.push(format!("unknown repository {owner}/{repo}"));
    }
    if sha.len() != 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        problems.push(format!("{sha} is not a commit"));
    }
    let state = s("state").unwrap_or_default();
    if !["error", "failure", "pending", "success"].contains(&state.as_str()) {
        problems.push(format!("state {state:?}"));
    }
    let context = s("context").unwrap_or_default();
    if context.is_empty() {
        problems.push("no context".into());
    }
    let description = s("description").unwrap_or_default();
    if description.chars().count() > 140 {
        problems.push(format!("description of {} characters", description.chars().count()));
    }
    let target_url = s("target_url").unwrap_or_default();
    if !target_url.starts_with("https://") && !target_url.starts_with("http://") {
        problems.push(format!("target_url {target_url:?}"));
    }
    if !problems.is_empty() {
        h.invalid.push(problems.join("; "));
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(serde_json::json!({"message": "Validation Failed"})))
            .into_response();
    }
    let (code, extra) = h.script.pop_front().unwrap_or((201, Vec::new()));
    h.statuses.push(Posted {
        sha,
        state: state.clone(),
        context: context.clone(),
        description,
        target_url,
        auth: token,
        answered: code,
    });
    let mut r = if code == 201 {
        (StatusCode::CREATED, Json(serde_json::json!({"id": h.statuses.len(), "state": state, "context": context})))
            .into_response()
    } else {
        (StatusCode::from_u16(code).unwrap(), Json(serde_json::json!({"message": "scripted failure"}))).into_response()
    };
    for (k, val) in extra {
        r.headers_mut().insert(k, val.parse().unwrap());
    }
    r
}

/// The checks every write of the stand-in starts with: credentials, the
/// repository, a JSON body.
fn write_checks(
    h: &mut Hub,
    owner: &str,
    repo: &str,
    headers: &HeaderMap,
    body: &str,
) -> Result<serde_json::Value, Box<Response>> {
    if let Err(e) = check_auth(h, headers) {
        h.invalid.push(e);
        return Err(Box::new(
            (StatusCode::UNAUTHORIZED, Json(serde_json::json!({"message": "Bad credentials"}))).into_response(),
        ));
    }
    if format!("{owner}/{repo}") != REPO {
        h.invalid.push(format!("unknown repository {owner}/{repo}"));
        return Err(Box::new(StatusCode::NOT_FOUND.into_response()));
    }
    serde_json::from_str(body).map_err(|e| {
        h.invalid.push(format!("body is not JSON: {e}"));
        Box::new((StatusCode::BAD_REQUEST, "Problems parsing JSON").into_response())
    })
}

fn unprocessable(h: &mut Hub, problems: Vec<String>) -> Response {
    h.invalid.push(problems.join("; "));
    (StatusCode::UNPROCESSABLE_ENTITY, Json(serde_json::json!({"message": "Validation Failed"}))).into_response()
}

/// `POST /repos/{owner}/{repo}/deployments`, checked as GitHub documents it.
pub async fn post_deployment(
    State(hub): State<Arc<Mutex<Hub>>>,
    Path((owner, repo)): Path<(String, String)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut h = hub.lock().unwrap();
    let v = match write_checks(&mut h, &owner, &repo, &headers, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let mut problems = Vec::new();
    let git_ref = v["ref"].as_str().unwrap_or_default().to_string();
    if git_ref.is_empty() {
        problems.push("no ref".to_string());
    }
    let environment = v["environment"].as_str().unwrap_or("production").to_string();
    if environment.is_empty() {
        problems.push("empty environment".into());
    }
    if let Some(c) = v.get("required_contexts")
        && !c.as_array().is_some_and(|a| a.iter().all(|x| x.is_string()))
    {
        problems.push(format!("required_contexts {c}"));
    }
    if let Some(a) = v.get("auto_merge")
        && !a.is_boolean()
    {
        problems.push(format!("auto_merge {a}"));
    }
    if let Some(p) = v.get("payload")
        && !(p.is_object() || p.is_string())
    {
        problems.push(format!("payload {p}"));
    }
    for k in v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default() {
        let known = [
            "ref",
            "task",
            "auto_merge",
            "required_contexts",
            "payload",
            "environment",
            "description",
            "transient_environment",
            "production_environment",
        ];
        if !known.contains(&k.as_str()) {
            problems.push(format!("unknown field {k}"));
        }
    }
    if !problems.is_empty() {
        return unprocessable(&mut h, problems);
    }
    let id = 9000 + h.deployments.len() as i64;
    h.deployments.push((id, git_ref.clone(), environment.clone()));
    (StatusCode::CREATED, Json(serde_json::json!({"id": id, "ref": git_ref, "environment": environment})))
        .into_response()
}

/// `POST /repos/{owner}/{repo}/deployments/{id}/statuses`.
pub async fn post_deployment_status(
    State(hub): State<Arc<Mutex<Hub>>>,
    Path((owner, repo, id)): Path<(String, String, i64)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut h = hub.lock().unwrap();
    let v = match write_checks(&mut h, &owner, &repo, &headers, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if !h.deployments.iter().any(|d| d.0 == id) {
        h.invalid.push(format!("status for unknown deployment {id}"));
        return StatusCode::NOT_FOUND.into_response();
    }
    let mut problems = Vec::new();
    let state = v["state"].as_str().unwrap_or_default().to_string();
    if !["error", "failure", "inactive", "in_progress", "queued", "pending", "success"].contains(&state.as_str()) {
        problems.push(format!("state {state:?}"));
    }
    let log_url = v["log_url"].as_str().unwrap_or_default().to_string();
    if !log_url.is_empty() && !log_url.starts_with("https://") && !log_url.starts_with("http://") {
        problems.push(format!("log_url {log_url:?}"));
    }
    let description = v["description"].as_str().unwrap_or_default();
    if description.chars().count() > 140 {
        problems.push(format!("description of {} characters", description.chars().count()));
    }
    if !problems.is_empty() {
        return unprocessable(&mut h, problems);
    }
    h.deployment_statuses.push((id, state.clone(), log_url));
    (StatusCode::CREATED, Json(serde_json::json!({"id": h.deployment_statuses.len(), "state": state}))).into_response()
}

/// What GitHub checks of a check run's fields, on create and update.
fn check_run_problems(v: &serde_json::Value, creating: bool) -> Vec<String> {
    let mut p = Vec::new();
    let str_of = |k: &str| v.get(k).and_then(|x| x.as_str());
    if creating {
        if str_of("name").is_none_or(str::is_empty) {
            p.push("no name".to_string());
        }
        let sha = str_of("head_sha").unwrap_or_default();
        if sha.len() != 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            p.push(format!("head_sha {sha:?}"));
        }
    }
    let status = str_of("status").unwrap_or("queued");
    if !["queued", "in_progress", "completed"].contains(&status) {
        p.push(format!("status {status:?}"));
    }
    let conclusions =
        ["action_required", "cancelled", "failure", "neutral", "success", "skipped", "stale", "timed_out"];
    match str_of("conclusion") {
        Some(c) if !conclusions.contains(&c) => p.push(format!("conclusion {c:?}")),
        None if status == "completed" => p.push("completed without a conclusion".into()),
        Some("action_required") if str_of("details_url").is_none() => {
            p.push("action_required without details_url".into())
        }
        _ => {}
    }
    if let Some(u) = str_of("details_url")
        && !u.starts_with("https://")
        && !u.starts_with("http://")
    {
        p.push(format!("details_url {u:?}"));
    }
    if let Some(e) = v.get("external_id")
        && !e.is_string()
    {
        p.push(format!("external_id {e}"));
    }
    if let Some(o) = v.get("output") {
        for k in ["title", "summary"] {
            if o.get(k).and_then(|x| x.as_str()).is_none() {
                p.push(format!("output without {k}"));
            }
        }
        for k in ["summary", "text"] {
            let n = o.get(k).and_then(|x| x.as_str()).map(|t| t.chars().count()).unwrap_or(0);
            if n > 65535 {
                p.push(format!("output.{k} of {n} characters"));
            }
        }
        let annotations = o.get("annotations").and_then(|a| a.as_array()).cloned().unwrap_or_default();
        if annotations.len() > 50 {
            p.push(format!("{} annotations in one request", annotations.len()));
        }
        for a in &annotations {
            let ok = a["path"].as_str().is_some_and(|s| !s.is_empty())
                && a["start_line"].as_u64().is_some_and(|l| l >= 1)
                && a["end_line"].as_u64() >= a["start_line"].as_u64()
                && ["notice", "warning", "failure"].contains(&a["annotation_level"].as_str().unwrap_or_default())
                && a["message"].as_str().is_some_and(|m| !m.is_empty() && m.len() <= 64 * 1024)
                && a["title"].as_str().is_none_or(|t| t.chars().count() <= 255);
            if !ok {
                p.push(format!("annotation {a}"));
            }
        }
    }
    if let Some(a) = v.get("actions") {
        let list = a.as_array().cloned().unwrap_or_default();
        if list.len() > 3 {
            p.push(format!("{} actions", list.len()));
        }
        for x in &list {
            let len = |k: &str| x[k].as_str().map(|s| s.chars().count());
            if !(len("label").is_some_and(|n| (1..=20).contains(&n))
                && len("description").is_some_and(|n| (1..=40).contains(&n))
                && len("identifier").is_some_and(|n| (1..=20).contains(&n)))
            {
                p.push(format!("action {x}"));
            }
        }
    }
    p
}

/// Check runs are an App's: a personal token gets 403 as on GitHub.
fn check_run_auth(h: &mut Hub, headers: &HeaderMap) -> Option<Response> {
    match check_auth(h, headers) {
        Ok(t) if t.starts_with("ghs_") => None,
        Ok(_) => {
            h.invalid.push("check runs written with a personal token".into());
            Some(
                (
                    StatusCode::FORBIDDEN,
                    Json(serde_json::json!({"message": "You must authenticate via a GitHub App."})),
                )
                    .into_response(),
            )
        }
        Err(e) => {
            h.invalid.push(e);
            Some((StatusCode::UNAUTHORIZED, Json(serde_json::json!({"message": "Bad credentials"}))).into_response())
        }
    }
}

fn apply_run(r: &mut CheckRun, v: &serde_json::Value) {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    if let Some(x) = s("status") {
        r.status = x;
    }
    if let Some(x) = s("conclusion") {
        r.conclusion = Some(x);
        r.status = "completed".into();
    }
    if let Some(x) = s("details_url") {
        r.details_url = x;
    }
    if let Some(x) = s("external_id") {
        r.external_id = x;
    }
    if let Some(o) = v.get("output") {
        r.title = o["title"].as_str().unwrap_or_default().to_string();
        r.summary = o["summary"].as_str().unwrap_or_default().to_string();
        if let Some(t) = o["text"].as_str() {
            r.text = t.to_string();
        }
        r.annotations.extend(o["annotations"].as_array().cloned().unwrap_or_default());
    }
    if let Some(a) = v.get("actions").and_then(|a| a.as_array()) {
        r.actions = a.clone();
    }
    r.requests += 1;
}

pub async fn create_check_run(
    State(hub): State<Arc<Mutex<Hub>>>,
    Path((owner, repo)): Path<(String, String)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut h = hub.lock().unwrap();
    if let Some(r) = check_run_auth(&mut h, &headers) {
        return r;
    }
    let v = match write_checks(&mut h, &owner, &repo, &headers, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let problems = check_run_problems(&v, true);
    if !problems.is_empty() {
        return unprocessable(&mut h, problems);
    }
    if let Some((code, text)) = h.check_script.pop_front() {
        return (StatusCode::from_u16(code).unwrap(), text).into_response();
    }
    let id = 7000 + h.runs.len() as i64;
    let mut r = CheckRun {
        id,
        name: v["name"].as_str().unwrap().to_string(),
        head_sha: v["head_sha"].as_str().unwrap().to_string(),
        external_id: String::new(),
        status: "queued".into(),
        conclusion: None,
        title: String::new(),
        summary: String::new(),
        text: String::new(),
        annotations: Vec::new(),
        actions: Vec::new(),
        details_url: String::new(),
        requests: 0,
    };
    apply_run(&mut r, &v);
    h.runs.push(r);
    (StatusCode::CREATED, Json(serde_json::json!({"id": id, "name": v["name"]}))).into_response()
}

pub async fn update_check_run(
    State(hub): State<Arc<Mutex<Hub>>>,
    Path((owner, repo, id)): Path<(String, String, i64)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut h = hub.lock().unwrap();
    if let Some(r) = check_run_auth(&mut h, &headers) {
        return r;
    }
    let v = match write_checks(&mut h, &owner, &repo, &headers, &body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let mut problems = check_run_problems(&v, false);
    let Some(pos) = h.runs.iter().position(|r| r.id == id) else {
        h.invalid.push(format!("update of unknown check run {id}"));
        return StatusCode::NOT_FOUND.into_response();
    };
    let back = v.get("status").and_then(|s| s.as_str()).is_some_and(|s| s != "completed");
    if h.runs[pos].status == "completed" && back {
        problems.push(format!("completed run {id} moved back to {}", v["status"]));
    }
    if !problems.is_empty() {
        return unprocessable(&mut h, problems);
    }
    if let Some((code, text)) = h.check_script.pop_front() {
        return (StatusCode::from_u16(code).unwrap(), text).into_response();
    }
    apply_run(&mut h.runs[pos], &v);
    Json(serde_json::json!({"id": id})).into_response()
}

/// Checks a GitHub App's JWT: RS256, signed by the app's key, iss = app id.
pub fn check_app_jwt(h: &Hub, headers: &HeaderMap) -> Result<(), String> {
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    let jwt = auth.strip_prefix("Bearer ").ok_or("no Bearer JWT")?;
    let pem = h.app_public_pem.as_ref().ok_or("no app configured in the stand-in")?;
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| e.to_string())?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    // GitHub takes the app id as a number; jsonwebtoken checks only string issuers.
    v.set_required_spec_claims(&["exp", "iat"]);
    v.validate_aud = false;
    #[derive(serde::Deserialize)]
    struct Claims {
        iss: serde_json::Value,
        iat: i64,
        exp: i64,
    }
    let c = jsonwebtoken::decode::<Claims>(jwt, &key, &v).map_err(|e| format!("JWT: {e}"))?.claims;
    if c.iss.to_string().trim_matches('"') != "4242" {
        return Err(format!("JWT issuer {}", c.iss));
    }
    if c.exp - c.iat > 600 {
        return Err("JWT lives longer than GitHub's 10 minutes".into());
    }
    Ok(())
}

pub async fn mint(
    State(hub): State<Arc<Mutex<Hub>>>,
    Path(id): Path<u64>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut h = hub.lock().unwrap();
    if let Err(e) = check_app_jwt(&h, &headers) {
        h.invalid.push(e);
        return (StatusCode::UNAUTHORIZED, "bad JWT").into_response();
    }
    if id != 77 {
        h.invalid.push(format!("installation {id}"));
        return StatusCode::NOT_FOUND.into_response();
    }
    // GitHub takes an optional body narrowing the token: repositories of
    // the installation by name, and permissions no wider than the App's.
    let v: serde_json::Value =
        if body.trim().is_empty() { serde_json::json!({}) } else { serde_json::from_str(&body).unwrap_or_default() };
    let repos: Option<Vec<String>> = v
        .get("repositories")
        .map(|r| r.as_array().into_iter().flatten().filter_map(|x| x.as_str().map(String::from)).collect());
    let installed = REPO.split('/').nth(1).unwrap();
    if let Some(r) = &repos
        && (r.is_empty() || r.iter().any(|n| n != installed))
    {
        return unprocessable(&mut h, vec![format!("repositories {r:?} are not all in the installation")]);
    }
    if let Some(p) = v.get("permissions") {
        let granted = ["statuses", "contents", "metadata", "checks", "pull_requests", "deployments"];
        let ok = p.as_object().is_some_and(|o| {
            o.iter().all(|(k, lvl)| granted.contains(&k.as_str()) && matches!(lvl.as_str(), Some("read" | "write")))
        });
        if !ok {
            return unprocessable(&mut h, vec![format!("permissions {p}")]);
        }
    }
    let token = format!("ghs_minted{}", h.minted.len() + 1);
    h.minted.push(token.clone());
    if let Some(r) = repos {
        h.scoped.push((token.clone(), r, v.get("permissions").cloned().unwrap_or_default()));
    }
    let expires = chrono::Utc::now() + chrono::Duration::seconds(h.token_lifetime_s);
    (
        StatusCode::CREATED,
        Json(serde_json::json!({
            "token": token,
            "expires_at": expires.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "permissions": {"statuses": "write", "contents": "read", "metadata": "read"},
            "repository_selection": "all",
        })),
    )
        .into_response()
}

pub async fn installation(
    State(hub): State<Arc<Mutex<Hub>>>,
    Path((owner, repo)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let mut h = hub.lock().unwrap();
    if let Err(e) = check_app_jwt(&h, &headers) {
        h.invalid.push(e);
        return (StatusCode::UNAUTHORIZED, "bad JWT").into_response();
    }
    if format!("{owner}/{repo}") != REPO {
        return StatusCode::NOT_FOUND.into_response();
    }
    Json(serde_json::json!({"id": 77, "app_id": 4242})).into_response()
}

/// An App key pair: the stand-in verifies the JWTs signed with it.
pub fn app_key(fake: &Fake) -> (tempfile::TempDir, std::path::PathBuf) {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("app.pem");
    super::run(
        "openssl",
        &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key.to_str().unwrap()],
        keys.path(),
    );
    let public = super::run("openssl", &["pkey", "-in", key.to_str().unwrap(), "-pubout"], keys.path());
    fake.hub.lock().unwrap().app_public_pem = Some(public);
    (keys, key)
}

pub fn kiln_dir(fake_url: &str, repo: &std::path::Path, github_extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gh-token"), TOKEN).unwrap();
    std::fs::write(dir.path().join("gh-secret"), SECRET).unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "base_url = \"{BASE}\"\n[github]\napi_url = \"{fake_url}\"\nwebhook_secret_file = \"gh-secret\"\n{github_extra}\n\
             [[projects]]\nname = \"w\"\nrepo = \"{}\"\ngithub = \"{REPO}\"\n",
            repo.display()
        ),
    )
    .unwrap();
    dir
}

/// Sends a webhook as GitHub does, signed with `secret`.
pub async fn webhook(
    kiln: &Kiln,
    event: &str,
    delivery: &str,
    body: &serde_json::Value,
    secret: Option<&str>,
) -> (u16, String) {
    let body = serde_json::to_vec(body).unwrap();
    let mut r = reqwest::Client::new()
        .post(format!("{}/api/webhooks/github", kiln.url))
        .header("X-GitHub-Event", event)
        .header("X-GitHub-Delivery", delivery)
        .header("Content-Type", "application/json");
    if let Some(s) = secret {
        r = r.header("X-Hub-Signature-256", kiln::github::webhook::sign(s.as_bytes(), &body));
    }
    let resp = r.body(body).send().await.unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

pub fn push_body(sha: &str) -> serde_json::Value {
    serde_json::json!({
        "ref": "refs/heads/main", "before": "0".repeat(40), "after": sha,
        "repository": {"full_name": REPO, "default_branch": "main"},
    })
}

/// Waits until the stand-in has accepted a status in `state` for each
/// context; on a timeout, says what GitHub and Kiln saw.
pub async fn wait_states(fake: &Fake, kiln: &Kiln, sha: &str, want: &[(&str, &str)], secs: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let done = want.iter().all(|(ctx, state)| fake.accepted(sha, ctx).last().is_some_and(|p| p.state == *state));
        if done {
            return;
        }
        if std::time::Instant::now() > deadline {
            let log = kiln.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!(
                "statuses {want:?} on {sha} never arrived\nreceived: {:#?}\ninvalid: {:#?}\nkiln log (last lines first):\n{}",
                fake.statuses(),
                fake.hub.lock().unwrap().invalid,
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
