//! Build logs on disk. A stored log is one zstd-compressed file per
//! derivation, `<state_dir>/logs/<first two characters of the hash>/<drv
//! base name>.zst`; the logs of its earlier attempts that ended in a
//! machine fault (or were cut short) sit beside it, in `<drv base
//! name>.attempts/<try>.zst`. While a step builds, its log grows in an
//! uncompressed file under `logs/live/` ([`live`]), where viewers follow
//! it; when the attempt ends it is compressed into one of those places.
//! Every read is a stream, so no log is ever held whole in memory
//! (decision 017). With the cache in a bucket, a step's finished log is
//! also put there (`log/<drv base name>.zst`), and a node that did not run
//! the step fetches it into its own logs directory on first reading, so
//! every web node serves every log.

mod live;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub use live::{EOF_WAIT, Follower, Kept, LiveLog, Progress, Sink};

use crate::nix::StorePath;

/// The most of a log a page shows whole; the raw log has the rest.
pub const FULL_LIMIT: usize = 16 << 20;

/// See [`Logs::lines`].
pub fn lines_of(mut r: impl std::io::BufRead, tail: Option<usize>) -> (String, usize) {
    let mut kept: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let (mut before, mut bytes) = (0, 0);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        match tail {
            Some(n) => {
                kept.push_back(String::from_utf8_lossy(&line).into_owned());
                if kept.len() > n {
                    kept.pop_front();
                    before += 1;
                }
            }
            None => {
                bytes += line.len();
                if bytes > FULL_LIMIT {
                    break;
                }
                kept.push_back(String::from_utf8_lossy(&line).into_owned());
            }
        }
    }
    (kept.into_iter().collect(), before)
}

#[derive(Clone, Debug)]
pub struct Logs {
    root: PathBuf,
    /// The cache's bucket, where finished logs are shared between nodes.
    bucket: Option<crate::cache::Storage>,
    /// The logs of the steps building in this process, by derivation path.
    live: live::Registry,
}

