//! The repository's own configuration, `.kiln.toml` at the top of its
//! default branch: which jobsets to evaluate and how. It is always read from
//! the default branch, so a branch or pull request cannot change how it is
//! itself built. Without the file, one jobset `main` follows the default
//! branch and evaluates `hydraJobs` if the flake has it, else `checks`.
//!
//! ```toml
//! [jobsets.main]
//! branch = "main"                  # default: the repository's default branch
//! attributes = ["hydraJobs"]       # flake outputs to evaluate
//! systems = ["x86_64-linux"]       # keep only these (default: all)
//! flake_dir = ""                   # flake in a subdirectory
//! check_interval = 300             # seconds; 0: only on push or webhook
//! scheduling_shares = 100
//! keep_evaluations = 3
//! enabled = true
//!
//! [jobsets.pulls]
//! pull_requests = true             # one jobset per open pull request
//! attributes = ["checks"]
//! # whose pull requests are built without approval (GitHub's
//! # author_association); others wait for a maintainer's approval
//! trusted_associations = ["OWNER", "MEMBER", "COLLABORATOR"]
//! approve_each_push = false        # true: every new push waits again
//!
//! [jobsets.queue]
//! merge_queue = true               # one jobset per merge group (gh-readonly-queue/*),
//!                                  # reported as kiln/queue on the group's commit
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::valid_name;
use crate::db::jobsets::JobsetSpec;

pub const FILE: &str = ".kiln.toml";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RepoConfigError {
    #[error("{FILE}: {0}")]
    Invalid(String),
    #[error("{FILE}: key `{key}`: {reason}")]
    Key { key: String, reason: String },
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    jobsets: BTreeMap<String, JobsetFile>,
    /// Checked by `deploy::spec`, which names keys below the environment.
    #[serde(default)]
    environments: BTreeMap<String, toml::Value>,
}

/// What a repository's `.kiln.toml` declares.
#[derive(Debug, Clone, PartialEq)]
pub struct Declared {
    pub jobsets: Vec<JobsetSpec>,
    pub environments: BTreeMap<String, crate::deploy::spec::Environment>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct JobsetFile {
    branch: Option<String>,
    #[serde(default)]
    pull_requests: bool,
    attributes: Option<Vec<String>>,
    #[serde(default)]
    systems: Vec<String>,
    #[serde(default)]
    flake_dir: String,
    #[serde(default = "d_interval")]
    check_interval: i64,
    #[serde(default = "d_shares")]
    scheduling_shares: i64,
    #[serde(default = "d_keep")]
    keep_evaluations: i64,
    #[serde(default = "d_true")]
    enabled: bool,
    trusted_associations: Option<Vec<String>>,
    #[serde(default)]
    approve_each_push: bool,
    #[serde(default)]
    merge_queue: bool,
}

fn d_interval() -> i64 {
    300
}
fn d_shares() -> i64 {
    100
}
fn d_keep() -> i64 {
    3
}
fn d_true() -> bool {
    true
}

/// What a repository without `.kiln.toml` has: one jobset, no environment.
pub fn defaults() -> Declared {
    let mut spec = JobsetSpec::new("main");
    // Empty: hydraJobs if the flake has it, else checks.
    spec.attributes = Vec::new();
    spec.config_hash = hash_spec(&spec);
    Declared { jobsets: vec![spec], environments: BTreeMap::new() }
}

pub fn parse(text: &str) -> Result<Declared, RepoConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| RepoConfigError::Invalid(e.to_string()))?;
    let file: File = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let key = e.path().to_string();
        RepoConfigError::Key { key, reason: e.into_inner().to_string() }
    })?;
    if file.jobsets.is_empty() {
        return Err(RepoConfigError::Invalid("declares no [jobsets.NAME]".into()));
    }
    let names: Vec<String> = file.jobsets.keys().cloned().collect();
    let environments = crate::deploy::spec::parse(&file.environments, &names)?;
    let mut out = Vec::new();
    for (name, j) in file.jobsets {
        let key = |k: &str| format!("jobsets.{name}.{k}");
        let bad = |k: &str, reason: String| RepoConfigError::Key { key: key(k), reason };
        if !valid_name(&name) {
            return Err(RepoConfigError::Key {
                key: format!("jobsets.{name}"),
                reason: "a jobset name is letters, digits, '-', '_' or '.'".into(),
            });
        }
        if j.pull_requests && j.branch.is_some() {
            return Err(bad("branch", "a pull_requests jobset follows pull requests, not a branch".into()));
        }
        if let Some(b) = &j.branch
            && (b.is_empty()
                || b.starts_with('-')
                || b.contains("..")
                || b.contains(|c: char| c.is_whitespace() || "~^:?*[\\".contains(c)))
        {
            return Err(bad("branch", format!("{b:?} is not a valid branch name")));
        }
        let attributes = j.attributes.unwrap_or_else(|| vec!["hydraJobs".into()]);
        if attributes.is_empty() {
            return Err(bad("attributes", "must name at least one flake output".into()));
        }
        for a in &attributes {
            if a.is_empty() || !a.chars().all(|c| c.is_ascii_alphanumeric() || "_-'.".contains(c)) {
                return Err(bad("attributes", format!("{a:?} is not a flake output attribute")));
            }
        }
        if j.flake_dir.starts_with('/')
            || j.flake_dir.split('/').any(|c| c == "..")
            || j.flake_dir.contains(['?', '&', '#'])
        {
            return Err(bad("flake_dir", format!("{:?} must be a relative path inside the repository", j.flake_dir)));
        }
        if j.merge_queue && (j.pull_requests || j.branch.is_some()) {
            let k = if j.pull_requests { "pull_requests" } else { "branch" };
            return Err(bad(k, "a merge_queue jobset follows merge groups, not pull requests or a branch".into()));
        }
        if !j.pull_requests && (j.trusted_associations.is_some() || j.approve_each_push) {
            let k = if j.approve_each_push { "approve_each_push" } else { "trusted_associations" };
            return Err(bad(k, "only a pull_requests jobset has an approval gate".into()));
        }
        let trusted = j.trusted_associations.unwrap_or_else(crate::db::jobsets::default_trusted);
        for a in &trusted {
            if !crate::db::jobsets::ASSOCIATIONS.contains(&a.as_str()) {
                let known = crate::db::jobsets::ASSOCIATIONS.join(", ");
                return Err(bad("trusted_associations", format!("{a:?} is not one of GitHub's: {known}")));
            }
        }
        if j.check_interval < 0 {
            return Err(bad("check_interval", "must not be negative".into()));
        }
        if j.scheduling_shares < 1 {
            return Err(bad("scheduling_shares", "must be at least 1".into()));
        }
        if j.keep_evaluations < 1 {
            return Err(bad("keep_evaluations", "must be at least 1".into()));
        }
        let mut spec = JobsetSpec {
            name,
            branch: j.branch,
            pr_number: None,
            flake_dir: j.flake_dir.trim_matches('/').to_string(),
            attributes,
            systems: j.systems,
            check_interval: j.check_interval,
            scheduling_shares: j.scheduling_shares,
            keep_evaluations: j.keep_evaluations,
            enabled: j.enabled,
            pull_requests: j.pull_requests,
            config_hash: String::new(),
            trusted_associations: trusted,
            approve_each_push: j.approve_each_push,
            merge_queue: j.merge_queue,
            report_as: None,
            template: None,
        };
        spec.config_hash = hash_spec(&spec);
        out.push(spec);
    }
    Ok(Declared { jobsets: out, environments })
}

