//! Retention: keeps the closures of the retention roots and deletes the
//! rest, narinfo first, then the NARs no narinfo points at. The roots
//! (`cache_paths::retention_roots`, decision 014) are the outputs of every
//! jobset's remaining evaluations (evaluations beyond `keep_evaluations` are
//! pruned when a new one finishes), of the newest successful build of every
//! job (what `/job/…/latest` answers, even after the evaluation it came from
//! was pruned), of pinned builds (`keep`), of paths uploaded in the last
//! `keep_uploads_days`, of the steps unfinished builds need, and of the
//! inputs of the steps still to run (read from their `.drv` files, since an
//! input that was cached when its build was queued has no step), of what
//! each deployed host runs and would roll back to, and of open
//! deployments (a host substitutes its closure from the cache); and
//! whatever was stored in the last hour. Files younger than an hour are
//! never deleted either, so a concurrent ingest (in this process or
//! another) is never cut short.

use std::collections::{HashMap, HashSet, VecDeque};

use serde::Serialize;

use tracing::warn;

use super::{Cache, CacheError, storage::TEMP_PREFIX};
use crate::db::{self, cache_paths};
use crate::nix::Derivation;

/// NAR, pending and temporary files younger than this are left alone.
const GRACE_S: u64 = 3600;
/// Uploaded NARs no narinfo claimed, and abandoned temporaries, expire.
const PENDING_EXPIRY_S: u64 = 24 * 3600;

#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub kept_paths: usize,
    pub deleted_paths: Vec<String>,
    pub deleted_files: usize,
    pub freed_bytes: u64,
    pub dry_run: bool,
}

pub async fn collect(cache: &Cache, keep_uploads_days: u64, dry_run: bool) -> Result<Report, CacheError> {
    let mut c = cache.db().conn().await?;
    let now = db::now();
    let upload_cutoff = now - (keep_uploads_days as i64) * 86400;
    let mut roots = cache_paths::retention_roots(c.ex(), upload_cutoff, now - GRACE_S as i64).await?;
    roots.extend(crate::db::deployment_hosts::retained_paths(c.ex()).await?);
    let queued = cache_paths::queued_step_drvs(c.ex()).await?;
    let all = cache_paths::all_for_gc(c.ex()).await?;
    drop(c);
    roots.extend(input_outputs(&queued).await);

    let refs: HashMap<&str, Vec<&str>> = all
        .iter()
        .map(|(h, r, _, _)| (h.as_str(), r.split(' ').filter(|x| !x.is_empty()).filter_map(|b| b.get(..32)).collect()))
        .collect();
    let mut keep: HashSet<&str> = HashSet::new();
    let mut todo: VecDeque<&str> = roots
        .iter()
        .filter_map(|p| crate::nix::StorePath::parse(p).ok())
        .filter_map(|p| refs.get_key_value(p.hash_part()).map(|(k, _)| *k))
        .collect();
    while let Some(h) = todo.pop_front() {
        if keep.insert(h) {
            todo.extend(refs.get(h).into_iter().flatten().filter_map(|r| refs.get_key_value(r).map(|(k, _)| *k)));
        }
    }

    let mut report = Report { kept_paths: keep.len(), dry_run, ..Default::default() };
    let mut live_nars: HashSet<&str> = HashSet::new();
    for (hash, _, nar, size) in &all {
        if keep.contains(hash.as_str()) {
            live_nars.insert(nar.as_str());
            continue;
        }
        report.deleted_paths.push(hash.clone());
        if dry_run {
            report.freed_bytes += *size as u64;
            continue;
        }
        // Narinfo first: from here on no client is sent to the NAR.
        cache.storage().delete(&format!("{hash}.narinfo")).await?;
        let mut c = cache.db().conn().await?;
        cache_paths::delete(c.ex(), hash).await?;
    }
    // Another path may share a NAR (same contents); only the unclaimed go.
    // Objects are deleted in batches (a bucket takes 1,000 a request).
    let storage = cache.storage();
    let mut doomed = Vec::new();
    for (name, size, age) in storage.list("nar").await? {
        let key = format!("nar/{name}");
        let stale_temp = name.starts_with(TEMP_PREFIX) && age > PENDING_EXPIRY_S;
        let orphan = !name.starts_with(TEMP_PREFIX) && !live_nars.contains(key.as_str()) && age > GRACE_S;
        if stale_temp || orphan {
            report.deleted_files += 1;
            report.freed_bytes += size;
            if stale_temp {
                if !dry_run {
                    storage.remove_temp("nar", &name);
                }
            } else {
                doomed.push(key);
            }
        }
    }
    let known: HashSet<&str> = all.iter().map(|(h, ..)| h.as_str()).collect();
    for dir in ["pending", ""] {
        for (name, size, age) in storage.list(dir).await? {
            let stray_narinfo = dir.is_empty()
                && name.ends_with(".narinfo")
                && age > GRACE_S
                && name.strip_suffix(".narinfo").is_none_or(|h| !known.contains(h));
            let temp = name.starts_with(TEMP_PREFIX);
            let expired = (dir == "pending" || temp) && age > PENDING_EXPIRY_S;
            if stray_narinfo || expired {
                report.deleted_files += 1;
                report.freed_bytes += size;
                if temp {
                    if !dry_run {
                        storage.remove_temp(dir, &name);
                    }
                } else {
                    doomed.push(if dir.is_empty() { name } else { format!("{dir}/{name}") });
                }
            }
        }
    }
    // A bucket's temporary files are in the local spool.
    for (name, size, age) in storage.spool_temps() {
        if age > PENDING_EXPIRY_S {
            report.deleted_files += 1;
            report.freed_bytes += size;
            if !dry_run {
                storage.remove_temp("", &name);
            }
        }
    }
    if !dry_run {
        for chunk in doomed.chunks(1000) {
            storage.delete_many(chunk.to_vec()).await?;
        }
    }
    Ok(report)
}

/// The output paths the derivations `drvs` take as inputs. A `.drv` that
/// cannot be read (deleted from the local store) is skipped with a
/// warning: its build fails anyway when the queue gets to it.
async fn input_outputs(drvs: &[String]) -> Vec<String> {
    let mut outputs: HashMap<String, Vec<(String, String)>> = HashMap::new();
    let mut roots = Vec::new();
    for drv in drvs {
        let Some(d) = read_drv(drv).await else { continue };
        for (input, wanted) in &d.input_drvs {
            let input = input.to_string();
            if !outputs.contains_key(&input) {
                let outs = match read_drv(&input).await {
                    Some(i) => i.outputs.into_iter().map(|o| (o.name, o.path)).collect(),
                    None => Vec::new(),
                };
                outputs.insert(input.clone(), outs);
            }
            roots.extend(
                outputs[&input]
                    .iter()
                    .filter(|(name, path)| wanted.contains(name) && !path.is_empty())
                    .map(|(_, p)| p.clone()),
            );
        }
    }
    roots
}

async fn read_drv(path: &str) -> Option<Derivation> {
    let parsed = match tokio::fs::read(path).await {
        Ok(bytes) => Derivation::parse(&bytes).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    parsed.map_err(|e| warn!(drv = path, error = %e, "cannot read a queued derivation; its inputs are not kept")).ok()
}
