//! The binary cache served by `kiln serve`, used by the real Nix client:
//! uploads with `nix copy --to` (only with a token), substitution with
//! the key that signed them (refused with another), `nix path-info` over
//! HTTP, the deployer URLs, pinning builds, logs, and every kind of bad
//! request. What uploads are trusted for is tests/cache_trust.rs.

mod support;

use kiln::db::builds::{self, BuildStatus, NewBuild};
use kiln::db::evaluations::{self, Member, NewEvaluation};
use kiln::db::{Db, jobsets, projects};
use support::*;

const TOKEN: &str = "cache-token-1";

fn start(extra: &str) -> Kiln {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    std::fs::write(dir.path().join("kiln.toml"), format!("api_token_files = [\"token\"]\n{extra}\n")).unwrap();
    Kiln::start_in(dir, &[])
}

fn public_key(kiln: &Kiln) -> String {
    std::fs::read_to_string(kiln.dir.path().join("kiln-state/keys/cache.pub")).unwrap()
}

fn upload(client: &NixClient, kiln: &Kiln, token: Option<&str>, path: &str) -> std::process::Output {
    upload_to(client, &kiln.url, token, path)
}

/// `nix copy --to URL` (the URL may carry `?secret-key=`).
fn upload_to(client: &NixClient, url: &str, token: Option<&str>, path: &str) -> std::process::Output {
    let mut c = client.cmd("nix");
    c.args(["copy", "--to", url, path]);
    if let Some(t) = token {
        c.args(["--option", "netrc-file", client.netrc(t).to_str().unwrap()]);
    }
    c.output().unwrap()
}

async fn status(url: &str) -> u16 {
    reqwest::get(url).await.unwrap().status().as_u16()
}

