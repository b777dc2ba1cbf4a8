//! What Kiln keeps about its machines across restarts, with real builders
//! (chroot stores behind a private sshd), the real `kiln serve` and both
//! databases: a machine paused by its failures is still paused, and gets
//! no step, after a restart; an operator disables a machine with a token
//! or from the signed-in page, and the queue sends it nothing new (also
//! after a restart) until it is enabled again.

mod support;

use std::time::Duration;

use support::*;

const TOKEN: &str = "machine-token-1";

/// A flake with one job per name, each writing its name.
fn jobs_flake(tag: &str, jobs: &[&str]) -> String {
    let jobs: Vec<String> = jobs
        .iter()
        .map(|j| format!("{j} = {};", drv_expr(&format!("{j}-{tag}"), &format!("echo {j} > $out"))))
        .collect();
    format!("{{ outputs = _: {{ hydraJobs = {{ {} }}; }}; }}", jobs.join(" "))
}

/// `kiln serve` on `backend` with a token, the machines file and project
/// `p` building `flake`.
fn config(pg: Option<&PgDatabase>, machines: &std::path::Path, flake: &Flake, queue: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "{}api_token_files = [\"token\"]\nmachines_file = \"{}\"\n[queue]\n{queue}\n\
             [[projects]]\nname = \"p\"\nrepo = \"{}\"\n",
            pg.map(|p| format!("database_url = \"{}\"\n", p.url)).unwrap_or_default(),
            machines.display(),
            flake.path().display()
        ),
    )
    .unwrap();
    dir
}

/// Starts Kiln again on the same working directory and database.
fn restart(kiln: &mut Kiln) -> Kiln {
    let status = kiln.terminate();
    assert!(status.success(), "{status}\n{}", kiln.log());
    Kiln::start_in(std::mem::replace(&mut kiln.dir, tempfile::tempdir().unwrap()), &[])
}

