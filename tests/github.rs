//! GitHub, end to end, against a local stand-in for its REST API that
//! checks every request the way GitHub does (credentials, path, JSON
//! fields and their allowed values, the 140-character description) and can
//! answer with errors and rate limits, or not at all. Kiln is the real
//! binary, the flakes are real git repositories evaluated and built by the
//! real Nix.

mod support;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use support::*;

const TOKEN: &str = "ghp_kilntesttoken";
const SECRET: &str = "webhook-secret-1";
const REPO: &str = "acme/widgets";
const BASE: &str = "https://ci.example.org";

/// One status request as the stand-in saw it.
#[derive(Debug, Clone)]
struct Posted {
    sha: String,
    state: String,
    context: String,
    description: String,
    target_url: String,
    auth: String,
    /// What the stand-in answered.
    answered: u16,
}

#[derive(Default)]
struct Hub {
    statuses: Vec<Posted>,
    /// Requests GitHub would refuse, with why: every test asserts none.
    invalid: Vec<String>,
    /// Answers to give before accepting: (status, headers).
    script: VecDeque<(u16, Vec<(&'static str, String)>)>,
    /// App: installation tokens minted, and the app's public key.
    minted: Vec<String>,
    app_public_pem: Option<String>,
    token_lifetime_s: i64,
    /// Repositories (`owner/name`) whose status requests are taken and
    /// never answered, as by a connection that hangs; and how many came.
    hang: Vec<String>,
    hung: usize,
}

#[derive(Clone)]
struct Fake {
    hub: Arc<Mutex<Hub>>,
    url: String,
    _task: Arc<tokio::task::JoinHandle<()>>,
}

impl Fake {
    async fn start() -> Fake {
        Self::start_on("http://127.0.0.1:0").await
    }

    /// On a given `http://host:port` (to come back where Kiln expects GitHub).
    async fn start_on(url: &str) -> Fake {
        let addr = url.strip_prefix("http://").unwrap().to_string();
        let hub = Arc::new(Mutex::new(Hub { token_lifetime_s: 3600, ..Default::default() }));
        let app = axum::Router::new()
            .route("/repos/{owner}/{repo}/statuses/{sha}", axum::routing::post(post_status))
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

    fn statuses(&self) -> Vec<Posted> {
        self.hub.lock().unwrap().statuses.clone()
    }

    /// Accepted statuses for a commit and context, in order.
    fn accepted(&self, sha: &str, context: &str) -> Vec<Posted> {
        self.statuses().into_iter().filter(|p| p.sha == sha && p.context == context && p.answered == 201).collect()
    }

    fn assert_valid(&self) {
        let h = self.hub.lock().unwrap();
        assert!(h.invalid.is_empty(), "requests GitHub would refuse: {:#?}", h.invalid);
    }
}

fn check_auth(hub: &Hub, headers: &HeaderMap) -> Result<String, String> {
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

async fn post_status(
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

/// Checks a GitHub App's JWT: RS256, signed by the app's key, iss = app id.
fn check_app_jwt(h: &Hub, headers: &HeaderMap) -> Result<(), String> {
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

async fn mint(State(hub): State<Arc<Mutex<Hub>>>, Path(id): Path<u64>, headers: HeaderMap) -> Response {
    let mut h = hub.lock().unwrap();
    if let Err(e) = check_app_jwt(&h, &headers) {
        h.invalid.push(e);
        return (StatusCode::UNAUTHORIZED, "bad JWT").into_response();
    }
    if id != 77 {
        h.invalid.push(format!("installation {id}"));
        return StatusCode::NOT_FOUND.into_response();
    }
    let token = format!("ghs_minted{}", h.minted.len() + 1);
    h.minted.push(token.clone());
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

async fn installation(
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

// ------------------------------------------------------------------ set-up

/// A flake whose `slow` job builds until the test opens its gate.
struct Project {
    flake: Flake,
    gate: std::path::PathBuf,
    _gate_dir: tempfile::TempDir,
}

fn project(kiln_toml_jobsets: &str) -> Project {
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("open");
    let t = unique("gh");
    let flake = Flake::new(
        &format!(
            r#"{{ outputs = _: {{ hydraJobs = {{ ok = {}; bad = {}; slow = {}; }}; }}; }}"#,
            drv_expr(&format!("ok-{t}"), "echo fine; echo > $out"),
            drv_expr(&format!("bad-{t}"), "echo broken; exit 1"),
            drv_expr(
                &format!("slow-{t}"),
                &format!(
                    "export PATH=/usr/bin:/bin; while [ ! -e {} ]; do sleep 0.1; done; echo > $out",
                    gate.display()
                )
            ),
        ),
        &[(".kiln.toml", kiln_toml_jobsets)],
    );
    Project { flake, gate, _gate_dir: gate_dir }
}

/// A flake with one quick job, `ok`, evaluated only when triggered; and its commit.
fn one_job_flake(tag: &str) -> (Flake, String) {
    let t = unique(tag);
    let flake = Flake::new(
        &format!(
            r#"{{ outputs = _: {{ hydraJobs = {{ ok = {}; }}; }}; }}"#,
            drv_expr(&format!("ok-{t}"), "echo > $out")
        ),
        &[(".kiln.toml", "[jobsets.main]\ncheck_interval = 0\n")],
    );
    let sha = git(flake.path(), &["rev-parse", "HEAD"]).trim().to_string();
    (flake, sha)
}

fn kiln_dir(fake_url: &str, repo: &std::path::Path, github_extra: &str) -> tempfile::TempDir {
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
async fn webhook(
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

fn push_body(sha: &str) -> serde_json::Value {
    serde_json::json!({
        "ref": "refs/heads/main", "before": "0".repeat(40), "after": sha,
        "repository": {"full_name": REPO, "default_branch": "main"},
    })
}

async fn evals(api: &Api, jobset: &str) -> Vec<serde_json::Value> {
    api.get(&format!("/jobset/w/{jobset}/evals")).await.1["evals"].as_array().cloned().unwrap_or_default()
}

/// Waits until the stand-in has accepted a status in `state` for each
/// context; on a timeout, says what GitHub and Kiln saw.
async fn wait_states(fake: &Fake, kiln: &Kiln, sha: &str, want: &[(&str, &str)], secs: u64) {
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

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn a_signed_push_evaluates_and_github_gets_pending_then_final_statuses_per_job_and_summary() {
    let fake = Fake::start().await;
    let p = project("[jobsets.main]\ncheck_interval = 0\n");
    let dir = kiln_dir(&fake.url, p.flake.path(), "token_file = \"gh-token\"");
    let kiln = Kiln::start_in(dir, &[]);
    let api = Api::new(&kiln.url, None);
    // The new jobset is evaluated once at once; the push brings the next commit.
    let first = wait_for(60, "the first evaluation", || async { evals(&api, "main").await.first().cloned() }).await;
    p.flake.write("README", "a change\n");
    let sha = p.flake.commit("second");
    assert_ne!(first["commit"].as_str(), Some(sha.as_str()));

    // Bad signatures, missing ones, malformed bodies and unused events change nothing.
    let body = push_body(&sha);
    assert_eq!(webhook(&kiln, "push", "d-1", &body, Some("wrong-secret")).await.0, 401);
    assert_eq!(webhook(&kiln, "push", "d-1", &body, None).await.0, 401);
    let raw = b"{not json".to_vec();
    let signed = kiln::github::webhook::sign(SECRET.as_bytes(), &raw);
    let r = reqwest::Client::new()
        .post(format!("{}/api/webhooks/github", kiln.url))
        .header("X-GitHub-Event", "push")
        .header("X-GitHub-Delivery", "d-2")
        .header("X-Hub-Signature-256", signed)
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert_eq!(webhook(&kiln, "issues", "d-3", &serde_json::json!({"action": "opened"}), Some(SECRET)).await.0, 204);
    let big = serde_json::json!({"ref": "refs/heads/main", "pad": "x".repeat(6 * 1024 * 1024), "repository": {"full_name": REPO}});
    assert_eq!(webhook(&kiln, "push", "d-4", &big, Some(SECRET)).await.0, 413);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(evals(&api, "main").await.len(), 1, "nothing was evaluated");

    // A ping is answered; a push to an unknown repository is acknowledged and ignored.
    assert_eq!(webhook(&kiln, "ping", "d-5", &serde_json::json!({"zen": "hi"}), Some(SECRET)).await.0, 200);
    let other = serde_json::json!({"ref": "refs/heads/main", "repository": {"full_name": "acme/other", "default_branch": "main"}});
    let (code, text) = webhook(&kiln, "push", "d-6", &other, Some(SECRET)).await;
    assert_eq!((code, text.contains("\"triggered\":[]")), (200, true), "{text}");

    // The signed push starts an evaluation of the pushed commit, now.
    let (code, text) = webhook(&kiln, "push", "d-7", &body, Some(SECRET)).await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("w:main"), "{text}");
    // A redelivery does nothing twice.
    let (code, text) = webhook(&kiln, "push", "d-7", &body, Some(SECRET)).await;
    assert_eq!((code, text.contains("\"duplicate\":true")), (200, true), "{text}");
    let eval = wait_for(60, "the pushed commit's evaluation", || async {
        evals(&api, "main").await.into_iter().find(|e| e["commit"] == sha.as_str())
    })
    .await;
    let eval_id = eval["id"].as_i64().unwrap();

    // While `slow` builds: everything pending, and `bad` already failed.
    wait_states(
        &fake,
        &kiln,
        &sha,
        &[("kiln/main", "pending"), ("kiln/main/slow", "pending"), ("kiln/main/bad", "failure")],
        90,
    )
    .await;
    std::fs::write(&p.gate, "").unwrap();
    wait_states(
        &fake,
        &kiln,
        &sha,
        &[
            ("kiln/main", "failure"),
            ("kiln/main/ok", "success"),
            ("kiln/main/bad", "failure"),
            ("kiln/main/slow", "success"),
        ],
        90,
    )
    .await;
    fake.assert_valid();

    for ctx in ["kiln/main", "kiln/main/slow"] {
        let states: Vec<String> = fake.accepted(&sha, ctx).iter().map(|p| p.state.clone()).collect();
        assert_eq!(states.first().map(String::as_str), Some("pending"), "{ctx}: {states:?}");
        let first_final = states.iter().position(|s| s != "pending").unwrap();
        assert!(states[first_final..].iter().all(|s| s != "pending"), "{ctx}: pending after a result: {states:?}");
    }
    let summary = fake.accepted(&sha, "kiln/main").last().cloned().unwrap();
    assert_eq!(summary.target_url, format!("{BASE}/eval/{eval_id}"));
    assert_eq!(summary.description, "2 succeeded, 1 failed");
    assert_eq!(summary.auth, TOKEN);
    let bad = fake.accepted(&sha, "kiln/main/bad").last().cloned().unwrap();
    assert!(bad.target_url.starts_with(&format!("{BASE}/build/")), "{}", bad.target_url);
    assert!(bad.description.contains("failed"), "{}", bad.description);
    // Each context's final state arrived once.
    for ctx in ["kiln/main/ok", "kiln/main/bad", "kiln/main/slow", "kiln/main"] {
        let n = fake.accepted(&sha, ctx).iter().filter(|p| p.state != "pending").count();
        assert_eq!(n, 1, "{ctx}: {:?}", fake.accepted(&sha, ctx));
    }
    // The first commit got its statuses too, and the stranger's nothing.
    assert!(fake.statuses().iter().any(|p| Some(p.sha.as_str()) == first["commit"].as_str()));
    assert!(kiln.log().contains("webhook refused"));
}

#[tokio::test]
async fn pull_requests_get_their_own_jobset_and_statuses_on_each_head_and_closing_disables_it() {
    let fake = Fake::start().await;
    let p = project("[jobsets.main]\ncheck_interval = 0\n[jobsets.pulls]\npull_requests = true\ncheck_interval = 0\n");
    std::fs::write(&p.gate, "").unwrap();
    let dir = kiln_dir(&fake.url, p.flake.path(), "token_file = \"gh-token\"\nstatuses = \"summary\"");
    let kiln = Kiln::start_in(dir, &[]);
    let api = Api::new(&kiln.url, None);
    wait_for(60, "the main evaluation", || async { evals(&api, "main").await.first().cloned() }).await;

    // A pull request's head lives at refs/pull/7/head on GitHub; here too.
    let base = git(p.flake.path(), &["rev-parse", "HEAD"]).trim().to_string();
    git(p.flake.path(), &["checkout", "-q", "-b", "feature"]);
    p.flake.write("feature.txt", "one\n");
    // A fork may rewrite .kiln.toml: it must not count.
    p.flake.write(
        ".kiln.toml",
        "[jobsets.pulls]\npull_requests = true\nattributes = [\"packages\"]\ncheck_interval = 5\n",
    );
    let head1 = p.flake.commit("feature one");
    git(p.flake.path(), &["update-ref", "refs/pull/7/head", &head1]);
    git(p.flake.path(), &["checkout", "-q", "main"]);
    let pr = |action: &str, head: &str| {
        serde_json::json!({
            "action": action, "number": 7,
            "pull_request": {"number": 7, "head": {"sha": head, "ref": "feature"}, "base": {"sha": base}},
            "repository": {"full_name": REPO, "default_branch": "main"},
        })
    };
    let (code, text) = webhook(&kiln, "pull_request", "pr-1", &pr("opened", &head1), Some(SECRET)).await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("w:pr-7"), "{text}");
    wait_states(&fake, &kiln, &head1, &[("kiln/pr-7", "failure")], 90).await;
    let e = evals(&api, "pr-7").await;
    assert_eq!(e.first().unwrap()["commit"], head1.as_str());
    assert_eq!(e.first().unwrap()["nrjobs"], 3, "the default branch's settings: hydraJobs");
    let (_, j) = api.get("/jobset/w/pr-7").await;
    assert_eq!(
        (j["attributes"].clone(), j["checkinterval"].clone()),
        (serde_json::json!(["hydraJobs"]), serde_json::json!(0))
    );

    // Synchronised: the new head is evaluated and gets its own statuses.
    git(p.flake.path(), &["checkout", "-q", "feature"]);
    p.flake.write("feature.txt", "two\n");
    let head2 = p.flake.commit("feature two");
    git(p.flake.path(), &["update-ref", "refs/pull/7/head", &head2]);
    git(p.flake.path(), &["checkout", "-q", "main"]);
    assert_eq!(webhook(&kiln, "pull_request", "pr-2", &pr("synchronize", &head2), Some(SECRET)).await.0, 200);
    wait_states(&fake, &kiln, &head2, &[("kiln/pr-7", "failure")], 90).await;
    // Summary mode: no per-job contexts.
    assert!(fake.statuses().iter().all(|s| !s.context.starts_with("kiln/pr-7/")), "{:?}", fake.statuses());

    // Closed: the jobset is disabled.
    let (code, text) = webhook(&kiln, "pull_request", "pr-3", &pr("closed", &head2), Some(SECRET)).await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("\"disabled\":[\"w:pr-7\"]"), "{text}");
    let (_, j) = api.get("/jobset/w/pr-7").await;
    assert_eq!(j["enabled"], 0, "{j}");
    fake.assert_valid();
}

#[tokio::test]
async fn a_status_arrives_exactly_once_through_a_500_and_a_429() {
    let fake = Fake::start().await;
    fake.hub.lock().unwrap().script = VecDeque::from([(500, vec![]), (429, vec![("retry-after", "1".to_string())])]);
    let (flake, sha) = one_job_flake("ret");
    let dir = kiln_dir(&fake.url, flake.path(), "token_file = \"gh-token\"\nstatuses = \"summary\"");
    let kiln = Kiln::start_in(dir, &[]);
    wait_states(&fake, &kiln, &sha, &[("kiln/main", "success")], 90).await;
    let all: Vec<Posted> = fake.statuses().into_iter().filter(|p| p.sha == sha).collect();
    let answered: Vec<u16> = all.iter().map(|p| p.answered).collect();
    assert_eq!(&answered[..2], &[500, 429], "{all:?}");
    assert_eq!(fake.accepted(&sha, "kiln/main").iter().filter(|p| p.state == "success").count(), 1);
    assert!(kiln.log().contains("rate limit"), "the wait is logged");
    fake.assert_valid();
}

#[tokio::test]
async fn statuses_waiting_when_kiln_is_killed_are_delivered_after_a_restart() {
    // GitHub is down (nothing listens) while Kiln evaluates and builds.
    let down = format!("http://127.0.0.1:{}", free_port());
    let (flake, sha) = one_job_flake("rs");
    let dir = kiln_dir(&down, flake.path(), "token_file = \"gh-token\"");
    let mut kiln = Kiln::start_in(dir, &[]);
    let api = Api::new(&kiln.url, None);
    wait_for(90, "the build", || async {
        let e = evals(&api, "main").await.first().cloned()?;
        let (_, d) = api.get(&format!("/eval/{}", e["id"])).await;
        let b = d["jobs"]["ok"].as_i64()?;
        (api.get(&format!("/build/{b}")).await.1["finished"] == 1).then_some(())
    })
    .await;
    let (_, m) = api.get("/machines").await;
    assert!(m["outbox"]["pending"].as_i64().unwrap() >= 2, "statuses wait: {m}");
    kiln.child.kill().unwrap();
    kiln.child.wait().unwrap();

    // GitHub is back, on the same address, and so is Kiln.
    let fake = Fake::start_on(&down).await;
    let dir = std::mem::replace(&mut kiln.dir, tempfile::tempdir().unwrap());
    let kiln = Kiln::start_in(dir, &[]);
    wait_states(&fake, &kiln, &sha, &[("kiln/main", "success"), ("kiln/main/ok", "success")], 60).await;
    fake.assert_valid();
    let api = Api::new(&kiln.url, None);
    wait_for(10, "an empty outbox", || async {
        (api.get("/machines").await.1["outbox"]["pending"] == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_github_app_mints_installation_tokens_and_refreshes_them_before_they_expire() {
    let fake = Fake::start().await;
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("app.pem");
    run(
        "openssl",
        &["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", key.to_str().unwrap()],
        keys.path(),
    );
    let public = run("openssl", &["pkey", "-in", key.to_str().unwrap(), "-pubout"], keys.path());
    {
        let mut h = fake.hub.lock().unwrap();
        h.app_public_pem = Some(public);
        // octocrab renews a token 30 s before it expires: this one, 3 s after.
        h.token_lifetime_s = 33;
    }
    let (flake, sha1) = one_job_flake("app");
    let dir = kiln_dir(
        &fake.url,
        flake.path(),
        &format!("app_id = 4242\napp_private_key_file = \"{}\"\nstatuses = \"summary\"", key.display()),
    );
    let kiln = Kiln::start_in(dir, &[]);
    wait_states(&fake, &kiln, &sha1, &[("kiln/main", "success")], 90).await;
    let first = fake.accepted(&sha1, "kiln/main").last().cloned().unwrap();
    // An installation token (on a slow machine it may already be the
    // second: this one lives 3 s before octocrab renews it).
    assert!(first.auth.starts_with("ghs_minted"), "statuses are sent with an installation token: {}", first.auth);
    let minted_first = fake.hub.lock().unwrap().minted.len();

    tokio::time::sleep(Duration::from_secs(4)).await;
    flake.write("README", "more\n");
    let sha2 = flake.commit("second");
    assert_eq!(webhook(&kiln, "push", "app-1", &push_body(&sha2), Some(SECRET)).await.0, 200);
    wait_states(&fake, &kiln, &sha2, &[("kiln/main", "success")], 90).await;
    let later = fake.accepted(&sha2, "kiln/main").last().cloned().unwrap();
    let minted = fake.hub.lock().unwrap().minted.clone();
    assert!(minted.len() > minted_first, "the token was refreshed: {minted:?}");
    assert_eq!(later.auth, *minted.last().unwrap());
    fake.assert_valid();
}

/// A private repository over HTTP (git's dumb protocol, from a static
/// server that wants GitHub's token form), like a private GitHub repository.
struct PrivateRepo {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for PrivateRepo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn private_repo(source: &std::path::Path, token: &str) -> PrivateRepo {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("widgets.git");
    run("git", &["clone", "-q", "--bare", source.to_str().unwrap(), bare.to_str().unwrap()], dir.path());
    run("git", &["update-server-info"], &bare);
    let want = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}")));
    let port = free_port();
    let script = format!(
        r#"
import http.server, functools
class H(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.headers.get("Authorization") != {want:?}:
            self.send_response(401); self.send_header("WWW-Authenticate", 'Basic realm="GitHub"'); self.end_headers(); return
        super().do_GET()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", {port}), functools.partial(H, directory={dir:?})).serve_forever()
"#,
        dir = dir.path().display().to_string()
    );
    let child = std::process::Command::new("python3").args(["-c", &script]).spawn().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "the private repository server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    PrivateRepo { child, url: format!("http://127.0.0.1:{port}/widgets.git"), _dir: dir }
}

#[tokio::test]
async fn a_private_repository_is_fetched_with_the_token_which_is_written_nowhere() {
    use base64::Engine;
    let fake = Fake::start().await;
    let (flake, sha) = one_job_flake("priv");
    let repo = private_repo(flake.path(), TOKEN);

    // Without credentials the repository cannot be read, and the project says so.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!("[[projects]]\nname = \"w\"\nrepo = \"{}\"\ngithub = \"{REPO}\"\n", repo.url),
    )
    .unwrap();
    let anon = Kiln::start_in(dir, &[]);
    let api = Api::new(&anon.url, None);
    let err = wait_for(60, "the project's fetch error", || async {
        api.get("/project/w").await.1["error"].as_str().map(str::to_string)
    })
    .await;
    assert!(err.contains("git"), "{err}");
    drop(anon);

    // With them it is evaluated and built.
    let dir = kiln_dir(&fake.url, std::path::Path::new(&repo.url), "token_file = \"gh-token\"\nstatuses = \"summary\"");
    let state = dir.path().to_path_buf();
    let kiln = Kiln::start_in(dir, &[]);
    wait_states(&fake, &kiln, &sha, &[("kiln/main", "success")], 90).await;

    // The token is nowhere on disk or in the log.
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{TOKEN}"));
    let mirror_config = std::fs::read_to_string(state.join("kiln-state/git/w.git/config")).unwrap();
    assert!(!mirror_config.contains(TOKEN) && !mirror_config.contains(&b64), "{mirror_config}");
    let mut db = std::fs::read(state.join("kiln-state/kiln.db")).unwrap();
    db.extend(std::fs::read(state.join("kiln-state/kiln.db-wal")).unwrap_or_default());
    let contains = |hay: &[u8], needle: &str| hay.windows(needle.len()).any(|w| w == needle.as_bytes());
    assert!(!contains(&db, TOKEN) && !contains(&db, &b64), "the token is in the database");
    let log = kiln.log();
    assert!(!log.contains(TOKEN) && !log.contains(&b64), "the token is in the log");
    fake.assert_valid();
}

#[tokio::test]
async fn a_github_that_never_answers_fails_the_delivery_after_the_timeout_and_the_next_one_goes_through() {
    use kiln::db::outbox;
    use kiln::github::statuses::{KIND, Status};
    let fake = Fake::start().await;
    fake.hub.lock().unwrap().hang = vec!["acme/stuck".into()];
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gh-token"), TOKEN).unwrap();
    let gh = kiln::config::GithubConfig {
        api_url: fake.url.clone(),
        token_file: Some(dir.path().join("gh-token")),
        timeout_s: 1,
        ..Default::default()
    };
    let creds = kiln::github::Credentials::from_config(&gh).unwrap().unwrap();
    let fake = &fake;
    let creds = &creds;
    each_backend(|db| async move {
        let status = |repo: &str, sha: String| Status {
            owner: "acme".into(),
            repo: repo.into(),
            sha,
            state: "success".into(),
            context: "kiln/main".into(),
            description: "1 succeeded".into(),
            target_url: format!("{BASE}/eval/1"),
        };
        // The stuck repository's status is older, so it is sent first.
        let stuck = status("stuck", format!("{:040x}", getrandom::u64().unwrap()));
        let fine = status("widgets", format!("{:040x}", getrandom::u64().unwrap()));
        {
            let mut c = db.conn().await.unwrap();
            for s in [&stuck, &fine] {
                let payload = serde_json::to_string(s).unwrap();
                outbox::enqueue(c.ex(), KIND, &s.target(), &s.context, &payload).await.unwrap();
            }
        }
        let hung_before = fake.hub.lock().unwrap().hung;
        let mut paused = 0;
        // Without a timeout the first request waits for ever, and so does the second.
        let tried =
            tokio::time::timeout(Duration::from_secs(20), kiln::github::sender::send_due(&db, creds, &mut paused))
                .await
                .expect("a GitHub that never answers held up the outbox")
                .unwrap();
        assert_eq!(tried, 2);
        assert_eq!(fake.hub.lock().unwrap().hung, hung_before + 1, "the stuck request reached GitHub and hung there");

        let mut c = db.conn().await.unwrap();
        let m = outbox::for_target(c.ex(), &stuck.target()).await.unwrap();
        assert_eq!(m.len(), 1);
        let m = &m[0];
        assert!(m.delivered_at.is_none() && m.given_up_at.is_none(), "{m:?}");
        assert_eq!(m.attempts, 1, "{m:?}");
        assert!(m.next_attempt_at > kiln::db::now(), "retried later, after the backoff: {m:?}");
        assert!(m.last_error.as_deref().is_some_and(|e| !e.is_empty()), "{m:?}");
        let d = outbox::for_target(c.ex(), &fine.target()).await.unwrap();
        assert!(d[0].delivered_at.is_some(), "{d:?}");
        assert_eq!(fake.accepted(&fine.sha, "kiln/main").len(), 1);
    })
    .await;
    fake.assert_valid();
}
