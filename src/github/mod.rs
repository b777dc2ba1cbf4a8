//! GitHub: the webhooks that start evaluations, the commit statuses that
//! report them, and the credentials both use. Statuses are composed in the
//! transaction of the state change that calls for them ([`statuses`]) and
//! land in the outbox; [`sender`] delivers them through octocrab, in order
//! per commit and context, through retries, rate limits and restarts.
//! [`webhook`] verifies and handles what GitHub sends. Credentials are a
//! token read from a file or a GitHub App's installation tokens
//! ([`Credentials`]); they never reach logs, the database or git's config.

pub mod checks;
pub mod deployments;
pub mod sender;
pub mod statuses;
pub mod webhook;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use octocrab::Octocrab;
use thiserror::Error;

use crate::config::{Config, GithubConfig};
use crate::db::projects::Project;

#[derive(Debug, Error)]
pub enum GithubError {
    #[error("{what}: {reason}")]
    Secret { what: &'static str, reason: String },
    #[error("github.app_private_key_file: not an RSA private key in PEM: {0}")]
    BadKey(String),
    #[error("GitHub client: {0}")]
    Client(String),
    #[error("no GitHub App installation for {0}: is the app installed on it?")]
    NoInstallation(String),
}

/// A GitHub repository, `owner/name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Repo {
    pub owner: String,
    pub name: String,
}

impl Repo {
    /// `owner/name`, as configured.
    pub fn parse(s: &str) -> Option<Repo> {
        let (owner, name) = s.trim().trim_end_matches('/').split_once('/')?;
        let name = name.strip_suffix(".git").unwrap_or(name);
        let ok = |p: &str| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
                && p != ".."
        };
        (ok(owner) && ok(name)).then(|| Repo { owner: owner.to_string(), name: name.to_string() })
    }

    /// The repository of a github.com URL: `https://github.com/o/n(.git)`,
    /// `git@github.com:o/n.git`, `ssh://git@github.com/o/n`.
    pub fn from_url(url: &str) -> Option<Repo> {
        let rest = [
            "https://github.com/",
            "http://github.com/",
            "ssh://git@github.com/",
            "git@github.com:",
            "git+https://github.com/",
        ]
        .iter()
        .find_map(|p| url.strip_prefix(p))?;
        Repo::parse(rest)
    }

    pub fn full_name(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }

    /// Case-insensitively the same repository (GitHub's names are).
    pub fn same(&self, full_name: &str) -> bool {
        self.full_name().eq_ignore_ascii_case(full_name)
    }
}

/// Where a project's statuses go: its `github` setting, else its URL.
pub fn repo_of(p: &Project) -> Option<Repo> {
    match &p.github_repo {
        Some(r) => Repo::parse(r),
        None => Repo::from_url(&p.repo),
    }
}

/// The host of an `http(s)://` URL.
fn host_of(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = authority.rsplit('@').next()?;
    Some(host.split(':').next().unwrap_or(host))
}

/// Whether git may send GitHub credentials to `repo_url`: over HTTP(S)
/// to github.com or to the host of the configured API (GitHub Enterprise),
/// and nowhere else, whatever a project's settings say.
pub fn may_send_token(repo_url: &str, api_url: &str) -> bool {
    match (host_of(repo_url), host_of(api_url)) {
        (Some(h), Some(api)) => {
            let h = h.to_ascii_lowercase();
            h == "github.com" || h == api.to_ascii_lowercase()
        }
        _ => false,
    }
}

/// The status policy of a configuration, if GitHub is configured.
pub fn policy(config: &Config) -> Option<statuses::Policy> {
    if config.github.is_none() && config.forges.is_empty() {
        return None;
    }
    let gh = config.github.clone().unwrap_or_default();
    Some(statuses::Policy {
        base_url: config.base_url(),
        mode: gh.statuses,
        max_job_statuses: gh.max_job_statuses,
        checks: config.github.is_some() && gh.checks.unwrap_or(gh.app_id.is_some()),
        app_id: gh.app_id,
        github: config.github.is_some(),
        forges: config.forges.iter().map(crate::forge::ForgeRef::of).collect(),
    })
}

