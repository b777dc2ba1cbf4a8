//! Hydra's clients keep working: the requests that Hydra's API description
//! (`hydra-api.yaml`), its API tests and hydra-cli make, against a running
//! Kiln with real evaluations and builds, answered with Hydra's keys and
//! value types.

mod support;

use serde_json::Value;
use support::*;

const TOKEN: &str = "hydra-token";

/// A project `hy` whose jobset `main` has a job that succeeds, one that
/// fails and an aggregate of the first; returns once all are built.
async fn built() -> (Kiln, Api, String) {
    let tag = unique("hy");
    let drv = |name: &str, script: &str, extra: &str| {
        format!(
            r#"{name} = derivation {{ name = "{name}-{tag}"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "{script}" ]; {extra} }};"#
        )
    };
    let flake = Flake::new(
        &format!(
            "{{ outputs = _: let {} {} {} in {{ hydraJobs = {{ inherit ok bad agg; }}; }}; }}",
            drv("ok", "echo ok > $out", ""),
            drv("bad", "exit 1", ""),
            drv("agg", "echo agg > $out", r#"_hydraAggregate = true; constituents = [ "ok" ];"#)
        ),
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!("api_token_files = [\"token\"]\n[[projects]]\nname = \"hy\"\nrepo = \"{}\"\n", flake.path().display()),
    )
    .unwrap();
    let kiln = Kiln::start_in(dir, &[]);
    let api = Api::new(&kiln.url, Some(TOKEN));
    wait_for(120, "the builds to finish", || async {
        let (_, v) = api.get("/jobset/hy/main/evals").await;
        let ids = v["evals"].as_array()?.first()?["builds"].as_array()?.clone();
        let mut done = 0;
        for id in &ids {
            if api.get(&format!("/build/{id}")).await.1["finished"] == 1 {
                done += 1;
            }
        }
        (ids.len() == 3 && done == 3).then_some(())
    })
    .await;
    (kiln, api, tag)
}

/// A GET as hydra-cli sends it: `Content-Type: application/json`, no `Accept`.
async fn hydra_cli_get(kiln: &Kiln, path: &str) -> (u16, Value) {
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}{path}", kiln.url))
        .header("Content-Type", "application/json")
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    let text = r.text().await.unwrap();
    (code, serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {}", &text[..text.len().min(200)])))
}

async fn location(kiln: &Kiln, path: &str) -> (u16, String) {
    let r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(format!("{}{path}", kiln.url))
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.headers().get("location").map(|l| l.to_str().unwrap().to_string()).unwrap_or_default())
}

