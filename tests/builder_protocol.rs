//! Kiln's serve-protocol client against real Nix 2.8: a local
//! `nix-store --serve` and a chroot-store builder behind the private sshd.

mod support;

use std::time::Duration;

use kiln::builder::connection::{Connection, Sessions};
use kiln::builder::machines::{self, Machine};
use kiln::builder::serve::{AddInfo, BuildOptions, BuildStatus};
use kiln::nix::{Derivation, Hash};
use support::*;

const OPTS: BuildOptions = BuildOptions { max_silent_s: 60, timeout_s: 60, max_log_bytes: 0 };

fn instantiate(expr: &str) -> (String, Derivation) {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("e.nix"), expr).unwrap();
    let drv = nix("nix-instantiate", &[d.path().join("e.nix").to_str().unwrap()]).trim().to_string();
    let parsed = Derivation::parse(&std::fs::read(&drv).unwrap()).unwrap();
    (drv, parsed)
}

/// Sends `path` (from the local store) with its path info.
async fn send(conn: &mut Connection, path: &str) {
    let info = &kiln::cache::local_path_info(&[path.to_string()]).await.unwrap()[0];
    let mut nar = Vec::new();
    kiln::nix::nar::dump_path(std::path::Path::new(path), &mut nar).unwrap();
    let add = AddInfo {
        path: path.to_string(),
        deriver: info.deriver.as_ref().map(|d| d.to_string()),
        nar_hash: Hash::sha256(&nar).to_string(),
        references: info.references.iter().map(|r| r.to_string()).collect(),
        nar_size: nar.len() as u64,
        ca: info.ca.clone(),
    };
    conn.serve.add_to_store_nar(&add, &mut &nar[..]).await.unwrap();
}

async fn exercise(machine: &Machine, sessions: &Sessions) {
    let mut conn = sessions.connect(machine).await.unwrap();
    assert_eq!(conn.serve.remote_version >> 8, 2);
    let tag = unique("proto");
    // An input built here and a source, both to be sent.
    let (dep_drv, _) = instantiate(&drv_expr(&format!("dep-{tag}"), &format!("echo dep {tag} > $out")));
    let dep_out = nix("nix-store", &["-r", &dep_drv]).trim().to_string();
    let src_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(src_file.path(), format!("source {tag}\n")).unwrap();
    let src = nix("nix-store", &["--add", src_file.path().to_str().unwrap()]).trim().to_string();
    let have = conn.serve.query_valid_paths(&[dep_out.clone(), src.clone()], true).await.unwrap();
    assert!(have.is_empty(), "{have:?}");
    send(&mut conn, &dep_out).await;
    send(&mut conn, &src).await;
    let mut have = conn.serve.query_valid_paths(&[dep_out.clone(), src.clone()], true).await.unwrap();
    have.sort();
    let mut want = vec![dep_out.clone(), src.clone()];
    want.sort();
    assert_eq!(have, want);

    // A derivation using both, built there with its log streamed back.
    let dep_nix = tempfile::Builder::new().suffix(".nix").tempfile().unwrap();
    std::fs::write(dep_nix.path(), drv_expr(&format!("dep-{tag}"), &format!("echo dep {tag} > $out"))).unwrap();
    let expr = format!(
        r#"let dep = import {}; in derivation {{ name = "top-{tag}"; system = "x86_64-linux"; builder = "/bin/sh"; inherit dep; src = builtins.storePath "{src}"; args = [ "-c" "echo building-{tag}; read a < $dep; read b < $src; echo $a $b > $out; echo last-line-{tag}" ]; }}"#,
        dep_nix.path().display()
    );
    let (drv_path, drv) = instantiate(&expr);
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    conn.log_to(tx);
    let r = conn
        .serve
        .build_derivation(&drv_path, &drv, std::slice::from_ref(&dep_out), OPTS, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(r.status, BuildStatus::Built, "{}", r.error);
    // A round trip after the result, then the log ends with its last line
    // in it (no waiting for stderr).
    conn.serve.query_valid_paths(&[], false).await.unwrap();
    conn.end_log().await;
    let mut log = Vec::new();
    while let Ok(chunk) = rx.try_recv() {
        log.extend(chunk);
    }
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains(&format!("building-{tag}")) && log.contains(&format!("last-line-{tag}")), "log: {log}");

    // The output's path info and NAR come back; the NAR matches the info.
    let out = drv.outputs[0].path.clone();
    let infos = conn.serve.query_path_infos(std::slice::from_ref(&out)).await.unwrap();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].deriver.as_deref(), Some(drv_path.as_str()));
    assert!(infos[0].references.is_empty());
    let mut nar = Vec::new();
    let n = conn.serve.dump_store_path(&out, &mut nar, &mut |_| {}).await.unwrap();
    assert_eq!(n, infos[0].nar_size);
    assert_eq!(Hash::sha256(&nar), Hash::parse(&infos[0].nar_hash).unwrap());
    let unpacked = tempfile::tempdir().unwrap();
    kiln::nix::nar::restore(&mut &nar[..], &unpacked.path().join("out")).await.unwrap();
    assert_eq!(std::fs::read_to_string(unpacked.path().join("out")).unwrap(), format!("dep {tag} source {tag}\n"));

    // Failures and timeouts come back as statuses on the same connection.
    let (fail_path, fail) = instantiate(&drv_expr(&format!("fail-{tag}"), "echo about to fail; exit 3"));
    let r = conn.serve.build_derivation(&fail_path, &fail, &[], OPTS, Duration::from_secs(60)).await.unwrap();
    assert_eq!(r.status, BuildStatus::PermanentFailure);
    assert!(r.error.contains("exit code 3") || r.error.contains("failed"), "{}", r.error);
    let (slow_path, slow) = instantiate(&drv_expr(&format!("slow-{tag}"), "while true; do :; done"));
    let r = conn
        .serve
        .build_derivation(&slow_path, &slow, &[], BuildOptions { timeout_s: 1, ..OPTS }, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(r.status, BuildStatus::TimedOut, "{}", r.error);
    // Still usable afterwards.
    assert_eq!(conn.serve.query_valid_paths(std::slice::from_ref(&out), false).await.unwrap(), vec![out]);
}

