//! Golden tests: Kiln's Nix formats against what the real Nix 2.8 writes
//! and accepts. Each test fails (never skips) when `nix` is missing.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use kiln::nix::hash::Encoding;
use kiln::nix::{Derivation, Hash, NarInfo, PublicKey, SigningKey, StorePath, nar};
use support::*;

fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::create_dir_all(root.join("share/doc/deep/deeper")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::write(root.join("bin/tool"), "#!/bin/sh\necho tool\n").unwrap();
    std::fs::set_permissions(root.join("bin/tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("share/doc/README"), "read me\n").unwrap();
    std::fs::write(root.join("share/doc/deep/deeper/exactly8"), "12345678").unwrap();
    std::fs::write(root.join("empty"), "").unwrap();
    // Names whose byte order differs from a naive sort: upper case, dots, dashes.
    for n in ["B", "a", "a.b", "a-b", "Z_z", "é"] {
        std::fs::write(root.join(n), n.repeat(3)).unwrap();
    }
    std::fs::write(root.join("big"), vec![7u8; 300_001]).unwrap();
    std::os::unix::fs::symlink("bin/tool", root.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("link-abs")).unwrap();
    std::os::unix::fs::symlink("../README", root.join("share/doc/deep/up")).unwrap();
}

#[tokio::test]
async fn nar_of_a_tree_equals_nix_store_dump() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("tree");
    make_tree(&root);
    let ours = {
        let mut v = Vec::new();
        nar::dump_path(&root, &mut v).unwrap();
        v
    };
    let theirs = nix_bytes("nix-store", &["--dump", root.to_str().unwrap()]);
    assert_eq!(ours.len(), theirs.len());
    assert!(ours == theirs, "our NAR differs from nix-store --dump");

    let mut streamed = Vec::new();
    nar::dump_path_async(&root, &mut streamed).await.unwrap();
    assert!(streamed == theirs);

    let sri = nix("nix", &["hash", "path", root.to_str().unwrap()]);
    assert_eq!(Hash::sha256(&ours).encode(Encoding::Sri), sri.trim());
    let b32 = nix("nix", &["hash", "path", "--base32", root.to_str().unwrap()]);
    assert_eq!(Hash::sha256(&ours).to_base32(), b32.trim());

    // Our reader accepts Nix's NAR and restores the same tree.
    assert_eq!(nar::validate(&theirs).unwrap(), theirs.len() as u64);
    let restored = d.path().join("restored");
    nar::restore(&mut &theirs[..], &restored).await.unwrap();
    let again = nix_bytes("nix-store", &["--dump", restored.to_str().unwrap()]);
    assert!(again == theirs, "restored tree dumps differently");
}

#[tokio::test]
async fn nix_restores_our_nar_of_a_single_file_and_symlink() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("f"), "data").unwrap();
    std::os::unix::fs::symlink("f", d.path().join("l")).unwrap();
    for name in ["f", "l"] {
        let mut ours = Vec::new();
        nar::dump_path(&d.path().join(name), &mut ours).unwrap();
        assert_eq!(ours, nix_bytes("nix-store", &["--dump", d.path().join(name).to_str().unwrap()]));
    }
}

const FIXTURE: &str = r#"{
  outputs = { self }: let
    sys = "x86_64-linux";
    dep = derivation { name = "dep"; system = sys; builder = "/bin/sh"; args = [ "-c" "echo dep > $out" ]; };
    multi = derivation {
      name = "multi"; system = sys; builder = "/bin/sh";
      outputs = [ "out" "dev" "doc" ];
      args = [ "-c" "echo > $out; echo > $dev; echo > $doc" ];
    };
  in {
    hydraJobs = {
      inherit dep multi;
      escapes = derivation {
        name = "escapes"; system = sys; builder = "/bin/sh";
        args = [ "-c" "printf '%s\\n' \"quote \\\" backslash \\\\ tab \t cr \r\" > $out" ];
        weird = "line1\nline2\ttab \"q\" \\ back $dollar 😀 ü";
        empty = "";
        requiredSystemFeatures = [ "big-parallel" ];
        passAsFile = [ "weird" ];
      };
      withDeps = derivation {
        name = "with-deps"; system = sys; builder = "/bin/sh";
        src = ./src.txt;
        inherit dep;
        dev = multi.dev;
        args = [ "-c" "read x < $src; echo $x $dep $dev > $out" ];
      };
      fixed = derivation {
        name = "fixed"; system = sys; builder = "/bin/sh";
        args = [ "-c" "printf hello > $out" ];
        outputHashMode = "flat"; outputHashAlgo = "sha256";
        outputHash = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
      };
      fixedRec = derivation {
        name = "fixed-rec"; system = sys; builder = "/bin/sh";
        args = [ "-c" "echo > $out" ];
        outputHashMode = "recursive";
        outputHash = "sha256-Zk8tCQRc3CB4lYsXqhnnZHB8n1/iI3nEKoNv+fXWNXM=";
      };
    };
  };
}
"#;

