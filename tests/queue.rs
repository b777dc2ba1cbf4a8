//! The queue runner with two real builders (chroot stores behind private
//! sshds) and real Nix: shared steps built once, failures and their
//! dependents, unsupported systems, timeouts, a builder that dies, a
//! coordinator killed mid-run, and outputs that substitute from the cache.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::*;

/// A shell loop that keeps a builder busy for about `n` × 10 µs: the
/// chroot builders have nothing but /bin/sh.
fn spin(n: u32) -> String {
    format!("i=0; while [ $i -lt {n} ]; do i=$((i+1)); done")
}

fn d(name: &str, deps: &[&str], script: &str) -> String {
    format!(
        r#"{name} = derivation {{ name = "{name}-@T@"; system = "x86_64-linux"; builder = "/bin/sh"; deps = [ {} ]; args = [ "-c" "{script}" ]; }};"#,
        deps.join(" ")
    )
}

/// Two builders, each behind its own sshd; the machines file lists both.
struct Farm {
    sshds: Vec<Sshd>,
    builders: Vec<Builder>,
    file: tempfile::NamedTempFile,
}

fn farm(slots: u32) -> Farm {
    let sshds = vec![Sshd::start(), Sshd::start()];
    let builders: Vec<Builder> =
        sshds.iter().enumerate().map(|(i, s)| Builder::new(s, &format!("b{i}"), slots)).collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    let lines: Vec<String> = builders.iter().map(|b| b.machines_line_with_port.clone()).collect();
    std::fs::write(file.path(), lines.join("\n") + "\n").unwrap();
    Farm { sshds, builders, file }
}

/// `kiln serve` building one project on the farm's machines.
fn serve_project(farm: &Farm, name: &str, flake: &Flake) -> Kiln {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "machines_file = \"{}\"\n[[projects]]\nname = \"{name}\"\nrepo = \"{}\"\n",
            farm.file.path().display(),
            flake.path().display()
        ),
    )
    .unwrap();
    Kiln::start_in(dir, &[])
}

fn kiln_build(
    dir: &std::path::Path,
    machines: &std::path::Path,
    attr: &str,
    config: &str,
) -> (Option<i32>, BTreeMap<String, serde_json::Value>, String) {
    std::fs::write(dir.join("kiln-build.toml"), config).unwrap();
    let out = kiln_cmd()
        .args(["build", "--json", "--state", "state", "--config", "kiln-build.toml", "--machines"])
        .arg(machines)
        .arg(format!(".#{attr}"))
        .current_dir(dir)
        .output()
        .unwrap();
    (out.status.code(), build_results(&out), String::from_utf8_lossy(&out.stderr).into_owned())
}

async fn open_db(dir: &std::path::Path) -> kiln::db::Db {
    kiln::db::Db::connect(&format!("sqlite://{}", dir.join("state/kiln.db").display())).await.unwrap()
}

