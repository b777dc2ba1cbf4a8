//! Every `.nix` file in the repository parses with the real Nix. (Building
//! them needs nixpkgs, which this machine cannot reach.)

mod support;

#[test]
fn every_nix_file_parses() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_dir() && !name.starts_with('.') && name != "target" && name != "kiln-state" {
                dirs.push(p);
            } else if name.ends_with(".nix") {
                files.push(p);
            }
        }
    }
    assert!(files.len() >= 3, "flake.nix and the NixOS module: {files:?}");
    for f in files {
        support::nix("nix-instantiate", &["--parse", f.to_str().unwrap()]);
    }
}
