//! GitHub's Checks API, end to end: Kiln as a GitHub App reports check
//! runs to a local stand-in that checks every request as GitHub does
//! (App installation tokens, required fields, lengths, 50 annotations per
//! request, actions), and answers Re-run and Approve the way GitHub sends
//! them: signed `check_run` and `check_suite` events. Real Nix evaluates
//! and builds the flakes.

mod support;

use std::time::Duration;

use support::github::*;
use support::*;

/// Jobs that evaluate with an error on a line of the repository's source.
const BROKEN: usize = 55;

fn flake() -> Flake {
    let t = unique("checks");
    Flake::new(
        &format!(
            r#"{{ outputs = _: {{ hydraJobs = {{ ok = {}; bad = {}; }} // builtins.listToAttrs (builtins.genList (i: {{ name = "broken${{toString i}}"; value = import ./broken.nix; }}) {BROKEN}); }}; }}"#,
            drv_expr(&format!("ok-{t}"), "echo fine; echo > $out"),
            drv_expr(&format!("bad-{t}"), "echo broken; exit 1"),
        ),
        &[
            ("broken.nix", "{ x = 1; }.y\n"),
            (
                ".kiln.toml",
                "[jobsets.main]\ncheck_interval = 0\n[jobsets.pulls]\npull_requests = true\ncheck_interval = 0\n",
            ),
        ],
    )
}

fn kiln_for(fake: &Fake, flake: &Flake, key: &std::path::Path) -> Kiln {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gh-secret"), SECRET).unwrap();
    std::fs::write(dir.path().join("token"), "admin-tok\n").unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "base_url = \"{BASE}\"\napi_token_files = [\"token\"]\n[github]\napi_url = \"{}\"\n\
             webhook_secret_file = \"gh-secret\"\napp_id = 4242\napp_private_key_file = \"{}\"\n\
             [[projects]]\nname = \"w\"\nrepo = \"{}\"\ngithub = \"{REPO}\"\n",
            fake.url,
            key.display(),
            flake.path().display()
        ),
    )
    .unwrap();
    Kiln::start_in(dir, &[])
}

/// Waits until the newest run of `name` on `sha` is completed with `conclusion`.
async fn wait_run(fake: &Fake, kiln: &Kiln, sha: &str, name: &str, conclusion: &str) -> CheckRun {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(r) = fake.runs(sha, name).last()
            && r.status == "completed"
            && r.conclusion.as_deref() == Some(conclusion)
        {
            return r.clone();
        }
        if std::time::Instant::now() > deadline {
            let h = fake.hub.lock().unwrap();
            let runs: Vec<_> = h.runs.iter().map(|r| (&r.name, &r.status, &r.conclusion, &r.head_sha)).collect();
            let log = kiln.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "{name} on {sha} never completed as {conclusion}\nruns: {runs:#?}\ninvalid: {:#?}\nlog:\n{}",
                h.invalid,
                tail.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn check_run_event(action: &str, run: &CheckRun, app_id: u64, identifier: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "action": action,
        "check_run": {"id": run.id, "name": run.name, "head_sha": run.head_sha, "external_id": run.external_id,
                      "status": run.status, "app": {"id": app_id}},
        "repository": {"full_name": REPO, "default_branch": "main"},
        "sender": {"login": "maintainer"},
    });
    if let Some(i) = identifier {
        v["requested_action"] = serde_json::json!({"identifier": i});
    }
    v
}