#[test]
fn every_drv_nix_writes_parses_and_reserialises_identically() {
    let flake = Flake::new(FIXTURE, &[("src.txt", "source text\n")]);
    let names = ["dep", "multi", "escapes", "withDeps", "fixed", "fixedRec"];
    let mut seen = std::collections::BTreeSet::new();
    let mut queue: Vec<String> = names.iter().map(|n| flake.eval_raw(&format!("hydraJobs.{n}.drvPath"))).collect();
    while let Some(path) = queue.pop() {
        if !seen.insert(path.clone()) {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let drv = Derivation::parse(&bytes).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(drv.to_aterm().as_bytes(), &bytes[..], "{path} does not round-trip");
        // Our store path computation agrees with Nix: a .drv is a text file
        // whose references are its input sources and input derivations.
        let refs: Vec<StorePath> =
            drv.input_srcs.iter().cloned().chain(drv.input_drvs.iter().map(|(p, _)| p.clone())).collect();
        let sp = StorePath::parse(&path).unwrap();
        assert_eq!(StorePath::make_text(sp.name(), &bytes, &refs).unwrap(), sp, "path of {path}");
        queue.extend(drv.input_drvs.iter().map(|(p, _)| p.to_string()));
    }
    assert!(seen.len() >= names.len());
    let escapes = Derivation::parse(&std::fs::read(flake.eval_raw("hydraJobs.escapes.drvPath")).unwrap()).unwrap();
    assert_eq!(escapes.required_features(), vec!["big-parallel"]);
    let multi = Derivation::parse(&std::fs::read(flake.eval_raw("hydraJobs.multi.drvPath")).unwrap()).unwrap();
    let outs: Vec<_> = multi.output_paths().map(|(n, p)| (n.to_string(), p.unwrap().to_string())).collect();
    assert_eq!(outs.len(), 3);
    for (n, p) in outs {
        assert_eq!(flake.eval_raw(&format!("hydraJobs.multi.{n}.outPath")), p);
    }
    let fixed = Derivation::parse(&std::fs::read(flake.eval_raw("hydraJobs.fixed.drvPath")).unwrap()).unwrap();
    assert!(fixed.is_fixed_output());
}

/// Builds a small closure and returns (top path, all paths).
fn build_closure() -> (String, Vec<String>) {
    let d = tempfile::tempdir().unwrap();
    let expr = format!(
        "let a = {}; b = {}; in derivation {{ name = \"top\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; a = a; b = b; args = [\"-c\" \"echo $a $b > $out\"]; }}",
        drv_expr("leaf-a", &format!("echo a-{} > $out", unique("x"))),
        drv_expr("leaf-b", "echo b > $out")
    );
    std::fs::write(d.path().join("e.nix"), expr).unwrap();
    let drv = nix("nix-instantiate", &[d.path().join("e.nix").to_str().unwrap()]);
    let out = nix("nix-store", &["-r", drv.trim()]);
    let top = out.trim().to_string();
    let closure = nix("nix-store", &["-qR", &top]).lines().map(str::to_string).collect();
    (top, closure)
}

#[test]
fn narinfo_written_by_nix_copy_roundtrips() {
    let (top, closure) = build_closure();
    assert_eq!(closure.len(), 3);
    for compression in ["xz", "zstd", "none"] {
        let d = tempfile::tempdir().unwrap();
        let d = d.path().to_str().unwrap();
        nix("nix", &["copy", "--to", &format!("file://{d}/c?compression={compression}"), &top]);
        let mut n = 0;
        for e in std::fs::read_dir(format!("{d}/c")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "narinfo") {
                let text = std::fs::read_to_string(&p).unwrap();
                let info = NarInfo::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert_eq!(info.render(), text, "{} does not round-trip", p.display());
                assert_eq!(info.compression, compression);
                assert!(info.deriver.is_some());
                // NarHash is the sha256 of our NAR of the path.
                let mut nar_bytes = Vec::new();
                nar::dump_path(Path::new(&info.store_path.to_string()), &mut nar_bytes).unwrap();
                assert_eq!(info.nar_hash, Hash::sha256(&nar_bytes));
                assert_eq!(info.nar_size, nar_bytes.len() as u64);
                // FileHash is the sha256 of the file the URL names.
                let file = std::fs::read(format!("{d}/c/{}", info.url)).unwrap();
                assert_eq!(info.file_hash.clone().unwrap(), Hash::sha256(&file));
                n += 1;
            }
        }
        assert_eq!(n, 3, "one narinfo per path in the closure");
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_str().unwrap();
    nix("nix", &["copy", "--to", &format!("file://{dir}"), &top]);
    let top_sp = StorePath::parse(&top).unwrap();
    let info =
        NarInfo::parse(&std::fs::read_to_string(format!("{dir}/{}.narinfo", top_sp.hash_part())).unwrap()).unwrap();
    assert_eq!(info.references.len(), 2, "top refers to both leaves");
}

fn keypair_from_nix(dir: &Path, name: &str) -> (String, String) {
    let sk = dir.join(format!("{name}.sec"));
    let pk = dir.join(format!("{name}.pub"));
    nix("nix-store", &["--generate-binary-cache-key", name, sk.to_str().unwrap(), pk.to_str().unwrap()]);
    (std::fs::read_to_string(sk).unwrap(), std::fs::read_to_string(pk).unwrap())
}

#[test]
fn keys_from_nix_load_and_nix_signatures_verify() {
    let d = tempfile::tempdir().unwrap();
    let (sk_text, pk_text) = keypair_from_nix(d.path(), "nixkey-1");
    let sk = SigningKey::parse(&sk_text).unwrap();
    let pk = PublicKey::parse(&pk_text).unwrap();
    assert_eq!(sk.public(), pk);
    let (top, _) = build_closure();
    let cache = d.path().join("c");
    nix(
        "nix",
        &[
            "copy",
            "--to",
            &format!("file://{}?secret-key={}", cache.display(), d.path().join("nixkey-1.sec").display()),
            &top,
        ],
    );
    let sp = StorePath::parse(&top).unwrap();
    let info =
        NarInfo::parse(&std::fs::read_to_string(cache.join(format!("{}.narinfo", sp.hash_part()))).unwrap()).unwrap();
    assert!(info.verify(std::slice::from_ref(&pk)), "Nix's signature verifies with our code");
    // ed25519 is deterministic: signing the same fingerprint gives Nix's signature.
    let mut ours = info.clone();
    ours.sigs.clear();
    ours.sign(&sk);
    assert_eq!(ours.sigs, info.sigs);
    let other = SigningKey::generate("nixkey-1").unwrap();
    assert!(!info.verify(&[other.public()]));
}

/// Signs every narinfo in a file:// cache with `key`, replacing other signatures.
fn resign_cache(cache: &Path, key: &SigningKey) {
    for e in std::fs::read_dir(cache).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "narinfo") {
            let mut info = NarInfo::parse(&std::fs::read_to_string(&p).unwrap()).unwrap();
            info.sigs.clear();
            info.sign(key);
            std::fs::write(&p, info.render()).unwrap();
        }
    }
}

