//! Superseded builds are cancelled (issue 16 part 3): a new commit of a
//! jobset cancels its earlier commit's unfinished builds, which are marked
//! cancelled as superseded (never a dependency failure), while a step
//! another jobset still needs goes on running; an unchanged job keeps its
//! build; a commit whose message says `[skip ci]` is not evaluated; closing
//! a pull request cancels its builds. Real `kiln serve`, real Nix, a real
//! SSH builder; SQLite.

mod support;

use support::*;

/// A job that builds until `gate` exists.
fn slow(name: &str, gate: &std::path::Path) -> String {
    drv_expr(
        name,
        &format!("export PATH=/usr/bin:/bin; while [ ! -e {} ]; do sleep 0.1; done; echo > $out", gate.display()),
    )
}

async fn build_of(api: &Api, eval: i64, job: &str) -> serde_json::Value {
    let (_, detail) = api.get(&format!("/eval/{eval}")).await;
    for id in detail["builds"].as_array().unwrap() {
        let (_, b) = api.get(&format!("/build/{id}")).await;
        if b["job"] == job {
            return b;
        }
    }
    panic!("no build of {job} in evaluation {eval}: {detail}");
}

async fn newest_eval(api: &Api, jobset: &str) -> Option<(i64, String)> {
    let (_, v) = api.get(&format!("/jobset/sup/{jobset}/evals")).await;
    let e = v["evals"].as_array()?.first()?.clone();
    Some((e["id"].as_i64()?, e["commit"].as_str()?.to_string()))
}

