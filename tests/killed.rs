//! A killed Kiln loses nothing, at scale (issue 14, item 12): a DAG of
//! 200 steps built on two SSH builders while `kiln serve` is killed with
//! SIGKILL at random moments five times and started again. At the end
//! every build finished once and succeeded, the cache holds a signed,
//! readable copy of every output (a real Nix client copies them all,
//! checking signatures and hashes), GitHub (the stand-in) got every job's
//! final status, and no derivation was built again except those in flight
//! when Kiln died.
//!
//! The kill times come from a seed printed at the start; set
//! `KILN_KILL_SEED` to replay one.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::github::*;
use support::*;

const WIDTH: usize = 20;
const LAYERS: usize = 10;
const KILLS: usize = 5;

/// A flake of `LAYERS` layers of `WIDTH` derivations, each needing two of
/// the layer below; every derivation is a job. Each build appends its name
/// to `runs`, which the builders' sandboxes let them write.
fn dag_flake(tag: &str, runs: &std::path::Path) -> Flake {
    let mut lets = String::new();
    let mut names = Vec::new();
    for l in 0..LAYERS {
        for i in 0..WIDTH {
            let deps = if l == 0 {
                String::new()
            } else {
                format!("a = n{}_{}; b = n{}_{};", l - 1, i, l - 1, (i + 1) % WIDTH)
            };
            lets.push_str(&format!("  n{l}_{i} = mk \"n{l}_{i}-{tag}\" {{ {deps} }};\n"));
            names.push(format!("n{l}_{i}"));
        }
    }
    let flake = format!(
        r#"{{ outputs = _: let
  mk = name: deps: derivation ({{
    inherit name; system = "{SYSTEM}"; builder = "/bin/sh"; PATH = "/bin";
    args = [ "-c" "echo ${{name}} >> {runs} || exit 1; sleep 0.1; echo ${{toString (builtins.attrValues deps)}} > $out" ];
  }} // deps);
{lets}in {{ hydraJobs = {{ inherit {}; }}; }}; }}"#,
        names.join(" "),
        runs = runs.display()
    );
    Flake::new(&flake, &[(".kiln.toml", "[jobsets.main]\ncheck_interval = 0\n")])
}

/// xorshift64*: enough randomness for kill times, replayable from a seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Milliseconds in `lo..hi`.
    fn between(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo))
    }
}

