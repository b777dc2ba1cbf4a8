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
    assert!(median < 100.0, "dispatch latency median {median} ms with a silent host\n{stderr}");
}
