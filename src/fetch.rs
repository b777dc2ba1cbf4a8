//! Fetching: one bare git mirror per project under `<state_dir>/git/`,
//! updated from the project's URL (any URL git can fetch). A fetch resolves
//! branches to commits so an evaluation is of exactly one commit, reads
//! files (the repository's `.kiln.toml`) at a commit, and names the locked
//! flake reference Nix evaluates. Fetches of different projects run
//! concurrently; one project's fetches never overlap. git never prompts
//! (credentials it lacks are an error, not a hang) and every call has a
//! timeout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tracing::debug;

#[derive(Debug, Error)]
pub enum FetchError {
    #[error("`git {command}` failed: {stderr}")]
    Git { command: String, stderr: String },
    #[error("`git {0}` timed out")]
    Timeout(String),
    #[error("cannot run git: {0}")]
    Spawn(std::io::Error),
    #[error("{0:?} is not a repository URL or path")]
    BadUrl(String),
    #[error("the repository has no default branch (is it empty?)")]
    NoDefaultBranch,
    #[error("branch {0:?} does not exist in the repository")]
    NoBranch(String),
    #[error("cannot create the mirror directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
}

/// An HTTP `Authorization` header for git, from a GitHub token. Its
/// `Debug` does not show it.
#[derive(Clone)]
pub struct GitAuth {
    header: String,
}

impl GitAuth {
    /// GitHub's form for tokens over HTTPS: Basic `x-access-token:<token>`.
    pub fn github_token(token: &str) -> GitAuth {
        use base64::Engine;
        let b = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
        GitAuth { header: format!("Authorization: Basic {b}") }
    }
}

impl std::fmt::Debug for GitAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GitAuth(..)")
    }
}

pub struct Mirrors {
    root: PathBuf,
    timeout: Duration,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A mirror after a fetch.
#[derive(Debug, Clone)]
pub struct Mirror {
    pub dir: PathBuf,
    pub default_branch: String,
}

impl Mirrors {
    pub fn new(state_dir: &Path, timeout: Duration) -> Self {
        // Absolute, because the mirror's path becomes a file:// URL for Nix.
        let state_dir = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
        Mirrors { root: state_dir.join("git"), timeout, locks: Mutex::new(HashMap::new()) }
    }

    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().expect("locks").entry(key.to_string()).or_default().clone()
    }

    /// Where the mirror for `key` (a project name) lives.
    pub fn dir(&self, key: &str) -> PathBuf {
        self.root.join(format!("{key}.git"))
    }

    /// Brings the mirror of `url` up to date: every branch, pruned.
    pub async fn fetch(&self, key: &str, url: &str) -> Result<Mirror, FetchError> {
        self.fetch_with(key, url, None).await
    }

    /// [`Mirrors::fetch`] with credentials for a private repository.
    pub async fn fetch_with(&self, key: &str, url: &str, auth: Option<&GitAuth>) -> Result<Mirror, FetchError> {
        let lock = self.lock_for(key);
        let _guard = lock.lock().await;
        // A "URL" that git would read as an option (`--upload-pack=…`) runs commands.
        if url.starts_with('-') {
            return Err(FetchError::BadUrl(url.to_string()));
        }
        let dir = self.dir(key);
        if !dir.join("HEAD").exists() {
            std::fs::create_dir_all(&dir)
                .map_err(|source| FetchError::Dir { path: dir.display().to_string(), source })?;
            self.git(None, &["init", "--quiet", "--bare", &dir.to_string_lossy()]).await?;
        }
        let heads = self.git_as(None, &["ls-remote", "--symref", "--", url, "HEAD"], auth).await?;
        let default_branch = String::from_utf8_lossy(&heads)
            .lines()
            .find_map(|l| l.strip_prefix("ref: refs/heads/").and_then(|r| r.split('\t').next()).map(str::to_string))
            .ok_or(FetchError::NoDefaultBranch)?;
        self.git_as(
            Some(&dir),
            &["fetch", "--quiet", "--prune", "--no-tags", "--", url, "+refs/heads/*:refs/heads/*"],
            auth,
        )
        .await?;
        let head = format!("refs/heads/{default_branch}");
        self.git(Some(&dir), &["symbolic-ref", "HEAD", &head]).await?;
        debug!(project = key, default_branch, "fetched");
        Ok(Mirror { dir, default_branch })
    }

