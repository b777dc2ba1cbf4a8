//! Coordinators on one PostgreSQL database: exactly one runs the queue (an
//! advisory lock); another stands by, still serving pages and evaluating,
//! and takes over when the first dies, finishing its build. With roles
//! split across processes, one evaluates and serves, another builds, and
//! actions taken where no queue runs reach the one that does.

mod support;

use support::*;

fn config(db_url: &str, project: Option<&std::path::Path>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut text = format!("database_url = \"{db_url}\"\n");
    if let Some(p) = project {
        text.push_str(&format!("[[projects]]\nname = \"l\"\nrepo = \"{}\"\n", p.display()));
    }
    std::fs::write(dir.path().join("kiln.toml"), text).unwrap();
    dir
}

/// A flake whose `slow` job waits until `gate` exists (and, with `quick`,
/// a job that does not wait).
fn gated_flake(gate: &std::path::Path, tag: &str, quick: bool) -> Flake {
    let t = unique(tag);
    let slow = drv_expr(
        &format!("slow-{t}"),
        &format!("export PATH=/usr/bin:/bin; while [ ! -e {} ]; do sleep 0.1; done; echo > $out", gate.display()),
    );
    let quick =
        if quick { format!(" quick = {};", drv_expr(&format!("quick-{t}"), "echo > $out")) } else { String::new() };
    Flake::new(
        &format!(r#"{{ outputs = _: {{ hydraJobs = {{ slow = {slow};{quick} }}; }}; }}"#),
        &[(".kiln.toml", "[jobsets.main]\ncheck_interval = 0\n")],
    )
}

/// Waits until the first evaluation's `slow` build runs; its id.
async fn slow_build_running(api: &Api) -> i64 {
    wait_for(60, "the slow build to run on the first", || async {
        let e = api.get("/jobset/l/main/evals").await.1["evals"].as_array()?.first()?.clone();
        let (_, d) = api.get(&format!("/eval/{}", e["id"])).await;
        let id = d["jobs"]["slow"].as_i64()?;
        let (_, q) = api.get("/queue").await;
        (!q["running"].as_array()?.is_empty()).then_some(id)
    })
    .await
}

/// Waits until build `id` is finished; its JSON.
async fn finished(api: &Api, id: i64, what: &str) -> serde_json::Value {
    wait_for(90, what, || async {
        let (_, b) = api.get(&format!("/build/{id}")).await;
        (b["finished"] == 1).then_some(b)
    })
    .await
}

#[tokio::test]
async fn one_queue_runner_per_database_and_the_standby_takes_over_when_it_dies() {
    let pg = PgDatabase::create().await;
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("open");
    let flake = gated_flake(&gate, "lead", true);
    let mut first = Kiln::start_in(config(&pg.url, Some(flake.path())), &[]);
    let api1 = Api::new(&first.url, None);
    let slow = slow_build_running(&api1).await;

    let second = Kiln::start_in(config(&pg.url, None), &[]);
    let api2 = Api::new(&second.url, None);
    wait_for(20, "the second to stand by", || async {
        second.log().contains("standing by to take over").then_some(())
    })
    .await;
    assert!(!first.log().contains("standing by"), "the first leads");
    // The standby serves the same data.
    assert_eq!(api2.get(&format!("/build/{slow}")).await.1["finished"], 0);

    // The leader dies mid-build; the standby takes over and finishes it.
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    std::fs::write(&gate, "").unwrap();
    wait_for(30, "the take-over", || async { second.log().contains("runs the queue now").then_some(()) }).await;
    let b = finished(&api2, slow, "the slow build on the second").await;
    assert_eq!(b["buildstatus"], 0, "{b}");

    // One queue runner still: the new leader built it, once. (The quick
    // job may have been built by either, depending on when the first died.)
    let slow_built = |log: String| log.lines().filter(|l| l.contains("built step") && l.contains("slow-")).count();
    assert_eq!(slow_built(second.log()), 1, "{}", second.log());
}

/// Fencing: the leader's lock lives on one database connection; when that
/// connection is killed (`pg_terminate_backend`), the leader stops at once
/// (records nothing more; its build is left to end) and the standby takes
/// over; never two runners.
#[tokio::test]
async fn a_leader_whose_lock_connection_dies_stops_and_the_standby_takes_over() {
    let pg = PgDatabase::create().await;
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("open");
    let flake = gated_flake(&gate, "fence", false);
    let first = Kiln::start_in(config(&pg.url, Some(flake.path())), &[]);
    let api1 = Api::new(&first.url, None);
    let slow = slow_build_running(&api1).await;
    let second = Kiln::start_in(config(&pg.url, None), &[]);
    let api2 = Api::new(&second.url, None);
    wait_for(20, "the second to stand by", || async {
        second.log().contains("standing by to take over").then_some(())
    })
    .await;
    // The builder process of the first's attempt, by the gate it waits for.
    let running_here = || {
        std::process::Command::new("pgrep").args(["-f", &gate.display().to_string()]).output().unwrap().status.success()
    };
    assert!(running_here());

    // Kill the first's lock connection, not the process.
    {
        use sqlx::Connection;
        let mut c = sqlx::PgConnection::connect(&pg.url).await.unwrap();
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_locks
             WHERE locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())) t",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        assert_eq!(n, 1, "one advisory lock held");
    }
    wait_for(20, "the first to step down", || async { first.log().contains("lost the queue's lock").then_some(()) })
        .await;
    wait_for(30, "the take-over", || async { second.log().contains("runs the queue now").then_some(()) }).await;
    // The first's attempt ended with its runner: the second runs its own.
    wait_for(20, "the second's attempt", || async {
        let (_, q) = api2.get("/queue").await;
        (!q["running"].as_array()?.is_empty()).then_some(())
    })
    .await;
    std::fs::write(&gate, "").unwrap();
    let b = finished(&api2, slow, "the slow build on the second").await;
    assert_eq!(b["buildstatus"], 0, "{b}");
    assert_eq!(second.log().matches("built step").count(), 1, "{}", second.log());
    // The first, still alive, stands by and never recorded a result.
    assert_eq!(first.log().matches("built step").count(), 0, "{}", first.log());
    let (_, q1) = api1.get("/queue").await;
    assert!(q1["running"].as_array().is_none_or(|r| r.is_empty()), "{q1}");
}

