//! The log of an attempt that is running: appended to a file under
//! `logs/live/` as the builder's stderr arrives, never held in memory, and
//! followed by viewers from there. A writer task per attempt owns the
//! file: it writes what comes through a bounded channel, tells followers
//! how far the file is written, and when the attempt ends compresses the
//! file into the stored log (or an earlier attempt's) and removes it.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::Logs;

/// What a connection forwards a build's stderr into. Bounded: a builder
/// that writes faster than the disk takes it is slowed down (its pipe
/// fills), never buffered here.
pub type Sink = mpsc::Sender<Bytes>;

/// Chunks in flight from the connection to the file (each at most 64 KiB).
const IN_FLIGHT: usize = 8;
/// The most written to the file at once.
const BATCH: usize = 256 << 10;
/// The most a follower reads at once.
const CHUNK: u64 = 64 << 10;

/// How long the end of an attempt waits for the rest of its connection's
/// stderr, which ends when the process or its SSH channel does. Only an
/// attempt whose connection broke waits at all (a clean end drains stderr
/// first); past this the log is kept as it is, with a line saying so.
pub const EOF_WAIT: Duration = if cfg!(test) { Duration::from_millis(300) } else { Duration::from_secs(10) };

/// How far a live log is written, and whether it is complete.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub written: u64,
    pub done: bool,
}

/// Where an attempt's log is kept when it ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    /// The step's log: the attempt ended the step (built, failed).
    Final,
    /// One of the step's earlier attempts: it is tried again.
    Attempt,
}

pub(super) type Registry = Arc<Mutex<HashMap<String, Arc<Entry>>>>;

#[derive(Debug)]
pub(super) struct Entry {
    file: PathBuf,
    progress: watch::Sender<Progress>,
}

/// The writing end of a live log, held by the attempt. Dropped without
/// [`LiveLog::finish`] (a cancelled attempt), the log is still completed
/// and kept, as an earlier attempt's.
#[derive(Debug)]
pub struct LiveLog {
    tx: Option<Sink>,
    end: Option<oneshot::Sender<Kept>>,
    writer: Option<tokio::task::JoinHandle<std::io::Result<PathBuf>>>,
}

impl LiveLog {
    /// A sender for the connection to forward stderr into.
    pub fn sink(&self) -> Sink {
        self.tx.clone().expect("an unfinished log")
    }

    /// Adds Kiln's own words (a note, an error) after what came so far.
    pub async fn append(&self, text: &str) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Bytes::copy_from_slice(text.as_bytes())).await;
        }
    }

    /// Ends the log: once every sink is gone (the connection detached, or
    /// its stderr ended), or [`EOF_WAIT`] after this call, the file is
    /// compressed to where `kept` says. Returns that path.
    pub async fn finish(mut self, kept: Kept) -> std::io::Result<PathBuf> {
        if let Some(end) = self.end.take() {
            let _ = end.send(kept);
        }
        self.tx = None;
        let writer = self.writer.take().expect("finished once");
        writer.await.map_err(std::io::Error::other)?
    }
}

impl Logs {
    /// Try `try_no` of a derivation starts building: its log goes to a
    /// file of its own, truncated after `limit` bytes.
    pub fn start(&self, drv: &str, try_no: u32, limit: u64) -> std::io::Result<LiveLog> {
        let p = super::drv_path(drv).ok_or_else(|| std::io::Error::other(format!("{drv:?} is not a derivation")))?;
        self.forget_attempts_from(drv, try_no);
        let dir = self.root.join("live");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{}.{try_no}", p.base_name()));
        let file = std::fs::File::create(&path)?;
        let key = p.to_string();
        let entry = Arc::new(Entry { file: path, progress: watch::Sender::new(Progress::default()) });
        // A newer attempt replaces an older one still being compressed.
        self.live.lock().expect("live logs").insert(key.clone(), entry.clone());
        let (tx, rx) = mpsc::channel(IN_FLIGHT);
        let (end_tx, end_rx) = oneshot::channel();
        let w = Writer { logs: self.clone(), drv: key, try_no, limit, entry, file: Some(file), written: 0, dropped: 0 };
        let writer = tokio::spawn(w.run(rx, end_rx));
        Ok(LiveLog { tx: Some(tx), end: Some(end_tx), writer: Some(writer) })
    }

