//! `/metrics` parses as Prometheus text (checked by the reference parser,
//! `prometheus_client` from PyPI, in the test virtualenv) and counts what
//! happened: builds by status, step and evaluation durations, cache hits
//! and misses. `/readyz` says ready.

mod support;

use support::*;

/// The test virtualenv's Python (scripts/test installs it). Missing is a
/// failure, not a skip.
fn python() -> std::path::PathBuf {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/python");
    assert!(p.exists(), "target/venv is missing: run scripts/test");
    p
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_count_builds_and_cache_traffic() {
    let t = unique("met");
    let flake = Flake::new(
        &format!(
            r#"{{ outputs = _: {{ hydraJobs = {{ ok = {}; bad = {}; }}; }}; }}"#,
            drv_expr(&format!("ok-{t}"), "echo > $out"),
            drv_expr(&format!("bad-{t}"), "exit 1"),
        ),
        &[],
    );
    let kiln = Kiln::start(&format!("[[projects]]\nname = \"m\"\nrepo = \"{}\"\n", flake.path().display()), &[]);
    let api = Api::new(&kiln.url, None);
    let out = wait_for(90, "both builds", || async {
        let e = api.get("/jobset/m/main/evals").await.1["evals"].as_array()?.first()?.clone();
        let (_, d) = api.get(&format!("/eval/{}", e["id"])).await;
        let (ok, bad) = (d["jobs"]["ok"].as_i64()?, d["jobs"]["bad"].as_i64()?);
        let (_, okb) = api.get(&format!("/build/{ok}")).await;
        let (_, badb) = api.get(&format!("/build/{bad}")).await;
        (okb["finished"] == 1 && badb["finished"] == 1)
            .then(|| okb["buildoutputs"]["out"]["path"].as_str().map(str::to_string))?
    })
    .await;
    let hash = out.strip_prefix("/nix/store/").unwrap().split('-').next().unwrap().to_string();
    assert_eq!(reqwest::get(format!("{}/{hash}.narinfo", kiln.url)).await.unwrap().status(), 200);
    assert_eq!(reqwest::get(format!("{}/{}.narinfo", kiln.url, "0".repeat(32))).await.unwrap().status(), 404);
    assert_eq!(api.get("/readyz").await.0, 200);

    let r = reqwest::get(format!("{}/metrics", kiln.url)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = r.text().await.unwrap();

    // The reference parser reads it and hands back name → value.
    let script = r#"
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        key = s.name + "".join("{%s=%s}" % kv for kv in sorted(s.labels.items()))
        out[key] = s.value
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(python())
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "not Prometheus text: {}\n{text}", String::from_utf8_lossy(&o.stderr));
    let m: std::collections::HashMap<String, f64> = serde_json::from_slice(&o.stdout).unwrap();
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no {k} in:\n{text}"));
    assert!(get("kiln_builds_finished{status=succeeded}") >= 1.0);
    assert!(get("kiln_builds_finished{status=failed}") >= 1.0);
    assert!(get("kiln_cache_narinfo_hits_total") >= 1.0);
    assert!(get("kiln_cache_narinfo_misses_total") >= 1.0);
    assert!(get("kiln_step_duration_seconds_count") >= 2.0);
    assert_eq!(get("kiln_step_duration_seconds_bucket{le=+Inf}"), get("kiln_step_duration_seconds_count"));
    assert!(get("kiln_evaluation_duration_seconds_count") >= 1.0);
    assert_eq!(get("kiln_builds_unfinished"), 0.0);
    assert_eq!(get("kiln_results_unrecorded"), 0.0);
    assert_eq!(get("kiln_outbox_pending"), 0.0);
    assert!(get("kiln_db_connections") >= 1.0);
    assert!(m.keys().any(|k| k.starts_with("kiln_steps_running{machine=")), "{text}");
}