#[tokio::test]
async fn roles_split_across_processes_evaluate_in_one_and_build_in_another() {
    let pg = PgDatabase::create().await;
    let t = unique("roles");
    let flake = Flake::new(
        &format!(
            r#"{{ outputs = _: {{ hydraJobs = {{ ok = {}; bad = {}; }}; }}; }}"#,
            drv_expr(&format!("ok-{t}"), "echo > $out"),
            drv_expr(&format!("bad-{t}"), "echo broken; exit 1"),
        ),
        &[(".kiln.toml", "[jobsets.main]\ncheck_interval = 0\n")],
    );
    // The builder: queue (and web, to look at it), no project of its own.
    let builder = Kiln::start_with(config(&pg.url, None), &[], &["--roles", "web,queue"]);
    // The front: web and evaluation, where the project is declared and tokens live.
    let front_dir = config(&pg.url, Some(flake.path()));
    std::fs::write(front_dir.path().join("token"), "roles-token").unwrap();
    let text = std::fs::read_to_string(front_dir.path().join("kiln.toml")).unwrap();
    std::fs::write(front_dir.path().join("kiln.toml"), format!("api_token_files = [\"token\"]\n{text}")).unwrap();
    let front = Kiln::start_with(front_dir, &[], &["--roles", "web,eval,notify"]);
    let api = Api::new(&front.url, Some("roles-token"));

    let (ok, bad) = wait_for(90, "both builds, built by the builder", || async {
        let e = api.get("/jobset/l/main/evals").await.1["evals"].as_array()?.first()?.clone();
        let (_, d) = api.get(&format!("/eval/{}", e["id"])).await;
        let (ok, bad) = (d["jobs"]["ok"].as_i64()?, d["jobs"]["bad"].as_i64()?);
        let done = |b: serde_json::Value| b["finished"] == 1;
        (done(api.get(&format!("/build/{ok}")).await.1) && done(api.get(&format!("/build/{bad}")).await.1))
            .then_some((ok, bad))
    })
    .await;
    assert_eq!(api.get(&format!("/build/{ok}")).await.1["buildstatus"], 0);
    assert_eq!(api.get(&format!("/build/{bad}")).await.1["buildstatus"], 1);
    assert!(!front.log().contains("built step"), "the front builds nothing:\n{}", front.log());
    assert!(!builder.log().contains("evaluating"), "the builder evaluates nothing");
    assert!(builder.log().contains("built step"), "{}", builder.log());

    // Restarted where no queue runs: the builder tries it again.
    let (code, body) = api.send("POST", &format!("/build/{bad}/restart"), None).await;
    assert_eq!(code, 200, "{body}");
    wait_for(60, "the second attempt", || async { (builder.log().matches("step failed").count() >= 2).then_some(()) })
        .await;
    wait_for(30, "the restarted build to end", || async {
        (api.get(&format!("/build/{bad}")).await.1["finished"] == 1).then_some(())
    })
    .await;
}