/// A one-line secret (token, webhook secret), read as every secret file is.
pub(crate) fn read_secret(what: &'static str, path: &Path) -> Result<String, GithubError> {
    crate::config::read_secret(path).map_err(|reason| GithubError::Secret { what, reason })
}

/// The App's private key: the whole PEM file, not its first line.
fn read_key(path: &Path) -> Result<String, GithubError> {
    std::fs::read_to_string(path).map_err(|e| GithubError::Secret {
        what: "github.app_private_key_file",
        reason: format!("cannot read {}: {e}", path.display()),
    })
}

/// How Kiln authenticates to GitHub: a token, or an App's installations.
#[derive(Clone)]
pub struct Credentials {
    inner: Arc<Inner>,
    timeout: Duration,
}

type GitTokens = std::collections::HashMap<String, (String, chrono::DateTime<chrono::Utc>)>;

enum Inner {
    Token {
        client: Octocrab,
        token: String,
    },
    App {
        app: Octocrab,
        installation: Option<u64>,
        /// Installation clients by repository, each refreshing its token.
        clients: tokio::sync::Mutex<std::collections::HashMap<String, Octocrab>>,
        /// Read-only tokens for fetching, by repository, with their expiry.
        git_tokens: tokio::sync::Mutex<GitTokens>,
    },
}

impl Credentials {
    /// From `[github]`: `app_id` with `app_private_key_file` (and
    /// optionally `app_installation_id`), else `token_file`; none if neither.
    pub fn from_config(gh: &GithubConfig) -> Result<Option<Credentials>, GithubError> {
        // octocrab waits forever by default: one connection that never
        // answers would stall every status after it. Installation clients
        // are made from the app's client and share its connector, so these
        // bound their calls too.
        let timeout = Duration::from_secs(gh.timeout_s.max(1));
        let builder = || {
            Octocrab::builder()
                .base_uri(gh.api_url.as_str())
                .map(|b| {
                    b.set_connect_timeout(Some(timeout))
                        .set_read_timeout(Some(timeout))
                        .set_write_timeout(Some(timeout))
                })
                .map_err(|e| GithubError::Client(e.to_string()))
        };
        let inner = if let (Some(id), Some(key_file)) = (gh.app_id, &gh.app_private_key_file) {
            let pem = read_key(key_file)?;
            let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes())
                .map_err(|e| GithubError::BadKey(e.to_string()))?;
            let app = builder()?
                .app(octocrab::models::AppId(id), key)
                .build()
                .map_err(|e| GithubError::Client(e.to_string()))?;
            Inner::App {
                app,
                installation: gh.app_installation_id,
                clients: Default::default(),
                git_tokens: Default::default(),
            }
        } else if let Some(f) = &gh.token_file {
            let token = read_secret("github.token_file", f)?;
            let client =
                builder()?.personal_token(token.clone()).build().map_err(|e| GithubError::Client(e.to_string()))?;
            Inner::Token { client, token }
        } else {
            return Ok(None);
        };
        Ok(Some(Credentials { inner: Arc::new(inner), timeout }))
    }

    /// `github.timeout_s`: the longest one call to GitHub may take.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A client that may write statuses on `repo`.
    pub async fn client(&self, repo: &Repo) -> Result<Octocrab, GithubError> {
        match &*self.inner {
            Inner::Token { client, .. } => Ok(client.clone()),
            Inner::App { app, installation, clients, .. } => {
                let mut map = clients.lock().await;
                let key = if installation.is_some() { String::new() } else { repo.full_name().to_lowercase() };
                if let Some(c) = map.get(&key) {
                    return Ok(c.clone());
                }
                let id = match installation {
                    Some(id) => *id,
                    None => lookup_installation(app, repo).await?,
                };
                let c = app
                    .installation(octocrab::models::InstallationId(id))
                    .map_err(|e| GithubError::Client(e.to_string()))?;
                map.insert(key, c.clone());
                Ok(c)
            }
        }
    }

    /// A token for git over HTTPS on `repo`, fresh for at least five
    /// minutes. An App's is scoped to that one repository and to reading
    /// its contents (a fetch for one project cannot read another's, nor
    /// write anything), and kept per repository until it nears its expiry.
    pub async fn git_token(&self, repo: &Repo) -> Result<String, GithubError> {
        match &*self.inner {
            Inner::Token { token, .. } => Ok(token.clone()),
            Inner::App { app, installation, git_tokens, .. } => {
                let key = repo.full_name().to_lowercase();
                let now = chrono::Utc::now();
                let mut cache = git_tokens.lock().await;
                if let Some((t, expires)) = cache.get(&key)
                    && *expires - now > chrono::Duration::minutes(5)
                {
                    return Ok(t.clone());
                }
                // Bounded as a whole, not only per read: a fetch waits for it.
                let mint = async {
                    let id = match installation {
                        Some(id) => *id,
                        None => lookup_installation(app, repo).await?,
                    };
                    mint_scoped(app, id, repo).await
                };
                let (t, expires) = tokio::time::timeout(self.timeout, mint).await.map_err(|_| {
                    GithubError::Client(format!("GitHub did not answer within {} s", self.timeout.as_secs()))
                })??;
                cache.insert(key, (t.clone(), expires));
                Ok(t)
            }
        }
    }
}

