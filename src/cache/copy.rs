//! `kiln cache copy`: moves a cache directory into the configured storage
//! (a bucket) while the old one still serves. NAR files go first, then the
//! narinfos that point at them, so a reader of the new storage never finds
//! a narinfo whose NAR is not there yet. An object already there with the
//! same size is skipped, so an interrupted copy is resumed by running it
//! again, and a last run after switching over picks up what the old node
//! stored meanwhile. Uploads still pending and temporary files are left.

use std::path::Path;

use serde::Serialize;

use super::storage::{Storage, StorageError, TEMP_PREFIX, check_key};

#[derive(Debug, Default, Clone, Serialize)]
pub struct CopyReport {
    pub copied: usize,
    pub copied_bytes: u64,
    /// Already in the storage with the same size.
    pub skipped: usize,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io { path: path.display().to_string(), source }
}

/// Copies the cache directory `from` into `to`; `progress` hears each key.
pub async fn copy_dir(from: &Path, to: &Storage, progress: impl Fn(&str)) -> Result<CopyReport, StorageError> {
    let mut files: Vec<(String, std::path::PathBuf, u64)> = Vec::new();
    for (dir, prefix) in [(from.join("nar"), "nar/"), (from.to_path_buf(), "")] {
        if !dir.is_dir() {
            continue;
        }
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let e = e.map_err(io(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let meta = e.metadata().map_err(io(&e.path()))?;
            let wanted =
                meta.is_file() && !name.starts_with(TEMP_PREFIX) && (prefix == "nar/" || name.ends_with(".narinfo"));
            let key = format!("{prefix}{name}");
            if wanted && check_key(&key).is_ok() {
                files.push((key, e.path(), meta.len()));
            }
        }
    }
    // NARs before narinfos (the listing put them first; keep it so).
    files.sort_by_key(|(k, ..)| (!k.starts_with("nar/"), k.clone()));
    let mut report = CopyReport::default();
    for (key, path, len) in files {
        if to.size(&key).await? == Some(len) {
            report.skipped += 1;
            continue;
        }
        to.put_file(&path, &key).await?;
        progress(&key);
        report.copied += 1;
        report.copied_bytes += len;
    }
    Ok(report)
}
