//! Upstream substituters with real parts: a local upstream cache (filled by
//! `nix copy --to file://…?secret-key=…`, served over HTTP on loopback)
//! holds "bootstraps" that only the test host can build (the builders'
//! sandboxes lack the marker file they check). Jobs above them build on
//! the SSH builders with the bootstraps substituted, never built, and
//! nothing below a bootstrap is walked; an upstream that answers 5xx, hangs
//! or signs with an untrusted key makes Kiln build instead and say why in
//! the step's log; a dead upstream in the list is passed over. On SQLite
//! and PostgreSQL.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use support::upstream::{Fault, Upstream};
use support::*;

/// Two machines, each behind its own sshd; `nix_config` is what their Nix
/// reads (its substituters).
struct Farm {
    _sshds: Vec<Sshd>,
    builders: Vec<Builder>,
    file: tempfile::NamedTempFile,
}

fn farm(nix_config: &str) -> Farm {
    let sshds = vec![Sshd::start(), Sshd::start()];
    let builders: Vec<Builder> =
        sshds.iter().enumerate().map(|(i, s)| Builder::with_nix_config(s, &format!("b{i}"), 2, nix_config)).collect();
    let file = tempfile::NamedTempFile::new().unwrap();
    let lines: Vec<String> = builders.iter().map(|b| b.machines_line_with_port.clone()).collect();
    std::fs::write(file.path(), lines.join("\n") + "\n").unwrap();
    Farm { _sshds: sshds, builders, file }
}

/// The flake: `boots.<name>` only the host can build (it needs `marker`,
/// and stands on `stage0`); `easy.<name>` anyone can build; jobs on each,
/// whose outputs refer to what they stand on (as programs to their libc).
fn flake(tag: &str, marker: &std::path::Path, boots: &[&str], easy: &[&str]) -> Flake {
    let mut jobs = String::new();
    for b in boots {
        jobs.push_str(&format!("\"on-{b}\" = onto \"on-{b}\" boots.\"{b}\"; "));
        jobs.push_str(&format!("\"on-{b}-again\" = onto \"on-{b}-again\" boots.\"{b}\"; "));
    }
    for e in easy {
        jobs.push_str(&format!("\"on-{e}\" = onto \"on-{e}\" easy.\"{e}\"; "));
    }
    let names = |l: &[&str]| l.iter().map(|n| format!("\"{n}\" = mk \"{n}\";")).collect::<Vec<_>>().join(" ");
    let text = format!(
        r#"{{ outputs = _: let
  system = "x86_64-linux";
  stage0 = derivation {{ name = "stage0-{tag}"; inherit system; builder = "/bin/sh"; args = [ "-c" "echo s0 > $out" ]; }};
  boot = name: derivation {{ name = "${{name}}-{tag}"; inherit system stage0; builder = "/bin/sh";
    args = [ "-c" "[ -e {marker} ] || {{ echo only the test host can build this; exit 1; }}; read x < $stage0; echo ${{name}} $x > $out" ]; }};
  plain = name: derivation {{ name = "${{name}}-{tag}"; inherit system; builder = "/bin/sh";
    args = [ "-c" "echo building ${{name}} here; echo ${{name}} > $out" ]; }};
  onto = name: b: derivation {{ name = "${{name}}-{tag}"; inherit system b; builder = "/bin/sh";
    args = [ "-c" "read x < $b; echo ${{name}} on $x from $b > $out" ]; }};
in rec {{
  boots = let mk = boot; in {{ {boots} }};
  easy = let mk = plain; in {{ {easy} }};
  inherit stage0;
  hydraJobs = {{ {jobs} }};
}}; }}"#,
        boots = names(boots),
        easy = names(easy),
        marker = marker.display(),
    );
    Flake::new(&text, &[])
}

/// Builds `attr` of the flake on this host, copies its output to the
/// upstream, and deletes it here again (so Kiln cannot send it from the
/// local store): returns (drv, out).
fn publish(flake: &Flake, attr: &str, up: &Upstream) -> (String, String) {
    let drv = flake.eval_raw(&format!("{attr}.drvPath"));
    let out = nix("nix-store", &["-r", &drv]).trim().to_string();
    up.add(&[&out]);
    nix("nix-store", &["--delete", &out]);
    (drv, out)
}

