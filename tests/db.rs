//! The query layer on both backends: every test runs on a fresh SQLite
//! database and a fresh PostgreSQL database.

mod support;

use kiln::db::builds::{BuildStatus, NewBuild};
use kiln::db::evaluations::{Member, NewEvaluation, Outcome};
use kiln::db::jobsets::JobsetSpec;
use kiln::db::*;
use support::*;

fn new_build(jobset_id: i64, job: &str, drv: &str) -> NewBuild {
    NewBuild {
        jobset_id,
        job: job.into(),
        drv_path: drv.into(),
        nix_name: job.into(),
        system: "x86_64-linux".into(),
        timeout: 36000,
        max_silent: 7200,
        priority: 100,
        outputs: vec![("out".into(), format!("{drv}-out")), ("dev".into(), format!("{drv}-dev"))],
        ..Default::default()
    }
}

#[tokio::test]
async fn migrations_apply_once_on_both_backends() {
    each_backend(|db| async move {
        // TestDb already migrated: a second run applies nothing.
        assert_eq!(db.migrate().await.unwrap(), 0);
        assert!(db.ping().await);
    })
    .await;
}

#[tokio::test]
async fn fresh_database_gets_every_migration() {
    let pg = PgDatabase::create().await;
    let d = tempfile::tempdir().unwrap();
    let sqlite_url = format!("sqlite://{}/sub/dir/kiln.db", d.path().display());
    for url in [sqlite_url.as_str(), pg.url.as_str()] {
        let db = Db::connect(url).await.unwrap();
        let n = db.migrate().await.unwrap();
        assert!(n >= 1, "{url}: {n} migrations");
        db.close().await;
    }
    assert!(d.path().join("sub/dir/kiln.db").exists());
    assert!(matches!(Db::connect("mysql://x").await, Err(DbError::BadUrl(_))));
}

#[tokio::test]
async fn projects_upsert_list_delete() {
    each_backend(|db| async move {
        let mut c = db.conn().await.unwrap();
        let a = projects::upsert(c.ex(), &project_spec("alpha")).await.unwrap();
        assert_eq!(a.display_name, "The alpha");
        assert!(a.enabled && !a.hidden);
        let mut changed = project_spec("alpha");
        changed.description = "changed".into();
        changed.hidden = true;
        let a2 = projects::upsert(c.ex(), &changed).await.unwrap();
        assert_eq!((a2.id, a2.description.as_str(), a2.hidden), (a.id, "changed", true));
        projects::upsert(c.ex(), &project_spec("beta")).await.unwrap();
        let names: Vec<_> = projects::list(c.ex()).await.unwrap().into_iter().map(|p| p.name).collect();
        assert_eq!(names, ["alpha", "beta"]);
        assert_eq!(projects::get(c.ex(), "beta").await.unwrap().unwrap().repo, "file:///srv/beta");
        assert!(projects::get(c.ex(), "gamma").await.unwrap().is_none());
        assert!(projects::delete(c.ex(), "beta").await.unwrap());
        assert!(!projects::delete(c.ex(), "beta").await.unwrap());
    })
    .await;
}

