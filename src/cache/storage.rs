//! Where the cache's files live: a directory in Nix's own file-cache layout
//! (`nix-cache-info`, `<hash>.narinfo`, `nar/<filehash>.nar.<ext>`), so
//! `nix copy --from file://…` works on it too. Every write is atomic
//! (temporary file, fsync, rename), so a crash never leaves a half-written
//! file visible. This type is the seam for an S3-compatible backend: the
//! rest of the cache only puts, opens, lists and deletes keys through it.

use std::io::Write;
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("cache storage {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("invalid cache key {0:?}")]
    BadKey(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io { path: path.display().to_string(), source }
}

#[derive(Debug, Clone)]
pub struct Storage {
    root: PathBuf,
}

/// Temporary files start with this, in the directory of their final key,
/// so the rename is atomic; garbage collection removes stale ones.
pub const TEMP_PREFIX: &str = ".tmp-";

impl Storage {
    pub fn open(root: &Path) -> Result<Self, StorageError> {
        for d in ["", "nar", "pending"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        Ok(Storage { root: root.to_path_buf() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file for a key. Keys are `name` or `dir/name` with names from a
    /// fixed alphabet, so no key can leave the root.
    pub fn path(&self, key: &str) -> Result<PathBuf, StorageError> {
        let ok = !key.is_empty()
            && key.split('/').count() <= 2
            && key.split('/').all(|c| {
                !c.is_empty()
                    && !c.starts_with('.')
                    && c.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.+".contains(ch))
            });
        if !ok {
            return Err(StorageError::BadKey(key.to_string()));
        }
        Ok(self.root.join(key))
    }

    /// A new temporary file beside `key`'s final place.
    pub fn temp_for(&self, key: &str) -> Result<(std::fs::File, PathBuf), StorageError> {
        let final_path = self.path(key)?;
        let dir = final_path.parent().expect("keys have a parent");
        let mut n = [0u8; 8];
        let _ = getrandom::fill(&mut n);
        let tmp = dir.join(format!("{TEMP_PREFIX}{}", crate::nix::hash::to_hex(&n)));
        let f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io(&tmp))?;
        Ok((f, tmp))
    }

    /// Makes a finished temporary file (already fsynced) visible as `key`.
    pub fn commit(&self, tmp: &Path, key: &str) -> Result<(), StorageError> {
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

    /// Writes `bytes` as `key`, atomically.
    pub fn put_bytes(&self, key: &str, bytes: &[u8]) -> Result<(), StorageError> {
        let (mut f, tmp) = self.temp_for(key)?;
        let r = f.write_all(bytes).and_then(|_| f.sync_all());
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(StorageError::Io { path: tmp.display().to_string(), source: e });
        }
        self.commit(&tmp, key)
    }

    pub fn exists(&self, key: &str) -> bool {
        self.path(key).map(|p| p.is_file()).unwrap_or(false)
    }

    pub fn delete(&self, key: &str) -> Result<bool, StorageError> {
        let p = self.path(key)?;
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StorageError::Io { path: p.display().to_string(), source: e }),
        }
    }

    /// Entries of a directory key (`""`, `nar`, `pending`): names with
    /// size and age in seconds, temporary files included.
    pub fn list(&self, dir: &str) -> Result<Vec<(String, u64, u64)>, StorageError> {
        let d = if dir.is_empty() { self.root.clone() } else { self.path(dir)? };
        let mut out = Vec::new();
        let now = std::time::SystemTime::now();
        for e in std::fs::read_dir(&d).map_err(io(&d))? {
            let e = e.map_err(io(&d))?;
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).map(|a| a.as_secs()).unwrap_or(0);
            out.push((e.file_name().to_string_lossy().into_owned(), meta.len(), age));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_the_root() {
        let d = tempfile::tempdir().unwrap();
        let s = Storage::open(d.path()).unwrap();
        for bad in
            ["", "..", "../x", "nar/../../x", "/etc/passwd", "a/b/c", ".tmp-x", "nar/.hidden", "a\0b", "a b", "nar/"]
        {
            assert!(matches!(s.path(bad), Err(StorageError::BadKey(_))), "{bad:?}");
        }
        s.put_bytes("nar/x.nar", b"abc").unwrap();
        assert!(s.exists("nar/x.nar"));
        assert_eq!(std::fs::read(d.path().join("nar/x.nar")).unwrap(), b"abc");
        assert!(s.list("nar").unwrap().iter().all(|(n, _, _)| !n.starts_with(TEMP_PREFIX)), "no temporary left");
        assert!(s.delete("nar/x.nar").unwrap());
        assert!(!s.delete("nar/x.nar").unwrap());
    }
}
