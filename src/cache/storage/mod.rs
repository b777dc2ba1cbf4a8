//! Where the cache's files live, behind one small interface with two
//! backends: a local directory in Nix's own file-cache layout
//! (`nix-cache-info`, `<hash>.narinfo`, `nar/<filehash>.nar.<ext>`, so
//! `nix copy --from file://…` works on it too), and an S3-compatible bucket
//! with the same keys (decision 023). The rest of the cache puts, reads,
//! lists and deletes keys through this type only. Writes are atomic either
//! way: a file is written to a temporary file first (beside its key on a
//! directory, in the spool directory for a bucket) and only then given its
//! key, so a crash never leaves a half-written object visible.

mod local;
mod s3;

use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use thiserror::Error;
use tokio::io::AsyncRead;

pub use local::TEMP_PREFIX;
pub use s3::S3Settings;

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("cache storage {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("invalid cache key {0:?}")]
    BadKey(String),
    /// The object store failed or did not answer in time: the cache is
    /// unavailable, which says nothing about whether a key exists.
    #[error("cache storage unavailable: {0}")]
    Unavailable(String),
}

impl StorageError {
    /// Whether the storage itself is out of reach (a reader should hear
    /// "try again", never "not found").
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StorageError::Unavailable(_))
    }
}

/// Bytes of an object as they arrive.
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;
/// An object's bytes as a reader.
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;

#[derive(Debug, Clone)]
pub struct Storage {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Local(local::Dir),
    S3(s3::Bucket),
}

/// Keys are `name` or `dir/name` with names from a fixed alphabet, so no
/// key can leave a directory root or name another bucket's prefix.
pub fn check_key(key: &str) -> Result<(), StorageError> {
    let ok = !key.is_empty()
        && key.split('/').count() <= 2
        && key.split('/').all(|c| {
            !c.is_empty()
                && !c.starts_with('.')
                && c.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.+".contains(ch))
        });
    if ok { Ok(()) } else { Err(StorageError::BadKey(key.to_string())) }
}

impl Storage {
    /// A directory (created if missing).
    pub fn open(root: &Path) -> Result<Self, StorageError> {
        Ok(Storage { backend: Backend::Local(local::Dir::open(root)?) })
    }

    /// A bucket; objects are written from temporary files in `spool`.
    pub fn open_s3(settings: &S3Settings, spool: &Path) -> Result<Self, StorageError> {
        Ok(Storage { backend: Backend::S3(s3::Bucket::open(settings, spool)?) })
    }

    /// Whether this is a bucket (shared by every node) rather than a directory.
    pub fn is_bucket(&self) -> bool {
        matches!(self.backend, Backend::S3(_))
    }

