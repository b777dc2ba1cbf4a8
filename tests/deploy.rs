//! Deployments end to end: real `kiln serve` evaluating and building a
//! flake whose jobs are "system" closures, and hosts that are real sshd
//! servers on loopback. The hosts share this machine's Nix store but each
//! has its own profile and state directory; a closure's
//! `bin/switch-to-configuration` records what is active, copies the
//! closure's health into the host's directory (where the health check
//! reads it), and, when the closure says so, stops the host's sshd (a
//! configuration that cuts the host off) or starts it again, or takes its
//! time (so Kiln can be killed in the middle).

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::*;

/// What each closure's activation does on its host.
const SWITCH: &str = r#"#!/bin/sh
H="$HOST_DIR"
echo "$KILN_PATH" > "$H/active"
echo "$KILN_PATH" >> "$H/activations"
cat "$KILN_PATH/health" > "$H/health"
if [ "$(cat "$KILN_PATH/reach")" = slow ]; then sleep 4; fi
# A pull host reaches Kiln through the test's proxy, which cuts it off
# while the file `cut` exists.
if [ ! -e "$H/../sshd_config" ]; then
  if [ "$(cat "$KILN_PATH/reach")" = no ]; then touch "$H/cut"; else rm -f "$H/cut"; fi
  echo "activated $KILN_PATH"
  exit 0
fi
if [ "$(cat "$KILN_PATH/reach")" = no ]; then
  kill "$(cat "$H/../sshd.pid")"
else
  kill -0 "$(cat "$H/../sshd.pid")" 2>/dev/null || /usr/sbin/sshd -f "$H/../sshd_config" -E "$H/../sshd-again.log"
fi
"#;

const TOKEN: &str = "deploy-test-token-0123456789";
/// The token of the pull host `lap`'s agent.
const AGENT_TOKEN: &str = "agent-token-of-lap-9876543210";

struct Host {
    name: String,
    sshd: Sshd,
    /// The host's own state: its profile, what is active, its health.
    dir: PathBuf,
}

impl Host {
    fn start(name: &str, deploy_pub: &str) -> Host {
        let sshd = Sshd::start();
        let keys = sshd.dir.path().join("authorized_keys");
        let mut k = std::fs::read_to_string(&keys).unwrap();
        k.push_str(deploy_pub);
        std::fs::write(&keys, k).unwrap();
        let dir = sshd.dir.path().join("host");
        std::fs::create_dir_all(&dir).unwrap();
        let pid = sshd.dir.path().join("sshd.pid");
        for _ in 0..100 {
            if pid.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(pid.exists(), "sshd wrote no pid file");
        Host { name: name.to_string(), sshd, dir }
    }

    fn host_key(&self) -> String {
        let line = std::fs::read_to_string(self.sshd.dir.path().join("hostkey.pub")).unwrap();
        line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
    }

    fn active(&self) -> String {
        std::fs::read_to_string(self.dir.join("active")).unwrap_or_default().trim().to_string()
    }

    fn activations(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("activations")).unwrap_or_default().lines().map(str::to_string).collect()
    }

    /// Where the host's profile points.
    fn profile(&self) -> String {
        std::fs::canonicalize(self.dir.join("profiles/system")).map(|p| p.display().to_string()).unwrap_or_default()
    }

