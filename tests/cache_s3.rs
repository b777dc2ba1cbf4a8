//! The binary cache on S3-compatible storage (a real moto server on
//! loopback): `nix copy --to` through Kiln lands in the bucket, a real Nix
//! client substitutes from it through Kiln (ranges too), nothing is kept
//! on the local disk, a bucket that hangs answers 503 (never a 404 that
//! Nix would remember as a miss) and recovers, and the cache's own ingest
//! and garbage collection work on the bucket.

mod support;

use kiln::cache::{Cache, Origin, gc, ingest_local};
use kiln::config::Config;
use kiln::nix::{NarInfo, SigningKey, StorePath};
use support::s3::S3;
use support::*;

const TOKEN: &str = "s3-token-1";

#[tokio::test]
async fn nix_copies_through_kiln_into_the_bucket_and_back() {
    let s3 = S3::start("kiln-cache");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    std::fs::write(dir.path().join("kiln.toml"), format!("api_token_files = [\"token\"]\n{}", s3.cache_config()))
        .unwrap();
    let kiln = Kiln::start_in(dir, &[]);

    let (top, closure) = build_closure("s3");
    let keys = tempfile::tempdir().unwrap();
    let (sk, pk) = (keys.path().join("up.sec"), keys.path().join("up.pub"));
    nix("nix-store", &["--generate-binary-cache-key", "uploader-1", sk.to_str().unwrap(), pk.to_str().unwrap()]);
    let uploader_key = std::fs::read_to_string(&pk).unwrap();
    let uploader = NixClient::new();
    let out = uploader
        .cmd("nix")
        .args(["copy", "--to", &format!("{}?secret-key={}", kiln.url, sk.display()), &top])
        .args(["--option", "netrc-file", uploader.netrc(TOKEN).to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Every path's narinfo and NAR are objects in the bucket; nothing of
    // them is on Kiln's disk, and no upload is left pending.
    let objects = s3.keys();
    for p in &closure {
        let hash = StorePath::parse(p).unwrap().hash_part().to_string();
        let text = s3.get(&format!("{hash}.narinfo")).unwrap_or_else(|| panic!("{p}: no narinfo in {objects:?}"));
        let ni = NarInfo::parse(std::str::from_utf8(&text).unwrap()).unwrap();
        assert!(objects.contains(&ni.url), "{} not in {objects:?}", ni.url);
    }
    assert!(!objects.iter().any(|k| k.starts_with("pending/")), "{objects:?}");
    let local = kiln.dir.path().join("kiln-state/cache");
    assert!(!local.join("nar").exists(), "a local cache directory was made");
    assert!(objects.contains(&"nix-cache-info".to_string()), "{objects:?}");

    // A fresh store substitutes the closure through Kiln from the bucket.
    let client = NixClient::new();
    let (store, root) = client.store("from-s3");
    let out = client
        .cmd("nix")
        .args(["copy", "--from", &kiln.url, "--to", &store])
        .args(["--option", "trusted-public-keys", uploader_key.trim(), &top])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for p in &closure {
        assert!(root.join(p.trim_start_matches('/')).exists(), "{p}");
    }

    // A NAR's headers and a range of it, against the object itself.
    let hash = StorePath::parse(&top).unwrap().hash_part().to_string();
    let ni = NarInfo::parse(&reqwest::get(format!("{}/{hash}.narinfo", kiln.url)).await.unwrap().text().await.unwrap())
        .unwrap();
    let object = s3.get(&ni.url).unwrap();
    let client = reqwest::Client::new();
    let r = client.get(format!("{}/{}", kiln.url, ni.url)).header("Range", "bytes=4-9").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 206);
    assert_eq!(r.headers()["content-range"].to_str().unwrap(), format!("bytes 4-9/{}", object.len()));
    assert_eq!(r.bytes().await.unwrap().as_ref(), &object[4..10]);
    let whole = client.get(format!("{}/{}", kiln.url, ni.url)).send().await.unwrap();
    assert_eq!(whole.status().as_u16(), 200);
    assert_eq!(whole.bytes().await.unwrap().as_ref(), object.as_slice());
    let missing = format!("{}/{}.narinfo", kiln.url, "0".repeat(32));
    assert_eq!(reqwest::get(&missing).await.unwrap().status().as_u16(), 404);

    // The bucket hangs: a narinfo is "try again", not "missing"; once it
    // is back, the same request succeeds.
    s3.pause();
    let started = std::time::Instant::now();
    let r = client.get(format!("{}/{hash}.narinfo", kiln.url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let r = client.get(format!("{}/{}", kiln.url, ni.url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "{:?}", started.elapsed());
    s3.resume();
    let r = client.get(format!("{}/{hash}.narinfo", kiln.url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let metrics = reqwest::get(format!("{}/metrics", kiln.url)).await.unwrap().text().await.unwrap();
    let errors: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kiln_cache_storage_errors_total "))
        .unwrap_or_else(|| panic!("{metrics}"))
        .parse()
        .unwrap();
    assert!(errors >= 2.0, "{errors}");
    // The credentials are in no log line.
    assert!(!kiln.log().contains("kiln-test-secret"));
}

#[tokio::test]
async fn built_outputs_are_ingested_into_the_bucket_and_collected_from_it() {
    let s3 = S3::start("kiln-ingest");
    let (top, closure) = build_closure("s3ingest");
    let state = tempfile::tempdir().unwrap();
    let config: Config =
        toml::from_str(&format!("state_dir = \"{}\"\n{}", state.path().display(), s3.cache_config())).unwrap();
    let t = TestDb::sqlite().await;
    let cache = Cache::open(&config, t.db.clone(), SigningKey::generate("s3-1").unwrap()).unwrap();

    let infos = ingest_local(&cache, &closure, Origin::Build).await.unwrap();
    assert_eq!(infos.len(), 3);
    let objects = s3.keys();
    for info in &infos {
        assert!(objects.contains(&format!("{}.narinfo", info.store_path.hash_part())), "{objects:?}");
        assert!(objects.contains(&info.url), "{objects:?}");
        assert!(info.verify(&[cache.public_key()]));
        // Read back through the cache, as the queue does.
        assert_eq!(cache.narinfo(&info.store_path).await.unwrap().as_ref(), Some(info));
    }
    let paths: Vec<StorePath> = closure.iter().map(|p| StorePath::parse(p).unwrap()).collect();
    assert_eq!(cache.own_paths(&paths).await.unwrap().len(), 3);
    // Nothing of the NARs stays in the local spool.
    let spool: Vec<_> = std::fs::read_dir(state.path().join("cache-spool")).unwrap().collect();
    assert!(spool.is_empty(), "{spool:?}");

    // No build keeps the paths, stored two hours ago: collection deletes
    // their narinfos from the bucket. The NAR objects are younger than the
    // hour's grace (their age is the bucket's own clock) and stay.
    let mut c = t.db.conn().await.unwrap();
    let old = kiln::db::now() - 7200;
    kiln::db::run!(c.ex(), c => sqlx::query("UPDATE cache_paths SET created_at = $1").bind(old).execute(&mut *c).await.unwrap().rows_affected());
    drop(c);
    let report = gc::collect(&cache, 0, false).await.unwrap();
    assert_eq!(report.deleted_paths.len(), 3, "{report:?}");
    let left = s3.keys();
    assert!(!left.iter().any(|k| k.ends_with(".narinfo")), "{left:?}");
    assert!(infos.iter().all(|i| left.contains(&i.url)), "{left:?}");
    let sp = StorePath::parse(&top).unwrap();
    assert!(cache.narinfo(&sp).await.unwrap().is_none());
}