#[tokio::test]
async fn serve_protocol_against_a_local_nix_store() {
    let state = tempfile::tempdir().unwrap();
    let sessions = Sessions::new(state.path(), Duration::from_secs(10), Duration::from_secs(30));
    let root = state.path().join("local-builder");
    std::fs::create_dir_all(&root).unwrap();
    // A chroot store keeps the test's builds apart from the real store.
    let wrapper = state.path().join("nix-store-wrapper");
    std::fs::write(&wrapper, "#!/bin/sh\nexport NIX_CONFIG=\"sandbox-paths = /bin/sh=/bin/busybox\nsubstituters =\"\nexec nix-store \"$@\"\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let line = format!(
        "localhost?remote-store=local%3Froot%3D{}&remote-program={} x86_64-linux - 2",
        root.display(),
        wrapper.display()
    );
    let (m, errors) = machines::parse(&line);
    assert!(errors.is_empty(), "{errors:?}");
    exercise(&m[0], &sessions).await;
}

#[tokio::test]
async fn serve_protocol_over_ssh_to_a_chroot_builder() {
    let sshd = Sshd::start();
    let b = Builder::new(&sshd, "b1", 2);
    let state = tempfile::tempdir().unwrap();
    let sessions = Sessions::new(state.path(), Duration::from_secs(10), Duration::from_secs(30));
    let (m, errors) = machines::parse(&b.machines_line_with_port);
    assert!(errors.is_empty(), "{errors:?}");
    exercise(&m[0], &sessions).await;

    // A wrong host key is refused.
    let other = Sshd::start();
    let wrong = b.machines_line_with_port.replace(&sshd.host_key_b64, &other.host_key_b64);
    let (m, _) = machines::parse(&wrong);
    let err = match Sessions::new(state.path(), Duration::from_secs(10), Duration::from_secs(30)).connect(&m[0]).await {
        Ok(_) => panic!("connected despite a wrong host key"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("127.0.0.1"), "{err}");
}
