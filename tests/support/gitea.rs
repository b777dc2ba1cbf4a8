//! A stand-in for a Gitea or Forgejo host on loopback: its commit status
//! API, checked as Gitea checks it (the `token` authorization, the
//! repository, the commit, the state and context), and its repositories
//! over git's dumb HTTP protocol behind Basic authentication with the
//! token, as a private repository is.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

pub const TOKEN: &str = "gitea-token-1";
pub const SECRET: &str = "gitea-webhook-secret";
pub const REPO: &str = "acme/widgets";

#[derive(Debug, Clone)]
pub struct Posted {
    pub sha: String,
    pub state: String,
    pub context: String,
    pub description: String,
    pub target_url: String,
}

#[derive(Default)]
pub struct Host {
    pub statuses: Vec<Posted>,
    pub invalid: Vec<String>,
    /// Git requests, and whether they carried the token.
    pub git_requests: Vec<(String, bool)>,
}

pub struct Gitea {
    pub host: Arc<Mutex<Host>>,
    pub url: String,
    /// Where the bare repositories are served from.
    pub root: tempfile::TempDir,
    _task: tokio::task::JoinHandle<()>,
}

type Shared = (Arc<Mutex<Host>>, std::path::PathBuf);

impl Gitea {
    pub async fn start() -> Gitea {
        let host = Arc::new(Mutex::new(Host::default()));
        let root = tempfile::tempdir().unwrap();
        let app = axum::Router::new()
            .route("/api/v1/repos/{owner}/{repo}/statuses/{sha}", axum::routing::post(post_status))
            .route("/{owner}/{repo}/{*path}", axum::routing::get(git_file))
            .fallback(|req: axum::extract::Request| async move {
                (StatusCode::NOT_FOUND, format!("the stand-in does not know {} {}", req.method(), req.uri()))
            })
            .with_state((host.clone(), root.path().to_path_buf()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Gitea { host, url, root, _task: task }
    }

    /// Publishes `source`'s branches as `acme/widgets.git` (a push).
    pub fn publish(&self, source: &std::path::Path) {
        let bare = self.root.path().join("acme/widgets.git");
        if !bare.exists() {
            std::fs::create_dir_all(bare.parent().unwrap()).unwrap();
            super::run("git", &["init", "-q", "--bare", bare.to_str().unwrap()], self.root.path());
        }
        super::run(
            "git",
            &[
                "fetch",
                "-q",
                "--force",
                source.to_str().unwrap(),
                "+refs/heads/*:refs/heads/*",
                "+refs/pull/*:refs/pull/*",
            ],
            &bare,
        );
        super::run("git", &["symbolic-ref", "HEAD", "refs/heads/main"], &bare);
        super::run("git", &["update-server-info"], &bare);
    }

    pub fn repo_url(&self) -> String {
        format!("{}/{REPO}.git", self.url)
    }

    pub fn accepted(&self, sha: &str, context: &str) -> Vec<Posted> {
        self.host.lock().unwrap().statuses.iter().filter(|p| p.sha == sha && p.context == context).cloned().collect()
    }

    pub fn assert_valid(&self) {
        let h = self.host.lock().unwrap();
        assert!(h.invalid.is_empty(), "requests Gitea would refuse: {:#?}", h.invalid);
    }
}

async fn post_status(
    State((host, _)): State<Shared>,
    Path((owner, repo, sha)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let mut h = host.lock().unwrap();
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    if auth != format!("token {TOKEN}") {
        h.invalid.push(format!("status with authorization {auth:?}"));
        return (StatusCode::UNAUTHORIZED, Json(serde_json::json!({"message": "token is required"}))).into_response();
    }
    let v: serde_json::Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => {
            h.invalid.push(format!("body is not JSON: {e}"));
            return StatusCode::UNPROCESSABLE_ENTITY.into_response();
        }
    };
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    let mut problems = Vec::new();
    if format!("{owner}/{repo}") != REPO {
        problems.push(format!("unknown repository {owner}/{repo}"));
    }
    if sha.len() != 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        problems.push(format!("{sha} is not a commit"));
    }
    // Gitea's CommitStatusState values.
    if !["pending", "success", "error", "failure", "warning"].contains(&s("state").as_str()) {
        problems.push(format!("state {:?}", s("state")));
    }
    if s("context").is_empty() {
        problems.push("no context".into());
    }
    let url = s("target_url");
    if !url.is_empty() && !url.starts_with("http://") && !url.starts_with("https://") {
        problems.push(format!("target_url {url:?}"));
    }
    if !problems.is_empty() {
        h.invalid.push(problems.join("; "));
        return StatusCode::UNPROCESSABLE_ENTITY.into_response();
    }
    h.statuses.push(Posted {
        sha,
        state: s("state"),
        context: s("context"),
        description: s("description"),
        target_url: url,
    });
    (StatusCode::CREATED, Json(serde_json::json!({"id": h.statuses.len()}))).into_response()
}

async fn git_file(
    State((host, root)): State<Shared>,
    Path((owner, repo, path)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    use base64::Engine;
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    let password = auth
        .strip_prefix("Basic ")
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .map(|b| String::from_utf8_lossy(&b).to_string())
        .and_then(|up| up.split_once(':').map(|(_, p)| p.to_string()));
    let ok = password.as_deref() == Some(TOKEN);
    host.lock().unwrap().git_requests.push((format!("{owner}/{repo}/{path}"), ok));
    if !ok {
        return (StatusCode::UNAUTHORIZED, [("WWW-Authenticate", "Basic realm=\"Gitea\"")]).into_response();
    }
    if [&owner, &repo].iter().any(|p| p.contains("..")) || path.split('/').any(|c| c == "..") {
        return StatusCode::NOT_FOUND.into_response();
    }
    match std::fs::read(root.join(&owner).join(&repo).join(&path)) {
        Ok(bytes) => bytes.into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Sends a webhook as Gitea does (or Forgejo, with its own headers).
pub async fn webhook(
    kiln_url: &str,
    forge: &str,
    forgejo: bool,
    event: &str,
    delivery: &str,
    body: &serde_json::Value,
    secret: &str,
) -> (u16, String) {
    let body = serde_json::to_vec(body).unwrap();
    let prefix = if forgejo { "X-Forgejo" } else { "X-Gitea" };
    let resp = reqwest::Client::new()
        .post(format!("{kiln_url}/api/webhooks/forge/{forge}"))
        .header(format!("{prefix}-Event"), event)
        .header(format!("{prefix}-Delivery"), delivery)
        .header(format!("{prefix}-Signature"), kiln::forge::sign(secret.as_bytes(), &body))
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}
