//! Gitea and Forgejo, end to end: a stand-in host on loopback serves a
//! private repository over HTTP (only with the token) and takes commit
//! statuses, checked as Gitea checks them; Kiln gets its signed webhooks
//! (Gitea's headers and Forgejo's); real Nix evaluates and builds.

mod support;

use support::gitea::*;
use support::*;

fn kiln_for(g: &Gitea) -> Kiln {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gitea-token"), TOKEN).unwrap();
    std::fs::write(dir.path().join("gitea-secret"), SECRET).unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "base_url = \"https://ci.example.org\"\n\
             [[forges]]\nname = \"gt\"\nkind = \"forgejo\"\nurl = \"{}\"\ntoken_file = \"gitea-token\"\n\
             webhook_secret_file = \"gitea-secret\"\n\
             [[projects]]\nname = \"w\"\nrepo = \"{}\"\n",
            g.url,
            g.repo_url()
        ),
    )
    .unwrap();
    Kiln::start_in(dir, &[])
}

async fn wait_status(g: &Gitea, kiln: &Kiln, sha: &str, context: &str, state: &str) -> Posted {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        if let Some(p) = g.accepted(sha, context).last()
            && p.state == state
        {
            return p.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{context} {state} on {sha} never arrived: {:#?}\ninvalid: {:#?}\n{}",
            g.host.lock().unwrap().statuses,
            g.host.lock().unwrap().invalid,
            kiln.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_forgejo_project_is_fetched_with_its_token_built_on_push_and_gets_statuses() {
    let g = Gitea::start().await;
    let t = unique("forge");
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
    let sha1 = git(flake.path(), &["rev-parse", "HEAD"]).trim().to_string();
    g.publish(flake.path());
    let kiln = kiln_for(&g);

    // Fetched with the token (the repository answers nothing without it),
    // evaluated, built, and reported on the forge.
    let done = wait_status(&g, &kiln, &sha1, "kiln/main", "success").await;
    assert_eq!(done.target_url, "https://ci.example.org/eval/1");
    assert!(g.accepted(&sha1, "kiln/main/ok").iter().any(|p| p.state == "success"));
    let requests = g.host.lock().unwrap().git_requests.clone();
    assert!(requests.iter().any(|(_, with_token)| *with_token), "{requests:?}");

    // A push, signed as Gitea signs it: the new commit is evaluated at once.
    flake.write("README", "two\n");
    let sha2 = flake.commit("second");
    g.publish(flake.path());
    let push = serde_json::json!({"ref": "refs/heads/main", "after": sha2,
        "repository": {"full_name": REPO, "default_branch": "main"}});
    let (code, text) = webhook(&kiln.url, "gt", false, "push", "d-1", &push, SECRET).await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("\"triggered\":[\"w:main\"]"), "{text}");
    wait_status(&g, &kiln, &sha2, "kiln/main", "success").await;
    // Delivered again: nothing is done twice.
    let (_, text) = webhook(&kiln.url, "gt", false, "push", "d-1", &push, SECRET).await;
    assert!(text.contains("\"duplicate\":true"), "{text}");
    // A wrong signature, or a forge Kiln does not know, is refused.
    assert_eq!(webhook(&kiln.url, "gt", false, "push", "d-2", &push, "wrong").await.0, 401);
    assert_eq!(webhook(&kiln.url, "nope", false, "push", "d-3", &push, SECRET).await.0, 404);

    // A pull request from a fork (Forgejo's headers) waits for approval.
    git(flake.path(), &["checkout", "-q", "--detach"]);
    flake.write("README", "fork\n");
    let head = flake.commit("from a fork");
    git(flake.path(), &["update-ref", "refs/pull/2/head", &head]);
    git(flake.path(), &["checkout", "-q", "main"]);
    g.publish(flake.path());
    let pr = serde_json::json!({
        "action": "opened", "number": 2,
        "pull_request": {"number": 2, "user": {"login": "eve"},
                         "head": {"sha": head, "repo": {"full_name": "eve/widgets"}},
                         "base": {"sha": sha2, "repo": {"full_name": REPO}}},
        "repository": {"full_name": REPO, "default_branch": "main"},
    });
    let (_, text) = webhook(&kiln.url, "gt", true, "pull_request", "d-4", &pr, SECRET).await;
    assert!(text.contains("\"awaiting_approval\":[\"w:pr-2\"]"), "{text}");
    let waiting = wait_status(&g, &kiln, &head, "kiln/pr-2", "pending").await;
    assert!(waiting.description.contains("Waiting for approval"), "{waiting:?}");
    g.assert_valid();
}