    /// The commit a branch points at in the mirror.
    pub async fn rev(&self, mirror: &Mirror, branch: &str) -> Result<String, FetchError> {
        self.rev_of(mirror, &format!("refs/heads/{branch}")).await
    }

    /// The commit a full ref points at in the mirror.
    pub async fn rev_of(&self, mirror: &Mirror, full_ref: &str) -> Result<String, FetchError> {
        let spec = format!("{full_ref}^{{commit}}");
        match self.git(Some(&mirror.dir), &["rev-parse", "--verify", "--quiet", &spec]).await {
            Ok(out) => Ok(String::from_utf8_lossy(&out).trim().to_string()),
            Err(FetchError::Git { .. }) => {
                Err(FetchError::NoBranch(full_ref.strip_prefix("refs/heads/").unwrap_or(full_ref).to_string()))
            }
            Err(e) => Err(e),
        }
    }

    /// The message of commit `rev` in the mirror.
    pub async fn message_of(&self, mirror: &Mirror, rev: &str) -> Result<String, FetchError> {
        let out = self.git(Some(&mirror.dir), &["log", "-1", "--format=%B", rev, "--"]).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Fetches pull request `number`'s head (GitHub's `refs/pull/N/head`,
    /// which also carries a fork's commits) into [`pull_ref`].
    pub async fn fetch_pull(
        &self,
        key: &str,
        url: &str,
        number: i64,
        auth: Option<&GitAuth>,
    ) -> Result<(), FetchError> {
        let lock = self.lock_for(key);
        let _guard = lock.lock().await;
        if url.starts_with('-') {
            return Err(FetchError::BadUrl(url.to_string()));
        }
        let spec = format!("+refs/pull/{number}/head:{}", pull_ref(number));
        self.git_as(Some(&self.dir(key)), &["fetch", "--quiet", "--no-tags", "--", url, &spec], auth).await?;
        Ok(())
    }

    /// A file's contents at a commit, or `None` if it is not there.
    pub async fn read_file(&self, mirror: &Mirror, rev: &str, path: &str) -> Result<Option<Vec<u8>>, FetchError> {
        let spec = format!("{rev}:{path}");
        let exists = self.git(Some(&mirror.dir), &["cat-file", "-e", &spec]).await.is_ok();
        if !exists {
            return Ok(None);
        }
        self.git(Some(&mirror.dir), &["cat-file", "blob", &spec]).await.map(Some)
    }

    async fn git(&self, dir: Option<&Path>, args: &[&str]) -> Result<Vec<u8>, FetchError> {
        self.git_as(dir, args, None).await
    }

    async fn git_as(&self, dir: Option<&Path>, args: &[&str], auth: Option<&GitAuth>) -> Result<Vec<u8>, FetchError> {
        let mut cmd = tokio::process::Command::new("git");
        if let Some(a) = auth {
            // Configuration from the environment reaches only this process:
            // never the mirror's config file, the command line or a log.
            cmd.env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "http.extraHeader")
                .env("GIT_CONFIG_VALUE_0", &a.header);
        }
        if let Some(d) = dir {
            cmd.arg("-C").arg(d);
        }
        cmd.args(["-c", "credential.helper=", "-c", "core.askPass=", "-c", "protocol.file.allow=always"])
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "/bin/false")
            .env("SSH_ASKPASS", "/bin/false")
            .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let command = args.iter().take(2).cloned().collect::<Vec<_>>().join(" ");
        let out = tokio::time::timeout(self.timeout, cmd.output())
            .await
            .map_err(|_| FetchError::Timeout(command.clone()))?
            .map_err(FetchError::Spawn)?;
        if !out.status.success() {
            return Err(FetchError::Git { command, stderr: String::from_utf8_lossy(&out.stderr).trim().to_string() });
        }
        Ok(out.stdout)
    }
}

/// Where a pull request's head lives in a mirror: outside `refs/heads/`,
/// so the prune of branches leaves it alone.
pub fn pull_ref(number: i64) -> String {
    format!("refs/kiln/pr/{number}")
}

/// The flake reference Nix evaluates for a commit of a mirror. Nix 2.8
/// needs the ref beside the rev, or it fetches `master` and fails.
pub fn flake_ref(mirror: &Mirror, full_ref: &str, rev: &str, flake_dir: &str) -> String {
    let mut r = format!("git+file://{}?ref={full_ref}&rev={rev}", mirror.dir.display());
    if !flake_dir.is_empty() {
        r.push_str("&dir=");
        r.push_str(flake_dir);
    }
    r
}
