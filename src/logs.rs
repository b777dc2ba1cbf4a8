//! Build logs: one zstd-compressed file per derivation under
//! `<state_dir>/logs/<first two characters of the hash>/<drv base name>.zst`,
//! written atomically, read back as a stream so a large log is never held
//! whole in memory.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::nix::StorePath;

#[derive(Clone, Debug)]
pub struct Logs {
    root: PathBuf,
}

impl Logs {
    pub fn new(state_dir: &Path) -> Logs {
        Logs { root: state_dir.join("logs") }
    }

    /// The log file of a derivation, given as a full path or a base name;
    /// `None` unless it names a valid `.drv` store path.
    pub fn path_for(&self, drv: &str) -> Option<PathBuf> {
        let p = if drv.starts_with('/') { StorePath::parse(drv).ok()? } else { StorePath::from_base_name(drv).ok()? };
        if !p.is_derivation() {
            return None;
        }
        Some(self.root.join(&p.hash_part()[..2]).join(format!("{}.zst", p.base_name())))
    }

    /// Stores a whole log (compressed), replacing an older one.
    pub fn write(&self, drv: &str, text: &[u8]) -> std::io::Result<PathBuf> {
        let path = self.path_for(drv).ok_or_else(|| std::io::Error::other(format!("{drv:?} is not a derivation")))?;
        let dir = path.parent().expect("has a parent");
        std::fs::create_dir_all(dir)?;
        let tmp = dir.join(format!(".tmp-{}", std::process::id()));
        {
            let f = std::fs::File::create(&tmp)?;
            let mut enc = zstd::stream::write::Encoder::new(f, 3)?;
            enc.write_all(text)?;
            enc.finish()?.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// A reader of the decompressed log, if there is one.
    pub fn open(&self, drv: &str) -> Option<impl std::io::Read + Send + 'static> {
        let f = std::fs::File::open(self.path_for(drv)?).ok()?;
        zstd::stream::read::Decoder::new(f).ok()
    }
}
