//! Test harness shared by every integration test: real parts only.
//!
//! - [`nix`]: runs the real Nix with a per-test configuration (no
//!   substituters, flakes on).
//! - [`Flake`]: a fixture flake in its own git repository.
//! - [`each_backend`]: runs a test body on a fresh SQLite database and a
//!   fresh PostgreSQL database (from `KILN_TEST_PG_URL`, which
//!   `scripts/test` sets after starting a private cluster).
//! - [`Sshd`] and [`Builder`]: a private sshd on a loopback port and
//!   chroot-store Nix builders behind it, as Nix's machines file names them.
//! - [`Kiln`]: the real `kiln` binary running `serve` on a free port.
//!
//! Everything cleans up when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use kiln::db::Db;
use tempfile::TempDir;

pub mod browser;
pub mod gitea;
pub mod github;
pub mod inproc;
pub mod pg;
pub mod s3;
pub mod upstream;

pub const SYSTEM: &str = "x86_64-linux";

/// The Nix configuration every test process gets.
pub const NIX_CONFIG: &str =
    "experimental-features = nix-command flakes\nsubstituters =\nwarn-dirty = false\nsandbox = false\n";

/// A command for a Nix program with the test configuration.
pub fn nix_cmd(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env("NIX_CONFIG", NIX_CONFIG).stdin(Stdio::null());
    c
}

/// Runs a Nix program; panics with its stderr if it fails.
pub fn nix(program: &str, args: &[&str]) -> String {
    let out = nix_cmd(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}; run scripts/test, which installs nix-bin"));
    check(program, args, &out);
    String::from_utf8(out.stdout).expect("utf-8 output")
}

pub fn nix_bytes(program: &str, args: &[&str]) -> Vec<u8> {
    let out = nix_cmd(program).args(args).output().unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    check(program, args, &out);
    out.stdout
}

fn check(program: &str, args: &[&str], out: &Output) {
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn run(program: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    check(program, args, &out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A unique name for databases, directories and the like.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}_{}_{}_{t}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start listening on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------------------ flakes

/// A flake in a fresh git repository (Nix only sees files git tracks).
pub struct Flake {
    pub dir: TempDir,
}

impl Flake {
    /// A repository with `flake.nix` and any other `files`, committed on `main`.
    pub fn new(flake_nix: &str, files: &[(&str, &str)]) -> Flake {
        let dir = tempfile::tempdir().unwrap();
        let f = Flake { dir };
        git(f.path(), &["init", "-q", "-b", "main"]);
        f.write("flake.nix", flake_nix);
        for (name, text) in files {
            f.write(name, text);
        }
        f.commit("initial");
        f
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    /// Commits everything and returns the commit hash.
    pub fn commit(&self, msg: &str) -> String {
        git(self.path(), &["add", "-A"]);
        git(self.path(), &["commit", "-q", "--allow-empty", "-m", msg]);
        git(self.path(), &["rev-parse", "HEAD"]).trim().to_string()
    }

    pub fn url(&self) -> String {
        format!("git+file://{}", self.path().display())
    }

    /// `nix eval --raw` of an attribute of this flake.
    pub fn eval_raw(&self, attr: &str) -> String {
        nix("nix", &["eval", "--raw", &format!("{}#{attr}", self.url())])
    }
}

pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=Kiln Test", "-c", "user.email=test@kiln.invalid", "-c", "commit.gpgsign=false"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    check("git", args, &out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Nix expression for a trivial derivation built with `/bin/sh` only.
pub fn drv_expr(name: &str, script: &str) -> String {
    format!(
        r#"derivation {{ name = "{name}"; system = "{SYSTEM}"; builder = "/bin/sh"; args = [ "-c" {script:?} ]; }}"#
    )
}

// ------------------------------------------------------------------ databases

/// The PostgreSQL server tests use. Missing is a failure, not a skip.
pub fn pg_admin_url() -> String {
    std::env::var("KILN_TEST_PG_URL").expect(
        "KILN_TEST_PG_URL is not set: database tests run on SQLite and PostgreSQL; \
         run scripts/test, which starts a private PostgreSQL and sets it",
    )
}

/// A fresh, migrated database that is removed when dropped.
pub struct TestDb {
    pub db: Db,
    pub url: String,
    _dir: Option<TempDir>,
    pg_name: Option<String>,
}

impl TestDb {
    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("kiln.db").display());
        let db = Db::connect(&url).await.unwrap();
        db.migrate().await.unwrap();
        TestDb { db, url, _dir: Some(dir), pg_name: None }
    }

    pub async fn postgres() -> TestDb {
        use sqlx::Connection;
        let admin = pg_admin_url();
        let name = unique("kiln_t");
        let mut c = sqlx::PgConnection::connect(&admin).await.expect("connect to KILN_TEST_PG_URL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut c).await.unwrap();
        c.close().await.unwrap();
        let url = replace_db_name(&admin, &name);
        let db = Db::connect(&url).await.unwrap();
        db.migrate().await.unwrap();
        TestDb { db, url, _dir: None, pg_name: Some(name) }
    }
}

/// An empty PostgreSQL database's URL (not migrated), removed on drop.
pub struct PgDatabase {
    pub url: String,
    name: String,
}

impl PgDatabase {
    pub async fn create() -> PgDatabase {
        use sqlx::Connection;
        let admin = pg_admin_url();
        let name = unique("kiln_t");
        let mut c = sqlx::PgConnection::connect(&admin).await.expect("connect to KILN_TEST_PG_URL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut c).await.unwrap();
        PgDatabase { url: replace_db_name(&admin, &name), name }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        drop_pg_database(&self.name);
    }
}

fn replace_db_name(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

fn drop_pg_database(name: &str) {
    let name = name.to_string();
    // Drop runs outside any runtime; a short-lived one does the cleanup.
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            use sqlx::Connection;
            if let Ok(mut c) = sqlx::PgConnection::connect(&pg_admin_url()).await {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                    .execute(&mut c)
                    .await;
            }
        })
    })
    .join();
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(name) = &self.pg_name {
            drop_pg_database(name);
        }
    }
}

