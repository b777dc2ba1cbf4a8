//! What an upload is trusted for, with the real Nix client and the real
//! `kiln serve`: an upload keeps the uploader's NAR file, URL and
//! signatures (so the uploader's own Nix, which remembers the narinfo it
//! wrote, substitutes it back), is signed by Kiln only when a trusted
//! upload key signed it, and never counts as the output of a job Kiln
//! builds: the job is built anyway and the real output replaces the upload.

mod support;

use std::path::{Path, PathBuf};

use kiln::nix::{Hash, NarInfo, PublicKey, StorePath};
use support::*;

const TOKEN: &str = "trust-token-1";

fn start(extra: &str) -> Kiln {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    std::fs::write(dir.path().join("kiln.toml"), format!("api_token_files = [\"token\"]\n{extra}\n")).unwrap();
    Kiln::start_in(dir, &[])
}

fn kiln_key(kiln: &Kiln) -> String {
    std::fs::read_to_string(kiln.dir.path().join("kiln-state/keys/cache.pub")).unwrap().trim().to_string()
}

/// An uploader's signing key pair: (secret key file, public key).
fn uploader_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let (sk, pk) = (dir.join(format!("{name}.sec")), dir.join(format!("{name}.pub")));
    nix("nix-store", &["--generate-binary-cache-key", name, sk.to_str().unwrap(), pk.to_str().unwrap()]);
    (sk, std::fs::read_to_string(pk).unwrap().trim().to_string())
}

/// `nix copy --from KILN --to <fresh store>` trusting only `key`.
fn copy_from(client: &NixClient, kiln: &Kiln, store: &str, key: &str, path: &str) -> std::process::Output {
    client
        .cmd("nix")
        .args(["copy", "--from", &kiln.url, "--to", store, "--option", "trusted-public-keys", key, path])
        .output()
        .unwrap()
}

async fn narinfo(kiln: &Kiln, path: &str) -> NarInfo {
    let sp = StorePath::parse(path).unwrap();
    let r = reqwest::get(format!("{}/{}.narinfo", kiln.url, sp.hash_part())).await.unwrap();
    assert_eq!(r.status(), 200, "{path}");
    NarInfo::parse(&r.text().await.unwrap()).unwrap()
}

async fn kiln_db(kiln: &Kiln) -> kiln::db::Db {
    kiln::db::Db::connect(&format!("sqlite://{}", kiln.dir.path().join("kiln-state/kiln.db").display())).await.unwrap()
}

