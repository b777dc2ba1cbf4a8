//! Machines files as people write them, against real builders (chroot
//! stores behind private sshds) and the real `kiln`: an `ssh-ng://` line
//! rendered by the NixOS module from a `nix.buildMachines` entry builds a
//! flake; so does an `ssh://` line that gives its key, pinned host key,
//! compression and Nix's other store settings in the URI; a wrong pinned
//! host key is refused with a message that says so; and `/machines` lists
//! every line Kiln cannot use with its reason, also in a web-only process.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use support::*;

/// Two jobs, one built from the other's output, unique to `tag`.
fn flake(tag: &str) -> Flake {
    Flake::new(
        &format!(
            r#"{{ outputs = _: rec {{ hydraJobs = {{
                 base = derivation {{ name = "base-{tag}"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo base-{tag} > $out" ]; }};
                 top = derivation {{ name = "top-{tag}"; system = "x86_64-linux"; builder = "/bin/sh"; dep = hydraJobs.base; args = [ "-c" "read x < $dep; echo $x top > $out" ]; }};
               }}; }}; }}"#
        ),
        &[],
    )
}

fn kiln_build(dir: &Path, machines: &Path) -> (Option<i32>, BTreeMap<String, serde_json::Value>, String) {
    std::fs::write(dir.join("kiln-build.toml"), "state_dir = \"state\"\n").unwrap();
    let out = kiln_cmd()
        .args(["build", "--json", "--config", "kiln-build.toml", "--machines"])
        .arg(machines)
        .arg(".#hydraJobs")
        .current_dir(dir)
        .output()
        .unwrap();
    (out.status.code(), build_results(&out), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `kiln machines check` on `file`: (exit code, stdout, stderr).
fn machines_check(file: &Path) -> (Option<i32>, String, String) {
    let out = kiln_cmd()
        .args(["machines", "check", "--machines"])
        .arg(file)
        .current_dir(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// Both jobs built on `b`, by the machine named `uri`.
fn assert_built_on(tag: &str, machines: &Path, b: &Builder, uri: &str) {
    let flake = flake(tag);
    let (code, jobs, stderr) = kiln_build(flake.path(), machines);
    assert_eq!(code, Some(0), "{stderr}");
    for job in ["base", "top"] {
        let j = jobs.get(job).unwrap_or_else(|| panic!("{job} missing: {stderr}"));
        assert_eq!(j["buildstatus"], 0, "{job}: {j}\n{stderr}");
        assert_eq!(j["machine"], uri, "{job}");
        let out = j["outputs"]["out"].as_str().unwrap();
        assert!(b.has(out), "{out} was not built on the builder");
    }
    let top = jobs["top"]["outputs"]["out"].as_str().unwrap();
    assert!(
        std::fs::read_to_string(b.root.join(top.trim_start_matches('/'))).unwrap().contains(&format!("base-{tag} top"))
    );
}

/// A directory holding the builder's `nix-store` wrapper under that name,
/// for `ssh-ng://` lines that name a `nix-daemon` beside it.
fn nix_bin_beside(sshd: &Sshd, b: &Builder) -> PathBuf {
    let bin = sshd.dir.path().join("nix-bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(&b.wrapper, bin.join("nix-store")).unwrap();
    bin
}

/// The NixOS module's renderer (`nixos-module/machines.nix`) applied to
/// `nix.buildMachines` entries (a Nix list expression).
fn nixos_machines_file(entries: &str) -> String {
    let module = Path::new(env!("CARGO_MANIFEST_DIR")).join("nixos-module/machines.nix");
    let json = nix(
        "nix-instantiate",
        &["--eval", "--strict", "--json", "--expr", &format!("import {} {entries}", module.display())],
    );
    serde_json::from_str(&json).unwrap()
}

#[test]
fn an_ssh_ng_machine_from_nixos_build_machines_builds() {
    let sshd = Sshd::start();
    let b = Builder::new(&sshd, "ng", 2);
    let bin = nix_bin_beside(&sshd, &b);
    let key = sshd.user_key.display().to_string();
    // A `nix.buildMachines` entry with every option NixOS gives it; the
    // store settings ride in hostName, as people write them there.
    let host = format!(
        "127.0.0.1:{}?remote-store=local%3Froot%3D{}&remote-program={}/nix-daemon",
        sshd.port,
        b.root.display(),
        bin.display()
    );
    let text = nixos_machines_file(&format!(
        r#"[ {{ hostName = "{host}"; protocol = "ssh-ng"; sshUser = "root"; sshKey = "{key}";
              system = null; systems = [ "x86_64-linux" ]; maxJobs = 2; speedFactor = 1;
              supportedFeatures = [ "big-parallel" ]; mandatoryFeatures = [ ];
              publicHostKey = "{}"; }} ]"#,
        sshd.host_key_b64
    ));
    let uri = format!("ssh-ng://root@{host}");
    assert_eq!(text, format!("{uri} x86_64-linux {key} 2 1 big-parallel - {}\n", sshd.host_key_b64));
    let file = sshd.dir.path().join("machines");
    std::fs::write(&file, &text).unwrap();

    assert_built_on("ng", &file, &b, &uri);

    // `kiln machines check` reaches it too, and says what it runs there.
    let (code, stdout, stderr) = machines_check(&file);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains(" ok (") && stdout.contains("2.7"), "{stdout}");
    assert!(stdout.contains("nix-store beside the remote nix-daemon"), "{stdout}");
    assert!(stdout.contains(&format!("{}/nix-store --serve --write --store", bin.display())), "{stdout}");

    // A nix-daemon with no nix-store beside it: the builder's own words.
    let missing = file.with_file_name("missing");
    std::fs::write(&missing, text.replace(&format!("{}/nix-daemon", bin.display()), "/nonexistent/nix-daemon"))
        .unwrap();
    let (code, stdout, stderr) = machines_check(&missing);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("`/nonexistent/nix-store --serve --write --store"), "{stdout}");
    assert!(stdout.contains("No such file or directory"), "{stdout}");
    assert!(stdout.contains("the nix-store beside nix-daemon"), "{stdout}");

    // The defaults of an entry that sets nothing but its host, as NixOS
    // writes them, are what Nix reads.
    let text =
        nixos_machines_file(r#"[ { hostName = "mac"; protocol = "ssh-ng"; } { hostName = "b2"; protocol = null; } ]"#);
    assert_eq!(text, "ssh-ng://mac - - 1 1 - - -\nb2 - - 1 1 - - -\n");
    let (m, errors) = kiln::builder::machines::parse(&text);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(m.len(), 2);
}

#[test]
fn store_settings_in_the_uri_build_and_a_wrong_pinned_host_key_is_refused() {
    // sshd logs the negotiated compression at this level.
    let sshd = Sshd::start_with("LogLevel DEBUG1");
    let b = Builder::new(&sshd, "uri", 2);
    let settings = format!(
        "ssh-key={}&base64-ssh-public-host-key={}&compress=true&remote-store=local%3Froot%3D{}&remote-program={}\
         &max-connections=4&log-fd=4&priority=10&want-mass-query=true&trusted=1&path-info-cache-size=0\
         &system-features=kvm&store=/nix/store",
        sshd.user_key.display(),
        sshd.host_key_b64,
        b.root.display(),
        b.wrapper.display()
    );
    let uri = format!("ssh://root@127.0.0.1:{}?{settings}", sshd.port);
    let file = sshd.dir.path().join("machines");
    std::fs::write(&file, format!("{uri} x86_64-linux - 2\n")).unwrap();

    assert_built_on("uri", &file, &b, &uri);
    let log = sshd.log();
    assert!(log.contains("compression: zlib@openssh.com"), "compress=true is ssh -C:\n{log}");

    let (code, stdout, stderr) = machines_check(&file);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("no effect in Kiln: max-connections=4 log-fd=4 priority=10"), "{stdout}");

    // Another host's key pinned in the URI: strict checking refuses it.
    let other = Sshd::start();
    let wrong = file.with_file_name("wrong");
    std::fs::write(&wrong, format!("{} x86_64-linux - 2\n", uri.replace(&sshd.host_key_b64, &other.host_key_b64)))
        .unwrap();
    let (code, stdout, stderr) = machines_check(&wrong);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("Host key verification failed"), "{stdout}");
    assert!(stdout.contains("not the one the machines file pins"), "{stdout}");

    // The 8th field wins over the URI's setting, as in Nix.
    std::fs::write(
        &wrong,
        format!(
            "{} x86_64-linux - 2 1 - - {}\n",
            uri.replace(&sshd.host_key_b64, &other.host_key_b64),
            sshd.host_key_b64
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = machines_check(&wrong);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
}

#[tokio::test]
async fn unusable_lines_are_listed_on_the_machines_page() {
    let dir = tempfile::tempdir().unwrap();
    let machines = dir.path().join("machines");
    std::fs::write(
        &machines,
        "ssh-ng://root@127.0.0.1:1 x86_64-linux - 2 1 big-parallel\n\
         ssh://h?colour=red x86_64-linux\n\
         # a comment\n\
         ssh-ng://h2?remote-program=/opt/wrapper x86_64-linux ; gone://h3\n",
    )
    .unwrap();
    let config = format!("machines_file = \"{}\"\n", machines.display());
    for roles in [None, Some("web")] {
        let state = tempfile::tempdir().unwrap();
        std::fs::write(state.path().join("kiln.toml"), &config).unwrap();
        let args: Vec<&str> = roles.map(|r| vec!["--roles", r]).unwrap_or_default();
        let kiln = Kiln::start_with(state, &[], &args);
        let api = Api::new(&kiln.url, None);

        let (code, v) = api.get("/machines").await;
        assert_eq!(code, 200, "{roles:?}");
        assert_eq!(v["machines_file"], machines.display().to_string());
        let m = v["machines"].as_array().unwrap();
        assert_eq!(m.len(), 1, "{v}");
        assert_eq!(m[0]["uri"], "ssh-ng://root@127.0.0.1:1");
        assert!(m[0]["protocol"].as_str().unwrap().contains("nix-daemon"), "{v}");
        assert_eq!(m[0]["command"], "nix-store --serve --write");
        let errors = v["errors"].as_array().unwrap();
        let lines: Vec<i64> = errors.iter().map(|e| e["line"].as_i64().unwrap()).collect();
        assert_eq!(lines, [2, 4, 4], "{roles:?}: {v}");
        assert_eq!(errors[0]["entry"], "ssh://h?colour=red x86_64-linux");
        assert!(errors[0]["reason"].as_str().unwrap().contains("unknown store setting \"colour\""), "{v}");
        assert!(errors[1]["reason"].as_str().unwrap().contains("is not one"), "{v}");
        assert_eq!(errors[2]["entry"], "gone://h3");

        let html = api.client.get(format!("{}/machines", kiln.url)).send().await.unwrap().text().await.unwrap();
        assert!(html.contains("Unusable machines-file entries"), "{html}");
        assert!(html.contains("<td>2</td><td><code>ssh://h?colour=red x86_64-linux</code></td>"), "{html}");
        assert!(html.contains("unknown store setting &#34;colour&#34;"), "{html}");
        assert!(html.contains("<code>gone://h3</code>"), "{html}");
        assert!(html.contains("nix-store beside the remote nix-daemon"), "{html}");
    }
}
