//! Gitea and Forgejo (`[[forges]]`): what GitHub does for its projects,
//! for projects hosted there. Their webhooks (push, pull request) are
//! signed with HMAC-SHA256 in hex (`X-Gitea-Signature`, or Forgejo's
//! `X-Forgejo-Signature`), checked before anything is parsed, and become
//! the same events as GitHub's ([`crate::github::webhook::Event`]). Their
//! commit status API mirrors GitHub's (`POST
//! /api/v1/repos/{owner}/{repo}/statuses/{sha}`): statuses are composed
//! by `github::statuses` with the forge's name on them, queued in the same
//! outbox, and delivered here in order with the same retries. A project
//! is on a forge when its `repo` URL starts with the forge's `url`; the
//! forge's token fetches it and is sent to no other host.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::config::{Config, ForgeConfig};
use crate::db::{Db, DbError, now, outbox};
use crate::github::Repo;
use crate::github::sender::{Outcome, classify};
use crate::github::statuses::Status;
use crate::github::webhook::{Event, Repository, WebhookError};

/// The outbox `kind` of a forge's commit status.
pub const KIND: &str = "forge_status";
const POLL: Duration = Duration::from_millis(500);
const MAX_ATTEMPTS: i64 = 30;
const MAX_BACKOFF_S: i64 = 600;

#[derive(Debug, Error)]
pub enum ForgeError {
    #[error("forges.{forge}.{what}: {reason}")]
    Secret { forge: String, what: &'static str, reason: String },
    #[error("forge client: {0}")]
    Client(String),
}

/// Where a forge is, without its secrets: enough to tell its projects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgeRef {
    pub name: String,
    pub url: String,
}

impl ForgeRef {
    pub fn of(c: &ForgeConfig) -> ForgeRef {
        ForgeRef { name: c.name.clone(), url: c.url.trim_end_matches('/').to_string() }
    }

    /// The repository of a project's URL on this forge:
    /// `<url>/<owner>/<name>(.git)`.
    pub fn repo_of(&self, repo_url: &str) -> Option<Repo> {
        let rest = repo_url.strip_prefix(&self.url)?.strip_prefix('/')?;
        let rest = rest.trim_end_matches('/');
        (rest.matches('/').count() == 1).then(|| Repo::parse(rest)).flatten()
    }
}

/// The forge a project's URL is on, and its repository there.
pub fn forge_of<'a>(forges: &'a [ForgeRef], repo_url: &str) -> Option<(&'a ForgeRef, Repo)> {
    forges.iter().find_map(|f| f.repo_of(repo_url).map(|r| (f, r)))
}

/// A forge with its secrets, read once at start.
#[derive(Clone)]
pub struct Forge {
    pub at: ForgeRef,
    token: Option<String>,
    secret: Option<String>,
    timeout: Duration,
}

impl std::fmt::Debug for Forge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Forge({})", self.at.name)
    }
}

impl Forge {
    pub fn load(c: &ForgeConfig) -> Result<Forge, ForgeError> {
        let read = |what: &'static str, f: &Option<std::path::PathBuf>| {
            f.as_ref().map(|p| crate::config::read_secret(p)).transpose().map_err(|reason| ForgeError::Secret {
                forge: c.name.clone(),
                what,
                reason,
            })
        };
        Ok(Forge {
            at: ForgeRef::of(c),
            token: read("token_file", &c.token_file)?,
            secret: read("webhook_secret_file", &c.webhook_secret_file)?,
            timeout: Duration::from_secs(c.timeout_s.max(1)),
        })
    }

    pub fn load_all(config: &Config) -> Result<Vec<Forge>, ForgeError> {
        config.forges.iter().map(Forge::load).collect()
    }

    /// Credentials for git over HTTP(S) on this forge, if it has a token.
    pub fn git_auth(&self) -> Option<crate::fetch::GitAuth> {
        // Gitea and Forgejo take a token as the password of Basic auth.
        self.token.as_deref().map(crate::fetch::GitAuth::github_token)
    }

    /// Checks the body's signature: the hex HMAC-SHA256 with the secret.
    pub fn verify(&self, body: &[u8], signature: Option<&str>) -> Result<(), WebhookError> {
        let secret = self.secret.as_deref().ok_or(WebhookError::NoSignature)?;
        let sig = signature.ok_or(WebhookError::NoSignature)?;
        crate::github::webhook::verify_hex(secret.as_bytes(), body, sig.trim())
    }
}

