//! Evaluation inside `kiln serve`: projects on local git repositories are
//! evaluated on a push trigger and on their interval, builds are recorded
//! and reused, each evaluation reports its diff, and every kind of bad
//! input leaves a clear error while the previous evaluation stays.

mod support;

use serde_json::{Value, json};
use support::*;

const TOKEN: &str = "test-token-123";

fn job(name: &str, marker: &str) -> String {
    format!("{name} = {};", drv_expr(name, &format!("echo {marker} > $out")))
}

fn flake_with(jobs: &[String]) -> String {
    format!("{{ outputs = _: {{ hydraJobs = {{ {} }}; }}; }}", jobs.join(" "))
}

fn start_kiln(projects: &[(&str, &str)], extra: &str) -> Kiln {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    let mut cfg = format!("api_token_files = [\"token\"]\n{extra}\n");
    for (name, repo) in projects {
        cfg.push_str(&format!("[[projects]]\nname = \"{name}\"\nrepo = \"{repo}\"\n"));
    }
    std::fs::write(dir.path().join("kiln.toml"), cfg).unwrap();
    Kiln::start_in(dir, &[])
}

async fn evals(api: &Api, p: &str, j: &str) -> Vec<Value> {
    let (code, v) = api.get(&format!("/jobset/{p}/{j}/evals")).await;
    if code != 200 {
        return vec![];
    }
    v["evals"].as_array().cloned().unwrap_or_default()
}

/// Waits until the jobset has `n` finished evaluations; returns the newest.
async fn wait_evals(api: &Api, p: &str, j: &str, n: usize) -> Value {
    wait_for(60, &format!("{n} evaluations of {p}:{j}"), || async {
        let e = evals(api, p, j).await;
        let done: Vec<_> = e.iter().filter(|e| e["status"] != "running").collect();
        (done.len() >= n).then(|| done[0].clone())
    })
    .await
}

#[tokio::test]
async fn push_and_interval_evaluate_record_builds_and_report_the_diff() {
    let m = unique("m");
    let flake = Flake::new(
        &flake_with(&[job("a", &m), job("b", &m), job("c", &m)]),
        &[(".kiln.toml", "[jobsets.main]\ncheck_interval = 2\nkeep_evaluations = 2\n")],
    );
    let kiln = start_kiln(&[("demo", &flake.path().display().to_string())], "");
    let api = Api::new(&kiln.url, Some(TOKEN));

    // A new project is read and evaluated at once.
    let e1 = wait_evals(&api, "demo", "main", 1).await;
    assert_eq!(e1["status"], "succeeded", "{e1}");
    assert_eq!(e1["nrjobs"], 3);
    let (_, d1) = api.get(&format!("/eval/{}", e1["id"])).await;
    assert_eq!(d1["builds"].as_array().unwrap().len(), 3);
    assert_eq!(d1["diff"]["new"], json!(["a", "b", "c"]));
    assert_eq!(d1["commit"], git(flake.path(), &["rev-parse", "HEAD"]).trim());
    let build_a = d1["jobs"]["a"].clone();

    // A new commit is picked up by the interval, without any push: b changes,
    // c goes, d comes, e is broken.
    flake.write(
        "flake.nix",
        &flake_with(&[job("a", &m), job("b", "changed"), job("d", &m), "e = throw \"e is broken\";".into()]),
    );
    let rev2 = flake.commit("second");
    let e2 = wait_evals(&api, "demo", "main", 2).await;
    assert_eq!(e2["commit"], rev2);
    let (_, d2) = api.get(&format!("/eval/{}", e2["id"])).await;
    assert_eq!(d2["diff"]["new"], json!(["d", "e"]));
    assert_eq!(d2["diff"]["removed"], json!(["c"]));
    assert_eq!(d2["diff"]["changed"], json!(["b"]));
    assert_eq!(d2["diff"]["new_errors"], json!(["e"]));
    assert_eq!(
        (d2["jobsnew"].as_i64(), d2["jobsremoved"].as_i64(), d2["jobschanged"].as_i64(), d2["errorsnew"].as_i64()),
        (Some(2), Some(1), Some(1), Some(1))
    );
    assert!(d2["errors"]["e"].as_str().unwrap().contains("e is broken"));
    // An unchanged derivation keeps its build.
    assert_eq!(d2["jobs"]["a"], build_a);
    assert_ne!(d2["jobs"]["b"], d1["jobs"]["b"]);
    assert_eq!(d2["nrnewbuilds"], 2, "b and d are new builds");

    // Nothing changed: no new evaluation, however often it is checked.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(evals(&api, "demo", "main").await.len(), 2);

    // A push triggers at once (the interval is long now), and force
    // re-evaluates an unchanged commit.
    flake.write(".kiln.toml", "[jobsets.main]\ncheck_interval = 3600\nkeep_evaluations = 2\n");
    flake.write("flake.nix", &flake_with(&[job("a", &m), job("b", "third")]));
    let rev3 = flake.commit("third");
    let (code, v) = api.send("POST", "/api/push?jobsets=demo:main", None).await;
    assert_eq!((code, &v["jobsetsTriggered"]), (200, &json!(["demo:main"])));
    let e3 = wait_for(30, "the pushed evaluation", || async {
        let e = evals(&api, "demo", "main").await;
        e.first().filter(|e| e["commit"] == rev3 && e["status"] != "running").cloned()
    })
    .await;
    assert_eq!(e3["status"], "succeeded");
    let (code, _) = api.send("POST", "/api/push?jobsets=demo:main&force=1", None).await;
    assert_eq!(code, 200);
    wait_for(30, "a forced evaluation", || async {
        let e = evals(&api, "demo", "main").await;
        e.first().filter(|e| e["id"].as_i64() > e3["id"].as_i64() && e["status"] != "running").cloned()
    })
    .await;
    // keep_evaluations = 2: the oldest are pruned.
    assert_eq!(evals(&api, "demo", "main").await.len(), 2);
    assert_eq!(api.get(&format!("/eval/{}", e1["id"])).await.0, 404);
}