#[tokio::test]
async fn an_upload_keeps_its_nar_and_signatures_and_its_uploader_substitutes_it_back() {
    let kiln = start("");
    let keys = tempfile::tempdir().unwrap();
    let (sk, uploader_pk) = uploader_key(keys.path(), "uploader-1");
    let (top, closure) = build_closure("trust-roundtrip");

    // As the README says: the uploader signs with its own key on the way.
    let uploader = NixClient::new();
    let to = format!("{}?secret-key={}", kiln.url, sk.display());
    let out = uploader
        .cmd("nix")
        .args(["copy", "--to", &to, &top, "--option", "netrc-file", uploader.netrc(TOKEN).to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // Every path is served as uploaded: the NAR Nix compressed (xz, Nix's
    // default) under the URL Nix chose, with the uploader's signature and
    // none of Kiln's.
    let kiln_pk = PublicKey::parse(&kiln_key(&kiln)).unwrap();
    let up_pk = PublicKey::parse(&uploader_pk).unwrap();
    let db = kiln_db(&kiln).await;
    for p in &closure {
        let ni = narinfo(&kiln, p).await;
        assert_eq!(ni.compression, "xz", "{p}");
        assert!(ni.url.ends_with(".nar.xz"), "{}", ni.url);
        assert!(ni.verify(std::slice::from_ref(&up_pk)), "{p} keeps the uploader's signature");
        assert!(!ni.verify(std::slice::from_ref(&kiln_pk)), "{p} is not signed by Kiln");
        let nar = reqwest::get(format!("{}/{}", kiln.url, ni.url)).await.unwrap();
        assert_eq!(nar.status(), 200);
        let bytes = nar.bytes().await.unwrap();
        assert_eq!(Some(Hash::sha256(&bytes)), ni.file_hash);
        let mut c = db.conn().await.unwrap();
        let row = kiln::db::cache_paths::get(c.ex(), StorePath::parse(p).unwrap().hash_part()).await.unwrap().unwrap();
        assert_eq!((row.origin.as_str(), row.kiln_signed), ("upload", false));
    }

    // The uploader's Nix remembers the narinfos it wrote (its disk cache,
    // the same XDG_CACHE_HOME) and fetches the NARs they name from Kiln.
    let remembered = uploader.dir.path().join("cache/nix/binary-cache-v6.sqlite");
    let disk = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", remembered.display())).await.unwrap();
    let sp = StorePath::parse(&top).unwrap();
    let url: String = sqlx::query_scalar("SELECT url FROM NARs WHERE hashPart = ?")
        .bind(sp.hash_part())
        .fetch_one(&disk)
        .await
        .unwrap();
    disk.close().await;
    assert_eq!(url, narinfo(&kiln, &top).await.url, "the uploader's remembered narinfo names what Kiln serves");
    let (store, root) = uploader.store("back");
    let out = copy_from(&uploader, &kiln, &store, &uploader_pk, &top);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(root.join(top.trim_start_matches('/'))).unwrap(), std::fs::read(&top).unwrap());

    // Another machine trusting the uploader's key gets it too.
    let other = NixClient::new();
    let (store, root) = other.store("fresh");
    let out = copy_from(&other, &kiln, &store, &uploader_pk, &top);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for p in &closure {
        assert!(root.join(p.trim_start_matches('/')).exists(), "{p}");
    }

    // A deployer trusting only Kiln's key refuses it: Kiln did not build it.
    let deployer = NixClient::new();
    let (store, root) = deployer.store("deploy");
    let out = copy_from(&deployer, &kiln, &store, &kiln_key(&kiln), &top);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lacks a valid signature"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!root.join(top.trim_start_matches('/')).exists());
}

#[tokio::test]
async fn a_trusted_upload_is_signed_by_kiln_as_well() {
    let keys = tempfile::tempdir().unwrap();
    let (sk, uploader_pk) = uploader_key(keys.path(), "trusted-uploader-1");
    let kiln =
        start(&format!("[cache]\nrequire_upload_signatures = true\ntrusted_upload_keys = [\"{uploader_pk}\"]\n"));
    let (top, closure) = build_closure("trust-vouched");
    let uploader = NixClient::new();
    let netrc = uploader.netrc(TOKEN);
    let netrc = netrc.to_str().unwrap();

    // Unsigned: refused, nothing stored.
    let out =
        uploader.cmd("nix").args(["copy", "--to", &kiln.url, &top, "--option", "netrc-file", netrc]).output().unwrap();
    assert!(!out.status.success());
    let sp = StorePath::parse(&top).unwrap();
    assert_eq!(reqwest::get(format!("{}/{}.narinfo", kiln.url, sp.hash_part())).await.unwrap().status(), 404);

    let to = format!("{}?secret-key={}", kiln.url, sk.display());
    let out = uploader.cmd("nix").args(["copy", "--to", &to, &top, "--option", "netrc-file", netrc]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ni = narinfo(&kiln, &top).await;
    assert!(ni.verify(&[PublicKey::parse(&uploader_pk).unwrap()]));
    assert!(ni.verify(&[PublicKey::parse(&kiln_key(&kiln)).unwrap()]));

    // Now a client trusting only Kiln's key substitutes it.
    let deployer = NixClient::new();
    let (store, root) = deployer.store("deploy");
    let out = copy_from(&deployer, &kiln, &store, &kiln_key(&kiln), &top);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for p in &closure {
        assert!(root.join(p.trim_start_matches('/')).exists(), "{p}");
    }
    // Still an upload: not something Kiln built.
    let db = kiln_db(&kiln).await;
    let mut c = db.conn().await.unwrap();
    let row = kiln::db::cache_paths::get(c.ex(), sp.hash_part()).await.unwrap().unwrap();
    assert_eq!((row.origin.as_str(), row.kiln_signed), ("upload", true));
}

/// The NAR of a regular file with these contents.
fn file_nar(contents: &str) -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("f"), contents).unwrap();
    let mut nar = Vec::new();
    kiln::nix::nar::dump_path(&d.path().join("f"), &mut nar).unwrap();
    nar
}