#[tokio::test]
async fn nix_uploads_with_a_token_and_substitutes_with_the_key() {
    let kiln = start("");
    let (top, closure) = build_closure("http");
    assert_eq!(closure.len(), 3);
    let keys = tempfile::tempdir().unwrap();
    let (sk, pk) = (keys.path().join("up.sec"), keys.path().join("up.pub"));
    nix("nix-store", &["--generate-binary-cache-key", "uploader-1", sk.to_str().unwrap(), pk.to_str().unwrap()]);
    let uploader_key = std::fs::read_to_string(&pk).unwrap();
    let signed_url = format!("{}?secret-key={}", kiln.url, sk.display());

    // Without credentials, or with a wrong token: refused, nothing kept.
    let uploader = NixClient::new();
    assert!(!upload(&uploader, &kiln, None, &top).status.success());
    assert!(!upload(&uploader, &kiln, Some("wrong"), &top).status.success());
    let sp = kiln::nix::StorePath::parse(&top).unwrap();
    assert_eq!(status(&format!("{}/{}.narinfo", kiln.url, sp.hash_part())).await, 404);

    // With the token in a netrc file, as Nix sends it, signed on the way.
    let out = upload_to(&uploader, &signed_url, Some(TOKEN), &top);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // `nix path-info --store http://…` lists the closure.
    let client = NixClient::new();
    let out = client.cmd("nix").args(["path-info", "--store", &kiln.url, "-r", &top]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut listed: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    listed.sort();
    let mut expected = closure.clone();
    expected.sort();
    assert_eq!(listed, expected);

    // Substitution into a fresh store, checking the uploader's signatures.
    let (store, root) = client.store("good");
    let out = client
        .cmd("nix")
        .args([
            "copy",
            "--from",
            &kiln.url,
            "--to",
            &store,
            "--option",
            "trusted-public-keys",
            uploader_key.trim(),
            &top,
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for p in &closure {
        assert!(root.join(p.trim_start_matches('/')).exists(), "{p}");
    }
    let copied = std::fs::read_to_string(root.join(top.trim_start_matches('/'))).unwrap();
    assert_eq!(copied, std::fs::read_to_string(&top).unwrap());

    // Trusting another key, here Kiln's own (Kiln did not build it), the
    // client refuses.
    let other = NixClient::new();
    let (store, _) = other.store("bad");
    let out = other
        .cmd("nix")
        .args(["copy", "--from", &kiln.url, "--to", &store])
        .args(["--option", "trusted-public-keys", public_key(&kiln).trim(), &top])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lacks a valid signature"));

    // The cache directory is Nix's own file layout: `file://` works too.
    let file = NixClient::new();
    let (store, _) = file.store("file");
    let url = format!("file://{}", kiln.dir.path().join("kiln-state/cache").display());
    let out = file
        .cmd("nix")
        .args(["copy", "--from", &url, "--to", &store, "--option", "trusted-public-keys", uploader_key.trim(), &top])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn nar_url(kiln: &Kiln, hash_part: &str) -> String {
    let text = std::fs::read_to_string(kiln.dir.path().join(format!("kiln-state/cache/{hash_part}.narinfo"))).unwrap();
    let info = kiln::nix::NarInfo::parse(&text).unwrap();
    format!("{}/{}", kiln.url, info.url)
}

#[tokio::test]
async fn serving_answers_ranges_heads_and_refuses_escapes() {
    let kiln = start("");
    let (top, _) = build_closure("serve");
    assert!(upload(&NixClient::new(), &kiln, Some(TOKEN), &top).status.success());
    let sp = kiln::nix::StorePath::parse(&top).unwrap();
    let http = reqwest::Client::new();

    let r = http.get(format!("{}/nix-cache-info", kiln.url)).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/x-nix-cache-info");
    assert!(r.text().await.unwrap().contains("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40"));
    let r = http.head(format!("{}/{}.narinfo", kiln.url, sp.hash_part())).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/x-nix-narinfo");

    let url = nar_url(&kiln, sp.hash_part());
    let whole = http.get(&url).send().await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.headers()["content-type"], "application/x-nix-nar");
    let len: usize = whole.headers()["content-length"].to_str().unwrap().parse().unwrap();
    let bytes = whole.bytes().await.unwrap();
    assert_eq!(bytes.len(), len);
    let part = http.get(&url).header("Range", "bytes=4-9").send().await.unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], format!("bytes 4-9/{len}").as_str());
    assert_eq!(&part.bytes().await.unwrap()[..], &bytes[4..10]);
    let tail = http.get(&url).header("Range", "bytes=-3").send().await.unwrap();
    assert_eq!(&tail.bytes().await.unwrap()[..], &bytes[len - 3..]);
    let beyond = http.get(&url).header("Range", format!("bytes={len}-")).send().await.unwrap();
    assert_eq!(beyond.status(), 416);
    assert_eq!(beyond.headers()["content-range"], format!("bytes */{len}").as_str());

    // Misses are 404 and nothing outside the cache is ever served.
    let missing = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz";
    assert_eq!(status(&format!("{}/{missing}.narinfo", kiln.url)).await, 404);
    assert_eq!(status(&format!("{}/nar/{}.nar.zst", kiln.url, "0".repeat(52))).await, 404);
    for bad in [
        "/..%2fkiln.db",
        "/%2e%2e/kiln.db",
        "/%2e%2e%2fkiln.db",
        "/nar/..%2f..%2fkiln.db",
        "/nar/%2e%2e",
        "/nar/..%2Fkeys%2Fcache.sec",
        "/log/..%2f..%2fkiln.db",
        "/log/%2fetc%2fpasswd",
        "/%2fetc%2fpasswd",
        "/nix-cache-info%00",
        "/nar/x%00.nar",
        "/keys/cache.sec",
        "/kiln.db",
        "/pending",
        "/nar/.tmp-x",
    ] {
        // Sent byte for byte: an HTTP client library would normalise the dots away.
        let (code, body) = raw_get(&kiln.url, bad).await;
        assert!(code == 404 || code == 400, "{bad}: {code}");
        assert!(!body.windows(6).any(|w| w == b"SQLite"), "{bad} leaked the database");
        assert!(!String::from_utf8_lossy(&body).contains("kiln-1:"), "{bad} leaked a key");
    }
}

#[tokio::test]
async fn bad_uploads_are_refused_and_keep_nothing() {
    let kiln = start("[cache]\nmax_upload_mib = 1\n");
    let http = reqwest::Client::new();
    let (top, _) = build_closure("bad-upload");
    let sp = kiln::nix::StorePath::parse(&top).unwrap();
    let mut nar = Vec::new();
    kiln::nix::nar::dump_path(std::path::Path::new(&top), &mut nar).unwrap();
    let nar_hash = kiln::nix::Hash::sha256(&nar);
    let file = format!("{}.nar", nar_hash.to_base32());
    let put = |path: String, body: Vec<u8>| {
        let http = http.clone();
        async move { http.put(path).bearer_auth(TOKEN).body(body).send().await.unwrap().status().as_u16() }
    };
    let narinfo = |hash: &kiln::nix::Hash, size: usize| {
        format!(
            "StorePath: {top}\nURL: nar/{file}\nCompression: none\nNarHash: {hash}\nNarSize: {size}\nReferences: \n"
        )
        .into_bytes()
    };

    // No token: 401 with a Basic challenge, so Nix retries with its netrc.
    let r = http.put(format!("{}/nar/{file}", kiln.url)).body(nar.clone()).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["www-authenticate"].to_str().unwrap().starts_with("Basic"));

    // A NAR whose narinfo claims another hash or size: rejected, nothing published.
    assert_eq!(put(format!("{}/nar/{file}", kiln.url), nar.clone()).await, 200);
    let wrong = kiln::nix::Hash::sha256(b"something else");
    assert_eq!(put(format!("{}/{}.narinfo", kiln.url, sp.hash_part()), narinfo(&wrong, nar.len())).await, 400);
    assert_eq!(put(format!("{}/nar/{file}", kiln.url), nar.clone()).await, 200);
    assert_eq!(put(format!("{}/{}.narinfo", kiln.url, sp.hash_part()), narinfo(&nar_hash, nar.len() + 8)).await, 400);
    assert_eq!(status(&format!("{}/{}.narinfo", kiln.url, sp.hash_part())).await, 404);

    // A narinfo whose name is not its store path's hash, or unparsable.
    let other = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz";
    assert_eq!(put(format!("{}/{other}.narinfo", kiln.url), narinfo(&nar_hash, nar.len())).await, 400);
    assert_eq!(put(format!("{}/{}.narinfo", kiln.url, sp.hash_part()), b"garbage".to_vec()).await, 400);

    // A NAR that is not a NAR, or truncated.
    assert_eq!(put(format!("{}/nar/{file}", kiln.url), b"not a nar at all".to_vec()).await, 200);
    assert_eq!(put(format!("{}/{}.narinfo", kiln.url, sp.hash_part()), narinfo(&nar_hash, nar.len())).await, 400);
    assert_eq!(put(format!("{}/nar/{file}", kiln.url), nar[..nar.len() - 8].to_vec()).await, 200);
    assert_eq!(put(format!("{}/{}.narinfo", kiln.url, sp.hash_part()), narinfo(&nar_hash, nar.len())).await, 400);

    // Over the size limit: 413, whether the length is declared or not.
    let big = format!("/nar/{}.nar", "1".repeat(52));
    let declared = format!(
        "PUT {big} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n",
        2 << 20
    );
    assert_eq!(raw_request(&kiln.url, declared.as_bytes(), &[]).await, 413);
    let chunked =
        format!("PUT {big} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n");
    let mut body = Vec::new();
    for _ in 0..24 {
        body.extend_from_slice(format!("{:x}\r\n", 128 * 1024).as_bytes());
        body.extend(std::iter::repeat_n(0u8, 128 * 1024));
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(raw_request(&kiln.url, chunked.as_bytes(), &body).await, 413);

    // Nothing of all that is in the cache; the real upload then works.
    let cache = kiln.dir.path().join("kiln-state/cache");
    assert!(!cache.join(format!("{}.narinfo", sp.hash_part())).exists());
    let nars: Vec<_> = std::fs::read_dir(cache.join("nar")).unwrap().collect();
    assert!(nars.is_empty(), "no NAR kept: {nars:?}");
    assert_eq!(put(format!("{}/nar/{file}", kiln.url), nar.clone()).await, 200);
    // References must be valid store paths too; this one has none.
    assert_eq!(put(format!("{}/{}.narinfo", kiln.url, sp.hash_part()), narinfo(&nar_hash, nar.len())).await, 200);
    assert_eq!(status(&format!("{}/{}.narinfo", kiln.url, sp.hash_part())).await, 200);
    assert!(std::fs::read_dir(cache.join("pending")).unwrap().next().is_none(), "the pending upload is gone");
}

#[tokio::test]
async fn uploads_must_be_signed_when_required() {
    let d = tempfile::tempdir().unwrap();
    let sec = d.path().join("up.sec");
    let pk = d.path().join("up.pub");
    nix("nix-store", &["--generate-binary-cache-key", "uploader-1", sec.to_str().unwrap(), pk.to_str().unwrap()]);
    let kiln = start(&format!(
        "[cache]\nrequire_upload_signatures = true\ntrusted_upload_keys = [\"{}\"]\n",
        std::fs::read_to_string(&pk).unwrap().trim()
    ));
    let (top, _) = build_closure("signed");
    let c = NixClient::new();
    assert!(!upload(&c, &kiln, Some(TOKEN), &top).status.success(), "unsigned upload refused");
    nix("nix", &["store", "sign", "--key-file", sec.to_str().unwrap(), "-r", &top]);
    let out = upload(&NixClient::new(), &kiln, Some(TOKEN), &top);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Published under Kiln's own signature beside the uploader's.
    let sp = kiln::nix::StorePath::parse(&top).unwrap();
    let text = reqwest::get(format!("{}/{}.narinfo", kiln.url, sp.hash_part())).await.unwrap().text().await.unwrap();
    let info = kiln::nix::NarInfo::parse(&text).unwrap();
    assert!(info.verify(&[kiln::nix::PublicKey::parse(public_key(&kiln).trim()).unwrap()]));
    assert!(info.verify(&[kiln::nix::PublicKey::parse(std::fs::read_to_string(&pk).unwrap().trim()).unwrap()]));
}

/// Records a succeeded build of `job` whose `out` is `path`, as the queue
/// will; returns its id.
async fn record_build(db: &Db, job: &str, drv: &str, path: &str) -> i64 {
    let mut c = db.conn().await.unwrap();
    let p = projects::upsert(c.ex(), &project_spec("deploy")).await.unwrap();
    let j = jobsets::upsert(c.ex(), p.id, &jobsets::JobsetSpec::new("main")).await.unwrap();
    let ev = evaluations::create(
        c.ex(),
        &NewEvaluation {
            jobset_id: j.id,
            commit_sha: "c",
            git_ref: "r",
            flake_ref: "f",
            config_hash: "h",
            workers: 1,
            forced: false,
        },
    )
    .await
    .unwrap();
    let b = builds::create(
        c.ex(),
        &NewBuild {
            jobset_id: j.id,
            job: job.into(),
            drv_path: drv.into(),
            nix_name: "top".into(),
            system: "x86_64-linux".into(),
            outputs: vec![("out".into(), path.into())],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    evaluations::add_member(
        c.ex(),
        &Member { eval_id: ev.id, job: job.into(), build_id: Some(b.id), is_new: true, error: None },
    )
    .await
    .unwrap();
    builds::finish(c.ex(), b.id, BuildStatus::Succeeded, false, None, None).await.unwrap();
    b.id
}

/// Stores paths of the local store in the running Kiln's cache as its own
/// builds, as the queue does after a builder built them.
async fn store_as_built(kiln: &Kiln, db: &Db, paths: &[String]) {
    let state = kiln.dir.path().join("kiln-state");
    let config = kiln::config::Config { state_dir: state.clone(), ..Default::default() };
    let key = kiln::nix::SigningKey::load(&state.join("keys/cache.sec")).unwrap();
    let cache = kiln::cache::Cache::open(&config, db.clone(), key).unwrap();
    kiln::cache::ingest_local(&cache, paths, kiln::cache::Origin::Build).await.unwrap();
}

#[tokio::test]
async fn builds_are_pinned_with_hydras_keep_url() {
    let kiln = start("");
    let db = Db::connect(&format!("sqlite://{}", kiln.dir.path().join("kiln-state/kiln.db").display())).await.unwrap();
    let id = record_build(
        &db,
        "pinned",
        "/nix/store/00000000000000000000000000000000-p.drv",
        "/nix/store/00000000000000000000000000000000-p",
    )
    .await;
    let anon = Api::new(&kiln.url, None);
    let api = Api::new(&kiln.url, Some(TOKEN));
    assert_eq!(anon.get(&format!("/build/{id}")).await.1["keep"], false);
    let page = |html: bool| {
        let url = format!("{}/build/{id}", kiln.url);
        async move {
            let r =
                reqwest::Client::new().get(url).header("Accept", if html { "text/html" } else { "application/json" });
            r.send().await.unwrap().text().await.unwrap()
        }
    };
    assert!(page(true).await.contains(&format!("action=\"/build/{id}/keep/1\"")));

    // Writing needs a token, as every action does.
    assert_eq!(anon.send("POST", &format!("/build/{id}/keep/1"), None).await.0, 401);
    assert_eq!(anon.get(&format!("/build/{id}")).await.1["keep"], false);
    let (code, done) = api.send("POST", &format!("/build/{id}/keep/1"), None).await;
    assert_eq!((code, done["action"].as_str()), (200, Some("keep")));
    assert_eq!(anon.get(&format!("/build/{id}")).await.1["keep"], true);
    let html = page(true).await;
    assert!(html.contains(&format!("action=\"/build/{id}/keep/0\"")) && html.contains("id=\"unkeep\""), "{html}");
    assert!(page(false).await.contains("\"keep\":true"));

    assert_eq!(api.send("POST", &format!("/build/{id}/keep/2"), None).await.0, 400);
    assert_eq!(api.send("POST", "/build/999999/keep/1", None).await.0, 404);
    let (code, done) = api.send("POST", &format!("/build/{id}/keep/0"), None).await;
    assert_eq!((code, done["action"].as_str()), (200, Some("unkeep")));
    assert_eq!(anon.get(&format!("/build/{id}")).await.1["keep"], false);
    let (_, doc) = anon.get("/api/openapi.json").await;
    assert_eq!(doc["paths"]["/build/{id}/keep/{flag}"]["post"]["security"][0]["token"], serde_json::json!([]));

    // From the build page, signed in: the Keep button's form.
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = browser.post(format!("{}/login", kiln.url)).form(&[("token", TOKEN)]).send().await.unwrap();
    let cookie = r.headers()["set-cookie"].to_str().unwrap().split(';').next().unwrap().to_string();
    let html = browser
        .get(format!("{}/build/{id}", kiln.url))
        .header("Cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let keep_form = html.split(&format!("action=\"/build/{id}/keep/1\"")).nth(1).expect("a Keep form");
    let csrf = keep_form.split("name=\"csrf\" value=\"").nth(1).unwrap().split('"').next().unwrap();
    let post = |csrf: &str| {
        browser
            .post(format!("{}/build/{id}/keep/1", kiln.url))
            .header("Cookie", &cookie)
            .form(&[("csrf", csrf.to_string())])
            .send()
    };
    assert_eq!(post("stale").await.unwrap().status(), 403);
    let r = post(csrf).await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], format!("/build/{id}").as_str());
    assert_eq!(anon.get(&format!("/build/{id}")).await.1["keep"], true);
}