#[tokio::test]
async fn the_api_creates_projects_only_with_a_token() {
    let flake = Flake::new(&flake_with(&[job("x", &unique("m"))]), &[]);
    let kiln = start_kiln(&[], "");
    let anon = Api::new(&kiln.url, None);
    let body = json!({"displayname": "Via API", "description": "d", "enabled": true, "hidden": false, "repo": flake.path().display().to_string()});
    let (code, v) = anon.send("PUT", "/project/viaapi", Some(body.clone())).await;
    assert_eq!(code, 401, "{v}");
    assert_eq!(anon.get("/project/viaapi").await.0, 404);
    let bad = Api::new(&kiln.url, Some("wrong-token"));
    assert_eq!(bad.send("PUT", "/project/viaapi", Some(body.clone())).await.0, 401);
    assert_eq!(anon.send("POST", "/api/push?jobsets=viaapi:main", None).await.0, 401);

    let api = Api::new(&kiln.url, Some(TOKEN));
    let (code, v) = api.send("PUT", "/project/viaapi", Some(body.clone())).await;
    assert_eq!(code, 201, "{v}");
    assert_eq!(v["displayname"], "Via API");
    assert_eq!(api.send("PUT", "/project/viaapi", Some(body.clone())).await.0, 200);
    assert_eq!(api.send("PUT", "/project/bad%20name", Some(body.clone())).await.0, 400);
    assert_eq!(api.send("PUT", "/project/x", Some(json!({"repo": "/x", "colour": "red"}))).await.0, 400);
    assert_eq!(api.send("PUT", "/project/x", Some(json!({"displayname": "no repo"}))).await.0, 400);

    // Without .kiln.toml: one jobset `main` on the default branch, hydraJobs.
    let e = wait_evals(&api, "viaapi", "main", 1).await;
    assert_eq!((e["status"].as_str(), e["nrjobs"].as_i64()), (Some("succeeded"), Some(1)));
    let (_, p) = api.get("/project/viaapi").await;
    assert_eq!(p["jobsets"], json!(["main"]));
    assert_eq!(api.send("POST", "/api/push?jobsets=viaapi:main,viaapi:nope", None).await.0, 404);
    assert_eq!(api.send("POST", "/api/push?jobsets=nonsense", None).await.0, 400);
    assert_eq!(api.send("DELETE", "/project/viaapi", None).await.0, 204);
    assert_eq!(api.get("/project/viaapi").await.0, 404);
}