#[tokio::test]
async fn hydras_documented_requests_get_hydras_answers() {
    let (kiln, api, _tag) = built().await;

    // Content negotiation as Hydra's: a GET with a JSON Content-Type gets JSON.
    let (code, projects) = hydra_cli_get(&kiln, "/").await;
    assert_eq!(code, 200);
    let p = projects.as_array().unwrap().iter().find(|p| p["name"] == "hy").unwrap().clone();
    assert_eq!((p["enabled"].clone(), p["hidden"].clone()), (Value::from(1), Value::from(0)), "{p}");
    assert_eq!(p["jobsets"], serde_json::json!(["main"]));
    let (_, project) = hydra_cli_get(&kiln, "/project/hy").await;
    assert_eq!(project["name"], "hy");

    // The evaluations, with their builds and inputs, paged as Hydra pages them.
    let (_, evals) = hydra_cli_get(&kiln, "/jobset/hy/main/evals").await;
    assert_eq!((evals["first"].as_str(), evals["last"].as_str()), (Some("?page=1"), Some("?page=1")), "{evals}");
    let e = &evals["evals"][0];
    for k in ["id", "timestamp", "checkouttime", "evaltime", "hasnewbuilds", "flake", "builds", "jobsetevalinputs"] {
        assert!(e.get(k).is_some(), "evaluation without {k}: {e}");
    }
    assert_eq!(e["hasnewbuilds"], 1);
    let builds: Vec<i64> = e["builds"].as_array().unwrap().iter().map(|b| b.as_i64().unwrap()).collect();
    assert_eq!(builds.len(), 3);
    let input = &e["jobsetevalinputs"]["src"];
    assert_eq!(input["type"], "git");
    assert_eq!(input["revision"].as_str().unwrap().len(), 40, "{input}");
    let eval_id = e["id"].as_i64().unwrap();
    let (_, page2) = hydra_cli_get(&kiln, "/jobset/hy/main/evals?page=2").await;
    assert_eq!(page2["evals"], serde_json::json!([]));

    // The jobset overview.
    let (code, overview) = hydra_cli_get(&kiln, "/api/jobsets?project=hy").await;
    assert_eq!(code, 200, "{overview}");
    let main = &overview[0];
    assert_eq!(main["name"], "main");
    assert_eq!(
        (
            main["nrtotal"].as_i64(),
            main["nrsucceeded"].as_i64(),
            main["nrfailed"].as_i64(),
            main["nrscheduled"].as_i64()
        ),
        (Some(3), Some(2), Some(1), Some(0)),
        "{main}"
    );
    assert_eq!(main["haserrormsg"], 0);
    assert_eq!(hydra_cli_get(&kiln, "/api/jobsets?project=nope").await.0, 404);

    // Builds, with every key of Hydra's.
    let ok_id = builds_named(&api, &builds, "ok").await;
    let (_, b) = hydra_cli_get(&kiln, &format!("/build/{ok_id}")).await;
    for k in [
        "id",
        "starttime",
        "stoptime",
        "timestamp",
        "jobsetevals",
        "finished",
        "nixname",
        "buildstatus",
        "jobset",
        "priority",
        "job",
        "drvpath",
        "system",
        "project",
        "buildproducts",
        "buildoutputs",
        "buildmetrics",
        "releasename",
    ] {
        assert!(b.get(k).is_some(), "build without {k}: {b}");
    }
    assert_eq!((b["finished"].clone(), b["buildstatus"].clone()), (Value::from(1), Value::from(0)));
    assert_eq!(b["jobsetevals"], serde_json::json!([eval_id]));
    assert!(b["buildoutputs"]["out"]["path"].as_str().unwrap().starts_with("/nix/store/"));

    // Search, by Hydra's parameter name, in Hydra's shape.
    let (_, found) = hydra_cli_get(&kiln, "/search?query=ok-").await;
    for k in ["projects", "jobsets", "builds", "buildsdrv"] {
        assert!(found[k].is_array(), "search without {k}: {found}");
    }
    assert!(found["builds"].as_array().unwrap().iter().any(|b| b["id"] == ok_id), "{found}");
    assert!(found["buildsdrv"].as_array().unwrap().iter().any(|b| b["id"] == ok_id), "{found}");
    let (_, by_project) = hydra_cli_get(&kiln, "/search?query=hy").await;
    assert_eq!(by_project["projects"][0]["name"], "hy", "{by_project}");

    // The lookups Hydra offers by job, system and evaluation.
    assert_eq!(location(&kiln, "/job/hy/main/ok/latest-finished").await, (303, format!("/build/{ok_id}")));
    assert_eq!(location(&kiln, "/job/hy/main/ok/latest-for/x86_64-linux").await, (303, format!("/build/{ok_id}")));
    assert_eq!(location(&kiln, "/job/hy/main/ok/latest-for/aarch64-linux").await.0, 404);
    assert_eq!(location(&kiln, "/job/hy/main/bad/latest-finished").await.0, 404, "a failed job has no latest");
    assert_eq!(location(&kiln, &format!("/eval/{eval_id}/job/ok")).await, (303, format!("/build/{ok_id}")));
    let agg_id = builds_named(&api, &builds, "agg").await;
    let (code, parts) = hydra_cli_get(&kiln, &format!("/build/{agg_id}/constituents")).await;
    assert_eq!(code, 200);
    assert_eq!(parts.as_array().unwrap().iter().map(|b| b["id"].clone()).collect::<Vec<_>>(), vec![Value::from(ok_id)]);
    let (_, shield) = hydra_cli_get(&kiln, "/job/hy/main/ok/shield").await;
    assert_eq!((shield["schemaVersion"].as_i64(), shield["message"].as_str()), (Some(1), Some("passing")), "{shield}");
    assert_eq!(hydra_cli_get(&kiln, "/job/hy/main/bad/shield").await.1["message"], "failing");

    // The latest builds, the queue and the counts.
    let (_, latest) = hydra_cli_get(&kiln, "/api/latestbuilds?nr=10&project=hy&jobset=main&job=ok").await;
    assert_eq!(
        latest.as_array().unwrap().iter().map(|b| b["id"].clone()).collect::<Vec<_>>(),
        vec![Value::from(ok_id)]
    );
    let (_, all) = hydra_cli_get(&kiln, "/api/latestbuilds?nr=2").await;
    assert_eq!(all.as_array().unwrap().len(), 2);
    assert_eq!(hydra_cli_get(&kiln, "/api/queue?nr=5").await.1, serde_json::json!([]));
    let (_, counts) = hydra_cli_get(&kiln, "/api/nrbuilds?nr=3&period=hour").await;
    let counts: Vec<i64> = counts.as_array().unwrap().iter().map(|c| c.as_i64().unwrap()).collect();
    assert_eq!((counts.len(), *counts.last().unwrap()), (3, 3), "three builds finished this hour: {counts:?}");
    assert_eq!(hydra_cli_get(&kiln, "/api/nrbuilds?period=fortnight").await.0, 400);
    let (_, summary) = hydra_cli_get(&kiln, "/queue-summary").await;
    assert_eq!(summary["jobsets"], serde_json::json!([]));
    let html = reqwest::get(format!("{}/queue-summary", kiln.url)).await.unwrap().text().await.unwrap();
    assert!(html.contains("<h1>Queue summary</h1>"));
}

