//! A real browser (Debian's Chromium, driven over WebDriver by its
//! chromedriver) walks the UI as a person would: home → project → jobset →
//! evaluation → build → log, watches a log grow while the build runs and
//! the build page update itself when it ends, and restarts a failed build:
//! refused while signed out, queued once signed in with a token. A
//! screenshot of every page is saved under `target/screenshots/`.

mod support;

use fantoccini::Locator;
use support::browser::*;
use support::*;

const TOKEN: &str = "browser-token-7";

#[tokio::test]
async fn a_person_walks_the_ui_follows_a_live_log_and_restarts_a_failed_build() {
    let t = unique("br");
    // The slow build logs until the test opens its gate, so the test sees
    // it running however long the walk before took.
    let gate_dir = tempfile::tempdir().unwrap();
    let gate = gate_dir.path().join("open");
    let flake = Flake::new(
        &format!(
            r#"{{ outputs = _: {{ hydraJobs = {{ ok = {}; bad = {}; slow = {}; }}; }}; }}"#,
            drv_expr(&format!("ok-{t}"), "echo fine; echo > $out"),
            drv_expr(&format!("bad-{t}"), "export PATH=/usr/bin:/bin; echo going to fail; sleep 1; exit 1"),
            drv_expr(
                &format!("slow-{t}"),
                &format!(
                    "export PATH=/usr/bin:/bin; i=0; while [ ! -e {} ]; do i=$((i+1)); echo progress line $i; sleep 0.2; done; \
                     echo finished after $i lines; echo > $out",
                    gate.display()
                )
            ),
        ),
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    std::fs::write(
        dir.path().join("kiln.toml"),
        format!(
            "api_token_files = [\"token\"]\n[[projects]]\nname = \"br\"\ndisplay_name = \"Browser test\"\nrepo = \"{}\"\n",
            flake.path().display()
        ),
    )
    .unwrap();
    let kiln = Kiln::start_in(dir, &[]);
    let api = Api::new(&kiln.url, Some(TOKEN));
    let (eval, slow, bad) = wait_for(60, "the evaluation", || async {
        let (_, v) = api.get("/jobset/br/main/evals").await;
        let e = v["evals"].as_array()?.first()?["id"].as_i64()?;
        let (_, d) = api.get(&format!("/eval/{e}")).await;
        Some((e, d["jobs"]["slow"].as_i64()?, d["jobs"]["bad"].as_i64()?))
    })
    .await;

    let d = driver().await;
    let profile = tempfile::tempdir().unwrap();
    let c = browser(&d, profile.path()).await;

    // Home → project → jobset → evaluation → build, by clicking.
    c.goto(&kiln.url).await.unwrap();
    assert_eq!(c.title().await.unwrap(), "Kiln");
    assert_eq!(heading(&c).await, "Projects");
    shot(&c, "1-home").await;
    click_link(&c, "Browser test").await;
    until(&c, "h1", |h| h == "Project Browser test").await;
    shot(&c, "2-project").await;
    c.find(Locator::Css("a[href='/jobset/br/main']")).await.unwrap().click().await.unwrap();
    until(&c, "h1", |h| h == "Jobset br:main").await;
    shot(&c, "3-jobset").await;
    c.find(Locator::Css(&format!("a[href='/eval/{eval}']"))).await.unwrap().click().await.unwrap();
    until(&c, "h1", |h| h == format!("Evaluation {eval} of br:main")).await;
    shot(&c, "4-evaluation").await;
    c.find(Locator::Css(&format!("a[href='/build/{slow}']"))).await.unwrap().click().await.unwrap();
    until(&c, "h1", |h| h == format!("Build {slow} of slow")).await;
    assert!(c.title().await.unwrap().contains("slow"));
    shot(&c, "5-build").await;

    // The log while it is written: it grows in the page without a reload.
    wait_for(60, "the slow build to start", || async {
        let (_, b) = api.get(&format!("/build/{slow}")).await;
        let (_, q) = api.get("/queue").await;
        let running = q["running"].as_array()?.iter().any(|s| s["drvpath"] == b["drvpath"]);
        running.then_some(())
    })
    .await;
    c.goto(&format!("{}/build/{slow}/log", kiln.url)).await.unwrap();
    assert_eq!(heading(&c).await, format!("Log of build {slow}"));
    let lines = |s: String| s.lines().filter(|l| l.contains("progress line")).count();
    let first = wait_for(20, "the first lines", || async {
        let n = lines(text(&c, "#log").await);
        (n >= 1).then_some(n)
    })
    .await;
    let later = wait_for(20, "the log to grow", || async {
        let n = lines(text(&c, "#log").await);
        (n >= first + 4).then_some(n)
    })
    .await;
    assert!(later > first);
    shot(&c, "6-live-log").await;

    // The build page updates itself from /api/events when the build ends.
    c.goto(&format!("{}/build/{slow}", kiln.url)).await.unwrap();
    wait_for(15, "the page to listen for events", || async {
        let m = c.find(Locator::Css("main")).await.ok()?;
        (m.attr("data-events").await.ok()?? == "connected").then_some(())
    })
    .await;
    std::fs::write(&gate, "").unwrap();
    wait_for(60, "the status to change in place", || async {
        (text(&c, "#status").await == "succeeded").then_some(())
    })
    .await;
    let main = c.find(Locator::Css("main")).await.unwrap();
    assert!(main.attr("data-updated").await.unwrap().is_some(), "updated by the script, not reloaded");
    shot(&c, "7-build-finished").await;
    c.goto(&format!("{}/build/{slow}/log", kiln.url)).await.unwrap();
    until(&c, "#log", |l| l.contains("finished after")).await;

    // A failed build: restart refused while signed out …
    wait_for(60, "the failing build", || async {
        (api.get(&format!("/build/{bad}")).await.1["buildstatus"] == 1).then_some(())
    })
    .await;
    c.goto(&format!("{}/build/{bad}", kiln.url)).await.unwrap();
    assert_eq!(text(&c, "#status").await, "failed");
    c.find(Locator::Id("restart")).await.unwrap().click().await.unwrap();
    until(&c, "h1", |h| h == "Not allowed").await;
    assert!(text(&c, "#error").await.contains("token"));
    shot(&c, "8-refused").await;
    assert_eq!(api.get(&format!("/build/{bad}")).await.1["finished"], 1, "nothing happened");

    // … and queued once signed in with a token.
    click_link(&c, "Sign in").await;
    until(&c, "h1", |h| h == "Sign in").await;
    let field = c.find(Locator::Id("token")).await.unwrap();
    field.send_keys("wrong").await.unwrap();
    c.find(Locator::Css("form[action='/login'] button")).await.unwrap().click().await.unwrap();
    until(&c, "main", |m| m.contains("not a valid token")).await;
    let field = c.find(Locator::Id("token")).await.unwrap();
    field.clear().await.unwrap();
    field.send_keys(TOKEN).await.unwrap();
    c.find(Locator::Css("form[action='/login'] button")).await.unwrap().click().await.unwrap();
    until(&c, "header", |h| h.contains("Sign out")).await;
    c.goto(&format!("{}/build/{bad}", kiln.url)).await.unwrap();
    c.find(Locator::Id("restart")).await.unwrap().click().await.unwrap();
    until(&c, "#status", |s| s == "queued").await;
    assert_eq!(c.current_url().await.unwrap().path(), format!("/build/{bad}"));
    shot(&c, "9-restarted").await;
    let (_, b) = api.get(&format!("/build/{bad}")).await;
    assert_eq!(b["finished"], 0, "queued again: {b}");

    c.close().await.unwrap();
}
