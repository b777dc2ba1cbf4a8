//! Kiln's configuration: one TOML file (`--config`, else `KILN_CONFIG`,
//! else `./kiln.toml`, else built-in defaults), then `KILN_<SECTION>_<KEY>`
//! environment overrides. Unknown keys are errors that name the key and
//! where it came from; secrets are only ever named by file path and read
//! when needed, so the configuration itself can be logged and shown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

mod cache;
mod forges;
pub use cache::*;
pub use forges::*;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: invalid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("{origin}: key `{key}`: {reason}")]
    Key { origin: String, key: String, reason: String },
}

impl ConfigError {
    fn key(origin: &str, key: &str, reason: impl Into<String>) -> Self {
        ConfigError::Key { origin: origin.to_string(), key: key.to_string(), reason: reason.into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    Zstd,
    Xz,
    None,
}

impl Compression {
    /// The name used in narinfo `Compression:` and NAR file extensions.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::None => "none",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Evaluator {
    #[default]
    Builtin,
    NixEvalJobs,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP server listens on.
    pub listen: SocketAddr,
    /// The URL users reach Kiln at (links, GitHub target URLs). Default: `http://<listen>`.
    pub base_url: Option<String>,
    pub state_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://…`. Default: `sqlite://<state_dir>/kiln.db`.
    pub database_url: Option<String>,
    /// Nix machines file. Default: `/etc/nix/machines` if present, else local builds.
    pub machines_file: Option<PathBuf>,
    /// Files each holding one bearer token for write endpoints.
    pub api_token_files: Vec<PathBuf>,
    /// Hide everything from anonymous users.
    pub private: bool,
    /// A client that has not sent a whole request header this long after
    /// connecting (or after its previous request) is disconnected.
    pub header_read_timeout_s: u64,
    pub log_format: LogFormat,
    /// Upstream binary caches (as in nix.conf) whose signed outputs are
    /// substituted instead of built, e.g. `["https://cache.nixos.org"]`.
    pub substituters: Vec<String>,
    /// Keys (`name:base64`) an upstream narinfo must be signed with.
    pub trusted_public_keys: Vec<String>,
    pub eval: EvalConfig,
    pub queue: QueueConfig,
    pub cache: CacheConfig,
    pub history: HistoryConfig,
    pub deploy: DeployConfig,
    pub github: Option<GithubConfig>,
    /// Gitea and Forgejo hosts: webhooks in, commit statuses out.
    pub forges: Vec<ForgeConfig>,
    pub projects: Vec<ProjectConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    pub workers: usize,
    pub max_memory_mib: u64,
    pub timeout_s: u64,
    pub max_concurrent: usize,
    pub evaluator: Evaluator,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Attempts of a step before a machine-side failure fails its builds.
    pub max_tries: u32,
    /// First retry delay; each further one is three times longer.
    pub retry_delay_s: u64,
    /// How long a step waits for a machine of its system before its builds
    /// fail as "unsupported system" (9).
    pub unsupported_grace_s: u64,
    pub connect_timeout_s: u64,
    /// Longest silence on a transfer or protocol read before it is aborted.
    pub progress_timeout_s: u64,
    /// Largest build log kept (Nix stops the build beyond it: status 10).
    pub max_log_mib: u64,
    /// A machine that fails this many steps in a row is paused.
    pub pause_after_failures: u32,
    pub pause_s: u64,
    /// On SIGTERM, running steps get this long to finish before Kiln
    /// exits; steps still running then are built again after a restart.
    pub stop_timeout_s: u64,
    /// Largest build output (NAR size) taken into the cache; beyond it the
    /// build ends as "output limit exceeded" (11).
    pub max_output_mib: u64,
    /// Ask builders to substitute upstream inputs themselves (Nix's
    /// `builders-use-substitutes`); what they cannot, Kiln sends.
    pub builders_use_substitutes: bool,
    /// Longest wait for an upstream's narinfo, and for any progress of a
    /// download from it.
    pub substitute_timeout_s: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_tries: 5,
            retry_delay_s: 60,
            unsupported_grace_s: 60,
            connect_timeout_s: 15,
            progress_timeout_s: 300,
            max_log_mib: 64,
            pause_after_failures: 3,
            pause_s: 300,
            stop_timeout_s: 60,
            max_output_mib: 4096,
            builders_use_substitutes: true,
            substitute_timeout_s: 10,
        }
    }
}