fn dead_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// Serves `flake` as project `name` and waits until every build of its
/// first evaluation finished: job name → build JSON.
async fn serve_and_wait(
    config: &str,
    name: &str,
    flake: &Flake,
    database_url: Option<&str>,
) -> (Kiln, BTreeMap<String, serde_json::Value>) {
    let db = database_url.map(|u| format!("database_url = \"{u}\"\n")).unwrap_or_default();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!("{db}{config}\n[[projects]]\nname = \"{name}\"\nrepo = \"{}\"\n", flake.path().display()),
    )
    .unwrap();
    let kiln = Kiln::start_in(dir, &[]);
    let api = Api::new(&kiln.url, None);
    let builds = wait_for(180, "every build finished", || async {
        let (_, v) = api.get(&format!("/jobset/{name}/main/evals")).await;
        let e = v["evals"].as_array()?.first()?.clone();
        let (_, detail) = api.get(&format!("/eval/{}", e["id"])).await;
        let ids: Vec<i64> = detail["builds"].as_array()?.iter().filter_map(|b| b.as_i64()).collect();
        let mut out = BTreeMap::new();
        for id in &ids {
            let (_, b) = api.get(&format!("/build/{id}")).await;
            if b["finished"] != 1 {
                return None;
            }
            out.insert(b["job"].as_str()?.to_string(), b);
        }
        (!ids.is_empty()).then_some(out)
    })
    .await;
    (kiln, builds)
}

async fn step_rows(db_url: &str) -> Vec<(String, String, Option<String>)> {
    let db = kiln::db::Db::connect(db_url).await.unwrap();
    let mut c = db.conn().await.unwrap();
    kiln::db::run!(c.ex(), c => sqlx::query_as("SELECT drv_path, state, machine FROM steps ORDER BY id")
        .fetch_all(&mut *c).await.unwrap())
}

fn state_of<'a>(rows: &'a [(String, String, Option<String>)], drv: &str) -> Option<&'a str> {
    rows.iter().find(|(d, _, _)| d == drv).map(|(_, s, _)| s.as_str())
}

