//! Recording evaluations on both database backends, and the git mirrors
//! under concurrent fetches.

mod support;

use std::collections::BTreeMap;

use kiln::db::evaluations::{self, NewEvaluation};
use kiln::db::{Db, builds};
use kiln::eval::Job;
use kiln::eval::record;
use support::*;

fn job(attr: &str, drv: &str) -> Job {
    Job {
        attr: attr.into(),
        attr_path: attr.split('.').map(str::to_string).collect(),
        drv_path: Some(format!("/nix/store/{drv}.drv")),
        outputs: Some(BTreeMap::from([("out".to_string(), format!("/nix/store/{drv}-out"))])),
        system: Some("x86_64-linux".into()),
        name: Some(attr.into()),
        meta: Some(serde_json::from_str(r#"{"description": "d", "timeout": 60, "schedulingPriority": 7}"#).unwrap()),
        constituents: None,
        error: None,
        gc_root: None,
    }
}

fn broken(attr: &str) -> Job {
    Job {
        drv_path: None,
        outputs: None,
        system: None,
        name: None,
        meta: None,
        error: Some(format!("error: {attr} broke")),
        ..job(attr, "x")
    }
}

const N: usize = 2300;

/// A running evaluation of the jobset.
async fn new_eval(db: &Db, jobset_id: i64) -> evaluations::Evaluation {
    let mut c = db.conn().await.unwrap();
    evaluations::create(
        c.ex(),
        &NewEvaluation {
            jobset_id,
            commit_sha: "c",
            git_ref: "refs/heads/main",
            flake_ref: "f",
            config_hash: "h",
            workers: 1,
            forced: false,
        },
    )
    .await
    .unwrap()
}

async fn run_eval(db: &Db, jobset_id: i64, jobs: Vec<Job>, keep: i64) -> (i64, record::Recorded, evaluations::Diff) {
    let ev = new_eval(db, jobset_id).await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for j in jobs {
        tx.send(j).unwrap();
    }
    drop(tx);
    let r = record::record_stream(db, jobset_id, ev.id, rx).await.unwrap();
    let diff = record::finish(db, jobset_id, ev.id, 5, Some("sha256-x"), &r, keep, None).await.unwrap();
    (ev.id, r, diff)
}

#[tokio::test]
async fn recording_reuses_builds_links_aggregates_diffs_and_prunes() {
    each_backend(|db| async move {
        let (_, jobset_id) = make_jobset(&db, "p", "main").await;

        // More jobs than one batch and one multi-row statement hold.
        let mut jobs: Vec<Job> = (0..N).map(|i| job(&format!("many.j{i}"), &format!("d{i}"))).collect();
        let mut agg = job("all", "agg");
        agg.constituents = Some(vec!["/nix/store/d1.drv".into(), "/nix/store/d2.drv".into()]);
        jobs.push(agg);
        jobs.push(broken("bad"));
        let (e1, r1, d1) = run_eval(&db, jobset_id, jobs, 2).await;
        assert_eq!((r1.jobs, r1.errors, r1.new_builds), (N as i64 + 1, 1, N as i64 + 1));
        assert_eq!(d1.new.len(), N + 2);
        let mut c = db.conn().await.unwrap();
        let ev1 = evaluations::get(c.ex(), e1).await.unwrap().unwrap();
        assert_eq!(
            (ev1.status.as_str(), ev1.jobs, ev1.error_jobs, ev1.lock_hash.as_deref()),
            ("succeeded", N as i64 + 2, 1, Some("sha256-x"))
        );
        let members = evaluations::members(c.ex(), e1).await.unwrap();
        let all = members.iter().find(|m| m.job == "all").unwrap().build_id.unwrap();
        assert_eq!(builds::constituents(c.ex(), all).await.unwrap().len(), 2);
        let b0 = builds::get(c.ex(), members.iter().find(|m| m.job == "many.j0").unwrap().build_id.unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!((b0.timeout, b0.priority, b0.max_silent, b0.description.as_deref()), (60, 7, 7200, Some("d")));
        assert_eq!(builds::outputs(c.ex(), b0.id).await.unwrap()[0].path, "/nix/store/d0-out");
        drop(c);

        // Second evaluation: j0 unchanged (reused), j1 changed, j2 gone, bad fixed, new job.
        let mut jobs: Vec<Job> = (0..N)
            .filter(|i| *i != 2)
            .map(|i| job(&format!("many.j{i}"), &if i == 1 { "d1b".to_string() } else { format!("d{i}") }))
            .collect();
        jobs.push(job("bad", "fixed"));
        jobs.push(broken("newly"));
        let (e2, r2, d2) = run_eval(&db, jobset_id, jobs, 2).await;
        assert_eq!(r2.new_builds, 2, "only the changed and the fixed job are new builds");
        assert_eq!(d2.prev_eval_id, Some(e1));
        assert_eq!(d2.removed, vec!["all", "many.j2"]);
        assert_eq!(d2.changed, vec!["many.j1"]);
        assert_eq!(d2.new, vec!["newly"]);
        assert_eq!(d2.new_errors, vec!["newly"]);
        let mut c = db.conn().await.unwrap();
        let m2 = evaluations::members(c.ex(), e2).await.unwrap();
        assert_eq!(m2.iter().find(|m| m.job == "many.j0").unwrap().build_id, Some(b0.id));
        drop(c);

        // A third evaluation prunes the first (keep 2); builds stay.
        let (e3, _, _) = run_eval(&db, jobset_id, vec![job("many.j0", "d0")], 2).await;
        let mut c = db.conn().await.unwrap();
        assert!(evaluations::get(c.ex(), e1).await.unwrap().is_none());
        assert!(evaluations::get(c.ex(), e2).await.unwrap().is_some());
        assert!(evaluations::get(c.ex(), e3).await.unwrap().is_some());
        assert!(builds::get(c.ex(), b0.id).await.unwrap().is_some());
        assert!(evaluations::members(c.ex(), e1).await.unwrap().is_empty());
    })
    .await;
}

/// Groups of jobs share one GC root: the recorder links each group's root
/// once, stores it on the builds, and never splits a group between two
/// batches (the queue lets a root go when the last build it holds ends, so
/// a group must join the queue at once).
#[tokio::test]
async fn a_group_of_jobs_is_rooted_once_and_recorded_in_one_batch() {
    each_backend(|db| async move {
        let (_, jobset_id) = make_jobset(&db, "p", "main").await;
        let ev = new_eval(&db, jobset_id).await;
        // 40 groups of 64: batches of 1,000 would cut through groups.
        let group_root = |g: usize| format!("/nix/store/{:032}-kiln-roots", g);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..40 * 64 {
            let mut j = job(&format!("g.j{i}"), &format!("{i:032}-g{i}"));
            j.gc_root = Some(group_root(i / 64));
            tx.send(j).unwrap();
        }
        // A job without a group (nix-eval-jobs, say) is rooted by its .drv.
        tx.send(job("alone", "11111111111111111111111111111111-alone")).unwrap();
        drop(tx);
        let state = tempfile::tempdir().unwrap();
        let nix_state = tempfile::tempdir().unwrap();
        let roots = kiln::gcroots::GcRoots::open_with(state.path(), nix_state.path());
        let (new_tx, mut new_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<i64>>();
        let hooks = record::Hooks { new_builds: Some(new_tx), fresh_builds: false, roots: Some(roots.clone()) };
        let r = record::record_stream_with(&db, jobset_id, ev.id, rx, hooks).await.unwrap();
        assert_eq!(r.new_builds, 40 * 64 + 1);

        let mut expected: Vec<String> = (0..40).map(group_root).collect();
        expected.push("/nix/store/11111111111111111111111111111111-alone.drv".into());
        expected.sort();
        assert_eq!(roots.list(), expected);

        // Each batch the queue is told of holds whole groups.
        let mut c = db.conn().await.unwrap();
        let mut batches = 0;
        let mut seen_roots = std::collections::HashSet::new();
        while let Ok(ids) = new_rx.try_recv() {
            batches += 1;
            let mut here = std::collections::HashMap::<String, usize>::new();
            for b in builds::get_many(c.ex(), &ids).await.unwrap() {
                *here.entry(b.root().to_string()).or_default() += 1;
            }
            for (root, n) in here {
                assert!(seen_roots.insert(root.clone()), "{root} was split between batches");
                let whole = if root.ends_with("-kiln-roots") { 64 } else { 1 };
                assert_eq!(n, whole, "{root}");
            }
        }
        assert!(batches >= 2, "{batches} batches");
        assert_eq!(seen_roots.len(), 41);
    })
    .await;
}

#[tokio::test]
async fn interrupted_evaluations_are_marked_failed_on_start() {
    each_backend(|db| async move {
        let (_, jobset_id) = make_jobset(&db, "p", "main").await;
        let ev = new_eval(&db, jobset_id).await;
        let mut c = db.conn().await.unwrap();
        assert!(evaluations::running(c.ex(), jobset_id).await.unwrap().is_some());
        assert_eq!(evaluations::fail_interrupted(c.ex()).await.unwrap(), 1);
        let e = evaluations::get(c.ex(), ev.id).await.unwrap().unwrap();
        assert_eq!(e.status, "failed");
        assert!(e.error.unwrap().contains("interrupted"));
    })
    .await;
}

#[tokio::test]
async fn concurrent_fetches_of_one_repository_do_not_collide() {
    let flake = Flake::new(&format!("{{ outputs = _: {{ hydraJobs.x = {}; }}; }}", drv_expr("x", "echo > $out")), &[]);
    git(flake.path(), &["checkout", "-q", "-b", "feature"]);
    let feature = flake.commit("feature");
    git(flake.path(), &["checkout", "-q", "main"]);
    let state = tempfile::tempdir().unwrap();
    let mirrors = std::sync::Arc::new(kiln::fetch::Mirrors::new(state.path(), std::time::Duration::from_secs(60)));
    let url = flake.path().display().to_string();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (m, u) = (mirrors.clone(), url.clone());
        tasks.push(tokio::spawn(async move { m.fetch("p", &u).await }));
    }
    for t in tasks {
        let mirror = t.await.unwrap().unwrap();
        assert_eq!(mirror.default_branch, "main");
    }
    let mirror = mirrors.fetch("p", &url).await.unwrap();
    assert_eq!(mirrors.rev(&mirror, "feature").await.unwrap(), feature);
    assert!(matches!(mirrors.rev(&mirror, "nope").await, Err(kiln::fetch::FetchError::NoBranch(_))));
    let head = mirrors.rev(&mirror, "main").await.unwrap();
    assert!(mirrors.read_file(&mirror, &head, "flake.nix").await.unwrap().is_some());
    assert!(mirrors.read_file(&mirror, &head, ".kiln.toml").await.unwrap().is_none());
    // The locked reference evaluates to exactly that commit.
    let r = kiln::fetch::flake_ref(&mirror, "refs/heads/feature", &feature, "");
    let meta = nix("nix", &["flake", "metadata", "--json", &r]);
    assert!(meta.contains(&feature));
}