/// PostgreSQL restarted under a running build (its own cluster, so the
/// shared one stays up for other tests): the leader's lock went with its
/// connection, so it stops dispatching and leads again once the database
/// is back; the build then finishes, once, and nothing is left running.
#[tokio::test]
async fn postgresql_restarted_mid_build_the_queue_leads_again_and_finishes_the_build() {
    let pg = support::pg::PrivatePg::start();
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("open");
    let flake = gated_flake(&gate, "pgrestart", true);
    let kiln = Kiln::start_in(config(&pg.url, Some(flake.path())), &[]);
    let api = Api::new(&kiln.url, None);
    let slow = slow_build_running(&api).await;

    pg.down();
    wait_for(20, "the runner to stop leading", || async { kiln.log().contains("lost the queue's lock").then_some(()) })
        .await;
    // While the database is away pages say so rather than hang.
    let down = reqwest::Client::new()
        .get(format!("{}/build/{slow}", kiln.url))
        .header("Accept", "application/json")
        .timeout(std::time::Duration::from_secs(30))
        .send()
        .await
        .unwrap();
    assert!(down.status().is_server_error(), "{}", down.status());
    pg.up();
    wait_for(60, "the runner to lead again", || async { kiln.log().contains("leading the queue again").then_some(()) })
        .await;
    std::fs::write(&gate, "").unwrap();
    let b = finished(&api, slow, "the slow build").await;
    if b["buildstatus"] != 0 {
        let log = reqwest::get(format!("{}/build/{slow}/log", kiln.url)).await.unwrap().text().await.unwrap();
        panic!("{b}\nthe step's log:\n{log}\nkiln:\n{}", kiln.log());
    }
    // Built (recorded) once, and no step is left running or queued.
    let log = kiln.log();
    assert_eq!(log.lines().filter(|l| l.contains("built step") && l.contains("slow-")).count(), 1, "{log}");
    let (_, q) = api.get("/queue").await;
    assert!(q["running"].as_array().is_some_and(|r| r.is_empty()), "{q}");
    assert!(q["runnable"].as_array().is_some_and(|r| r.is_empty()), "{q}");
    assert_eq!(q["unfinished"], 0, "{q}");
}

