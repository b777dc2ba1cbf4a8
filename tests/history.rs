//! History is bounded: old finished steps no build names (and their logs,
//! earlier attempts' included), old webhook delivery ids and delivered
//! statuses are pruned; everything still in use stays. On both databases.

mod support;

use kiln::config::HistoryConfig;
use kiln::db::{self, Db, run};
use support::*;

const DAY: i64 = 86_400;

async fn exec(db: &Db, sql: &str) {
    let mut c = db.conn().await.unwrap();
    run!(c.ex(), c => {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string())).execute(&mut *c).await.unwrap();
    });
}

async fn ids(db: &Db, sql: &str) -> Vec<String> {
    let mut c = db.conn().await.unwrap();
    let mut v: Vec<String> =
        run!(c.ex(), c => sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string())).fetch_all(&mut *c).await.unwrap());
    v.sort();
    v
}

#[tokio::test]
async fn old_history_goes_and_what_is_in_use_stays() {
    each_backend(|db| async move {
        let state = tempfile::tempdir().unwrap();
        let logs = kiln::logs::Logs::new(state.path());
        let now = db::now();
        let old = now - 100 * DAY;
        let recent = now - 10 * DAY;
        let (_, jobset) = make_jobset(&db, "p", "main").await;
        // Steps: (name, state, ended) — the name stands in for the drv.
        let steps = [
            ("old-built", "succeeded", old),
            ("old-failed", "failed", old),
            ("old-substituted", "substituted", old),
            ("old-top", "succeeded", old),
            ("old-failed-step", "failed", old),
            ("old-running", "running", old),
            ("old-runnable", "runnable", old),
            ("recent-built", "succeeded", recent),
        ];
        let drv_of = |i: usize, name: &str| format!("/nix/store/{}-{name}.drv", format!("{i:0>32}").replace('0', "a"));
        let mut log_files = std::collections::HashMap::new();
        for (i, (name, st, ended)) in steps.iter().enumerate() {
            let drv = drv_of(i, name);
            let log = logs.write(&drv, b"a log line\n").unwrap();
            log_files.insert(*name, log.clone());
            exec(
                &db,
                &format!(
                    "INSERT INTO steps (drv_path, system, state, created_at, stop_time, log_file)
                     VALUES ('{drv}', 'x86_64-linux', '{st}', {ended}, {ended}, '{}')",
                    log.display()
                ),
            )
            .await;
        }
        // Earlier attempts' logs: a pruned step's go with it, as do those of
        // a step given up after machine faults (it has no log of its own);
        // a kept step's stay.
        let aborted = drv_of(steps.len(), "old-aborted");
        exec(
            &db,
            &format!(
                "INSERT INTO steps (drv_path, system, state, created_at, stop_time)
                 VALUES ('{aborted}', 'x86_64-linux', 'aborted', {old}, {old})"
            ),
        )
        .await;
        let mut attempt_files = Vec::new();
        for (drv, gone) in [(drv_of(0, "old-built"), true), (aborted, true), (drv_of(7, "recent-built"), false)] {
            let live = logs.start(&drv, 1, 1 << 20).unwrap();
            live.append("attempt 1\n").await;
            attempt_files.push((live.finish(kiln::logs::Kept::Attempt).await.unwrap(), gone));
        }
        // Edges and outputs of a pruned step go with it.
        exec(&db, "INSERT INTO step_deps (step_id, dep_id) SELECT a.id, b.id FROM steps a, steps b WHERE a.drv_path LIKE '%-old-built.drv' AND b.drv_path LIKE '%-old-substituted.drv'").await;
        // A build names two old steps: its top step and its failed step.
        exec(
            &db,
            &format!(
                "INSERT INTO builds (jobset_id, job, drv_path, nix_name, system, timeout, max_silent, priority, is_aggregate, created_at, finished, top_step_id, failed_step_id)
                 SELECT {jobset}, 'j', '/nix/store/x-j.drv', 'j', 'x86_64-linux', 1, 1, 100, FALSE, {old}, TRUE,
                        (SELECT id FROM steps WHERE drv_path LIKE '%-old-top.drv'),
                        (SELECT id FROM steps WHERE drv_path LIKE '%-old-failed-step.drv')"
            ),
        )
        .await;
        for (id, at) in [("old-delivery", old), ("recent-delivery", now - DAY)] {
            exec(&db, &format!("INSERT INTO webhook_deliveries (delivery_id, received_at) VALUES ('{id}', {at})")).await;
        }
        for (ctx, created, delivered, superseded) in [
            ("old-delivered", old, "1", "FALSE"),
            ("old-superseded", old, "NULL", "TRUE"),
            ("old-pending", old, "NULL", "FALSE"),
            ("recent-delivered", recent, "1", "FALSE"),
        ] {
            exec(
                &db,
                &format!(
                    "INSERT INTO outbox (kind, target, context, payload, created_at, next_attempt_at, delivered_at, superseded)
                     VALUES ('status', 'o/r@abc', '{ctx}', '{{}}', {created}, {created}, {delivered}, {superseded})"
                ),
            )
            .await;
        }

        let pruned = kiln::history::prune(&db, &logs, &HistoryConfig::default(), now).await.unwrap();

        let kept: Vec<String> = ids(&db, "SELECT drv_path FROM steps")
            .await
            .iter()
            .map(|d| d.trim_end_matches(".drv").split_once('-').unwrap().1.to_string())
            .collect();
        let mut kept = kept;
        kept.sort();
        assert_eq!(kept, ["old-failed-step", "old-runnable", "old-running", "old-top", "recent-built"]);
        assert_eq!(pruned.steps, 4, "{pruned:?}");
        assert_eq!(pruned.logs, 5, "three logs and two earlier attempts' {pruned:?}");
        for (name, log) in &log_files {
            let gone = ["old-built", "old-failed", "old-substituted"].contains(name);
            assert_eq!(!log.exists(), gone, "{name}'s log");
        }
        for (file, gone) in &attempt_files {
            assert_eq!(!file.exists(), *gone, "{}", file.display());
        }
        assert_eq!(ids(&db, "SELECT CAST(step_id AS TEXT) FROM step_deps").await, Vec::<String>::new());
        assert_eq!(ids(&db, "SELECT delivery_id FROM webhook_deliveries").await, ["recent-delivery"]);
        assert_eq!(pruned.webhook_deliveries, 1);
        assert_eq!(ids(&db, "SELECT context FROM outbox").await, ["old-pending", "recent-delivered"]);
        assert_eq!(pruned.outbox, 2);

        // Zero keeps everything.
        let none = HistoryConfig { steps_days: 0, webhook_deliveries_days: 0, outbox_days: 0, ..Default::default() };
        let p = kiln::history::prune(&db, &logs, &none, now + 1000 * DAY).await.unwrap();
        assert_eq!(p, kiln::history::Pruned::default());
    })
    .await;
}
