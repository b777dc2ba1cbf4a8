//! Build logs on disk (issue 14): a 50 MiB log goes through `kiln serve`
//! to a follower that joined mid-build, byte for byte, while the server's
//! memory stays flat; an attempt cut by a machine fault keeps its log
//! beside the step's. Real Nix builders behind real sshds.

mod support;

use std::time::{Duration, Instant};

use support::*;

/// `kiln serve` building one project on `machines`, with `extra` kiln.toml lines.
fn serve(name: &str, flake: &Flake, machines: &[&Builder], extra: &str) -> (Kiln, tempfile::NamedTempFile) {
    let file = tempfile::NamedTempFile::new().unwrap();
    let lines: Vec<String> = machines.iter().map(|b| b.machines_line_with_port.clone()).collect();
    std::fs::write(file.path(), lines.join("\n") + "\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "machines_file = \"{}\"\n{extra}\n[[projects]]\nname = \"{name}\"\nrepo = \"{}\"\n",
            file.path().display(),
            flake.path().display()
        ),
    )
    .unwrap();
    (Kiln::start_in(dir, &[]), file)
}

/// The build of `job` in the project's first evaluation: (id, drv base name).
async fn build_of(api: &Api, project: &str, job: &str) -> (i64, String) {
    wait_for(120, "the build", || async {
        let (_, v) = api.get(&format!("/jobset/{project}/main/evals")).await;
        let e = v["evals"].as_array()?.first()?.clone();
        let (_, detail) = api.get(&format!("/eval/{}", e["id"])).await;
        let id = detail["jobs"][job].as_i64()?;
        let (_, b) = api.get(&format!("/build/{id}")).await;
        Some((id, b["drvpath"].as_str()?.trim_start_matches("/nix/store/").to_string()))
    })
    .await
}

async fn finished(api: &Api, id: i64) -> Option<serde_json::Value> {
    let (_, b) = api.get(&format!("/build/{id}")).await;
    (b["finished"] == 1).then_some(b)
}

async fn text(url: &str) -> (u16, String) {
    let r = reqwest::Client::new().get(url).header("Accept", "text/plain").send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// Follows a log with `?follow=1` to its end on a task of its own.
fn follow(url: String) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut r = reqwest::Client::new().get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let mut all = Vec::new();
        while let Some(chunk) = r.chunk().await.unwrap() {
            all.extend_from_slice(&chunk);
        }
        all
    })
}

/// A field of /proc/<pid>/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn decompress(path: &std::path::Path) -> Vec<u8> {
    zstd::stream::decode_all(std::fs::File::open(path).unwrap()).unwrap()
}

const LINES: usize = 51_200;
const LINE: usize = 1024;