/// A project spec for tests.
pub fn project_spec(name: &str) -> kiln::db::projects::ProjectSpec {
    kiln::db::projects::ProjectSpec {
        name: name.into(),
        display_name: format!("The {name}"),
        description: "desc".into(),
        repo: format!("file:///srv/{name}"),
        github_repo: None,
        enabled: true,
        hidden: false,
        declared_in: "config".into(),
    }
}

/// Creates a project and a jobset with default settings: (project id, jobset id).
pub async fn make_jobset(db: &Db, project: &str, jobset: &str) -> (i64, i64) {
    use kiln::db::{jobsets, projects};
    let mut c = db.conn().await.unwrap();
    let p = projects::upsert(c.ex(), &project_spec(project)).await.unwrap();
    let j = jobsets::upsert(c.ex(), p.id, &jobsets::JobsetSpec::new(jobset)).await.unwrap();
    (p.id, j.id)
}

/// Runs `body` on a fresh SQLite database, then on a fresh PostgreSQL one.
pub async fn each_backend<F, Fut>(body: F)
where
    F: Fn(Db) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for make in [0, 1] {
        let t = if make == 0 { TestDb::sqlite().await } else { TestDb::postgres().await };
        body(t.db.clone()).await;
        t.db.close().await;
    }
}

// ------------------------------------------------------------------ sshd and builders

/// A private sshd on a loopback port, with its own host key and a user key
/// that may log in as the current user (root in CI).
pub struct Sshd {
    pub dir: TempDir,
    pub port: u16,
    pub user_key: PathBuf,
    /// `known_hosts` with the host key for `[127.0.0.1]:port`.
    pub known_hosts: PathBuf,
    /// Base64 of the host's public key line, the machines file's 8th field.
    pub host_key_b64: String,
    child: Option<Child>,
}

impl Sshd {
    pub fn start() -> Sshd {
        Self::start_with("")
    }

