//! `kiln eval` against real Nix: nested jobs, aggregates, several systems,
//! the flake schema, and broken jobs of every kind, each with its own error
//! while every other job is still evaluated.

mod support;

use std::collections::BTreeMap;

use support::*;

/// A flake exercising everything the evaluator must handle. `@BAD@` is
/// replaced by a byte that is not valid UTF-8.
fn fixture() -> Vec<u8> {
    let d = |name: &str, sys: &str| {
        format!(
            r#"derivation {{ name = "{name}"; system = "{sys}"; builder = "/bin/sh"; args = [ "-c" "echo {name} > $out" ]; }}"#
        )
    };
    let text = format!(
        r#"{{
  outputs = {{ self }}: let
    hello = {hello};
    helloArm = {hello_arm};
    long = builtins.concatStringsSep "" (builtins.genList (x: "a") 10000);
  in {{
    hydraJobs = {{
      hello.x86_64-linux = hello;
      hello.aarch64-linux = helloArm;
      pkgs = {{ a = {a}; b = {b}; }};
      deep.x.y.z = {z};
      notAJob = "just a string";
      withMeta = (derivation {{ name = "meta"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; }}) // {{
        meta = {{ description = "has meta"; license = {{ spdxId = "MIT"; }}; maintainers = [ {{ email = "a@example.org"; }} {{ github = "bob"; }} ];
                 timeout = 60; maxSilent = 30; schedulingPriority = 5; homepage = [ "https://example.org" ]; broken = x: x; }};
      }};
      all = derivation {{
        name = "all"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ];
        _hydraAggregate = true;
        constituents = [ hello "pkgs.a" ];
      }};
      brokenAggregate = derivation {{
        name = "ba"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo > $out" ];
        _hydraAggregate = true; constituents = [ "no.such.job" ];
      }};
      throws = throw "boom from throw";
      asserts = assert 1 == 2; hello;
      aborts = abort "boom from abort";
      recursion = let x = x + 1; in x;
      typeError = 1 + "x";
      nestedBroken = {{ fine = {c}; broken = abort "nested abort"; }};
      memoryHog = derivation {{ name = toString (builtins.length (builtins.genList (x: [ x x ]) 80000000)); system = "x86_64-linux"; builder = "/bin/sh"; }};
    }} // builtins.listToAttrs [
      {{ name = "bad@BAD@name"; value = hello; }}
      {{ name = long; value = hello; }}
    ];
    checks.x86_64-linux = {{ fmt = {fmt}; nested = {{ ignored = {fmt}; }}; }};
    checks.aarch64-linux = {{ fmt = {fmt_arm}; }};
  }};
}}
"#,
        hello = d("hello", "x86_64-linux"),
        hello_arm = d("hello", "aarch64-linux"),
        a = d("a", "x86_64-linux"),
        b = d("b", "x86_64-linux"),
        c = d("c", "x86_64-linux"),
        z = d("z", "x86_64-linux"),
        fmt = d("fmt", "x86_64-linux"),
        fmt_arm = d("fmt", "aarch64-linux"),
    );
    let mut bytes = Vec::new();
    let (pre, post) = text.split_once("@BAD@").unwrap();
    bytes.extend_from_slice(pre.as_bytes());
    bytes.push(0xff);
    bytes.extend_from_slice(post.as_bytes());
    bytes
}

fn fixture_flake() -> Flake {
    let f = Flake::new("{ outputs = _: { }; }", &[]);
    std::fs::write(f.path().join("flake.nix"), fixture()).unwrap();
    f.commit("fixture");
    f
}

fn run_eval(flake: &Flake, args: &[&str]) -> (Option<i32>, BTreeMap<String, serde_json::Value>, String) {
    let out = kiln_cmd().arg("eval").arg("--json").args(args).current_dir(flake.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let mut jobs = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let attr = v["attr"].as_str().unwrap().to_string();
        assert!(jobs.insert(attr.clone(), v).is_none(), "{attr} reported twice");
    }
    (out.status.code(), jobs, stderr)
}

fn error_of<'a>(jobs: &'a BTreeMap<String, serde_json::Value>, attr: &str) -> &'a str {
    jobs.get(attr)
        .unwrap_or_else(|| panic!("{attr} missing from {:?}", jobs.keys()))
        .get("error")
        .and_then(|e| e.as_str())
        .unwrap_or_else(|| panic!("{attr} has no error: {}", jobs[attr]))
}