#[tokio::test]
async fn failures_propagate_and_unsupported_and_timeouts_end_with_their_status() {
    let farm = farm(2);
    let t = unique("q");
    let flake_text = format!(
        "{{ outputs = _: let {} {} {} {} {} {} {} in {{ hydraJobs = {{ inherit l1 l2 m1 t1 bad after; arm = derivation {{ name = \"arm\"; system = \"aarch64-linux\"; builder = \"/bin/sh\"; }}; slow = (derivation {{ name = \"slow-{t}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"{}\" ]; }}) // {{ meta.timeout = 1; }}; }}; }}; }}",
        d("l1", &[], "echo l1 > $out"),
        d("l2", &[], "echo l2 > $out"),
        d("m1", &["l1", "l2"], "echo m1 $deps > $out"),
        d("t1", &["m1", "l2"], "echo t1 $deps > $out"),
        d("bad", &[], "echo this one fails; exit 1"),
        d("after", &["bad", "l1"], "echo > $out"),
        "",
        spin(20_000_000),
    )
    .replace("@T@", &t);
    let flake = Flake::new(&flake_text, &[]);
    let (code, jobs, stderr) =
        kiln_build(flake.path(), farm.file.path(), "hydraJobs", "[queue]\nunsupported_grace_s = 2\n");
    assert_eq!(code, Some(1), "{stderr}");
    let status = |j: &str| jobs.get(j).unwrap_or_else(|| panic!("{j} missing: {stderr}"))["buildstatus"].as_i64();
    for j in ["l1", "l2", "m1", "t1"] {
        assert_eq!(status(j), Some(0), "{j}: {stderr}");
        assert!(jobs[j]["machine"].as_str().unwrap().contains("127.0.0.1"));
    }
    assert_eq!(status("bad"), Some(1));
    assert_eq!(status("after"), Some(2), "a dependent of a failed step");
    assert_eq!(status("arm"), Some(9), "no machine builds aarch64-linux");
    assert_eq!(status("slow"), Some(7), "meta.timeout = 1");

    // Every step was dispatched once, and its log kept.
    let db = open_db(flake.path()).await;
    let mut c = db.conn().await.unwrap();
    let rows: Vec<(String, String, i64)> = kiln::db::run!(c.ex(), c => sqlx::query_as("SELECT drv_path, state, tries FROM steps").fetch_all(&mut *c).await.unwrap());
    for (drv, state, tries) in &rows {
        if state == "succeeded" || state == "failed" {
            assert_eq!(*tries, 1, "{drv} was dispatched {tries} times");
        }
    }
    let bad_drv = jobs["bad"]["drvPath"].as_str().unwrap();
    let logs = kiln::logs::Logs::new(&flake.path().join("state"));
    let mut log = String::new();
    std::io::Read::read_to_string(&mut logs.open(bad_drv).expect("the failed step's log"), &mut log).unwrap();
    assert!(log.contains("this one fails"), "{log}");

    // The outputs are in Kiln's cache and substitute with a real client.
    let cache = format!("file://{}", flake.path().join("state/cache").display());
    let pk = std::fs::read_to_string(flake.path().join("state/keys/cache.pub")).unwrap();
    let client = NixClient::new();
    let (store, root) = client.store("client");
    let top = jobs["t1"]["outputs"]["out"].as_str().unwrap();
    let out = client
        .cmd("nix")
        .args(["copy", "--from", &cache, "--to", &store, "--option", "trusted-public-keys", pk.trim(), top])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read_to_string(root.join(top.trim_start_matches('/'))).unwrap().starts_with("t1 "));

    // Run again: everything built is cached, the failure is remembered.
    let (_, again, stderr) =
        kiln_build(flake.path(), farm.file.path(), "hydraJobs", "[queue]\nunsupported_grace_s = 2\n");
    assert_eq!(again["t1"]["status"], "cached", "{stderr}");
    assert_eq!(again["bad"]["buildstatus"], 8, "cached failure");
    drop(farm);
}