/// How long history is kept (see `history.rs`); 0 keeps it forever.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Seconds between prunings in `kiln serve`'s queue role; 0: never.
    pub prune_interval_s: u64,
    /// Finished steps no build names (with their logs), after this many
    /// days from their end.
    pub steps_days: u64,
    /// Webhook delivery ids (kept to ignore GitHub's redeliveries).
    pub webhook_deliveries_days: u64,
    /// Delivered, superseded or abandoned commit statuses.
    pub outbox_days: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig { prune_interval_s: 3600, steps_days: 90, webhook_deliveries_days: 7, outbox_days: 30 }
    }
}

/// How Kiln reaches the hosts of the environments repositories declare
/// (see `deploy`). The key and the cache's address are the server's to
/// give, never a repository's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeployConfig {
    /// The SSH key Kiln logs in to hosts with (default: ssh's own).
    pub ssh_key_file: Option<PathBuf>,
    /// The binary cache a host substitutes a closure from when its store
    /// lacks it (default: `base_url`, where Kiln serves its cache).
    pub cache_url: Option<String>,
    pub connect_timeout_s: u64,
    /// Seconds an activation may take.
    pub activate_timeout_s: u64,
    /// Per pull host (`pull = true`), the file holding the token its
    /// `kiln agent` presents.
    pub agent_token_files: std::collections::BTreeMap<String, PathBuf>,
    /// Seconds a pull host's wave waits for its agent to take the closure.
    pub agent_wait_s: u64,
}

impl Default for DeployConfig {
    fn default() -> Self {
        DeployConfig {
            ssh_key_file: None,
            cache_url: None,
            connect_timeout_s: 10,
            activate_timeout_s: 600,
            agent_token_files: Default::default(),
            agent_wait_s: 600,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    pub name: String,
    pub repo: String,
    #[serde(default)]
    pub github: Option<String>,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:3000".parse().expect("valid address"),
            base_url: None,
            state_dir: PathBuf::from("./kiln-state"),
            database_url: None,
            machines_file: None,
            api_token_files: Vec::new(),
            private: false,
            header_read_timeout_s: 30,
            log_format: LogFormat::Text,
            substituters: Vec::new(),
            trusted_public_keys: Vec::new(),
            eval: EvalConfig::default(),
            queue: QueueConfig::default(),
            cache: CacheConfig::default(),
            history: HistoryConfig::default(),
            deploy: DeployConfig::default(),
            github: None,
            forges: Vec::new(),
            projects: Vec::new(),
        }
    }
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            workers: 2,
            max_memory_mib: 4096,
            timeout_s: 600,
            max_concurrent: 2,
            evaluator: Evaluator::Builtin,
        }
    }
}

/// Top-level tables an environment variable can address as `KILN_<SECTION>_<KEY>`.
const SECTIONS: &[&str] = &["eval", "queue", "cache", "github"];
/// `KILN_*` variables that are not configuration keys.
const NOT_KEYS: &[&str] = &["KILN_CONFIG", "KILN_LOG"];