#[tokio::test]
async fn jobs_on_an_upstream_bootstrap_build_with_it_substituted_on_both_databases() {
    for backend in ["sqlite", "postgres"] {
        let t = unique("sub");
        let marker = tempfile::NamedTempFile::new().unwrap();
        let up = Upstream::start("upstream-test-1");
        let flake = flake(&t, marker.path(), &["boot"], &[]);
        let (boot_drv, boot_out) = publish(&flake, "boots.boot", &up);
        let stage0_drv = flake.eval_raw("stage0.drvPath");
        // Two jobs share the bootstrap: its narinfo is asked for once.
        let farm = farm("substituters =");
        let pg = if backend == "postgres" { Some(PgDatabase::create().await) } else { None };
        let config = format!(
            "machines_file = \"{}\"\nsubstituters = [\"{}\", \"{}\"]\ntrusted_public_keys = [\"{}\"]\n[queue]\nsubstitute_timeout_s = 3\n",
            farm.file.path().display(),
            dead_url(),
            up.url,
            up.public_key
        );
        let (kiln, builds) = serve_and_wait(&config, "sub", &flake, pg.as_ref().map(|p| p.url.as_str())).await;
        let job = &builds["on-boot"];
        assert_eq!(job["buildstatus"], 0, "{backend}: {job}\n{}", kiln.log());
        assert_eq!(builds["on-boot-again"]["buildstatus"], 0);
        assert_eq!(job["nrbuiltsteps"], 1, "{job}");
        assert_eq!(job["nrsubstitutedsteps"], 1, "{job}");

        // The bootstrap was substituted, never built; nothing below it was walked.
        let db_url = pg
            .as_ref()
            .map(|p| p.url.clone())
            .unwrap_or_else(|| format!("sqlite://{}", kiln.dir.path().join("kiln-state/kiln.db").display()));
        let rows = step_rows(&db_url).await;
        assert_eq!(state_of(&rows, &boot_drv), Some("substituted"), "{rows:?}");
        assert_eq!(state_of(&rows, &stage0_drv), None, "stage0 lies below a substitutable output: {rows:?}");
        let top_drv = job["drvpath"].as_str().unwrap();
        assert_eq!(state_of(&rows, top_drv), Some("succeeded"));
        assert!(farm.builders.iter().any(|b| b.has(&boot_out)), "a builder received the bootstrap");

        // Kiln's lookups: one narinfo request for the bootstrap, from Kiln,
        // and its NAR downloaded by Kiln (the builders have no substituters).
        let reqs = up.requests();
        let narinfo = Upstream::narinfo_name(&boot_out);
        let kiln_asks = reqs.iter().filter(|(p, ua)| *p == narinfo && ua.starts_with("kiln/")).count();
        assert_eq!(kiln_asks, 1, "{reqs:?}");
        assert!(reqs.iter().any(|(p, ua)| p.starts_with("nar/") && ua.starts_with("kiln/")), "{reqs:?}");

        // The build page says what was substituted.
        let html = reqwest::get(format!("{}/build/{}", kiln.url, job["id"])).await.unwrap().text().await.unwrap();
        assert!(html.contains("1 built, 1 substituted from upstream caches"), "{html}");
        assert!(html.contains(">substituted<"), "{html}");

        // A deployer trusting Kiln and the upstream gets the whole closure
        // (Kiln's cache keeps only what it built: mirror_upstream is off).
        let top_out = job["buildoutputs"]["out"]["path"].as_str().unwrap();
        let client = NixClient::new();
        let (store, _) = client.store("deployer");
        let kiln_pk = std::fs::read_to_string(kiln.dir.path().join("kiln-state/keys/cache.pub")).unwrap();
        let out = client
            .cmd("nix-store")
            .args(["--store", &store, "-r", top_out])
            .args(["--option", "substituters", &format!("{} {}", kiln.url, up.url)])
            .args(["--option", "trusted-public-keys", &format!("{} {}", kiln_pk.trim(), up.public_key)])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let has_boot = reqwest::get(format!("{}/{}", kiln.url, narinfo)).await.unwrap().status();
        assert_eq!(has_boot, 404, "upstream paths are not in Kiln's cache without mirror_upstream");
        drop(kiln);
    }
}