#[tokio::test]
async fn an_upload_of_a_jobs_output_does_not_stop_kiln_building_it() {
    let sshd = Sshd::start();
    let builder = Builder::new(&sshd, "b0", 2);
    let machines = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(machines.path(), format!("{}\n", builder.machines_line_with_port)).unwrap();
    let kiln = start(&format!("machines_file = \"{}\"", machines.path().display()));
    let t = unique("forged");
    let flake = Flake::new(
        &format!(
            "{{ outputs = _: {{ hydraJobs.victim = derivation {{ name = \"victim-{t}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo real-{t} > $out\" ]; }}; }}; }}"
        ),
        &[],
    );
    let out_path = flake.eval_raw("hydraJobs.victim.outPath").trim().to_string();
    let sp = StorePath::parse(&out_path).unwrap();

    // Someone with an upload token uploads other contents for the job's
    // output before Kiln has built it, exactly as `nix copy --to` would.
    let forged = file_nar(&format!("forged-{t}\n"));
    let forged_hash = Hash::sha256(&forged);
    let file = format!("nar/{}.nar", forged_hash.to_base32());
    let http = reqwest::Client::new();
    let r = http.put(format!("{}/{file}", kiln.url)).bearer_auth(TOKEN).body(forged.clone()).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = format!(
        "StorePath: {out_path}\nURL: {file}\nCompression: none\nNarHash: {forged_hash}\nNarSize: {}\nReferences: \n",
        forged.len()
    );
    let r = http
        .put(format!("{}/{}.narinfo", kiln.url, sp.hash_part()))
        .bearer_auth(TOKEN)
        .body(text)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let kiln_pk = PublicKey::parse(&kiln_key(&kiln)).unwrap();
    assert!(!narinfo(&kiln, &out_path).await.verify(std::slice::from_ref(&kiln_pk)), "Kiln never signs the upload");

    // Then the project arrives and Kiln evaluates it.
    let api = Api::new(&kiln.url, Some(TOKEN));
    let body = serde_json::json!({ "repo": flake.path().display().to_string() });
    assert_eq!(api.send("PUT", "/project/forge", Some(body)).await.0, 201);
    let build = wait_for(180, "the victim's build to finish", || async {
        let (_, v) = api.get("/jobset/forge/main/evals").await;
        let e = v["evals"].as_array()?.first()?.clone();
        let (_, detail) = api.get(&format!("/eval/{}", e["id"])).await;
        let id = detail["jobs"]["victim"].as_i64()?;
        let (_, b) = api.get(&format!("/build/{id}")).await;
        (b["finished"] == 1).then_some(b)
    })
    .await;
    assert_eq!(build["buildstatus"], 0, "{build}\n{}", kiln.log());

    // Built by the builder, not taken from the upload.
    assert_eq!(build["iscachedbuild"], 0, "the upload was taken as the job's output: {build}");
    let db = kiln_db(&kiln).await;
    let mut c = db.conn().await.unwrap();
    let step: Option<(String, Option<String>)> = kiln::db::run!(c.ex(), c => sqlx::query_as(
        "SELECT s.state, s.machine FROM builds b JOIN steps s ON s.id = b.top_step_id WHERE b.id = $1")
        .bind(build["id"].as_i64().unwrap()).fetch_optional(&mut *c).await.unwrap());
    let (state, machine) = step.expect("the build has a step: Kiln built it");
    assert_eq!(state, "succeeded");
    assert!(machine.is_some_and(|m| m.contains("127.0.0.1")));
    assert!(builder.has(&out_path), "the builder built {out_path}");

    // What Kiln serves now is the real output, signed by Kiln.
    let ni = narinfo(&kiln, &out_path).await;
    assert!(ni.verify(std::slice::from_ref(&kiln_pk)));
    assert_eq!(ni.nar_hash, Hash::sha256(&file_nar(&format!("real-{t}\n"))));
    let row = kiln::db::cache_paths::get(c.ex(), sp.hash_part()).await.unwrap().unwrap();
    assert_eq!((row.origin.as_str(), row.kiln_signed), ("build", true));
    let deployer = NixClient::new();
    let (store, root) = deployer.store("deploy");
    let out = copy_from(&deployer, &kiln, &store, &kiln_key(&kiln), &out_path);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(root.join(out_path.trim_start_matches('/'))).unwrap(), format!("real-{t}\n"));
}

#[tokio::test]
async fn a_nar_file_the_cache_already_has_is_checked_in_place() {
    let kiln = start("");
    let http = reqwest::Client::new();
    let nar = file_nar(&format!("same contents {}\n", unique("same")));
    let hash = Hash::sha256(&nar);
    let file = format!("nar/{}.nar", hash.to_base32());
    let text = |path: &str, nar_hash: &Hash| {
        format!(
            "StorePath: {path}\nURL: {file}\nCompression: none\nNarHash: {nar_hash}\nNarSize: {}\nReferences: \n",
            nar.len()
        )
    };
    let put = |url: String, body: Vec<u8>| {
        let http = http.clone();
        async move { http.put(url).bearer_auth(TOKEN).body(body).send().await.unwrap().status().as_u16() }
    };
    let first = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-one";
    assert_eq!(put(format!("{}/{file}", kiln.url), nar.clone()).await, 200);
    assert_eq!(
        put(format!("{}/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz.narinfo", kiln.url), text(first, &hash).into_bytes()).await,
        200
    );

    // Another path with the same contents: Nix finds the file (HEAD) and
    // sends only the narinfo, which must still match the file.
    assert_eq!(reqwest::Client::new().head(format!("{}/{file}", kiln.url)).send().await.unwrap().status(), 200);
    let second = "/nix/store/8h7qgvs4kgzsn8a6rb273saxyqh4jxlz-two";
    let wrong = Hash::sha256(b"other");
    let r =
        put(format!("{}/8h7qgvs4kgzsn8a6rb273saxyqh4jxlz.narinfo", kiln.url), text(second, &wrong).into_bytes()).await;
    assert_eq!(r, 400);
    assert_eq!(
        reqwest::get(format!("{}/8h7qgvs4kgzsn8a6rb273saxyqh4jxlz.narinfo", kiln.url)).await.unwrap().status(),
        404
    );
    let r =
        put(format!("{}/8h7qgvs4kgzsn8a6rb273saxyqh4jxlz.narinfo", kiln.url), text(second, &hash).into_bytes()).await;
    assert_eq!(r, 200);
    assert_eq!(narinfo(&kiln, second).await.url, file);
    assert!(kiln.dir.path().join("kiln-state/cache").join(&file).exists(), "the shared file stays");
}
