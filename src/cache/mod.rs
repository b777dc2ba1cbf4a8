//! The binary cache: Kiln's store of record for build outputs, served to
//! Nix clients as a signed binary cache. `ingest` takes a NAR stream with
//! its path info, validates it while streaming, computes NarHash/NarSize and
//! FileHash/FileSize in the same pass, compresses, writes atomically, signs
//! the narinfo and records the path in the database; a path already there
//! costs one lookup. `ingest_upload` takes what `nix copy --to` sent and
//! keeps it as the uploader made it: its NAR file, URL and signatures, after
//! checking every hash and size; Kiln adds its own signature only to an
//! upload signed by a trusted upload key (decision 014). An upload never
//! counts as Kiln's own output (`own_paths`), and ingesting a build of the
//! same path replaces it. The signing key is loaded from
//! `cache.secret_key_file`, or generated there on first start.

pub mod copy;
pub mod gc;
mod keys;
mod local;
pub mod storage;
mod upload;
mod write;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use thiserror::Error;

use crate::config::{Compression, Config};
use crate::db::cache_paths::{self, CachePath};
use crate::db::{self, Db, DbError};
use crate::nix::hash::Hash;
use crate::nix::nar::NarError;
use crate::nix::signing::{KeyError, PublicKey, SigningKey};
use crate::nix::{NarInfo, StorePath};
pub use keys::{load_or_generate_key, public_key_path};
pub use local::{ingest_local, local_path_info};
pub use storage::{Storage, StorageError};

#[derive(Debug, Error)]
pub enum CacheError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot create {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("invalid NAR: {0}")]
    Nar(#[from] NarError),
    #[error("NAR is larger than the limit of {0} bytes")]
    TooLarge(u64),
    #[error("NAR does not match its narinfo: {0}")]
    Mismatch(String),
    #[error("reading the NAR: {0}")]
    Io(std::io::Error),
    #[error("unsupported compression {0:?}")]
    Compression(String),
    #[error("uploaded NAR file does not match its narinfo: {0}")]
    FileMismatch(String),
}

impl CacheError {
    /// The cache's storage ran out of space (or quota).
    pub fn is_storage_full(&self) -> bool {
        let io = match self {
            CacheError::Storage(StorageError::Io { source, .. }) => source,
            CacheError::Dir { source, .. } => source,
            _ => return false,
        };
        matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
    }

    /// A fault of the coordinator's side (storage, database, key), as
    /// opposed to the NAR it was given (short, invalid, too large).
    pub fn is_coordinator_side(&self) -> bool {
        matches!(self, CacheError::Storage(_) | CacheError::Dir { .. } | CacheError::Db(_) | CacheError::Key(_))
    }
}

/// What a NAR is of: its store path and the path info Nix keeps beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub ca: Option<String>,
}

/// Where a path came from: what Kiln built (signed with its key, counted as
/// built) or what someone uploaded (neither, unless trusted; see
/// [`Cache::ingest_upload`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Build,
    Upload,
    /// Substituted from a trusted upstream (`cache.mirror_upstream`).
    Upstream,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Origin::Build => "build",
            Origin::Upload => "upload",
            Origin::Upstream => "upstream",
        }
    }
}

#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    storage: Storage,
    db: Db,
    key: SigningKey,
    compression: Compression,
    zstd_level: i32,
    /// Largest build output (`queue.max_output_mib`).
    max_output_bytes: u64,
    /// Largest NAR (compressed as sent, and decompressed) an upload may be.
    max_upload_bytes: u64,
    priority: u32,
    mirror_upstream: bool,
    /// With `cache.require_upload_signatures`: the keys whose signature on
    /// an upload Kiln vouches for by adding its own.
    vouched_upload_keys: Vec<PublicKey>,
}

/// A NAR written to storage.
struct Written {
    nar_hash: Hash,
    nar_size: u64,
    file_hash: Hash,
    file_size: u64,
    key: String,
}

impl Cache {
    pub fn open(config: &Config, db: Db, key: SigningKey) -> Result<Cache, CacheError> {
        let storage = match config.cache.storage {
            crate::config::StorageKind::Local => Storage::open(&config.cache_dir())?,
            crate::config::StorageKind::S3 => {
                Storage::open_s3(&config.cache.s3, &config.state_dir.join("cache-spool"))?
            }
        };
        let cache = Cache {
            inner: Arc::new(Inner {
                storage,
                db,
                key,
                compression: config.cache.compression,
                zstd_level: config.cache.zstd_level,
                max_output_bytes: config.queue.max_output_mib.saturating_mul(1024 * 1024).max(1),
                max_upload_bytes: config.cache.max_upload_mib.saturating_mul(1024 * 1024).max(1),
                priority: config.cache.priority,
                mirror_upstream: config.cache.mirror_upstream,
                vouched_upload_keys: if config.cache.require_upload_signatures {
                    config.cache.trusted_upload_keys.iter().filter_map(|k| PublicKey::parse(k).ok()).collect()
                } else {
                    Vec::new()
                },
            }),
        };
        // For `nix copy --from file://…` (or `s3://…`) straight off the
        // storage; Kiln itself answers /nix-cache-info from memory.
        cache.inner.storage.put_info("nix-cache-info", cache.cache_info().into_bytes())?;
        Ok(cache)
    }

    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub fn public_key(&self) -> crate::nix::PublicKey {
        self.inner.key.public()
    }

