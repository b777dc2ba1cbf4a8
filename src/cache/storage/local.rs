//! The cache on a local directory. Every write is atomic (temporary file,
//! fsync, rename, directory fsync).

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::{ByteStream, Reader, StorageError, check_key};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io { path: path.display().to_string(), source }
}

/// Temporary files start with this, in the directory of their final key,
/// so the rename is atomic; garbage collection removes stale ones.
pub const TEMP_PREFIX: &str = ".tmp-";

#[derive(Debug, Clone)]
pub(super) struct Dir {
    root: PathBuf,
}

fn not_found(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound
}

impl Dir {
    pub(super) fn open(root: &Path) -> Result<Self, StorageError> {
        for d in ["", "nar", "pending"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        Ok(Dir { root: root.to_path_buf() })
    }

    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    pub(super) fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// A new temporary file beside `key`'s final place.
    pub(super) fn temp_for(&self, key: &str) -> Result<(std::fs::File, PathBuf), StorageError> {
        let final_path = self.path(key)?;
        let dir = final_path.parent().expect("keys have a parent");
        temp_in(dir)
    }

    pub(super) fn commit(&self, tmp: &Path, key: &str) -> Result<(), StorageError> {
        let dest = self.path(key)?;
        std::fs::rename(tmp, &dest).map_err(io(&dest))?;
        // The rename itself survives a crash once the directory is synced.
        if let Some(dir) = dest.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }

    pub(super) fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<(), StorageError> {
        let (mut f, tmp) = self.temp_for(key)?;
        let r = f.write_all(bytes).and_then(|_| f.sync_all());
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(StorageError::Io { path: tmp.display().to_string(), source: e });
        }
        self.commit(&tmp, key)
    }

    pub(super) fn exists(&self, key: &str) -> bool {
        self.path(key).map(|p| p.is_file()).unwrap_or(false)
    }

    pub(super) fn delete(&self, key: &str) -> Result<(), StorageError> {
        let p = self.path(key)?;
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(StorageError::Io { path: p.display().to_string(), source: e }),
        }
    }

    pub(super) fn list(&self, dir: &str) -> Result<Vec<(String, u64, u64)>, StorageError> {
        let d = if dir.is_empty() { self.root.clone() } else { self.path(dir)? };
        list_files(&d)
    }

    pub(super) fn remove_temp(&self, dir: &str, name: &str) {
        let d = if dir.is_empty() { Some(self.root.clone()) } else { self.path(dir).ok() };
        if let Some(d) = d {
            let _ = std::fs::remove_file(d.join(name));
        }
    }

    pub(super) fn read(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        // A narinfo is a few hundred bytes, nearly always in the page
        // cache: reading it here is cheaper than handing it to the
        // blocking pool.
        let p = self.path(key)?;
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(Bytes::from(b))),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(StorageError::Io { path: p.display().to_string(), source: e }),
        }
    }

    pub(super) fn size(&self, key: &str) -> Result<Option<u64>, StorageError> {
        let p = self.path(key)?;
        match std::fs::metadata(&p) {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(StorageError::Io { path: p.display().to_string(), source: e }),
        }
    }

    pub(super) fn read_range(&self, key: &str, start: u64, count: u64) -> Result<Option<ByteStream>, StorageError> {
        let p = self.path(key)?;
        match std::fs::File::open(&p) {
            Ok(f) => Ok(Some(Box::pin(blocking_file_stream(f, start, count)))),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(StorageError::Io { path: p.display().to_string(), source: e }),
        }
    }

    pub(super) async fn reader(&self, key: &str) -> Result<Option<Reader>, StorageError> {
        let p = self.path(key)?;
        match tokio::fs::File::open(&p).await {
            Ok(f) => Ok(Some(Box::new(f))),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(StorageError::Io { path: p.display().to_string(), source: e }),
        }
    }

    pub(super) fn claim(&self, key: &str, for_key: &str) -> Result<Option<PathBuf>, StorageError> {
        let from = self.path(key)?;
        let (_, tmp) = self.temp_for(for_key)?;
        match std::fs::rename(&from, &tmp) {
            Ok(()) => Ok(Some(tmp)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                if not_found(&e) {
                    Ok(None)
                } else {
                    Err(StorageError::Io { path: from.display().to_string(), source: e })
                }
            }
        }
    }
}

/// A new temporary file in `dir`.
pub(super) fn temp_in(dir: &Path) -> Result<(std::fs::File, PathBuf), StorageError> {
    let mut n = [0u8; 8];
    let _ = getrandom::fill(&mut n);
    let tmp = dir.join(format!("{TEMP_PREFIX}{}", crate::nix::hash::to_hex(&n)));
    let f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io(&tmp))?;
    Ok((f, tmp))
}

/// Files of a directory: name, size and age in seconds.
pub(super) fn list_files(d: &Path) -> Result<Vec<(String, u64, u64)>, StorageError> {
    let mut out = Vec::new();
    let now = std::time::SystemTime::now();
    for e in std::fs::read_dir(d).map_err(io(d))? {
        let e = e.map_err(io(d))?;
        let Ok(meta) = e.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).map(|a| a.as_secs()).unwrap_or(0);
        out.push((e.file_name().to_string_lossy().into_owned(), meta.len(), age));
    }
    Ok(out)
}

/// Streams `count` bytes of `f` from `start`, read on one blocking thread
/// that hands over large chunks: tokio's async file pays a thread hand-off
/// per read.
pub(super) fn blocking_file_stream(
    mut f: std::fs::File,
    start: u64,
    count: u64,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    use std::io::{Read, Seek, SeekFrom};
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = f.seek(SeekFrom::Start(start)) {
            let _ = tx.blocking_send(Err(e));
            return;
        }
        let mut left = count;
        while left > 0 {
            let mut buf = vec![0u8; left.min(512 * 1024) as usize];
            match f.read(&mut buf) {
                // Shorter than its length a moment ago: cut, not passed off
                // as whole (`u64::MAX` reads to the end).
                Ok(0) if count != u64::MAX => {
                    let _ = tx.blocking_send(Err(std::io::ErrorKind::UnexpectedEof.into()));
                    return;
                }
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    left -= n as u64;
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[cfg(test)]
mod tests {
    use super::super::Storage;
    use super::*;

    #[tokio::test]
    async fn keys_cannot_escape_the_root() {
        let d = tempfile::tempdir().unwrap();
        let s = Storage::open(d.path()).unwrap();
        for bad in
            ["", "..", "../x", "nar/../../x", "/etc/passwd", "a/b/c", ".tmp-x", "nar/.hidden", "a\0b", "a b", "nar/"]
        {
            assert!(matches!(s.read(bad).await, Err(StorageError::BadKey(_))), "{bad:?}");
            assert!(matches!(s.temp_for(bad), Err(StorageError::BadKey(_))), "{bad:?}");
        }
        s.put_bytes("nar/x.nar", b"abc".to_vec()).await.unwrap();
        assert!(s.exists("nar/x.nar").await.unwrap());
        assert_eq!(std::fs::read(d.path().join("nar/x.nar")).unwrap(), b"abc");
        assert!(s.list("nar").await.unwrap().iter().all(|(n, _, _)| !n.starts_with(TEMP_PREFIX)), "no temporary left");
        s.delete("nar/x.nar").await.unwrap();
        assert!(!s.exists("nar/x.nar").await.unwrap());
        s.delete("nar/x.nar").await.expect("a missing key is no error");
    }
}
