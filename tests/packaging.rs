//! The Nix files Kiln ships (flake.nix, the NixOS module and its VM test,
//! the demo) cannot be built here, without nixpkgs, so they are held to
//! what can be checked: each parses (`nix-instantiate --parse`), is
//! formatted (nixpkgs-fmt), has no dead code (deadnix), and every module
//! option is documented in the README.

mod support;

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn nix_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root().to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_dir() {
                if !matches!(name.as_str(), "target" | ".git" | "kiln-state") {
                    todo.push(p);
                }
            } else if name.ends_with(".nix") {
                out.push(p);
            }
        }
    }
    out.sort();
    assert!(out.len() >= 5, "flake.nix, the module, its package and test, the demo: {out:?}");
    out
}

/// A tool `scripts/test` installs from crates.io into target/tools.
fn tool(name: &str) -> PathBuf {
    let p = root().join("target/tools/bin").join(name);
    assert!(p.exists(), "{name} is missing: run scripts/test, which installs it from crates.io");
    p
}

fn check(cmd: &mut std::process::Command, what: &str) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{what}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_nix_file_parses() {
    for f in nix_files() {
        check(support::nix_cmd("nix-instantiate").arg("--parse").arg(&f), &format!("{} does not parse", f.display()));
    }
}

#[test]
fn every_nix_file_is_formatted_and_has_no_dead_code() {
    let files = nix_files();
    check(
        std::process::Command::new(tool("nixpkgs-fmt")).arg("--check").args(&files),
        "not formatted (run nixpkgs-fmt)",
    );
    check(std::process::Command::new(tool("deadnix")).arg("--fail").args(&files), "dead code (deadnix)");
}

#[test]
fn every_module_option_is_documented_in_the_readme() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for (file, prefix, at_least) in [("default.nix", "services.kiln", 9), ("agent.nix", "services.kiln-agent", 5)] {
        let module = std::fs::read_to_string(root().join("nixos-module").join(file)).unwrap();
        let options: Vec<&str> = module
            .lines()
            .filter_map(|l| {
                let l = l.trim();
                l.strip_suffix(" = lib.mkOption {")
                    .or_else(|| l.split_once(" = lib.mkEnableOption ").map(|(o, _)| o).filter(|o| !o.contains(' ')))
            })
            .collect();
        assert!(options.len() >= at_least, "{file}: {options:?}");
        for o in options {
            assert!(readme.contains(&format!("`{prefix}.{o}`")), "README does not document {prefix}.{o}");
        }
    }
}