#[tokio::test]
async fn bad_input_leaves_clear_errors_and_keeps_the_previous_evaluation() {
    let m = unique("m");
    let good = Flake::new(&flake_with(&[job("ok", &m)]), &[(".kiln.toml", "[jobsets.main]\ncheck_interval = 0\n")]);
    let no_flake = Flake::new("{ outputs = _: { }; }", &[]);
    git(no_flake.path(), &["rm", "-q", "flake.nix"]);
    no_flake.write("README", "no flake here");
    no_flake.commit("no flake");
    let missing_branch =
        Flake::new(&flake_with(&[job("x", &m)]), &[(".kiln.toml", "[jobsets.rel]\nbranch = \"release\"\n")]);
    let missing_attr =
        Flake::new(&flake_with(&[job("x", &m)]), &[(".kiln.toml", "[jobsets.main]\nattributes = [\"nope\"]\n")]);
    let hog = Flake::new(
        &flake_with(&[job("fine", &m), "hog = derivation { name = toString (builtins.length (builtins.genList (x: [ x x ]) 80000000)); system = \"x86_64-linux\"; builder = \"/bin/sh\"; };".into()]),
        &[],
    );
    let slow = Flake::new(
        &format!(
            r#"{{ outputs = _: {{ hydraJobs.slow = import (derivation {{ name = "slow.nix"; system = "x86_64-linux"; builder = "/bin/sh"; PATH = "/bin:/usr/bin"; args = [ "-c" "sleep 60; echo 1 > $out" ]; m = "{m}"; }}); }}; }}"#
        ),
        &[],
    );
    let kiln = start_kiln(
        &[
            ("good", &good.path().display().to_string()),
            ("noflake", &no_flake.path().display().to_string()),
            ("missing", "/nonexistent/repository"),
            ("branch", &missing_branch.path().display().to_string()),
            ("attr", &missing_attr.path().display().to_string()),
            ("hog", &hog.path().display().to_string()),
            ("slow", &slow.path().display().to_string()),
        ],
        "[eval]\ntimeout_s = 4\nmax_memory_mib = 700\nmax_concurrent = 4\n",
    );
    let api = Api::new(&kiln.url, Some(TOKEN));

    let first = wait_evals(&api, "good", "main", 1).await;
    assert_eq!(first["status"], "succeeded");

    // A repository that does not exist: an error on the project.
    let p = wait_for(30, "the missing repository's error", || async {
        let (_, p) = api.get("/project/missing").await;
        p["error"].as_str().map(str::to_string)
    })
    .await;
    assert!(p.contains("/nonexistent/repository"), "{p}");

    // No flake, a missing attribute, a hang: failed evaluations with Nix's message.
    let e = wait_evals(&api, "noflake", "main", 1).await;
    assert_eq!(e["status"], "failed");
    assert!(e["error"].as_str().unwrap().contains("flake.nix"), "{e}");
    let e = wait_evals(&api, "attr", "main", 1).await;
    assert_eq!(e["status"], "failed");
    assert!(e["error"].as_str().unwrap().contains("nope"), "{e}");
    let e = wait_evals(&api, "slow", "main", 1).await;
    assert_eq!(e["status"], "failed");
    assert!(e["error"].as_str().unwrap().contains("timed out after 4 s"), "{e}");
    let (_, j) = api.get("/jobset/slow/main").await;
    assert!(j["errormsg"].as_str().unwrap().contains("timed out"), "{j}");

    // A missing branch: an error on the jobset, no evaluation.
    let err = wait_for(30, "the missing branch's error", || async {
        let (_, j) = api.get("/jobset/branch/rel").await;
        j["errormsg"].as_str().map(str::to_string)
    })
    .await;
    assert!(err.contains("\"release\" does not exist"), "{err}");
    assert!(evals(&api, "branch", "rel").await.is_empty());

    // A job that eats memory is that job's error; the rest is evaluated.
    let e = wait_evals(&api, "hog", "main", 1).await;
    assert_eq!(
        (e["status"].as_str(), e["nrjobs"].as_i64(), e["nrerrors"].as_i64()),
        (Some("succeeded"), Some(2), Some(1))
    );
    let (_, d) = api.get(&format!("/eval/{}", e["id"])).await;
    assert!(d["errors"]["hog"].as_str().unwrap().contains("memory limit of 700 MiB"));
    assert!(d["jobs"]["fine"].is_number());

    // A syntax error on the next commit: that evaluation fails, the first stays.
    good.write("flake.nix", "{ outputs = _: { hydraJobs = { ok = ; }; }; }");
    good.commit("broken");
    assert_eq!(api.send("POST", "/api/push?jobsets=good:main", None).await.0, 200);
    let latest = wait_evals(&api, "good", "main", 2).await;
    assert_eq!(latest["status"], "failed");
    assert!(latest["error"].as_str().unwrap().contains("syntax error"), "{latest}");
    let all = evals(&api, "good", "main").await;
    assert!(all.iter().any(|e| e["id"] == first["id"] && e["status"] == "succeeded"));

    // An invalid .kiln.toml: the key and reason on the project and jobset,
    // the jobset's configuration unchanged.
    good.write(".kiln.toml", "[jobsets.main]\ncheck_interval = \"often\"\n");
    good.commit("bad config");
    assert_eq!(api.send("POST", "/api/push?jobsets=good:main", None).await.0, 200);
    let err = wait_for(30, "the invalid .kiln.toml error", || async {
        let (_, j) = api.get("/jobset/good/main").await;
        j["errormsg"].as_str().filter(|e| e.contains(".kiln.toml")).map(str::to_string)
    })
    .await;
    assert!(err.contains("jobsets.main.check_interval"), "{err}");
    let (_, j) = api.get("/jobset/good/main").await;
    assert_eq!(j["checkinterval"], 0);
    assert_eq!(evals(&api, "good", "main").await.len(), 2);

    // Through all of it the server stayed up.
    assert_eq!(api.get("/healthz").await.0, 200);
}