    /// Whether upstream paths sent to builders are kept here too.
    pub fn mirror_upstream(&self) -> bool {
        self.inner.mirror_upstream
    }

    /// The largest build output taken in (`queue.max_output_mib`).
    pub fn max_output_bytes(&self) -> u64 {
        self.inner.max_output_bytes
    }

    /// The upload limit (`cache.max_upload_mib`), for the HTTP handlers.
    pub fn max_upload_bytes(&self) -> u64 {
        self.inner.max_upload_bytes
    }

    /// The `nix-cache-info` text.
    pub fn cache_info(&self) -> String {
        format!("StoreDir: {}\nWantMassQuery: 1\nPriority: {}\n", crate::nix::STORE_DIR, self.inner.priority)
    }

    /// Whether the path is in the cache: one indexed lookup.
    pub async fn contains(&self, path: &StorePath) -> Result<bool, CacheError> {
        let mut c = self.inner.db.conn().await?;
        Ok(cache_paths::contains(c.ex(), path.hash_part()).await?)
    }

    /// Of `paths`, those the cache holds as Kiln's own: built by Kiln, or
    /// taken from a trusted upstream, with their narinfo in storage. This
    /// is what "already built" means to the queue: an upload of a
    /// derivation's output never counts, and neither does an index row
    /// whose files are gone (a cache directory emptied or swapped). One
    /// query per 500 paths; the answer holds `StorePath` strings.
    pub async fn own_paths(&self, paths: &[StorePath]) -> Result<HashSet<String>, CacheError> {
        let hashes: Vec<&str> = paths.iter().map(|p| p.hash_part()).collect();
        let mut c = self.inner.db.conn().await?;
        let own: HashSet<String> = cache_paths::own(c.ex(), &hashes).await?.into_iter().collect();
        drop(c);
        let candidates: Vec<&StorePath> = paths.iter().filter(|p| own.contains(p.hash_part())).collect();
        let keys = candidates.iter().map(|p| format!("{}.narinfo", p.hash_part())).collect();
        let present = self.inner.storage.exists_many(keys).await?;
        Ok(candidates.into_iter().zip(present).filter(|(_, there)| *there).map(|(p, _)| p.to_string()).collect())
    }

    /// Whether one path is in the cache as Kiln's own; see [`Cache::own_paths`].
    pub async fn is_own(&self, path: &StorePath) -> Result<bool, CacheError> {
        Ok(!self.own_paths(std::slice::from_ref(path)).await?.is_empty())
    }

    /// The narinfo an ingest of `path` from `origin` keeps instead of
    /// storing anything: any path already there, except an upload when
    /// Kiln ingests its own build of the same path (the real output wins).
    async fn kept(&self, path: &StorePath, origin: Origin) -> Result<Option<NarInfo>, CacheError> {
        let mut c = self.inner.db.conn().await?;
        let Some(row) = cache_paths::get(c.ex(), path.hash_part()).await? else { return Ok(None) };
        drop(c);
        if row.origin == Origin::Upload.as_str() && origin != Origin::Upload {
            return Ok(None);
        }
        self.narinfo(path).await
    }

    /// Stores a NAR stream as `info.path`. With `expect`, the NAR must have
    /// that hash and size or nothing is kept. Returns the narinfo, and
    /// whether the path was stored now. A path already there is kept, but
    /// a build (`Origin::Build`) replaces an upload of the same path: a new
    /// narinfo signed by Kiln, the row updated, the uploaded NAR file left
    /// for garbage collection.
    pub async fn ingest<R>(
        &self,
        info: PathInfo,
        nar: R,
        expect: Option<(Hash, u64)>,
        origin: Origin,
    ) -> Result<(NarInfo, bool), CacheError>
    where
        R: tokio::io::AsyncRead + Send + Unpin + 'static,
    {
        if let Some(existing) = self.kept(&info.path, origin).await? {
            return Ok((existing, false));
        }
        let bridge = tokio_util::io::SyncIoBridge::new(nar);
        let inner = self.inner.clone();
        // Each origin has its own limit: a build's output is bounded by
        // queue.max_output_mib, never by the upload limit.
        let limit = match origin {
            Origin::Build => self.inner.max_output_bytes,
            Origin::Upload => self.inner.max_upload_bytes,
            Origin::Upstream => u64::MAX,
        };
        let written = tokio::task::spawn_blocking(move || inner.write_nar(bridge, expect, limit))
            .await
            .map_err(|e| CacheError::Io(std::io::Error::other(e)))??;
        self.publish(info, written, origin).await
    }