impl Config {
    /// Finds and loads the configuration as the CLI does.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let path = explicit
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("KILN_CONFIG").map(PathBuf::from))
            .or_else(|| Some(PathBuf::from("kiln.toml")).filter(|p| p.exists()));
        Self::load_from(path.as_deref(), std::env::vars())
    }

    /// Loads `path` (or the defaults) and applies `KILN_*` overrides from `env`.
    pub fn load_from(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (origin, mut table) = match path {
            Some(p) => {
                let origin = p.display().to_string();
                let text =
                    std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: origin.clone(), source })?;
                let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: origin.clone(),
                    message: e.to_string(),
                })?;
                (origin, table)
            }
            None => ("built-in defaults".to_string(), toml::Table::new()),
        };
        deserialize(&table).map_err(|(key, reason)| ConfigError::key(&origin, &key, reason))?;

        let overrides: BTreeMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("KILN_") && !NOT_KEYS.contains(&k.as_str()) && !k.starts_with("KILN_TEST_"))
            .collect();
        for (var, value) in overrides {
            apply_override(&mut table, &var, &value)?;
        }
        let config = deserialize(&table).map_err(|(key, reason)| ConfigError::key(&origin, &key, reason))?;
        config.validate(&origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        if let Some(u) = &self.base_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(ConfigError::key(origin, "base_url", format!("{u:?} is not an http:// or https:// URL")));
        }
        if let Some(u) = &self.database_url
            && !["sqlite:", "postgres://", "postgresql://"].iter().any(|p| u.starts_with(p))
        {
            return Err(ConfigError::key(origin, "database_url", "must start with sqlite:// or postgres://"));
        }
        if self.eval.workers == 0 {
            return Err(ConfigError::key(origin, "eval.workers", "must be at least 1"));
        }
        if self.eval.max_concurrent == 0 {
            return Err(ConfigError::key(origin, "eval.max_concurrent", "must be at least 1"));
        }
        if self.queue.max_tries == 0 {
            return Err(ConfigError::key(origin, "queue.max_tries", "must be at least 1"));
        }
        if self.queue.connect_timeout_s == 0 || self.queue.progress_timeout_s == 0 {
            return Err(ConfigError::key(origin, "queue.progress_timeout_s", "timeouts must be at least 1 s"));
        }
        if self.eval.evaluator == Evaluator::NixEvalJobs && !crate::eval::nix_eval_jobs::available() {
            return Err(ConfigError::key(
                origin,
                "eval.evaluator",
                "\"nix-eval-jobs\" is not on PATH; use \"builtin\"",
            ));
        }
        crate::upstream::Upstreams::new(
            &self.substituters,
            &self.trusted_public_keys,
            std::time::Duration::from_secs(1),
        )
        .map_err(|e| {
            let key = if matches!(e, crate::upstream::UpstreamError::BadKey { .. }) {
                "trusted_public_keys"
            } else {
                "substituters"
            };
            ConfigError::key(origin, key, e.to_string())
        })?;
        if !self.substituters.is_empty() && self.trusted_public_keys.is_empty() {
            return Err(ConfigError::key(
                origin,
                "trusted_public_keys",
                "substituters need the public keys their narinfos are signed with",
            ));
        }
        if self.header_read_timeout_s == 0 {
            return Err(ConfigError::key(origin, "header_read_timeout_s", "must be at least 1 s"));
        }
        if self.queue.substitute_timeout_s == 0 {
            return Err(ConfigError::key(origin, "queue.substitute_timeout_s", "must be at least 1 s"));
        }
        if !(1..=19).contains(&self.cache.zstd_level) {
            return Err(ConfigError::key(origin, "cache.zstd_level", "must be between 1 and 19"));
        }
        for k in &self.cache.trusted_upload_keys {
            crate::nix::PublicKey::parse(k)
                .map_err(|e| ConfigError::key(origin, "cache.trusted_upload_keys", e.to_string()))?;
        }
        if self.cache.require_upload_signatures && self.cache.trusted_upload_keys.is_empty() {
            return Err(ConfigError::key(origin, "cache.require_upload_signatures", "needs cache.trusted_upload_keys"));
        }
        self.cache.validate(origin)?;
        if self.cache.key_name.is_empty() || self.cache.key_name.contains(':') {
            return Err(ConfigError::key(origin, "cache.key_name", "must be non-empty and contain no ':'"));
        }
        for f in &self.api_token_files {
            read_secret(f).map_err(|reason| ConfigError::key(origin, "api_token_files", reason))?;
        }
        for (host, f) in &self.deploy.agent_token_files {
            read_secret(f)
                .map_err(|reason| ConfigError::key(origin, &format!("deploy.agent_token_files.{host}"), reason))?;
        }
        self.validate_forges(origin)?;
        let mut seen = std::collections::HashSet::new();
        for p in &self.projects {
            if !valid_name(&p.name) {
                return Err(ConfigError::key(
                    origin,
                    "projects.name",
                    format!("{:?} must be letters, digits, '-' or '_'", p.name),
                ));
            }
            if !seen.insert(&p.name) {
                return Err(ConfigError::key(origin, "projects.name", format!("{:?} is declared twice", p.name)));
            }
        }
        Ok(())
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| format!("sqlite://{}", self.state_dir.join("kiln.db").display()))
    }

    pub fn base_url(&self) -> String {
        self.base_url.clone().unwrap_or_else(|| format!("http://{}", self.listen)).trim_end_matches('/').to_string()
    }

    /// Where deployed hosts substitute closures from: `deploy.cache_url`,
    /// else Kiln's own `base_url`.
    pub fn deploy_cache_url(&self) -> String {
        self.deploy.cache_url.clone().unwrap_or_else(|| self.base_url())
    }

    /// The machines file in use, if any.
    pub fn machines_file(&self) -> Option<PathBuf> {
        self.machines_file.clone().or_else(|| Some(PathBuf::from("/etc/nix/machines")).filter(|p| p.exists()))
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.cache.dir.clone().unwrap_or_else(|| self.state_dir.join("cache"))
    }

    pub fn cache_secret_key_file(&self) -> PathBuf {
        self.cache.secret_key_file.clone().unwrap_or_else(|| self.state_dir.join("keys").join("cache.sec"))
    }

    /// The API tokens named by `api_token_files`, as (file name, token).
    pub fn api_tokens(&self) -> Result<Vec<(String, String)>, ConfigError> {
        self.api_token_files
            .iter()
            .map(|f| {
                let t = read_secret(f).map_err(|r| ConfigError::key("config", "api_token_files", r))?;
                Ok((f.display().to_string(), t))
            })
            .collect()
    }
}

