//! Honest blame, with real builders and a real full disk: the cache lives
//! on a 1 MiB tmpfs, so a bigger output cannot be stored. That build fails
//! as "cache storage full", the builders stay up (no failure counted, none
//! paused), and once space is freed a restart of the build succeeds. An
//! output over `queue.max_output_mib` ends as 11 (not the upload limit,
//! which is smaller here), `nix-support/failed` makes 6 with the outputs
//! kept, and only 1 and 6 are remembered: evaluated again elsewhere, the
//! failed jobs are cached failures while the others are built again.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mounting a tmpfs (the disk-full test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn resize(&self, size: &str) {
        let out =
            Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(self.path()).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// A shell fragment writing `16 << doublings` bytes to `file`.
fn bytes(doublings: u32, file: &str) -> String {
    format!(
        "s=0123456789abcdef; i=0; while [ $i -lt {doublings} ]; do s=$s$s; i=$((i+1)); done; printf %s \\\"$s\\\" > {file}"
    )
}

fn flake_text(t: &str) -> String {
    let job = |name: &str, script: &str| {
        format!(
            "{name} = derivation {{ name = \"{name}-{t}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"{script}\" ]; }};"
        )
    };
    format!(
        "{{ outputs = _: {{ hydraJobs = {{ {} {} {} {} {} }}; }}; }}",
        job("small", "echo small > $out"),
        // 2 MiB: more than the tmpfs holds, less than the output limit.
        job("big", &bytes(17, "$out")),
        // 4 MiB: over queue.max_output_mib = 3.
        job("huge", &bytes(18, "$out")),
        job(
            "marked",
            "mkdir -p $out/nix-support; echo tests failed > $out/nix-support/failed; echo report > $out/report"
        ),
        job("fails", "echo it fails; exit 1"),
    )
}

async fn jobs(api: &Api, project: &str, n: usize) -> std::collections::BTreeMap<String, serde_json::Value> {
    wait_for(180, &format!("{project}: {n} builds finished"), || async {
        let (_, v) = api.get(&format!("/jobset/{project}/main/evals")).await;
        let e = v["evals"].as_array()?.first()?.clone();
        let (_, detail) = api.get(&format!("/eval/{}", e["id"])).await;
        let ids: Vec<i64> = detail["builds"].as_array()?.iter().filter_map(|b| b.as_i64()).collect();
        let mut out = std::collections::BTreeMap::new();
        for id in &ids {
            let (_, b) = api.get(&format!("/build/{id}")).await;
            if b["finished"] != 1 {
                return None;
            }
            out.insert(b["job"].as_str()?.to_string(), b);
        }
        (out.len() == n).then_some(out)
    })
    .await
}