#[tokio::test]
async fn jobsets_triggers_coalesce_and_due_respects_interval() {
    each_backend(|db| async move {
        let (pid, jid) = make_jobset(&db, "p", "main").await;
        let mut c = db.conn().await.unwrap();
        let mut spec = JobsetSpec::new("prs");
        spec.attributes = vec!["checks".into(), "packages".into()];
        spec.systems = vec!["x86_64-linux".into()];
        spec.check_interval = 0;
        let prs = jobsets::upsert(c.ex(), pid, &spec).await.unwrap();
        assert_eq!(prs.attribute_list(), ["checks", "packages"]);
        assert_eq!(prs.system_list(), ["x86_64-linux"]);
        assert_eq!(jobsets::list_for_project(c.ex(), pid).await.unwrap().len(), 2);
        assert_eq!(jobsets::get(c.ex(), "p", "main").await.unwrap().unwrap().id, jid);

        // Never checked: main is due; prs has no interval and is not.
        let due: Vec<_> = jobsets::due(c.ex(), now()).await.unwrap().into_iter().map(|j| j.name).collect();
        assert_eq!(due, ["main"]);
        jobsets::mark_checked(c.ex(), jid, Some("fetch failed"), 0).await.unwrap();
        let main = jobsets::get_by_id(c.ex(), jid).await.unwrap().unwrap();
        assert_eq!(main.error.as_deref(), Some("fetch failed"));
        assert!(main.error_at.is_some());
        assert!(jobsets::due(c.ex(), now()).await.unwrap().is_empty());
        assert_eq!(jobsets::due(c.ex(), now() + 301).await.unwrap().len(), 1);

        // Two triggers collapse into one request; force sticks.
        jobsets::trigger(c.ex(), prs.id, false).await.unwrap();
        let first = jobsets::get_by_id(c.ex(), prs.id).await.unwrap().unwrap();
        jobsets::trigger(c.ex(), prs.id, true).await.unwrap();
        let prs2 = jobsets::get_by_id(c.ex(), prs.id).await.unwrap().unwrap();
        assert_eq!(prs2.trigger_at, first.trigger_at);
        assert!(prs2.force_eval);
        assert_eq!(jobsets::due(c.ex(), now()).await.unwrap().len(), 1);
        // A check that began after the first trigger does not answer the
        // second (a push while it evaluated): the jobset stays due.
        jobsets::mark_checked(c.ex(), prs.id, None, first.trigger_seq).await.unwrap();
        let kept = jobsets::get_by_id(c.ex(), prs.id).await.unwrap().unwrap();
        assert!(kept.trigger_at.is_some() && kept.force_eval, "the later trigger is kept");
        assert_eq!(jobsets::due(c.ex(), now()).await.unwrap().len(), 1);
        jobsets::mark_checked(c.ex(), prs.id, None, prs2.trigger_seq).await.unwrap();
        let prs3 = jobsets::get_by_id(c.ex(), prs.id).await.unwrap().unwrap();
        assert!(prs3.trigger_at.is_none() && !prs3.force_eval && prs3.error.is_none());
    })
    .await;
}