/// Line `i` of the big log: 1 KiB, numbered.
fn big_line(i: usize, pad: &str) -> String {
    format!("{i:07} {pad}\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_50_mib_log_reaches_a_follower_whole_and_costs_the_server_no_memory() {
    let t = unique("big");
    let pad = "x".repeat(LINE - 9);
    // The builder keeps no copy of its own (bzip2 of 50 MiB takes a while).
    let sshd = Sshd::start();
    let builder = Builder::with_nix_config(&sshd, "b0", 1, "substituters =\nkeep-build-log = false");
    let script = format!(
        "echo started-{t}; sleep 2; i=0; while [ $i -lt {LINES} ]; do printf '%07d %s\\n' $i {pad}; i=$((i+1)); done; echo > $out"
    );
    let flake =
        Flake::new(&format!("{{ outputs = _: {{ hydraJobs = {{ big = {}; }}; }}; }}", drv_expr(&t, &script)), &[]);
    let (kiln, _machines) = serve("big", &flake, &[&builder], "");
    let api = Api::new(&kiln.url, None);
    let pid = kiln.child.id();
    let (id, drv) = build_of(&api, "big", "big").await;

    // The step is building once its first line shows.
    wait_for(120, "the first line of the log", || async {
        let (code, body) = text(&format!("{}/log/{drv}", kiln.url)).await;
        (code == 200 && body.contains(&format!("started-{t}"))).then_some(())
    })
    .await;
    let (rss_before, hwm_before) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    let follower = follow(format!("{}/build/{id}/log?follow=1", kiln.url));
    // Sampled while the step prints its 50 MiB and its log is stored.
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let on = sampling.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while on.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(status_kib(pid, "VmRSS:"));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(finished(&api, id).await.is_none(), "the follower joined mid-build");
    let started = Instant::now();
    let b = wait_for(300, "the big build", || finished(&api, id)).await;
    let took = started.elapsed();
    let followed = tokio::time::timeout(Duration::from_secs(60), follower).await.expect("the follower ended").unwrap();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let rss_peak = sampler.join().unwrap();
    let hwm_after = status_kib(pid, "VmHWM:");
    assert_eq!(b["buildstatus"], 0, "{b}\n{}", kiln.log());

    // The stored log, read straight from its file, is what was followed.
    let hash = &drv[..32];
    let file = kiln.dir.path().join("kiln-state/logs").join(&hash[..2]).join(format!("{drv}.zst"));
    let stored = decompress(&file);
    assert!(followed == stored, "followed {} bytes, stored {}", followed.len(), stored.len());
    // And it is the builder's output, whole, in order.
    let mut expected = Vec::with_capacity(LINES * LINE);
    for i in 0..LINES {
        expected.extend_from_slice(big_line(i, &pad).as_bytes());
    }
    let first = big_line(0, &pad);
    let at = stored.windows(first.len()).position(|w| w == first.as_bytes()).expect("the first big line");
    assert!(stored.len() >= at + expected.len(), "the log ends early: {} bytes", stored.len());
    assert!(stored[at..at + expected.len()] == expected[..], "the 50 MiB differ");
    let rest = String::from_utf8_lossy(&stored[at + expected.len()..]).into_owned();
    assert!(!rest.contains("kiln:"), "nothing was cut or missing: {rest}");
    let (_, over_http) = text(&format!("{}/log/{drv}", kiln.url)).await;
    assert_eq!(over_http.len(), stored.len(), "GET /log serves the stored log");
    assert!(
        std::fs::read_dir(kiln.dir.path().join("kiln-state/logs/live")).unwrap().next().is_none(),
        "the live file is gone"
    );

    let mib = |kib: u64| kib as f64 / 1024.0;
    let growth = rss_peak.saturating_sub(rss_before);
    let hwm_growth = hwm_after.saturating_sub(hwm_before);
    eprintln!(
        "memory per running step with a 50 MiB log: kiln serve VmRSS {:.1} MiB before, {:.1} MiB at most while it \
         ran and its log was stored (+{:.1} MiB); VmHWM +{:.1} MiB; {} bytes in {:.1} s, one follower",
        mib(rss_before),
        mib(rss_peak),
        mib(growth),
        mib(hwm_growth),
        stored.len(),
        took.as_secs_f64()
    );
    assert!(growth < 16 << 10, "kiln serve grew by {:.1} MiB while a 50 MiB log went through", mib(growth));
    assert!(hwm_growth < 16 << 10, "kiln serve's peak grew by {:.1} MiB", mib(hwm_growth));
}

/// Processes whose command line holds `s`.
fn pids_with(s: &str) -> Vec<String> {
    let out = std::process::Command::new("pgrep").args(["-f", s]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attempt_cut_by_a_machine_fault_keeps_its_log_beside_the_steps() {
    let t = unique("cut");
    let sshds = [Sshd::start(), Sshd::start()];
    let builders = [Builder::new(&sshds[0], "b0", 1), Builder::new(&sshds[1], "b1", 1)];
    let script = format!(
        "echo begin-{t}; i=0; while [ $i -lt 40 ]; do echo tick $i; sleep 0.25; i=$((i+1)); done; echo end-{t}; echo > $out"
    );
    let flake =
        Flake::new(&format!("{{ outputs = _: {{ hydraJobs = {{ cut = {}; }}; }}; }}", drv_expr(&t, &script)), &[]);
    let (kiln, _machines) = serve("cut", &flake, &[&builders[0], &builders[1]], "");
    let api = Api::new(&kiln.url, None);
    let (id, drv) = build_of(&api, "cut", "cut").await;

    wait_for(120, "the first attempt's third tick", || async {
        let (code, body) = text(&format!("{}/log/{drv}", kiln.url)).await;
        (code == 200 && body.contains("tick 2\n")).then_some(())
    })
    .await;
    let follower = follow(format!("{}/build/{id}/log?follow=1", kiln.url));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The builder that has the step loses its nix-store: the connection breaks.
    let (_, queue) = api.get("/queue").await;
    let machine =
        queue["running"][0]["machine"].as_str().unwrap_or_else(|| panic!("a running step: {queue}")).to_string();
    let b = builders.iter().zip(&sshds).find(|(_, s)| machine.ends_with(&format!(":{}", s.port))).unwrap().0;
    let victims = pids_with(&format!("root={}", b.root.display()));
    assert!(!victims.is_empty(), "the builder's nix-store runs");
    for pid in &victims {
        let _ = std::process::Command::new("kill").args(["-KILL", pid]).status();
    }
    // A follower of the attempt ends with it, with what it printed.
    let followed = tokio::time::timeout(Duration::from_secs(30), follower).await.expect("the follower ended").unwrap();
    let followed = String::from_utf8(followed).unwrap();
    assert!(followed.contains(&format!("begin-{t}")) && followed.contains("tick 2\n"), "{followed}");
    assert!(!followed.contains(&format!("end-{t}")), "{followed}");

    // Tried again on the other machine, where it is built.
    let done = wait_for(120, "the build", || finished(&api, id)).await;
    assert_eq!(done["buildstatus"], 0, "{done}\n{}", kiln.log());
    let base = format!("{}/build/{id}/log", kiln.url);
    let (code, first) = text(&format!("{base}?attempt=1")).await;
    assert_eq!(code, 200, "{first}");
    assert_eq!(first, followed, "the first attempt's log is what its follower read");
    assert!(!first.contains("did not arrive"), "its stderr ended with the connection: {first}");
    let (code, last) = text(&base).await;
    assert_eq!(code, 200);
    assert!(last.contains(&format!("begin-{t}")) && last.contains("tick 39\n") && last.contains(&format!("end-{t}")));
    assert_eq!(last.matches(&format!("begin-{t}")).count(), 1, "the step's log is its last attempt's: {last}");
    // The page lists the earlier attempt.
    let page = reqwest::Client::new().get(&base).header("Accept", "text/html").send().await.unwrap();
    let page = page.text().await.unwrap();
    assert!(page.contains("Earlier attempts") && page.contains("attempt=1\">attempt 1</a>"), "{page}");
    let page = reqwest::Client::new().get(format!("{base}?attempt=1")).header("Accept", "text/html").send().await;
    let page = page.unwrap().text().await.unwrap();
    assert!(page.contains(&format!("begin-{t}")) && page.contains("attempt 1"), "{page}");
    // Only kept attempts, by number.
    assert_eq!(text(&format!("{base}?attempt=2")).await.0, 404, "the second try is the step's log");
    for bad in ["..%2F..%2Fkiln.db", "-1", "1.zst"] {
        assert_eq!(text(&format!("{base}?attempt={bad}")).await.0, 400, "{bad}");
    }
    let hash = &drv[..32];
    let logs = kiln.dir.path().join("kiln-state/logs");
    assert!(logs.join(&hash[..2]).join(format!("{drv}.attempts/1.zst")).exists());
    assert!(std::fs::read_dir(logs.join("live")).unwrap().next().is_none(), "no live file is left");
}