#[test]
fn every_good_job_and_every_broken_job_with_its_own_error() {
    let flake = fixture_flake();
    let (code, jobs, stderr) = run_eval(&flake, &["--workers", "2", "--max-memory", "700", ".#hydraJobs"]);
    assert_eq!(code, Some(1), "jobs failed to evaluate, so exit 1: {stderr}");

    let good = [
        "hello.x86_64-linux",
        "hello.aarch64-linux",
        "pkgs.a",
        "pkgs.b",
        "deep.x.y.z",
        "withMeta",
        "all",
        "nestedBroken.fine",
    ];
    for attr in good {
        let j = jobs.get(attr).unwrap_or_else(|| panic!("{attr} missing: {stderr}"));
        assert!(j.get("error").is_none(), "{attr}: {j}");
        let expected = flake.eval_raw(&format!("hydraJobs.{attr}.drvPath"));
        assert_eq!(j["drvPath"], expected, "{attr}");
        assert_eq!(j["attrPath"].as_array().unwrap().len(), attr.split('.').count());
        assert_eq!(j["outputs"]["out"], flake.eval_raw(&format!("hydraJobs.{attr}.outPath")));
    }
    assert_eq!(jobs["hello.aarch64-linux"]["system"], "aarch64-linux");
    assert_eq!(jobs["pkgs.a"]["name"], "a");
    assert!(!jobs.contains_key("notAJob"), "strings are not jobs");

    let meta = &jobs["withMeta"]["meta"];
    assert_eq!(meta["description"], "has meta");
    assert_eq!(meta["license"], "MIT");
    assert_eq!(meta["maintainers"], "a@example.org, bob");
    assert_eq!(
        (meta["timeout"].as_i64(), meta["maxSilent"].as_i64(), meta["schedulingPriority"].as_i64()),
        (Some(60), Some(30), Some(5))
    );
    assert_eq!(meta["homepage"], "https://example.org");

    // Aggregates list their constituents' derivations, named ones resolved.
    let constituents: Vec<&str> =
        jobs["all"]["constituents"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(
        constituents,
        [flake.eval_raw("hydraJobs.hello.x86_64-linux.drvPath"), flake.eval_raw("hydraJobs.pkgs.a.drvPath")]
    );
    assert!(error_of(&jobs, "brokenAggregate").contains("no.such.job"));

    // Each broken job carries Nix's own error.
    assert!(error_of(&jobs, "throws").contains("boom from throw"));
    assert!(error_of(&jobs, "asserts").contains("assertion"));
    assert!(error_of(&jobs, "aborts").contains("boom from abort"));
    assert!(error_of(&jobs, "recursion").contains("infinite recursion"));
    assert!(error_of(&jobs, "typeError").contains("cannot add a string to an integer"));
    assert!(error_of(&jobs, "nestedBroken.broken").contains("nested abort"));
    assert!(error_of(&jobs, "memoryHog").contains("memory limit of 700 MiB"));
    let bad_utf8 = jobs.keys().find(|k| k.contains('\u{fffd}')).expect("the non-UTF-8 job is reported");
    assert!(error_of(&jobs, bad_utf8).contains("not valid UTF-8"));
    let long = jobs.keys().find(|k| k.starts_with("aaaa")).expect("the long-named job is reported");
    assert!(long.len() < 300, "its name is shortened");
    assert!(error_of(&jobs, long).contains("10000 bytes long"));
    assert_eq!(jobs.len(), good.len() + 10, "{:?}", jobs.keys());
}

#[test]
fn one_worker_gives_the_same_jobs() {
    let flake = fixture_flake();
    let (_, two, _) = run_eval(&flake, &["--workers", "2", "--max-memory", "700", ".#hydraJobs"]);
    let (_, one, _) = run_eval(&flake, &["--workers", "1", "--max-memory", "700", ".#hydraJobs"]);
    let drvs = |m: &BTreeMap<String, serde_json::Value>| {
        m.iter().map(|(k, v)| (k.clone(), v.get("drvPath").cloned())).collect::<Vec<_>>()
    };
    assert_eq!(drvs(&one), drvs(&two));
}

#[test]
fn systems_filter_and_flake_schema() {
    let flake = fixture_flake();
    let (_, jobs, _) = run_eval(&flake, &["--system", "x86_64-linux", "--max-memory", "700", ".#hydraJobs"]);
    assert!(jobs.contains_key("hello.x86_64-linux"));
    assert!(!jobs.contains_key("hello.aarch64-linux"));

    // checks: <system>.<name>, nothing deeper.
    let (code, jobs, stderr) = run_eval(&flake, &[".#checks"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(jobs.keys().collect::<Vec<_>>(), ["aarch64-linux.fmt", "x86_64-linux.fmt"]);
    let (_, jobs, _) = run_eval(&flake, &["--system", "x86_64-linux", ".#checks"]);
    assert_eq!(jobs.keys().collect::<Vec<_>>(), ["x86_64-linux.fmt"]);
    assert_eq!(jobs["x86_64-linux.fmt"]["drvPath"], flake.eval_raw("checks.x86_64-linux.fmt.drvPath"));
    let (_, jobs, _) = run_eval(&flake, &[".#checks.x86_64-linux"]);
    assert_eq!(jobs.keys().collect::<Vec<_>>(), ["fmt"]);
}

#[test]
fn default_attribute_and_single_derivation() {
    let only_checks = Flake::new(
        &format!("{{ outputs = _: {{ checks.x86_64-linux.t = {}; }}; }}", drv_expr("t", "echo > $out")),
        &[],
    );
    let (code, jobs, stderr) = run_eval(&only_checks, &["."]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(jobs.keys().collect::<Vec<_>>(), ["x86_64-linux.t"], "no hydraJobs: checks");
    let (_, jobs, _) = run_eval(&only_checks, &[".#checks.x86_64-linux.t"]);
    assert_eq!(jobs.keys().collect::<Vec<_>>(), ["t"]);
}

#[test]
fn a_broken_flake_is_a_clear_failure() {
    let syntax = Flake::new("{ outputs = _: { hydraJobs = { a = ; }; }; }", &[]);
    let out = kiln_cmd().args(["eval", ".#hydraJobs"]).current_dir(syntax.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("syntax error"), "{}", String::from_utf8_lossy(&out.stderr));

    let missing = Flake::new("{ outputs = _: { }; }", &[]);
    let out = kiln_cmd().args(["eval", ".#hydraJobs"]).current_dir(missing.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("hydraJobs"), "{}", String::from_utf8_lossy(&out.stderr));

    let d = tempfile::tempdir().unwrap();
    let out = kiln_cmd().args(["eval", ".#hydraJobs"]).current_dir(d.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot lock flake reference"));
}

#[test]
fn a_hanging_evaluation_times_out() {
    let flake = Flake::new(
        r#"{ outputs = _: { hydraJobs.slow = import (derivation { name = "slow.nix"; system = "x86_64-linux"; builder = "/bin/sh"; PATH = "/bin:/usr/bin"; args = [ "-c" "sleep 60; echo 1 > $out" ]; marker = "@M@"; }); }; }"#.replace("@M@", &unique("m")).as_str(),
        &[("kiln.toml", "[eval]\ntimeout_s = 2\n")],
    );
    let start = std::time::Instant::now();
    let out =
        kiln_cmd().args(["eval", "--config", "kiln.toml", ".#hydraJobs"]).current_dir(flake.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out after 2 s"));
    assert!(start.elapsed().as_secs() < 20);
}

/// nix-eval-jobs needs a newer Nix than this machine has, so a stand-in
/// plays it: it checks its arguments as nix-eval-jobs parses them and
/// answers in its JSON-lines format, with derivations from the real Nix.
const NIX_EVAL_JOBS: &str = r##"#!/usr/bin/env python3
import json, subprocess, sys
args = sys.argv[1:]
def take(flag):
    i = args.index(flag)
    v = args[i + 1]
    del args[i:i + 2]
    return v
flake = take("--flake")
workers = int(take("--workers"))
mem = int(take("--max-memory-size"))
assert workers >= 1 and mem >= 1, (workers, mem)
for f in ("--meta", "--constituents", "--force-recurse"):
    args.remove(f)
assert args == [], f"unexpected arguments {args}"
ref, attr = flake.rsplit("#", 1)
apply = """js: builtins.mapAttrs (n: d: let t = builtins.tryEval (d.drvPath); in if t.success then {
  drvPath = d.drvPath; name = d.name; system = d.system; outputs = { out = d.outPath; };
  meta = d.meta or {}; } else { error = "error: " + n + " failed"; }) js"""
out = subprocess.run(["nix", "eval", "--json", flake, "--apply", apply], check=True, capture_output=True).stdout
for name, v in sorted(json.loads(out).items()):
    v.update({"attr": name, "attrPath": [name]})
    print(json.dumps(v), flush=True)
"##;

#[test]
fn nix_eval_jobs_as_the_evaluator_gives_the_same_jobs() {
    let flake = Flake::new(
        &format!(
            r#"{{ outputs = _: {{ hydraJobs = {{ a = {}; b = {} // {{ meta.license = {{ spdxId = "MIT"; }}; }}; bad = throw "x"; }}; }}; }}"#,
            drv_expr("a", "echo > $out"),
            drv_expr("b", "echo > $out")
        ),
        &[("kiln.toml", "[eval]\nevaluator = \"nix-eval-jobs\"\n")],
    );
    let bin = tempfile::tempdir().unwrap();
    let script = bin.path().join("nix-eval-jobs");
    std::fs::write(&script, NIX_EVAL_JOBS).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.path().display(), std::env::var("PATH").unwrap());

    let out = kiln_cmd()
        .args(["eval", "--json", "--config", "kiln.toml", ".#hydraJobs"])
        .env("PATH", &path)
        .current_dir(flake.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let jobs: BTreeMap<String, serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["attr"].as_str().unwrap().to_string(), v)
        })
        .collect();
    assert_eq!(jobs["a"]["drvPath"], flake.eval_raw("hydraJobs.a.drvPath"));
    assert_eq!(jobs["b"]["meta"]["license"], "MIT");
    assert!(jobs["bad"]["error"].as_str().unwrap().contains("bad failed"));

    // Configured but not installed: a configuration error naming the key.
    let out =
        kiln_cmd().args(["eval", "--config", "kiln.toml", ".#hydraJobs"]).current_dir(flake.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("eval.evaluator"));
}