#[test]
fn narinfo_signed_by_kiln_is_trusted_by_nix_and_wrong_key_is_refused() {
    let d = tempfile::tempdir().unwrap();
    // The key comes from `kiln cache keygen`, the way users make one.
    let sec = d.path().join("kiln.sec");
    let public = d.path().join("kiln.pub");
    let out = kiln_cmd()
        .args(["cache", "keygen", "kiln-test-1", "--secret"])
        .arg(&sec)
        .arg("--public")
        .arg(&public)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = SigningKey::load(&sec).unwrap();
    let pk = std::fs::read_to_string(&public).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pk);

    let (top, closure) = build_closure();
    let cache = d.path().join("cache");
    nix("nix", &["copy", "--to", &format!("file://{}", cache.display()), &top]);
    resign_cache(&cache, &key);
    let from = format!("file://{}", cache.display());

    // Nix checks our signatures as a substituter would.
    let client = d.path().join("client");
    let to = format!("local?root={}", client.display());
    nix("nix", &["copy", "--from", &from, "--to", &to, "--option", "trusted-public-keys", pk.trim(), &top]);
    for p in &closure {
        assert!(client.join(p.trim_start_matches('/')).exists(), "{p} substituted");
    }
    let verify = nix_cmd("nix")
        .args(["store", "verify", "--store", &from, "--trusted-public-keys", pk.trim(), "--sigs-needed", "1", &top])
        .output()
        .unwrap();
    assert!(verify.status.success(), "nix store verify: {}", String::from_utf8_lossy(&verify.stderr));

    // With another key trusted, Nix refuses.
    let (_, other_pk) = keypair_from_nix(d.path(), "kiln-test-1-other");
    let client2 = d.path().join("client2");
    let out = nix_cmd("nix")
        .args(["copy", "--from", &from, "--to", &format!("local?root={}", client2.display())])
        .args(["--option", "trusted-public-keys", other_pk.trim(), &top])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lacks a valid signature"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
