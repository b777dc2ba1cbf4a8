//! Two coordinators on one PostgreSQL database: exactly one runs the queue
//! (an advisory lock); the other stands by, still serving pages and
//! evaluating, and takes over when the first dies, finishing its build.

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

#[tokio::test]
async fn one_queue_runner_per_database_and_the_standby_takes_over_when_it_dies() {
    let pg = PgDatabase::create().await;
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("open");
    let t = unique("lead");
    let flake = Flake::new(
        &format!(
            r#"{{ outputs = _: {{ hydraJobs = {{ slow = {}; quick = {}; }}; }}; }}"#,
            drv_expr(
                &format!("slow-{t}"),
                &format!(
                    "export PATH=/usr/bin:/bin; while [ ! -e {} ]; do sleep 0.1; done; echo > $out",
                    gate.display()
                )
            ),
            drv_expr(&format!("quick-{t}"), "echo > $out"),
        ),
        &[(".kiln.toml", "[jobsets.main]\ncheck_interval = 0\n")],
    );
    let mut first = Kiln::start_in(config(&pg.url, Some(flake.path())), &[]);
    let api1 = Api::new(&first.url, None);
    let slow = wait_for(60, "the slow build to run on the first", || async {
        let e = api1.get("/jobset/l/main/evals").await.1["evals"].as_array()?.first()?.clone();
        let (_, d) = api1.get(&format!("/eval/{}", e["id"])).await;
        let id = d["jobs"]["slow"].as_i64()?;
        let (_, q) = api1.get("/queue").await;
        (!q["running"].as_array()?.is_empty()).then_some(id)
    })
    .await;

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
    let b = wait_for(90, "the slow build on the second", || async {
        let (_, b) = api2.get(&format!("/build/{slow}")).await;
        (b["finished"] == 1).then_some(b)
    })
    .await;
    assert_eq!(b["buildstatus"], 0, "{b}");

    // One queue runner still: the new leader built it, once.
    assert_eq!(second.log().matches("built step").count(), 1, "{}", second.log());
}
