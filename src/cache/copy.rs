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

/// Copies the cache directory `from` into `to`; `progress` hears each key.
pub async fn copy_dir(from: &Path, to: &Storage, progress: impl Fn(&str)) -> Result<CopyReport, StorageError> {
    // Read through the directory backend: its listing and key checks (it
    // would create a missing directory: a mistyped path is an error).
    if !from.is_dir() {
        let source = std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory");
        return Err(StorageError::Io { path: from.display().to_string(), source });
    }
    let source = Storage::open(from)?;
    let mut files: Vec<(String, u64)> = Vec::new();
    // NARs before narinfos.
    for (dir, prefix) in [("nar", "nar/"), ("", "")] {
        for (name, len, _) in source.list(dir).await? {
            let key = format!("{prefix}{name}");
            let wanted = !name.starts_with(TEMP_PREFIX) && (!prefix.is_empty() || name.ends_with(".narinfo"));
            if wanted && check_key(&key).is_ok() {
                files.push((key, len));
            }
        }
    }
    let mut report = CopyReport::default();
    for (key, len) in files {
        if to.size(&key).await? == Some(len) {
            report.skipped += 1;
            continue;
        }
        let path = source.local_path(&key)?.expect("a directory's keys are files");
        to.put_file(&path, &key).await?;
        progress(&key);
        report.copied += 1;
        report.copied_bytes += len;
    }
    Ok(report)
}