    fn toml(&self, env: &str) -> String {
        let h = self.dir.display();
        format!(
            "[environments.{env}.hosts.{n}]\ntarget = \"ssh://root@127.0.0.1:{port}\"\nhost_key = \"{key}\"\n\
             job = \"hosts.{n}\"\nprofile = \"{h}/profiles/system\"\n\
             activate = \"HOST_DIR={h} $KILN_PATH/bin/switch-to-configuration switch\"\n\
             health_checks = [{{ command = \"grep -qx ok {h}/health\", timeout_s = 10 }}]\n",
            n = self.name,
            port = self.sshd.port,
            key = self.host_key(),
        )
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // An sshd a closure started again is not the fixture's child.
        if let Ok(pid) = std::fs::read_to_string(self.sshd.dir.path().join("sshd.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

/// `(host, health, reachable, tag)`: a closure per host; a new tag makes
/// a new closure.
fn flake_nix(hosts: &[(&str, &str, &str, &str)]) -> String {
    let jobs: String = hosts
        .iter()
        .map(|(h, health, reach, tag)| format!("{h} = sys \"{h}\" \"{health}\" \"{reach}\" \"{tag}\"; "))
        .collect();
    r#"{ outputs = { self }: let
    sys = host: health: reach: tag: derivation {
      name = "system-${host}"; system = "SYSTEM"; builder = "/bin/sh"; PATH = "/usr/bin:/bin";
      args = [ "-c" "mkdir -p $out/bin && echo ${health} > $out/health && echo ${reach} > $out/reach && echo ${tag} > $out/tag && cp ${./switch.sh} $out/bin/switch-to-configuration && chmod +x $out/bin/switch-to-configuration" ];
    };
  in { hydraJobs.hosts = { JOBS}; }; }
"#
    .replace("SYSTEM", SYSTEM)
    .replace("JOBS", &jobs)
}

struct Fixture {
    hosts: Vec<Host>,
    flake: Flake,
    kiln: Kiln,
    api: Api,
    _key_dir: tempfile::TempDir,
}

fn deploy_key() -> (tempfile::TempDir, PathBuf, String) {
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("deploy");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "kiln-deploy", "-f"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let public = std::fs::read_to_string(d.path().join("deploy.pub")).unwrap();
    (d, key, public)
}

fn start(names: &[&str], env_toml: &dyn Fn(&[Host]) -> String, first: &[(&str, &str, &str, &str)]) -> Fixture {
    start_on(None, None, names, env_toml, first)
}

/// As [`start`], on PostgreSQL when `database_url` is given, reporting to
/// the GitHub stand-in at `github` when given.
fn start_on(
    database_url: Option<&str>,
    github: Option<&str>,
    names: &[&str],
    env_toml: &dyn Fn(&[Host]) -> String,
    first: &[(&str, &str, &str, &str)],
) -> Fixture {
    let (key_dir, key, public) = deploy_key();
    let hosts: Vec<Host> = names.iter().map(|n| Host::start(n, &public)).collect();
    let kiln_toml = format!("[jobsets.main]\ncheck_interval = 1\n{}", env_toml(&hosts));
    let flake = Flake::new(&flake_nix(first), &[("switch.sh", SWITCH), (".kiln.toml", &kiln_toml)]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), format!("{TOKEN}\n")).unwrap();
    std::fs::write(dir.path().join("agent-token"), format!("{AGENT_TOKEN}\n")).unwrap();
    std::fs::write(dir.path().join("gh-token"), support::github::TOKEN).unwrap();
    let (github_table, github_repo) = match github {
        Some(url) => (
            format!("[github]\napi_url = \"{url}\"\ntoken_file = \"gh-token\"\nstatuses = \"summary\"\n"),
            format!("github = \"{}\"\n", support::github::REPO),
        ),
        None => (String::new(), String::new()),
    };
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "{}api_token_files = [\"token\"]\n[deploy]\nssh_key_file = \"{}\"\nconnect_timeout_s = 3\nactivate_timeout_s = 60\n\
             agent_wait_s = 6\nagent_token_files = {{ lap = \"agent-token\" }}\n{github_table}\
             [[projects]]\nname = \"infra\"\nrepo = \"{}\"\n{github_repo}",
            database_url.map(|u| format!("database_url = \"{u}\"\n")).unwrap_or_default(),
            key.display(),
            flake.path().display()
        ),
    )
    .unwrap();
    let kiln = Kiln::start_in(dir, &[]);
    let api = Api::new(&kiln.url, Some(TOKEN));
    Fixture { hosts, flake, kiln, api, _key_dir: key_dir }
}

impl Fixture {
    fn host(&self, n: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == n).unwrap()
    }

    /// Commits a new generation of the hosts' closures; returns its commit.
    fn commit(&self, hosts: &[(&str, &str, &str, &str)], msg: &str) -> String {
        self.flake.write("flake.nix", &flake_nix(hosts));
        self.flake.commit(msg)
    }

    /// The evaluation of `sha`, once it succeeded.
    async fn eval_of(&self, sha: &str) -> i64 {
        let e = wait_for(120, "the commit's evaluation", || async {
            let (_, v) = self.api.get("/jobset/infra/main/evals").await;
            v["evals"].as_array()?.iter().find(|e| e["commit"] == sha && e["status"] == "succeeded").cloned()
        })
        .await;
        e["id"].as_i64().unwrap()
    }

    /// The deployment of evaluation `eval` in `env` once it waits for Promote.
    async fn waiting(&self, env: &str, eval: i64) -> Value {
        wait_for(120, "a deployment waiting for promotion", || async {
            let (_, v) = self.api.get(&format!("/environment/infra/{env}")).await;
            v["deployments"].as_array()?.iter().find(|d| d["eval_id"] == eval && d["status"] == "waiting").cloned()
        })
        .await
    }

    /// The deployment of evaluation `eval` in `env`, once it has ended.
    async fn ended_deployment(&self, env: &str, eval: i64) -> Value {
        let d = wait_for(180, "the deployment to end", || async {
            let (_, v) = self.api.get(&format!("/environment/infra/{env}")).await;
            v["deployments"]
                .as_array()?
                .iter()
                .find(|d| d["eval_id"] == eval && matches!(d["status"].as_str(), Some("succeeded" | "failed")))
                .cloned()
        })
        .await;
        self.api.get(&format!("/deployment/{}", d["id"])).await.1
    }

    /// The closure the jobset built for a host's job in `eval`.
    async fn closure(&self, eval: i64, host: &str) -> String {
        let (_, e) = self.api.get(&format!("/eval/{eval}")).await;
        let build =
            e["jobs"][format!("hosts.{host}")].as_i64().unwrap_or_else(|| panic!("no build of hosts.{host} in {e}"));
        let (_, b) = self.api.get(&format!("/build/{build}")).await;
        b["buildoutputs"]["out"]["path"].as_str().unwrap().to_string()
    }
}

fn host_part<'a>(d: &'a Value, host: &str) -> &'a Value {
    d["hosts"].as_array().unwrap().iter().find(|h| h["host"] == host).unwrap_or_else(|| panic!("{host} in {d}"))
}

