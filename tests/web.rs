//! The web UI and its JSON: every page answers with the right content and
//! well-formed HTML, the JSON uses Hydra's field names, actions need a
//! token or a signed-in session with its CSRF token, a session ends with
//! its token, `private = true` hides everything from anonymous requests,
//! and a client that stalls in its request header is disconnected.

mod support;

use support::*;

const TOKEN: &str = "web-token-42";

/// A project with a job that succeeds, one that fails and one that depends
/// on the failure, built on this machine; returns the server once they are done.
async fn built_kiln(extra: &str) -> (Kiln, Api, Flake) {
    let t = unique("web");
    let flake = Flake::new(
        &format!(
            r#"{{ outputs = _: let ok = {}; bad = {}; in {{ hydraJobs = {{ inherit ok bad; after = derivation {{ name = "after-{t}"; system = "x86_64-linux"; builder = "/bin/sh"; inherit bad; args = [ "-c" "echo > $out" ]; }}; colours = {}; }}; }}; }}"#,
            drv_expr(&format!("ok-{t}"), "echo building ok; echo > $out"),
            drv_expr(&format!("bad-{t}"), "echo this build fails; exit 1"),
            drv_expr(&format!("colours-{t}"), "printf '\\033[31mred <tag> & more\\033[0m\\n'; echo > $out"),
        ),
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!("api_token_files = [\"token\"]\n{extra}\n[[projects]]\nname = \"web\"\ndisplay_name = \"Web test\"\nrepo = \"{}\"\n", flake.path().display()),
    )
    .unwrap();
    let kiln = Kiln::start_in(dir, &[]);
    let api = Api::new(&kiln.url, Some(TOKEN));
    wait_for(120, "the builds to finish", || async {
        let (_, v) = api.get("/jobset/web/main/evals").await;
        let e = v["evals"].as_array()?.first()?.clone();
        let (_, d) = api.get(&format!("/eval/{}", e["id"])).await;
        let ids = d["builds"].as_array()?.clone();
        let mut done = 0;
        for id in &ids {
            if api.get(&format!("/build/{id}")).await.1["finished"] == 1 {
                done += 1;
            }
        }
        (ids.len() == 4 && done == 4).then_some(())
    })
    .await;
    (kiln, api, flake)
}

/// Checks that every element is closed in order (void elements aside).
fn assert_well_formed(html: &str, what: &str) {
    const VOID: &[&str] = &["meta", "link", "br", "img", "input", "hr", "circle", "polyline", "path", "rect"];
    let mut stack: Vec<String> = Vec::new();
    let mut rest = html;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let end = rest.find('>').unwrap_or_else(|| panic!("{what}: unclosed <"));
        let tag = &rest[..end];
        rest = &rest[end + 1..];
        if tag.starts_with('!') {
            continue;
        }
        let self_closing = tag.ends_with('/');
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_lowercase();
        if tag.starts_with('/') {
            let open = stack.pop().unwrap_or_else(|| panic!("{what}: </{name}> closes nothing"));
            assert_eq!(open, name, "{what}: <{open}> closed by </{name}>");
        } else if !self_closing && !VOID.contains(&name.as_str()) {
            stack.push(name);
        }
    }
    assert!(stack.is_empty(), "{what}: unclosed {stack:?}");
}

