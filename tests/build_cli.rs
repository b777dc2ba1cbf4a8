//! `kiln build` as a user runs it, with real Nix and real builders: its
//! state stays out of the working directory, "already built" means "in this
//! cache", a system no machine has fails at once, only built jobs show
//! outputs, and the progress line is redrawn on a terminal and plain
//! elsewhere.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

/// A job of a fixture flake; `@T@` makes its name unique to the test run.
fn job(name: &str, deps: &[&str], script: &str) -> String {
    format!(
        r#"{name} = derivation {{ name = "{name}-@T@"; system = "x86_64-linux"; builder = "/bin/sh"; deps = [ {} ]; PATH = "/bin:/usr/bin"; args = [ "-c" "{script}" ]; }};"#,
        deps.join(" ")
    )
}

fn flake(jobs: &[String], names: &[&str]) -> Flake {
    let text =
        format!("{{ outputs = _: let {} in {{ hydraJobs = {{ inherit {}; }}; }}; }}", jobs.join(" "), names.join(" "))
            .replace("@T@", &unique("b"));
    Flake::new(&text, &[])
}

/// A chroot-store builder behind its own sshd, and a machines file naming it.
struct OneBuilder {
    _sshd: Sshd,
    builder: Builder,
    file: tempfile::NamedTempFile,
}

fn one_builder() -> OneBuilder {
    let sshd = Sshd::start();
    let builder = Builder::new(&sshd, "b0", 2);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), format!("{}\n", builder.machines_line_with_port)).unwrap();
    OneBuilder { _sshd: sshd, builder, file }
}

/// `kiln build ARGS… .#hydraJobs` in `dir`, with its temporary files in `tmp`.
fn kiln_build(dir: &Path, tmp: &Path, args: &[&str]) -> Output {
    kiln_cmd().arg("build").args(args).arg(".#hydraJobs").current_dir(dir).env("TMPDIR", tmp).output().unwrap()
}

fn jobs(out: &Output) -> BTreeMap<String, Value> {
    build_results(out)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// The narinfo of `store_path` in the file cache at `cache`.
fn narinfo(cache: &Path, store_path: &str) -> PathBuf {
    let hash = store_path.trim_start_matches("/nix/store/").split('-').next().unwrap();
    cache.join(format!("{hash}.narinfo"))
}

fn progress_lines(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains(" built, ") && l.contains(" queued ")).collect()
}