/// `[environments.prod]` of the jobset `main` with `keys`, and every host.
fn prod_with(keys: &str, hosts: &[Host]) -> String {
    let mut t = format!("[environments.prod]\njobset = \"main\"\n{keys}");
    for h in hosts {
        t.push_str(&h.toml("prod"));
    }
    t
}

/// A manual environment `live` of the first host.
fn live_env(hosts: &[Host]) -> String {
    format!("[environments.live]\njobset = \"main\"\nmode = \"manual\"\n{}", hosts[0].toml("live"))
}

fn prod_env(hosts: &[Host]) -> String {
    prod_with("waves = [[\"web1\"], [\"web2\", \"web3\"]]\nconfirm_timeout_s = 4\n", hosts)
}

#[tokio::test]
async fn waves_go_green_a_failing_canary_is_rolled_back_and_stops_the_rollout() {
    let v1 = [("web1", "ok", "yes", "v1"), ("web2", "ok", "yes", "v1"), ("web3", "ok", "yes", "v1")];
    let f = start(&["web1", "web2", "web3"], &prod_env, &v1);
    let sha1 = git(f.flake.path(), &["rev-parse", "HEAD"]).trim().to_string();

    // 1. The first green evaluation goes to every host, canary first.
    let e1 = f.eval_of(&sha1).await;
    let d1 = f.ended_deployment("prod", e1).await;
    assert_eq!(d1["status"], "succeeded", "{d1:#}");
    let mut p1 = std::collections::HashMap::new();
    for n in ["web1", "web2", "web3"] {
        let path = f.closure(e1, n).await;
        let h = host_part(&d1, n);
        assert_eq!((h["status"].as_str(), h["store_path"].as_str()), (Some("succeeded"), Some(path.as_str())), "{h:#}");
        assert!(h["previous_path"].is_null(), "a first deployment has nothing before it: {h:#}");
        assert!(h["log"].as_str().unwrap().contains("nothing to roll back to"), "{h:#}");
        assert_eq!(h["checks"][0]["ok"], true, "{h:#}");
        assert_eq!((f.host(n).active(), f.host(n).profile()), (path.clone(), path.clone()));
        p1.insert(n, path);
    }
    let canary_done = host_part(&d1, "web1")["finished_at"].as_i64().unwrap();
    for n in ["web2", "web3"] {
        assert!(
            host_part(&d1, n)["started_at"].as_i64().unwrap() >= canary_done,
            "the second wave waits for the canary"
        );
    }
    let (_, env) = f.api.get("/environment/infra/prod").await;
    for h in env["hosts"].as_array().unwrap() {
        assert_eq!(h["running"].as_str(), Some(p1[h["host"].as_str().unwrap()].as_str()), "{env:#}");
    }

    // 2. A canary that fails its health check goes back to the exact
    // previous closure, and the second wave never starts.
    let sha2 =
        f.commit(&[("web1", "bad", "yes", "v2"), ("web2", "ok", "yes", "v2"), ("web3", "ok", "yes", "v2")], "v2");
    let e2 = f.eval_of(&sha2).await;
    let d2 = f.ended_deployment("prod", e2).await;
    assert_eq!(d2["status"], "failed", "{d2:#}");
    assert!(d2["error"].as_str().unwrap().contains("wave 1"), "{d2:#}");
    let w1 = host_part(&d2, "web1");
    let p2 = f.closure(e2, "web1").await;
    assert_eq!(w1["status"], "rolled-back", "{w1:#}");
    assert_eq!(w1["previous_path"].as_str(), Some(p1["web1"].as_str()));
    assert!(w1["error"].as_str().unwrap().contains("health check failed"), "{w1:#}");
    assert_eq!(w1["checks"][0]["ok"], false, "{w1:#}");
    assert_eq!(f.host("web1").activations(), vec![p1["web1"].clone(), p2.clone(), p1["web1"].clone()]);
    assert_eq!((f.host("web1").active(), f.host("web1").profile()), (p1["web1"].clone(), p1["web1"].clone()));
    for n in ["web2", "web3"] {
        assert_eq!(host_part(&d2, n)["status"], "not-started", "{d2:#}");
        assert_eq!(f.host(n).activations(), vec![p1[n].clone()], "{n} was never switched");
    }

    // 3. A canary whose new configuration cuts it off cannot be confirmed:
    // its own watchdog goes back to the previous closure.
    let sha3 = f.commit(&[("web1", "ok", "no", "v3"), ("web2", "ok", "yes", "v1"), ("web3", "ok", "yes", "v1")], "v3");
    let e3 = f.eval_of(&sha3).await;
    let d3 = f.ended_deployment("prod", e3).await;
    assert_eq!(d3["status"], "failed", "{d3:#}");
    let w1 = host_part(&d3, "web1");
    let p3 = f.closure(e3, "web1").await;
    assert_eq!(w1["status"], "rolled-back", "{w1:#}");
    assert!(w1["error"].as_str().unwrap().contains("watchdog rolled back"), "{w1:#}");
    assert_eq!(f.host("web1").activations(), vec![p1["web1"].clone(), p2, p1["web1"].clone(), p3, p1["web1"].clone()]);
    assert_eq!(f.host("web1").profile(), p1["web1"]);

    // 4. Only what changed is switched: web2 and web3 already run their
    // closures.
    let sha4 = f.commit(&[("web1", "ok", "yes", "v4"), ("web2", "ok", "yes", "v1"), ("web3", "ok", "yes", "v1")], "v4");
    let e4 = f.eval_of(&sha4).await;
    let d4 = f.ended_deployment("prod", e4).await;
    assert_eq!(d4["status"], "succeeded", "{d4:#}");
    let p4 = f.closure(e4, "web1").await;
    assert_eq!(host_part(&d4, "web1")["status"], "succeeded");
    assert_eq!(f.host("web1").active(), p4);
    for n in ["web2", "web3"] {
        assert_eq!(host_part(&d4, n)["status"], "skipped", "{d4:#}");
        assert_eq!(f.host(n).activations(), vec![p1[n].clone()]);
    }
    let metrics = reqwest::get(format!("{}/metrics", f.kiln.url)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("kiln_deployments{status=\"failed\"} 2"), "{metrics}");
    assert!(metrics.contains("kiln_deployment_hosts{status=\"rolled-back\"} 2"), "{metrics}");
    // The pages render what the JSON says.
    let page = reqwest::get(format!("{}/deployment/{}", f.kiln.url, d3["id"])).await.unwrap().text().await.unwrap();
    assert!(page.contains("rolled-back") && page.contains("Wave 2"), "{page}");
    let page = reqwest::get(format!("{}/environments", f.kiln.url)).await.unwrap().text().await.unwrap();
    assert!(page.contains("infra:prod") && page.contains(&p4), "{page}");
}