#[tokio::test]
async fn an_app_reports_check_runs_with_a_job_table_annotations_and_re_runs() {
    let fake = Fake::start().await;
    let (_keys, key) = app_key(&fake);
    let flake = flake();
    let sha = git(flake.path(), &["rev-parse", "HEAD"]).trim().to_string();
    let kiln = kiln_for(&fake, &flake, &key);
    let api = Api::new(&kiln.url, Some("admin-tok"));

    // The evaluation's run: failed (one build failed, 55 jobs did not
    // evaluate), with every job in its table.
    let run = wait_run(&fake, &kiln, &sha, "kiln/main", "failure").await;
    assert!(run.title.contains("1 succeeded") && run.title.contains("1 failed"), "{}", run.title);
    assert!(run.text.contains("| `ok` | succeeded |") && run.text.contains("| `bad` | failed |"), "{}", run.text);
    assert!(run.text.contains("| `broken0` | evaluation error: error: attribute 'y' missing |"), "{}", run.text);
    assert!(run.external_id.starts_with("eval:") && run.details_url.starts_with(&format!("{BASE}/eval/")));
    // Each evaluation error is annotated once on the line Nix names, in
    // requests of at most 50 (the stand-in refuses more).
    let all_annotations = wait_for(30, "every annotation", || async {
        let r = fake.runs(&sha, "kiln/main").last().cloned().unwrap();
        (r.annotations.len() >= BROKEN).then_some(r.annotations)
    })
    .await;
    assert_eq!(all_annotations.len(), BROKEN, "sent once each, however often the run was updated");
    for a in &all_annotations {
        assert_eq!((a["path"].as_str(), a["start_line"].as_u64()), (Some("broken.nix"), Some(1)), "{a}");
        assert_eq!(a["annotation_level"], "failure");
    }
    // The stable check and the failed job's own run.
    let all = wait_run(&fake, &kiln, &sha, "kiln/main/all", "failure").await;
    assert_eq!(all.external_id, run.external_id);
    let bad = wait_run(&fake, &kiln, &sha, "kiln/main/bad", "failure").await;
    assert!(bad.external_id.starts_with("build:") && bad.summary.contains("/log)"), "{bad:?}");
    assert!(fake.runs(&sha, "kiln/main/ok").is_empty(), "a job that succeeded has no run of its own");
    assert!(fake.statuses().is_empty(), "an App reports checks, not statuses: {:?}", fake.statuses());

    // Re-run of the failed job: its build is restarted, under a new run.
    let build: i64 = bad.external_id.strip_prefix("build:").unwrap().parse().unwrap();
    let (code, text) =
        webhook(&kiln, "check_run", "cr-1", &check_run_event("rerequested", &bad, 4242, None), Some(SECRET)).await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains(&format!("\"restarted\":[{build}]")), "{text}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let runs = fake.runs(&sha, "kiln/main/bad");
        if runs.len() == 2 && runs[1].status == "completed" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no second run: {runs:#?}\n{}", kiln.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Another App's run, and GitHub's echo of a suite, are not Kiln's.
    let (_, text) =
        webhook(&kiln, "check_run", "cr-2", &check_run_event("rerequested", &bad, 999, None), Some(SECRET)).await;
    assert!(text.contains("\"restarted\":[]"), "{text}");
    let suite = |action: &str, app: u64| {
        serde_json::json!({"action": action, "check_suite": {"head_sha": sha, "app": {"id": app}},
                           "repository": {"full_name": REPO, "default_branch": "main"}})
    };
    let (_, text) = webhook(&kiln, "check_suite", "cs-0", &suite("completed", 4242), Some(SECRET)).await;
    assert!(text.contains("\"triggered\":[]"), "{text}");

    // Re-run all: the commit is evaluated again, and its run is a new one.
    let (_, text) = webhook(&kiln, "check_suite", "cs-1", &suite("rerequested", 4242), Some(SECRET)).await;
    assert!(text.contains("\"triggered\":[\"w:main\"]"), "{text}");
    wait_for(90, "a second evaluation run", || async {
        let runs = fake.runs(&sha, "kiln/main");
        (runs.len() >= 2 && runs.last().unwrap().status == "completed").then_some(())
    })
    .await;
    assert_eq!(api.get("/jobset/w/main/evals").await.1["evals"].as_array().unwrap().len(), 2);

    // An outside contributor's pull request: the run asks for approval with
    // GitHub's button, which approves it.
    git(flake.path(), &["checkout", "-q", "--detach"]);
    flake.write("broken.nix", "{ y = 1; }.y\n");
    let head = flake.commit("fix it");
    git(flake.path(), &["update-ref", "refs/pull/4/head", &head]);
    git(flake.path(), &["checkout", "-q", "main"]);
    let pr = serde_json::json!({
        "action": "opened", "number": 4,
        "pull_request": {"number": 4, "head": {"sha": head}, "user": {"login": "stranger"},
                         "author_association": "NONE"},
        "repository": {"full_name": REPO, "default_branch": "main"},
    });
    let (_, text) = webhook(&kiln, "pull_request", "pr-4", &pr, Some(SECRET)).await;
    assert!(text.contains("\"awaiting_approval\":[\"w:pr-4\"]"), "{text}");
    let waiting = wait_run(&fake, &kiln, &head, "kiln/pr-4", "action_required").await;
    assert_eq!(waiting.actions.len(), 1);
    assert_eq!(waiting.actions[0]["identifier"], "approve");
    let (_, text) = webhook(
        &kiln,
        "check_run",
        "cr-3",
        &check_run_event("requested_action", &waiting, 4242, Some("approve")),
        Some(SECRET),
    )
    .await;
    assert!(text.contains("\"approved\":[\"w:pr-4\"]"), "{text}");
    let built = wait_run(&fake, &kiln, &head, "kiln/pr-4", "failure").await;
    assert!(built.title.contains("1 succeeded") && built.title.contains("1 failed"), "{}", built.title);
    assert_eq!(fake.runs(&head, "kiln/pr-4").len(), 2, "the approval run, then the evaluation's");
    // The pull request's stable check goes by its template's name.
    wait_run(&fake, &kiln, &head, "kiln/pulls/all", "failure").await;
    let (_, j) = api.get("/jobset/w/pr-4").await;
    assert_eq!(j["pullrequest"]["approvedby"], "@maintainer on GitHub", "{j}");

    // Without the Checks permission GitHub answers 403: said once, on
    // /machines, and not retried.
    fake.hub
        .lock()
        .unwrap()
        .check_script
        .push_back((403, r#"{"message":"Resource not accessible by integration"}"#.into()));
    flake.write("README", "again\n");
    let sha3 = flake.commit("third");
    let push = serde_json::json!({"ref": "refs/heads/main", "after": sha3, "repository": {"full_name": REPO, "default_branch": "main"}});
    webhook(&kiln, "push", "push-3", &push, Some(SECRET)).await;
    let problem = wait_for(60, "the permission problem on /machines", || async {
        api.get("/machines").await.1["github_problem"].as_str().map(str::to_string)
    })
    .await;
    assert!(problem.contains("Checks: read and write"), "{problem}");
    let page = reqwest::get(format!("{}/machines", kiln.url)).await.unwrap().text().await.unwrap();
    assert!(page.contains("github-permission") && page.contains("Checks: read and write"), "{page}");
    assert_eq!(kiln.log().matches("grant the GitHub App the permission").count(), 1);
    fake.assert_valid();
}