/// The build of `job` in the newest evaluation of p:main, once it exists.
async fn build_of(kiln: &Kiln, api: &Api, job: &str) -> i64 {
    for _ in 0..1200 {
        let e = api.get("/jobset/p/main/evals").await.1["evals"].as_array().and_then(|e| e.first().cloned());
        if let Some(e) = e
            && let Some(id) = api.get(&format!("/eval/{}", e["id"])).await.1["jobs"][job].as_i64()
        {
            return id;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no build of {job}: {}\n{}", api.get("/jobset/p/main").await.1, kiln.log());
}

async fn finished(api: &Api, id: i64) -> serde_json::Value {
    wait_for(120, &format!("build {id} to finish"), || async {
        let (_, b) = api.get(&format!("/build/{id}")).await;
        (b["finished"] == 1).then_some(b)
    })
    .await
}

/// The machine named `uri` on /machines, as JSON.
async fn machine(api: &Api, uri: &str) -> serde_json::Value {
    let (code, v) = api.get("/machines").await;
    assert_eq!(code, 200, "{v}");
    v["machines"].as_array().unwrap().iter().find(|m| m["uri"] == uri).unwrap_or_else(|| panic!("{uri}: {v}")).clone()
}

/// Adds `jobs` to the flake, commits and pushes.
async fn push_jobs(api: &Api, flake: &Flake, tag: &str, jobs: &[&str]) {
    flake.write("flake.nix", &jobs_flake(tag, jobs));
    flake.commit("more jobs");
    let (code, v) = api.send("POST", "/api/push?jobsets=p:main", None).await;
    assert_eq!(code, 200, "{v}");
}

#[tokio::test]
async fn a_machine_paused_by_its_failures_stays_paused_after_a_restart() {
    for backend in ["sqlite", "postgres"] {
        let sshd = Sshd::start();
        let good = Builder::new(&sshd, "good", 1);
        // Nothing listens on port 1: every connection is refused. Listed
        // first, it is the one picked while both are idle.
        let bad_uri = "ssh://root@127.0.0.1:1";
        let machines = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(machines.path(), format!("{bad_uri} x86_64-linux - 1\n{}\n", good.machines_line_with_port))
            .unwrap();
        let tag = unique("pause");
        let flake = Flake::new(&jobs_flake(&tag, &["a"]), &[(".kiln.toml", "[jobsets.main]\ncheck_interval = 0\n")]);
        let pg = if backend == "postgres" { Some(PgDatabase::create().await) } else { None };
        let dir =
            config(pg.as_ref(), machines.path(), &flake, "pause_after_failures = 1\npause_s = 3600\nretry_delay_s = 1");
        let mut kiln = Kiln::start_in(dir, &[]);
        let api = Api::new(&kiln.url, Some(TOKEN));

        let a = finished(&api, build_of(&kiln, &api, "a").await).await;
        assert_eq!(a["buildstatus"], 0, "{backend}: {a}\n{}", kiln.log());
        let bad = machine(&api, bad_uri).await;
        assert_eq!(bad["consecutive_failures"], 1, "{backend}: the step went there first: {bad}");
        assert!(bad["paused"].is_string(), "{backend}: {bad}");

        let again = restart(&mut kiln);
        let api = Api::new(&again.url, Some(TOKEN));
        assert!(machine(&api, bad_uri).await["paused"].is_string(), "{backend}");
        // A new build: were the pause forgotten, its step would go to the
        // idle bad machine first and count a second failure.
        push_jobs(&api, &flake, &tag, &["a", "b"]).await;
        let b = finished(&api, build_of(&again, &api, "b").await).await;
        assert_eq!(b["buildstatus"], 0, "{backend}: {b}\n{}", again.log());
        let bad = machine(&api, bad_uri).await;
        assert_eq!(bad["consecutive_failures"], 1, "{backend}: no step was sent to the paused machine: {bad}");
        assert!(bad["paused"].is_string(), "{backend}: {bad}");
        assert_eq!(machine(&api, good.machines_line_with_port.split(' ').next().unwrap()).await["steps_done"], 2);
    }
}

#[tokio::test]
async fn an_operator_disables_a_machine_and_the_queue_follows_until_it_is_enabled() {
    for backend in ["sqlite", "postgres"] {
        let sshd = Sshd::start();
        let only = Builder::new(&sshd, "only", 1);
        let uri = only.machines_line_with_port.split(' ').next().unwrap().to_string();
        let machines = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(machines.path(), format!("{}\n", only.machines_line_with_port)).unwrap();
        let tag = unique("disable");
        let flake = Flake::new(&jobs_flake(&tag, &[]), &[(".kiln.toml", "[jobsets.main]\ncheck_interval = 0\n")]);
        let pg = if backend == "postgres" { Some(PgDatabase::create().await) } else { None };
        let mut kiln = Kiln::start_in(config(pg.as_ref(), machines.path(), &flake, ""), &[]);
        let api = Api::new(&kiln.url, Some(TOKEN));
        let anon = Api::new(&kiln.url, None);
        // The first evaluation (no jobs) has finished, so that the restart
        // below does not interrupt it.
        wait_for(60, "the first evaluation", || async {
            api.get("/jobset/p/main/evals").await.1["evals"].as_array()?.first()?["evaltime"].as_f64()
        })
        .await;

        let m = machine(&api, &uri).await;
        assert_eq!(m["enabled"], true, "{m}");
        let path = m["path"].as_str().unwrap().to_string();
        assert!(path.starts_with("/machines/ssh%3A%2F%2Froot%40127.0.0.1%3A"), "{path}");
        assert_eq!(anon.send("POST", &format!("{path}/disable"), None).await.0, 401, "{backend}");
        assert_eq!(machine(&api, &uri).await["enabled"], true, "{backend}");
        assert_eq!(api.send("POST", "/machines/ssh%3A%2F%2Fnowhere/disable", None).await.0, 404);
        assert_eq!(api.send("POST", &format!("{path}/unplug"), None).await.0, 404);
        let (code, done) = api.send("POST", &format!("{path}/disable"), None).await;
        assert_eq!((code, done["action"].as_str()), (200, Some("disable")), "{backend}: {done}");
        assert_eq!(machine(&api, &uri).await["enabled"], false, "{backend}");

        // Disabled, and still after a restart: a new build stays queued.
        let mut kiln = restart(&mut kiln);
        let api = Api::new(&kiln.url, Some(TOKEN));
        assert_eq!(machine(&api, &uri).await["enabled"], false, "{backend}");
        push_jobs(&api, &flake, &tag, &["c"]).await;
        let c = build_of(&kiln, &api, "c").await;
        wait_for(30, "c's step to be runnable", || async {
            (api.get("/queue").await.1["runnable"].as_array()?.len() == 1).then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (_, q) = api.get("/queue").await;
        assert_eq!(q["running"].as_array().unwrap().len(), 0, "{backend}: {q}");
        assert_eq!(api.get(&format!("/build/{c}")).await.1["finished"], 0, "{backend}");

        // Enabled by a token: built.
        let (code, done) = api.send("POST", &format!("{path}/enable"), None).await;
        assert_eq!((code, done["action"].as_str()), (200, Some("enable")), "{backend}: {done}");
        let b = finished(&api, c).await;
        assert_eq!(b["buildstatus"], 0, "{backend}: {b}\n{}", kiln.log());
        assert!(only.has(b["buildoutputs"]["out"]["path"].as_str().unwrap()), "{backend}: built on the machine");

        // From the signed-in page: a Disable button whose form works.
        let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        let anon_html = browser.get(format!("{}/machines", kiln.url)).send().await.unwrap().text().await.unwrap();
        assert!(!anon_html.contains(&format!("action=\"{path}/disable\"")), "no button for strangers");
        let r = browser.post(format!("{}/login", kiln.url)).form(&[("token", TOKEN)]).send().await.unwrap();
        let cookie = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
        let html = browser
            .get(format!("{}/machines", kiln.url))
            .header("Cookie", &cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let form = html.split(&format!("action=\"{path}/disable\"")).nth(1).expect("a Disable form");
        let csrf = form.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap();
        let r = browser
            .post(format!("{}{path}/disable", kiln.url))
            .header("Cookie", &cookie)
            .form(&[("csrf", csrf)])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303, "{backend}");
        assert_eq!(r.headers()["location"], "/machines");
        assert_eq!(machine(&api, &uri).await["enabled"], false, "{backend}");
        let html = browser
            .get(format!("{}/machines", kiln.url))
            .header("Cookie", &cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(html.contains(&format!("action=\"{path}/enable\"")), "an Enable button:\n{html}");
        assert!(html.contains(">disabled<"), "{html}");
        kiln.terminate();
    }
}