    /// The log of a step building in this process, to be read from its
    /// start and followed to its end; `None` if it is not building here.
    pub fn follow(&self, drv: &str) -> Option<Follower> {
        let key = super::drv_path(drv)?.to_string();
        // Opened under the lock: the file is removed only once its entry is gone.
        let live = self.live.lock().expect("live logs");
        let e = live.get(&key)?;
        let file = std::fs::File::open(&e.file).ok()?;
        Some(Follower { file: Arc::new(file), pos: 0, progress: e.progress.subscribe() })
    }

    /// Live logs left by a process that ended mid-build (a crash, a
    /// kill): each is kept as the attempt it was. Run by the queue runner
    /// when it starts, which is when those attempts are known to be over.
    /// Returns how many were kept.
    pub fn salvage(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(self.root.join("live")) else { return 0 };
        let ours: Vec<PathBuf> = self.live.lock().expect("live logs").values().map(|e| e.file.clone()).collect();
        let mut n = 0;
        for e in entries.flatten() {
            let file = e.path();
            if ours.contains(&file) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((base, try_no)) = name.rsplit_once('.').and_then(|(b, t)| Some((b, t.parse::<u32>().ok()?)))
            else {
                continue;
            };
            let Some(dest) = self.attempt_path(base, try_no) else { continue };
            let kept = std::fs::File::open(&file).and_then(|mut f| super::store(&mut f, &dest));
            match kept {
                Ok(()) => {
                    let _ = std::fs::remove_file(&file);
                    n += 1;
                }
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "cannot keep a log left by an earlier run")
                }
            }
        }
        n
    }
}

/// The task that owns a live log's file.
struct Writer {
    logs: Logs,
    drv: String,
    try_no: u32,
    limit: u64,
    entry: Arc<Entry>,
    file: Option<std::fs::File>,
    written: u64,
    dropped: u64,
}