/// The hex signature a forge sends for `body` (for tests and tools):
/// GitHub's, without its `sha256=`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    crate::github::webhook::sign(secret, body).trim_start_matches("sha256=").to_string()
}

#[derive(Deserialize)]
struct Head {
    sha: String,
    #[serde(default)]
    repo: Option<Repository>,
}

#[derive(Deserialize)]
struct User {
    login: String,
}

#[derive(Deserialize)]
struct Pr {
    number: i64,
    head: Head,
    #[serde(default)]
    base: Option<Head>,
    user: Option<User>,
}

#[derive(Deserialize)]
struct PrPayload {
    action: String,
    pull_request: Pr,
    repository: Repository,
}

/// A verified body as GitHub's event. A forge has no
/// `author_association`: a pull request from a branch of the repository
/// itself (its author can push there) counts as a collaborator's, one from
/// a fork as a contributor's, which waits for approval by default.
pub fn parse(event: &str, body: &[u8]) -> Result<Event, WebhookError> {
    let bad = |e: serde_json::Error| WebhookError::Malformed { event: event.to_string(), reason: e.to_string() };
    match event {
        // Gitea's push is GitHub's, keys and all.
        "push" => crate::github::webhook::parse(event, body),
        "pull_request" => {
            let p: PrPayload = serde_json::from_slice(body).map_err(bad)?;
            let same_repo =
                match (&p.pull_request.head.repo, p.pull_request.base.as_ref().and_then(|b| b.repo.as_ref())) {
                    (Some(h), Some(b)) => h.full_name.eq_ignore_ascii_case(&b.full_name),
                    (Some(h), None) => h.full_name.eq_ignore_ascii_case(&p.repository.full_name),
                    _ => false,
                };
            // Gitea's name for a push to the pull request.
            let action = if p.action == "synchronized" { "synchronize".to_string() } else { p.action };
            Ok(Event::PullRequest {
                repo: p.repository.full_name,
                action,
                number: p.pull_request.number,
                head_sha: p.pull_request.head.sha,
                author: p.pull_request.user.map(|u| u.login).unwrap_or_default(),
                association: if same_repo { "COLLABORATOR" } else { "CONTRIBUTOR" }.into(),
            })
        }
        _ => Ok(Event::Other),
    }
}