#[tokio::test]
async fn coordinator_faults_are_not_the_builders_and_only_real_failures_are_remembered() {
    for backend in ["sqlite", "postgres"] {
        let disk = Tmpfs::mount("1m");
        let sshd = Sshd::start();
        let builders = [Builder::new(&sshd, "b0", 2), Builder::new(&sshd, "b1", 2)];
        let machines = tempfile::NamedTempFile::new().unwrap();
        let lines: Vec<&str> = builders.iter().map(|b| b.machines_line_with_port.as_str()).collect();
        std::fs::write(machines.path(), lines.join("\n") + "\n").unwrap();
        let t = unique("blame");
        let one = Flake::new(&flake_text(&t), &[]);
        // The second project starts empty and gets the same jobs later.
        let two = Flake::new("{ outputs = _: { hydraJobs = { }; }; }", &[]);
        let pg = if backend == "postgres" { Some(PgDatabase::create().await) } else { None };
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "tok\n").unwrap();
        std::fs::write(
            dir.path().join("kiln.toml"),
            format!(
                "{}api_token_files = [\"token\"]\nmachines_file = \"{}\"\n[queue]\nmax_output_mib = 3\n\
                 [cache]\ndir = \"{}\"\ncompression = \"none\"\nmax_upload_mib = 1\n\
                 [[projects]]\nname = \"one\"\nrepo = \"{}\"\n[[projects]]\nname = \"two\"\nrepo = \"{}\"\n",
                pg.as_ref().map(|p| format!("database_url = \"{}\"\n", p.url)).unwrap_or_default(),
                machines.path().display(),
                disk.path().display(),
                one.path().display(),
                two.path().display()
            ),
        )
        .unwrap();
        let kiln = Kiln::start_in(dir, &[]);
        let api = Api::new(&kiln.url, Some("tok"));
        let db_url = pg
            .as_ref()
            .map(|p| p.url.clone())
            .unwrap_or_else(|| format!("sqlite://{}", kiln.dir.path().join("kiln-state/kiln.db").display()));
        let db = kiln::db::Db::connect(&db_url).await.unwrap();

        let b = jobs(&api, "one", 5).await;
        let status = |j: &str| b[j]["buildstatus"].as_i64();
        assert_eq!(status("small"), Some(0), "{}", kiln.log());
        assert_eq!(status("big"), Some(3), "{}", b["big"]);
        let err = b["big"]["error"].as_str().unwrap_or("");
        assert!(err.contains("cache storage full"), "{err}");
        assert_eq!(status("huge"), Some(11), "{}", b["huge"]);
        assert!(b["huge"]["error"].as_str().unwrap_or("").contains("max_output_mib"), "{}", b["huge"]);
        assert_eq!(status("marked"), Some(6), "{}", b["marked"]);
        assert_eq!(status("fails"), Some(1));

        // The full disk is in the big step's log, as the coordinator's.
        let big_drv = b["big"]["drvpath"].as_str().unwrap();
        let logs = kiln::logs::Logs::new(&kiln.dir.path().join("kiln-state"));
        let mut log = String::new();
        std::io::Read::read_to_string(&mut logs.open(big_drv).expect("big's log"), &mut log).unwrap();
        assert!(log.contains("kiln: cache storage full"), "{log}");

        // No machine was blamed: nothing paused, no failure counted.
        let (_, m) = api.get("/machines").await;
        let ms = m["machines"].as_array().unwrap();
        assert_eq!(ms.len(), 2, "{m}");
        for machine in ms {
            assert!(machine["paused"].is_null(), "{machine}");
            assert_eq!(machine["consecutive_failures"], 0, "{machine}");
        }

        // Only the derivation's own failures are remembered.
        assert_eq!(step_state(&db, b["fails"]["drvpath"].as_str().unwrap()).await.as_deref(), Some("failed"));
        assert_eq!(step_state(&db, b["marked"]["drvpath"].as_str().unwrap()).await.as_deref(), Some("failed"));
        assert_eq!(step_state(&db, big_drv).await.as_deref(), Some("aborted"));
        assert_eq!(step_state(&db, b["huge"]["drvpath"].as_str().unwrap()).await.as_deref(), Some("aborted"));
        // A failed output is kept and served.
        let marked_out = b["marked"]["buildoutputs"]["out"]["path"].as_str().unwrap();
        let hash = &marked_out.trim_start_matches("/nix/store/")[..32];
        let narinfo = reqwest::get(format!("{}/{hash}.narinfo", kiln.url)).await.unwrap();
        assert_eq!(narinfo.status(), 200);

        // Space freed, the big build restarted: it is built and stored
        // (the 1 MiB upload limit does not apply to build outputs).
        disk.resize("64m");
        let (code, _) = api.send("POST", &format!("/build/{}/restart", b["big"]["id"]), None).await;
        assert!(code < 400, "restart: {code}");
        let id = b["big"]["id"].as_i64().unwrap();
        let big = wait_for(120, "big rebuilt", || async {
            let (_, v) = api.get(&format!("/build/{id}")).await;
            (v["finished"] == 1).then_some(v)
        })
        .await;
        assert_eq!(big["buildstatus"], 0, "{big}\n{}", kiln.log());
        let big_out = big["buildoutputs"]["out"]["path"].as_str().unwrap();
        let hash = &big_out.trim_start_matches("/nix/store/")[..32];
        assert!(disk.path().join(format!("{hash}.narinfo")).exists());

        // The same jobs evaluated in another project: the remembered failure
        // is a cached failure (8), the kept failed output is that result
        // again (6, cached, as Hydra has it); the output limit is not
        // remembered (built again, 11 again); what was stored is reused.
        two.write("flake.nix", &flake_text(&t));
        two.commit("the same jobs");
        let (code, _) = api.send("POST", "/api/push?jobsets=two:main", None).await;
        assert_eq!(code, 200);
        let b2 = jobs(&api, "two", 5).await;
        let s2 = |j: &str| b2[j]["buildstatus"].as_i64();
        assert_eq!(s2("fails"), Some(8), "{}", b2["fails"]);
        assert_eq!(s2("marked"), Some(6), "{}", b2["marked"]);
        assert_eq!(b2["marked"]["iscachedbuild"], 1);
        assert_eq!(s2("huge"), Some(11), "built again, not remembered: {}", b2["huge"]);
        assert_eq!(s2("big"), Some(0));
        assert_eq!(s2("small"), Some(0));
        drop(kiln);
        db.close().await;
    }
}