#[tokio::test]
async fn evaluations_members_and_builds() {
    each_backend(|db| async move {
        let (_, jid) = make_jobset(&db, "p", "main").await;
        let mut tx = db.begin().await.unwrap();
        let ev = evaluations::create(
            tx.ex(),
            &NewEvaluation {
                jobset_id: jid,
                commit_sha: "abc",
                git_ref: "refs/heads/main",
                flake_ref: "git+file:///x?rev=abc",
                config_hash: "h",
                workers: 2,
                forced: false,
            },
        )
        .await
        .unwrap();
        assert_eq!(ev.status, "running");
        let b = builds::create(tx.ex(), &new_build(jid, "hello", "/nix/store/aaa-hello.drv")).await.unwrap();
        evaluations::add_member(
            tx.ex(),
            &Member { eval_id: ev.id, job: "hello".into(), build_id: Some(b.id), is_new: true, error: None },
        )
        .await
        .unwrap();
        evaluations::add_member(
            tx.ex(),
            &Member {
                eval_id: ev.id,
                job: "broken".into(),
                build_id: None,
                is_new: false,
                error: Some("error: boom".into()),
            },
        )
        .await
        .unwrap();
        evaluations::finish(
            tx.ex(),
            ev.id,
            1234,
            &Outcome { lock_hash: Some("sha256-x"), jobs: 2, error_jobs: 1, new_builds: 1, ..Default::default() },
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();

        let mut c = db.conn().await.unwrap();
        let ev2 = evaluations::get(c.ex(), ev.id).await.unwrap().unwrap();
        assert_eq!((ev2.status.as_str(), ev2.jobs, ev2.error_jobs, ev2.duration_ms), ("succeeded", 2, 1, Some(1234)));
        let members = evaluations::members(c.ex(), ev.id).await.unwrap();
        assert_eq!(members.iter().map(|m| m.job.as_str()).collect::<Vec<_>>(), ["broken", "hello"]);
        assert_eq!(members[0].error.as_deref(), Some("error: boom"));
        assert_eq!(evaluations::latest(c.ex(), jid, 10).await.unwrap().len(), 1);

        // The same job and derivation is found for reuse by the next evaluation.
        let found = builds::find_in_jobset(c.ex(), jid, "hello", "/nix/store/aaa-hello.drv").await.unwrap().unwrap();
        assert_eq!(found.id, b.id);
        assert!(builds::find_in_jobset(c.ex(), jid, "hello", "/nix/store/bbb-hello.drv").await.unwrap().is_none());
        let outs = builds::outputs(c.ex(), b.id).await.unwrap();
        assert_eq!(outs.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["dev", "out"]);

        // A build finishes exactly once.
        assert_eq!(builds::unfinished(c.ex()).await.unwrap().len(), 1);
        builds::set_started(c.ex(), &[b.id], kiln::db::now()).await.unwrap();
        assert!(builds::finish(c.ex(), b.id, BuildStatus::Succeeded, false, None, None).await.unwrap());
        assert!(!builds::finish(c.ex(), b.id, BuildStatus::Failed, false, None, Some("late")).await.unwrap());
        let done = builds::get(c.ex(), b.id).await.unwrap().unwrap();
        assert!(done.finished);
        assert_eq!(done.status(), Some(BuildStatus::Succeeded));
        assert!(done.start_time.is_some() && done.stop_time.is_some());
        assert!(builds::unfinished(c.ex()).await.unwrap().is_empty());

        // Aggregates.
        let agg =
            builds::create(c.ex(), &NewBuild { is_aggregate: true, ..new_build(jid, "all", "/nix/store/ccc-all.drv") })
                .await
                .unwrap();
        builds::add_constituent(c.ex(), agg.id, b.id).await.unwrap();
        builds::add_constituent(c.ex(), agg.id, b.id).await.unwrap();
        assert_eq!(builds::constituents(c.ex(), agg.id).await.unwrap(), vec![b.id]);
    })
    .await;
}

#[tokio::test]
async fn a_rolled_back_transaction_leaves_nothing() {
    each_backend(|db| async move {
        let (_, jid) = make_jobset(&db, "p", "main").await;
        {
            let mut tx = db.begin().await.unwrap();
            builds::create(tx.ex(), &new_build(jid, "x", "/nix/store/x.drv")).await.unwrap();
            // dropped without commit
        }
        let mut c = db.conn().await.unwrap();
        assert!(builds::unfinished(c.ex()).await.unwrap().is_empty());
    })
    .await;
}

#[tokio::test]
async fn deleting_a_project_removes_its_jobsets_evaluations_and_builds() {
    each_backend(|db| async move {
        let (_, jid) = make_jobset(&db, "gone", "main").await;
        let mut c = db.conn().await.unwrap();
        let b = builds::create(c.ex(), &new_build(jid, "x", "/nix/store/x.drv")).await.unwrap();
        assert!(projects::delete(c.ex(), "gone").await.unwrap());
        assert!(jobsets::get_by_id(c.ex(), jid).await.unwrap().is_none());
        assert!(builds::get(c.ex(), b.id).await.unwrap().is_none());
    })
    .await;
}

#[tokio::test]
async fn steps_are_shared_one_per_derivation_even_under_concurrency() {
    each_backend(|db| async move {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                let mut tx = db.begin().await.unwrap();
                let r = steps::get_or_create(tx.ex(), "/nix/store/shared.drv", "x86_64-linux", "", "waiting")
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                r
            }));
        }
        let mut created = 0;
        let mut ids = std::collections::BTreeSet::new();
        for t in tasks {
            let (s, new) = t.await.unwrap();
            created += new as i32;
            ids.insert(s.id);
        }
        assert_eq!((created, ids.len()), (1, 1));
        let shared = *ids.iter().next().unwrap();

        let mut c = db.conn().await.unwrap();
        let (top, _) =
            steps::get_or_create(c.ex(), "/nix/store/top.drv", "x86_64-linux", "kvm", "waiting").await.unwrap();
        steps::add_dep(c.ex(), top.id, shared).await.unwrap();
        steps::add_dep(c.ex(), top.id, shared).await.unwrap();
        assert_eq!(steps::deps(c.ex(), top.id).await.unwrap(), vec![shared]);
        assert_eq!(steps::dependents(c.ex(), shared).await.unwrap(), vec![top.id]);

        assert!(steps::transition(c.ex(), shared, "waiting", "runnable").await.unwrap());
        assert!(!steps::transition(c.ex(), shared, "waiting", "running").await.unwrap());
        steps::set_output(c.ex(), shared, "out", "/nix/store/shared-out").await.unwrap();
        assert_eq!(
            steps::outputs(c.ex(), shared).await.unwrap(),
            vec![("out".to_string(), "/nix/store/shared-out".to_string())]
        );
        let counts = steps::count_by_state(c.ex()).await.unwrap();
        assert_eq!(counts, vec![("runnable".to_string(), 1), ("waiting".to_string(), 1)]);
        assert_eq!(steps::get(c.ex(), top.id).await.unwrap().unwrap().required_features, "kvm");
    })
    .await;
}

