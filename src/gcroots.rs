//! Kiln's garbage-collector roots in the coordinator's Nix store. Every
//! Nix machine runs `nix-collect-garbage` on a timer; without roots, one run
//! between evaluation and dispatch deletes the `.drv` files of queued
//! builds. So each unfinished build's derivation is a root: an entry named
//! as the derivation in a directory of Kiln's own inside the store's roots,
//! `/nix/var/nix/gcroots/kiln/<id>/` (`<id>` names the state directory, so
//! several Kilns on one machine keep apart), as Hydra keeps its evaluator's
//! roots in `gcroots/hydra`; where Kiln may not write there, in the
//! per-user directory the Nix daemon gives each user. The entries are hard
//! links to one empty file, which Nix's collector counts as roots by their
//! names (a regular file in the roots named `<hash>-<name>` roots that
//! store path): a name costs no inode, where a symlink each made creating
//! 20,000 roots a matter of seconds on a filesystem that had just freed as
//! many. What is rooted is a store path whose closure holds the
//! derivation: for an evaluated build, a file the evaluator writes per group
//! of jobs that references the group's `.drv` files (one link for 64
//! builds: a link costs ext4 about 10 µs, as much as recording the build);
//! for a restarted build, its `.drv` itself. A `.drv`'s closure holds its
//! inputs' `.drv` files and sources, so that keeps everything a queued step
//! needs locally. The evaluator adds the roots when it records builds; the
//! queue removes one when the last build it holds ends, and at start makes
//! the links match the unfinished builds.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use tracing::warn;

