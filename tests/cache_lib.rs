//! The cache's ingest API and retention on both database backends, against
//! NARs of real store paths.

mod support;

use std::io::Read;
use std::path::Path;

use kiln::cache::{Cache, CacheError, Origin, PathInfo, gc, ingest_local, local_path_info};
use kiln::config::{Compression, Config};
use kiln::db::builds::{self, BuildStatus, NewBuild};
use kiln::db::evaluations::{self, Member, NewEvaluation};
use kiln::db::{Db, run};
use kiln::nix::{Hash, NarInfo, SigningKey, nar};
use support::*;

fn cache_for(db: &Db, state: &Path, compression: Compression) -> Cache {
    let mut config = Config { state_dir: state.to_path_buf(), ..Default::default() };
    config.cache.compression = compression;
    config.cache.max_upload_mib = 1;
    Cache::open(&config, db.clone(), SigningKey::generate("test-cache-1").unwrap()).unwrap()
}

fn nar_of(path: &str) -> Vec<u8> {
    let mut v = Vec::new();
    nar::dump_path(Path::new(path), &mut v).unwrap();
    v
}

fn decompress(file: &Path, compression: &str) -> Vec<u8> {
    let f = std::fs::File::open(file).unwrap();
    let mut out = Vec::new();
    match compression {
        "zstd" => zstd::stream::read::Decoder::new(f).unwrap().read_to_end(&mut out).unwrap(),
        "xz" => xz2::read::XzDecoder::new(f).read_to_end(&mut out).unwrap(),
        _ => std::io::BufReader::new(f).read_to_end(&mut out).unwrap(),
    };
    out
}

#[tokio::test]
async fn ingest_validates_hashes_compresses_signs_and_records() {
    let (top, closure) = build_closure("ingest");
    each_backend(|db| {
        let closure = closure.clone();
        let top = top.clone();
        async move {
            for compression in [Compression::Zstd, Compression::Xz, Compression::None] {
                let state = tempfile::tempdir().unwrap();
                let cache = cache_for(&db, state.path(), compression);
                // Each backend run reuses one database: start from an empty index.
                let mut c = db.conn().await.unwrap();
                run!(c.ex(), c => sqlx::query("DELETE FROM cache_paths").execute(&mut *c).await.unwrap().rows_affected());
                drop(c);
                let infos = ingest_local(&cache, &closure, Origin::Build).await.unwrap();
                assert_eq!(infos.len(), 3);
                for info in &infos {
                    let path = info.store_path.to_string();
                    let expected = nar_of(&path);
                    assert_eq!(info.nar_hash, Hash::sha256(&expected));
                    assert_eq!(info.nar_size, expected.len() as u64);
                    assert_eq!(info.compression, compression.name());
                    assert!(info.verify(&[cache.public_key()]));
                    let file = state.path().join("cache").join(&info.url);
                    let stored = std::fs::read(&file).unwrap();
                    assert_eq!(info.file_hash.clone().unwrap(), Hash::sha256(&stored));
                    assert_eq!(info.file_size, Some(stored.len() as u64));
                    assert_eq!(decompress(&file, &info.compression), expected, "{path} {compression:?}");
                    let on_disk = std::fs::read_to_string(state.path().join(format!("cache/{}.narinfo", info.store_path.hash_part()))).unwrap();
                    assert_eq!(NarInfo::parse(&on_disk).unwrap(), *info);
                }
                let top_info = infos.iter().find(|i| i.store_path.to_string() == top).unwrap();
                assert_eq!(top_info.references.len(), 2);
                assert!(top_info.deriver.is_some());

                // Already there: one lookup, nothing rewritten.
                let again = ingest_local(&cache, std::slice::from_ref(&top), Origin::Build).await.unwrap();
                assert_eq!(again[0], *top_info);

                // No temporary file is left behind.
                let leftovers: Vec<_> = std::fs::read_dir(state.path().join("cache/nar"))
                    .unwrap()
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".tmp"))
                    .collect();
                assert!(leftovers.is_empty(), "{leftovers:?}");
            }
        }
    })
    .await;
}

#[tokio::test]
async fn bad_nars_are_refused_and_nothing_is_kept() {
    let (top, _) = build_closure("badnar");
    let info = local_path_info(std::slice::from_ref(&top)).await.unwrap().remove(0);
    each_backend(|db| {
        let info = info.clone();
        let top = top.clone();
        async move {
            let state = tempfile::tempdir().unwrap();
            let cache = cache_for(&db, state.path(), Compression::Zstd);
            let good = nar_of(&top);
            let mut bad_magic = good.clone();
            bad_magic[8] = b'X';
            let truncated = good[..good.len() - 9].to_vec();
            let mut trailing = good.clone();
            trailing.extend_from_slice(&[0u8; 8]);
            for (what, bytes) in [("magic", bad_magic), ("truncated", truncated), ("trailing", trailing)] {
                let r = cache.ingest(info.clone(), std::io::Cursor::new(bytes), None, Origin::Build).await;
                assert!(matches!(r, Err(CacheError::Nar(_))), "{what}: {r:?}");
            }
            let r = cache
                .ingest(
                    info.clone(),
                    std::io::Cursor::new(good.clone()),
                    Some((Hash::sha256(b"other"), good.len() as u64)),
                    Origin::Upload,
                )
                .await;
            assert!(matches!(r, Err(CacheError::Mismatch(_))), "{r:?}");
            let big = PathInfo {
                path: kiln::nix::StorePath::parse("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-big").unwrap(),
                references: vec![],
                deriver: None,
                ca: None,
            };
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join("f"), vec![1u8; 2 << 20]).unwrap();
            let r = cache
                .ingest(big, std::io::Cursor::new(nar_of(d.path().join("f").to_str().unwrap())), None, Origin::Upload)
                .await;
            assert!(matches!(r, Err(CacheError::TooLarge(_))), "{r:?}");
            assert!(!cache.contains(&info.path).await.unwrap());
            let files: Vec<_> = std::fs::read_dir(state.path().join("cache/nar")).unwrap().collect();
            assert!(files.is_empty(), "nothing kept: {files:?}");
            assert!(!state.path().join(format!("cache/{}.narinfo", info.path.hash_part())).exists());
        }
    })
    .await;
}

