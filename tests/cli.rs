//! The `kiln` binary as users run it: help, keygen, serve on defaults,
//! configuration errors, migrations, clean shutdown.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use support::*;

#[test]
fn help_lists_only_working_commands() {
    let out = kiln_cmd().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("Options:")
        .next()
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(commands, ["serve", "eval", "build", "machines", "cache", "deploy", "agent", "db", "help"]);
    let bad = kiln_cmd().arg("frobnicate").output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn keygen_writes_nix_format_private_and_never_overwrites() {
    let d = tempfile::tempdir().unwrap();
    let (sk, pk) = (d.path().join("k.sec"), d.path().join("k.pub"));
    let out = kiln_cmd()
        .args(["cache", "keygen", "ci.example.org-1", "--secret"])
        .arg(&sk)
        .arg("--public")
        .arg(&pk)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::metadata(&sk).unwrap().permissions().mode() & 0o777, 0o600);
    let secret = std::fs::read_to_string(&sk).unwrap();
    let public = std::fs::read_to_string(&pk).unwrap();
    assert!(secret.starts_with("ci.example.org-1:") && public.starts_with("ci.example.org-1:"));
    // Secret keys are never printed.
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&secret[17..]));

    // A real Nix signs with the key Kiln made, and checks with its public half.
    let (top, _) = {
        let e = d.path().join("e.nix");
        std::fs::write(&e, drv_expr("keygen-check", &format!("echo {} > $out", unique("k")))).unwrap();
        let drv = nix("nix-instantiate", &[e.to_str().unwrap()]);
        (nix("nix-store", &["-r", drv.trim()]).trim().to_string(), ())
    };
    let cache = d.path().join("c");
    nix("nix", &["copy", "--to", &format!("file://{}?secret-key={}", cache.display(), sk.display()), &top]);
    let verify = nix_cmd("nix")
        .args([
            "store",
            "verify",
            "--store",
            &format!("file://{}", cache.display()),
            "--trusted-public-keys",
            public.trim(),
            "--sigs-needed",
            "1",
            &top,
        ])
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));

    let again = kiln_cmd()
        .args(["cache", "keygen", "other", "--secret"])
        .arg(&sk)
        .arg("--public")
        .arg(d.path().join("o.pub"))
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    assert_eq!(std::fs::read_to_string(&sk).unwrap(), secret);
}

fn get(url: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let r = reqwest::Client::new().get(url).timeout(Duration::from_secs(10)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

#[test]
fn serve_on_defaults_answers_healthz_and_stops_cleanly_on_sigterm() {
    // No kiln.toml at all: everything from the built-in defaults.
    let dir = tempfile::tempdir().unwrap();
    let mut kiln = Kiln::start_in(dir, &[]);
    let (code, body) = get(&format!("{}/healthz", kiln.url));
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ok");
    assert_eq!(v["database"], true);
    let (code, home) = get(&format!("{}/", kiln.url));
    assert_eq!(code, 200);
    let state = kiln.dir.path().join("kiln-state");
    assert!(state.join("kiln.db").exists(), "SQLite database in the state directory");
    let sec = state.join("keys/cache.sec");
    assert_eq!(std::fs::metadata(&sec).unwrap().permissions().mode() & 0o777, 0o600);
    let public = std::fs::read_to_string(state.join("keys/cache.pub")).unwrap();
    assert!(public.starts_with("kiln-1:"));
    assert!(home.contains(&public), "the home page shows the cache's public key");
    assert!(!kiln.log().contains(std::fs::read_to_string(&sec).unwrap().split(':').nth(1).unwrap()));

    let status = kiln.terminate();
    assert!(status.success(), "exit after SIGTERM: {status}\n{}", kiln.log());
    assert!(kiln.log().contains("shutting down"));

    // Started again, it keeps its key and database.
    let dir = std::mem::replace(&mut kiln.dir, tempfile::tempdir().unwrap());
    let mut again = Kiln::start_in(dir, &[]);
    assert_eq!(std::fs::read_to_string(again.dir.path().join("kiln-state/keys/cache.pub")).unwrap(), public);
    assert!(again.terminate().success());
}

#[test]
fn serve_on_postgres_via_environment() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pg = rt.block_on(PgDatabase::create());
    let mut kiln = Kiln::start("", &[("KILN_DATABASE_URL", &pg.url)]);
    let (code, body) = get(&format!("{}/healthz", kiln.url));
    assert_eq!((code, body.contains("\"database\":true")), (200, true));
    assert!(!kiln.dir.path().join("kiln-state/kiln.db").exists());
    assert!(kiln.terminate().success());
    // `kiln db migrate` on the same database finds nothing to do.
    let out = kiln_cmd()
        .args(["db", "migrate"])
        .env("KILN_DATABASE_URL", &pg.url)
        .current_dir(kiln.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    drop(kiln);
}

#[test]
fn cache_gc_runs_on_a_fresh_state_directory() {
    let d = tempfile::tempdir().unwrap();
    let out = kiln_cmd().args(["cache", "gc", "--dry-run"]).current_dir(d.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("would delete 0 paths"));
    let out = kiln_cmd().args(["cache", "gc"]).current_dir(d.path()).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("deleted 0 paths"));
}

#[test]
fn db_migrate_creates_the_sqlite_database() {
    let d = tempfile::tempdir().unwrap();
    let out = kiln_cmd().args(["db", "migrate"]).current_dir(d.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(d.path().join("kiln-state/kiln.db").exists());
    assert!(String::from_utf8_lossy(&out.stderr).contains("migrations applied"));
}

fn config_error(config: &str, env: &[(&str, &str)]) -> String {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("kiln.toml"), config).unwrap();
    let mut cmd = kiln_cmd();
    cmd.arg("serve").current_dir(d.path());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "bad config exits 2: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn malformed_config_exits_2_naming_file_key_and_reason() {
    let e = config_error("listen = \"127.0.0.1:0\"\nlisten_addr = 1\n", &[]);
    assert!(e.contains("kiln.toml") && e.contains("listen_addr") && e.contains("unknown field"), "{e}");
    let e = config_error("[eval]\nworkers = \"two\"\n", &[]);
    assert!(e.contains("eval.workers") && e.contains("invalid type"), "{e}");
    let e = config_error("listen = \n", &[]);
    assert!(e.contains("kiln.toml") && e.contains("invalid TOML"), "{e}");
    let e = config_error("api_token_files = [\"/nonexistent/kiln-token\"]\n", &[]);
    assert!(e.contains("api_token_files") && e.contains("/nonexistent/kiln-token"), "{e}");
    let e = config_error("", &[("KILN_EVAL_WORKERS", "-1")]);
    assert!(e.contains("KILN_EVAL_WORKERS") && e.contains("eval.workers"), "{e}");
    let e = config_error("", &[("KILN_NO_SUCH_KEY", "1")]);
    assert!(e.contains("KILN_NO_SUCH_KEY") && e.contains("no_such_key"), "{e}");
    let out = kiln_cmd().args(["serve", "--config", "/nonexistent/kiln.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/kiln.toml"));
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let d = tempfile::tempdir().unwrap();
    let out =
        kiln_cmd().arg("serve").env("KILN_LISTEN", format!("127.0.0.1:{port}")).current_dir(d.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("cannot listen on 127.0.0.1:{port}")));
}
