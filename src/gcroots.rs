//! Kiln's garbage-collector roots in the coordinator's Nix store. Every
//! Nix machine runs `nix-collect-garbage` on a timer; without roots, one run
//! between evaluation and dispatch deletes the `.drv` files of queued
//! builds. So each unfinished build's derivation is an indirect root, as
//! `nix-store --add-root --indirect` makes them: a symlink
//! `<state_dir>/gcroots/<drv name>` to the `.drv`, and a symlink to that
//! link in the store's `gcroots/auto` directory (or, where Kiln may not
//! write there, the per-user directory the Nix daemon gives each user).
//! A `.drv`'s closure holds its inputs' `.drv` files and sources, so one
//! root per build keeps everything a queued step needs locally. The
//! evaluator adds the root when it records a build; the queue removes it
//! when the build ends, and at start makes the links match the unfinished
//! builds.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tracing::warn;

#[derive(Debug, Clone)]
pub struct GcRoots {
    dir: PathBuf,
    /// Where Nix's collector looks for the indirect links; none when no
    /// such directory is writable (roots are then only links Nix ignores).
    registry: Option<PathBuf>,
}

impl GcRoots {
    /// Roots kept under `<state_dir>/gcroots`, registered with the store at
    /// `nix_state_dir` (Nix's `NIX_STATE_DIR`, `/nix/var/nix` by default).
    pub fn open(state_dir: &Path) -> GcRoots {
        let nix_state = std::env::var_os("NIX_STATE_DIR").map(PathBuf::from).unwrap_or("/nix/var/nix".into());
        Self::open_with(state_dir, &nix_state)
    }

    pub fn open_with(state_dir: &Path, nix_state_dir: &Path) -> GcRoots {
        let dir = absolute(&state_dir.join("gcroots"));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            warn!(dir = %dir.display(), error = %e, "cannot create the GC roots directory");
        }
        let user = std::env::var("USER").ok().or_else(|| std::env::var("LOGNAME").ok()).unwrap_or_default();
        let candidates = [nix_state_dir.join("gcroots/auto"), nix_state_dir.join("gcroots/per-user").join(user)];
        let registry = candidates.into_iter().find(|d| {
            let _ = std::fs::create_dir_all(d);
            writable(d)
        });
        if registry.is_none() {
            warn!(
                nix_state = %nix_state_dir.display(),
                "no writable gcroots directory: a Nix garbage collection may delete queued derivations"
            );
        }
        GcRoots { dir, registry }
    }

    /// Where the collector is told about Kiln's roots, if anywhere.
    pub fn registry(&self) -> Option<&Path> {
        self.registry.as_deref()
    }

    fn link(&self, drv: &str) -> Option<PathBuf> {
        let name = Path::new(drv).file_name()?.to_str()?;
        crate::nix::StorePath::parse(drv).ok()?;
        Some(self.dir.join(name))
    }

    fn registry_link(&self, link: &Path) -> Option<PathBuf> {
        let reg = self.registry.as_ref()?;
        let h = crate::nix::Hash::sha256(link.as_os_str().as_encoded_bytes()).to_hex();
        Some(reg.join(format!("kiln-{}", &h[..32])))
    }

    /// Roots `drv` (a store path); an existing root is left as it is.
    pub fn add(&self, drv: &str) -> std::io::Result<()> {
        let link = self.link(drv).ok_or_else(|| std::io::Error::other(format!("{drv} is not a store path")))?;
        replace_symlink(Path::new(drv), &link)?;
        if let Some(r) = self.registry_link(&link) {
            replace_symlink(&link, &r)?;
        }
        Ok(())
    }

    pub fn add_all<'a>(&self, drvs: impl IntoIterator<Item = &'a str>) {
        for d in drvs {
            if let Err(e) = self.add(d) {
                warn!(drv = d, error = %e, "cannot add a GC root");
            }
        }
    }

    /// Lets `drv` go (its build ended).
    pub fn remove(&self, drv: &str) {
        let Some(link) = self.link(drv) else { return };
        if let Some(r) = self.registry_link(&link) {
            let _ = std::fs::remove_file(r);
        }
        let _ = std::fs::remove_file(link);
    }

    /// Makes the roots exactly `keep`: links of ended builds go, missing
    /// ones are added.
    pub fn reconcile(&self, keep: &HashSet<String>) {
        let names: HashSet<String> =
            keep.iter().filter_map(|d| Path::new(d).file_name()?.to_str().map(str::to_string)).collect();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !names.contains(&name) {
                    self.remove(&format!("{}/{name}", crate::nix::STORE_DIR));
                }
            }
        }
        self.add_all(keep.iter().map(String::as_str));
    }

    /// The derivations rooted now.
    pub fn list(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten().map(|e| format!("{}/{}", crate::nix::STORE_DIR, e.file_name().to_string_lossy())).collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
    }
}

fn writable(dir: &Path) -> bool {
    let probe = dir.join(format!(".kiln-probe-{}", std::process::id()));
    let ok = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// Points `link` at `target`, atomically (a new link renamed over).
fn replace_symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    if std::fs::read_link(link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    let tmp = link.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_come_and_go() {
        let state = tempfile::tempdir().unwrap();
        let nix = tempfile::tempdir().unwrap();
        let roots = GcRoots::open_with(state.path(), nix.path());
        let reg = roots.registry().unwrap().to_path_buf();
        assert_eq!(reg, nix.path().join("gcroots/auto"));
        let a = "/nix/store/00000000000000000000000000000000-a.drv";
        let b = "/nix/store/11111111111111111111111111111111-b.drv";
        roots.add(a).unwrap();
        roots.add(b).unwrap();
        roots.add(a).unwrap();
        assert_eq!(roots.list(), vec![a.to_string(), b.to_string()]);
        let link = state.path().join("gcroots").join("00000000000000000000000000000000-a.drv");
        assert_eq!(std::fs::read_link(&link).unwrap(), Path::new(a));
        // The registry holds one link per root, pointing at Kiln's link.
        let regs: Vec<PathBuf> =
            std::fs::read_dir(&reg).unwrap().map(|e| std::fs::read_link(e.unwrap().path()).unwrap()).collect();
        assert_eq!(regs.len(), 2);
        assert!(regs.contains(&absolute(&link)));
        roots.reconcile(&[b.to_string()].into_iter().collect());
        assert_eq!(roots.list(), vec![b.to_string()]);
        assert_eq!(std::fs::read_dir(&reg).unwrap().count(), 1);
        roots.remove(b);
        assert!(roots.list().is_empty());
        assert_eq!(std::fs::read_dir(&reg).unwrap().count(), 0);
        assert!(roots.add("/etc/passwd").is_err());
    }
}
