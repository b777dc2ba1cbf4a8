//! The demo project that `scripts/demo` serves (examples/demo) evaluates
//! and builds as its README says: three jobs succeed, one fails with a
//! readable log, and the one that depends on it is "dependency failed";
//! the two machines' closures build, with an activation script.

mod support;

use support::*;

#[tokio::test]
async fn the_demo_project_builds_as_documented() {
    let repo = tempfile::tempdir().unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo");
    for f in ["flake.nix", ".kiln.toml", "README.md"] {
        std::fs::copy(src.join(f), repo.path().join(f)).unwrap();
    }
    git(repo.path(), &["init", "-q", "-b", "main"]);
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-q", "-m", "demo"]);
    let kiln = Kiln::start(&format!("[[projects]]\nname = \"demo\"\nrepo = \"{}\"\n", repo.path().display()), &[]);
    let api = Api::new(&kiln.url, None);
    let jobs = wait_for(60, "the demo's evaluation", || async {
        let e = api.get("/jobset/demo/main/evals").await.1["evals"].as_array()?.first()?.clone();
        if e["status"] != "succeeded" {
            return None;
        }
        let (_, d) = api.get(&format!("/eval/{}", e["id"])).await;
        d["jobs"].as_object().cloned()
    })
    .await;
    let want = [
        ("greeting", 0),
        ("slow-report", 0),
        ("combined", 0),
        ("broken-test", 1),
        ("needs-broken", 2),
        ("hosts.web1", 0),
        ("hosts.web2", 0),
    ];
    assert_eq!(jobs.len(), want.len(), "{jobs:?}");
    for (job, status) in want {
        let id = jobs[job].as_i64().unwrap();
        let b = wait_for(60, &format!("{job} to finish"), || async {
            let (_, b) = api.get(&format!("/build/{id}")).await;
            (b["finished"] == 1).then_some(b)
        })
        .await;
        assert_eq!(b["buildstatus"], status, "{job}: {b}");
    }
    let web1 = jobs["hosts.web1"].as_i64().unwrap();
    let (_, b) = api.get(&format!("/build/{web1}")).await;
    let out = std::path::PathBuf::from(b["buildoutputs"]["out"]["path"].as_str().unwrap());
    let script = std::fs::read_to_string(out.join("bin/switch-to-configuration")).unwrap();
    assert!(script.starts_with("#!/bin/sh\n") && script.contains("$HOST_DIR/active"), "{script}");
    assert_eq!(std::fs::read_to_string(out.join("health")).unwrap(), "ok\n");
    let broken = jobs["broken-test"].as_i64().unwrap();
    let log = reqwest::get(format!("{}/build/{broken}/log", kiln.url)).await.unwrap().text().await.unwrap();
    assert!(log.contains("test 3: FAILED") && log.contains("expected 42, got 41"), "{log}");
}

#[test]
fn the_demo_script_is_valid_bash() {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo");
    let out = std::process::Command::new("bash").arg("-n").arg(&script).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