#[derive(Debug, Clone)]
pub struct GcRoots {
    /// The links, one per rooted store path, named as it is.
    dir: PathBuf,
    /// Whether `dir` is where Nix's collector looks.
    registered: bool,
    /// The anchor file links are made to now: the next one when a
    /// filesystem's limit of links per file is reached.
    anchor: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// Anchor files start with a dot: not store path names, so not roots.
const ANCHOR: &str = ".anchor-";
/// In each Kiln's roots directory: a link to its state directory.
const STATE: &str = ".state";

/// Removes the roots directories (under `parent`) of Kilns whose state
/// directory no longer exists: nothing can be queued there any more.
fn remove_orphans_in(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    for e in entries.flatten() {
        let dir = e.path();
        if let Ok(state) = std::fs::read_link(dir.join(STATE))
            && !state.exists()
        {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

impl GcRoots {
    /// Roots for the Kiln whose state is `state_dir`, in the store at
    /// `NIX_STATE_DIR` (`/nix/var/nix` by default).
    pub fn open(state_dir: &Path) -> GcRoots {
        let nix_state = std::env::var_os("NIX_STATE_DIR").map(PathBuf::from).unwrap_or("/nix/var/nix".into());
        Self::open_with(state_dir, &nix_state)
    }

    pub fn open_with(state_dir: &Path, nix_state_dir: &Path) -> GcRoots {
        let state = absolute(state_dir);
        let id = &crate::nix::Hash::sha256(state.as_os_str().as_encoded_bytes()).to_hex()[..16];
        let user = std::env::var("USER").ok().or_else(|| std::env::var("LOGNAME").ok()).unwrap_or_default();
        let candidates = [
            nix_state_dir.join("gcroots/kiln").join(id),
            nix_state_dir.join("gcroots/per-user").join(user).join("kiln").join(id),
        ];
        for dir in candidates {
            if std::fs::create_dir_all(&dir).is_ok() && writable(&dir) {
                // Which state directory this is, so a Kiln whose state is
                // gone (a `kiln build` killed, a test) can be cleaned up.
                let mark = dir.join(STATE);
                if std::fs::read_link(&mark).ok().as_deref() != Some(state.as_path()) {
                    let _ = std::fs::remove_file(&mark);
                    let _ = std::os::unix::fs::symlink(&state, &mark);
                }
                return GcRoots { dir, registered: true, anchor: Default::default() };
            }
        }
        let dir = state.join("gcroots");
        warn!(
            nix_state = %nix_state_dir.display(),
            "no writable gcroots directory: a Nix garbage collection may delete queued derivations"
        );
        let _ = std::fs::create_dir_all(&dir);
        GcRoots { dir, registered: false, anchor: Default::default() }
    }

    /// Removes the roots of Kilns on this machine whose state directory is
    /// gone (a killed `kiln build`, say). Slow with many roots: call it off
    /// the async threads.
    pub fn remove_orphans(&self) {
        if self.registered
            && let Some(parent) = self.dir.parent()
        {
            remove_orphans_in(parent);
        }
    }

    /// Where the links are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether Nix's collector sees them.
    pub fn registered(&self) -> bool {
        self.registered
    }

    fn link(&self, drv: &str) -> Option<PathBuf> {
        crate::nix::StorePath::parse(drv).ok()?;
        Some(self.dir.join(Path::new(drv).file_name()?))
    }

    /// Roots `drv` (a store path); an existing root is left as it is.
    pub fn add(&self, drv: &str) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        let link = self.link(drv).ok_or_else(|| std::io::Error::other(format!("{drv} is not a store path")))?;
        loop {
            let n = self.anchor.load(Ordering::Relaxed);
            let anchor = self.dir.join(format!("{ANCHOR}{n}"));
            match std::fs::hard_link(&anchor, &link) {
                Ok(()) => return Ok(()),
                // Named by the derivation, so an existing entry is this root.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&anchor)?;
                }
                Err(e) if e.raw_os_error() == Some(libc::EMLINK) => {
                    let _ = self.anchor.compare_exchange(n, n + 1, Ordering::Relaxed, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
        }
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
        if let Some(link) = self.link(drv) {
            let _ = std::fs::remove_file(link);
        }
    }

    /// Makes the roots exactly `keep`: links of ended builds go, missing
    /// ones are added.
    pub fn reconcile(&self, keep: &HashSet<String>) {
        let names: HashSet<String> =
            keep.iter().filter_map(|d| Path::new(d).file_name()?.to_str().map(str::to_string)).collect();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if !name.starts_with('.') && !names.contains(&name) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        self.add_all(keep.iter().map(String::as_str));
    }

    /// The store paths rooted now.
    pub fn list(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(&self.dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .map(|n| format!("{}/{n}", crate::nix::STORE_DIR))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }
}

/// The state directory's one name (symlinks and `.` resolved when it
/// exists), so each process of one Kiln finds the same roots.
fn absolute(p: &Path) -> PathBuf {
    if let Ok(c) = std::fs::canonicalize(p) {
        return c;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_come_and_go() {
        let state = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let nix = tempfile::tempdir().unwrap();
        let roots = GcRoots::open_with(state.path(), nix.path());
        assert!(roots.registered());
        assert!(roots.dir().starts_with(nix.path().join("gcroots/kiln")));
        // Another Kiln on the same machine has its own directory.
        assert_ne!(GcRoots::open_with(other.path(), nix.path()).dir(), roots.dir());
        let a = "/nix/store/00000000000000000000000000000000-a.drv";
        let b = "/nix/store/11111111111111111111111111111111-b.drv";
        roots.add(a).unwrap();
        roots.add(b).unwrap();
        roots.add(a).unwrap();
        assert_eq!(roots.list(), vec![a.to_string(), b.to_string()]);
        // Names of one file: no inode each.
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(roots.dir().join("00000000000000000000000000000000-a.drv")).unwrap();
        assert!(meta.is_file() && meta.nlink() == 3, "the anchor and two roots");
        roots.reconcile(&[b.to_string()].into_iter().collect());
        assert_eq!(roots.list(), vec![b.to_string()]);
        roots.remove(b);
        assert!(roots.list().is_empty());
        assert!(roots.add("/etc/passwd").is_err());

        // A Kiln whose state directory is gone loses its roots at the next
        // start of any Kiln.
        let gone = tempfile::tempdir().unwrap();
        let stale = GcRoots::open_with(gone.path(), nix.path());
        stale.add(a).unwrap();
        let stale_dir = stale.dir().to_path_buf();
        drop(gone);
        GcRoots::open_with(state.path(), nix.path()).remove_orphans();
        assert!(!stale_dir.exists());
        assert!(roots.dir().exists());
    }
}
