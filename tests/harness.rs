//! Checks the test harness itself against real Nix: the private sshd and
//! two chroot-store builders work with Nix's own distributed builds, so
//! later tests of Kiln's builders stand on known-good ground.

mod support;

use support::*;

#[test]
fn nix_builds_remotely_on_each_harness_builder() {
    let sshd = Sshd::start();
    let b1 = Builder::new(&sshd, "builder1", 2);
    let b2 = Builder::new(&sshd, "builder2", 2);
    for (i, b) in [&b1, &b2].into_iter().enumerate() {
        let d = tempfile::tempdir().unwrap();
        let marker = unique("remote");
        std::fs::write(d.path().join("e.nix"), drv_expr(&format!("remote-{i}"), &format!("echo {marker} > $out")))
            .unwrap();
        let drv = nix("nix-instantiate", &[d.path().join("e.nix").to_str().unwrap()]);
        let out = nix_cmd("nix-store")
            .args(["-r", drv.trim(), "-j0", "--builders", &b.machines_line])
            .env("NIX_SSHOPTS", sshd.nix_sshopts())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "remote build failed: {}\nsshd log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            sshd.log()
        );
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        // The output was built in the builder's own store and copied back.
        assert!(b.has(&path), "{path} is in the builder's store");
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), marker);
        let other = if i == 0 { &b2 } else { &b1 };
        assert!(!other.has(&path), "the other builder never saw it");
    }
}

#[test]
fn the_serve_protocol_handshake_answers_over_ssh() {
    // The exact command Kiln's builder connection runs, through real ssh.
    let sshd = Sshd::start();
    let b = Builder::new(&sshd, "b", 1);
    use std::io::{Read, Write};
    let mut child = std::process::Command::new("ssh")
        .args(sshd.nix_sshopts().split_whitespace())
        .arg("root@127.0.0.1")
        .arg(format!("{} --serve --write --store 'local?root={}'", b.wrapper.display(), b.root.display()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&0x390c9debu64.to_le_bytes()).unwrap();
    stdin.write_all(&0x206u64.to_le_bytes()).unwrap();
    stdin.flush().unwrap();
    let mut buf = [0u8; 16];
    child.stdout.as_mut().unwrap().read_exact(&mut buf).unwrap();
    assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), 0x5452eecb);
    let version = u64::from_le_bytes(buf[8..].try_into().unwrap());
    assert_eq!(version >> 8, 2, "serve protocol major version 2");
    drop(stdin);
    child.wait().unwrap();
}

#[test]
fn fixture_flakes_evaluate_with_real_nix() {
    let flake = Flake::new(
        &format!("{{ outputs = {{ self }}: {{ hydraJobs.hello = {}; }}; }}", drv_expr("hello", "echo hello > $out")),
        &[],
    );
    let drv = flake.eval_raw("hydraJobs.hello.drvPath");
    assert!(drv.starts_with("/nix/store/") && drv.ends_with("-hello.drv"), "{drv}");
    // A new commit is seen by the next evaluation.
    flake.write(
        "flake.nix",
        &format!("{{ outputs = {{ self }}: {{ hydraJobs.hello = {}; }}; }}", drv_expr("hello", "echo changed > $out")),
    );
    flake.commit("change");
    assert_ne!(flake.eval_raw("hydraJobs.hello.drvPath"), drv);
}
