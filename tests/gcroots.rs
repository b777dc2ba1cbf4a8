//! Nix's garbage collector on the coordinator: queued builds' derivations
//! are Kiln's GC roots (a real `nix-store --delete`, which checks liveness
//! as the collector does, refuses them), the roots go when the builds end,
//! and a `.drv` deleted by hand fails its build alone, naming the path,
//! while recovery after a restart and the rest of the queue go on. On
//! SQLite and PostgreSQL, with real SSH builders.

mod support;

use std::process::Command;

use support::*;

fn delete(args: &[&str]) -> std::process::Output {
    nix_cmd("nix-store").arg("--delete").args(args).output().unwrap()
}

/// Roots the store's collector would find, as `nix-store --gc --print-roots` lists them.
fn roots() -> String {
    nix("nix-store", &["--gc", "--print-roots"])
}

#[tokio::test]
async fn queued_derivations_are_rooted_and_a_missing_one_fails_alone() {
    for backend in ["sqlite", "postgres"] {
        let sshd = Sshd::start();
        let builder = Builder::new(&sshd, "b0", 2);
        let machines = tempfile::NamedTempFile::new().unwrap();
        // No builder yet: the builds wait in the queue.
        std::fs::write(machines.path(), "").unwrap();
        let t = unique("gc");
        let flake = Flake::new(
            &format!(
                "{{ outputs = _: {{ hydraJobs = {{ kept = {}; gone = {}; }}; }}; }}",
                drv_expr(&format!("kept-{t}"), "echo kept > $out"),
                drv_expr(&format!("gone-{t}"), "echo gone > $out")
            ),
            &[],
        );
        let kept_drv = flake.eval_raw("hydraJobs.kept.drvPath");
        let gone_drv = flake.eval_raw("hydraJobs.gone.drvPath");
        let pg = if backend == "postgres" { Some(PgDatabase::create().await) } else { None };
        let db_line = pg.as_ref().map(|p| format!("database_url = \"{}\"\n", p.url)).unwrap_or_default();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("kiln.toml"),
            format!(
                "{db_line}machines_file = \"{}\"\n[queue]\nunsupported_grace_s = 3600\n[[projects]]\nname = \"gc\"\nrepo = \"{}\"\n",
                machines.path().display(),
                flake.path().display()
            ),
        )
        .unwrap();
        let mut kiln = Kiln::start_in(dir, &[]);
        let db_url = pg
            .as_ref()
            .map(|p| p.url.clone())
            .unwrap_or_else(|| format!("sqlite://{}", kiln.dir.path().join("kiln-state/kiln.db").display()));
        let db = kiln::db::Db::connect(&db_url).await.unwrap();
        let build_rows = |db: kiln::db::Db| async move {
            let mut c = db.conn().await.unwrap();
            let rows: Vec<(String, bool, Option<i64>, Option<String>)> = kiln::db::run!(c.ex(), c => sqlx::query_as(
                "SELECT job, finished, build_status, error FROM builds ORDER BY job").fetch_all(&mut *c).await.unwrap());
            rows
        };
        wait_for(60, "both builds queued", || {
            let db = db.clone();
            async move { (build_rows(db).await.len() == 2).then_some(()) }
        })
        .await;

        // Rooted: the collector sees Kiln's links, one per group of jobs
        // the evaluator traced, each to a file that references the group's
        // derivations; it will not delete them.
        let mine = kiln::gcroots::GcRoots::open(&kiln.dir.path().join("kiln-state"));
        assert!(mine.registered() && mine.dir().starts_with("/nix/var/nix/gcroots/kiln"));
        let groups = mine.list();
        assert!(!groups.is_empty() && groups.len() <= 2, "{groups:?}");
        let listed = roots();
        let mut closure = String::new();
        for group in &groups {
            assert!(group.ends_with("-kiln-roots"), "{group}");
            // Nix lists a root by the entry that holds it and the path it roots.
            let line = format!("{}/{} -> {group}", mine.dir().display(), group.trim_start_matches("/nix/store/"));
            assert!(listed.contains(&line), "{line}:\n{listed}");
            closure += &nix("nix-store", &["-qR", group]);
        }
        for drv in [&kept_drv, &gone_drv] {
            assert!(closure.contains(drv.as_str()), "{drv} not in the roots' closure:\n{closure}");
            let out = delete(&[drv]);
            assert!(!out.status.success(), "{drv} was deleted although queued");
            assert!(String::from_utf8_lossy(&out.stderr).contains("alive"), "{}", String::from_utf8_lossy(&out.stderr));
        }

        // Kiln dies; someone deletes a queued .drv by hand (with the root
        // file that refers to it, else Nix refuses); Kiln starts again with
        // a builder: the other build is built, this one fails alone.
        let _ = Command::new("kill").args(["-KILL", &kiln.child.id().to_string()]).status();
        let _ = kiln.child.wait();
        let mut by_hand: Vec<&str> = groups.iter().map(String::as_str).collect();
        by_hand.push(&gone_drv);
        by_hand.push("--ignore-liveness");
        let out = delete(&by_hand);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::write(machines.path(), format!("{}\n", builder.machines_line_with_port)).unwrap();
        let state_dir = std::mem::replace(&mut kiln.dir, tempfile::tempdir().unwrap());
        let again = Kiln::start_in(state_dir, &[]);
        let rows = wait_for(120, "both builds finished", || {
            let db = db.clone();
            async move {
                let rows = build_rows(db).await;
                rows.iter().all(|r| r.1).then_some(rows)
            }
        })
        .await;
        let (gone, kept) = (&rows[0], &rows[1]);
        assert_eq!(kept.2, Some(0), "{rows:?}\n{}", again.log());
        assert_eq!(gone.2, Some(3), "{rows:?}");
        let msg = gone.3.as_deref().unwrap_or("");
        assert!(msg.contains(&gone_drv) && msg.contains("missing"), "{msg}");

        // Ended builds are no longer roots.
        let listed = wait_for(30, "the roots of ended builds gone", || async {
            let listed = roots();
            (mine.list().is_empty() && !groups.iter().any(|g| listed.contains(g.as_str()))).then_some(listed)
        })
        .await;
        assert!(!listed.contains(kept_drv.as_str()), "{listed}");
        drop(again);
        db.close().await;
    }
}
