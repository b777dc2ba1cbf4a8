//! A client of Nix's serve protocol, what `nix-store --serve --write`
//! speaks on stdin/stdout (locally, or as the remote command over SSH): the
//! protocol Nix's own `ssh://` store and Hydra's queue runner use, so a
//! builder needs nothing but Nix. Words are little-endian u64, strings a
//! length and bytes padded to 8. Nix 2.8's server speaks version 2.7 and
//! always sends `builtOutputs` after a build (fixed in 2.11), so Kiln
//! announces 2.7. Every read has a progress timeout: a connection that
//! stalls is an error, never a hang.

use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

use crate::nix::Derivation;
use crate::nix::nar::{NarError, NarParser};

pub const MAGIC_CLIENT: u64 = 0x390c9deb;
pub const MAGIC_SERVER: u64 = 0x5452eecb;
pub const VERSION: u64 = 0x207;

/// Longest string Kiln reads from a builder, except NARs (streamed).
const MAX_STRING: u64 = 16 << 20;

#[derive(Debug, Error)]
pub enum ServeError {
    #[error("builder connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("builder sent no data for {0} s")]
    Stalled(u64),
    #[error("builder closed the connection")]
    Eof,
    #[error("builder speaks another protocol (magic {0:#x})")]
    BadMagic(u64),
    #[error("builder's serve protocol {0:#x} is too old (need 2.x)")]
    Version(u64),
    #[error("builder sent a malformed reply: {0}")]
    Protocol(String),
    #[error("builder sent a bad NAR: {0}")]
    Nar(#[from] NarError),
    /// Kiln's own side of a transfer failed: where a NAR came from (the
    /// cache, an upstream) or where it went. Not the builder's fault.
    #[error("{0}")]
    Local(std::io::Error),
}

impl ServeError {
    /// The error is of Kiln's own side of a transfer, not of the builder.
    pub fn is_local(&self) -> bool {
        matches!(self, ServeError::Local(_))
    }
}

/// Nix's `BuildResult::Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStatus {
    Built,
    Substituted,
    AlreadyValid,
    PermanentFailure,
    InputRejected,
    OutputRejected,
    TransientFailure,
    CachedFailure,
    TimedOut,
    MiscFailure,
    DependencyFailed,
    LogLimitExceeded,
    NotDeterministic,
    ResolvesToAlreadyValid,
    NoSubstituters,
    Unknown(u64),
}

impl BuildStatus {
    pub fn from_u64(n: u64) -> Self {
        use BuildStatus::*;
        match n {
            0 => Built,
            1 => Substituted,
            2 => AlreadyValid,
            3 => PermanentFailure,
            4 => InputRejected,
            5 => OutputRejected,
            6 => TransientFailure,
            7 => CachedFailure,
            8 => TimedOut,
            9 => MiscFailure,
            10 => DependencyFailed,
            11 => LogLimitExceeded,
            12 => NotDeterministic,
            13 => ResolvesToAlreadyValid,
            14 => NoSubstituters,
            n => Unknown(n),
        }
    }

    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }
}

#[derive(Debug, Clone)]
pub struct BuildResult {
    pub status: BuildStatus,
    pub error: String,
    pub times_built: u64,
    pub start_time: u64,
    pub stop_time: u64,
}

#[derive(Debug, Clone, Copy)]
pub struct BuildOptions {
    pub max_silent_s: u64,
    pub timeout_s: u64,
    pub max_log_bytes: u64,
}

/// What `QueryPathInfos` says of a path on the builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotePathInfo {
    pub path: String,
    pub deriver: Option<String>,
    pub references: Vec<String>,
    pub nar_size: u64,
    pub nar_hash: String,
    pub ca: Option<String>,
}

/// The path info `AddToStoreNar` sends before a NAR.
#[derive(Debug, Clone)]
pub struct AddInfo {
    pub path: String,
    pub deriver: Option<String>,
    /// `sha256:<base32>` (or any form Nix parses).
    pub nar_hash: String,
    pub references: Vec<String>,
    pub nar_size: u64,
    pub ca: Option<String>,
}