impl Logs {
    pub fn new(state_dir: &Path) -> Logs {
        Logs { root: state_dir.join("logs"), bucket: None, live: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// Shares finished logs through the cache's storage when it is a
    /// bucket (on a directory, every node that reads it runs the queue).
    pub fn share_through(mut self, storage: &crate::cache::Storage) -> Logs {
        if storage.is_bucket() {
            self.bucket = Some(storage.clone());
        }
        self
    }

    /// The key of a derivation's log in the bucket.
    fn bucket_key(drv: &str) -> Option<String> {
        let p = drv_path(drv)?;
        let key = format!("log/{}.zst", p.base_name());
        crate::cache::storage::check_key(&key).ok().map(|_| key)
    }

    /// Puts a step's finished log into the bucket, if logs are shared.
    pub async fn publish(&self, drv: &str) {
        let (Some(bucket), Some(key), Some(path)) = (&self.bucket, Self::bucket_key(drv), self.path_for(drv)) else {
            return;
        };
        if let Err(e) = bucket.put_file(&path, &key).await {
            tracing::warn!(drv, error = %e, "cannot share a build log through the cache's bucket");
        }
    }

    /// Deletes the shared copies of derivations' logs (history pruning).
    pub async fn unpublish<'a>(&self, drvs: impl Iterator<Item = &'a str>) {
        let Some(bucket) = &self.bucket else { return };
        let keys: Vec<String> = drvs.filter_map(Self::bucket_key).collect();
        if keys.is_empty() {
            return;
        }
        if let Err(e) = bucket.delete_many(keys).await {
            tracing::warn!(error = %e, "cannot delete shared build logs from the cache's bucket");
        }
    }

    /// Makes sure a finished log another node stored is here too: fetched
    /// from the bucket into the logs directory the first time it is read.
    pub async fn fetch_shared(&self, drv: &str) {
        let (Some(bucket), Some(key), Some(path)) = (&self.bucket, Self::bucket_key(drv), self.path_for(drv)) else {
            return;
        };
        if path.exists() {
            return;
        }
        let Ok(Some(mut r)) = bucket.reader(&key).await else { return };
        let fetched: std::io::Result<()> = async {
            use tokio::io::AsyncWriteExt;
            let dir = path.parent().expect("logs have a directory");
            tokio::fs::create_dir_all(dir).await?;
            // Two readers may fetch the same log at once: each its own file.
            let mut n = [0u8; 8];
            let _ = getrandom::fill(&mut n);
            let tmp = dir.join(format!(".fetch-{}", crate::nix::hash::to_hex(&n)));
            let mut f = tokio::fs::File::create(&tmp).await?;
            let copied = tokio::io::copy(&mut r, &mut f).await.and(f.flush().await);
            if let Err(e) = copied {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        if let Err(e) = fetched {
            tracing::warn!(drv, error = %e, "cannot fetch a shared build log");
        }
    }

    /// The stored log of a derivation, given as a full path or a base name;
    /// `None` unless it names a valid `.drv` store path.
    pub fn path_for(&self, drv: &str) -> Option<PathBuf> {
        let p = drv_path(drv)?;
        Some(self.root.join(&p.hash_part()[..2]).join(format!("{}.zst", p.base_name())))
    }

    /// Where the logs of a derivation's earlier attempts go.
    fn attempts_dir(&self, drv: &str) -> Option<PathBuf> {
        let p = drv_path(drv)?;
        Some(self.root.join(&p.hash_part()[..2]).join(format!("{}.attempts", p.base_name())))
    }

    /// The stored log of try `n` of a derivation, one that did not end the
    /// step. Built from a checked store path and a number: it cannot name
    /// anything outside the logs directory.
    pub fn attempt_path(&self, drv: &str, n: u32) -> Option<PathBuf> {
        Some(self.attempts_dir(drv)?.join(format!("{n}.zst")))
    }

    /// The tries of a derivation whose logs are kept as earlier attempts,
    /// in order.
    pub fn attempts(&self, drv: &str) -> Vec<u32> {
        let Some(dir) = self.attempts_dir(drv) else { return Vec::new() };
        let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
        let mut tries: Vec<u32> =
            entries.flatten().filter_map(|e| e.file_name().to_str()?.strip_suffix(".zst")?.parse().ok()).collect();
        tries.sort_unstable();
        tries
    }

    /// Forgets attempt logs from try `n` on: a step whose tries were reset
    /// (a restart) starts its attempts afresh, and what an earlier round
    /// left under those numbers would pass for this one's.
    pub fn forget_attempts_from(&self, drv: &str, n: u32) {
        for t in self.attempts(drv).into_iter().filter(|t| *t >= n) {
            if let Some(p) = self.attempt_path(drv, t) {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    /// Deletes every stored log of a derivation: its log, its earlier
    /// attempts', and `file` (the path the database recorded) if that is
    /// another file of this store. Returns how many files went.
    pub fn remove_all(&self, drv: &str, file: Option<&str>) -> std::io::Result<u64> {
        let mut n = 0;
        let mut gone = |p: &Path| -> std::io::Result<()> {
            match std::fs::remove_file(p) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            Ok(())
        };
        let own = self.path_for(drv);
        if let Some(p) = &own {
            gone(p)?;
        }
        if let Some(f) = file.map(Path::new).filter(|f| own.as_deref() != Some(*f) && self.is_stored_log(f)) {
            gone(f)?;
        }
        for t in self.attempts(drv) {
            if let Some(p) = self.attempt_path(drv, t) {
                gone(&p)?;
            }
        }
        if let Some(dir) = self.attempts_dir(drv) {
            let _ = std::fs::remove_dir(dir);
        }
        Ok(n)
    }

    /// Whether `p` is a stored log's place (a path from the database must
    /// not reach outside the logs directory).
    fn is_stored_log(&self, p: &Path) -> bool {
        p.strip_prefix(&self.root).is_ok_and(|rel| {
            rel.components().count() == 2 && rel.components().all(|c| matches!(c, std::path::Component::Normal(_)))
        })
    }

    /// Stores a whole log (compressed), replacing an older one: for the
    /// few lines of a step that built nothing.
    pub fn write(&self, drv: &str, text: &[u8]) -> std::io::Result<PathBuf> {
        let path = self.path_for(drv).ok_or_else(|| std::io::Error::other(format!("{drv:?} is not a derivation")))?;
        store(&mut &text[..], &path)?;
        Ok(path)
    }

    /// The lines of a stored log a page shows: the last `tail` lines, or
    /// with `tail = None` the first [`FULL_LIMIT`] bytes; and how many lines
    /// come before what is returned. Reads the log as a stream, so memory
    /// stays bounded however large it is.
    pub fn lines(&self, drv: &str, tail: Option<usize>) -> Option<(String, usize)> {
        let r = std::io::BufReader::new(self.open(drv)?);
        Some(lines_of(r, tail))
    }

    /// A reader of the decompressed log, if there is one.
    pub fn open(&self, drv: &str) -> Option<impl std::io::Read + Send + 'static> {
        decompress(&self.path_for(drv)?)
    }

    /// A reader of the decompressed log of try `n`, if it is kept.
    pub fn open_attempt(&self, drv: &str, n: u32) -> Option<impl std::io::Read + Send + 'static> {
        decompress(&self.attempt_path(drv, n)?)
    }
}

/// A derivation given as a full path or a base name.
fn drv_path(drv: &str) -> Option<StorePath> {
    let p = if drv.starts_with('/') { StorePath::parse(drv).ok()? } else { StorePath::from_base_name(drv).ok()? };
    p.is_derivation().then_some(p)
}

fn decompress(path: &Path) -> Option<zstd::stream::read::Decoder<'static, std::io::BufReader<std::fs::File>>> {
    zstd::stream::read::Decoder::new(std::fs::File::open(path).ok()?).ok()
}

/// Compresses what `src` reads into `dest`, atomically: a temporary file
/// beside it, synced, renamed over it. Streamed: memory stays that of the
/// encoder whatever the size.
fn store(src: &mut impl std::io::Read, dest: &Path) -> std::io::Result<()> {
    static TMP: AtomicU64 = AtomicU64::new(0);
    let dir = dest.parent().expect("a log has a parent directory");
    std::fs::create_dir_all(dir)?;
    // Unique in the process too: attempts finish concurrently.
    let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), TMP.fetch_add(1, Ordering::Relaxed)));
    let written = (|| {
        let f = std::fs::File::create(&tmp)?;
        let mut enc = zstd::stream::write::Encoder::new(f, 3)?;
        std::io::copy(src, &mut enc)?;
        enc.flush()?;
        enc.finish()?.sync_all()?;
        std::fs::rename(&tmp, dest)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests;