#[test]
fn a_run_leaves_nothing_behind_and_shows_outputs_only_for_built_jobs() {
    let b = one_builder();
    let machines = b.file.path().to_str().unwrap();
    let f = flake(
        &[
            job("ok", &[], "echo ok > $out"),
            job("bad", &[], "echo this one fails; exit 1"),
            job("after", &["bad"], "echo > $out"),
        ],
        &["ok", "bad", "after"],
    );
    let before = entries(f.path());
    let tmp = tempfile::tempdir().unwrap();

    // The table, with stderr not a terminal.
    let out = kiln_build(f.path(), tmp.path(), &["--machines", machines]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let row = |j: &str| stdout.lines().find(|l| l.starts_with(&format!("{j} "))).unwrap_or_else(|| panic!("{stdout}"));
    let out_path = |j: &str| f.eval_raw(&format!("hydraJobs.{j}.outPath"));
    assert!(row("ok").contains("succeeded") && row("ok").contains(&out_path("ok")), "{stdout}");
    // The failures show their error, not the output they never built.
    assert!(row("bad").contains(" failed ") && row("bad").contains("exit code 1"), "{stdout}");
    assert!(!row("bad").contains(&out_path("bad")), "{stdout}");
    assert!(row("after").contains("dependency failed") && !row("after").contains(&out_path("after")), "{stdout}");
    assert!(!stdout.contains("binary cache file://"), "no cache is kept: {stdout}");
    assert!(stderr.contains("--cache DIR or --state DIR keeps it"), "{stderr}");
    // The failed step's log, which goes away with the temporary state.
    assert!(stderr.contains("> this one fails"), "{stderr}");
    // Plain progress lines, not one per tick.
    assert!(!stderr.contains('\r') && !stderr.contains("\x1b[K"), "{stderr:?}");
    let lines = progress_lines(&stderr);
    assert!(!lines.is_empty() && lines.len() <= 4, "{lines:#?}");

    // JSON: outputs only for the job that has them.
    let out = kiln_build(f.path(), tmp.path(), &["--json", "--machines", machines]);
    let j = jobs(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(j["ok"]["buildstatus"], 0, "{stderr}");
    let ok_out = j["ok"]["outputs"]["out"].as_str().unwrap_or_else(|| panic!("{:?}", j["ok"]));
    assert!(b.builder.has(ok_out), "built on the builder");
    assert_eq!(j["bad"]["buildstatus"], 1);
    assert_eq!(j["bad"]["outputs"], serde_json::json!({}), "{}", j["bad"]);
    assert_eq!(j["after"]["buildstatus"], 2);
    assert_eq!(j["after"]["outputs"], serde_json::json!({}), "{}", j["after"]);
    assert!(j.values().all(|v| v["cache"].is_null()), "{j:?}");

    // Nothing left in the working directory or in TMPDIR.
    let after: Vec<String> = entries(f.path()).into_iter().filter(|e| e != "flake.lock").collect();
    assert_eq!(after, before, "kiln build left files in the working directory");
    assert_eq!(entries(tmp.path()), Vec::<String>::new(), "the temporary state is removed");
}

#[test]
fn a_kept_state_counts_as_built_only_what_is_in_the_cache() {
    let b = one_builder();
    let machines = b.file.path().to_str().unwrap();
    let f =
        flake(&[job("one", &[], "echo one > $out"), job("two", &["one"], "echo two $deps > $out")], &["one", "two"]);
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let (c1, c2) = (work.path().join("c1"), work.path().join("c2"));
    let run = |cache: &Path| {
        let args = ["--json", "--machines", machines, "--state", state.to_str().unwrap(), "--cache"];
        let mut args: Vec<&str> = args.to_vec();
        args.push(cache.to_str().unwrap());
        let out = kiln_build(f.path(), work.path(), &args);
        assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
        jobs(&out)
    };
    let check = |j: &BTreeMap<String, Value>, cache: &Path, status: &str| {
        for name in ["one", "two"] {
            let v = &j[name];
            assert_eq!(v["status"], status, "{name}: {v}");
            assert_eq!(v["cache"], format!("file://{}", cache.display()));
            let out = v["outputs"]["out"].as_str().unwrap();
            assert!(narinfo(cache, out).exists(), "{name}'s output {out} is in {}", cache.display());
        }
    };

    let first = run(&c1);
    check(&first, &c1, "succeeded");
    // The same state, an empty cache: built again, into the new cache.
    let second = run(&c2);
    check(&second, &c2, "succeeded");
    // The same state and cache: already built.
    let third = run(&c2);
    check(&third, &c2, "cached");
    assert!(state.join("kiln.db").exists() && state.join("keys/cache.pub").exists());
    assert!(!f.path().join("kiln-state").exists());

    // The table says where the kept cache is and which key signed it.
    let out = kiln_build(
        f.path(),
        work.path(),
        &["--machines", machines, "--state", state.to_str().unwrap(), "--cache", c2.to_str().unwrap()],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let public = std::fs::read_to_string(state.join("keys/cache.pub")).unwrap();
    assert!(
        stdout.contains(&format!(
            "outputs are in the binary cache file://{} (signed by {})",
            c2.display(),
            public.trim()
        )),
        "{stdout}"
    );
}

#[test]
fn a_system_no_machine_has_fails_at_once() {
    let f = Flake::new(
        &format!(
            "{{ outputs = _: {{ hydraJobs.arm = derivation {{ name = \"{}\"; system = \"aarch64-linux\"; builder = \"/bin/sh\"; }}; }}; }}",
            unique("arm")
        ),
        &[],
    );
    let work = tempfile::tempdir().unwrap();
    // A grace from kiln.toml does not apply: the machines cannot change during the run.
    std::fs::write(work.path().join("kiln.toml"), "[queue]\nunsupported_grace_s = 600\n").unwrap();
    let state = work.path().join("state");
    let started = Instant::now();
    let out = kiln_cmd()
        .args(["build", "--json", "--config"])
        .arg(work.path().join("kiln.toml"))
        .arg("--state")
        .arg(&state)
        .arg(".#hydraJobs")
        .current_dir(f.path())
        .output()
        .unwrap();
    let took = started.elapsed();
    let j = jobs(&out);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(j["arm"]["buildstatus"], 9, "{}", j["arm"]);
    assert_eq!(j["arm"]["outputs"], serde_json::json!({}));
    assert!(j["arm"]["error"].as_str().unwrap().contains("aarch64-linux"), "{}", j["arm"]);
    assert!(took < Duration::from_secs(30), "took {took:?} (the default grace is 60 s)");
    // From queued to failed, without the evaluation's time.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (created, stopped): (i64, i64) = rt.block_on(async {
        let db = kiln::db::Db::connect(&format!("sqlite://{}", state.join("kiln.db").display())).await.unwrap();
        let mut c = db.conn().await.unwrap();
        kiln::db::run!(c.ex(), c => sqlx::query_as("SELECT created_at, stop_time FROM builds").fetch_one(&mut *c).await.unwrap())
    });
    assert!(stopped - created < 5, "queued at {created}, failed at {stopped}");

    // A machines file that cannot be read is a usage error, not a run where everything is unsupported.
    let out = kiln_build(f.path(), work.path(), &["--machines", "/nonexistent/machines"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/machines"));
}

#[test]
fn on_a_terminal_the_progress_line_is_redrawn_in_place() {
    // Built on this machine (no machines file): a job that takes a few
    // seconds, so the old behaviour would print a line per second.
    let f = flake(&[job("slow", &[], "sleep 4; echo > $out")], &["slow"]);
    let tmp = tempfile::tempdir().unwrap();
    let cmd = format!("{} build .#hydraJobs", env!("CARGO_BIN_EXE_kiln"));
    let out = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &cmd, "/dev/null"])
        .current_dir(f.path())
        .env("NIX_CONFIG", NIX_CONFIG)
        .env_remove("KILN_CONFIG")
        .env("TMPDIR", tmp.path())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script (util-linux) is installed");
    let transcript = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{transcript}");
    assert!(transcript.contains("slow ") && transcript.contains("succeeded"), "{transcript}");
    // Redrawn: each update returns to the start of the line and clears it.
    let redraws = transcript.matches("\rkiln: ").count();
    assert!(redraws >= 4, "{redraws} redraws in {transcript:?}");
    assert!(transcript.contains("\x1b[K"), "{transcript:?}");
    // What stays on the screen: one progress line, the last one.
    let visible: Vec<&str> = transcript
        .split('\n')
        .map(|l| l.trim_end_matches('\r'))
        .map(|l| l.rsplit('\r').next().unwrap_or(l))
        .filter(|l| l.contains(" built, ") && l.contains(" queued "))
        .collect();
    assert_eq!(visible.len(), 1, "{visible:#?}");
    assert!(visible[0].contains("kiln: 1 built, 0 failed, 0 running, 0 queued"), "{visible:?}");
    assert_eq!(entries(tmp.path()), Vec::<String>::new(), "the temporary state is removed");
}

#[test]
fn an_interrupted_run_removes_its_state_too() {
    // Short: the builder of a local `nix-store --serve` that is killed
    // outright outlives it until it ends.
    let f = flake(&[job("long", &[], "sleep 10; echo > $out")], &["long"]);
    let tmp = tempfile::tempdir().unwrap();
    let child = kiln_cmd()
        .args(["build", ".#hydraJobs"])
        .current_dir(f.path())
        .env("TMPDIR", tmp.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Built on this machine, whose Nix makes its build directory in TMPDIR.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !entries(tmp.path()).iter().any(|e| e.starts_with("nix-build-long")) {
        assert!(Instant::now() < deadline, "the build never started: {:?}", entries(tmp.path()));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(entries(tmp.path()).iter().any(|e| e.starts_with("kiln-build-")));
    std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("kiln: interrupted"), "{stderr}");
    // Nix's own build directory may stay (its builder was killed); Kiln's state does not.
    let left: Vec<String> = entries(tmp.path()).into_iter().filter(|e| e.starts_with("kiln-build-")).collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn it_refuses_a_database_where_a_server_runs_the_queue() {
    let f = flake(&[job("one", &[], "echo one > $out")], &["one"]);
    let b = one_builder();
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let kiln = Kiln::start(&format!("state_dir = \"{}\"\n", state.display()), &[]);
    let out = kiln_cmd()
        .args(["build", "--json", "--machines"])
        .arg(b.file.path())
        .arg("--state")
        .arg(&state)
        .arg(".#hydraJobs")
        .current_dir(f.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("another Kiln runs the queue on this database"), "{stderr}");
    // Nothing of the server's was touched, nothing of the run's written.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (projects, builds): (i64, i64) = rt.block_on(async {
        let db = kiln::db::Db::connect(&format!("sqlite://{}", state.join("kiln.db").display())).await.unwrap();
        let mut c = db.conn().await.unwrap();
        kiln::db::run!(c.ex(), c => sqlx::query_as("SELECT (SELECT COUNT(*) FROM projects WHERE name = 'kiln-build'), (SELECT COUNT(*) FROM builds)").fetch_one(&mut *c).await.unwrap())
    });
    assert_eq!((projects, builds), (0, 0));
    assert!(kiln.log().contains("listening"), "the server still runs");
}
