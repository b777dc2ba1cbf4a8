//! An environment as the default branch's `.kiln.toml` declares it: which
//! jobset's green evaluations it takes, its hosts (how to reach each, which
//! job is its closure, which profile it sets), the waves they are switched
//! in, and the health checks that decide whether a switch stands. Parsed
//! here with every error naming its key, and stored as JSON on the
//! environment's row, so a deployment runs on what was declared when it was
//! planned.
//!
//! ```toml
//! [environments.production]
//! jobset = "main"                     # whose green evaluations it takes
//! mode = "auto"                       # or "manual": waits for Promote
//! required_jobs = ["tests.vm"]        # must have succeeded too
//! waves = [["web1"], ["web2", "web3"]] # default: every host in one wave
//! bake_s = 60                         # wait between waves
//! on_failure = "halt"                 # or "rollback-all"
//! confirm_timeout_s = 30              # the host rolls itself back unless confirmed
//! health_checks = [{ command = "systemctl is-system-running --wait", timeout_s = 120 }]
//!
//! [environments.production.hosts.web1]
//! target = "ssh://root@web1.example.org"
//! host_key = "ssh-ed25519 AAAA…"      # pinned; default: known_hosts
//! job = "nixosConfigurations.web1"    # the job whose output is its closure
//! profile = "/nix/var/nix/profiles/system"
//! activate = "$KILN_PATH/bin/switch-to-configuration switch"
//!
//! [environments.production.hosts.laptop7]
//! pull = true                         # runs `kiln agent`; no target
//! job = "nixosConfigurations.laptop7"
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::valid_name;
use crate::repo_config::RepoConfigError;

pub const DEFAULT_PROFILE: &str = "/nix/var/nix/profiles/system";
pub const DEFAULT_ACTIVATE: &str = "$KILN_PATH/bin/switch-to-configuration switch";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Deploys each green evaluation.
    Auto,
    /// Plans each green evaluation, and waits for Promote.
    Manual,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Hosts of earlier waves keep the new closure.
    Halt,
    /// Hosts of earlier waves go back to their previous closure too.
    RollbackAll,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub command: String,
    #[serde(default = "d_check_timeout")]
    pub timeout_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// `ssh://[user@]host[:port]`; none for a pull host.
    #[serde(default)]
    pub target: Option<String>,
    /// The host runs `kiln agent`, which takes its closures from Kiln
    /// (for hosts Kiln cannot reach).
    #[serde(default)]
    pub pull: bool,
    /// A pinned host key line (`ssh-ed25519 AAAA…`); without it the
    /// coordinator's known_hosts must know the host.
    #[serde(default)]
    pub host_key: Option<String>,
    pub job: String,
    #[serde(default = "d_profile")]
    pub profile: String,
    /// A shell command run on the host with `KILN_PATH` (the closure) and
    /// `KILN_PROFILE` set; the same command with the previous closure
    /// rolls back.
    #[serde(default = "d_activate")]
    pub activate: String,
    /// Checks of this host alone, after the environment's.
    #[serde(default)]
    pub health_checks: Vec<HealthCheck>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    pub jobset: String,
    #[serde(default = "d_mode")]
    pub mode: Mode,
    #[serde(default)]
    pub required_jobs: Vec<String>,
    pub hosts: BTreeMap<String, Host>,
    /// Host names, canary first; filled in with one wave of every host
    /// when not declared.
    #[serde(default)]
    pub waves: Vec<Vec<String>>,
    #[serde(default)]
    pub bake_s: u64,
    #[serde(default = "d_on_failure")]
    pub on_failure: OnFailure,
    #[serde(default = "d_confirm")]
    pub confirm_timeout_s: u64,
    #[serde(default)]
    pub health_checks: Vec<HealthCheck>,
}

fn d_check_timeout() -> u64 {
    60
}
fn d_profile() -> String {
    DEFAULT_PROFILE.into()
}
fn d_activate() -> String {
    DEFAULT_ACTIVATE.into()
}
fn d_mode() -> Mode {
    Mode::Auto
}
fn d_on_failure() -> OnFailure {
    OnFailure::Halt
}
fn d_confirm() -> u64 {
    30
}

impl Environment {
    /// The checks a host runs: the environment's, then its own.
    pub fn checks_of(&self, host: &str) -> Vec<HealthCheck> {
        let mut c = self.health_checks.clone();
        if let Some(h) = self.hosts.get(host) {
            c.extend(h.health_checks.iter().cloned());
        }
        c
    }

    /// The wave a host is in, counted from 0.
    pub fn wave_of(&self, host: &str) -> Option<usize> {
        self.waves.iter().position(|w| w.iter().any(|h| h == host))
    }
}

