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

/// The store path of a made-up output, for index-only tests.
fn fake_path(i: usize) -> kiln::nix::StorePath {
    let hash: String = format!("{i:0>32}").chars().map(|c| if c == '0' { 'a' } else { c }).collect();
    kiln::nix::StorePath::parse(&format!("/nix/store/{hash}-fake-{i}")).unwrap()
}

fn row(path: &kiln::nix::StorePath, origin: &str) -> kiln::db::cache_paths::CachePath {
    kiln::db::cache_paths::CachePath {
        hash_part: path.hash_part().to_string(),
        store_path: path.to_string(),
        nar_hash: "sha256:0".into(),
        nar_size: 8,
        file_hash: "sha256:0".into(),
        file_size: 8,
        nar_file: format!("nar/{}.nar", "0".repeat(52)),
        compression: "none".into(),
        refs: String::new(),
        deriver: None,
        ca: None,
        origin: origin.into(),
        created_at: kiln::db::now(),
        kiln_signed: origin != "upload",
    }
}

#[tokio::test]
async fn own_paths_leave_uploads_out_and_a_build_replaces_an_upload() {
    let (built_top, built) = build_closure("own-built");
    let (up_top, uploaded) = build_closure("own-uploaded");
    each_backend(|db| {
        let (built_top, built, up_top, uploaded) = (built_top.clone(), built.clone(), up_top.clone(), uploaded.clone());
        async move {
            let state = tempfile::tempdir().unwrap();
            let cache = cache_for(&db, state.path(), Compression::Zstd);
            ingest_local(&cache, &built, Origin::Build).await.unwrap();
            let up = ingest_local(&cache, &uploaded, Origin::Upload).await.unwrap();
            // An upload is in the cache, carries no signature of Kiln's, and
            // is not Kiln's own; a build is all three.
            let sp = |p: &str| kiln::nix::StorePath::parse(p).unwrap();
            let all: Vec<_> = built.iter().chain(&uploaded).map(|p| sp(p)).collect();
            let own = cache.own_paths(&all).await.unwrap();
            let mut own: Vec<String> = own.into_iter().collect();
            own.sort();
            let mut expected = built.clone();
            expected.sort();
            assert_eq!(own, expected);
            assert!(cache.contains(&sp(&up_top)).await.unwrap());
            assert!(!cache.is_own(&sp(&up_top)).await.unwrap());
            assert!(cache.is_own(&sp(&built_top)).await.unwrap());
            let up_info = up.iter().find(|i| i.store_path.to_string() == up_top).unwrap();
            assert!(up_info.sigs.is_empty(), "{:?}", up_info.sigs);

            // An upload of a path Kiln built changes nothing.
            let before = cache.narinfo(&sp(&built_top)).await.unwrap().unwrap();
            let (again, new) = cache
                .ingest(local_path_info(std::slice::from_ref(&built_top)).await.unwrap().remove(0), std::io::Cursor::new(nar_of(&built_top)), None, Origin::Upload)
                .await
                .unwrap();
            assert!(!new);
            assert_eq!(again, before);

            // Kiln's build of an uploaded path replaces it: a narinfo signed
            // by Kiln, the row says built, the uploaded NAR file stays (for
            // the garbage collector).
            let mut c = db.conn().await.unwrap();
            run!(c.ex(), c => sqlx::query("UPDATE cache_paths SET nar_file = 'nar/uploaded.nar', created_at = 5 WHERE hash_part = $1").bind(sp(&up_top).hash_part().to_string()).execute(&mut *c).await.unwrap().rows_affected());
            drop(c);
            std::fs::write(state.path().join("cache/nar/uploaded.nar"), b"as uploaded").unwrap();
            let info = local_path_info(std::slice::from_ref(&up_top)).await.unwrap().remove(0);
            let (ni, new) = cache.ingest(info, std::io::Cursor::new(nar_of(&up_top)), None, Origin::Build).await.unwrap();
            assert!(new, "replaced");
            assert!(ni.verify(&[cache.public_key()]));
            let served = std::fs::read_to_string(state.path().join(format!("cache/{}.narinfo", sp(&up_top).hash_part()))).unwrap();
            assert_eq!(NarInfo::parse(&served).unwrap(), ni);
            let mut c = db.conn().await.unwrap();
            let r = kiln::db::cache_paths::get(c.ex(), sp(&up_top).hash_part()).await.unwrap().unwrap();
            assert_eq!((r.origin.as_str(), r.kiln_signed, r.nar_file.as_str()), ("build", true, ni.url.as_str()));
            assert!(r.created_at > 5);
            drop(c);
            assert!(state.path().join("cache/nar/uploaded.nar").exists());
            assert!(cache.is_own(&sp(&up_top)).await.unwrap());
            // A second build of it is a lookup.
            let info = local_path_info(std::slice::from_ref(&up_top)).await.unwrap().remove(0);
            let (_, new) = cache.ingest(info, std::io::Cursor::new(nar_of(&up_top)), None, Origin::Build).await.unwrap();
            assert!(!new);

            // Batches larger than one statement's IN list.
            let mut c = db.conn().await.unwrap();
            let fakes: Vec<_> = (0..1200).map(fake_path).collect();
            for (i, p) in fakes.iter().enumerate() {
                if i % 3 != 2 {
                    kiln::db::cache_paths::insert(c.ex(), &row(p, if i % 3 == 0 { "build" } else { "upload" })).await.unwrap();
                    // Every row but the first has its narinfo in storage.
                    if i > 0 {
                        std::fs::write(state.path().join(format!("cache/{}.narinfo", p.hash_part())), "").unwrap();
                    }
                }
            }
            drop(c);
            let own = cache.own_paths(&fakes).await.unwrap();
            assert_eq!(own.len(), 399, "an index row whose narinfo is gone does not count");
            assert!(fakes.iter().enumerate().all(|(i, p)| own.contains(&p.to_string()) == (i % 3 == 0 && i > 0)));
        }
    })
    .await;
}