#[tokio::test]
async fn a_flake_in_a_subdirectory_with_several_attributes() {
    let m = unique("m");
    let flake = Flake::new(
        "{ outputs = _: { }; }",
        &[
            (
                "sub/flake.nix",
                &format!(
                    "{{ outputs = _: {{ checks.x86_64-linux.t = {}; checks.aarch64-linux.t = {}; packages.x86_64-linux.p = {}; }}; }}",
                    drv_expr("t", &format!("echo {m} > $out")),
                    drv_expr("t-arm", "echo > $out").replace("x86_64-linux", "aarch64-linux"),
                    drv_expr("p", &format!("echo {m} > $out"))
                ),
            ),
            (
                ".kiln.toml",
                "[jobsets.ci]\nflake_dir = \"sub\"\nattributes = [\"checks\", \"packages\"]\nsystems = [\"x86_64-linux\"]\n",
            ),
        ],
    );
    let kiln = start_kiln(&[("sub", &flake.path().display().to_string())], "");
    let api = Api::new(&kiln.url, Some(TOKEN));
    let e = wait_evals(&api, "sub", "ci", 1).await;
    assert_eq!(e["status"], "succeeded", "{e}");
    let (_, d) = api.get(&format!("/eval/{}", e["id"])).await;
    let jobs: Vec<&String> = d["jobs"].as_object().unwrap().keys().collect();
    assert_eq!(jobs, ["checks.x86_64-linux.t", "packages.x86_64-linux.p"], "prefixed names, one system");
    assert!(e["flake"].as_str().unwrap().contains("dir=sub"));
}

/// A push that arrives while its jobset is being evaluated is evaluated
/// next: the check that ends clears only the trigger it answered.
#[tokio::test]
async fn a_push_during_an_evaluation_is_evaluated_after_it() {
    let m = unique("m");
    // About five seconds of evaluation: a few million hashes.
    let slow = "let inner = i: builtins.foldl' (acc: x: builtins.hashString \"sha256\" (acc + toString x)) \
                (toString i) (builtins.genList (x: x) 3000); \
                in builtins.foldl' (acc: i: builtins.hashString \"sha256\" (acc + inner i)) \"\" (builtins.genList (x: x) 4000)";
    let flake_text = |marker: &str| {
        format!(
            r#"{{ outputs = _: {{ hydraJobs = {{ a = derivation {{ name = "a"; system = "{SYSTEM}"; builder = "/bin/sh"; slow = builtins.substring 0 4 ({slow}); args = [ "-c" "echo {marker} > $out" ]; }}; }}; }}; }}"#
        )
    };
    let flake = Flake::new(&flake_text(&m), &[(".kiln.toml", "[jobsets.main]\ncheck_interval = 0\n")]);
    let kiln = start_kiln(&[("busy", &flake.path().display().to_string())], "");
    let api = Api::new(&kiln.url, Some(TOKEN));
    wait_for(60, "the first evaluation to run", || async {
        evals(&api, "busy", "main").await.first().is_some_and(|e| e["status"] == "running").then_some(())
    })
    .await;
    flake.write("flake.nix", &flake_text(&format!("{m}-2")));
    let second = flake.commit("second");
    let (code, v) = api.send("POST", "/api/push?jobsets=busy:main", None).await;
    assert_eq!(code, 200, "{v}");
    let e = evals(&api, "busy", "main").await;
    assert!(
        e.len() == 1 && e[0]["status"] == "running",
        "the push must arrive while the first evaluation runs (make it slower): {e:?}"
    );
    let newest = wait_evals(&api, "busy", "main", 2).await;
    assert_eq!(newest["commit"], second.as_str(), "{newest}");
}
