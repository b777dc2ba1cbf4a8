//! Faults that must stay where they happen (issue 14), injected for real:
//! a builder whose SSH port accepts and never answers, a cancelled build
//! whose step is still running on a real builder.

mod support;

use std::io::Read;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use support::*;

/// A TCP port that accepts connections and never says a word: what an
/// SSH client sees of a hung host (or a firewall that lets SYNs through).
struct BlackHole {
    port: u16,
}

impl BlackHole {
    fn start() -> BlackHole {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                // Held open and read, never answered.
                std::thread::spawn(move || {
                    let mut s = s;
                    let mut buf = [0u8; 1024];
                    while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
                });
            }
        });
        BlackHole { port }
    }
}

#[test]
fn a_builder_that_never_answers_does_not_hold_up_the_others() {
    let names: Vec<String> = (0..12).map(|i| format!("j{i}")).collect();
    let tag = unique("hole");
    let jobs: Vec<String> = names
        .iter()
        .map(|n| {
            format!(
                r#"{n} = derivation {{ name = "{n}-{tag}"; system = "{SYSTEM}"; builder = "/bin/sh"; PATH = "/bin:/usr/bin"; args = [ "-c" "sleep 0.3; echo {n} > $out" ]; }};"#
            )
        })
        .collect();
    let f = Flake::new(&format!("{{ outputs = _: {{ hydraJobs = {{ {} }}; }}; }}", jobs.join(" ")), &[]);
    let outs: Vec<String> = names.iter().map(|n| f.eval_raw(&format!("hydraJobs.{n}.outPath"))).collect();

    let sshd = Sshd::start();
    // Room for every job on the live machines, so the dispatch latency
    // measures the queue, not a wait for a free slot.
    let live = [Builder::new(&sshd, "b0", 6), Builder::new(&sshd, "b1", 6)];
    let hole = BlackHole::start();
    let work = tempfile::tempdir().unwrap();
    let machines = work.path().join("machines");
    std::fs::write(
        &machines,
        format!(
            "ssh://root@127.0.0.1:{} {SYSTEM} {} 1 1 - - {}\n{}\n{}\n",
            hole.port,
            sshd.user_key.display(),
            sshd.host_key_b64,
            live[0].machines_line_with_port,
            live[1].machines_line_with_port
        ),
    )
    .unwrap();
    let config = work.path().join("kiln.toml");
    // Connecting to the silent host takes this long to fail; everything
    // the live builders do must happen well within it.
    std::fs::write(&config, "[queue]\nconnect_timeout_s = 10\n").unwrap();

    let started = Instant::now();
    let child = kiln_cmd()
        .args(["build", "--json", "--config"])
        .arg(&config)
        .arg("--machines")
        .arg(&machines)
        .arg(".#hydraJobs")
        .current_dir(f.path())
        .env("TMPDIR", work.path())
        .env("KILN_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Eleven of the twelve (one went to the silent host, first in the
    // file) are built on the live machines while its connection hangs.
    let built_on_live = || outs.iter().filter(|o| live.iter().any(|b| b.has(o))).count();
    let mut live_done_at = None;
    let mut seen = 0;
    while started.elapsed() < Duration::from_secs(9) {
        seen = built_on_live();
        if seen >= 11 {
            live_done_at = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        live_done_at.is_some(),
        "only {seen} jobs built on the live machines within 9 s: the silent host held up the others\n{stderr}"
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(built_on_live(), 12, "every job ends up built on a live machine\n{stderr}");
    // The step sent to the silent host was the machine's fault: retried
    // elsewhere at once, not failed, not held back.
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["buildstatus"], 0, "{v}");
    }
    let median: f64 = stderr
        .lines()
        .find(|l| l.contains("dispatch latency"))
        .and_then(|l| l.split("median_ms=").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .map(|s| s.trim_matches('"').parse().unwrap())
        .unwrap_or_else(|| panic!("no dispatch latency line\n{stderr}"));
    eprintln!("dispatch latency with a silent host: median {median} ms; live machines done in {live_done_at:?}");
    assert!(median < 100.0, "dispatch latency median {median} ms with a silent host\n{stderr}");
}

/// Whether a process whose command line holds `marker` runs on this host
/// (the builders are chroot stores behind a local sshd).
fn process_with(marker: &str) -> bool {
    std::process::Command::new("pgrep").args(["-f", marker]).output().unwrap().status.success()
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_build_stops_its_step_on_the_builder_and_frees_the_slot() {
    each_backend(|db| async move {
        use kiln::db::builds::BuildStatus;
        use support::inproc::*;
        let sshd = Sshd::start();
        let builder = Builder::new(&sshd, "b0", 1);
        let machines = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(machines.path(), format!("{}\n", builder.machines_line_with_port)).unwrap();
        let state = tempfile::tempdir().unwrap();
        let queue = start_queue(&db, machines.path(), state.path(), Default::default());
        let (_, jobset) = make_jobset(&db, "p", "main").await;
        let marker = unique("sleeper");
        let slow = instantiate(&format!(
            r#"derivation {{ name = "slow-{marker}"; system = "{SYSTEM}"; builder = "/bin/sh"; PATH = "/bin:/usr/bin"; args = [ "-c" "sleep 300; echo {marker} > $out" ]; }}"#
        ));
        let quick = instantiate(&drv_expr(&format!("quick-{marker}"), "echo quick > $out"));
        let create = |job: &'static str, drv: String| {
            let db = db.clone();
            async move { new_build(&db, jobset, job, &drv).await }
        };
        let build = |id: i64| {
            let db = db.clone();
            async move { build(&db, id).await }
        };
        let step_state = |drv: String| {
            let db = db.clone();
            async move { step_state(&db, &drv).await }
        };

        let slow_id = create("slow", slow.clone()).await;
        queue.enqueue(vec![slow_id]).await;
        wait_for(60, "the slow step to run on the builder", || async {
            (step_state(slow.clone()).await.as_deref() == Some("running") && process_with(&marker)).then_some(())
        })
        .await;
        // The only slot is taken: the quick build waits.
        let quick_id = create("quick", quick.clone()).await;
        queue.enqueue(vec![quick_id]).await;
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        assert!(!build(quick_id).await.finished, "the machine has one slot, taken by the slow step");

        let cancelled_at = std::time::Instant::now();
        queue.cancel(slow_id);
        // The slot is free at once: the quick build runs and finishes.
        wait_for(10, "the quick build", || async { build(quick_id).await.finished.then_some(()) }).await;
        let freed = cancelled_at.elapsed();
        assert_eq!(build(quick_id).await.status(), Some(BuildStatus::Succeeded));
        assert!(freed < std::time::Duration::from_secs(3), "the slot was free {freed:?} after the cancel");
        // The remote build is gone, not left sleeping on the machine.
        wait_for(2, "the slow builder process to end", || async { (!process_with(&marker)).then_some(()) }).await;
        let b = build(slow_id).await;
        assert_eq!(b.status(), Some(BuildStatus::Cancelled));
        // Nothing needs the step: neither running nor listed as runnable.
        assert_eq!(step_state(slow.clone()).await.as_deref(), Some("waiting"));
        assert!(!builder.has(nix("nix-store", &["-q", "--outputs", &slow]).trim()));
        queue.stop();
    })
    .await;
}

/// Makes the database refuse to record any step as succeeded (a trigger
/// that raises), as a database in trouble does mid-transition; or lifts it.
async fn refuse_success(db: &kiln::db::Db, refuse: bool) {
    let sql: &[&'static str] = match (db, refuse) {
        (kiln::db::Db::Sqlite(_), true) => &["CREATE TRIGGER refuse_success BEFORE UPDATE OF state ON steps
              WHEN NEW.state = 'succeeded' BEGIN SELECT RAISE(ABORT, 'injected: refusing to record a success'); END"],
        (kiln::db::Db::Sqlite(_), false) => &["DROP TRIGGER refuse_success"],
        (kiln::db::Db::Postgres(_), true) => &[
            "CREATE FUNCTION refuse_success() RETURNS trigger LANGUAGE plpgsql AS
              $$ BEGIN RAISE EXCEPTION 'injected: refusing to record a success'; END $$",
            "CREATE TRIGGER refuse_success BEFORE UPDATE OF state ON steps
              FOR EACH ROW WHEN (NEW.state = 'succeeded') EXECUTE FUNCTION refuse_success()",
        ],
        (kiln::db::Db::Postgres(_), false) => &["DROP TRIGGER refuse_success ON steps"],
    };
    for &q in sql {
        match db {
            kiln::db::Db::Sqlite(p) => sqlx::query(q).execute(p).await.map(|_| ()),
            kiln::db::Db::Postgres(p) => sqlx::query(q).execute(p).await.map(|_| ()),
        }
        .unwrap();
    }
}

/// Item 4: a step's result that the database refuses is neither lost nor
/// built again: the runner keeps it and records it once the database takes
/// it, while the step stays out of the queue.
#[tokio::test(flavor = "multi_thread")]
async fn a_result_the_database_refuses_is_recorded_when_it_takes_it_and_never_built_twice() {
    each_backend(|db| async move {
        use kiln::db::builds::BuildStatus;
        use support::inproc::*;
        let sshd = Sshd::start();
        // The builder's sandbox lets its builds write here: how the test
        // counts the times the derivation was really built.
        let seen = tempfile::tempdir().unwrap();
        // Builds run as one of Nix's build users.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(seen.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let builder = Builder::with_nix_config(
            &sshd,
            "b0",
            2,
            &format!("substituters =\nextra-sandbox-paths = {}", seen.path().display()),
        );
        let machines = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(machines.path(), format!("{}\n", builder.machines_line_with_port)).unwrap();
        let state = tempfile::tempdir().unwrap();
        let queue = start_queue(&db, machines.path(), state.path(), Default::default());
        let (_, jobset) = make_jobset(&db, "p", "main").await;
        let runs = seen.path().join("runs");
        let tag = unique("refused");
        let drv = instantiate(&drv_expr(
            &format!("once-{tag}"),
            &format!("echo run >> {} || exit 1; echo > $out", runs.display()),
        ));
        let runs_so_far = || std::fs::read_to_string(&runs).unwrap_or_default().lines().count();

        refuse_success(&db, true).await;
        let id = new_build(&db, jobset, "once", &drv).await;
        queue.enqueue(vec![id]).await;
        wait_for(60, "the refused result to wait for the database", || async {
            (queue.status.lock().unwrap().unrecorded == 1).then_some(())
        })
        .await;
        assert_eq!(runs_so_far(), 1, "built once");
        // Nothing moves while the database refuses: neither finished, nor
        // dispatched again.
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        assert!(!build(&db, id).await.finished);
        assert_eq!(runs_so_far(), 1, "a refused result is not a reason to build again");
        assert!(queue.status.lock().unwrap().running.is_empty(), "the step is not running again");

        refuse_success(&db, false).await;
        wait_for(10, "the result to be recorded", || async { build(&db, id).await.finished.then_some(()) }).await;
        assert_eq!(build(&db, id).await.status(), Some(BuildStatus::Succeeded));
        assert_eq!(step_state(&db, &drv).await.as_deref(), Some("succeeded"));
        assert_eq!(runs_so_far(), 1, "built exactly once");
        assert_eq!(queue.status.lock().unwrap().unrecorded, 0);
        queue.stop();
    })
    .await;
}

/// Item 3 on the coordinator itself (`localhost`): cancelling stops the
/// builder too. The local `nix-store` was killed outright when its
/// connection went, before it could stop its builder (which Nix runs in a
/// session of its own): the builder went on, and wrote its output under
/// the next attempt's.
#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_local_build_stops_its_builder() {
    use kiln::db::builds::BuildStatus;
    use support::inproc::*;
    let t = TestDb::sqlite().await;
    let machines = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(machines.path(), format!("localhost {SYSTEM} - 1\n")).unwrap();
    let state = tempfile::tempdir().unwrap();
    let queue = start_queue(&t.db, machines.path(), state.path(), Default::default());
    let (_, jobset) = make_jobset(&t.db, "p", "main").await;
    let marker = unique("local-sleeper");
    let slow = instantiate(&format!(
        r#"derivation {{ name = "slow-{marker}"; system = "{SYSTEM}"; builder = "/bin/sh"; PATH = "/bin:/usr/bin"; args = [ "-c" "sleep 300; echo {marker} > $out" ]; }}"#
    ));
    let id = new_build(&t.db, jobset, "slow", &slow).await;
    queue.enqueue(vec![id]).await;
    let builder = format!("sleep 300; echo {marker}");
    wait_for(60, "the local builder to run", || async { process_with(&builder).then_some(()) }).await;
    queue.cancel(id);
    wait_for(2, "the local builder to end", || async { (!process_with(&builder)).then_some(()) }).await;
    assert_eq!(build(&t.db, id).await.status(), Some(BuildStatus::Cancelled));
    queue.stop();
}
