//! SIGTERM while a build runs: Kiln stops dispatching, lets the running
//! step finish and records it, then exits; started again, it builds
//! nothing twice. With a stop timeout shorter than the build, it exits
//! anyway and the step is built again after the restart, once.

mod support;

use std::time::Duration;

use support::*;

struct Setup {
    flake: Flake,
    gate: std::path::PathBuf,
    _gate_dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("open");
    let t = unique("stop");
    let flake = Flake::new(
        &format!(
            r#"{{ outputs = _: {{ hydraJobs = {{ slow = {}; }}; }}; }}"#,
            drv_expr(
                &format!("slow-{t}"),
                &format!(
                    "export PATH=/usr/bin:/bin; while [ ! -e {} ]; do sleep 0.1; done; echo > $out",
                    gate.display()
                )
            ),
        ),
        &[(".kiln.toml", "[jobsets.main]\ncheck_interval = 0\n")],
    );
    Setup { flake, gate, _gate_dir: gate_dir }
}

fn config(flake: &Flake, stop_timeout_s: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "[queue]\nstop_timeout_s = {stop_timeout_s}\n[[projects]]\nname = \"s\"\nrepo = \"{}\"\n",
            flake.path().display()
        ),
    )
    .unwrap();
    dir
}

/// The build of job `slow`, once it is running.
async fn running_build(api: &Api) -> i64 {
    wait_for(60, "the slow build to run", || async {
        let e = api.get("/jobset/s/main/evals").await.1["evals"].as_array()?.first()?.clone();
        let (_, d) = api.get(&format!("/eval/{}", e["id"])).await;
        let id = d["jobs"]["slow"].as_i64()?;
        let (_, q) = api.get("/queue").await;
        (!q["running"].as_array()?.is_empty()).then_some(id)
    })
    .await
}

fn sigterm(kiln: &Kiln) {
    std::process::Command::new("kill").args(["-TERM", &kiln.child.id().to_string()]).status().unwrap();
}

#[tokio::test]
async fn sigterm_waits_for_the_running_step_and_records_it() {
    let s = setup();
    let mut kiln = Kiln::start_in(config(&s.flake, 60), &[]);
    let api = Api::new(&kiln.url, None);
    let build = running_build(&api).await;

    sigterm(&kiln);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(kiln.child.try_wait().unwrap().is_none(), "Kiln waits for the running step");
    std::fs::write(&s.gate, "").unwrap();
    let status = kiln.terminate();
    assert!(status.success(), "{status}\n{}", kiln.log());
    assert!(kiln.log().contains("waiting for running steps"), "{}", kiln.log());

    let dir = std::mem::replace(&mut kiln.dir, tempfile::tempdir().unwrap());
    let again = Kiln::start_in(dir, &[]);
    let api = Api::new(&again.url, None);
    let (_, b) = api.get(&format!("/build/{build}")).await;
    assert_eq!((b["finished"].clone(), b["buildstatus"].clone()), (1.into(), 0.into()), "recorded before exiting: {b}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!again.log().contains("built step"), "nothing is built twice:\n{}", again.log());
}

#[tokio::test]
async fn past_the_stop_timeout_kiln_exits_and_builds_the_step_again_after_a_restart() {
    let s = setup();
    let mut kiln = Kiln::start_in(config(&s.flake, 1), &[]);
    let api = Api::new(&kiln.url, None);
    let build = running_build(&api).await;
    sigterm(&kiln);
    let status = kiln.terminate();
    assert!(status.success(), "{status}");
    assert!(kiln.log().contains("built again after a restart"), "{}", kiln.log());

    std::fs::write(&s.gate, "").unwrap();
    let dir = std::mem::replace(&mut kiln.dir, tempfile::tempdir().unwrap());
    let again = Kiln::start_in(dir, &[]);
    let api = Api::new(&again.url, None);
    wait_for(60, "the build after the restart", || async {
        let (_, b) = api.get(&format!("/build/{build}")).await;
        (b["finished"] == 1).then_some(())
    })
    .await;
    let (_, b) = api.get(&format!("/build/{build}")).await;
    assert_eq!(b["buildstatus"], 0, "{b}");
    assert_eq!(again.log().matches("built step").count(), 1, "built once more:\n{}", again.log());
}
