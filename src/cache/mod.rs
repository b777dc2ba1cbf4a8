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

pub mod gc;
pub mod storage;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::config::{Compression, Config};
use crate::db::cache_paths::{self, CachePath};
use crate::db::{self, Db, DbError};
use crate::nix::hash::{Hash, Sha256Stream};
use crate::nix::nar::{NarError, NarParser};
use crate::nix::signing::{KeyError, PublicKey, SigningKey};
use crate::nix::{NarInfo, StorePath};
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

/// Where the public half of a generated key goes: beside the secret.
pub fn public_key_path(secret: &Path) -> PathBuf {
    secret.with_extension("pub")
}

/// Loads the signing key, generating it (and its `.pub`) if absent.
/// Returns the key and whether it was generated now.
pub fn load_or_generate_key(secret: &Path, name: &str) -> Result<(SigningKey, bool), CacheError> {
    if secret.exists() {
        return Ok((SigningKey::load(secret)?, false));
    }
    if let Some(dir) = secret.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| CacheError::Dir { path: dir.display().to_string(), source })?;
        use std::os::unix::fs::PermissionsExt;
        // Only tighten a directory Kiln made for its keys.
        if dir.ends_with("keys") {
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
    }
    let key = SigningKey::generate(name)?;
    let public = public_key_path(secret);
    if public.exists() {
        // A stale public key without its secret would mislead users.
        let _ = std::fs::remove_file(&public);
    }
    key.write_files(secret, &public)?;
    Ok((key, true))
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
        let storage = Storage::open(&config.cache_dir())?;
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
        cache.inner.storage.put_bytes("nix-cache-info", cache.cache_info().as_bytes())?;
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
        Ok(paths
            .iter()
            .filter(|p| own.contains(p.hash_part()))
            .filter(|p| self.inner.storage.exists(&format!("{}.narinfo", p.hash_part())))
            .map(|p| p.to_string())
            .collect())
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
        let text = ni.render();
        let storage = self.inner.storage.clone();
        let key = format!("{}.narinfo", ni.store_path.hash_part());
        tokio::task::spawn_blocking(move || storage.put_bytes(&key, text.as_bytes()))
            .await
            .map_err(|e| CacheError::Io(std::io::Error::other(e)))??;
        Ok(())
    }

    /// The narinfo of a path in the cache.
    pub async fn narinfo(&self, path: &StorePath) -> Result<Option<NarInfo>, CacheError> {
        let mut c = self.inner.db.conn().await?;
        if !cache_paths::contains(c.ex(), path.hash_part()).await? {
            return Ok(None);
        }
        let key = format!("{}.narinfo", path.hash_part());
        match std::fs::read_to_string(self.inner.storage.path(&key)?) {
            Ok(t) => Ok(NarInfo::parse(&t).ok()),
            Err(_) => Ok(None),
        }
    }

    /// Stores what `nix copy --to` uploaded, as the uploader made it: the
    /// NAR file in `pending` (compressed as the narinfo says) must
    /// decompress to a valid NAR with the narinfo's NarHash and NarSize,
    /// hash to its FileHash and FileSize (when given) and to the name in
    /// its URL; it is then kept under that URL, so the uploader's own Nix,
    /// which remembers the narinfo it wrote, can fetch it back. Without
    /// `pending`, the NAR file must already be at that URL. The narinfo
    /// keeps the uploader's fields and signatures; Kiln adds its signature
    /// only with `cache.require_upload_signatures` and a valid signature of
    /// one of `cache.trusted_upload_keys`. A path already in the cache is
    /// kept as it is. Nothing is stored unless every check passes.
    pub async fn ingest_upload(
        &self,
        uploaded: NarInfo,
        pending: Option<PathBuf>,
    ) -> Result<(NarInfo, bool), CacheError> {
        if let Some(existing) = self.kept(&uploaded.store_path, Origin::Upload).await? {
            return Ok((existing, false));
        }
        if uploaded.nar_size > self.inner.max_upload_bytes {
            return Err(CacheError::TooLarge(self.inner.max_upload_bytes));
        }
        let inner = self.inner.clone();
        let check = uploaded.clone();
        let w = tokio::task::spawn_blocking(move || inner.store_upload(&check, pending.as_deref()))
            .await
            .map_err(|e| CacheError::Io(std::io::Error::other(e)))??;
        let mut ni = uploaded;
        ni.file_hash = Some(w.file_hash);
        ni.file_size = Some(w.file_size);
        let vouched = !self.inner.vouched_upload_keys.is_empty() && ni.verify(&self.inner.vouched_upload_keys);
        if vouched {
            ni.sign(&self.inner.key);
        }
        let row = self.row(&ni, Origin::Upload, vouched);
        self.record(ni, row).await
    }
}