#[tokio::test]
async fn shared_steps_build_once_across_builds_and_jobsets() {
    let farm = farm(2);
    let t = unique("share");
    // Two jobsets (hydraJobs and checks) whose jobs share a diamond of inputs.
    let flake_text = format!(
        "{{ outputs = _: let {} {} {} {} {} {} in {{ hydraJobs = {{ inherit top1 top2; }}; checks.x86_64-linux = {{ inherit top1 top3; }}; }}; }}",
        d("base", &[], &format!("{}; echo base > $out", spin(100_000))),
        d("left", &["base"], "echo left $deps > $out"),
        d("right", &["base"], "echo right $deps > $out"),
        d("top1", &["left", "right"], "echo top1 $deps > $out"),
        d("top2", &["left"], "echo top2 $deps > $out"),
        d("top3", &["right", "base"], "echo top3 $deps > $out"),
    )
    .replace("@T@", &t);
    let flake = Flake::new(
        &flake_text,
        &[(
            ".kiln.toml",
            "[jobsets.jobs]\nattributes = [\"hydraJobs\"]\n[jobsets.checks]\nattributes = [\"checks\"]\n",
        )],
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "t").unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "api_token_files = [\"token\"]\nmachines_file = \"{}\"\n[[projects]]\nname = \"shared\"\nrepo = \"{}\"\n",
            farm.file.path().display(),
            flake.path().display()
        ),
    )
    .unwrap();
    let kiln = Kiln::start_in(dir, &[]);
    let api = Api::new(&kiln.url, None);
    for (jobset, n) in [("jobs", 2), ("checks", 2)] {
        let ev = wait_for(120, &format!("{jobset} built"), || async {
            let (_, v) = api.get(&format!("/jobset/shared/{jobset}/evals")).await;
            let e = v["evals"].as_array()?.first()?.clone();
            let (_, detail) = api.get(&format!("/eval/{}", e["id"])).await;
            let ids: Vec<i64> = detail["builds"].as_array()?.iter().filter_map(|b| b.as_i64()).collect();
            let mut finished = 0;
            for id in &ids {
                let (_, b) = api.get(&format!("/build/{id}")).await;
                if b["finished"] == 1 {
                    finished += 1;
                }
            }
            (ids.len() == n && finished == n).then_some(detail)
        })
        .await;
        for id in ev["builds"].as_array().unwrap() {
            let (_, b) = api.get(&format!("/build/{id}")).await;
            assert_eq!(b["buildstatus"], 0, "{b}\n{}", kiln.log());
        }
    }
    // top1 is one build per jobset but one step; base, left, right one step each.
    let db = kiln::db::Db::connect(&format!("sqlite://{}", kiln.dir.path().join("kiln-state/kiln.db").display()))
        .await
        .unwrap();
    let mut c = db.conn().await.unwrap();
    let rows: Vec<(String, String, i64)> = kiln::db::run!(c.ex(), c => sqlx::query_as("SELECT drv_path, state, tries FROM steps ORDER BY drv_path").fetch_all(&mut *c).await.unwrap());
    assert_eq!(rows.len(), 6, "{rows:?}");
    for (drv, state, tries) in &rows {
        assert_eq!((state.as_str(), *tries), ("succeeded", 1), "{drv}");
    }
    let nbuilds: i64 = kiln::db::run!(c.ex(), c => sqlx::query_scalar("SELECT COUNT(*) FROM builds").fetch_one(&mut *c).await.unwrap());
    assert_eq!(nbuilds, 4);
    drop(farm);
}

