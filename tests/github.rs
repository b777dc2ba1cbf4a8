//! GitHub, end to end, against a local stand-in for its REST API that
//! checks every request the way GitHub does (credentials, path, JSON
//! fields and their allowed values, the 140-character description) and can
//! answer with errors and rate limits, or not at all. Kiln is the real
//! binary, the flakes are real git repositories evaluated and built by the
//! real Nix.

mod support;

use std::collections::VecDeque;
use std::time::Duration;

use support::github::*;
use support::*;

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

async fn evals(api: &Api, jobset: &str) -> Vec<serde_json::Value> {
    api.get(&format!("/jobset/w/{jobset}/evals")).await.1["evals"].as_array().cloned().unwrap_or_default()
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
            "pull_request": {"number": 7, "head": {"sha": head, "ref": "feature"}, "base": {"sha": base},
                             "user": {"login": "alice"}, "author_association": "MEMBER"},
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
        &format!("app_id = 4242\napp_private_key_file = \"{}\"\nstatuses = \"summary\"\nchecks = false", key.display()),
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
/// It writes each token it accepted to `tokens.log`.
struct PrivateRepo {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl PrivateRepo {
    /// Brings every ref of `source` over, as a push to GitHub would.
    fn update(&self, source: &std::path::Path) {
        let bare = self._dir.path().join("widgets.git");
        run("git", &["fetch", "-q", "--force", source.to_str().unwrap(), "+refs/*:refs/*"], &bare);
        run("git", &["update-server-info"], &bare);
    }

    fn tokens(&self) -> Vec<String> {
        std::fs::read_to_string(self._dir.path().join("tokens.log"))
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

impl Drop for PrivateRepo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves `source` privately: a request must carry `token`, or with
/// `prefix`, any token that starts with it (an App's minted ones).
fn private_repo(source: &std::path::Path, token: &str) -> PrivateRepo {
    private_repo_for(source, token, false)
}

fn private_repo_for(source: &std::path::Path, token: &str, prefix: bool) -> PrivateRepo {
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("widgets.git");
    run("git", &["clone", "-q", "--bare", source.to_str().unwrap(), bare.to_str().unwrap()], dir.path());
    run("git", &["update-server-info"], &bare);
    let port = free_port();
    let log = dir.path().join("tokens.log");
    let script = format!(
        r#"
import http.server, functools, base64
def accepted(header):
    if not header or not header.startswith("Basic "): return None
    user, _, tok = base64.b64decode(header[6:]).decode().partition(":")
    ok = user == "x-access-token" and (tok.startswith({token:?}) if {prefix} else tok == {token:?})
    return tok if ok else None
class H(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        tok = accepted(self.headers.get("Authorization"))
        if tok is None:
            self.send_response(401); self.send_header("WWW-Authenticate", 'Basic realm="GitHub"'); self.end_headers(); return
        with open({log:?}, "a") as f: f.write(tok + "\n")
        super().do_GET()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", {port}), functools.partial(H, directory={dir:?})).serve_forever()
"#,
        dir = dir.path().display().to_string(),
        prefix = if prefix { "True" } else { "False" },
        log = log.display().to_string(),
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
    let fake = &fake;
    let gh = &gh;
    each_backend(|db| async move {
        // A client of its own per backend: a connection the other run's
        // hung request left in the pool failed the next request at once
        // (SendRequest) instead of hanging it, once in CI.
        let creds = kiln::github::Credentials::from_config(gh).unwrap().unwrap();
        let creds = &creds;
        let status = |repo: &str, sha: String| Status {
            forge: None,
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
        let before = kiln::db::now();
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
        // Timestamps are whole seconds and the first backoff is one: the
        // failure is marked at least a second (the timeout) after `before`,
        // so the retry is due no sooner than two. Comparing with the clock
        // after the call raced the backoff running out.
        assert!(m.next_attempt_at >= before + 2, "retried later, after the timeout and the backoff: {m:?}");
        assert!(m.last_error.as_deref().is_some_and(|e| !e.is_empty()), "{m:?}");
        let d = outbox::for_target(c.ex(), &fine.target()).await.unwrap();
        assert!(d[0].delivered_at.is_some(), "{d:?}");
        assert_eq!(fake.accepted(&fine.sha, "kiln/main").len(), 1);
    })
    .await;
    fake.assert_valid();
}

#[tokio::test]
async fn an_outside_contributors_pull_request_is_not_fetched_until_approved_then_built_with_a_scoped_token() {
    let fake = Fake::start().await;
    let (_keys, key) = app_key(&fake);
    let t = unique("gate");
    let flake = Flake::new(
        &format!(
            r#"{{ outputs = _: {{ hydraJobs = {{ ok = {}; }}; }}; }}"#,
            drv_expr(&format!("ok-{t}"), "echo > $out")
        ),
        &[(
            ".kiln.toml",
            "[jobsets.main]\ncheck_interval = 0\n[jobsets.pulls]\npull_requests = true\ncheck_interval = 0\n",
        )],
    );
    let repo = private_repo_for(flake.path(), "ghs_minted", true);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gh-secret"), SECRET).unwrap();
    std::fs::write(dir.path().join("token"), "admin-tok\n").unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "base_url = \"{BASE}\"\napi_token_files = [\"token\"]\n[github]\napi_url = \"{}\"\n\
             webhook_secret_file = \"gh-secret\"\napp_id = 4242\napp_private_key_file = \"{}\"\nstatuses = \"summary\"\nchecks = false\n\
             [[projects]]\nname = \"w\"\nrepo = \"{}\"\ngithub = \"{REPO}\"\n",
            fake.url,
            key.display(),
            repo.url
        ),
    )
    .unwrap();
    let state = dir.path().join("kiln-state");
    let kiln = Kiln::start_in(dir, &[]);
    let api = Api::new(&kiln.url, Some("admin-tok"));
    wait_for(90, "the main evaluation", || async { evals(&api, "main").await.first().cloned() }).await;

    // Mallory, who has no write access, opens a pull request from a fork:
    // on GitHub her commit is reachable from refs/pull/8/head only.
    git(flake.path(), &["checkout", "-q", "--detach"]);
    flake.write("feature.txt", "one\n");
    let head1 = flake.commit("mallory's change");
    git(flake.path(), &["update-ref", "refs/pull/8/head", &head1]);
    git(flake.path(), &["checkout", "-q", "main"]);
    repo.update(flake.path());
    let pr = |action: &str, number: i64, head: &str, who: &str, association: &str| {
        serde_json::json!({
            "action": action, "number": number,
            "pull_request": {"number": number, "head": {"sha": head, "ref": "fork"}, "user": {"login": who},
                             "author_association": association},
            "repository": {"full_name": REPO, "default_branch": "main"},
        })
    };
    let (code, text) =
        webhook(&kiln, "pull_request", "gate-1", &pr("opened", 8, &head1, "mallory", "CONTRIBUTOR"), Some(SECRET))
            .await;
    assert_eq!(code, 200, "{text}");
    let applied: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(applied["awaiting_approval"], serde_json::json!(["w:pr-8"]), "{text}");
    assert_eq!(applied["triggered"], serde_json::json!([]), "{text}");
    // GitHub shows the pull request as waiting, with a link to approve it.
    wait_states(&fake, &kiln, &head1, &[("kiln/pr-8", "pending")], 30).await;
    let waiting = fake.accepted(&head1, "kiln/pr-8").last().cloned().unwrap();
    assert!(
        waiting.description.contains("Waiting for approval") && waiting.description.contains("mallory"),
        "{waiting:?}"
    );
    assert_eq!(waiting.target_url, format!("{BASE}/jobset/w/pr-8"));

    // Even a forced evaluation fetches nothing of it.
    assert_eq!(api.send("POST", "/jobset/w/pr-8/trigger", None).await.0, 200);
    let j = wait_for(30, "the jobset to say it waits", || async {
        let (_, j) = api.get("/jobset/w/pr-8").await;
        j["errormsg"].as_str().is_some_and(|e| e.contains("waiting for approval")).then_some(j)
    })
    .await;
    assert_eq!(j["pullrequest"]["awaitingapproval"], true, "{j}");
    assert_eq!(j["pullrequest"]["author"], "mallory", "{j}");
    assert!(evals(&api, "pr-8").await.is_empty());
    let mirror = state.join("git/w.git");
    let refs = git(&mirror, &["for-each-ref", "--format=%(refname)"]);
    assert!(!refs.contains("pull"), "the pull request was fetched: {refs}");
    let has_head = std::process::Command::new("git")
        .args(["cat-file", "-e", &format!("{head1}^{{commit}}")])
        .current_dir(&mirror)
        .status()
        .unwrap();
    assert!(!has_head.success(), "the fork's commit is in the mirror");
    // The page says so, with the button.
    let page = reqwest::get(format!("{}/jobset/w/pr-8", kiln.url)).await.unwrap().text().await.unwrap();
    assert!(page.contains("Waiting for approval") && page.contains("/jobset/w/pr-8/approve"), "{page}");
    // Approving needs a token.
    assert_eq!(Api::new(&kiln.url, None).send("POST", "/jobset/w/pr-8/approve", None).await.0, 401);

    // A maintainer approves: it is fetched, evaluated and built.
    assert_eq!(api.send("POST", "/jobset/w/pr-8/approve", None).await.0, 200);
    wait_states(&fake, &kiln, &head1, &[("kiln/pr-8", "success")], 90).await;
    let (_, j) = api.get("/jobset/w/pr-8").await;
    assert_eq!(j["pullrequest"]["awaitingapproval"], false, "{j}");
    assert_eq!(j["pullrequest"]["approvedat"], head1.as_str(), "{j}");

    // The approval covers the next push (the template does not ask for one per push).
    git(flake.path(), &["checkout", "-q", &head1]);
    flake.write("feature.txt", "two\n");
    let head2 = flake.commit("mallory's second change");
    git(flake.path(), &["update-ref", "refs/pull/8/head", &head2]);
    git(flake.path(), &["checkout", "-q", "main"]);
    repo.update(flake.path());
    let (_, text) =
        webhook(&kiln, "pull_request", "gate-2", &pr("synchronize", 8, &head2, "mallory", "CONTRIBUTOR"), Some(SECRET))
            .await;
    assert!(text.contains("\"triggered\":[\"w:pr-8\"]"), "{text}");
    wait_states(&fake, &kiln, &head2, &[("kiln/pr-8", "success")], 90).await;

    // A member's pull request needs no approval.
    let (_, text) =
        webhook(&kiln, "pull_request", "gate-3", &pr("opened", 9, &head2, "alice", "MEMBER"), Some(SECRET)).await;
    assert!(text.contains("\"triggered\":[\"w:pr-9\"]") && text.contains("\"awaiting_approval\":[]"), "{text}");

    // Fetching used tokens scoped to this one repository, read-only.
    let scoped = fake.hub.lock().unwrap().scoped.clone();
    assert!(!scoped.is_empty(), "no scoped token was minted");
    for (_, repos, perms) in &scoped {
        assert_eq!((repos.as_slice(), perms), (&["widgets".to_string()][..], &serde_json::json!({"contents": "read"})));
    }
    let used = repo.tokens();
    assert!(!used.is_empty());
    for tok in &used {
        assert!(scoped.iter().any(|(t, ..)| t == tok), "git fetched with {tok}, not a scoped token: {scoped:?}");
    }
    fake.assert_valid();
}

#[tokio::test]
async fn a_merge_group_is_evaluated_on_its_queue_branch_and_reported_under_the_templates_name() {
    let fake = Fake::start().await;
    let t = unique("mq");
    let flake = Flake::new(
        &format!(
            r#"{{ outputs = _: {{ hydraJobs = {{ ok = {}; }}; }}; }}"#,
            drv_expr(&format!("ok-{t}"), "echo > $out")
        ),
        &[(".kiln.toml", "[jobsets.main]\ncheck_interval = 0\n[jobsets.queue]\nmerge_queue = true\n")],
    );
    let base = git(flake.path(), &["rev-parse", "HEAD"]).trim().to_string();
    let dir = kiln_dir(&fake.url, flake.path(), "token_file = \"gh-token\"\nstatuses = \"summary\"");
    let kiln = Kiln::start_in(dir, &[]);
    let api = Api::new(&kiln.url, None);
    wait_for(60, "the main evaluation", || async { evals(&api, "main").await.first().cloned() }).await;

    // GitHub makes the group's commit on a read-only branch, then asks for checks.
    let branch = format!("gh-readonly-queue/main/pr-5-{base}");
    git(flake.path(), &["checkout", "-q", "-b", &branch]);
    flake.write("queued.txt", "pr 5\n");
    let head = flake.commit("Merge pull request #5");
    git(flake.path(), &["checkout", "-q", "main"]);
    let group = |action: &str| {
        serde_json::json!({
            "action": action,
            "merge_group": {"head_sha": head, "head_ref": format!("refs/heads/{branch}"), "base_sha": base,
                            "base_ref": "refs/heads/main"},
            "repository": {"full_name": REPO, "default_branch": "main"},
        })
    };
    let (code, text) = webhook(&kiln, "merge_group", "mq-1", &group("checks_requested"), Some(SECRET)).await;
    assert_eq!(code, 200, "{text}");
    let applied: serde_json::Value = serde_json::from_str(&text).unwrap();
    let name = applied["triggered"][0].as_str().unwrap().strip_prefix("w:").unwrap().to_string();
    assert!(name.starts_with("queue-5-"), "{text}");
    // Reported on the group's commit as kiln/queue, whatever the group.
    wait_states(&fake, &kiln, &head, &[("kiln/queue", "success")], 90).await;
    let e = evals(&api, &name).await;
    assert_eq!(e.first().unwrap()["commit"], head.as_str());
    assert!(fake.statuses().iter().all(|s| !s.context.contains(&name)), "{:?}", fake.statuses());
    // The template itself is never evaluated.
    assert!(evals(&api, "queue").await.is_empty());

    // Merged or dequeued: the group's jobset is disabled.
    let (_, text) = webhook(&kiln, "merge_group", "mq-2", &group("destroyed"), Some(SECRET)).await;
    assert!(text.contains(&format!("\"disabled\":[\"w:{name}\"]")), "{text}");
    fake.assert_valid();
}