/// Makes every file of the cache look older than the GC's grace period.
fn age_files(dir: &Path) {
    let out = std::process::Command::new("find")
        .arg(dir)
        .args(["-type", "f", "-exec", "touch", "-d", "3 hours ago", "{}", "+"])
        .output()
        .unwrap();
    assert!(out.status.success());
}

#[tokio::test]
async fn gc_keeps_exactly_the_retained_closures() {
    let (kept_top, kept) = build_closure("gc-kept");
    let (pinned_top, pinned) = build_closure("gc-pinned");
    let (_, gone) = build_closure("gc-gone");
    let (_, old_upload) = build_closure("gc-old-upload");
    let (_, new_upload) = build_closure("gc-new-upload");
    each_backend(|db| {
        let (kept_top, kept, pinned_top, pinned, gone, old_upload, new_upload) =
            (kept_top.clone(), kept.clone(), pinned_top.clone(), pinned.clone(), gone.clone(), old_upload.clone(), new_upload.clone());
        async move {
            let state = tempfile::tempdir().unwrap();
            let cache = cache_for(&db, state.path(), Compression::Zstd);
            for set in [&kept, &pinned, &gone] {
                ingest_local(&cache, set, Origin::Build).await.unwrap();
            }
            ingest_local(&cache, &old_upload, Origin::Upload).await.unwrap();
            ingest_local(&cache, &new_upload, Origin::Upload).await.unwrap();
            let mut c = db.conn().await.unwrap();
            // Everything but the new upload was stored long ago.
            let old = kiln::db::now() - 30 * 86400;
            run!(c.ex(), c => sqlx::query("UPDATE cache_paths SET created_at = $1").bind(old).execute(&mut *c).await.unwrap().rows_affected());
            for p in &new_upload {
                let h = kiln::nix::StorePath::parse(p).unwrap().hash_part().to_string();
                run!(c.ex(), c => sqlx::query("UPDATE cache_paths SET created_at = $1 WHERE hash_part = $2").bind(kiln::db::now()).bind(h).execute(&mut *c).await.unwrap().rows_affected());
            }
            // One evaluation holds the kept build; the pinned build is in none.
            let (_, js) = make_jobset(&db, "gc", "main").await;
            let ev = evaluations::create(c.ex(), &NewEvaluation { jobset_id: js, commit_sha: "c", git_ref: "r", flake_ref: "f", config_hash: "h", workers: 1, forced: false }).await.unwrap();
            for (job, top, member) in [("kept", &kept_top, true), ("pinned", &pinned_top, false)] {
                let b = builds::create(c.ex(), &NewBuild { jobset_id: js, job: job.into(), drv_path: format!("/nix/store/{job}.drv"), outputs: vec![("out".into(), top.clone())], ..Default::default() }).await.unwrap();
                builds::finish(c.ex(), b.id, BuildStatus::Succeeded, false, None, None).await.unwrap();
                if member {
                    evaluations::add_member(c.ex(), &Member { eval_id: ev.id, job: job.into(), build_id: Some(b.id), is_new: true, error: None }).await.unwrap();
                } else {
                    builds::set_keep(c.ex(), b.id, true).await.unwrap();
                }
            }
            drop(c);
            age_files(&state.path().join("cache"));

            let keep: Vec<&String> = kept.iter().chain(&pinned).chain(&new_upload).collect();
            let drop_: Vec<&String> = gone.iter().chain(&old_upload).collect();
            let dry = gc::collect(&cache, 7, true).await.unwrap();
            assert_eq!(dry.deleted_paths.len(), drop_.len());
            for p in keep.iter().chain(&drop_) {
                assert!(cache.contains(&kiln::nix::StorePath::parse(p).unwrap()).await.unwrap(), "dry run deletes nothing");
            }
            let nars_before = std::fs::read_dir(state.path().join("cache/nar")).unwrap().count();

            let r = gc::collect(&cache, 7, false).await.unwrap();
            assert_eq!(r.kept_paths, keep.len());
            for p in &keep {
                let sp = kiln::nix::StorePath::parse(p).unwrap();
                assert!(cache.contains(&sp).await.unwrap(), "{p} kept");
                let info = cache.narinfo(&sp).await.unwrap().unwrap();
                assert!(state.path().join("cache").join(&info.url).exists(), "{p}'s NAR kept");
            }
            for p in &drop_ {
                let sp = kiln::nix::StorePath::parse(p).unwrap();
                assert!(!cache.contains(&sp).await.unwrap(), "{p} deleted");
                assert!(!state.path().join(format!("cache/{}.narinfo", sp.hash_part())).exists());
            }
            assert_eq!(std::fs::read_dir(state.path().join("cache/nar")).unwrap().count(), nars_before - r.deleted_files);
            assert_eq!(r.deleted_files, drop_.len(), "one NAR per deleted path");

            // A NAR written moments ago that no narinfo names yet (an ingest
            // in flight) survives a collection.
            std::fs::write(state.path().join("cache/nar").join(format!("{}.nar.zst", "2".repeat(52))), b"in flight").unwrap();
            gc::collect(&cache, 7, false).await.unwrap();
            assert!(state.path().join("cache/nar").join(format!("{}.nar.zst", "2".repeat(52))).exists());
        }
    })
    .await;
}
