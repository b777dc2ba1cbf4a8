//! `[cache]`: the binary cache's storage, key, compression, limits and
//! upload trust.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::cache::storage::S3Settings;

use super::{Compression, ConfigError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Where the cache's files live. Default: `<state_dir>/cache`.
    pub dir: Option<PathBuf>,
    /// Default: `<state_dir>/keys/cache.sec`, generated on first start.
    pub secret_key_file: Option<PathBuf>,
    /// Name of a generated key (`<name>:<base64>`).
    pub key_name: String,
    pub compression: Compression,
    pub zstd_level: i32,
    /// `Priority:` in nix-cache-info; lower is preferred by clients.
    pub priority: u32,
    /// Largest NAR accepted from `nix copy --to` (compressed or not).
    pub max_upload_mib: u64,
    /// Uploaded paths are kept at least this long by garbage collection.
    pub keep_uploads_days: u64,
    /// Seconds between garbage collections in `kiln serve`; 0 turns them off.
    pub gc_interval_s: u64,
    /// Refuse uploads whose narinfo is not signed by one of `trusted_upload_keys`.
    pub require_upload_signatures: bool,
    /// Public keys (`name:base64`) whose signatures uploads may carry.
    pub trusted_upload_keys: Vec<String>,
    /// Keep the upstream paths Kiln's builds used in Kiln's own cache too,
    /// so deployers need only Kiln.
    pub mirror_upstream: bool,
    /// `local` (the directory `dir`) or `s3` (the bucket of `[cache.s3]`).
    pub storage: StorageKind,
    pub s3: S3Settings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    Local,
    S3,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: None,
            secret_key_file: None,
            key_name: "kiln-1".to_string(),
            compression: Compression::Zstd,
            zstd_level: 3,
            priority: 40,
            max_upload_mib: 4096,
            keep_uploads_days: 7,
            gc_interval_s: 3600,
            require_upload_signatures: false,
            trusted_upload_keys: Vec::new(),
            mirror_upstream: false,
            storage: StorageKind::Local,
            s3: S3Settings::default(),
        }
    }
}

impl CacheConfig {
    pub(super) fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        if self.storage == StorageKind::S3 {
            if self.s3.bucket.is_empty() {
                return Err(ConfigError::key(origin, "cache.s3.bucket", "is needed with cache.storage = \"s3\""));
            }
            if !matches!(self.s3.addressing.as_str(), "path" | "virtual") {
                return Err(ConfigError::key(origin, "cache.s3.addressing", "must be \"path\" or \"virtual\""));
            }
            if self.s3.access_key_id_file.is_some() != self.s3.secret_access_key_file.is_some() {
                return Err(ConfigError::key(
                    origin,
                    "cache.s3.access_key_id_file",
                    "and cache.s3.secret_access_key_file go together",
                ));
            }
            if !(self.s3.endpoint.is_empty()
                || self.s3.endpoint.starts_with("https://")
                || self.s3.endpoint.starts_with("http://"))
            {
                return Err(ConfigError::key(origin, "cache.s3.endpoint", "must be an http:// or https:// URL"));
            }
        }
        Ok(())
    }
}