#[tokio::test]
async fn builders_substitute_for_themselves_and_mirroring_keeps_the_closure() {
    let t = unique("bsub");
    let marker = tempfile::NamedTempFile::new().unwrap();
    let up = Upstream::start("upstream-test-2");
    let flake = flake(&t, marker.path(), &["boot"], &[]);
    let (_, boot_out) = publish(&flake, "boots.boot", &up);
    // These builders know the upstream themselves.
    let farm = farm(&format!("substituters = {}\ntrusted-public-keys = {}", up.url, up.public_key));
    let config = format!(
        "machines_file = \"{}\"\nsubstituters = [\"{}\"]\ntrusted_public_keys = [\"{}\"]\n",
        farm.file.path().display(),
        up.url,
        up.public_key
    );
    let (kiln, builds) = serve_and_wait(&config, "bsub", &flake, None).await;
    assert_eq!(builds["on-boot"]["buildstatus"], 0, "{}", kiln.log());
    let reqs = up.requests();
    let nars: Vec<&(String, String)> = reqs.iter().filter(|(p, _)| p.starts_with("nar/")).collect();
    assert!(
        !nars.is_empty() && nars.iter().all(|(_, ua)| !ua.starts_with("kiln/")),
        "the builder fetched it: {reqs:?}"
    );
    assert!(farm.builders.iter().any(|b| b.has(&boot_out)));
    drop(kiln);

    // With mirroring, Kiln fetches the bootstrap into its own cache itself
    // and a client trusting only Kiln gets the job's whole closure from it.
    let t = unique("mirror");
    let flake = self::flake(&t, marker.path(), &["boot"], &[]);
    let (_, boot_out) = publish(&flake, "boots.boot", &up);
    let farm = self::farm("substituters =");
    let config = format!(
        "machines_file = \"{}\"\nsubstituters = [\"{}\"]\ntrusted_public_keys = [\"{}\"]\n[cache]\nmirror_upstream = true\n",
        farm.file.path().display(),
        up.url,
        up.public_key
    );
    let (kiln, builds) = serve_and_wait(&config, "mirror", &flake, None).await;
    let job = &builds["on-boot"];
    assert_eq!(job["buildstatus"], 0, "{}", kiln.log());
    let top_out = job["buildoutputs"]["out"]["path"].as_str().unwrap();
    let kiln_pk = std::fs::read_to_string(kiln.dir.path().join("kiln-state/keys/cache.pub")).unwrap();
    let client = NixClient::new();
    let (store, root) = client.store("only-kiln");
    let out = client
        .cmd("nix")
        .args(["copy", "--from", &kiln.url, "--to", &store, top_out])
        .args(["--option", "trusted-public-keys", kiln_pk.trim()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(root.join(boot_out.trim_start_matches('/')).exists(), "the bootstrap came from Kiln too");
}

#[tokio::test]
async fn an_upstream_that_fails_means_build_it_and_say_why() {
    let t = unique("flaky");
    let marker = tempfile::NamedTempFile::new().unwrap();
    let up = Upstream::start("upstream-test-3");
    let other = Upstream::start("not-trusted-1");
    // Each "easy" derivation is on the upstream but its narinfo misbehaves
    // in its own way; the builders can build them, and must.
    let cases = ["e500", "hang", "badsig"];
    let flake = flake(&t, marker.path(), &[], &cases);
    let mut outs = BTreeMap::new();
    for c in cases {
        let (drv, out) = publish(&flake, &format!("easy.{c}"), &up);
        outs.insert(c, (drv, out));
    }
    up.fault(&Upstream::narinfo_name(&outs["e500"].1), Fault::Status(503));
    up.fault(&Upstream::narinfo_name(&outs["hang"].1), Fault::Hang(Duration::from_secs(600)));
    // A narinfo signed by a key Kiln does not trust.
    let forged = {
        let drv = &outs["badsig"].0;
        let out = nix("nix-store", &["-r", drv]).trim().to_string();
        other.add(&[&out]);
        nix("nix-store", &["--delete", &out]);
        other.narinfo(&out)
    };
    up.fault(&Upstream::narinfo_name(&outs["badsig"].1), Fault::Body(forged));

    let farm = farm("substituters =");
    let config = format!(
        "machines_file = \"{}\"\nsubstituters = [\"{}\"]\ntrusted_public_keys = [\"{}\"]\n[queue]\nsubstitute_timeout_s = 2\n",
        farm.file.path().display(),
        up.url,
        up.public_key
    );
    let start = std::time::Instant::now();
    let (kiln, builds) = serve_and_wait(&config, "flaky", &flake, None).await;
    assert!(start.elapsed() < Duration::from_secs(120), "nothing hangs on the upstream");
    let db_url = format!("sqlite://{}", kiln.dir.path().join("kiln-state/kiln.db").display());
    let rows = step_rows(&db_url).await;
    let logs = kiln::logs::Logs::new(&kiln.dir.path().join("kiln-state"));
    for (case, why) in [("e500", "HTTP 503"), ("hang", "no answer within 2 s"), ("badsig", "no valid signature")] {
        assert_eq!(builds[&format!("on-{case}")]["buildstatus"], 0, "{case}: {}", kiln.log());
        let (drv, _) = &outs[case];
        assert_eq!(state_of(&rows, drv), Some("succeeded"), "{case} was built: {rows:?}");
        let mut log = String::new();
        std::io::Read::read_to_string(&mut logs.open(drv).expect("a log"), &mut log).unwrap();
        assert!(log.contains("not substituted, built instead") && log.contains(why), "{case}: {log}");
        assert!(log.contains(&format!("building {case} here")), "{case}: {log}");
    }
}
