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

/// `nix copy --to URL` of `path`'s closure with the token, signed with a
/// new uploader key; that key's public half (`name:base64`).
fn upload(url: &str, path: &str) -> String {
    let keys = tempfile::tempdir().unwrap();
    let (sk, pk) = (keys.path().join("up.sec"), keys.path().join("up.pub"));
    nix("nix-store", &["--generate-binary-cache-key", "uploader-1", sk.to_str().unwrap(), pk.to_str().unwrap()]);
    let uploader = NixClient::new();
    let out = uploader
        .cmd("nix")
        .args(["copy", "--to", &format!("{url}?secret-key={}", sk.display()), path])
        .args(["--option", "netrc-file", uploader.netrc(TOKEN).to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read_to_string(&pk).unwrap().trim().to_string()
}

#[tokio::test]
async fn nix_copies_through_kiln_into_the_bucket_and_back() {
    let s3 = S3::start("kiln-cache");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    std::fs::write(dir.path().join("kiln.toml"), format!("api_token_files = [\"token\"]\n{}", s3.cache_config()))
        .unwrap();
    let kiln = Kiln::start_in(dir, &[]);

    let (top, closure) = build_closure("s3");
    let uploader_key = upload(&kiln.url, &top);

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

/// Several nodes on one PostgreSQL and one bucket: two web-only nodes and
/// one that evaluates and builds, sharing the signing key. What the
/// builder stores and what is uploaded through one web node is served at
/// once by the other, to a real Nix client, and the web nodes keep serving
/// when the building node dies.
#[tokio::test]
async fn two_web_nodes_serve_one_bucket_while_a_third_builds() {
    let s3 = S3::start("kiln-nodes");
    let pg = PgDatabase::create().await;
    let keys = tempfile::tempdir().unwrap();
    let (sk, pk) = (keys.path().join("cache.sec"), keys.path().join("cache.pub"));
    nix("nix-store", &["--generate-binary-cache-key", "nodes-1", sk.to_str().unwrap(), pk.to_str().unwrap()]);
    let public = std::fs::read_to_string(&pk).unwrap();
    let t = unique("nodes");
    let flake = Flake::new(
        &format!(
            r#"{{ outputs = _: {{ hydraJobs.ok = {}; }}; }}"#,
            drv_expr(&format!("ok-{t}"), "echo hello-from-the-builder; echo built > $out")
        ),
        &[(".kiln.toml", "[jobsets.main]\ncheck_interval = 0\n")],
    );
    let node = |project: bool| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), TOKEN).unwrap();
        let mut text = format!("database_url = \"{}\"\napi_token_files = [\"token\"]\n", pg.url);
        if project {
            text.push_str(&format!("[[projects]]\nname = \"n\"\nrepo = \"{}\"\n", flake.path().display()));
        }
        text.push_str(
            &s3.cache_config().replace("[cache]\n", &format!("[cache]\nsecret_key_file = \"{}\"\n", sk.display())),
        );
        std::fs::write(dir.path().join("kiln.toml"), text).unwrap();
        dir
    };
    let mut builder = Kiln::start_with(node(true), &[], &["--roles", "web,eval,queue,notify"]);
    let web1 = Kiln::start_with(node(false), &[], &["--roles", "web"]);
    let web2 = Kiln::start_with(node(false), &[], &["--roles", "web"]);

    // The building node's output, served by both web nodes.
    let api = Api::new(&web1.url, None);
    let (out, drv) = wait_for(90, "the build, seen from a web node", || async {
        let e = api.get("/jobset/n/main/evals").await.1["evals"].as_array()?.first()?.clone();
        let (_, d) = api.get(&format!("/eval/{}", e["id"])).await;
        let (_, b) = api.get(&format!("/build/{}", d["jobs"]["ok"].as_i64()?)).await;
        let out = b["buildoutputs"]["out"]["path"].as_str()?.to_string();
        (b["finished"] == 1).then(|| (out, b["drvpath"].as_str().unwrap().to_string()))
    })
    .await;
    let hash = StorePath::parse(&out).unwrap().hash_part().to_string();
    let a = reqwest::get(format!("{}/{hash}.narinfo", web1.url)).await.unwrap().text().await.unwrap();
    let b = reqwest::get(format!("{}/{hash}.narinfo", web2.url)).await.unwrap().text().await.unwrap();
    assert_eq!(a, b);
    assert!(NarInfo::parse(&a).unwrap().verify(&[kiln::nix::PublicKey::parse(public.trim()).unwrap()]));

    // nginx in front of the two web nodes, as the README sets it up.
    let lb = Nginx::start(&[&web1.url, &web2.url]);

    // Uploaded through the balancer (the NAR and its narinfo may reach
    // different nodes), substituted through it after a web node died.
    let (top, closure) = build_closure("nodes");
    let uploader_key = upload(&lb.url, &top);

    // The building node and one web node die; the other serves on.
    builder.child.kill().unwrap();
    builder.child.wait().unwrap();
    let mut web1 = web1;
    web1.child.kill().unwrap();
    web1.child.wait().unwrap();
    let client = NixClient::new();
    let (store, root) = client.store("nodes");
    let trusted = format!("{} {uploader_key}", public.trim());
    let out_cmd = client
        .cmd("nix")
        .args(["copy", "--from", &lb.url, "--to", &store, "--option", "trusted-public-keys", &trusted, &top, &out])
        .output()
        .unwrap();
    assert!(out_cmd.status.success(), "{}", String::from_utf8_lossy(&out_cmd.stderr));
    for p in closure.iter().chain([&out]) {
        assert!(root.join(p.trim_start_matches('/')).exists(), "{p}");
    }
    // The build's log, kept by the node that ran it (now dead), is served
    // by the other web node from the bucket.
    let base = drv.trim_start_matches("/nix/store/");
    assert!(s3.keys().contains(&format!("log/{base}.zst")), "{:?}", s3.keys());
    let log = reqwest::get(format!("{}/log/{base}", web2.url)).await.unwrap();
    assert_eq!(log.status().as_u16(), 200);
    assert!(log.text().await.unwrap().contains("hello-from-the-builder"));
    assert_eq!(std::fs::read_to_string(root.join(out.trim_start_matches('/'))).unwrap(), "built\n");
}