/// Project and jobset names appear in URLs and paths.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !s.starts_with('.')
}

/// Reads a secret file: its first line, trimmed, which must not be empty.
/// The error names the file but never its contents.
pub fn read_secret(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read secret file {}: {e}", path.display()))?;
    let s = text.lines().next().unwrap_or("").trim().to_string();
    if s.is_empty() {
        return Err(format!("secret file {} is empty", path.display()));
    }
    Ok(s)
}

fn deserialize(table: &toml::Table) -> Result<Config, (String, String)> {
    let value = toml::Value::Table(table.clone());
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." { "(top level)".to_string() } else { path };
        (key, e.into_inner().to_string())
    })
}

/// Applies one `KILN_*` variable. The value is tried as a TOML literal
/// (`4`, `true`, `["a","b"]`), then as a plain string, then as a
/// comma-separated list; the first that the key accepts wins.
fn apply_override(table: &mut toml::Table, var: &str, value: &str) -> Result<(), ConfigError> {
    let rest = var["KILN_".len()..].to_ascii_lowercase();
    let (section, key) = match SECTIONS.iter().find(|s| rest.starts_with(&format!("{s}_"))) {
        Some(s) => (Some(*s), rest[s.len() + 1..].to_string()),
        None => (None, rest.clone()),
    };
    let full_key = match section {
        Some(s) => format!("{s}.{key}"),
        None => key.clone(),
    };
    let mut candidates = Vec::new();
    if let Ok(t) = format!("v = {value}").parse::<toml::Table>()
        && let Some(v) = t.get("v")
    {
        candidates.push(v.clone());
    }
    candidates.push(toml::Value::String(value.to_string()));
    candidates.push(toml::Value::Array(
        value.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| toml::Value::String(s.into())).collect(),
    ));
    let mut last_err = String::new();
    for cand in candidates {
        let mut t = table.clone();
        let target = match section {
            Some(s) => {
                let entry = t.entry(s.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match entry {
                    toml::Value::Table(inner) => inner,
                    _ => {
                        return Err(ConfigError::key(var, &full_key, format!("`{s}` is not a table")));
                    }
                }
            }
            None => &mut t,
        };
        target.insert(key.clone(), cand);
        match deserialize(&t) {
            Ok(_) => {
                *table = t;
                return Ok(());
            }
            Err((_, reason)) => last_err = reason,
        }
    }
    Err(ConfigError::key(var, &full_key, last_err))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("kiln.toml");
        std::fs::write(&p, text).unwrap();
        Config::load_from(Some(&p), env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn defaults_run_out_of_the_box() {
        let c = Config::load_from(None, std::iter::empty()).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:3000");
        assert_eq!(c.base_url(), "http://127.0.0.1:3000");
        assert_eq!(c.database_url(), "sqlite://./kiln-state/kiln.db");
        assert_eq!(c.cache_secret_key_file(), PathBuf::from("./kiln-state/keys/cache.sec"));
        assert_eq!(c.eval.workers, 2);
        assert_eq!(c.cache.compression, Compression::Zstd);
    }

    #[test]
    fn file_then_environment() {
        let c = load(
            "listen = \"0.0.0.0:8080\"\n[eval]\nworkers = 4\n[cache]\ncompression = \"xz\"\n",
            &[
                ("KILN_EVAL_WORKERS", "8"),
                ("KILN_STATE_DIR", "/var/lib/kiln"),
                ("KILN_PRIVATE", "true"),
                ("KILN_BASE_URL", "https://ci.example.org/"),
                ("KILN_CONFIG", "ignored"),
                ("KILN_LOG", "debug"),
                ("KILN_EVAL_MAX_MEMORY_MIB", "1024"),
                ("KILN_CACHE_KEY_NAME", "1234"),
            ],
        )
        .unwrap();
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.eval.workers, 8);
        assert_eq!(c.eval.max_memory_mib, 1024);
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/kiln"));
        assert!(c.private);
        assert_eq!(c.base_url(), "https://ci.example.org");
        assert_eq!(c.cache.compression, Compression::Xz);
        // A string key keeps a value that looks like a number.
        assert_eq!(c.cache.key_name, "1234");
    }

    #[test]
    fn environment_lists() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, "tok-a\n").unwrap();
        std::fs::write(&b, "tok-b").unwrap();
        let c = load("", &[("KILN_API_TOKEN_FILES", &format!("{},{}", a.display(), b.display()))]).unwrap();
        assert_eq!(c.api_tokens().unwrap().iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(), ["tok-a", "tok-b"]);
    }

    fn err(text: &str, env: &[(&str, &str)]) -> String {
        load(text, env).unwrap_err().to_string()
    }

    #[test]
    fn bad_config_names_the_key() {
        let e = err("listen = \"127.0.0.1:1\"\nlisten_port = 3\n", &[]);
        assert!(e.contains("kiln.toml") && e.contains("listen_port"), "{e}");
        let e = err("[eval]\nworkerz = 3\n", &[]);
        assert!(e.contains("workerz"), "{e}");
        let e = err("[eval]\nworkers = \"many\"\n", &[]);
        assert!(e.contains("eval.workers") && e.contains("invalid type"), "{e}");
        let e = err("[eval]\nworkers = 0\n", &[]);
        assert!(e.contains("eval.workers") && e.contains("at least 1"), "{e}");
        let e = err("listen = [", &[]);
        assert!(e.contains("invalid TOML"), "{e}");
        let e = err("[cache]\ncompression = \"gzip\"\n", &[]);
        assert!(e.contains("cache.compression") && e.contains("gzip"), "{e}");
        let e = err("", &[("KILN_EVAL_WROKERS", "3")]);
        assert!(e.contains("KILN_EVAL_WROKERS") && e.contains("wrokers"), "{e}");
        let e = err("", &[("KILN_EVAL_WORKERS", "lots")]);
        assert!(e.contains("KILN_EVAL_WORKERS") && e.contains("eval.workers"), "{e}");
        let e = err("database_url = \"mysql://x\"\n", &[]);
        assert!(e.contains("database_url"), "{e}");
        let e = err("[[projects]]\nname = \"a b\"\nrepo = \"/x\"\n", &[]);
        assert!(e.contains("projects.name"), "{e}");
    }

    #[test]
    fn secrets_are_files_that_must_exist() {
        let e = err("api_token_files = [\"/nonexistent/token\"]\n", &[]);
        assert!(e.contains("api_token_files") && e.contains("/nonexistent/token"), "{e}");
        let e = err("[github]\ntoken_file = \"/nonexistent/gh\"\n", &[]);
        assert!(e.contains("github.token_file"), "{e}");
        // An inline secret is not a key at all.
        let e = err("[github]\ntoken = \"ghp_secret\"\n", &[]);
        assert!(e.contains("token") && !e.contains("ghp_secret"), "{e}");
    }

    #[test]
    fn example_config_is_valid_and_complete() {
        // kiln.example.toml documents every key: it must load, and every
        // key of the defaults must appear in it.
        let text = include_str!("../../kiln.example.toml");
        let table: toml::Table = text.parse().unwrap();
        deserialize(&table).unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        for (k, v) in &defaults {
            assert!(text.contains(&format!("{k} =")) || text.contains(&format!("[{k}]")), "{k} undocumented");
            if let toml::Value::Table(t) = v {
                for k2 in t.keys() {
                    let documented = text.contains(&format!("{k2} =")) || text.contains(&format!("[{k}.{k2}]"));
                    assert!(documented, "{k}.{k2} undocumented");
                }
            }
        }
        for k in [
            "base_url",
            "database_url",
            "machines_file",
            "secret_key_file",
            "api_url",
            "token_file",
            "webhook_secret_file",
            "statuses",
        ] {
            assert!(text.contains(&format!("{k} =")), "{k} undocumented");
        }
    }
}