pub struct ServeConn<R, W> {
    r: BufReader<R>,
    w: BufWriter<W>,
    /// Requests are assembled here and written in one go at flush.
    pending: Vec<u8>,
    pub remote_version: u64,
    /// Longest wait for any byte while a reply is expected.
    pub progress_timeout: Duration,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> ServeConn<R, W> {
    /// Exchanges magic numbers and versions.
    pub async fn handshake(r: R, w: W, progress_timeout: Duration) -> Result<Self, ServeError> {
        let mut c = ServeConn {
            r: BufReader::with_capacity(256 * 1024, r),
            w: BufWriter::with_capacity(256 * 1024, w),
            pending: Vec::with_capacity(4096),
            remote_version: 0,
            progress_timeout,
        };
        c.put(MAGIC_CLIENT);
        c.put(VERSION);
        c.flush().await?;
        let magic = c.get().await?;
        if magic != MAGIC_SERVER {
            return Err(ServeError::BadMagic(magic));
        }
        let v = c.get().await?;
        if v >> 8 != 2 {
            return Err(ServeError::Version(v));
        }
        c.remote_version = v;
        Ok(c)
    }

    fn minor(&self) -> u64 {
        self.remote_version.min(VERSION) & 0xff
    }

    // -------- writing: buffered; errors surface at flush

    fn put(&mut self, n: u64) {
        self.buf_write(&n.to_le_bytes());
    }

    fn put_str(&mut self, s: &str) {
        self.put_bytes(s.as_bytes());
    }

    fn put_bytes(&mut self, b: &[u8]) {
        self.put(b.len() as u64);
        self.buf_write(b);
        let pad = (8 - b.len() % 8) % 8;
        self.buf_write(&[0u8; 8][..pad]);
    }

    fn put_strs<'a>(&mut self, items: impl ExactSizeIterator<Item = &'a str>) {
        self.put(items.len() as u64);
        for s in items {
            self.put_str(s);
        }
    }

    fn buf_write(&mut self, b: &[u8]) {
        self.pending.extend_from_slice(b);
    }

    async fn flush(&mut self) -> Result<(), ServeError> {
        let data = std::mem::take(&mut self.pending);
        let t = self.progress_timeout;
        let write = async {
            self.w.write_all(&data).await?;
            self.w.flush().await
        };
        tokio::time::timeout(t, write).await.map_err(|_| ServeError::Stalled(t.as_secs()))??;
        Ok(())
    }

    // -------- reading, each with the progress timeout

    async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ServeError> {
        let t = self.progress_timeout;
        let mut filled = 0;
        while filled < buf.len() {
            let n = match tokio::time::timeout(t, self.r.read(&mut buf[filled..])).await {
                Ok(r) => r?,
                Err(_) => return Err(ServeError::Stalled(t.as_secs())),
            };
            if n == 0 {
                return Err(ServeError::Eof);
            }
            filled += n;
        }
        Ok(())
    }