/// Events cross processes on PostgreSQL: a web-only node's event stream
/// (what its live pages follow) tells of a build that finishes on the
/// node that runs the queue, as it happens, not at a rescan.
#[tokio::test]
async fn a_web_node_streams_the_events_of_builds_another_node_runs() {
    let pg = PgDatabase::create().await;
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("open");
    let flake = gated_flake(&gate, "relay", false);
    let worker = Kiln::start_in(config(&pg.url, Some(flake.path())), &[]);
    let api = Api::new(&worker.url, None);
    let slow = slow_build_running(&api).await;

    let web = Kiln::start_with(config(&pg.url, None), &[], &["--roles", "web"]);
    let mut stream = reqwest::Client::new().get(format!("{}/api/events?build={slow}", web.url)).send().await.unwrap();
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    // The stream is open (its first bytes came) before the build ends.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let opened = std::time::Instant::now();
    std::fs::write(&gate, "").unwrap();
    // Keep-alives come every few seconds: the deadline is for the event.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut seen = String::new();
    while !seen.contains("event: build_finished") {
        let chunk = tokio::time::timeout_at(deadline, stream.chunk())
            .await
            .unwrap_or_else(|_| panic!("no build_finished on the web node: {seen}\n{}", web.log()))
            .unwrap()
            .expect("the stream stays open");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(seen.contains(&format!("\"build\":{slow}")), "{seen}");
    assert!(opened.elapsed() < std::time::Duration::from_secs(15), "{:?}", opened.elapsed());
    assert!(!web.log().contains("runs the queue"), "the web node runs no queue");
}

/// Actions taken on a web-only node reach the node that runs the queue at
/// once, through the event relay, not at its next rescan: a bump of a
/// build it holds has its priority read again, a restart has the database
/// rescanned within the second and the build taken again.
#[tokio::test]
async fn the_queue_hears_at_once_what_a_web_node_did() {
    let pg = PgDatabase::create().await;
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("open");
    let flake = gated_flake(&gate, "hears", true);
    let worker = Kiln::start_in(config(&pg.url, Some(flake.path())), &[]);
    let slow = slow_build_running(&Api::new(&worker.url, None)).await;

    let web_dir = config(&pg.url, None);
    std::fs::write(web_dir.path().join("token"), "hears-token").unwrap();
    let text = std::fs::read_to_string(web_dir.path().join("kiln.toml")).unwrap();
    std::fs::write(web_dir.path().join("kiln.toml"), format!("api_token_files = [\"token\"]\n{text}")).unwrap();
    let web = Kiln::start_with(web_dir, &[], &["--roles", "web"]);
    let api = Api::new(&web.url, Some("hears-token"));

    // A bump on the web node: the queue reads the build's priority again.
    let (code, body) = api.send("POST", &format!("/build/{slow}/bump"), None).await;
    assert_eq!(code, 200, "{body}");
    let bumped = format!("another node changed a queued build: its priority is read again build={slow}");
    wait_for(10, "the bump to reach the queue", || async { worker.log().contains(&bumped).then_some(()) }).await;

    // The quick job, finished, restarted on the web node: run again.
    std::fs::write(&gate, "").unwrap();
    let quick = wait_for(60, "the quick build to finish", || async {
        let e = api.get("/jobset/l/main/evals").await.1["evals"].as_array()?.first()?.clone();
        let (_, d) = api.get(&format!("/eval/{}", e["id"])).await;
        let id = d["jobs"]["quick"].as_i64()?;
        (api.get(&format!("/build/{id}")).await.1["finished"] == 1).then_some(id)
    })
    .await;
    let (code, body) = api.send("POST", &format!("/build/{quick}/restart"), None).await;
    assert_eq!(code, 200, "{body}");
    // Reopened in the database before the answer; finished again only by
    // the queue (its output is in the cache, so at once).
    let heard = format!("another node changed a build: rescanning build={quick}");
    wait_for(10, "the restart to reach the queue", || async { worker.log().contains(&heard).then_some(()) }).await;
    wait_for(30, "the restarted build to finish again", || async {
        (api.get(&format!("/build/{quick}")).await.1["finished"] == 1).then_some(())
    })
    .await;
}