fn xz(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = xz2::write::XzEncoder::new(&mut out, 6);
    std::io::Write::write_all(&mut e, bytes).unwrap();
    e.finish().unwrap();
    out
}

#[tokio::test]
async fn uploads_are_kept_as_sent_after_every_hash_is_checked() {
    let (top, _) = build_closure("as-sent");
    let info = local_path_info(std::slice::from_ref(&top)).await.unwrap().remove(0);
    each_backend(|db| {
        let (top, info) = (top.clone(), info.clone());
        async move {
            let state = tempfile::tempdir().unwrap();
            let cache = cache_for(&db, state.path(), Compression::Zstd);
            let uploader = SigningKey::generate("uploader-1").unwrap();
            let nar = nar_of(&top);
            let file = xz(&nar);
            let file_hash = Hash::sha256(&file);
            let url = format!("nar/{}.nar.xz", file_hash.to_base32());
            let mut ni = NarInfo {
                store_path: info.path.clone(),
                url: url.clone(),
                compression: "xz".into(),
                file_hash: Some(file_hash.clone()),
                file_size: Some(file.len() as u64),
                nar_hash: Hash::sha256(&nar),
                nar_size: nar.len() as u64,
                references: info.references.clone(),
                deriver: info.deriver.clone(),
                system: Some("x86_64-linux".into()),
                sigs: vec![],
                ca: None,
            };
            ni.sign(&uploader);
            let pending = |bytes: &[u8]| {
                let p = state.path().join("cache/pending").join(url.trim_start_matches("nar/"));
                std::fs::write(&p, bytes).unwrap();
                Some(format!("pending/{}", url.trim_start_matches("nar/")))
            };
            let other = format!("nar/{}.nar.xz", Hash::sha256(b"other").to_base32());
            let bad: Vec<(&str, NarInfo)> = vec![
                ("a URL that is not the file's hash", NarInfo { url: other, ..ni.clone() }),
                ("another FileHash", NarInfo { file_hash: Some(Hash::sha256(b"x")), ..ni.clone() }),
                ("another FileSize", NarInfo { file_size: Some(3), ..ni.clone() }),
                ("a compression the name does not say", NarInfo { compression: "zstd".into(), ..ni.clone() }),
                ("an unknown compression", NarInfo { compression: "bzip2".into(), ..ni.clone() }),
                ("another NarHash", NarInfo { nar_hash: Hash::sha256(b"y"), ..ni.clone() }),
            ];
            for (what, b) in bad {
                let r = cache.ingest_upload(b, pending(&file)).await;
                assert!(r.is_err(), "{what} accepted");
                assert!(!cache.contains(&info.path).await.unwrap(), "{what}");
                let nars: Vec<_> = std::fs::read_dir(state.path().join("cache/nar")).unwrap().collect();
                assert!(nars.is_empty(), "{what}: nothing kept: {nars:?}");
            }
            let r = cache.ingest_upload(ni.clone(), pending(&xz(b"not a nar"))).await;
            assert!(r.is_err());

            // The good upload: its bytes at its URL, its narinfo as sent,
            // its signature and no signature of Kiln's.
            let (stored, new) = cache.ingest_upload(ni.clone(), pending(&file)).await.unwrap();
            assert!(new);
            assert_eq!(stored, ni);
            assert_eq!(std::fs::read(state.path().join("cache").join(&url)).unwrap(), file);
            let served = std::fs::read_to_string(state.path().join(format!("cache/{}.narinfo", info.path.hash_part()))).unwrap();
            assert_eq!(served, ni.render());
            assert!(!stored.verify(&[cache.public_key()]));
            assert!(stored.verify(&[uploader.public()]));
            let mut c = db.conn().await.unwrap();
            let r = kiln::db::cache_paths::get(c.ex(), info.path.hash_part()).await.unwrap().unwrap();
            assert_eq!((r.origin.as_str(), r.kiln_signed, r.nar_file.as_str(), r.compression.as_str()), ("upload", false, url.as_str(), "xz"));
            drop(c);

            // With signatures required and the uploader's key trusted, Kiln
            // vouches for the upload with its own signature too. Nix does not
            // send a NAR file the cache has: the file at the URL is checked.
            run!(db.conn().await.unwrap().ex(), c => sqlx::query("DELETE FROM cache_paths").execute(&mut *c).await.unwrap().rows_affected());
            let mut config = Config { state_dir: state.path().to_path_buf(), ..Default::default() };
            config.cache.require_upload_signatures = true;
            config.cache.trusted_upload_keys = vec![uploader.public().to_string()];
            let strict = Cache::open(&config, db.clone(), SigningKey::generate("test-cache-1").unwrap()).unwrap();
            let (vouched, new) = strict.ingest_upload(ni.clone(), None).await.unwrap();
            assert!(new);
            assert!(vouched.verify(&[strict.public_key()]) && vouched.verify(&[uploader.public()]));
            assert_eq!(vouched.sigs.len(), 2);
            let mut c = db.conn().await.unwrap();
            assert!(kiln::db::cache_paths::get(c.ex(), info.path.hash_part()).await.unwrap().unwrap().kiln_signed);
        }
    })
    .await;
}