/// Parses `[environments.NAME]` tables (already split out of the file);
/// `jobsets` are the jobsets the same file declares.
pub fn parse(
    tables: &BTreeMap<String, toml::Value>,
    jobsets: &[String],
) -> Result<BTreeMap<String, Environment>, RepoConfigError> {
    let mut out = BTreeMap::new();
    for (name, value) in tables {
        let key = |k: &str| format!("environments.{name}.{k}");
        let bad = |k: &str, reason: String| RepoConfigError::Key { key: key(k), reason };
        if !valid_name(name) {
            return Err(RepoConfigError::Key {
                key: format!("environments.{name}"),
                reason: "an environment name is letters, digits, '-', '_' or '.'".into(),
            });
        }
        let mut env: Environment = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
            let path = e.path().to_string();
            RepoConfigError::Key {
                key: if path == "." { format!("environments.{name}") } else { key(&path) },
                reason: e.into_inner().to_string(),
            }
        })?;
        if !jobsets.contains(&env.jobset) {
            return Err(bad("jobset", format!("{:?} is not a jobset this file declares", env.jobset)));
        }
        if env.hosts.is_empty() {
            return Err(bad("hosts", "declares no host".into()));
        }
        for (h, host) in &env.hosts {
            let hk = |k: &str| format!("hosts.{h}.{k}");
            if !valid_name(h) {
                return Err(bad(&format!("hosts.{h}"), "a host name is letters, digits, '-', '_' or '.'".into()));
            }
            match (&host.target, host.pull) {
                (Some(t), false) => {
                    target_parts(t).map_err(|r| bad(&hk("target"), r))?;
                }
                (None, true) => {}
                (Some(_), true) => {
                    return Err(bad(
                        &hk("target"),
                        "a pull host (pull = true) has no target: its agent connects to Kiln".into(),
                    ));
                }
                (None, false) => {
                    return Err(bad(
                        &hk("target"),
                        "missing: ssh://[user@]host[:port], or pull = true for a host running kiln agent".into(),
                    ));
                }
            }
            if host.job.is_empty() {
                return Err(bad(&hk("job"), "must name a job of the jobset".into()));
            }
            if !host.profile.starts_with('/') || host.profile.contains(['\'', '\n']) {
                return Err(bad(&hk("profile"), format!("{:?} must be an absolute path", host.profile)));
            }
            if host.activate.trim().is_empty() {
                return Err(bad(&hk("activate"), "must not be empty".into()));
            }
            if let Some(k) = &host.host_key
                && k.split_whitespace().count() < 2
            {
                return Err(bad(&hk("host_key"), "must be a public key line, `ssh-ed25519 AAAA…`".into()));
            }
            check_checks(&host.health_checks).map_err(|r| bad(&hk("health_checks"), r))?;
        }
        check_checks(&env.health_checks).map_err(|r| bad("health_checks", r))?;
        if env.waves.is_empty() {
            env.waves = vec![env.hosts.keys().cloned().collect()];
        }
        let mut seen = std::collections::HashSet::new();
        for w in &env.waves {
            if w.is_empty() {
                return Err(bad("waves", "a wave must name at least one host".into()));
            }
            for h in w {
                if !env.hosts.contains_key(h) {
                    return Err(bad("waves", format!("{h:?} is not one of this environment's hosts")));
                }
                if !seen.insert(h.clone()) {
                    return Err(bad("waves", format!("{h:?} is in more than one wave")));
                }
            }
        }
        if let Some(h) = env.hosts.keys().find(|h| !seen.contains(*h)) {
            return Err(bad("waves", format!("host {h:?} is in no wave")));
        }
        if env.confirm_timeout_s == 0 {
            return Err(bad("confirm_timeout_s", "must be at least 1".into()));
        }
        out.insert(name.clone(), env);
    }
    Ok(out)
}

fn check_checks(checks: &[HealthCheck]) -> Result<(), String> {
    for c in checks {
        if c.command.trim().is_empty() {
            return Err("a check's command must not be empty".into());
        }
        if c.timeout_s == 0 {
            return Err("a check's timeout_s must be at least 1".into());
        }
    }
    Ok(())
}

