//! Build logs: one zstd-compressed file per derivation under
//! `<state_dir>/logs/<first two characters of the hash>/<drv base name>.zst`,
//! written atomically when the step ends, read back as a stream so a large
//! log is never held whole in memory. While a step builds, its log grows in
//! memory here, where viewers read it and can follow it live.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::broadcast;

use crate::nix::StorePath;

#[derive(Clone, Debug)]
pub struct Logs {
    root: PathBuf,
    live: Arc<Mutex<HashMap<String, Live>>>,
}

#[derive(Debug)]
struct Live {
    buf: Vec<u8>,
    limit: usize,
    tx: broadcast::Sender<Bytes>,
}

impl Logs {
    pub fn new(state_dir: &Path) -> Logs {
        Logs { root: state_dir.join("logs"), live: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// A step starts building: its log grows here until [`Logs::finish_live`].
    pub fn start_live(&self, drv: &str, limit: usize) {
        let (tx, _) = broadcast::channel(256);
        self.live.lock().expect("live logs").insert(drv.to_string(), Live { buf: Vec::new(), limit, tx });
    }

    pub fn append_live(&self, drv: &str, chunk: &[u8]) {
        if let Some(l) = self.live.lock().expect("live logs").get_mut(drv) {
            let room = l.limit.saturating_sub(l.buf.len());
            let take = &chunk[..chunk.len().min(room)];
            if !take.is_empty() {
                l.buf.extend_from_slice(take);
                let _ = l.tx.send(Bytes::copy_from_slice(take));
            }
        }
    }

    /// The step ended: its whole log, for [`Logs::write`].
    pub fn finish_live(&self, drv: &str) -> Vec<u8> {
        self.live.lock().expect("live logs").remove(drv).map(|l| l.buf).unwrap_or_default()
    }

    /// The log so far of a step that is building, and a receiver of what
    /// follows it.
    pub fn follow(&self, drv: &str) -> Option<(Vec<u8>, broadcast::Receiver<Bytes>)> {
        let live = self.live.lock().expect("live logs");
        let key = if drv.starts_with('/') { drv.to_string() } else { format!("{}/{drv}", crate::nix::STORE_DIR) };
        live.get(&key).map(|l| (l.buf.clone(), l.tx.subscribe()))
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