#[tokio::test]
async fn gc_keeps_what_latest_answers_what_the_queue_needs_and_pinned_builds() {
    // Each closure is top → two leaves; only the named paths are ingested.
    let (green_top, green) = build_closure("gc-green");
    let (older_top, older) = build_closure("gc-older");
    let (dep_top, dep) = build_closure("gc-dep");
    let (queued_top, queued) = build_closure("gc-queued");
    let queued_drv = nix("nix-store", &["-qd", &queued_top]).trim().to_string();
    let queued_leaves: Vec<String> = queued.iter().filter(|p| **p != queued_top).cloned().collect();
    let (pinned_top, pinned) = build_closure("gc-pin");
    let (orphan_top, orphan) = build_closure("gc-orphan");
    let orphan_drv = nix("nix-store", &["-qd", &orphan_top]).trim().to_string();
    let orphan_leaves: Vec<String> = orphan.iter().filter(|p| **p != orphan_top).cloned().collect();
    let (orphan_dep_top, orphan_dep) = build_closure("gc-orphan-dep");
    each_backend(|db| {
        let (green_top, green, older_top, older, dep_top, dep) =
            (green_top.clone(), green.clone(), older_top.clone(), older.clone(), dep_top.clone(), dep.clone());
        let (queued_drv, queued_leaves, pinned_top, pinned) =
            (queued_drv.clone(), queued_leaves.clone(), pinned_top.clone(), pinned.clone());
        let (orphan_drv, orphan_leaves, orphan_dep_top, orphan_dep) =
            (orphan_drv.clone(), orphan_leaves.clone(), orphan_dep_top.clone(), orphan_dep.clone());
        async move {
            use kiln::db::steps;
            let state = tempfile::tempdir().unwrap();
            let cache = cache_for(&db, state.path(), Compression::Zstd);
            for set in [&green, &older, &dep, &queued_leaves, &pinned, &orphan_leaves, &orphan_dep] {
                ingest_local(&cache, set, Origin::Build).await.unwrap();
            }
            let mut c = db.conn().await.unwrap();
            run!(c.ex(), c => sqlx::query("UPDATE cache_paths SET created_at = $1").bind(kiln::db::now() - 30 * 86400).execute(&mut *c).await.unwrap().rows_affected());
            let (_, js) = make_jobset(&db, "gc-latest", "main").await;
            let e = NewEvaluation { jobset_id: js, commit_sha: "c", git_ref: "r", flake_ref: "f", config_hash: "h", workers: 1, forced: false };
            let build = |job: &'static str, drv: String, out: String| NewBuild {
                jobset_id: js,
                job: job.into(),
                drv_path: drv,
                nix_name: job.into(),
                system: "x86_64-linux".into(),
                outputs: vec![("out".into(), out)],
                ..Default::default()
            };
            // An older green build of `app`, then the green one `latest`
            // answers, each in its own good evaluation.
            for (top, tag) in [(&older_top, "older"), (&green_top, "green")] {
                let ev = evaluations::create(c.ex(), &e).await.unwrap().id;
                let b = builds::create(c.ex(), &build("app", format!("/nix/store/{tag}.drv"), top.clone())).await.unwrap();
                builds::finish(c.ex(), b.id, BuildStatus::Succeeded, false, None, None).await.unwrap();
                evaluations::add_member(c.ex(), &Member { eval_id: ev, job: "app".into(), build_id: Some(b.id), is_new: true, error: None }).await.unwrap();
                evaluations::finish(c.ex(), ev, 1, &Default::default()).await.unwrap();
            }
            // Then three evaluations that fail, and pruning to three: the
            // green build's evaluation is gone, its build is not.
            for _ in 0..3 {
                let ev = evaluations::create(c.ex(), &e).await.unwrap().id;
                evaluations::finish(c.ex(), ev, 1, &evaluations::Outcome { error: Some("flake.nix: syntax error"), ..Default::default() }).await.unwrap();
            }
            evaluations::prune(c.ex(), js, 3).await.unwrap();
            let left: i64 = run!(c.ex(), c => sqlx::query_scalar("SELECT COUNT(*) FROM eval_members").fetch_one(&mut *c).await.unwrap());
            assert_eq!(left, 0, "no evaluation holds the green build any more");
            let latest = builds::latest_successful(c.ex(), js, "app").await.unwrap().unwrap();
            assert_eq!(builds::outputs(c.ex(), latest.id).await.unwrap()[0].path, green_top);

            // A queued build: its top step waits for a built dependency step;
            // its `.drv`'s other inputs were in the cache when it was queued.
            let q = builds::create(c.ex(), &build("queued", queued_drv.clone(), "/nix/store/00000000000000000000000000000000-q".into())).await.unwrap();
            let (top_step, _) = steps::get_or_create(c.ex(), &queued_drv, "x86_64-linux", "", "waiting").await.unwrap();
            let (dep_step, _) = steps::get_or_create(c.ex(), "/nix/store/11111111111111111111111111111111-dep.drv", "x86_64-linux", "", "waiting").await.unwrap();
            steps::add_dep(c.ex(), top_step.id, dep_step.id).await.unwrap();
            steps::set_output(c.ex(), dep_step.id, "out", &dep_top).await.unwrap();
            steps::finish(c.ex(), dep_step.id, 0, None, None).await.unwrap();
            builds::set_top_step(c.ex(), q.id, top_step.id).await.unwrap();
            // A step left waiting by a cancelled build: nothing needs it.
            let gone = builds::create(c.ex(), &build("cancelled", orphan_drv.clone(), "/nix/store/22222222222222222222222222222222-c".into())).await.unwrap();
            let (orphan_step, _) = steps::get_or_create(c.ex(), &orphan_drv, "x86_64-linux", "", "waiting").await.unwrap();
            let (orphan_dep_step, _) = steps::get_or_create(c.ex(), "/nix/store/33333333333333333333333333333333-odep.drv", "x86_64-linux", "", "waiting").await.unwrap();
            steps::add_dep(c.ex(), orphan_step.id, orphan_dep_step.id).await.unwrap();
            steps::set_output(c.ex(), orphan_dep_step.id, "out", &orphan_dep_top).await.unwrap();
            steps::finish(c.ex(), orphan_dep_step.id, 0, None, None).await.unwrap();
            builds::set_top_step(c.ex(), gone.id, orphan_step.id).await.unwrap();
            builds::finish(c.ex(), gone.id, BuildStatus::Cancelled, false, None, None).await.unwrap();
            // A pinned build in no evaluation, of a job that has a newer green build.
            let p = builds::create(c.ex(), &build("tool", "/nix/store/pinned.drv".into(), pinned_top.clone())).await.unwrap();
            builds::finish(c.ex(), p.id, BuildStatus::Succeeded, false, None, None).await.unwrap();
            builds::set_keep(c.ex(), p.id, true).await.unwrap();
            let newer = builds::create(c.ex(), &build("tool", "/nix/store/newer.drv".into(), "/nix/store/44444444444444444444444444444444-t".into())).await.unwrap();
            builds::finish(c.ex(), newer.id, BuildStatus::Succeeded, false, None, None).await.unwrap();
            drop(c);
            age_files(&state.path().join("cache"));

            let r = gc::collect(&cache, 7, false).await.unwrap();
            let kept: Vec<&String> = green.iter().chain(&dep).chain(&queued_leaves).chain(&pinned).collect();
            let dropped: Vec<&String> = older.iter().chain(&orphan_leaves).chain(&orphan_dep).collect();
            for p in &kept {
                assert!(cache.contains(&kiln::nix::StorePath::parse(p).unwrap()).await.unwrap(), "{p} kept");
            }
            for p in &dropped {
                assert!(!cache.contains(&kiln::nix::StorePath::parse(p).unwrap()).await.unwrap(), "{p} collected");
            }
            assert_eq!(r.kept_paths, kept.len());
            assert_eq!(r.deleted_paths.len(), dropped.len());

            // Unpinned, the pinned build's outputs go too.
            let mut c = db.conn().await.unwrap();
            builds::set_keep(c.ex(), p.id, false).await.unwrap();
            drop(c);
            gc::collect(&cache, 7, false).await.unwrap();
            for p in &pinned {
                assert!(!cache.contains(&kiln::nix::StorePath::parse(p).unwrap()).await.unwrap(), "{p} collected once unpinned");
            }
        }
    })
    .await;
}