/// Runs until `stop`: sends the forges' due statuses.
pub async fn run(db: Db, forges: Vec<Forge>, stop: impl std::future::Future<Output = ()>) {
    tokio::pin!(stop);
    let client = reqwest::Client::builder().build().expect("a client with defaults");
    loop {
        let wait = match send_due(&db, &forges, &client).await {
            Ok(0) => POLL,
            Ok(_) => Duration::ZERO,
            Err(e) => {
                warn!(error = %e, "forge status outbox");
                POLL * 4
            }
        };
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Sends every due forge status once, in order per commit; returns how many it tried.
pub async fn send_due(db: &Db, forges: &[Forge], client: &reqwest::Client) -> Result<usize, DbError> {
    let due = {
        let mut c = db.conn().await?;
        outbox::due(c.ex(), now(), 100).await?
    };
    let mut held = std::collections::HashSet::new();
    let mut tried = 0;
    for m in due.into_iter().filter(|m| m.kind == KIND) {
        if held.contains(&m.target) {
            continue;
        }
        tried += 1;
        let outcome = match serde_json::from_str::<Status>(&m.payload) {
            Err(e) => Outcome::GiveUp(format!("unreadable payload: {e}")),
            Ok(s) => match forges.iter().find(|f| Some(&f.at.name) == s.forge.as_ref()) {
                None => Outcome::GiveUp(format!("no forge {:?} is configured", s.forge)),
                Some(f) => deliver(client, f, &s).await,
            },
        };
        let mut c = db.conn().await?;
        match outcome {
            Outcome::Delivered => {
                outbox::mark_delivered(c.ex(), m.id).await?;
                debug!(target = %m.target, context = %m.context, "forge status delivered");
            }
            Outcome::Retry(why) | Outcome::Paused { reason: why, .. } => {
                let backoff = (1i64 << m.attempts.clamp(0, 20)).min(MAX_BACKOFF_S);
                if m.attempts + 1 >= MAX_ATTEMPTS {
                    warn!(target = %m.target, error = %why, "forge status given up after retries");
                    outbox::give_up(c.ex(), m.id, &why).await?;
                } else {
                    info!(target = %m.target, error = %why, retry_in_s = backoff, "forge status will be retried");
                    outbox::mark_failed(c.ex(), m.id, &why, now() + backoff).await?;
                    held.insert(m.target.clone());
                }
            }
            Outcome::GiveUp(why) => {
                warn!(target = %m.target, context = %m.context, error = %why, "the forge refused the status");
                outbox::give_up(c.ex(), m.id, &why).await?;
            }
        }
    }
    Ok(tried)
}

/// Posts one status; the token goes to this forge's URL only.
async fn deliver(client: &reqwest::Client, f: &Forge, s: &Status) -> Outcome {
    let url = format!("{}/api/v1/repos/{}/{}/statuses/{}", f.at.url, s.owner, s.repo, s.sha);
    let body = serde_json::json!({
        "state": s.state,
        "target_url": s.target_url,
        "description": s.description,
        "context": s.context,
    });
    let mut req = client
        .post(url)
        .timeout(f.timeout)
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(&body).expect("serialises"));
    if let Some(t) = &f.token {
        req = req.header("Authorization", format!("token {t}"));
    }
    match req.send().await {
        Err(e) => Outcome::Retry(format!("cannot reach {}: {e}", f.at.name)),
        Ok(r) => {
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            let text: String = r.text().await.unwrap_or_default().chars().take(300).collect();
            classify(status, &headers, &text, now())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projects_are_on_the_forge_their_url_starts_with() {
        let f = vec![ForgeRef { name: "cb".into(), url: "https://codeberg.org".into() }];
        let (forge, repo) = forge_of(&f, "https://codeberg.org/acme/widgets.git").unwrap();
        assert_eq!((forge.name.as_str(), repo.full_name().as_str()), ("cb", "acme/widgets"));
        assert!(forge_of(&f, "https://codeberg.org.evil.example/acme/widgets").is_none());
        assert!(forge_of(&f, "https://github.com/acme/widgets").is_none());
        assert!(forge_of(&f, "https://codeberg.org/acme").is_none());
    }

    #[test]
    fn signatures_and_events_read_as_gitea_sends_them() {
        let forge = Forge {
            at: ForgeRef { name: "g".into(), url: "http://g".into() },
            token: None,
            secret: Some("s".into()),
            timeout: Duration::from_secs(1),
        };
        let body = br#"{"ref":"refs/heads/main","repository":{"full_name":"a/b","default_branch":"main"}}"#;
        assert!(forge.verify(body, Some(&sign(b"s", body))).is_ok());
        assert!(forge.verify(body, Some(&sign(b"other", body))).is_err());
        assert!(forge.verify(body, None).is_err());
        assert!(matches!(parse("push", body).unwrap(), Event::Push { branch: Some(ref b), .. } if b == "main"));
        let fork = br#"{"action":"synchronized","number":3,"pull_request":{"number":3,"head":{"sha":"abc","repo":{"full_name":"eve/b"}},"base":{"sha":"def","repo":{"full_name":"a/b"}},"user":{"login":"eve"}},"repository":{"full_name":"a/b"}}"#;
        let Event::PullRequest { action, association, author, .. } = parse("pull_request", fork).unwrap() else {
            panic!("not a pull request")
        };
        assert_eq!((action.as_str(), association.as_str(), author.as_str()), ("synchronize", "CONTRIBUTOR", "eve"));
    }
}