    /// An sshd with `extra` lines in its sshd_config (e.g. `LogLevel DEBUG1`).
    pub fn start_with(extra: &str) -> Sshd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for key in ["hostkey", "userkey"] {
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", key, "-f"])
                .arg(d.join(key))
                .output()
                .expect("ssh-keygen (openssh-client) is installed");
            assert!(out.status.success(), "ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::fs::copy(d.join("userkey.pub"), d.join("authorized_keys")).unwrap();
        let port = free_port();
        let cfg = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/hostkey\nAuthorizedKeysFile {dir}/authorized_keys\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
             StrictModes no\nUsePAM no\nPidFile {dir}/sshd.pid\nMaxStartups 100\nMaxSessions 100\n{extra}\n",
            dir = d.display()
        );
        std::fs::write(d.join("sshd_config"), cfg).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-f")
            .arg(d.join("sshd_config"))
            .arg("-E")
            .arg(d.join("sshd.log"))
            // Session processes outlive the daemon; they must not hold the
            // test's output open.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("/usr/sbin/sshd (openssh-server) is installed");
        wait_for_port(port, "sshd");
        let host_pub = std::fs::read_to_string(d.join("hostkey.pub")).unwrap();
        let mut parts = host_pub.split_whitespace();
        let (kt, kb) = (parts.next().unwrap(), parts.next().unwrap());
        std::fs::write(d.join("known_hosts"), format!("[127.0.0.1]:{port} {kt} {kb}\n")).unwrap();
        use base64::Engine;
        let host_key_b64 = base64::engine::general_purpose::STANDARD.encode(format!("{kt} {kb}"));
        Sshd {
            user_key: d.join("userkey"),
            known_hosts: d.join("known_hosts"),
            port,
            host_key_b64,
            child: Some(child),
            dir,
        }
    }

    /// `NIX_SSHOPTS` for Nix's own SSH store to reach this sshd.
    pub fn nix_sshopts(&self) -> String {
        format!(
            "-i {} -p {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o BatchMode=yes",
            self.user_key.display(),
            self.port,
            self.known_hosts.display()
        )
    }

    /// Stops the server (for tests of a builder that goes away).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Nix builder with its own chroot store (`local?root=…`) behind an sshd,
/// so that copying inputs and outputs is as real as to another machine.
pub struct Builder {
    pub root: PathBuf,
    pub wrapper: PathBuf,
    /// The machines-file line, exactly as Nix itself accepts it (no port:
    /// Nix 2.8 takes that from `NIX_SSHOPTS`).
    pub machines_line: String,
    /// The same line with the port in the URI, as Kiln also accepts.
    pub machines_line_with_port: String,
}

impl Builder {
    pub fn new(sshd: &Sshd, name: &str, max_jobs: u32) -> Builder {
        Self::with_nix_config(sshd, name, max_jobs, "substituters =")
    }

    /// A builder whose Nix also reads `nix_config` (its own substituters,
    /// say; `substituters =` gives it none).
    pub fn with_nix_config(sshd: &Sshd, name: &str, max_jobs: u32, nix_config: &str) -> Builder {
        let root = sshd.dir.path().join(name);
        std::fs::create_dir_all(&root).unwrap();
        let wrapper = sshd.dir.path().join(format!("{name}-nix-store"));
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexport NIX_CONFIG=\"sandbox-paths = /bin/sh=/bin/busybox\n{nix_config}\"\nexec nix-store \"$@\"\n"
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let query = format!("remote-store=local%3Froot%3D{}&remote-program={}", root.display(), wrapper.display());
        let rest = format!("{SYSTEM} {} {max_jobs} 1 - - {}", sshd.user_key.display(), sshd.host_key_b64);
        Builder {
            machines_line: format!("ssh://root@127.0.0.1?{query} {rest}"),
            machines_line_with_port: format!("ssh://root@127.0.0.1:{}?{query} {rest}", sshd.port),
            root,
            wrapper,
        }
    }