/// nginx balancing requests over Kiln's web nodes, with the README's
/// settings.
struct Nginx {
    url: String,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(upstreams: &[&str]) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let servers: String = upstreams
            .iter()
            .map(|u| format!("server {} max_fails=1 fail_timeout=5s;\n", u.trim_start_matches("http://")))
            .collect();
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
                 uwsgi_temp_path {d}; scgi_temp_path {d};\n\
                 upstream kiln {{ {servers} }}\n\
                 server {{ listen 127.0.0.1:{port}; client_max_body_size 0; proxy_request_buffering off;\n\
                 proxy_buffering off; location / {{ proxy_pass http://kiln; proxy_http_version 1.1;\n\
                 proxy_set_header Host $host; proxy_read_timeout 3600s;\n\
                 proxy_next_upstream error timeout http_502 http_503; }} }} }}\n"
            ),
        )
        .unwrap();
        let child = std::process::Command::new("nginx")
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx (scripts/test installs it)");
        let start = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(start.elapsed() < std::time::Duration::from_secs(10), "nginx did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Nginx { url: format!("http://127.0.0.1:{port}"), child, _dir: dir }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers too (a SIGKILL would leave
        // them running, holding the port).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// With `redirect_nars`, a NAR download is a redirect to a presigned URL
/// of the object: the bytes come from the bucket, and a real Nix client
/// follows it.
#[tokio::test]
async fn nar_downloads_can_redirect_to_presigned_urls() {
    let s3 = S3::start("kiln-redirect");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    let cfg = format!("api_token_files = [\"token\"]\n{}redirect_nars = true\n", s3.cache_config());
    std::fs::write(dir.path().join("kiln.toml"), cfg).unwrap();
    let kiln = Kiln::start_in(dir, &[]);
    let (top, _) = build_closure("redirect");
    let trusted = upload(&kiln.url, &top);

    let hash = StorePath::parse(&top).unwrap().hash_part().to_string();
    let ni = NarInfo::parse(&reqwest::get(format!("{}/{hash}.narinfo", kiln.url)).await.unwrap().text().await.unwrap())
        .unwrap();
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = client.get(format!("{}/{}", kiln.url, ni.url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 307);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with(&s3.endpoint), "{location}");
    assert!(location.contains("X-Amz-Signature="), "{location}");
    let direct = reqwest::get(&location).await.unwrap();
    assert_eq!(direct.status().as_u16(), 200);
    assert_eq!(direct.bytes().await.unwrap().to_vec(), s3.get(&ni.url).unwrap());
    // A URL without the signature is refused by the store itself.
    let unsigned = location.split('?').next().unwrap();
    assert_eq!(reqwest::get(unsigned).await.unwrap().status().as_u16(), 403);

    let client = NixClient::new();
    let (store, root) = client.store("redirected");
    let out = client
        .cmd("nix")
        .args(["copy", "--from", &kiln.url, "--to", &store, "--option", "trusted-public-keys", trusted.trim(), &top])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(root.join(top.trim_start_matches('/')).exists());
    assert!(!kiln.log().contains("X-Amz-Signature"), "a presigned URL was logged");
}

/// `kiln cache copy` moves a cache directory into the bucket, NARs before
/// narinfos, skips what is there on a second run, and a Kiln on the bucket
/// then serves what the directory held.
#[tokio::test]
async fn a_cache_directory_is_copied_into_the_bucket_and_resumed() {
    let s3 = S3::start("kiln-copy");
    let (top, closure) = build_closure("s3copy");
    let state = tempfile::tempdir().unwrap();
    let config = Config { state_dir: state.path().to_path_buf(), ..Default::default() };
    let t = TestDb::sqlite().await;
    let cache = Cache::open(&config, t.db.clone(), SigningKey::generate("dir-1").unwrap()).unwrap();
    let infos = ingest_local(&cache, &closure, Origin::Build).await.unwrap();
    let dir = state.path().join("cache");

    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("kiln.toml"), s3.cache_config()).unwrap();
    let copy = || {
        let out = kiln_cmd()
            .args(["cache", "copy", "--from", dir.to_str().unwrap()])
            .current_dir(work.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = copy();
    assert!(first.contains("copied 6 files"), "{first}");
    // NARs first: no narinfo was copied before every NAR was.
    let order: Vec<&str> = first.lines().filter_map(|l| l.strip_prefix("copied ")).collect();
    let last_nar = order.iter().rposition(|k| k.starts_with("nar/")).unwrap();
    let first_narinfo = order.iter().position(|k| k.ends_with(".narinfo")).unwrap();
    assert!(last_nar < first_narinfo, "{order:?}");
    let objects = s3.keys();
    for info in &infos {
        let key = format!("{}.narinfo", info.store_path.hash_part());
        assert_eq!(s3.get(&key).unwrap(), std::fs::read(dir.join(&key)).unwrap());
        assert!(objects.contains(&info.url), "{objects:?}");
    }
    // Resumed: nothing copied twice.
    let again = copy();
    assert!(again.contains("copied 0 files") && again.contains("6 were there already"), "{again}");

    // A Kiln on the bucket serves the directory's paths.
    let served = tempfile::tempdir().unwrap();
    std::fs::write(served.path().join("kiln.toml"), s3.cache_config()).unwrap();
    let kiln = Kiln::start_in(served, &[]);
    let hash = StorePath::parse(&top).unwrap().hash_part().to_string();
    let r = reqwest::get(format!("{}/{hash}.narinfo", kiln.url)).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.text().await.unwrap().into_bytes(), std::fs::read(dir.join(format!("{hash}.narinfo"))).unwrap());
}
