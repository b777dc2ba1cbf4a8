//! The binary cache: Kiln's store of record for build outputs, served to
//! Nix clients as a signed binary cache. `ingest` takes a NAR stream with
//! its path info, validates it while streaming, computes NarHash/NarSize and
//! FileHash/FileSize in the same pass, compresses, writes atomically, signs
//! the narinfo and records the path in the database; a path already there
//! costs one lookup. The signing key is loaded from `cache.secret_key_file`,
//! or generated there on first start.

pub mod gc;
pub mod storage;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::config::{Compression, Config};
use crate::db::cache_paths::{self, CachePath};
use crate::db::{self, Db, DbError};
use crate::nix::hash::{Hash, Sha256Stream};
use crate::nix::nar::{NarError, NarParser};
use crate::nix::signing::{KeyError, SigningKey};
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

/// Where a path came from, for retention.
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
    /// Largest upload (`cache.max_upload_mib`).
    max_nar_bytes: u64,
    /// Largest build output (`queue.max_output_mib`).
    max_output_bytes: u64,
    priority: u32,
    mirror_upstream: bool,
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
                max_nar_bytes: config.cache.max_upload_mib.saturating_mul(1024 * 1024).max(1),
                max_output_bytes: config.queue.max_output_mib.saturating_mul(1024 * 1024).max(1),
                priority: config.cache.priority,
                mirror_upstream: config.cache.mirror_upstream,
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

    pub fn max_nar_bytes(&self) -> u64 {
        self.inner.max_nar_bytes
    }

    /// Whether upstream paths sent to builders are kept here too.
    pub fn mirror_upstream(&self) -> bool {
        self.inner.mirror_upstream
    }

    /// The largest build output taken in (`queue.max_output_mib`).
    pub fn max_output_bytes(&self) -> u64 {
        self.inner.max_output_bytes
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

    /// Which of `paths` the cache holds as Kiln's own (built here, or taken
    /// from a trusted upstream), with their narinfo in storage: what the
    /// queue counts as built. An upload never counts, and neither does an
    /// index row whose files are gone (a cache directory emptied or swapped).
    pub async fn own_paths(&self, paths: &[StorePath]) -> Result<std::collections::HashSet<String>, CacheError> {
        let hashes: Vec<&str> = paths.iter().map(|p| p.hash_part()).collect();
        let found: std::collections::HashSet<String> = {
            let mut c = self.inner.db.conn().await?;
            cache_paths::own_among(c.ex(), &hashes).await?.into_iter().collect()
        };
        Ok(paths
            .iter()
            .filter(|p| found.contains(p.hash_part()))
            .filter(|p| self.inner.storage.exists(&format!("{}.narinfo", p.hash_part())))
            .map(|p| p.to_string())
            .collect())
    }

    /// Stores a NAR stream as `info.path`. With `expect`, the NAR must have
    /// that hash and size or nothing is kept. Returns the narinfo, and
    /// whether the path was new.
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
        if let Some(existing) = self.narinfo(&info.path).await? {
            return Ok((existing, false));
        }
        let bridge = tokio_util::io::SyncIoBridge::new(nar);
        let inner = self.inner.clone();
        // Each origin has its own limit: a build's output is bounded by
        // queue.max_output_mib, never by the upload limit.
        let limit = match origin {
            Origin::Build => self.inner.max_output_bytes,
            Origin::Upload => self.inner.max_nar_bytes,
            Origin::Upstream => u64::MAX,
        };
        let written = tokio::task::spawn_blocking(move || inner.write_nar(bridge, expect, limit))
            .await
            .map_err(|e| CacheError::Io(std::io::Error::other(e)))??;
        self.publish(info, written, origin).await
    }

    /// The same, for a NAR already in a synchronous reader (uploads being
    /// decompressed run here, on a blocking thread).
    fn ingest_blocking_nar(&self, nar: impl Read, expect: Option<(Hash, u64)>) -> Result<Written, CacheError> {
        self.inner.write_nar(nar, expect, self.inner.max_nar_bytes)
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
        ni.sign(&self.inner.key);
        let text = ni.render();
        let storage = self.inner.storage.clone();
        let key = format!("{}.narinfo", info.path.hash_part());
        tokio::task::spawn_blocking(move || storage.put_bytes(&key, text.as_bytes()))
            .await
            .map_err(|e| CacheError::Io(std::io::Error::other(e)))??;
        let row = CachePath {
            hash_part: info.path.hash_part().to_string(),
            store_path: info.path.to_string(),
            nar_hash: w.nar_hash.to_string(),
            nar_size: w.nar_size as i64,
            file_hash: w.file_hash.to_string(),
            file_size: w.file_size as i64,
            nar_file: w.key,
            compression: self.inner.compression.name().to_string(),
            refs: info.references.iter().map(|r| r.base_name()).collect::<Vec<_>>().join(" "),
            deriver: info.deriver.as_ref().map(|d| d.base_name()),
            ca: info.ca,
            origin: origin.as_str().to_string(),
            created_at: db::now(),
        };
        let mut c = self.inner.db.conn().await?;
        let new = cache_paths::insert(c.ex(), &row).await?;
        Ok((ni, new))
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

    /// Verifies an uploaded NAR (compressed as the client sent it) against
    /// its narinfo and stores it as Kiln's own: recompressed, re-signed.
    pub async fn ingest_upload(&self, uploaded: NarInfo, file: PathBuf) -> Result<(NarInfo, bool), CacheError> {
        let info = PathInfo {
            path: uploaded.store_path.clone(),
            references: uploaded.references.clone(),
            deriver: uploaded.deriver.clone(),
            ca: uploaded.ca.clone(),
        };
        if let Some(existing) = self.narinfo(&info.path).await? {
            return Ok((existing, false));
        }
        let this = self.clone();
        let compression = uploaded.compression.clone();
        let expect = Some((uploaded.nar_hash.clone(), uploaded.nar_size));
        let written = tokio::task::spawn_blocking(move || -> Result<Written, CacheError> {
            let f = std::fs::File::open(&file).map_err(CacheError::Io)?;
            let f = std::io::BufReader::with_capacity(256 * 1024, f);
            match compression.as_str() {
                "none" | "" => this.ingest_blocking_nar(f, expect),
                "xz" => this.ingest_blocking_nar(xz2::read::XzDecoder::new_multi_decoder(f), expect),
                "zstd" => this
                    .ingest_blocking_nar(zstd::stream::read::Decoder::with_buffer(f).map_err(CacheError::Io)?, expect),
                other => Err(CacheError::Compression(other.to_string())),
            }
        })
        .await
        .map_err(|e| CacheError::Io(std::io::Error::other(e)))??;
        self.publish(info, written, Origin::Upload).await
    }
}

impl Inner {
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
        if let Some(existing) = cache.narinfo(&info.path).await? {
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