#[tokio::test]
async fn deployers_find_the_latest_green_output_and_fetch_it() {
    let kiln = start("");
    let (top, closure) = build_closure("deploy");
    let drv = nix("nix-store", &["-qd", &top]).trim().to_string();
    let db = Db::connect(&format!("sqlite://{}", kiln.dir.path().join("kiln-state/kiln.db").display())).await.unwrap();
    store_as_built(&kiln, &db, &closure).await;
    let id = record_build(&db, "server.toplevel", &drv, &top).await;

    let api = Api::new(&kiln.url, None);
    let no_redirect = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = no_redirect.get(format!("{}/job/deploy/main/server.toplevel/latest", kiln.url)).send().await.unwrap();
    assert!(r.status().is_redirection());
    assert_eq!(r.headers()["location"], format!("/build/{id}").as_str());
    let (code, b) = api.get("/job/deploy/main/server.toplevel/latest").await;
    assert_eq!(code, 200);
    assert_eq!((b["id"].as_i64(), b["buildstatus"].as_i64(), b["finished"].as_i64()), (Some(id), Some(0), Some(1)));
    assert_eq!(b["buildoutputs"]["out"]["path"], top);
    assert_eq!(
        (b["project"].as_str(), b["jobset"].as_str(), b["job"].as_str()),
        (Some("deploy"), Some("main"), Some("server.toplevel"))
    );
    assert_eq!(b["drvpath"], drv);
    let out = reqwest::get(format!("{}/job/deploy/main/server.toplevel/latest/output/out", kiln.url)).await.unwrap();
    assert_eq!(out.text().await.unwrap().trim(), top);
    assert_eq!(status(&format!("{}/job/deploy/main/nope/latest", kiln.url)).await, 404);
    assert_eq!(status(&format!("{}/job/deploy/main/server.toplevel/latest/output/dev", kiln.url)).await, 404);

    // As in the README: a deployer's machine realises the path from Kiln
    // as a substituter, trusting Kiln's key and nothing else.
    let target = NixClient::new();
    let (store, root) = target.store("target");
    let out = target
        .cmd("nix-store")
        .args(["--store", &store, "-r", &top])
        .args(["--option", "substituters", &kiln.url, "--option", "trusted-public-keys", public_key(&kiln).trim()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for p in &closure {
        assert!(root.join(p.trim_start_matches('/')).exists());
    }
}

/// Sends a request head and body as given (tolerating a server that
/// answers before the body is all sent); returns the status.
async fn raw_request(base: &str, head: &[u8], body: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(base.trim_start_matches("http://")).await.unwrap();
    s.write_all(head).await.unwrap();
    let _ = s.write_all(body).await;
    let mut buf = vec![0u8; 64];
    let n = s.read(&mut buf).await.unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// A GET with the path exactly as given; (status, body).
async fn raw_get(base: &str, path: &str) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4).unwrap_or(buf.len());
    let status_line = String::from_utf8_lossy(&buf[..head_end.min(20)]).to_string();
    let code = status_line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, buf[head_end..].to_vec())
}