#[tokio::test]
async fn a_new_commit_cancels_the_last_ones_builds_but_not_a_step_another_jobset_needs() {
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("open");
    let t = unique("sup");
    let text = |shared: &str, changing: &str| {
        format!(
            "{{ outputs = _: {{ hydraJobs = {{ shared = {}; changing = {}; same = {}; }}; }}; }}",
            slow(&format!("shared-{shared}-{t}"), &gate),
            slow(&format!("changing-{changing}-{t}"), &gate),
            drv_expr(&format!("same-{t}"), "echo > $out"),
        )
    };
    let flake = Flake::new(
        &text("v1", "a"),
        &[(
            ".kiln.toml",
            "[jobsets.main]\ncheck_interval = 0\n[jobsets.other]\nbranch = \"other\"\ncheck_interval = 0\n",
        )],
    );
    // The other jobset shares `shared` (one step for both), not `changing`.
    git(flake.path(), &["checkout", "-q", "-b", "other"]);
    flake.write("flake.nix", &text("v1", "o"));
    flake.commit("the other branch");
    git(flake.path(), &["checkout", "-q", "main"]);
    let shared_v1 = flake.eval_raw("hydraJobs.shared.drvPath");
    let changing_a = flake.eval_raw("hydraJobs.changing.drvPath");

    let sshd = Sshd::start();
    // The builds run in the builder's sandbox: the gate must be seen there.
    let builder = Builder::with_nix_config(
        &sshd,
        "b0",
        4,
        &format!("substituters =\nextra-sandbox-paths = {}", gate_dir.path().display()),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "tok\n").unwrap();
    std::fs::write(dir.path().join("machines"), format!("{}\n", builder.machines_line_with_port)).unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "api_token_files = [\"token\"]\nmachines_file = \"machines\"\n[[projects]]\nname = \"sup\"\nrepo = \"{}\"\n",
            flake.path().display()
        ),
    )
    .unwrap();
    let kiln = Kiln::start_in(dir, &[]);
    let api = Api::new(&kiln.url, Some("tok"));
    let db = kiln::db::Db::connect(&format!("sqlite://{}", kiln.dir.path().join("kiln-state/kiln.db").display()))
        .await
        .unwrap();
    // Once the project's .kiln.toml has been read.
    wait_for(60, "the jobsets known", || async {
        (api.send("POST", "/api/push?jobsets=sup:main,sup:other", None).await.0 == 200).then_some(())
    })
    .await;
    let (main1, _) = wait_for(60, "main evaluated", || newest_eval(&api, "main")).await;
    wait_for(60, "other evaluated", || newest_eval(&api, "other")).await;
    // Both jobsets' `shared` builds need one step, running now.
    for drv in [&shared_v1, &changing_a] {
        wait_for(60, "the slow steps running", || async {
            (step_state(&db, drv).await.as_deref() == Some("running")).then_some(())
        })
        .await;
    }
    let same1 = build_of(&api, main1, "same").await;

    // `[skip ci]`: not evaluated; the jobset says why.
    flake.write("README", "docs\n");
    let skipped = flake.commit("docs only [skip ci]");
    assert_eq!(api.send("POST", "/api/push?jobsets=sup:main", None).await.0, 200);
    let note = wait_for(30, "the skip noted", || async {
        let (_, j) = api.get("/jobset/sup/main").await;
        let e = j["errormsg"].as_str().unwrap_or("").to_string();
        e.contains("[skip ci]").then_some(e)
    })
    .await;
    assert!(note.contains(&skipped[..12]), "{note}");
    assert_eq!(newest_eval(&api, "main").await.unwrap().0, main1, "a [skip ci] commit was evaluated");

    // A new commit on main changes `shared` and `changing`.
    flake.write("flake.nix", &text("v2", "b"));
    let head = flake.commit("new versions");
    assert_eq!(api.send("POST", "/api/push?jobsets=sup:main", None).await.0, 200);
    let (main2, commit) = wait_for(60, "main evaluated again", || async {
        newest_eval(&api, "main").await.filter(|(id, _)| *id != main1)
    })
    .await;
    assert_eq!(commit, head);
    for job in ["shared", "changing"] {
        let b = wait_for(30, "the old build cancelled", || async {
            let b = build_of(&api, main1, job).await;
            (b["finished"] == 1).then_some(b)
        })
        .await;
        assert_eq!(b["buildstatus"], 4, "{b}");
        let (_, page) = api.get(&format!("/build/{}", b["id"])).await;
        let why = page.to_string();
        assert!(why.contains("superseded by evaluation"), "{why}");
    }
    // The unchanged job kept its build (one build for both commits).
    assert_eq!(build_of(&api, main2, "same").await["id"], same1["id"]);
    // `changing`'s old step stopped: nothing needs it. `shared`'s old step
    // runs on for the other jobset.
    let mut stopped = false;
    for _ in 0..300 {
        if step_state(&db, &changing_a).await.as_deref() != Some("running") {
            stopped = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(stopped, "the superseded step still runs:\n{}", kiln.log());
    assert_eq!(step_state(&db, &shared_v1).await.as_deref(), Some("running"));

    // Open the gate: the other jobset's build of the shared step and the
    // new commit's builds succeed.
    std::fs::write(&gate, "").unwrap();
    let (other, _) = newest_eval(&api, "other").await.unwrap();
    for (eval, job) in [(other, "shared"), (main2, "shared"), (main2, "changing")] {
        let mut b = serde_json::Value::Null;
        for _ in 0..300 {
            b = build_of(&api, eval, job).await;
            if b["finished"] == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(b["finished"], 1, "{job} of {eval} after the gate: {b}\n{}", kiln.log());
        assert_eq!(b["buildstatus"], 0, "{job} of {eval}: {b}\n{}", kiln.log());
    }
    db.close().await;
}

/// A closed pull request's jobset is disabled and its unfinished builds
/// are cancelled, with the reason, in the webhook's own transaction.
#[tokio::test]
async fn closing_a_pull_request_cancels_its_builds() {
    each_backend(|db| async move {
        let mut c = db.conn().await.unwrap();
        let mut spec = project_spec("w");
        spec.repo = "https://github.com/acme/w".into();
        let p = kiln::db::projects::upsert(c.ex(), &spec).await.unwrap();
        let mut js = kiln::db::jobsets::JobsetSpec::new("pulls");
        js.pull_requests = true;
        kiln::db::jobsets::upsert(c.ex(), p.id, &js).await.unwrap();
        let mut js = kiln::db::jobsets::JobsetSpec::new("pr-9");
        js.pr_number = Some(9);
        let pr = kiln::db::jobsets::upsert(c.ex(), p.id, &js).await.unwrap();
        let mut tx = db.begin().await.unwrap();
        let new = |job: &str| kiln::db::builds::NewBuild {
            jobset_id: pr.id,
            job: job.into(),
            drv_path: format!("/nix/store/{:0>32}-{job}.drv", job.len()),
            ..Default::default()
        };
        let open = kiln::db::builds::create(tx.ex(), &new("open")).await.unwrap();
        let done = kiln::db::builds::create(tx.ex(), &new("done")).await.unwrap();
        kiln::db::builds::finish(tx.ex(), done.id, kiln::db::builds::BuildStatus::Succeeded, false, None, None)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        drop(c);

        let event = kiln::github::webhook::Event::PullRequest {
            repo: "acme/w".into(),
            action: "closed".into(),
            number: 9,
            head_sha: "0123".into(),
            author: "alice".into(),
            association: "MEMBER".into(),
        };
        let mut tx = db.begin().await.unwrap();
        let applied = kiln::github::webhook::apply(tx.ex(), "d-1", &event, None, None).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(applied.cancelled, vec![open.id]);
        assert_eq!(applied.disabled, vec!["w:pr-9".to_string()]);
        let mut c = db.conn().await.unwrap();
        let b = kiln::db::builds::get(c.ex(), open.id).await.unwrap().unwrap();
        assert_eq!((b.finished, b.build_status), (true, Some(4)));
        assert_eq!(b.error.as_deref(), Some("cancelled: pull request #9 was closed"));
        let d = kiln::db::builds::get(c.ex(), done.id).await.unwrap().unwrap();
        assert_eq!(d.build_status, Some(0), "a finished build stays as it was");
    })
    .await;
}
