//! Aggregates are real: an aggregate job (`_hydraAggregate` with
//! `constituents`, here named as Hydra allows) succeeds only when every
//! constituent succeeded, waits for the slow ones, and its page lists the
//! constituents with their statuses. Real Nix, a real SSH builder.

mod support;

use std::collections::BTreeMap;

use serde_json::Value;
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn an_aggregate_succeeds_only_when_every_constituent_did() {
    let tag = unique("agg");
    let drv = |name: &str, script: &str, extra: &str| {
        format!(
            r#"{name} = derivation {{ name = "{name}-{tag}"; system = "{SYSTEM}"; builder = "/bin/sh"; PATH = "/bin:/usr/bin"; args = [ "-c" "{script}" ]; {extra} }};"#
        )
    };
    let jobs = [
        drv("ok", "echo ok > $out", ""),
        drv("bad", "exit 1", ""),
        drv("slow", "sleep 3; echo slow > $out", ""),
        drv("agg", "echo agg > $out", r#"_hydraAggregate = true; constituents = [ "ok" "bad" ];"#),
        drv("aggOk", "echo aggOk > $out", r#"_hydraAggregate = true; constituents = [ "ok" "slow" ];"#),
    ];
    let f = Flake::new(
        &format!(
            "{{ outputs = _: let {} in {{ hydraJobs = {{ inherit ok bad slow agg aggOk; }}; }}; }}",
            jobs.join(" ")
        ),
        &[],
    );
    let sshd = Sshd::start();
    let builder = Builder::new(&sshd, "b0", 4);
    let work = tempfile::tempdir().unwrap();
    let machines = work.path().join("machines");
    std::fs::write(&machines, format!("{}\n", builder.machines_line_with_port)).unwrap();
    let state = work.path().join("state");
    let out = kiln_cmd()
        .args(["build", "--json", "--machines"])
        .arg(&machines)
        .arg("--state")
        .arg(&state)
        .arg(".#hydraJobs")
        .current_dir(f.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let results: BTreeMap<String, Value> = build_results(&out);
    let status = |job: &str| results[job]["buildstatus"].as_i64().unwrap_or_else(|| panic!("{job}: {stderr}"));
    assert_eq!(status("ok"), 0, "{stderr}");
    assert_eq!(status("bad"), 1, "{stderr}");
    assert_eq!(status("slow"), 0, "{stderr}");
    // Its own derivation built fine; a constituent failed: dependency failed.
    assert_eq!(status("agg"), 2, "{}", results["agg"]);
    assert!(results["agg"]["error"].as_str().unwrap_or("").contains("bad"), "{}", results["agg"]);
    assert_eq!(status("aggOk"), 0, "{}", results["aggOk"]);

    // aggOk's derivation took no time; it finished only after slow did.
    let db = kiln::db::Db::connect(&format!("sqlite://{}", state.join("kiln.db").display())).await.unwrap();
    let (ids, stops): (BTreeMap<String, i64>, BTreeMap<String, i64>) = {
        let mut c = db.conn().await.unwrap();
        let rows: Vec<(String, i64, i64)> = kiln::db::run!(c.ex(), c => sqlx::query_as("SELECT job, id, stop_time FROM builds").fetch_all(&mut *c).await.unwrap());
        (rows.iter().map(|r| (r.0.clone(), r.1)).collect(), rows.iter().map(|r| (r.0.clone(), r.2)).collect())
    };
    assert!(stops["aggOk"] >= stops["slow"], "{stops:?}");
    db.close().await;

    // The aggregate's page lists its constituents with their statuses.
    let kiln = Kiln::start(&format!("state_dir = \"{}\"\n", state.display()), &[]);
    let html = reqwest::get(format!("{}/build/{}", kiln.url, ids["agg"])).await.unwrap().text().await.unwrap();
    let table = html.split("id=\"constituents\"").nth(1).unwrap_or_else(|| panic!("no constituents table:\n{html}"));
    let table = table.split("</table>").next().unwrap();
    for (job, label) in [("bad", "failed"), ("ok", "succeeded")] {
        let row = table
            .split("<tr>")
            .find(|r| r.contains(&format!("<td>{job}</td>")))
            .unwrap_or_else(|| panic!("{job} not listed:\n{table}"));
        assert!(row.contains(&format!("/build/{}", ids[job])), "{row}");
        assert!(row.contains(label), "{job} should be {label}: {row}");
    }
    // A job that is no aggregate has no such table.
    let html = reqwest::get(format!("{}/build/{}", kiln.url, ids["ok"])).await.unwrap().text().await.unwrap();
    assert!(!html.contains("id=\"constituents\""));
}