async fn sqlite(dir: &std::path::Path) -> sqlx::SqlitePool {
    let url = format!("sqlite://{}?mode=ro", dir.join("kiln-state/kiln.db").display());
    sqlx::SqlitePool::connect(&url).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_five_times_mid_dag_every_build_finishes_once_and_cache_and_github_agree() {
    let seed: u64 = std::env::var("KILN_KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("kill seed: {seed} (KILN_KILL_SEED={seed} replays it)");
    let mut rng = Rng(seed);

    let sshd = Sshd::start();
    let seen = tempfile::tempdir().unwrap();
    // Builds run as one of Nix's build users.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(seen.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let runs = seen.path().join("runs");
    // Each build appends as a different build user.
    std::fs::write(&runs, "").unwrap();
    std::fs::set_permissions(&runs, std::fs::Permissions::from_mode(0o666)).unwrap();
    let extra = format!("substituters =\nextra-sandbox-paths = {}", seen.path().display());
    let builders = [Builder::with_nix_config(&sshd, "b0", 2, &extra), Builder::with_nix_config(&sshd, "b1", 2, &extra)];
    let tag = unique("dag");
    let flake = dag_flake(&tag, &runs);
    let sha = git(flake.path(), &["rev-parse", "HEAD"]).trim().to_string();

    let fake = Fake::start().await;
    // A status for every job, not only failures as beyond 50 jobs.
    let dir = kiln_dir(&fake.url, flake.path(), "token_file = \"gh-token\"\nmax_job_statuses = 500");
    let machines = dir.path().join("machines");
    std::fs::write(
        &machines,
        format!("{}\n{}\n", builders[0].machines_line_with_port, builders[1].machines_line_with_port),
    )
    .unwrap();
    let text = std::fs::read_to_string(dir.path().join("kiln.toml")).unwrap();
    std::fs::write(dir.path().join("kiln.toml"), format!("machines_file = \"machines\"\n{text}")).unwrap();

    let started = Instant::now();
    let mut kiln = Kiln::start_in(dir, &[]);
    let mut logs = Vec::new();
    // Killed only once building has begun, then at random moments.
    wait_for(120, "the first steps to build", || async {
        (std::fs::read_to_string(&runs).unwrap_or_default().lines().count() >= 4).then_some(())
    })
    .await;
    for k in 0..KILLS {
        tokio::time::sleep(rng.between(300, 2000)).await;
        let built = std::fs::read_to_string(&runs).unwrap_or_default().lines().count();
        kiln.child.kill().unwrap();
        kiln.child.wait().unwrap();
        eprintln!("kill {} at {:?}: {built} builds had run", k + 1, started.elapsed());
        logs.push(kiln.log());
        let dir = std::mem::replace(&mut kiln.dir, tempfile::tempdir().unwrap());
        kiln = Kiln::start_in(dir, &[]);
    }

    let db = sqlite(kiln.dir.path()).await;
    let total = WIDTH * LAYERS;
    wait_for(300, "every build to finish", || async {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM builds WHERE finished").fetch_one(&db).await.ok()?;
        (n as usize >= total).then_some(())
    })
    .await;
    eprintln!("all {total} builds finished after {:?}", started.elapsed());
    logs.push(kiln.log());

    // Every job has exactly one build, finished and succeeded.
    let rows: Vec<(String, bool, Option<i64>, Option<String>)> =
        sqlx::query_as("SELECT job, finished, build_status, error FROM builds").fetch_all(&db).await.unwrap();
    assert_eq!(rows.len(), total, "one build per job");
    let bad: Vec<_> = rows.iter().filter(|r| !r.1 || r.2 != Some(0)).collect();
    assert!(
        bad.is_empty(),
        "{} builds did not succeed, among them {:?}\n{}",
        bad.len(),
        &bad[..bad.len().min(3)],
        logs.join("\n----\n")
    );
    // One step per derivation, succeeded, none left running or queued.
    let states: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, COUNT(*) FROM steps GROUP BY state").fetch_all(&db).await.unwrap();
    assert_eq!(states, vec![("succeeded".to_string(), total as i64)], "steps by state");

    // Built once each, except steps in flight when Kiln died (whose
    // builders may have been interrupted with it).
    let text = std::fs::read_to_string(&runs).unwrap();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for l in text.lines() {
        *counts.entry(l).or_default() += 1;
    }
    assert_eq!(counts.len(), total, "every derivation was built");
    let again: usize = counts.values().map(|n| n - 1).sum();
    eprintln!("derivations built more than once: {again} (of {total}, {KILLS} kills, 4 builder slots)");
    assert!(again <= KILLS * 4, "{again} builds repeated: more than were in flight at the kills");

    // The cache and the database agree: a real Nix client copies every
    // output from Kiln's cache, checking each signature and NAR hash.
    let outputs: Vec<String> = sqlx::query_scalar(
        "SELECT o.path FROM build_outputs o JOIN builds b ON b.id = o.build_id WHERE b.build_status = 0",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(outputs.len(), total);
    let key = std::fs::read_to_string(kiln.dir.path().join("kiln-state/keys/cache.pub")).unwrap();
    let client = NixClient::new();
    let (store, _) = client.store("copy");
    let mut args = vec!["copy", "--from", &kiln.url, "--to", &store, "--option", "trusted-public-keys", key.trim()];
    args.extend(outputs.iter().map(String::as_str));
    let out = client.cmd("nix").args(&args).output().unwrap();
    assert!(out.status.success(), "nix copy from the cache: {}", String::from_utf8_lossy(&out.stderr));

    // GitHub got each job's final status and the summary's; a status may
    // come twice only when Kiln died between sending it and noting so.
    wait_states(&fake, &kiln, &sha, &[("kiln/main", "success")], 60).await;
    let mut repeated = 0;
    for (job, _, _, _) in &rows {
        let context = format!("kiln/main/{job}");
        let accepted = fake.accepted(&sha, &context);
        assert_eq!(accepted.last().map(|p| p.state.as_str()), Some("success"), "{context}: {accepted:?}");
        repeated += accepted.iter().filter(|p| p.state == "success").count() - 1;
    }
    eprintln!("final statuses sent twice: {repeated}");
    assert!(repeated <= KILLS, "{repeated} final statuses repeated with {KILLS} kills");
    fake.assert_valid();
}