async fn page(url: &str) -> (u16, String) {
    let r = reqwest::Client::new().get(url).header("Accept", "text/html").send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn every_page_answers_with_its_content_and_json_has_hydras_names() {
    let (kiln, api, _flake) = built_kiln("").await;
    let (_, evals) = api.get("/jobset/web/main/evals").await;
    let eval = evals["evals"][0]["id"].as_i64().unwrap();
    let (_, detail) = api.get(&format!("/eval/{eval}")).await;
    let id = |job: &str| detail["jobs"][job].as_i64().unwrap();
    let (ok, bad, after, colours) = (id("ok"), id("bad"), id("after"), id("colours"));

    let (eval_h, build_h, job_link) =
        (format!("Evaluation {eval} of web:main"), format!("Build {ok} of ok"), format!("/build/{ok}"));
    let pages = [
        ("/".to_string(), vec!["Web test", "Recent builds"], "Kiln"),
        ("/project/web".into(), vec!["Project Web test", "/jobset/web/main"], "web · Kiln"),
        (
            "/jobset/web/main".into(),
            vec!["Jobset web:main", "class=\"matrix\"", "dependency failed", "succeeded"],
            "web:main",
        ),
        (format!("/eval/{eval}"), vec![eval_h.as_str(), "New jobs", "<code>ok</code>"], "Evaluation"),
        (format!("/build/{ok}"), vec![build_h.as_str(), "succeeded", "Outputs", ".narinfo"], "Build"),
        (format!("/build/{bad}"), vec!["failed", "failed with exit code 1"], "Build"),
        (format!("/build/{bad}/log"), vec!["this build fails", "id=\"L1\""], "Log"),
        // Escaped (Nix strips the builder's colour codes on the way; the
        // renderer's colours are unit-tested in web::ansi).
        (format!("/build/{colours}/log"), vec!["red &lt;tag&gt; &amp; more"], "Log"),
        ("/job/web/main/ok".into(), vec!["Job ok", job_link.as_str()], "ok in web:main"),
        ("/job/web/main/bad".into(), vec!["Failing since"], "bad in web:main"),
        ("/queue".into(), vec!["Queue", "Running"], "Queue"),
        ("/machines".into(), vec!["Machines", "localhost"], "Machines"),
        ("/login".into(), vec!["Sign in"], "Sign in"),
        ("/search?q=ok".into(), vec![job_link.as_str(), "/jobset/web/main"], "Search"),
        ("/search?q=web".into(), vec!["/project/web"], "Search"),
    ];
    for (path, wants, title) in pages {
        let (code, html) = page(&format!("{}{path}", kiln.url)).await;
        assert_eq!(code, 200, "{path}");
        for w in &wants {
            assert!(html.contains(*w), "{path} lacks {w:?}:\n{html}");
        }
        let t = html.split("<title>").nth(1).and_then(|r| r.split("</title>").next()).unwrap_or("");
        assert!(t.contains(title), "{path}: title {t:?}");
        assert!(html.contains("<h1>"), "{path} has a heading");
        assert_well_formed(&html, &path);
    }
    // Errors: a page for a browser, JSON for a script, whoever raised them.
    let (code, html) = page(&format!("{}/build/999999", kiln.url)).await;
    assert_eq!(code, 404);
    assert!(html.contains("<h1>Not found</h1>") && html.contains("build 999999 not found"), "{html}");
    assert_well_formed(&html, "404 page");
    let (code, html) = page(&format!("{}/build/not-a-number", kiln.url)).await;
    assert_eq!(code, 400);
    assert!(html.contains("<h1>Bad Request</h1>"), "{html}");
    let (code, v) = api.get("/build/not-a-number").await;
    assert_eq!(code, 400);
    assert!(v["error"].as_str().is_some_and(|e| e.contains("parse")), "{v}");
    let (code, v) = api.get("/no/such/page").await;
    assert_eq!((code, v["error"].as_str()), (404, Some("not found")));

    // The raw log is plain text.
    let raw = reqwest::get(format!("{}/build/{bad}/log", kiln.url)).await.unwrap();
    assert!(raw.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    assert!(raw.text().await.unwrap().contains("this build fails"));

    // JSON: Hydra's field names for the same objects.
    let (_, b) = api.get(&format!("/build/{after}")).await;
    for f in [
        "id",
        "project",
        "jobset",
        "job",
        "nixname",
        "system",
        "drvpath",
        "finished",
        "buildstatus",
        "starttime",
        "stoptime",
        "buildoutputs",
        "jobsetevals",
        "priority",
        "timestamp",
    ] {
        assert!(b.get(f).is_some(), "build lacks {f}: {b}");
    }
    assert_eq!((b["buildstatus"].as_i64(), b["jobsetevals"][0].as_i64()), (Some(2), Some(eval)));
    let (_, p) = api.get("/project/web").await;
    for f in ["name", "displayname", "description", "enabled", "hidden", "jobsets"] {
        assert!(p.get(f).is_some(), "project lacks {f}: {p}");
    }
    let (_, j) = api.get("/jobset/web/main").await;
    for f in
        ["name", "project", "enabled", "checkinterval", "schedulingshares", "keepnr", "errormsg", "lastcheckedtime"]
    {
        assert!(j.get(f).is_some(), "jobset lacks {f}: {j}");
    }
    let (_, e) = api.get(&format!("/eval/{eval}")).await;
    for f in ["id", "timestamp", "evaltime", "hasnewbuilds", "builds", "flake"] {
        assert!(e.get(f).is_some(), "evaluation lacks {f}: {e}");
    }
    let (_, q) = api.get("/queue").await;
    assert!(q["running"].is_array() && q["unfinished"].is_number());
    let (_, m) = api.get("/machines").await;
    assert_eq!(m["machines"][0]["uri"], "localhost");
    let (_, h) = api.get("/job/web/main/ok").await;
    assert_eq!(h[0]["id"].as_i64(), Some(ok));

    // Badges.
    for (path, word) in [
        ("/jobset/web/main/badge.svg", "failing"),
        ("/job/web/main/ok/badge.svg", "passing"),
        ("/job/web/main/bad/badge.svg", "failed"),
    ] {
        let r = reqwest::get(format!("{}{path}", kiln.url)).await.unwrap();
        assert_eq!(r.headers()["content-type"], "image/svg+xml", "{path}");
        assert!(r.headers()["cache-control"].to_str().unwrap().contains("max-age"));
        let body = r.text().await.unwrap();
        assert!(body.starts_with("<svg") && body.contains(word), "{path}: {body}");
    }
}

fn cookie_of(r: &reqwest::Response) -> Option<String> {
    r.headers().get("set-cookie")?.to_str().ok()?.split(';').next().map(str::to_string)
}

#[tokio::test]
async fn actions_need_a_token_or_a_session_with_its_csrf_token() {
    let (kiln, api, _flake) = built_kiln("").await;
    let (_, evals) = api.get("/jobset/web/main/evals").await;
    let eval = evals["evals"][0]["id"].as_i64().unwrap();
    let bad = api.get(&format!("/eval/{eval}")).await.1["jobs"]["bad"].as_i64().unwrap();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    // Anonymous: not allowed, nothing happens.
    let r = http.post(format!("{}/build/{bad}/restart", kiln.url)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("token"));
    let r = http.post(format!("{}/build/{bad}/restart", kiln.url)).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(api.get(&format!("/build/{bad}")).await.1["finished"], 1);

    // A script with the token: restarted, built again, failed again, and
    // the event stream of that build says so as it happens.
    let mut stream = http.get(format!("{}/api/events?build={bad}", kiln.url)).send().await.unwrap();
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let before = api.get(&format!("/build/{bad}")).await.1["stoptime"].as_i64().unwrap();
    let (code, v) = api.send("POST", &format!("/build/{bad}/restart"), None).await;
    assert_eq!((code, v["ok"].as_bool()), (200, Some(true)), "{v}");
    let after = wait_for(60, "the restarted build", || async {
        let (_, b) = api.get(&format!("/build/{bad}")).await;
        (b["finished"] == 1 && b["buildstatus"] == 1 && b["stoptime"].as_i64() >= Some(before)).then_some(b)
    })
    .await;
    assert_eq!(after["buildstatus"], 1, "failed again, not a cached failure");
    let mut seen = String::new();
    while !seen.contains("event: build_finished") {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(30), stream.chunk())
            .await
            .expect("events arrive")
            .unwrap()
            .expect("the stream stays open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let queued = seen.find("event: build_queued").expect("queued event");
    let started = seen.find("event: step_started").expect("step event");
    let finished = seen.find("event: build_finished").unwrap();
    assert!(queued < started && started < finished, "{seen}");
    assert!(seen.contains(&format!("\"build\":{bad},")) && seen.contains("\"buildstatus\":1"), "{seen}");
    drop(stream);
    assert_eq!(api.send("POST", "/build/999999/restart", None).await.0, 404);
    assert_eq!(api.send("POST", &format!("/build/{bad}/explode"), None).await.0, 404);
    assert_eq!(api.send("POST", "/jobset/web/main/disable", None).await.0, 200);
    assert_eq!(api.get("/jobset/web/main").await.1["enabled"], 0);
    assert_eq!(api.send("POST", "/jobset/web/main/enable", None).await.0, 200);
    assert_eq!(api.send("POST", &format!("/eval/{eval}/bump"), None).await.0, 200);

    // Signing in with the token gives a session; its forms carry CSRF tokens.
    let r = http.post(format!("{}/login", kiln.url)).form(&[("token", "wrong")]).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.post(format!("{}/login", kiln.url)).form(&[("token", TOKEN)]).send().await.unwrap();
    assert!(r.status().is_redirection());
    let cookie = cookie_of(&r).expect("a session cookie");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
    let html = http
        .get(format!("{}/build/{bad}", kiln.url))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let csrf = html.split("name=\"csrf\" value=\"").nth(1).and_then(|r| r.split('"').next()).unwrap().to_string();
    assert_eq!(csrf.len(), 32);
    assert!(html.contains("Sign out"));
    // Without the CSRF token (as a form on another site would post): refused.
    let r = http
        .post(format!("{}/build/{bad}/bump", kiln.url))
        .header("Cookie", &cookie)
        .form(&[("x", "y")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(format!("{}/build/{bad}/bump", kiln.url))
        .header("Cookie", &cookie)
        .form(&[("csrf", "0".repeat(32))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(format!("{}/build/{bad}/bump", kiln.url))
        .header("Cookie", &cookie)
        .form(&[("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], format!("/build/{bad}").as_str());
    // A forged cookie is no session.
    let forged = cookie.replacen('=', "=9", 1);
    let r = http
        .post(format!("{}/build/{bad}/bump", kiln.url))
        .header("Cookie", &forged)
        .form(&[("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn a_private_kiln_shows_nothing_to_anonymous_requests() {
    let (kiln, api, _flake) = built_kiln("private = true").await;
    let anon = Api::new(&kiln.url, None);
    for path in [
        "/",
        "/project/web",
        "/jobset/web/main",
        "/queue",
        "/machines",
        "/nix-cache-info",
        "/job/web/main/ok/badge.svg",
    ] {
        assert_eq!(anon.get(path).await.0, 401, "{path}");
    }
    assert_eq!(anon.get("/healthz").await.0, 200);
    assert_eq!(page(&format!("{}/login", kiln.url)).await.0, 200);
    assert_eq!(api.get("/").await.0, 200, "a token opens it");
    assert_eq!(api.get("/nix-cache-info").await.0, 200);
}

#[tokio::test]
async fn the_openapi_document_describes_the_api_and_schemathesis_finds_no_failure() {
    let (kiln, api, _flake) = built_kiln("").await;
    let (code, doc) = api.get("/api/openapi.json").await;
    assert_eq!(code, 200);
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{doc}");
    for path in ["/build/{id}", "/eval/{id}", "/jobset/{project}/{jobset}", "/api/push", "/api/events"] {
        assert!(doc["paths"][path].is_object(), "{path} is documented");
    }
    let build = &doc["components"]["schemas"]["BuildView"]["properties"];
    for field in ["id", "project", "jobset", "job", "nixname", "system", "drvpath", "finished", "buildstatus"] {
        assert!(build[field].is_object(), "BuildView has Hydra's {field}");
    }
    assert_eq!(doc["paths"]["/build/{id}/{action}"]["post"]["security"][0]["token"], serde_json::json!([]));

    // Every operation, with generated valid and invalid input, authorised
    // and not: no server error, no answer the document does not describe.
    // The event stream never ends, so it is left out.
    let reports = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(schemathesis())
        .args(["run", &format!("{}/api/openapi.json", kiln.url), "--url", &kiln.url])
        .args([
            "--checks",
            "all",
            "--max-examples",
            "20",
            "--seed",
            &std::env::var("ST_SEED").unwrap_or_else(|_| "42".into()),
            // One worker: Debian's Python 3.11 raises "AST constructor
            // recursion depth mismatch" when schemathesis compiles in
            // several threads at once (CPython issue 106905).
            "--workers",
            "1",
        ])
        .args(["--exclude-path", "/api/events", "--request-timeout", "20"])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}"), "-H", "Accept: application/json"])
        .arg("--report-dir")
        .arg(reports.path())
        .env("SCHEMATHESIS_HOOKS", "")
        .env("NO_COLOR", "1")
        .current_dir(reports.path())
        .output()
        .await
        .expect("run schemathesis");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found failures:\n{text}");
    assert!(text.contains("passed"), "{text}");
    // Kiln is still healthy afterwards (schemathesis, holding a token, may
    // well have deleted the fixture's project: that is allowed).
    assert_eq!(api.get("/healthz").await.0, 200);
}

#[tokio::test]
async fn a_client_that_sends_half_a_header_is_disconnected_and_others_are_served_meanwhile() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let kiln = Kiln::start("header_read_timeout_s = 1\n", &[]);
    let addr = kiln.url.strip_prefix("http://").unwrap().to_string();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let sent = std::time::Instant::now();
    // Another client is answered while the half header waits.
    let api = Api::new(&kiln.url, None);
    assert_eq!(api.get("/healthz").await.0, 200);
    // Then the server hangs up: end of stream (or a reset), and no answer.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(15), slow.read_to_end(&mut buf))
        .await
        .expect("the server still holds a connection that sent half a header");
    let waited = sent.elapsed();
    assert!(read.is_err() || buf.is_empty(), "answered: {}", String::from_utf8_lossy(&buf));
    assert!(waited >= std::time::Duration::from_millis(900), "closed after {waited:?}, before the timeout");
    // On a new connection: the first request's idle keep-alive connection
    // is itself closed by the same timeout, which a reuse could race.
    let fresh = Api::new(&kiln.url, None);
    assert_eq!(fresh.get("/healthz").await.0, 200, "the server still serves");
}

#[tokio::test]
async fn removing_or_rotating_a_token_ends_the_sessions_made_from_it() {
    for backend in ["sqlite", "postgres"] {
        let pg = if backend == "postgres" { Some(PgDatabase::create().await) } else { None };
        let db_line = pg.as_ref().map(|p| format!("database_url = \"{}\"\n", p.url)).unwrap_or_default();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token-a"), "token-aaaa").unwrap();
        std::fs::write(dir.path().join("token-b"), "token-bbbb").unwrap();
        let config = |files: &str| format!("{db_line}private = true\napi_token_files = [{files}]\n");
        std::fs::write(dir.path().join("kiln.toml"), config("\"token-a\", \"token-b\"")).unwrap();
        let mut kiln = Kiln::start_in(dir, &[]);
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let mut sessions = Vec::new();
        for token in ["token-aaaa", "token-bbbb"] {
            let r = http.post(format!("{}/login", kiln.url)).form(&[("token", token)]).send().await.unwrap();
            assert!(r.status().is_redirection(), "{backend}: {}", r.status());
            sessions.push(cookie_of(&r).expect("a session cookie"));
        }
        let (a, b) = (sessions[0].clone(), sessions[1].clone());
        // A session sees a private Kiln signed in; an action with a wrong
        // CSRF token is refused as a stale form (403), not as a stranger's (401).
        let check = |url: String, cookie: String| {
            let http = http.clone();
            async move {
                let r = http.get(format!("{url}/")).header("Cookie", &cookie).send().await.unwrap();
                let home = r.status().as_u16();
                let signed_in = r.text().await.unwrap().contains("Sign out");
                let r = http
                    .post(format!("{url}/build/1/bump"))
                    .header("Cookie", &cookie)
                    .form(&[("csrf", "0".repeat(32))])
                    .send()
                    .await
                    .unwrap();
                (home, signed_in, r.status().as_u16())
            }
        };
        assert_eq!(check(kiln.url.clone(), a.clone()).await, (200, true, 403), "{backend}: A's session");
        assert_eq!(check(kiln.url.clone(), b.clone()).await, (200, true, 403), "{backend}: B's session");

        // Token A is removed from the configuration; Kiln restarts on the same state.
        assert!(kiln.terminate().success());
        let dir = std::mem::replace(&mut kiln.dir, tempfile::tempdir().unwrap());
        drop(kiln);
        std::fs::write(dir.path().join("kiln.toml"), config("\"token-b\"")).unwrap();
        let kiln = Kiln::start_in(dir, &[]);
        assert_eq!(check(kiln.url.clone(), a).await, (401, false, 401), "{backend}: A's session ended with its token");
        assert_eq!(
            check(kiln.url.clone(), b.clone()).await,
            (200, true, 403),
            "{backend}: B's token is still configured"
        );
        let r = http.post(format!("{}/login", kiln.url)).form(&[("token", "token-aaaa")]).send().await.unwrap();
        assert_eq!(r.status(), 401, "{backend}: A no longer signs in");

        // Token B is rotated in its file, Kiln running: B's session ends
        // and the new token works, within seconds and without a restart.
        std::fs::write(kiln.dir.path().join("token-b"), "token-cccc\n").unwrap();
        wait_for(15, "the rotated token to replace the old one", || {
            let (url, b) = (kiln.url.clone(), b.clone());
            async move { (check(url, b).await == (401, false, 401)).then_some(()) }
        })
        .await;
        let r = http.post(format!("{}/login", kiln.url)).form(&[("token", "token-cccc")]).send().await.unwrap();
        assert!(r.status().is_redirection(), "{backend}: the rotated token signs in: {}", r.status());
        let r = http.post(format!("{}/login", kiln.url)).form(&[("token", "token-bbbb")]).send().await.unwrap();
        assert_eq!(r.status(), 401, "{backend}: the old token no longer signs in");
    }
}