/// `(user, host, port)` of an `ssh://[user@]host[:port]` target.
pub fn target_parts(target: &str) -> Result<(Option<String>, String, Option<u16>), String> {
    let rest = target
        .strip_prefix("ssh://")
        .ok_or_else(|| format!("{target:?} must be ssh://[user@]host[:port] (push over SSH)"))?;
    if rest.contains(['/', '?', ' ', '\'', '"']) {
        return Err(format!("{target:?} must be ssh://[user@]host[:port], without a path or settings"));
    }
    let (user, hostport) = match rest.rsplit_once('@') {
        Some((u, h)) if !u.is_empty() => (Some(u.to_string()), h),
        Some(_) => return Err(format!("{target:?} has an empty user")),
        None => (None, rest),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !hostport.starts_with('[') => {
            (h.to_string(), Some(p.parse::<u16>().map_err(|_| format!("{target:?} has a bad port {p:?}"))?))
        }
        _ => (hostport.to_string(), None),
    };
    if host.is_empty() || host.starts_with('-') {
        return Err(format!("{target:?} names no host"));
    }
    Ok((user, host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(t: &str) -> Result<BTreeMap<String, Environment>, RepoConfigError> {
        let v: toml::Table = t.parse().unwrap();
        let tables: BTreeMap<String, toml::Value> =
            v.get("environments").unwrap().as_table().unwrap().clone().into_iter().collect();
        parse(&tables, &["main".to_string()])
    }

    const OK: &str = r#"
[environments.prod]
jobset = "main"
waves = [["a"], ["b", "c"]]
health_checks = [{ command = "true" }]
[environments.prod.hosts.a]
target = "ssh://root@a:2222"
job = "hosts.a"
[environments.prod.hosts.b]
target = "ssh://b"
job = "hosts.b"
health_checks = [{ command = "curl -fs localhost", timeout_s = 5 }]
[environments.prod.hosts.c]
target = "ssh://root@c"
job = "hosts.c"
profile = "/nix/var/nix/profiles/per-user/root/app"
activate = "$KILN_PATH/activate"
"#;

    #[test]
    fn parses_an_environment_with_defaults() {
        let envs = parse_text(OK).unwrap();
        let e = &envs["prod"];
        assert_eq!(e.mode, Mode::Auto);
        assert_eq!(e.on_failure, OnFailure::Halt);
        assert_eq!((e.bake_s, e.confirm_timeout_s), (0, 30));
        assert_eq!(e.waves, vec![vec!["a".to_string()], vec!["b".into(), "c".into()]]);
        assert_eq!(e.hosts["a"].profile, DEFAULT_PROFILE);
        assert_eq!(e.hosts["c"].activate, "$KILN_PATH/activate");
        assert_eq!(e.checks_of("b").len(), 2);
        assert_eq!(e.checks_of("a")[0].timeout_s, 60);
        assert_eq!(e.wave_of("c"), Some(1));
        assert_eq!(target_parts("ssh://root@a:2222").unwrap(), (Some("root".into()), "a".into(), Some(2222)));
        // Without waves: every host in one.
        let one = parse_text(&OK.replace("waves = [[\"a\"], [\"b\", \"c\"]]\n", "")).unwrap();
        assert_eq!(one["prod"].waves, vec![vec!["a".to_string(), "b".into(), "c".into()]]);
    }

    #[test]
    fn errors_name_the_key() {
        let err = |from: &str, to: &str| {
            assert!(OK.contains(from), "{from}");
            parse_text(&OK.replacen(from, to, 1)).unwrap_err().to_string()
        };
        assert!(err("jobset = \"main\"", "jobset = \"main\"\nbake = 3").contains("environments.prod"));
        assert!(err("jobset = \"main\"", "jobset = \"main\"\nbake = 3").contains("bake"));
        assert!(err("job = \"hosts.b\"", "job = \"hosts.b\"\nprofil = \"/x\"").contains("hosts.b"));
        assert!(err("job = \"hosts.b\"", "job = \"hosts.b\"\nprofil = \"/x\"").contains("profil"));
        assert!(err("jobset = \"main\"", "jobset = \"nightly\"").contains("environments.prod.jobset"));
        assert!(err("[\"b\", \"c\"]", "[\"b\"]").contains("environments.prod.waves"));
        assert!(err("[\"b\", \"c\"]", "[\"b\", \"d\"]").contains("\"d\""));
        assert!(err("ssh://b", "http://b").contains("environments.prod.hosts.b.target"));
        assert!(err("root@a:2222", "root@a:x").contains("port"));
        assert!(err("jobset = \"main\"", "jobset = \"main\"\nmode = \"sometimes\"").contains("mode"));
        assert!(err("{ command = \"true\" }", "{ command = \"\" }").contains("environments.prod.health_checks"));
        assert!(err("jobset = \"main\"", "jobset = \"main\"\nconfirm_timeout_s = 0").contains("confirm_timeout_s"));
        // A pull host has no target; a push host needs one.
        assert!(err("target = \"ssh://b\"", "pull = true\ntarget = \"ssh://b\"").contains("hosts.b.target"));
        assert!(err("target = \"ssh://b\"\n", "").contains("hosts.b.target"));
        let pull = parse_text(&OK.replace("target = \"ssh://b\"", "pull = true")).unwrap();
        assert!(pull["prod"].hosts["b"].pull && pull["prod"].hosts["b"].target.is_none());
    }
}