async fn builds_named(api: &Api, ids: &[i64], job: &str) -> i64 {
    for id in ids {
        if api.get(&format!("/build/{id}")).await.1["job"] == job {
            return *id;
        }
    }
    panic!("no build of {job} among {ids:?}")
}

#[tokio::test]
async fn build_products_and_metrics_are_read_listed_served_and_charted() {
    let t = unique("prod");
    let script = "export PATH=/usr/bin:/bin; mkdir -p $out/dist $out/nix-support; \
                  printf 'release %s\\n' one two three > $out/dist/tool.txt; \
                  echo \"file binary-dist $out/dist/tool.txt\" > $out/nix-support/hydra-build-products; \
                  echo \"doc manual $out/dist index.html\" >> $out/nix-support/hydra-build-products; \
                  printf 'size 42 bytes\\nlines 3\\n' > $out/nix-support/hydra-metrics";
    let flake = Flake::new(
        &format!(r#"{{ outputs = _: {{ hydraJobs = {{ tool = {}; }}; }}; }}"#, drv_expr(&format!("tool-{t}"), script)),
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!("[[projects]]\nname = \"pr\"\nrepo = \"{}\"\n", flake.path().display()),
    )
    .unwrap();
    let kiln = Kiln::start_in(dir, &[]);
    let api = Api::new(&kiln.url, None);
    let build = wait_for(120, "the build", || async {
        let (_, v) = api.get("/jobset/pr/main/evals").await;
        let id = v["evals"].as_array()?.first()?["builds"].as_array()?.first()?.as_i64()?;
        let (_, b) = api.get(&format!("/build/{id}")).await;
        (b["finished"] == 1).then_some(b)
    })
    .await;
    assert_eq!(build["buildstatus"], 0, "{build}");
    let out = build["buildoutputs"]["out"]["path"].as_str().unwrap().to_string();
    // Hydra's shape: products by number, metrics by name.
    let p = &build["buildproducts"]["1"];
    assert_eq!(
        (p["type"].as_str(), p["subtype"].as_str(), p["name"].as_str()),
        (Some("file"), Some("binary-dist"), Some("tool.txt")),
        "{build}"
    );
    assert_eq!(p["path"], format!("{out}/dist/tool.txt"));
    assert_eq!(p["filesize"], 38, "the file's size in the output: {p}");
    assert_eq!(build["buildproducts"]["2"]["defaultpath"], "index.html");
    assert_eq!(build["buildmetrics"]["size"], serde_json::json!({"name": "size", "value": 42.0, "unit": "bytes"}));
    assert_eq!(build["buildmetrics"]["lines"]["value"], 3.0);

    // Downloaded from the binary cache, as the build wrote it.
    let id = build["id"].as_i64().unwrap();
    let r = reqwest::get(format!("{}/build/{id}/download/1/tool.txt", kiln.url)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "release one\nrelease two\nrelease three\n");
    // A directory without its default file, or a product that is not there, is not served.
    assert_eq!(reqwest::get(format!("{}/build/{id}/download/2/dist", kiln.url)).await.unwrap().status(), 404);
    assert_eq!(reqwest::get(format!("{}/build/{id}/download/9/x", kiln.url)).await.unwrap().status(), 404);

    // The build page lists them; the job page charts the metrics.
    let page = reqwest::get(format!("{}/build/{id}", kiln.url)).await.unwrap().text().await.unwrap();
    assert!(page.contains(&format!("/build/{id}/download/1/tool.txt")) && page.contains("38 bytes"), "{page}");
    assert!(page.contains("id=\"metrics\"") && page.contains("42 bytes"), "{page}");
    let job = reqwest::get(format!("{}/job/pr/main/tool", kiln.url)).await.unwrap().text().await.unwrap();
    assert!(job.contains("id=\"metric-size\"") && job.contains(&format!("build {id}: 42 bytes")), "{job}");
}

#[tokio::test]
async fn nix_channel_subscribes_to_the_newest_evaluation_whose_every_job_succeeded() {
    let t = unique("chan");
    let flake = Flake::new(
        &format!(
            r#"{{ outputs = _: {{ hydraJobs = {{ hello = {}; tools.fmt = {}; }}; }}; }}"#,
            drv_expr(&format!("hello-{t}"), "echo hello > $out"),
            drv_expr(&format!("fmt-{t}"), "echo fmt > $out")
        ),
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!("[[projects]]\nname = \"ch\"\nrepo = \"{}\"\n", flake.path().display()),
    )
    .unwrap();
    let kiln = Kiln::start_in(dir, &[]);
    let api = Api::new(&kiln.url, None);
    let channel = wait_for(120, "a green evaluation's channel", || async {
        let (code, v) = api.get("/jobset/ch/main/channel/latest").await;
        (code == 200).then_some(v)
    })
    .await;
    assert_eq!(channel["builds"].as_array().unwrap().len(), 2, "{channel}");
    let hello = channel["builds"].as_array().unwrap().iter().find(|b| b["job"] == "hello").unwrap()["outputs"]["out"]
        .as_str()
        .unwrap()
        .to_string();

    // nix-channel, as a user runs it, in its own state directory (its
    // profiles), on the machine's store.
    let home = tempfile::tempdir().unwrap();
    let state = home.path().join("state");
    let user = run("id", &["-un"], home.path()).trim().to_string();
    std::fs::create_dir_all(state.join("profiles/per-user").join(user)).unwrap();
    let nix_channel = |args: &[&str]| {
        let out = std::process::Command::new("nix-channel")
            .args(args)
            .env("HOME", home.path())
            .env("NIX_STATE_DIR", &state)
            .env(
                "NIX_CONFIG",
                "experimental-features = nix-command\nstore = local?state=/nix/var/nix\nsubstituters =\n",
            )
            .output()
            .unwrap();
        assert!(out.status.success(), "nix-channel {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let url = format!("{}/jobset/ch/main/channel/latest", kiln.url);
    nix_channel(&["--add", &url, "kilnch"]);
    nix_channel(&["--update", "kilnch"]);
    let unpacked = home.path().join(".nix-defexpr/channels/kilnch");
    let out = std::process::Command::new("nix-instantiate")
        .args(["--eval", "--strict", "-E", "with import <kilnch> {}; [ hello.outPath tools.fmt.name ]"])
        .env("NIX_PATH", format!("kilnch={}", unpacked.display()))
        .env("NIX_CONFIG", "experimental-features = nix-command\nsubstituters =\n")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&hello) && text.contains(&format!("fmt-{t}")), "{text}");
    // The channel names its binary cache.
    let cache = reqwest::get(format!("{url}/binary-cache-url")).await.unwrap().text().await.unwrap();
    assert!(cache.starts_with("http"), "{cache}");
    // A job's own channel.
    let (code, one) = api.get("/job/ch/main/hello/channel/latest").await;
    assert_eq!((code, one["builds"].as_array().map(Vec::len)), (200, Some(1)), "{one}");
    assert_eq!(api.get("/jobset/ch/main/channel/latest/other.txt").await.0, 404);
}

/// Schemathesis, driven by Hydra's shapes (`tests/data/hydra-shared-api.yaml`),
/// against a Kiln with real builds: every answer of the routes Kiln shares
/// with Hydra conforms to what Hydra's clients read.
#[tokio::test]
async fn schemathesis_finds_every_shared_route_answering_in_hydras_shapes() {
    let (kiln, _api, _tag) = built().await;
    let spec = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/hydra-shared-api.yaml");
    let reports = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new(schemathesis())
        .args(["run", spec.to_str().unwrap(), "--url", &kiln.url])
        // Kiln is more lenient than this document (it clamps `nr`, pages past
        // the end are empty): valid requests, and the shape of every answer.
        .args(["--mode", "positive", "--max-examples", "30", "--workers", "1", "--request-timeout", "20"])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args(["--seed", &std::env::var("ST_SEED").unwrap_or_else(|_| "42".into())])
        // As hydra-cli asks: a JSON content type, no Accept.
        .args(["-H", "Content-Type: application/json"])
        .arg("--report-dir")
        .arg(reports.path())
        .env("NO_COLOR", "1")
        .current_dir(reports.path())
        .output()
        .await
        .expect("run schemathesis");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found answers Hydra's clients would not read:\n{text}");
    assert!(text.contains("passed"), "{text}");
}