/// The NAR file extension Nix gives a compression method; only the ones
/// Kiln can decompress.
fn nar_extension(compression: &str) -> Result<&'static str, CacheError> {
    match compression {
        "none" | "" => Ok(""),
        "xz" => Ok(".xz"),
        "zstd" => Ok(".zst"),
        other => Err(CacheError::Compression(other.to_string())),
    }
}

/// Reads through to `inner`, hashing and counting what it reads.
struct HashingReader<R> {
    inner: R,
    hash: Sha256Stream,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Parses a NAR from `nar` to its end and checks its hash and size; stops
/// reading as soon as it is longer than `size`.
fn check_nar(mut nar: impl Read, hash: &Hash, size: u64) -> Result<(), CacheError> {
    let mut parser = NarParser::new();
    let mut nar_hash = Sha256Stream::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match nar.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CacheError::Io(e)),
        };
        let chunk = &buf[..n];
        if parser.feed(chunk, &mut |_| {})? != n {
            return Err(CacheError::Nar(NarError::Trailing));
        }
        nar_hash.update(chunk);
        if nar_hash.len() > size {
            return Err(CacheError::Mismatch(format!("the NAR is longer than its NarSize of {size} bytes")));
        }
    }
    parser.finish()?;
    let got_size = nar_hash.len();
    let got = nar_hash.finish();
    if &got != hash || got_size != size {
        return Err(CacheError::Mismatch(format!(
            "narinfo says {hash} ({size} bytes), the NAR is {got} ({got_size} bytes)"
        )));
    }
    Ok(())
}

impl Inner {
    /// Claims an uploaded NAR file from `pending` (so a second upload of the
    /// same name cannot swap it while it is checked), checks it against the
    /// narinfo, and moves it to the narinfo's URL. Without `pending`, the
    /// file already at the URL is checked instead: Nix does not send a NAR
    /// file the cache already has (another path with the same contents).
    fn store_upload(&self, ni: &NarInfo, pending: Option<&Path>) -> Result<Written, CacheError> {
        let key = ni.url.clone();
        let ext = nar_extension(&ni.compression)?;
        if !key.ends_with(&format!(".nar{ext}")) {
            return Err(CacheError::FileMismatch(format!(
                "URL {key} does not end in .nar{ext}, as Compression: {} says",
                ni.compression
            )));
        }
        let (tmp, guard) = match pending {
            Some(pending) => {
                let (_, tmp) = self.storage.temp_for(&key)?;
                let guard = RemoveOnDrop(Some(tmp.clone()));
                std::fs::rename(pending, &tmp).map_err(CacheError::Io)?;
                (tmp, Some(guard))
            }
            None => (self.storage.path(&key)?, None),
        };
        let f = std::fs::File::open(&tmp).map_err(CacheError::Io)?;
        let mut file =
            HashingReader { inner: std::io::BufReader::with_capacity(256 * 1024, f), hash: Sha256Stream::new() };
        match ext {
            "" => check_nar(&mut file, &ni.nar_hash, ni.nar_size)?,
            ".xz" => check_nar(xz2::read::XzDecoder::new_multi_decoder(&mut file), &ni.nar_hash, ni.nar_size)?,
            _ => check_nar(
                zstd::stream::read::Decoder::new(&mut file).map_err(CacheError::Io)?,
                &ni.nar_hash,
                ni.nar_size,
            )?,
        }
        // A decoder may stop at the end of its stream: the file is all of it.
        std::io::copy(&mut file, &mut std::io::sink()).map_err(CacheError::Io)?;
        let file_size = file.hash.len();
        let file_hash = file.hash.finish();
        if ni.file_hash.as_ref().is_some_and(|h| h != &file_hash) || ni.file_size.is_some_and(|n| n != file_size) {
            return Err(CacheError::FileMismatch(format!(
                "FileHash {} ({} bytes) claimed, the file is {file_hash} ({file_size} bytes)",
                ni.file_hash.as_ref().map(|h| h.to_string()).unwrap_or_else(|| "-".into()),
                ni.file_size.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            )));
        }
        // Named by its hash like every NAR file here, so a file of that name
        // is always these bytes, whoever stored it.
        let named = format!("nar/{}.nar{ext}", file_hash.to_base32());
        if key != named {
            return Err(CacheError::FileMismatch(format!("URL {key} should be {named} for these bytes")));
        }
        if let Some(guard) = guard {
            if self.storage.exists(&key) {
                drop(guard);
            } else {
                self.storage.commit(&tmp, &key)?;
                std::mem::forget(guard);
            }
        }
        Ok(Written { nar_hash: ni.nar_hash.clone(), nar_size: ni.nar_size, file_hash, file_size, key })
    }