    async fn publish(&self, info: PathInfo, w: Written, origin: Origin) -> Result<(NarInfo, bool), CacheError> {
        let mut ni = NarInfo {
            store_path: info.path.clone(),
            url: w.key.clone(),
            compression: self.inner.compression.name().to_string(),
            file_hash: Some(w.file_hash.clone()),
            file_size: Some(w.file_size),
            nar_hash: w.nar_hash.clone(),
            nar_size: w.nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            system: None,
            sigs: Vec::new(),
            ca: info.ca.clone(),
        };
        // Kiln's key says "Kiln built this"; an upload stored through this
        // path (tests, tools) gets no signature at all.
        let signed = origin != Origin::Upload;
        if signed {
            ni.sign(&self.inner.key);
        }
        let row = self.row(&ni, origin, signed);
        self.record(ni, row).await
    }

    fn row(&self, ni: &NarInfo, origin: Origin, kiln_signed: bool) -> CachePath {
        CachePath {
            hash_part: ni.store_path.hash_part().to_string(),
            store_path: ni.store_path.to_string(),
            nar_hash: ni.nar_hash.to_string(),
            nar_size: ni.nar_size as i64,
            file_hash: ni.file_hash.as_ref().map(|h| h.to_string()).unwrap_or_default(),
            file_size: ni.file_size.unwrap_or(0) as i64,
            nar_file: ni.url.clone(),
            compression: ni.compression.clone(),
            refs: ni.references.iter().map(|r| r.base_name()).collect::<Vec<_>>().join(" "),
            deriver: ni.deriver.as_ref().map(|d| d.base_name()),
            ca: ni.ca.clone(),
            origin: origin.as_str().to_string(),
            created_at: db::now(),
            kiln_signed,
        }
    }

    /// Writes the narinfo and its row. A build writes the narinfo first and
    /// replaces an upload's row; an upload claims the row first and writes
    /// its narinfo only if the path was not there, so it never overwrites
    /// a narinfo of Kiln's.
    async fn record(&self, ni: NarInfo, row: CachePath) -> Result<(NarInfo, bool), CacheError> {
        if row.origin == Origin::Upload.as_str() {
            let mut c = self.inner.db.conn().await?;
            if !cache_paths::insert(c.ex(), &row).await? {
                drop(c);
                let existing = self.narinfo(&ni.store_path).await?;
                return Ok((existing.unwrap_or(ni), false));
            }
            drop(c);
            if let Err(e) = self.write_narinfo(&ni).await {
                let mut c = self.inner.db.conn().await?;
                cache_paths::delete(c.ex(), &row.hash_part).await?;
                return Err(e);
            }
            return Ok((ni, true));
        }
        self.write_narinfo(&ni).await?;
        let mut c = self.inner.db.conn().await?;
        let new = cache_paths::insert_or_replace_upload(c.ex(), &row).await?;
        Ok((ni, new))
    }

    async fn write_narinfo(&self, ni: &NarInfo) -> Result<(), CacheError> {
        let key = format!("{}.narinfo", ni.store_path.hash_part());
        self.inner.storage.put_bytes(&key, ni.render().into_bytes()).await?;
        Ok(())
    }

    /// The narinfos of those of `paths` the cache holds, by path: one
    /// query per 500 paths and the files read off the runtime's threads,
    /// where asking [`Cache::narinfo`] for each would cost a query apiece.
    pub async fn narinfos(&self, paths: &[StorePath]) -> Result<HashMap<String, NarInfo>, CacheError> {
        let hashes: Vec<&str> = paths.iter().map(|p| p.hash_part()).collect();
        let present: HashSet<String> = {
            let mut c = self.inner.db.conn().await?;
            cache_paths::present(c.ex(), &hashes).await?.into_iter().collect()
        };
        let keys: Vec<(String, String)> = paths
            .iter()
            .filter(|p| present.contains(p.hash_part()))
            .map(|p| (p.to_string(), format!("{}.narinfo", p.hash_part())))
            .collect();
        let read = self.inner.storage.read_many(keys.iter().map(|(_, k)| k.clone()).collect()).await?;
        Ok(keys
            .into_iter()
            .zip(read)
            .filter_map(|((p, _), bytes)| Some((p, NarInfo::parse(std::str::from_utf8(bytes.as_deref()?).ok()?).ok()?)))
            .collect())
    }

    /// The narinfo of a path in the cache.
    pub async fn narinfo(&self, path: &StorePath) -> Result<Option<NarInfo>, CacheError> {
        Ok(self.narinfos(std::slice::from_ref(path)).await?.into_values().next())
    }
}
