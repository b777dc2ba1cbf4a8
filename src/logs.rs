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

/// The most of a log a page shows whole; the raw log has the rest.
pub const FULL_LIMIT: usize = 16 << 20;

/// See [`Logs::lines`].
pub fn lines_of(mut r: impl std::io::BufRead, tail: Option<usize>) -> (String, usize) {
    let mut kept: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let (mut before, mut bytes) = (0, 0);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        match tail {
            Some(n) => {
                kept.push_back(String::from_utf8_lossy(&line).into_owned());
                if kept.len() > n {
                    kept.pop_front();
                    before += 1;
                }
            }
            None => {
                bytes += line.len();
                if bytes > FULL_LIMIT {
                    break;
                }
                kept.push_back(String::from_utf8_lossy(&line).into_owned());
            }
        }
    }
    (kept.into_iter().collect(), before)
}

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

    /// Deletes a stored log file, if it is one of this store's (a path
    /// from the database cannot reach outside the logs directory).
    pub fn remove(&self, file: &str) -> std::io::Result<bool> {
        let p = Path::new(file);
        let inside = p.strip_prefix(&self.root).is_ok_and(|rel| {
            rel.components().count() == 2 && rel.components().all(|c| matches!(c, std::path::Component::Normal(_)))
        });
        if !inside {
            return Ok(false);
        }
        match std::fs::remove_file(p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
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

    /// The lines of a stored log a page shows: the last `tail` lines, or
    /// with `tail = None` the first [`FULL_LIMIT`] bytes; and how many lines
    /// come before what is returned. Reads the log as a stream, so memory
    /// stays bounded however large it is.
    pub fn lines(&self, drv: &str, tail: Option<usize>) -> Option<(String, usize)> {
        let r = std::io::BufReader::new(self.open(drv)?);
        Some(lines_of(r, tail))
    }

    /// A reader of the decompressed log, if there is one.
    pub fn open(&self, drv: &str) -> Option<impl std::io::Read + Send + 'static> {
        let f = std::fs::File::open(self.path_for(drv)?).ok()?;
        zstd::stream::read::Decoder::new(f).ok()
    }
}