    /// Streams a NAR through the validator, the NAR hash and the compressor
    /// into a temporary file, then gives it its content-addressed name. On
    /// any error, or a NAR that does not match `expect`, nothing is kept.
    fn write_nar(&self, mut nar: impl Read, expect: Option<(Hash, u64)>, limit: u64) -> Result<Written, CacheError> {
        let ext = match self.compression {
            Compression::Zstd => ".zst",
            Compression::Xz => ".xz",
            Compression::None => "",
        };
        // The final name depends on the file hash, known only at the end.
        let (file, tmp) = self.storage.temp_for("nar/pending")?;
        let guard = RemoveOnDrop(Some(tmp.clone()));
        // Writing is the storage's side: its errors (a full disk) are the
        // coordinator's, never the NAR source's.
        let store_err =
            |e: std::io::Error| CacheError::Storage(StorageError::Io { path: tmp.display().to_string(), source: e });
        let hashing =
            HashingWriter { inner: std::io::BufWriter::with_capacity(256 * 1024, file), hash: Sha256Stream::new() };
        let mut enc: Box<dyn Encoder> = match self.compression {
            Compression::Zstd => {
                Box::new(zstd::stream::write::Encoder::new(hashing, self.zstd_level).map_err(store_err)?)
            }
            Compression::Xz => Box::new(xz2::write::XzEncoder::new(hashing, 6)),
            Compression::None => Box::new(Plain(hashing)),
        };
        let mut parser = NarParser::new();
        let mut nar_hash = Sha256Stream::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = match nar.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CacheError::Io(e)),
            };
            let chunk = &buf[..n];
            let used = parser.feed(chunk, &mut |_| {})?;
            if used != n {
                return Err(CacheError::Nar(NarError::Trailing));
            }
            nar_hash.update(chunk);
            if nar_hash.len() > limit {
                return Err(CacheError::TooLarge(limit));
            }
            enc.write_all(chunk).map_err(store_err)?;
        }
        parser.finish()?;
        let nar_size = nar_hash.len();
        let nar_hash = nar_hash.finish();
        if let Some((h, size)) = &expect
            && (h != &nar_hash || *size != nar_size)
        {
            return Err(CacheError::Mismatch(format!(
                "narinfo says {h} ({size} bytes), the NAR is {nar_hash} ({nar_size} bytes)"
            )));
        }
        let hashing = enc.finish_box().map_err(store_err)?;
        let file_size = hashing.hash.len();
        let file_hash = hashing.hash.finish();
        let file = hashing.inner.into_inner().map_err(|e| store_err(e.into_error()))?;
        file.sync_all().map_err(store_err)?;
        drop(file);
        let key = format!("nar/{}.nar{ext}", file_hash.to_base32());
        if self.storage.exists(&key) {
            // Same bytes already stored (content-addressed): keep the old file.
            drop(guard);
        } else {
            self.storage.commit(&tmp, &key)?;
            std::mem::forget(guard);
        }
        Ok(Written { nar_hash, nar_size, file_hash, file_size, key })
    }
}

struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256Stream,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

type Sink = HashingWriter<std::io::BufWriter<std::fs::File>>;

/// The three compressors behind one face, each handing back the sink.
trait Encoder: Write {
    fn finish_box(self: Box<Self>) -> std::io::Result<Sink>;
}

impl Encoder for zstd::stream::write::Encoder<'static, Sink> {
    fn finish_box(self: Box<Self>) -> std::io::Result<Sink> {
        (*self).finish()
    }
}

impl Encoder for xz2::write::XzEncoder<Sink> {
    fn finish_box(self: Box<Self>) -> std::io::Result<Sink> {
        (*self).finish()
    }
}

struct Plain(Sink);

impl Write for Plain {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Encoder for Plain {
    fn finish_box(self: Box<Self>) -> std::io::Result<Sink> {
        let mut s = self.0;
        s.flush()?;
        Ok(s)
    }
}

/// Path info of paths in the local Nix store (`nix path-info --json`), for
/// ingesting what was built or evaluated on this machine.
pub async fn local_path_info(paths: &[String]) -> Result<Vec<PathInfo>, CacheError> {
    let mut args = vec!["path-info".to_string(), "--json".to_string()];
    args.extend(paths.iter().cloned());
    let out = crate::nix::command::output("nix", &args)
        .await
        .map_err(|e| CacheError::Io(std::io::Error::other(e.to_string())))?;
    #[derive(serde::Deserialize)]
    struct Info {
        path: String,
        #[serde(default)]
        references: Vec<String>,
        deriver: Option<String>,
        ca: Option<String>,
    }
    let infos: Vec<Info> = serde_json::from_slice(&out).map_err(|e| CacheError::Io(std::io::Error::other(e)))?;
    let parse = |s: &str| StorePath::parse(s).map_err(|e| CacheError::Io(std::io::Error::other(e.to_string())));
    infos
        .into_iter()
        .map(|i| {
            Ok(PathInfo {
                path: parse(&i.path)?,
                references: i.references.iter().map(|r| parse(r)).collect::<Result<_, _>>()?,
                deriver: i.deriver.as_deref().map(parse).transpose()?,
                ca: i.ca,
            })
        })
        .collect()
}

/// Ingests paths of the local store (and nothing else of their closure).
pub async fn ingest_local(cache: &Cache, paths: &[String], origin: Origin) -> Result<Vec<NarInfo>, CacheError> {
    let mut out = Vec::new();
    for info in local_path_info(paths).await? {
        if let Some(existing) = cache.kept(&info.path, origin).await? {
            out.push(existing);
            continue;
        }
        let (rx, mut tx) = tokio::io::duplex(256 * 1024);
        let p = PathBuf::from(info.path.to_string());
        let dump = tokio::spawn(async move { crate::nix::nar::dump_path_async(&p, &mut tx).await });
        let (ni, _) = cache.ingest(info, rx, None, origin).await?;
        dump.await.map_err(|e| CacheError::Io(std::io::Error::other(e)))?.map_err(CacheError::Io)?;
        out.push(ni);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_loads() {
        let d = tempfile::tempdir().unwrap();
        let sk = d.path().join("keys/cache.sec");
        let (k1, new1) = load_or_generate_key(&sk, "kiln-1").unwrap();
        let (k2, new2) = load_or_generate_key(&sk, "kiln-1").unwrap();
        assert!(new1 && !new2);
        assert_eq!(k1.public(), k2.public());
        let pubtext = std::fs::read_to_string(public_key_path(&sk)).unwrap();
        assert_eq!(pubtext, k1.public().to_string());
    }
}