#[tokio::test]
async fn build_logs_are_served_decompressed() {
    let kiln = start("");
    // Instantiated but never built here, so no local log hides Kiln's.
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("e.nix"), drv_expr("logged", &format!("echo {} > $out", unique("log")))).unwrap();
    let drv_path = nix("nix-instantiate", &[d.path().join("e.nix").to_str().unwrap()]).trim().to_string();
    let drv = drv_path.as_str();
    let base = drv.trim_start_matches("/nix/store/");
    let hash = &base[..32];
    let logs = kiln::logs::Logs::new(&kiln.dir.path().join("kiln-state"));
    let text = "building hello\n".repeat(5000);
    logs.write(drv, text.as_bytes()).unwrap();
    let r = reqwest::get(format!("{}/log/{base}", kiln.url)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), text);
    assert_eq!(status(&format!("{}/log/{hash}-other.drv", kiln.url)).await, 404);
    assert_eq!(status(&format!("{}/log/{hash}-hello", kiln.url)).await, 404);
    // Nix's own client reads it from the cache.
    let c = NixClient::new();
    let out = c.cmd("nix").args(["log", drv, "--option", "substituters", &kiln.url]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("building hello"));
}

#[tokio::test]
async fn a_crash_during_an_upload_leaves_nothing_visible() {
    let mut kiln = start("");
    let file = format!("{}.nar", "4".repeat(52));
    // Half of a declared 8 MiB body, then the server dies mid-upload.
    let addr = kiln.url.trim_start_matches("http://").to_string();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    use tokio::io::AsyncWriteExt;
    let head = format!(
        "PUT /nar/{file} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n",
        8 << 20
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![7u8; 4 << 20]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let _ = std::process::Command::new("kill").args(["-KILL", &kiln.child.id().to_string()]).status();
    let _ = kiln.child.wait();
    let cache = kiln.dir.path().join("kiln-state/cache");
    for dir in ["pending", "nar", ""] {
        for e in std::fs::read_dir(cache.join(dir)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                name.starts_with(".tmp-") || ["nar", "pending", "nix-cache-info"].contains(&name.as_str()),
                "{dir}/{name} is visible after the crash"
            );
        }
    }
    // Started again, the cache answers as if the upload never began.
    let dir = std::mem::replace(&mut kiln.dir, tempfile::tempdir().unwrap());
    let again = Kiln::start_in(dir, &[]);
    assert_eq!(status(&format!("{}/nar/{file}", again.url)).await, 404);
}