/// `POST /app/installations/{id}/access_tokens` for one repository, read-only.
async fn mint_scoped(
    app: &Octocrab,
    installation: u64,
    repo: &Repo,
) -> Result<(String, chrono::DateTime<chrono::Utc>), GithubError> {
    #[derive(serde::Deserialize)]
    struct Minted {
        token: String,
        expires_at: String,
    }
    let body = serde_json::json!({"repositories": [repo.name], "permissions": {"contents": "read"}});
    let m: Minted = app
        .post(format!("/app/installations/{installation}/access_tokens"), Some(&body))
        .await
        .map_err(|e| GithubError::Client(format!("minting a token for fetching {}: {e}", repo.full_name())))?;
    let expires = chrono::DateTime::parse_from_rfc3339(&m.expires_at)
        .map_err(|e| GithubError::Client(format!("expires_at {:?}: {e}", m.expires_at)))?
        .with_timezone(&chrono::Utc);
    Ok((m.token, expires))
}

async fn lookup_installation(app: &Octocrab, repo: &Repo) -> Result<u64, GithubError> {
    #[derive(serde::Deserialize)]
    struct Installation {
        id: u64,
    }
    let route = format!("/repos/{}/{}/installation", repo.owner, repo.name);
    let i: Installation =
        app.get(route, None::<&()>).await.map_err(|_| GithubError::NoInstallation(repo.full_name()))?;
    Ok(i.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_come_from_github_urls_or_the_setting() {
        let r = Repo { owner: "acme".into(), name: "widgets".into() };
        for u in [
            "https://github.com/acme/widgets",
            "https://github.com/acme/widgets.git",
            "git@github.com:acme/widgets.git",
            "ssh://git@github.com/acme/widgets",
        ] {
            assert_eq!(Repo::from_url(u), Some(r.clone()), "{u}");
        }
        assert_eq!(Repo::from_url("https://gitlab.com/acme/widgets"), None);
        assert_eq!(Repo::from_url("/srv/git/widgets"), None);
        assert_eq!(Repo::parse("acme/widgets"), Some(r.clone()));
        assert_eq!(Repo::parse("acme/../etc"), None);
        assert_eq!(Repo::parse("acme/wid gets"), None);
        assert!(r.same("ACME/Widgets"));
    }

    #[test]
    fn tokens_go_to_github_or_the_configured_api_host_only() {
        let api = "https://api.github.com";
        assert!(may_send_token("https://github.com/acme/w.git", api));
        assert!(!may_send_token("https://evil.example/acme/w.git", api));
        assert!(!may_send_token("git@github.com:acme/w.git", api), "ssh uses its own keys");
        assert!(!may_send_token("/srv/git/w", api));
        assert!(may_send_token("https://ghe.corp/acme/w.git", "https://ghe.corp/api/v3"));
        assert!(!may_send_token("https://github.com.evil.example/x", api));
        assert!(!may_send_token("https://user@evil.example/x", api));
    }
}