#[tokio::test]
async fn a_builder_that_dies_mid_build_has_its_step_finished_elsewhere() {
    let mut farm = farm(1);
    let t = unique("dies");
    let flake_text = format!(
        "{{ outputs = _: let {} in {{ hydraJobs = {{ inherit slow; }}; }}; }}",
        d("slow", &[], &format!("echo started; {}; echo done > $out", spin(3_000_000)))
    )
    .replace("@T@", &t);
    let flake = Flake::new(&flake_text, &[]);
    std::fs::write(flake.path().join("kiln-build.toml"), "[queue]\nretry_delay_s = 0\nconnect_timeout_s = 5\n")
        .unwrap();
    let child = kiln_cmd()
        .args(["build", "--json", "--config", "kiln-build.toml", "--machines"])
        .arg(farm.file.path())
        .arg(".#hydraJobs")
        .current_dir(flake.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first builder in the file gets the step; wait until it builds.
    let b0 = farm.builders[0].root.display().to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let ps = std::process::Command::new("ps").args(["-eo", "args"]).output().unwrap();
        let ps = String::from_utf8_lossy(&ps.stdout);
        if ps.lines().any(|l| l.contains("--serve") && l.contains(&b0))
            && ps.lines().any(|l| l.contains(&format!("slow-{t}")) || l.contains("while [ $i -lt 3000000 ]"))
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the build never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The machine goes away: its sshd and the serve process on it.
    farm.sshds[0].stop();
    let _ = std::process::Command::new("pkill").args(["-KILL", "-f", &format!("root={b0}")]).status();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").to_string();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("no result: {stderr}"));
    assert_eq!(v["buildstatus"], 0, "{v}\n{stderr}");
    assert!(
        v["machine"].as_str().unwrap().contains(&farm.builders[1].root.display().to_string()),
        "finished on the other builder: {v}"
    );
    assert!(stderr.contains("will be retried"), "{stderr}");
}

#[tokio::test]
async fn killed_mid_run_and_restarted_it_finishes_every_build_once() {
    let farm = farm(1);
    let t = unique("crash");
    // A chain: each link takes a while, so the kill lands mid-run.
    let mut lets = Vec::new();
    let mut prev: Option<String> = None;
    for i in 0..6 {
        let name = format!("c{i}");
        let deps: Vec<&str> = prev.iter().map(String::as_str).collect();
        lets.push(d(&name, &deps, &format!("{}; echo {name} $deps > $out", spin(400_000))));
        prev = Some(name);
    }
    let flake_text =
        format!("{{ outputs = _: let {} in {{ hydraJobs = {{ inherit c0 c2 c5; }}; }}; }}", lets.join(" "))
            .replace("@T@", &t);
    let flake = Flake::new(&flake_text, &[]);
    let mut kiln = serve_project(&farm, "crash", &flake);
    let db_url = format!("sqlite://{}", kiln.dir.path().join("kiln-state/kiln.db").display());
    let succeeded = |db: kiln::db::Db| async move {
        let mut c = db.conn().await.unwrap();
        let n: i64 = kiln::db::run!(c.ex(), c => sqlx::query_scalar("SELECT COUNT(*) FROM steps WHERE state = 'succeeded'").fetch_one(&mut *c).await.unwrap());
        n
    };
    let db = kiln::db::Db::connect(&db_url).await.unwrap();
    wait_for(120, "two steps built", || {
        let db = db.clone();
        async move { (succeeded(db).await >= 2).then_some(()) }
    })
    .await;
    let _ = std::process::Command::new("kill").args(["-KILL", &kiln.child.id().to_string()]).status();
    let _ = kiln.child.wait();
    assert!(succeeded(db.clone()).await < 6, "killed mid-run");

    // Started again on the same state, it finishes everything.
    let state = std::mem::replace(&mut kiln.dir, tempfile::tempdir().unwrap());
    let again = Kiln::start_in(state, &[]);
    wait_for(120, "all builds finished", || {
        let db = db.clone();
        async move {
            let mut c = db.conn().await.unwrap();
            let open: i64 = kiln::db::run!(c.ex(), c => sqlx::query_scalar("SELECT COUNT(*) FROM builds WHERE finished = FALSE").fetch_one(&mut *c).await.unwrap());
            let all: i64 = kiln::db::run!(c.ex(), c => sqlx::query_scalar("SELECT COUNT(*) FROM builds").fetch_one(&mut *c).await.unwrap());
            (all == 3 && open == 0).then_some(())
        }
    })
    .await;
    let mut c = db.conn().await.unwrap();
    let statuses: Vec<i64> = kiln::db::run!(c.ex(), c => sqlx::query_scalar("SELECT build_status FROM builds").fetch_all(&mut *c).await.unwrap());
    assert_eq!(statuses, vec![0, 0, 0], "{}", again.log());
    let steps: Vec<(String, i64)> =
        kiln::db::run!(c.ex(), c => sqlx::query_as("SELECT state, tries FROM steps").fetch_all(&mut *c).await.unwrap());
    assert_eq!(steps.len(), 6);
    assert!(steps.iter().all(|(s, _)| s == "succeeded"), "{steps:?}");
    // What was built before the kill was not built again; at most the step
    // that was running was tried twice.
    assert!(steps.iter().filter(|(_, tries)| *tries > 1).count() <= 1, "{steps:?}");
    let running: i64 = kiln::db::run!(c.ex(), c => sqlx::query_scalar("SELECT COUNT(*) FROM steps WHERE state = 'running'").fetch_one(&mut *c).await.unwrap());
    assert_eq!(running, 0);
    drop(farm);
}

#[test]
fn machines_check_reports_each_builder() {
    let farm = farm(1);
    let out = kiln_cmd()
        .args(["machines", "check", "--machines"])
        .arg(farm.file.path())
        .current_dir(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().filter(|l| l.contains(" ok (")).count(), 2, "{stdout}");
    assert!(stdout.contains("2.7"), "protocol version: {stdout}");

    // A bad line is reported with its number; a dead builder fails the check.
    let bad = tempfile::NamedTempFile::new().unwrap();
    let dead = farm.builders[0].machines_line_with_port.replace(&format!(":{}", farm.sshds[0].port), ":1");
    std::fs::write(
        bad.path(),
        format!("{}\nnonsense x86_64-linux - lots\n{dead}\n", farm.builders[1].machines_line_with_port),
    )
    .unwrap();
    let out = kiln_cmd()
        .args(["machines", "check", "--machines"])
        .arg(bad.path())
        .current_dir(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 2: max jobs \"lots\" is not a number"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().filter(|l| l.contains(" ok (")).count(), 1, "{stdout}");
    assert!(stdout.contains("127.0.0.1:1"), "{stdout}");
}

#[tokio::test]
async fn cancel_restart_and_bump_builds() {
    use kiln::db::builds::{self, BuildStatus, NewBuild};
    use kiln::queue::{MachineSource, Queue};
    let farm = farm(1);
    let state = tempfile::tempdir().unwrap();
    let t = TestDb::sqlite().await;
    let config = kiln::config::Config { state_dir: state.path().to_path_buf(), ..Default::default() };
    let cache =
        kiln::cache::Cache::open(&config, t.db.clone(), kiln::nix::SigningKey::generate("q-1").unwrap()).unwrap();
    let logs = kiln::logs::Logs::new(state.path());
    let queue_config = kiln::config::QueueConfig { unsupported_grace_s: 3600, ..Default::default() };
    let events = kiln::events::Events::new();
    let mut announced = events.subscribe();
    let queue = Queue::start(
        t.db.clone(),
        cache,
        logs,
        MachineSource::File(farm.file.path().to_path_buf()),
        queue_config,
        state.path().to_path_buf(),
        events.clone(),
        None,
        kiln::queue::leader::Leadership::Alone,
        kiln::upstream::Upstreams::none(),
    );
    let (_, jobset) = make_jobset(&t.db, "p", "main").await;
    let tag = unique("crb");
    let instantiate = |expr: String| {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("e.nix"), expr).unwrap();
        nix("nix-instantiate", &[d.path().join("e.nix").to_str().unwrap()]).trim().to_string()
    };
    let fail_drv = instantiate(drv_expr(&format!("fails-{tag}"), "exit 1"));
    let arm_drv =
        instantiate(format!(r#"derivation {{ name = "arm-{tag}"; system = "aarch64-linux"; builder = "/bin/sh"; }}"#));
    let mut ids = Vec::new();
    for (job, drv) in [("fails", &fail_drv), ("arm", &arm_drv)] {
        let mut c = t.db.conn().await.unwrap();
        let b = builds::create(
            c.ex(),
            &NewBuild {
                jobset_id: jobset,
                job: job.into(),
                drv_path: drv.clone(),
                nix_name: job.into(),
                system: "x86_64-linux".into(),
                timeout: 60,
                max_silent: 60,
                priority: 100,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        ids.push(b.id);
    }
    queue.enqueue(ids.clone()).await;
    let build = |id: i64| {
        let db = t.db.clone();
        async move {
            let mut c = db.conn().await.unwrap();
            builds::get(c.ex(), id).await.unwrap().unwrap()
        }
    };
    let failed = wait_for(60, "the failing build", || async {
        let b = build(ids[0]).await;
        b.finished.then_some(b)
    })
    .await;
    assert_eq!(failed.status(), Some(BuildStatus::Failed));

    // Bump: the waiting build moves ahead of everything (global priority).
    queue.bump(ids[1]);
    wait_for(10, "the bump", || async { (build(ids[1]).await.global_priority > 0).then_some(()) }).await;
    // Cancel: the build that no machine can take ends as cancelled.
    queue.cancel(ids[1]);
    let cancelled = wait_for(10, "the cancel", || async {
        let b = build(ids[1]).await;
        b.finished.then_some(b)
    })
    .await;
    assert_eq!(cancelled.status(), Some(BuildStatus::Cancelled));
    // Every change so far was announced, in order, for the pages to follow.
    let mut names = Vec::new();
    while let Ok(ev) = announced.try_recv() {
        names.push(match ev {
            kiln::events::Event::BuildFinished { build, buildstatus, jobset: j } => {
                assert_eq!(j, Some(jobset));
                format!("finished {} {buildstatus}", if build == ids[0] { "fails" } else { "arm" })
            }
            kiln::events::Event::BuildQueued { build, .. } => {
                format!("queued {}", if build == ids[0] { "fails" } else { "arm" })
            }
            other => other.name().to_string(),
        });
    }
    // The step may start before or after the second build is queued.
    let without_step: Vec<&String> = names.iter().filter(|n| *n != "step_started").collect();
    assert_eq!(
        without_step,
        ["queued fails", "queued arm", "finished fails 1", "finished arm 4"],
        "announced: {names:?}"
    );
    let at = |n: &str| names.iter().position(|x| x == n).unwrap_or_else(|| panic!("no {n}: {names:?}"));
    assert!(at("queued fails") < at("step_started") && at("step_started") < at("finished fails 1"), "{names:?}");

    // Restart: the failed build is built again (not a cached failure): the
    // machines count a second attempt.
    let attempts = || {
        let db = t.db.clone();
        async move {
            let mut c = db.conn().await.unwrap();
            kiln::db::machines::list(c.ex()).await.unwrap().iter().map(|m| m.steps_done).sum::<i64>()
        }
    };
    assert_eq!(attempts().await, 1);
    queue.restart(ids[0]);
    let again = wait_for(60, "the restarted build", || async {
        let b = build(ids[0]).await;
        (b.finished && attempts().await == 2).then_some(b)
    })
    .await;
    assert_eq!(again.status(), Some(BuildStatus::Failed), "built and failed again, not status 8");
    let mut c = t.db.conn().await.unwrap();
    let step = kiln::db::steps::get_by_drv(c.ex(), &fail_drv).await.unwrap().unwrap();
    assert_eq!(step.tries, 1, "its failure was forgotten and it was tried afresh");
    queue.wait_idle().await;
    drop(farm);
}

#[tokio::test]
async fn the_log_of_a_running_step_can_be_read_while_it_builds() {
    let farm = farm(1);
    let t = unique("live");
    let flake_text = format!(
        "{{ outputs = _: let {} in {{ hydraJobs = {{ inherit chatty; }}; }}; }}",
        d("chatty", &[], &format!("echo started-{t}; {}; echo finished-{t}; echo > $out", spin(3_000_000)))
    )
    .replace("@T@", &t);
    let flake = Flake::new(&flake_text, &[]);
    let kiln = serve_project(&farm, "live", &flake);
    let api = Api::new(&kiln.url, None);
    let build = wait_for(60, "the build", || async {
        let (_, v) = api.get("/jobset/live/main/evals").await;
        let e = v["evals"].as_array()?.first()?.clone();
        let (_, detail) = api.get(&format!("/eval/{}", e["id"])).await;
        let id = detail["jobs"]["chatty"].as_i64()?;
        let (_, b) = api.get(&format!("/build/{id}")).await;
        Some(b)
    })
    .await;
    let drv = build["drvpath"].as_str().unwrap().trim_start_matches("/nix/store/").to_string();
    let so_far = wait_for(60, "the first line of the log", || async {
        let r = reqwest::get(format!("{}/log/{drv}", kiln.url)).await.ok()?;
        let text = r.text().await.ok()?;
        text.contains(&format!("started-{t}")).then_some(text)
    })
    .await;
    assert!(!so_far.contains(&format!("finished-{t}")), "read while building: {so_far}");
    let (_, b) = api.get(&format!("/build/{}", build["id"])).await;
    assert_eq!(b["finished"], 0, "still building");
    // Finished, the stored log has all of it.
    wait_for(60, "the build to finish", || async {
        let (_, b) = api.get(&format!("/build/{}", build["id"])).await;
        (b["finished"] == 1).then_some(())
    })
    .await;
    let full = reqwest::get(format!("{}/log/{drv}", kiln.url)).await.unwrap().text().await.unwrap();
    assert!(full.contains(&format!("started-{t}")) && full.contains(&format!("finished-{t}")), "{full}");
    drop(farm);
}

/// A build's start time is when its first step started on a machine, not
/// when it finished: a build that sleeps three seconds took at least three.
#[tokio::test]
async fn a_builds_start_time_is_when_its_first_step_started() {
    for backend in ["sqlite", "postgres"] {
        let t = unique("took");
        let flake = Flake::new(
            &format!(
                r#"{{ outputs = _: {{ hydraJobs = {{ slow = {}; }}; }}; }}"#,
                drv_expr(&format!("slow-{t}"), "export PATH=/usr/bin:/bin; sleep 3; echo > $out")
            ),
            &[(".kiln.toml", "[jobsets.main]\ncheck_interval = 0\n")],
        );
        let pg = if backend == "postgres" { Some(PgDatabase::create().await) } else { None };
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("kiln.toml"),
            format!(
                "{}[[projects]]\nname = \"took\"\nrepo = \"{}\"\n",
                pg.as_ref().map(|p| format!("database_url = \"{}\"\n", p.url)).unwrap_or_default(),
                flake.path().display()
            ),
        )
        .unwrap();
        let kiln = Kiln::start_in(dir, &[]);
        let api = Api::new(&kiln.url, None);
        let b = wait_for(120, "the slow build", || async {
            let e = api.get("/jobset/took/main/evals").await.1["evals"].as_array()?.first()?.clone();
            let id = api.get(&format!("/eval/{}", e["id"])).await.1["jobs"]["slow"].as_i64()?;
            let (_, b) = api.get(&format!("/build/{id}")).await;
            (b["finished"] == 1).then_some(b)
        })
        .await;
        assert_eq!(b["buildstatus"], 0, "{backend}: {b}\n{}", kiln.log());
        let (queued, start, stop) =
            (b["timestamp"].as_i64().unwrap(), b["starttime"].as_i64().unwrap(), b["stoptime"].as_i64().unwrap());
        assert!(stop - start >= 3, "{backend}: took {}s: {b}", stop - start);
        assert!(queued <= start, "{backend}: {b}");

        let db_url = pg
            .as_ref()
            .map(|p| p.url.clone())
            .unwrap_or_else(|| format!("sqlite://{}", kiln.dir.path().join("kiln-state/kiln.db").display()));
        let db = kiln::db::Db::connect(&db_url).await.unwrap();
        let mut c = db.conn().await.unwrap();
        let drv = b["drvpath"].as_str().unwrap().to_string();
        let step_start: i64 = kiln::db::run!(c.ex(), c => sqlx::query_scalar("SELECT start_time FROM steps WHERE drv_path = $1")
            .bind(&drv).fetch_one(&mut *c).await.unwrap());
        assert!(start <= step_start, "{backend}: the build started at {start}, its step at {step_start}");
        drop(c);
        db.close().await;
        drop(kiln);
    }
}