#[tokio::test]
async fn machines_remember_failures_and_pauses() {
    each_backend(|db| async move {
        let mut c = db.conn().await.unwrap();
        assert_eq!(machines::record_failure(c.ex(), "ssh://b1", "eof", None).await.unwrap(), 1);
        assert_eq!(machines::record_failure(c.ex(), "ssh://b1", "eof again", Some(now() + 60)).await.unwrap(), 2);
        let m = machines::get(c.ex(), "ssh://b1").await.unwrap().unwrap();
        assert_eq!(m.last_error.as_deref(), Some("eof again"));
        assert!(m.paused_until.is_some());
        machines::record_success(c.ex(), "ssh://b1").await.unwrap();
        let m = machines::get(c.ex(), "ssh://b1").await.unwrap().unwrap();
        assert_eq!((m.consecutive_failures, m.steps_done), (0, 1));
        // Disabling keeps the pause; enabling ends it, so the machine is used at once.
        machines::set_enabled(c.ex(), "ssh://b1", false).await.unwrap();
        let m = machines::get(c.ex(), "ssh://b1").await.unwrap().unwrap();
        assert!(!m.enabled && m.paused_until.is_some());
        machines::set_enabled(c.ex(), "ssh://b1", true).await.unwrap();
        let m = machines::get(c.ex(), "ssh://b1").await.unwrap().unwrap();
        assert!(m.enabled && m.paused_until.is_none());
        machines::set_enabled(c.ex(), "ssh://b1", false).await.unwrap();
        assert!(!machines::get(c.ex(), "ssh://b1").await.unwrap().unwrap().enabled);
        assert_eq!(machines::list(c.ex()).await.unwrap().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn cache_paths_first_insert_wins() {
    each_backend(|db| async move {
        let mut c = db.conn().await.unwrap();
        let p = cache_paths::CachePath {
            hash_part: "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz".into(),
            store_path: "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello".into(),
            nar_hash: "sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h".into(),
            nar_size: 120,
            file_hash: "sha256:09kxyd68d2nylk7ims23pj3i09s4nnv9p3dv6iij1q9canv42w6d".into(),
            file_size: 88,
            nar_file: "nar/09kx.nar.zst".into(),
            compression: "zstd".into(),
            refs: String::new(),
            deriver: None,
            ca: None,
            origin: "build".into(),
            created_at: now(),
            kiln_signed: true,
        };
        assert!(cache_paths::insert(c.ex(), &p).await.unwrap());
        assert!(!cache_paths::insert(c.ex(), &cache_paths::CachePath { nar_size: 999, ..p.clone() }).await.unwrap());
        assert_eq!(cache_paths::get(c.ex(), &p.hash_part).await.unwrap().unwrap(), p);
        assert!(cache_paths::contains(c.ex(), &p.hash_part).await.unwrap());
        assert!(cache_paths::nar_file_in_use(c.ex(), "nar/09kx.nar.zst").await.unwrap());
        assert!(cache_paths::delete(c.ex(), &p.hash_part).await.unwrap());
        assert!(!cache_paths::contains(c.ex(), &p.hash_part).await.unwrap());
        assert!(!cache_paths::nar_file_in_use(c.ex(), "nar/09kx.nar.zst").await.unwrap());
    })
    .await;
}

#[tokio::test]
async fn outbox_supersedes_and_retries() {
    each_backend(|db| async move {
        let mut c = db.conn().await.unwrap();
        let first =
            outbox::enqueue(c.ex(), "github_status", "o/r@abc", "kiln/main", r#"{"state":"pending"}"#).await.unwrap();
        let other = outbox::enqueue(c.ex(), "github_status", "o/r@abc", "kiln/main/hello", r#"{"state":"pending"}"#)
            .await
            .unwrap();
        let latest =
            outbox::enqueue(c.ex(), "github_status", "o/r@abc", "kiln/main", r#"{"state":"success"}"#).await.unwrap();
        let due: Vec<_> = outbox::due(c.ex(), now(), 10).await.unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(due, vec![other, latest], "the superseded pending status {first} is not sent");
        assert_eq!(outbox::backlog(c.ex()).await.unwrap(), 2);
        outbox::mark_failed(c.ex(), other, "HTTP 502", now() + 60).await.unwrap();
        outbox::mark_delivered(c.ex(), latest).await.unwrap();
        assert!(outbox::due(c.ex(), now(), 10).await.unwrap().is_empty());
        let later = outbox::due(c.ex(), now() + 61, 10).await.unwrap();
        assert_eq!(later.len(), 1);
        assert_eq!((later[0].attempts, later[0].last_error.as_deref()), (1, Some("HTTP 502")));
        assert_eq!(outbox::backlog(c.ex()).await.unwrap(), 1);
    })
    .await;
}

#[tokio::test]
async fn api_tokens_are_stored_hashed_and_synced_from_files() {
    each_backend(|db| async move {
        let mut c = db.conn().await.unwrap();
        api_tokens::sync_from_files(c.ex(), &[("a".into(), "secret-a".into()), ("b".into(), "secret-b".into())])
            .await
            .unwrap();
        let t = api_tokens::check(c.ex(), "secret-a").await.unwrap().unwrap();
        assert_eq!(t.name, "a");
        assert_ne!(t.token_sha256, "secret-a");
        assert!(api_tokens::check(c.ex(), "nope").await.unwrap().is_none());
        // Removing a token file revokes it.
        api_tokens::sync_from_files(c.ex(), &[("b".into(), "secret-b".into())]).await.unwrap();
        assert!(api_tokens::check(c.ex(), "secret-a").await.unwrap().is_none());
        let b = api_tokens::check(c.ex(), "secret-b").await.unwrap().unwrap();
        assert!(api_tokens::check(c.ex(), "secret-b").await.unwrap().unwrap().last_used_at >= b.last_used_at);
    })
    .await;
}

#[tokio::test]
async fn the_cache_keeps_what_deployed_hosts_run_and_would_roll_back_to() {
    use kiln::db::deployment_hosts::{self as dh, Planned};
    each_backend(|db| async move {
        let mut c = db.conn().await.unwrap();
        let p = projects::upsert(c.ex(), &project_spec("infra")).await.unwrap();
        let text: toml::Table =
            "[prod]\njobset = \"main\"\n[prod.hosts.a]\ntarget = \"ssh://a\"\njob = \"hosts.a\"\n".parse().unwrap();
        let tables = text.into_iter().collect();
        let envs = kiln::deploy::spec::parse(&tables, &["main".to_string()]).unwrap();
        environments::sync(c.ex(), p.id, &envs).await.unwrap();
        let env = environments::get(c.ex(), "infra", "prod").await.unwrap().unwrap();
        let path = |n: u32| format!("/nix/store/{}-system-{n}", "a".repeat(31) + &n.to_string());
        // p0 → p1 → p2 succeeded, then p3 rolled back to p2, and p4 waits.
        let mut previous = Some(path(0));
        for (n, status) in [(1, dh::SUCCEEDED), (2, dh::SUCCEEDED), (3, dh::ROLLED_BACK)] {
            let d = deployments::create(c.ex(), env.id, n as i64, deployments::QUEUED, "auto").await.unwrap();
            let to = path(n);
            dh::add(c.ex(), d.id, &[Planned { host: "a", wave: 0, job: "hosts.a", build_id: None, store_path: &to }])
                .await
                .unwrap();
            dh::begin_switch(c.ex(), d.id, "a", previous.as_deref(), "/tmp/w").await.unwrap().unwrap();
            dh::set_status(c.ex(), d.id, "a", status, None).await.unwrap();
            deployments::finish(c.ex(), d.id, deployments::SUCCEEDED, None).await.unwrap();
            previous = Some(to);
        }
        let d = deployments::create(c.ex(), env.id, 4, deployments::WAITING, "auto").await.unwrap();
        let p4 = path(4);
        dh::add(c.ex(), d.id, &[Planned { host: "a", wave: 0, job: "hosts.a", build_id: None, store_path: &p4 }])
            .await
            .unwrap();
        let mut kept = dh::retained_paths(c.ex()).await.unwrap();
        kept.sort();
        kept.dedup();
        assert_eq!(kept, vec![path(2), path(3), path(4)]);
    })
    .await;
}

#[tokio::test]
async fn a_pull_request_from_an_outside_contributor_is_approved_once_or_per_push() {
    each_backend(|db| async move {
        let (pid, _) = make_jobset(&db, "p", "main").await;
        let mut c = db.conn().await.unwrap();
        let mut spec = JobsetSpec::new("pr-3");
        spec.pr_number = Some(3);
        let j = jobsets::upsert(c.ex(), pid, &spec).await.unwrap();
        assert_eq!(j.trusted_list(), ["OWNER", "MEMBER", "COLLABORATOR"]);
        // Before any event says who wrote it, it is not trusted.
        assert!(!j.approved_for(None));
        macro_rules! get {
            ($c:expr) => {
                jobsets::get_by_id($c.ex(), j.id).await.unwrap().unwrap()
            };
        }
        jobsets::set_pr_head(c.ex(), j.id, "alice", "MEMBER", "aaa").await.unwrap();
        assert!(get!(c).approved_for(None), "a member's pull request needs no approval");
        jobsets::set_pr_head(c.ex(), j.id, "eve", "FIRST_TIME_CONTRIBUTOR", "bbb").await.unwrap();
        assert!(!get!(c).approved_for(None));
        jobsets::approve(c.ex(), j.id, "ops").await.unwrap();
        let approved = get!(c);
        assert_eq!((approved.approved_by.as_deref(), approved.approved_sha.as_deref()), (Some("ops"), Some("bbb")));
        assert!(approved.approved_for(None));
        jobsets::set_pr_head(c.ex(), j.id, "eve", "FIRST_TIME_CONTRIBUTOR", "ccc").await.unwrap();
        assert!(get!(c).approved_for(Some("ccc")), "one approval covers later pushes");

        // Per push: the next head waits again, and a fetched head newer
        // than the approved one is not evaluated.
        spec.approve_each_push = true;
        spec.trusted_associations = vec!["OWNER".into()];
        jobsets::upsert(c.ex(), pid, &spec).await.unwrap();
        let each = get!(c);
        assert!(!each.approved_for(None), "approved at bbb, the head is ccc");
        jobsets::approve(c.ex(), j.id, "ops").await.unwrap();
        let each = get!(c);
        assert!(each.approved_for(None) && each.approved_for(Some("ccc")));
        assert!(!each.approved_for(Some("ddd")), "a head pushed after the approval");
        jobsets::set_pr_head(c.ex(), j.id, "alice", "MEMBER", "eee").await.unwrap();
        assert!(!get!(c).approved_for(None), "MEMBER is no longer trusted by this template");
    })
    .await;
}

#[tokio::test]
async fn duration_histograms_count_observations_per_bucket_with_their_sum() {
    each_backend(|db| async move {
        use kiln::db::histograms;
        let mut c = db.conn().await.unwrap();
        for secs in [0.5, 3.0, 4.0, 20000.0] {
            histograms::observe(c.ex(), histograms::STEP_DURATION, secs).await.unwrap();
        }
        histograms::observe(c.ex(), histograms::EVALUATION_DURATION, 2.0).await.unwrap();
        let (counts, sum) = histograms::read(c.ex(), histograms::STEP_DURATION, 9).await.unwrap();
        assert_eq!(counts, vec![1, 2, 0, 0, 0, 0, 0, 0, 1], "1 s, 5 s, …, above 10800 s");
        assert!((sum - 20007.5).abs() < 1e-6, "{sum}");
        assert_eq!(histograms::read(c.ex(), histograms::EVALUATION_DURATION, 9).await.unwrap().0[1], 1);
    })
    .await;
}