    async fn get(&mut self) -> Result<u64, ServeError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b).await?;
        Ok(u64::from_le_bytes(b))
    }

    async fn get_bytes(&mut self) -> Result<Vec<u8>, ServeError> {
        let len = self.get().await?;
        if len > MAX_STRING {
            return Err(ServeError::Protocol(format!("a string of {len} bytes")));
        }
        let padded = (len as usize).div_ceil(8) * 8;
        let mut b = vec![0u8; padded];
        self.read_exact(&mut b).await?;
        if b[len as usize..].iter().any(|&x| x != 0) {
            return Err(ServeError::Protocol("non-zero string padding".into()));
        }
        b.truncate(len as usize);
        Ok(b)
    }

    async fn get_str(&mut self) -> Result<String, ServeError> {
        String::from_utf8(self.get_bytes().await?)
            .map_err(|_| ServeError::Protocol("a string that is not UTF-8".into()))
    }

    async fn get_strs(&mut self) -> Result<Vec<String>, ServeError> {
        let n = self.get().await?;
        if n > 1 << 24 {
            return Err(ServeError::Protocol(format!("a list of {n} items")));
        }
        let mut v = Vec::with_capacity(n as usize);
        for _ in 0..n {
            v.push(self.get_str().await?);
        }
        Ok(v)
    }

    // -------- commands

    /// The subset of `paths` valid on the builder. `lock` keeps them from
    /// being garbage-collected there while this connection lives.
    pub async fn query_valid_paths(&mut self, paths: &[String], lock: bool) -> Result<Vec<String>, ServeError> {
        self.put(1);
        self.put(lock as u64);
        self.put(0);
        self.put_strs(paths.iter().map(String::as_str));
        self.flush().await?;
        self.get_strs().await
    }

    /// The same, after the builder has tried to substitute `paths` from its
    /// own substituters (what Nix's `builders-use-substitutes` does);
    /// failures to substitute are only warnings on its stderr. Nothing
    /// arrives until it is done, so `wait` replaces the progress timeout.
    pub async fn substitute_paths(&mut self, paths: &[String], wait: Duration) -> Result<Vec<String>, ServeError> {
        self.put(1);
        self.put(1);
        self.put(1);
        self.put_strs(paths.iter().map(String::as_str));
        self.flush().await?;
        let saved = self.progress_timeout;
        self.progress_timeout = wait;
        let r = self.get_strs().await;
        self.progress_timeout = saved;
        r
    }

    pub async fn query_path_infos(&mut self, paths: &[String]) -> Result<Vec<RemotePathInfo>, ServeError> {
        self.put(2);
        self.put_strs(paths.iter().map(String::as_str));
        self.flush().await?;
        let mut out = Vec::new();
        loop {
            let path = self.get_str().await?;
            if path.is_empty() {
                return Ok(out);
            }
            let deriver = Some(self.get_str().await?).filter(|d| !d.is_empty());
            let references = self.get_strs().await?;
            let _download_size = self.get().await?;
            let nar_size = self.get().await?;
            let (nar_hash, ca) = if self.minor() >= 4 {
                let h = self.get_str().await?;
                let ca = Some(self.get_str().await?).filter(|c| !c.is_empty());
                let _sigs = self.get_strs().await?;
                (h, ca)
            } else {
                (String::new(), None)
            };
            out.push(RemotePathInfo { path, deriver, references, nar_size, nar_hash, ca });
        }
    }

    /// Adds one path (its references must be there already), streaming
    /// exactly `info.nar_size` bytes of NAR from `nar`.
    pub async fn add_to_store_nar(
        &mut self,
        info: &AddInfo,
        nar: &mut (impl AsyncRead + Unpin),
    ) -> Result<(), ServeError> {
        self.put(9);
        self.put_str(&info.path);
        self.put_str(info.deriver.as_deref().unwrap_or(""));
        self.put_str(&info.nar_hash);
        self.put_strs(info.references.iter().map(String::as_str));
        self.put(0); // registration time: now
        self.put(info.nar_size);
        self.put(0); // not ultimate: built elsewhere
        self.put_strs(std::iter::empty());
        self.put_str(info.ca.as_deref().unwrap_or(""));
        self.flush().await?;
        // Copied chunk by chunk, each write under the progress timeout: a
        // builder that stops reading must not hang the step.
        let t = self.progress_timeout;
        let stalled = || ServeError::Stalled(t.as_secs());
        let mut left = info.nar_size;
        let mut buf = vec![0u8; 256 * 1024];
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = tokio::time::timeout(t, nar.read(&mut buf[..want]))
                .await
                .map_err(|_| ServeError::Local(std::io::Error::other(format!("the NAR of {} stalled", info.path))))?
                .map_err(ServeError::Local)?;
            if n == 0 {
                let e = format!("the NAR of {} ended {left} bytes early", info.path);
                return Err(ServeError::Local(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, e)));
            }
            tokio::time::timeout(t, self.w.write_all(&buf[..n])).await.map_err(|_| stalled())??;
            left -= n as u64;
        }
        tokio::time::timeout(t, self.w.flush()).await.map_err(|_| stalled())??;
        match self.get().await? {
            1 => Ok(()),
            n => Err(ServeError::Protocol(format!("AddToStoreNar answered {n}"))),
        }
    }

    /// Builds `drv` (its inputs must be on the builder already). The log
    /// arrives on the process's stderr meanwhile; `wait` bounds the whole
    /// build (the builder enforces the timeouts in `opts` itself).
    pub async fn build_derivation(
        &mut self,
        drv_path: &str,
        drv: &Derivation,
        input_paths: &[String],
        opts: BuildOptions,
        wait: Duration,
    ) -> Result<BuildResult, ServeError> {
        self.put(8);
        self.put_str(drv_path);
        self.put(drv.outputs.len() as u64);
        for o in &drv.outputs {
            self.put_str(&o.name);
            self.put_str(&o.path);
            self.put_str(&o.hash_algo);
            self.put_str(&o.hash);
        }
        // A "basic" derivation: input derivations resolved to their outputs.
        let mut srcs: Vec<String> = drv.input_srcs.iter().map(|p| p.to_string()).collect();
        srcs.extend(input_paths.iter().cloned());
        srcs.sort();
        srcs.dedup();
        self.put_strs(srcs.iter().map(String::as_str));
        self.put_str(&drv.system);
        self.put_str(&drv.builder);
        self.put_strs(drv.args.iter().map(String::as_str));
        self.put(drv.env.len() as u64);
        for (k, v) in &drv.env {
            self.put_str(k);
            self.put_str(v);
        }
        self.put(opts.max_silent_s);
        self.put(opts.timeout_s);
        if self.minor() >= 2 {
            self.put(opts.max_log_bytes);
        }
        if self.minor() >= 3 {
            self.put(0); // repeats
            self.put(0); // enforce determinism
        }
        if self.minor() >= 7 {
            self.put(0); // keep failed
        }
        self.flush().await?;
        // Nothing arrives on stdout until the build ends.
        let saved = self.progress_timeout;
        self.progress_timeout = wait;
        let first = self.get().await;
        self.progress_timeout = saved;
        let status = BuildStatus::from_u64(first?);
        let error = self.get_str().await?;
        let (mut times_built, mut start_time, mut stop_time) = (0, 0, 0);
        if self.minor() >= 3 {
            times_built = self.get().await?;
            let _non_deterministic = self.get().await?;
            start_time = self.get().await?;
            stop_time = self.get().await?;
        }
        // Nix 2.8 sends these whatever the client's version (see above).
        if self.minor() >= 6 {
            let n = self.get().await?;
            for _ in 0..n {
                let _id = self.get_str().await?;
                let _realisation = self.get_str().await?;
            }
        }
        Ok(BuildResult { status, error: crate::eval::worker::strip_ansi(&error), times_built, start_time, stop_time })
    }

    /// Streams the NAR of `path` to `sink`; the NAR is parsed on the way,
    /// which is how its end is found (it has no length prefix).
    pub async fn dump_store_path(
        &mut self,
        path: &str,
        sink: &mut (impl AsyncWrite + Unpin),
        on_event: &mut impl FnMut(crate::nix::nar::Event<'_>),
    ) -> Result<u64, ServeError> {
        self.put(3);
        self.put_str(path);
        self.flush().await?;
        let mut parser = NarParser::new();
        let t = self.progress_timeout;
        while !parser.is_done() {
            let buf = match tokio::time::timeout(t, self.r.fill_buf()).await {
                Ok(r) => r?,
                Err(_) => return Err(ServeError::Stalled(t.as_secs())),
            };
            if buf.is_empty() {
                return Err(ServeError::Eof);
            }
            let n = parser.feed(buf, on_event)?;
            sink.write_all(&buf[..n]).await.map_err(ServeError::Local)?;
            self.r.consume(n);
        }
        sink.flush().await.map_err(ServeError::Local)?;
        Ok(parser.position())
    }
}