#[tokio::test]
async fn a_manual_environment_waits_for_promote_and_a_bad_environment_names_its_key() {
    // On PostgreSQL (the other tests run on SQLite).
    let pg = PgDatabase::create().await;
    let v1 = [("app", "ok", "yes", "v1")];
    let f = start_on(Some(&pg.url), None, &["app"], &live_env, &v1);
    let sha1 = git(f.flake.path(), &["rev-parse", "HEAD"]).trim().to_string();
    let e1 = f.eval_of(&sha1).await;
    let waiting = f.waiting("live", e1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(f.host("app").activations().is_empty(), "nothing is switched before Promote");
    let id = waiting["id"].as_i64().unwrap();

    // Promote needs a token; then the deployment runs.
    let anon = Api::new(&f.kiln.url, None);
    assert_eq!(anon.send("POST", &format!("/deployment/{id}/promote"), None).await.0, 401);
    let (code, body) = f.api.send("POST", &format!("/deployment/{id}/promote"), None).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = f.api.send("POST", &format!("/deployment/{id}/promote"), None).await;
    assert_eq!(code, 400, "promoted twice: {body}");
    let d = f.ended_deployment("live", e1).await;
    assert_eq!((d["status"].as_str(), d["reason"].as_str()), (Some("succeeded"), Some("promoted")), "{d:#}");
    let p1 = f.closure(e1, "app").await;
    assert_eq!(f.host("app").activations(), vec![p1.clone()]);

    // Deploying by hand an evaluation the host already runs skips it.
    let (code, body) =
        f.api.send("POST", "/environment/infra/live/deploy", Some(serde_json::json!({"eval": e1}))).await;
    assert_eq!(code, 200, "{body}");
    let again = body["deployment"].as_i64().unwrap();
    let d = wait_for(60, "the deployment by hand", || async {
        let (_, d) = f.api.get(&format!("/deployment/{again}")).await;
        (d["status"] == "succeeded").then_some(d)
    })
    .await;
    assert_eq!(host_part(&d, "app")["status"], "skipped", "{d:#}");
    let (code, body) =
        f.api.send("POST", "/environment/infra/live/deploy", Some(serde_json::json!({"hosts": ["nope"]}))).await;
    assert_eq!(code, 400, "{body}");

    // A bad environment is an error that names the key, and changes nothing.
    let bad = std::fs::read_to_string(f.flake.path().join(".kiln.toml"))
        .unwrap()
        .replace("mode = \"manual\"", "mode = \"manual\"\nbake_time = 3");
    f.flake.write(".kiln.toml", &bad);
    f.flake.commit("a typo");
    let err = wait_for(60, "the project's error", || async {
        let (_, p) = f.api.get("/project/infra").await;
        p["error"].as_str().filter(|e| e.contains("bake_time")).map(str::to_string)
    })
    .await;
    assert!(err.contains("environments.live"), "{err}");
    let (code, _) = f.api.get("/environment/infra/live").await;
    assert_eq!(code, 200, "the environment as last declared stays");
}

#[tokio::test]
async fn kiln_killed_mid_switch_resumes_the_deployment_after_a_restart() {
    let env = |hosts: &[Host]| prod_with("waves = [[\"a\"], [\"b\"]]\nconfirm_timeout_s = 4\n", hosts);
    let mut f = start(&["a", "b"], &env, &[("a", "ok", "yes", "v1"), ("b", "ok", "yes", "v1")]);
    let sha1 = git(f.flake.path(), &["rev-parse", "HEAD"]).trim().to_string();
    let e1 = f.eval_of(&sha1).await;
    assert_eq!(f.ended_deployment("prod", e1).await["status"], "succeeded");
    let p1 = f.closure(e1, "a").await;

    // The canary's activation takes seconds: Kiln is killed during it.
    let sha2 = f.commit(&[("a", "ok", "slow", "v2"), ("b", "ok", "yes", "v2")], "v2");
    let e2 = f.eval_of(&sha2).await;
    let id = wait_for(120, "the canary switching", || async {
        let (_, v) = f.api.get("/environment/infra/prod").await;
        let d = v["deployments"].as_array()?.iter().find(|d| d["eval_id"] == e2)?.clone();
        let (_, d) = f.api.get(&format!("/deployment/{}", d["id"])).await;
        (host_part(&d, "a")["status"] == "switching").then(|| d["id"].as_i64().unwrap())
    })
    .await;
    f.kiln.child.kill().unwrap();
    let _ = f.kiln.child.wait();
    let dir = std::mem::replace(&mut f.kiln.dir, tempfile::tempdir().unwrap());
    f.kiln = Kiln::start_in(dir, &[]);
    f.api = Api::new(&f.kiln.url, Some(TOKEN));

    // The restarted server ends the old attempt's watchdog, switches the
    // canary again from the previous closure it recorded, and goes on.
    let d = f.ended_deployment("prod", e2).await;
    assert_eq!((d["id"].as_i64(), d["status"].as_str()), (Some(id), Some("succeeded")), "{d:#}");
    let p2 = f.closure(e2, "a").await;
    let a = host_part(&d, "a");
    assert_eq!((a["status"].as_str(), a["previous_path"].as_str()), (Some("succeeded"), Some(p1.as_str())), "{a:#}");
    assert_eq!(host_part(&d, "b")["status"], "succeeded", "{d:#}");
    let acts = f.host("a").activations();
    assert_eq!(acts.first(), Some(&p1));
    assert!(acts[1..].iter().all(|p| p == &p2) && acts.len() >= 2, "{acts:?}");
    // Past the confirmation timeout no watchdog has rolled the canary back.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!((f.host("a").active(), f.host("a").profile()), (p2.clone(), p2));
    let (_, env) = f.api.get("/environment/infra/prod").await;
    assert_eq!(env["deployments"].as_array().unwrap().iter().filter(|d| d["eval_id"] == e2).count(), 1, "{env:#}");
}

/// A host Kiln cannot reach: its agent, run as on the host, takes each
/// closure, switches, checks, rolls back and reports, as a push would.
struct PullHost {
    dir: tempfile::TempDir,
}

impl PullHost {
    fn new() -> PullHost {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("host")).unwrap();
        PullHost { dir }
    }
    fn h(&self) -> PathBuf {
        self.dir.path().join("host")
    }
    fn toml(&self) -> String {
        let h = self.h();
        let h = h.display();
        format!(
            "[environments.field]\njobset = \"main\"\nconfirm_timeout_s = 4\n\
             [environments.field.hosts.lap]\npull = true\njob = \"hosts.lap\"\nprofile = \"{h}/profiles/system\"\n\
             activate = \"HOST_DIR={h} $KILN_PATH/bin/switch-to-configuration switch\"\n\
             health_checks = [{{ command = \"grep -qx ok {h}/health\", timeout_s = 10 }}]\n"
        )
    }
    fn active(&self) -> String {
        std::fs::read_to_string(self.h().join("active")).unwrap_or_default().trim().to_string()
    }
    fn activations(&self) -> Vec<String> {
        std::fs::read_to_string(self.h().join("activations")).unwrap_or_default().lines().map(str::to_string).collect()
    }
    fn profile(&self) -> String {
        std::fs::canonicalize(self.h().join("profiles/system")).map(|p| p.display().to_string()).unwrap_or_default()
    }
}