    /// Where it is, for people: `file:///…` or `s3://bucket/prefix`.
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Local(d) => format!("file://{}", d.root().display()),
            Backend::S3(b) => b.location(),
        }
    }

    /// The file of a key, on a directory only: readers that can take a
    /// file (the NAR route's blocking reader) use it directly.
    pub fn local_path(&self, key: &str) -> Result<Option<PathBuf>, StorageError> {
        match &self.backend {
            Backend::Local(d) => d.path(key).map(Some),
            Backend::S3(_) => Ok(None),
        }
    }

    /// A new temporary file that [`Storage::commit`] can give `key`.
    pub fn temp_for(&self, key: &str) -> Result<(std::fs::File, PathBuf), StorageError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(d) => d.temp_for(key),
            Backend::S3(b) => b.temp(),
        }
    }

    /// Makes a finished temporary file (already fsynced) visible as `key`;
    /// the temporary file is gone afterwards.
    pub async fn commit(&self, tmp: &Path, key: &str) -> Result<(), StorageError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(d) => d.commit(tmp, key),
            Backend::S3(b) => b.commit(tmp, key).await,
        }
    }

    /// [`Storage::commit`] from a blocking thread of the runtime.
    pub fn commit_blocking(&self, tmp: &Path, key: &str) -> Result<(), StorageError> {
        match &self.backend {
            Backend::Local(d) => {
                check_key(key)?;
                d.commit(tmp, key)
            }
            Backend::S3(_) => tokio::runtime::Handle::current().block_on(self.commit(tmp, key)),
        }
    }

    /// Copies the file `src` to `key` (the file stays), atomically.
    pub async fn put_file(&self, src: &Path, key: &str) -> Result<(), StorageError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(d) => {
                let (_, tmp) = d.temp_for(key)?;
                let copied = std::fs::copy(src, &tmp).and_then(|_| std::fs::File::open(&tmp)?.sync_all());
                if let Err(source) = copied {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(StorageError::Io { path: src.display().to_string(), source });
                }
                d.commit(&tmp, key)
            }
            Backend::S3(b) => b.upload(src, key).await,
        }
    }

    /// Writes `bytes` as `key`, atomically.
    pub async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<(), StorageError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(d) => {
                let d = d.clone();
                let key = key.to_string();
                tokio::task::spawn_blocking(move || d.put_bytes(&key, &bytes))
                    .await
                    .map_err(|e| StorageError::Io { path: "put".into(), source: std::io::Error::other(e) })?
            }
            Backend::S3(b) => b.put_bytes(key, bytes).await,
        }
    }

    /// Writes a small file that nothing waits for: at once on a directory
    /// (an error is the caller's), in the background on a bucket (an error
    /// is logged), so opening the cache never waits on the network.
    pub fn put_info(&self, key: &str, bytes: Vec<u8>) -> Result<(), StorageError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(d) => d.put_bytes(key, &bytes),
            Backend::S3(b) => {
                let (b, key) = (b.clone(), key.to_string());
                tokio::spawn(async move {
                    if let Err(e) = b.put_bytes(&key, bytes).await {
                        tracing::warn!(error = %e, "cannot write to the cache's bucket");
                    }
                });
                Ok(())
            }
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, StorageError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(d) => Ok(d.exists(key)),
            Backend::S3(b) => b.size(key).await.map(|s| s.is_some()),
        }
    }

    /// [`Storage::exists`] from a blocking thread of the runtime.
    pub fn exists_blocking(&self, key: &str) -> Result<bool, StorageError> {
        match &self.backend {
            Backend::Local(d) => Ok(d.exists(key)),
            Backend::S3(_) => tokio::runtime::Handle::current().block_on(self.exists(key)),
        }
    }

    /// Deletes `key`; a key that is not there is no error.
    pub async fn delete(&self, key: &str) -> Result<(), StorageError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(d) => d.delete(key),
            Backend::S3(b) => b.delete(key).await,
        }
    }

    /// Deletes many keys (a bucket takes up to 1,000 a request).
    pub async fn delete_many(&self, keys: Vec<String>) -> Result<(), StorageError> {
        for k in &keys {
            check_key(k)?;
        }
        match &self.backend {
            Backend::Local(d) => {
                for k in keys {
                    d.delete(&k)?;
                }
                Ok(())
            }
            Backend::S3(b) => b.delete_many(keys).await,
        }
    }

    /// Entries under a directory key (`""`, `nar`, `pending`): names with
    /// size and age in seconds. On a directory, temporary files too.
    pub async fn list(&self, dir: &str) -> Result<Vec<(String, u64, u64)>, StorageError> {
        if !dir.is_empty() {
            check_key(dir)?;
        }
        match &self.backend {
            Backend::Local(d) => d.list(dir),
            Backend::S3(b) => b.list(dir).await,
        }
    }

    /// Removes a stale temporary file (its name starts with
    /// [`TEMP_PREFIX`]) of a directory key, or of the spool.
    pub fn remove_temp(&self, dir: &str, name: &str) {
        if !name.starts_with(TEMP_PREFIX) || name.contains('/') {
            return;
        }
        match &self.backend {
            Backend::Local(d) => d.remove_temp(dir, name),
            Backend::S3(b) => b.remove_temp(name),
        }
    }

    /// Temporary files of the spool (a bucket's only), with size and age.
    pub fn spool_temps(&self) -> Vec<(String, u64, u64)> {
        match &self.backend {
            Backend::Local(_) => Vec::new(),
            Backend::S3(b) => b.spool_temps(),
        }
    }

    /// A whole (small) object, `None` when there is none.
    pub async fn read(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(d) => d.read(key),
            Backend::S3(b) => b.read(key).await,
        }
    }

    /// Many small objects, in order (`None` for a missing one): read off
    /// the runtime's threads from a directory, 32 at a time from a bucket.
    pub async fn read_many(&self, keys: Vec<String>) -> Result<Vec<Option<Bytes>>, StorageError> {
        for k in &keys {
            check_key(k)?;
        }
        match &self.backend {
            Backend::Local(d) => {
                let d = d.clone();
                tokio::task::spawn_blocking(move || keys.iter().map(|k| d.read(k)).collect())
                    .await
                    .map_err(|e| StorageError::Io { path: "read".into(), source: std::io::Error::other(e) })?
            }
            Backend::S3(b) => b.each(keys, |b, k| async move { b.read(&k).await }).await,
        }
    }

    /// Whether each of many keys exists, in order: 32 at a time on a bucket.
    pub async fn exists_many(&self, keys: Vec<String>) -> Result<Vec<bool>, StorageError> {
        for k in &keys {
            check_key(k)?;
        }
        match &self.backend {
            Backend::Local(d) => Ok(keys.iter().map(|k| d.exists(k)).collect()),
            Backend::S3(b) => b.each(keys, |b, k| async move { Ok(b.size(&k).await?.is_some()) }).await,
        }
    }

    /// Where to send a client for `key` instead of serving it: a presigned
    /// URL, on a bucket with `redirect_nars`.
    pub async fn redirect(&self, key: &str) -> Result<Option<String>, StorageError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(_) => Ok(None),
            Backend::S3(b) => b.presigned(key).await,
        }
    }

    /// An object's size, `None` when there is none.
    pub async fn size(&self, key: &str) -> Result<Option<u64>, StorageError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(d) => d.size(key),
            Backend::S3(b) => b.size(key).await,
        }
    }

    /// `count` bytes of an object from `start`, as they arrive.
    pub async fn read_range(&self, key: &str, start: u64, count: u64) -> Result<Option<ByteStream>, StorageError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(d) => d.read_range(key, start, count),
            Backend::S3(b) => b.read_range(key, start, count).await,
        }
    }

    /// An object as a reader, `None` when there is none.
    pub async fn reader(&self, key: &str) -> Result<Option<Reader>, StorageError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(d) => d.reader(key).await,
            Backend::S3(b) => Ok(b
                .read_range(key, 0, u64::MAX)
                .await?
                .map(|s| Box::new(tokio_util::io::StreamReader::new(s)) as Reader)),
        }
    }

    /// A local file holding `key`'s bytes for a blocking reader, and
    /// whether it is a temporary copy (a bucket's object, fetched into the
    /// spool) that the caller removes. On a directory, the file itself.
    pub fn fetch_blocking(&self, key: &str) -> Result<Option<(PathBuf, bool)>, StorageError> {
        check_key(key)?;
        match &self.backend {
            Backend::Local(d) => Ok(d.path(key).ok().filter(|p| p.is_file()).map(|p| (p, false))),
            Backend::S3(b) => tokio::runtime::Handle::current().block_on(b.fetch(key)).map(|o| o.map(|p| (p, true))),
        }
    }

    /// Moves `key` into a temporary file for `for_key` that only the
    /// caller holds (so nobody can swap it while it is checked): a rename
    /// on a directory, a download and delete on a bucket. From a blocking
    /// thread.
    pub fn claim_blocking(&self, key: &str, for_key: &str) -> Result<Option<PathBuf>, StorageError> {
        check_key(key)?;
        check_key(for_key)?;
        match &self.backend {
            Backend::Local(d) => d.claim(key, for_key),
            Backend::S3(b) => tokio::runtime::Handle::current().block_on(async {
                let Some(tmp) = b.fetch(key).await? else { return Ok(None) };
                b.delete(key).await?;
                Ok(Some(tmp))
            }),
        }
    }
}