    /// Whether `store_path` is valid in this builder's store.
    pub fn has(&self, store_path: &str) -> bool {
        let store = format!("local?root={}", self.root.display());
        nix_cmd("nix-store")
            .args(["--store", &store, "--check-validity", store_path])
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

// ------------------------------------------------------------------ kiln

/// The real `kiln serve`, in its own working directory, on a free port.
pub struct Kiln {
    pub dir: TempDir,
    pub url: String,
    pub child: Child,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Kiln {
    /// Starts `kiln serve` with `config` as kiln.toml (empty: defaults) and
    /// extra environment; waits until it listens.
    pub fn start(config: &str, env: &[(&str, &str)]) -> Kiln {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("kiln.toml"), config).unwrap();
        Self::start_in(dir, env)
    }

    pub fn start_in(dir: TempDir, env: &[(&str, &str)]) -> Kiln {
        Self::start_with(dir, env, &[])
    }

    /// `kiln serve ARGS…` in `dir`.
    pub fn start_with(dir: TempDir, env: &[(&str, &str)], args: &[&str]) -> Kiln {
        let mut cmd = kiln_cmd();
        cmd.arg("serve").args(args).current_dir(dir.path()).env("KILN_LISTEN", "127.0.0.1:0");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().expect("kiln binary");
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(i) = line.find("listening on http://") {
                    let _ = tx.send(line[i + "listening on ".len()..].trim().to_string());
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                panic!("kiln serve did not start:\n{}", log.lock().unwrap());
            }
        };
        Kiln { dir, url, child, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "kiln did not exit after SIGTERM:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The results `kiln build --json` printed, one JSON object a line, by
/// job name; a line that is not JSON fails the test with Kiln's stderr.
pub fn build_results(out: &Output) -> std::collections::BTreeMap<String, serde_json::Value> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{stderr}"));
            (v["job"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

/// A command for the `kiln` binary under test, with the test Nix config.
/// The state of the step that builds `drv`, if there is one.
pub async fn step_state(db: &Db, drv: &str) -> Option<String> {
    let mut c = db.conn().await.unwrap();
    kiln::db::run!(c.ex(), c => sqlx::query_scalar("SELECT state FROM steps WHERE drv_path = $1")
        .bind(drv).fetch_optional(&mut *c).await.unwrap())
}

pub fn kiln_cmd() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.env("NIX_CONFIG", NIX_CONFIG).env_remove("KILN_CONFIG");
    c
}

// ------------------------------------------------------------------ HTTP

/// A small HTTP client for talking to `kiln serve` in tests.
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
    pub token: Option<String>,
}

impl Api {
    pub fn new(base: &str, token: Option<&str>) -> Api {
        Api { base: base.to_string(), client: reqwest::Client::new(), token: token.map(str::to_string) }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self
            .client
            .request(method, format!("{}{path}", self.base))
            .header("Accept", "application/json")
            .timeout(Duration::from_secs(30));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// GET as JSON: (status, body).
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self.req(reqwest::Method::GET, path).send().await.unwrap();
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn send(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        let mut r = self.req(method.parse().unwrap(), path);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.unwrap();
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(serde_json::Value::Null))
    }
}

/// Polls `check` until it returns `Some`, or panics after `secs` seconds.
pub async fn wait_for<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ------------------------------------------------------------------ Nix clients

/// A Nix client with its own cache directory, as on another machine: the
/// uploader's own narinfo cache would otherwise answer for the server.
pub struct NixClient {
    pub dir: TempDir,
}

impl Default for NixClient {
    fn default() -> Self {
        Self::new()
    }
}

impl NixClient {
    pub fn new() -> NixClient {
        NixClient { dir: tempfile::tempdir().unwrap() }
    }

    pub fn cmd(&self, program: &str) -> Command {
        let mut c = nix_cmd(program);
        c.env("XDG_CACHE_HOME", self.dir.path().join("cache")).env("HOME", self.dir.path());
        c
    }

    /// A fresh chroot store for this client to fill.
    pub fn store(&self, name: &str) -> (String, PathBuf) {
        let root = self.dir.path().join(name);
        (format!("local?root={}", root.display()), root)
    }

    /// A netrc file giving `password` for 127.0.0.1.
    pub fn netrc(&self, password: &str) -> PathBuf {
        let p = self.dir.path().join("netrc");
        std::fs::write(&p, format!("machine 127.0.0.1 login kiln password {password}\n")).unwrap();
        p
    }
}

/// Builds a small closure (top → two leaves) that no other test shares;
/// returns (top, every path of the closure).
pub fn build_closure(tag: &str) -> (String, Vec<String>) {
    let d = tempfile::tempdir().unwrap();
    let u = unique(tag);
    let expr = format!(
        "let a = {}; b = {}; in derivation {{ name = \"top-{tag}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; inherit a b; args = [\"-c\" \"echo $a $b > $out\"]; }}",
        drv_expr(&format!("leaf-a-{tag}"), &format!("echo a-{u} > $out")),
        drv_expr(&format!("leaf-b-{tag}"), &format!("echo b-{u} > $out"))
    );
    std::fs::write(d.path().join("e.nix"), expr).unwrap();
    let drv = nix("nix-instantiate", &[d.path().join("e.nix").to_str().unwrap()]);
    let top = nix("nix-store", &["-r", drv.trim()]).trim().to_string();
    let closure = nix("nix-store", &["-qR", &top]).lines().map(str::to_string).collect();
    (top, closure)
}

/// The schemathesis command: `SCHEMATHESIS` or the virtualenv that
/// `scripts/test` installs. Missing is a failure, not a skip.
pub fn schemathesis() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("SCHEMATHESIS") {
        return p.into();
    }
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/venv/bin/schemathesis");
    assert!(p.exists(), "schemathesis is not installed: run scripts/test, or set SCHEMATHESIS");
    p
}
