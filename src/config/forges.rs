//! The forges' settings: `[github]` (a token or an App, statuses or
//! checks) and `[[forges]]` (Gitea and Forgejo hosts), with their checks.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError, read_secret, valid_name};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum StatusMode {
    #[default]
    PerJob,
    Failures,
    Summary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GithubConfig {
    pub api_url: String,
    pub token_file: Option<PathBuf>,
    pub webhook_secret_file: Option<PathBuf>,
    pub statuses: StatusMode,
    /// With `statuses = "per-job"`: beyond this many jobs in an
    /// evaluation, only the summary and failed jobs get statuses.
    pub max_job_statuses: usize,
    /// A GitHub App instead of a token: its id, its private key (PEM) and,
    /// optionally, its installation (else looked up per repository).
    pub app_id: Option<u64>,
    pub app_private_key_file: Option<PathBuf>,
    pub app_installation_id: Option<u64>,
    /// Longest wait for GitHub to connect, take a request or answer one;
    /// a status delivery as a whole gives up after this long too.
    pub timeout_s: u64,
    /// Report through the Checks API (check runs with Re-run and
    /// annotations) instead of commit statuses. Default: with an App, yes
    /// (GitHub lets only Apps write check runs); with a token, no.
    pub checks: Option<bool>,
}

impl Default for GithubConfig {
    fn default() -> Self {
        GithubConfig {
            api_url: "https://api.github.com".to_string(),
            token_file: None,
            webhook_secret_file: None,
            statuses: StatusMode::PerJob,
            max_job_statuses: 50,
            app_id: None,
            app_private_key_file: None,
            app_installation_id: None,
            timeout_s: 30,
            checks: None,
        }
    }
}

/// A Gitea or Forgejo host. A project whose `repo` URL starts with its
/// `url` is on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForgeConfig {
    pub name: String,
    /// `gitea` or `forgejo` (the same API).
    #[serde(default = "d_gitea")]
    pub kind: String,
    /// Its web address, e.g. `https://codeberg.org`.
    pub url: String,
    /// A token with read access to the repositories and write access to
    /// their commit statuses.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub webhook_secret_file: Option<PathBuf>,
    #[serde(default = "d_forge_timeout")]
    pub timeout_s: u64,
}

fn d_gitea() -> String {
    "gitea".into()
}
fn d_forge_timeout() -> u64 {
    30
}

impl Config {
    /// Checks `[github]` and `[[forges]]`: their secrets readable, their
    /// URLs and names sound.
    pub(super) fn validate_forges(&self, origin: &str) -> Result<(), ConfigError> {
        if let Some(gh) = &self.github {
            for (key, f) in [
                ("github.token_file", &gh.token_file),
                ("github.webhook_secret_file", &gh.webhook_secret_file),
                ("github.app_private_key_file", &gh.app_private_key_file),
            ] {
                if let Some(f) = f {
                    read_secret(f).map_err(|reason| ConfigError::key(origin, key, reason))?;
                }
            }
        }
        if let Some(gh) = &self.github {
            if gh.checks == Some(true) && gh.app_id.is_none() {
                return Err(ConfigError::key(origin, "github.checks", "check runs need a GitHub App (app_id)"));
            }
            if gh.app_id.is_some() != gh.app_private_key_file.is_some() {
                return Err(ConfigError::key(origin, "github.app_id", "needs github.app_private_key_file, and back"));
            }
            if !(gh.api_url.starts_with("https://") || gh.api_url.starts_with("http://")) {
                return Err(ConfigError::key(origin, "github.api_url", "must be an http:// or https:// URL"));
            }
            if gh.timeout_s == 0 {
                return Err(ConfigError::key(origin, "github.timeout_s", "must be at least 1 s"));
            }
        }
        let mut forge_names = std::collections::HashSet::new();
        for (i, f) in self.forges.iter().enumerate() {
            let key = |k: &str| format!("forges[{i}].{k}");
            if !valid_name(&f.name) || !forge_names.insert(f.name.as_str()) {
                return Err(ConfigError::key(
                    origin,
                    &key("name"),
                    format!("{:?}: a unique name of letters, digits, '-', '_' or '.'", f.name),
                ));
            }
            if !matches!(f.kind.as_str(), "gitea" | "forgejo") {
                return Err(ConfigError::key(origin, &key("kind"), format!("{:?}: \"gitea\" or \"forgejo\"", f.kind)));
            }
            if !(f.url.starts_with("https://") || f.url.starts_with("http://"))
                || f.url.trim_end_matches('/').matches('/').count() != 2
            {
                return Err(ConfigError::key(
                    origin,
                    &key("url"),
                    format!("{:?}: the host's address, like https://codeberg.org", f.url),
                ));
            }
            if f.timeout_s == 0 {
                return Err(ConfigError::key(origin, &key("timeout_s"), "must be at least 1 s"));
            }
            for (k, file) in [("token_file", &f.token_file), ("webhook_secret_file", &f.webhook_secret_file)] {
                if let Some(file) = file {
                    read_secret(file).map_err(|reason| ConfigError::key(origin, &key(k), reason))?;
                }
            }
        }
        Ok(())
    }
}