impl Writer {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Bytes>,
        mut end: oneshot::Receiver<Kept>,
    ) -> std::io::Result<PathBuf> {
        let mut kept = None;
        let mut deadline: Option<Instant> = None;
        let mut cut = false;
        let mut batch = Vec::new();
        let mut failed = None;
        loop {
            let chunk = tokio::select! {
                biased;
                c = rx.recv() => match c {
                    Some(c) => c,
                    // Every sink is gone: nothing more can come.
                    None => break,
                },
                k = &mut end, if kept.is_none() => {
                    // A dropped handle (a cancelled attempt) keeps it as an attempt.
                    kept = Some(k.unwrap_or(Kept::Attempt));
                    deadline = Some(Instant::now() + EOF_WAIT);
                    continue;
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                    cut = true;
                    break;
                }
            };
            self.take(&mut batch, &chunk);
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(c) => self.take(&mut batch, &c),
                    Err(_) => break,
                }
            }
            // A disk error ends the writing, not the reading: the connection
            // must not block on a full channel.
            let bytes = std::mem::take(&mut batch);
            if failed.is_none()
                && let Err(e) = self.write(bytes).await
            {
                failed = Some(e);
            }
        }
        let kept = kept.or_else(|| end.try_recv().ok()).unwrap_or(Kept::Attempt);
        let mut notes = String::new();
        if self.dropped > 0 {
            notes.push_str(&format!(
                "kiln: the log was cut at {} bytes (queue.max_log_mib); {} more were dropped\n",
                self.limit, self.dropped
            ));
        }
        if cut {
            notes.push_str(&format!(
                "kiln: the rest of this log did not arrive within {EOF_WAIT:?} of the attempt's end\n"
            ));
        }
        if failed.is_none()
            && !notes.is_empty()
            && let Err(e) = self.write(notes.into_bytes()).await
        {
            failed = Some(e);
        }
        self.entry.progress.send_modify(|p| p.done = true);
        let dest = match kept {
            Kept::Final => self.logs.path_for(&self.drv),
            Kept::Attempt => self.logs.attempt_path(&self.drv, self.try_no),
        }
        .expect("a checked derivation path");
        let (logs, drv, entry) = (self.logs.clone(), self.drv.clone(), self.entry.clone());
        let d = dest.clone();
        let stored = tokio::task::spawn_blocking(move || {
            let stored = match failed {
                Some(e) => Err(e),
                None => std::fs::File::open(&entry.file).and_then(|mut f| super::store(&mut f, &d)),
            };
            // Gone from the registry first, then from the disk: a viewer
            // either finds the entry and opens the file, or finds the
            // stored log in place.
            {
                let mut live = logs.live.lock().expect("live logs");
                if live.get(&drv).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                    live.remove(&drv);
                }
            }
            // Kept for the next start's salvage if it could not be stored.
            if stored.is_ok() {
                let _ = std::fs::remove_file(&entry.file);
            }
            stored
        })
        .await
        .map_err(std::io::Error::other)?;
        stored.map(|()| dest)
    }

    /// Adds what fits under the limit to `batch`, counts the rest.
    fn take(&mut self, batch: &mut Vec<u8>, chunk: &[u8]) {
        let room = self.limit.saturating_sub(self.written + batch.len() as u64);
        let n = chunk.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        batch.extend_from_slice(&chunk[..n]);
        self.dropped += (chunk.len() - n) as u64;
    }

    async fn write(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let mut file = self.file.take().expect("the writer's file");
        let n = bytes.len() as u64;
        let (file, r) = tokio::task::spawn_blocking(move || {
            let r = std::io::Write::write_all(&mut file, &bytes);
            (file, r)
        })
        .await
        .map_err(std::io::Error::other)?;
        self.file = Some(file);
        r?;
        self.written += n;
        let written = self.written;
        self.entry.progress.send_modify(|p| p.written = written);
        Ok(())
    }
}

/// A reader of a live log: every byte once, from the first, until the
/// attempt ends. The file stays readable after it is removed (it is open).
pub struct Follower {
    file: Arc<std::fs::File>,
    pos: u64,
    pub(super) progress: watch::Receiver<Progress>,
}

impl Follower {
    /// The next piece of the log; `None` once the log is complete and read.
    pub async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        loop {
            let p = *self.progress.borrow_and_update();
            if self.pos < p.written {
                let n = (p.written - self.pos).min(CHUNK) as usize;
                let (file, pos) = (self.file.clone(), self.pos);
                let read = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; n];
                    file.read_exact_at(&mut buf, pos).map(|()| buf)
                })
                .await
                .map_err(std::io::Error::other);
                return Some(match read {
                    Ok(Ok(buf)) => {
                        self.pos += n as u64;
                        Ok(Bytes::from(buf))
                    }
                    Ok(Err(e)) | Err(e) => Err(e),
                });
            }
            if p.done {
                return None;
            }
            if self.progress.changed().await.is_err() && self.pos >= self.progress.borrow().written {
                // The writer is gone without a word (it panicked): what it
                // wrote is all there is.
                return None;
            }
        }
    }

    /// What is written so far, as a blocking reader (for a snapshot).
    pub fn so_far(&self) -> impl Read + Send + 'static {
        SoFar { file: self.file.clone(), pos: self.pos, end: self.progress.borrow().written }
    }

    /// Whether the attempt has ended (the log may still be being stored).
    pub fn is_done(&self) -> bool {
        self.progress.borrow().done
    }
}

struct SoFar {
    file: Arc<std::fs::File>,
    pos: u64,
    end: u64,
}

impl Read for SoFar {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// The live files there are, for tests.
#[cfg(test)]
pub(super) fn live_files(logs: &Logs) -> Vec<PathBuf> {
    std::fs::read_dir(logs.root.join("live")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default()
}