/// A hash of what changes an evaluation's result (not its schedule), so an
/// unchanged commit and configuration is not evaluated again.
fn hash_spec(s: &JobsetSpec) -> String {
    let text = serde_json::json!({
        "branch": s.branch, "pr": s.pull_requests, "attributes": s.attributes,
        "systems": s.systems, "flake_dir": s.flake_dir,
    })
    .to_string();
    crate::nix::Hash::sha256(text.as_bytes()).to_hex()[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_jobsets_with_defaults() {
        let d = parse("[jobsets.main]\n[jobsets.pulls]\npull_requests = true\nattributes = [\"checks\", \"packages\"]\nsystems = [\"x86_64-linux\"]\ncheck_interval = 0\n").unwrap().jobsets;
        assert_eq!(d.len(), 2);
        let main = &d[0];
        assert_eq!(
            (main.name.as_str(), main.branch.as_deref(), main.attributes.as_slice()),
            ("main", None, &["hydraJobs".to_string()][..])
        );
        assert_eq!((main.check_interval, main.scheduling_shares, main.keep_evaluations), (300, 100, 3));
        assert!(d[1].pull_requests);
        assert_eq!(d[1].attributes, ["checks", "packages"]);
        assert_ne!(d[0].config_hash, d[1].config_hash);
        assert_eq!(defaults().jobsets[0].attributes, Vec::<String>::new());
    }

    #[test]
    fn invalid_files_name_the_key() {
        let err = |t: &str| parse(t).unwrap_err().to_string();
        assert!(err("[jobsets.main]\nbrnach = \"x\"\n").contains("brnach"));
        assert!(err("[jobsets.main]\ncheck_interval = \"soon\"\n").contains("jobsets.main.check_interval"));
        assert!(err("[jobsets.main]\nbranch = \"a..b\"\n").contains("jobsets.main.branch"));
        assert!(err("[jobsets.main]\nflake_dir = \"../x\"\n").contains("flake_dir"));
        assert!(err("[jobsets.main]\nattributes = []\n").contains("attributes"));
        assert!(err("[jobsets.\"a b\"]\n").contains("jobsets.a b"));
        assert!(err("[jobsets.p]\npull_requests = true\nbranch = \"x\"\n").contains("branch"));
        assert!(err("[jobsets.p]\npull_requests = true\ntrusted_associations = [\"owner\"]\n").contains("OWNER"));
        assert!(err("[jobsets.m]\napprove_each_push = true\n").contains("approve_each_push"));
        assert!(err("[jobsets.q]\nmerge_queue = true\nbranch = \"main\"\n").contains("jobsets.q.branch"));
        assert!(err("jobsets = 3").contains("jobsets"));
        assert!(err("[[[").contains(".kiln.toml"));
        assert!(err("").contains("no [jobsets"));
        assert!(err("[jobsets.main]\n[environments.prod]\njobset = \"main\"\n").contains("environments.prod"));
    }
}