struct Agent(std::process::Child);

/// A TCP proxy to `target` (`host:port`) that refuses and cuts every
/// connection while the file `cut` exists: the network a configuration
/// can break. Answers its own `http://` URL.
async fn cutting_proxy(target: String, cut: PathBuf) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else { return };
            if cut.exists() {
                continue;
            }
            let (cut, target) = (cut.clone(), target.clone());
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else { return };
                let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                let watch = async {
                    while !cut.exists() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                };
                tokio::select! {
                    _ = copy => {}
                    _ = watch => {}
                }
            });
        }
    });
    url
}

impl Agent {
    fn start(url: &str, token_file: &std::path::Path, log: &std::path::Path) -> Agent {
        let child = kiln_cmd()
            .args(["agent", "--server", url, "--host", "lap", "--token-file"])
            .arg(token_file)
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        Agent(child)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_pull_hosts_agent_switches_checks_and_rolls_back_as_a_push_does() {
    let lap = PullHost::new();
    let toml = lap.toml();
    // Deployments are reported to GitHub (its stand-in) as they go.
    let github = support::github::Fake::start().await;
    let f = start_on(None, Some(&github.url), &[], &|_| toml.clone(), &[("lap", "ok", "yes", "v1")]);
    let sha1 = git(f.flake.path(), &["rev-parse", "HEAD"]).trim().to_string();
    let token_file = lap.dir.path().join("agent-token");
    std::fs::write(&token_file, AGENT_TOKEN).unwrap();
    let agent_log = lap.dir.path().join("agent.log");

    // Only the host's own token opens the agent's endpoints.
    let (code, _) = f.api.get("/api/agent/lap/next").await;
    assert_eq!(code, 401, "an API token is not the agent's token");
    let wrong = Api::new(&f.kiln.url, Some("agent-token-of-someone-else"));
    assert_eq!(
        wrong
            .send("POST", "/api/agent/lap/deployment/1", Some(serde_json::json!({"kind": "log", "text": "x"})))
            .await
            .0,
        401
    );
    let other = Api::new(&f.kiln.url, Some(AGENT_TOKEN));
    assert_eq!(other.get("/api/agent/web9/next").await.0, 401, "the token is lap's, not web9's");

    // 1. The first closure: taken, switched, checked, reported.
    let target = f.kiln.url.trim_start_matches("http://").to_string();
    let proxy = cutting_proxy(target, lap.h().join("cut")).await;
    let agent = Agent::start(&proxy, &token_file, &agent_log);
    let e1 = f.eval_of(&sha1).await;
    let d1 = f.ended_deployment("field", e1).await;
    let log = || std::fs::read_to_string(&agent_log).unwrap_or_default();
    assert_eq!(d1["status"], "succeeded", "{d1:#}\n{}", log());
    let p1 = f.closure(e1, "lap").await;
    let h = host_part(&d1, "lap");
    assert_eq!(h["status"], "succeeded", "{h:#}");
    assert!(h["previous_path"].is_null() && h["log"].as_str().unwrap().contains("nothing to roll back to"), "{h:#}");
    assert_eq!(h["checks"][0]["ok"], true, "{h:#}");
    assert_eq!((lap.active(), lap.profile()), (p1.clone(), p1.clone()));

    // 2. A closure that fails its health check goes back to the exact
    // previous one, and the deployment says so.
    let sha2 = f.commit(&[("lap", "bad", "yes", "v2")], "v2");
    let e2 = f.eval_of(&sha2).await;
    let d2 = f.ended_deployment("field", e2).await;
    assert_eq!(d2["status"], "failed", "{d2:#}");
    let h = host_part(&d2, "lap");
    let p2 = f.closure(e2, "lap").await;
    assert_eq!((h["status"].as_str(), h["previous_path"].as_str()), (Some("rolled-back"), Some(p1.as_str())), "{h:#}");
    assert!(h["error"].as_str().unwrap().contains("health check failed"), "{h:#}");
    assert_eq!(lap.activations(), vec![p1.clone(), p2, p1.clone()]);
    assert_eq!((lap.active(), lap.profile()), (p1.clone(), p1.clone()));

    // 3. Deploying what the host runs skips it.
    let (code, d) = f.api.send("POST", "/environment/infra/field/deploy", Some(serde_json::json!({"eval": e1}))).await;
    assert_eq!(code, 200, "{d}");
    let d3 = wait_for(60, "the redeployment to end", || async {
        let (_, v) = f.api.get(&format!("/deployment/{}", d["deployment"])).await;
        matches!(v["status"].as_str(), Some("succeeded" | "failed")).then_some(v)
    })
    .await;
    assert_eq!(host_part(&d3, "lap")["status"], "skipped", "{d3:#}");
    assert_eq!(lap.activations().len(), 3);
    // Going back to an older evaluation by hand is not undone by planning
    // the newest (failed) one again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, env) = f.api.get("/environment/infra/field").await;
    let of_e2 = env["deployments"].as_array().unwrap().iter().filter(|d| d["eval_id"] == e2).count();
    assert_eq!(of_e2, 1, "{env:#}");

    // 4. A closure that cuts the host off from Kiln: the agent cannot
    // confirm, the host's watchdog goes back to the previous closure, and
    // once back in touch the agent reports it.
    let sha_cut = f.commit(&[("lap", "ok", "no", "v3")], "v3");
    let e_cut = f.eval_of(&sha_cut).await;
    let d_cut = f.ended_deployment("field", e_cut).await;
    let h = host_part(&d_cut, "lap");
    assert_eq!((d_cut["status"].as_str(), h["status"].as_str()), (Some("failed"), Some("rolled-back")), "{d_cut:#}");
    let error = h["error"].as_str().unwrap();
    assert!(error.contains("cannot reach Kiln after activation") && error.contains("watchdog rolled back"), "{h:#}");
    let p_cut = f.closure(e_cut, "lap").await;
    // The activation's own output is recorded too, once the agent is back.
    assert!(h["log"].as_str().unwrap().contains(&format!("activated {p_cut}")), "{h:#}");
    assert_eq!(lap.activations()[3..], [p_cut, p1.clone()]);
    assert_eq!((lap.active(), lap.profile()), (p1.clone(), p1.clone()));

    // 5. Without its agent, the host's wave fails after agent_wait_s, and
    // the host is untouched.
    drop(agent);
    let sha4 = f.commit(&[("lap", "ok", "yes", "v4")], "v4");
    let e4 = f.eval_of(&sha4).await;
    let d4 = f.ended_deployment("field", e4).await;
    let h = host_part(&d4, "lap");
    assert_eq!((d4["status"].as_str(), h["status"].as_str()), (Some("failed"), Some("failed")), "{d4:#}");
    assert!(h["error"].as_str().unwrap().contains("did not take the closure within 6 s"), "{h:#}");
    assert_eq!(lap.active(), p1);
    // A report for a part Kiln ended is refused, not recorded.
    let late = other
        .send(
            "POST",
            &format!("/api/agent/lap/deployment/{}", d4["id"]),
            Some(serde_json::json!({"kind": "status", "status": "succeeded"})),
        )
        .await;
    assert_eq!(late.0, 409, "{late:?}");

    // GitHub has a deployment of each commit to the environment, whose
    // statuses end as Kiln's deployments ended, each linking to its page.
    let ended = [
        (&d1, &sha1, "success"),
        (&d2, &sha2, "failure"),
        (&d3, &sha1, "success"),
        (&d_cut, &sha_cut, "failure"),
        (&d4, &sha4, "failure"),
    ];
    let gh = wait_for(30, "GitHub's deployment statuses", || async {
        let h = github.hub.lock().unwrap();
        let done = h.deployments.len() >= ended.len()
            && h.deployments.iter().zip(ended.iter()).all(|(gd, (_, _, state))| {
                h.deployment_statuses.iter().rfind(|s| s.0 == gd.0).is_some_and(|s| s.1 == *state)
            });
        done.then(|| (h.deployments.clone(), h.deployment_statuses.clone()))
    })
    .await;
    let (deployments, statuses) = gh;
    assert_eq!(deployments.len(), ended.len(), "{deployments:?}");
    for ((gid, git_ref, environment), (d, sha, _)) in deployments.iter().zip(ended.iter()) {
        assert_eq!((git_ref.as_str(), environment.as_str()), (sha.as_str(), "field"));
        let mine: Vec<&(i64, String, String)> = statuses.iter().filter(|s| s.0 == *gid).collect();
        assert!(mine.iter().all(|s| s.2.ends_with(&format!("/deployment/{}", d["id"]))), "{mine:?}");
    }
    github.assert_valid();
}

#[tokio::test]
async fn kiln_deploy_on_the_command_line_runs_a_deployment_without_the_server_and_follows_one_with_it() {
    let env = |hosts: &[Host]| prod_with("mode = \"manual\"\nwaves = [[\"a\"], [\"b\"]]\n", hosts);
    let mut f = start(&["a", "b"], &env, &[("a", "ok", "yes", "v1"), ("b", "ok", "yes", "v1")]);
    let sha1 = git(f.flake.path(), &["rev-parse", "HEAD"]).trim().to_string();
    let e1 = f.eval_of(&sha1).await;
    let sha2 = f.commit(&[("a", "ok", "yes", "v2"), ("b", "ok", "yes", "v2")], "v2");
    let e2 = f.eval_of(&sha2).await;
    wait_for(120, "evaluation 2 planned (waiting for Promote)", || async {
        let (_, v) = f.api.get("/environment/infra/prod").await;
        v["deployments"].as_array()?.iter().find(|d| d["eval_id"] == e2 && d["status"] == "waiting").cloned()
    })
    .await;
    let (p1a, p2a, p2b) = (f.closure(e1, "a").await, f.closure(e2, "a").await, f.closure(e2, "b").await);

    // The server is down: the command line deploys by itself.
    f.kiln.child.kill().unwrap();
    let _ = f.kiln.child.wait();
    let kiln_dir = f.kiln.dir.path().to_path_buf();
    let deploy = |args: &[&str]| {
        let out = kiln_cmd().current_dir(&kiln_dir).arg("deploy").args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = deploy(&["staging"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no environment \"staging\"") && err.contains("infra/prod"), "{err}");
    let (code, _, err) = deploy(&["prod", "--hosts", "a,zz"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("\"zz\" is not a host of environment prod"), "{err}");

    let (code, out, err) = deploy(&["infra/prod", "--eval", &e1.to_string(), "--hosts", "a"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("a (wave 1): succeeded") && !out.contains("b (wave"), "{out}");
    assert!(out.contains("  a | ") && out.contains("nothing to roll back to"), "the host's log streams: {out}");
    assert_eq!(f.host("a").activations(), vec![p1a.clone()]);
    assert!(f.host("b").activations().is_empty(), "only the hosts asked for");

    let (code, out, err) = deploy(&["prod", "--eval", &e2.to_string(), "--hosts", "a"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!((f.host("a").active(), f.host("a").profile()), (p2a.clone(), p2a.clone()));

    // With the server running again, the command line's deployment runs
    // once, here or there, and its progress shows here either way.
    let dir = std::mem::replace(&mut f.kiln.dir, tempfile::tempdir().unwrap());
    f.kiln = Kiln::start_in(dir, &[]);
    f.api = Api::new(&f.kiln.url, Some(TOKEN));
    let (code, out, err) = deploy(&["prod"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("a (wave 1): skipped") && out.contains("b (wave 2): succeeded"), "{out}");
    assert_eq!(f.host("b").activations(), vec![p2b.clone()]);
    assert_eq!(f.host("a").activations(), vec![p1a, p2a]);
    let (_, v) = f.api.get("/environment/infra/prod").await;
    let cli: Vec<&Value> = v["deployments"].as_array().unwrap().iter().filter(|d| d["reason"] == "cli").collect();
    assert_eq!(cli.len(), 3, "{v:#}");
    assert!(cli.iter().all(|d| d["status"] == "succeeded"), "{v:#}");
}

/// A person promotes a waiting deployment in a real browser, signed in,
/// and watches the page follow it to the end without reloading.
#[tokio::test]
async fn promote_in_the_browser_and_the_deployment_page_follows_it_live() {
    use fantoccini::Locator;
    use support::browser::*;
    let f = start(&["app"], &live_env, &[("app", "ok", "slow", "v1")]);
    let sha1 = git(f.flake.path(), &["rev-parse", "HEAD"]).trim().to_string();
    let e1 = f.eval_of(&sha1).await;
    let waiting = f.waiting("live", e1).await;
    let id = waiting["id"].as_i64().unwrap();

    let d = driver().await;
    let profile = tempfile::tempdir().unwrap();
    let c = browser(&d, profile.path()).await;
    let promote = format!("form[action='/deployment/{id}/promote'] button");
    c.goto(&format!("{}/deployment/{id}", f.kiln.url)).await.unwrap();
    assert_eq!(text(&c, "#status").await, "waiting");
    assert!(c.find(Locator::Css(&promote)).await.is_err(), "no Promote button while signed out");

    click_link(&c, "Sign in").await;
    until(&c, "h1", |h| h == "Sign in").await;
    c.find(Locator::Id("token")).await.unwrap().send_keys(TOKEN).await.unwrap();
    c.find(Locator::Css("form[action='/login'] button")).await.unwrap().click().await.unwrap();
    until(&c, "header", |h| h.contains("Sign out")).await;
    c.goto(&format!("{}/deployment/{id}", f.kiln.url)).await.unwrap();
    shot(&c, "deploy-1-waiting").await;
    c.find(Locator::Css(&promote)).await.unwrap().click().await.unwrap();
    // Back on the page, which then follows the deployment by itself (the
    // activation takes seconds).
    until(&c, "#status", |s| s == "running" || s == "queued").await;
    assert_eq!(c.current_url().await.unwrap().path(), format!("/deployment/{id}"));
    wait_for(15, "the page to listen for events", || async {
        let m = c.find(Locator::Css("main")).await.ok()?;
        (m.attr("data-events").await.ok()?? == "connected").then_some(())
    })
    .await;
    until(&c, "#status", |s| s == "succeeded").await;
    let main = c.find(Locator::Css("main")).await.unwrap();
    assert!(main.attr("data-updated").await.unwrap().is_some(), "updated by the script, not reloaded");
    until(&c, "main", |m| m.contains("app: succeeded")).await;
    shot(&c, "deploy-2-succeeded").await;
    let p1 = f.closure(e1, "app").await;
    assert_eq!(f.host("app").activations(), vec![p1]);
    let (_, v) = f.api.get(&format!("/deployment/{id}")).await;
    assert_eq!((v["status"].as_str(), v["reason"].as_str()), (Some("succeeded"), Some("promoted")), "{v:#}");
}

#[tokio::test]
async fn rollback_all_sends_a_pull_host_back_through_its_agent() {
    let lap = PullHost::new();
    let h = lap.h();
    let lap_toml = format!(
        "[environments.mixed.hosts.lap]\npull = true\njob = \"hosts.lap\"\nprofile = \"{h}/profiles/system\"\n\
         activate = \"HOST_DIR={h} $KILN_PATH/bin/switch-to-configuration switch\"\n",
        h = h.display()
    );
    let env = move |hosts: &[Host]| {
        format!(
            "[environments.mixed]\njobset = \"main\"\nwaves = [[\"lap\"], [\"b\"]]\non_failure = \"rollback-all\"\n\
             confirm_timeout_s = 4\n{lap_toml}{}",
            hosts[0].toml("mixed")
        )
    };
    let f = start(&["b"], &env, &[("lap", "ok", "yes", "v1"), ("b", "ok", "yes", "v1")]);
    let token_file = lap.dir.path().join("agent-token");
    std::fs::write(&token_file, AGENT_TOKEN).unwrap();
    let _agent = Agent::start(&f.kiln.url, &token_file, &lap.dir.path().join("agent.log"));
    let sha1 = git(f.flake.path(), &["rev-parse", "HEAD"]).trim().to_string();
    let e1 = f.eval_of(&sha1).await;
    assert_eq!(f.ended_deployment("mixed", e1).await["status"], "succeeded");
    let p1 = f.closure(e1, "lap").await;

    // The pull host goes first and succeeds; b fails its check; with
    // rollback-all the agent takes lap back to exactly where it was.
    let sha2 = f.commit(&[("lap", "ok", "yes", "v2"), ("b", "bad", "yes", "v2")], "v2");
    let e2 = f.eval_of(&sha2).await;
    let d = f.ended_deployment("mixed", e2).await;
    assert_eq!(d["status"], "failed", "{d:#}");
    assert_eq!(host_part(&d, "b")["status"], "rolled-back", "{d:#}");
    let l = host_part(&d, "lap");
    assert_eq!((l["status"].as_str(), l["previous_path"].as_str()), (Some("rolled-back"), Some(p1.as_str())), "{l:#}");
    assert!(l["error"].as_str().unwrap().contains("a later wave failed"), "{l:#}");
    let p2 = f.closure(e2, "lap").await;
    assert_eq!(lap.activations(), vec![p1.clone(), p2, p1.clone()]);
    assert_eq!((lap.active(), lap.profile()), (p1.clone(), p1));
}
