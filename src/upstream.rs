//! Upstream binary caches: the `substituters` Kiln may take outputs from
//! instead of building them (Hydra's `useSubstitutes`), trusted only with a
//! valid signature of one of `trusted_public_keys`. The queue asks here,
//! for a batch of output paths at a time, which are substitutable; answers
//! are memoised (found, not found, or could not tell and why) because a
//! lookup costs an HTTP round trip and a nixpkgs job has thousands of
//! inputs. An upstream that is slow, down, answers 5xx or serves a narinfo
//! without a valid signature makes its paths "not substitutable": the
//! queue builds them and says why in the step's log. This module also
//! streams a substitutable path's NAR, decompressed, to whoever sends it on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use thiserror::Error;
use tokio::io::AsyncRead;

use crate::nix::{NarInfo, PublicKey, StorePath, compression};

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("substituter {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("trusted public key {key:?}: {reason}")]
    BadKey { key: String, reason: String },
    #[error("{0}")]
    Http(String),
    #[error("{path} is not substitutable: {reason}")]
    NotSubstitutable { path: String, reason: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A path an upstream can give, with the narinfo that says how.
#[derive(Debug)]
pub struct Found {
    /// The upstream's base URL (no trailing slash).
    pub base: String,
    pub narinfo: NarInfo,
}

/// What the upstreams say of one store path.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Arc<Found>),
    /// No upstream has it: the ordinary answer for what must be built.
    Missing,
    /// Could not tell, or an upstream offered it without a trusted
    /// signature; the reason goes into the log of the step that builds it.
    Unusable(Arc<str>),
}

/// How long answers are remembered: a signed narinfo does not change; a
/// miss is kept as long as Nix keeps one (`narinfo-cache-negative-ttl`);
/// an error only briefly, so a flaky upstream is asked again soon.
const FOUND_TTL: Duration = Duration::from_secs(24 * 3600);
const MISSING_TTL: Duration = Duration::from_secs(3600);
const UNUSABLE_TTL: Duration = Duration::from_secs(60);
/// Beyond this many remembered answers, expired ones are dropped.
const MEMO_CAP: usize = 400_000;
/// Lookups in flight at once, over all upstreams.
const CONCURRENCY: usize = 64;

#[derive(Clone)]
pub struct Upstreams {
    inner: Arc<Inner>,
}

struct Inner {
    bases: Vec<String>,
    keys: Vec<PublicKey>,
    client: reqwest::Client,
    timeout: Duration,
    memo: Mutex<HashMap<String, (Instant, Lookup)>>,
}

impl Upstreams {
    /// Upstreams from `substituters` and `trusted_public_keys`; `timeout`
    /// bounds each narinfo lookup and each silence during a download.
    pub fn new(substituters: &[String], trusted_keys: &[String], timeout: Duration) -> Result<Self, UpstreamError> {
        let mut bases = Vec::new();
        for s in substituters {
            let base = s.trim_end_matches('/').to_string();
            let ok = base.starts_with("http://") || base.starts_with("https://") || base.starts_with("file:///");
            if !ok {
                return Err(UpstreamError::BadUrl {
                    url: s.clone(),
                    reason: "Kiln reads http://, https:// and file:/// binary caches".into(),
                });
            }
            if base.contains('?') {
                return Err(UpstreamError::BadUrl {
                    url: s.clone(),
                    reason: "store settings are not supported".into(),
                });
            }
            bases.push(base);
        }
        let keys = trusted_keys
            .iter()
            .map(|k| PublicKey::parse(k).map_err(|e| UpstreamError::BadKey { key: k.clone(), reason: e.to_string() }))
            .collect::<Result<Vec<_>, _>>()?;
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .read_timeout(timeout)
            .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| UpstreamError::Http(e.to_string()))?;
        Ok(Upstreams { inner: Arc::new(Inner { bases, keys, client, timeout, memo: Mutex::new(HashMap::new()) }) })
    }

    /// The configured `substituters` and `trusted_public_keys`.
    pub fn from_config(config: &crate::config::Config) -> Result<Self, UpstreamError> {
        let timeout = Duration::from_secs(config.queue.substitute_timeout_s.max(1));
        Self::new(&config.substituters, &config.trusted_public_keys, timeout)
    }

    /// No upstream configured: nothing is ever substitutable.
    pub fn none() -> Self {
        Self::new(&[], &[], Duration::from_secs(10)).expect("no upstreams is valid")
    }

    pub fn is_empty(&self) -> bool {
        self.inner.bases.is_empty()
    }

    /// What the upstreams say of each path (keyed by the full store path),
    /// asking concurrently for what is not remembered.
    pub async fn lookup_many(&self, paths: &[StorePath]) -> HashMap<String, Lookup> {
        let mut out = HashMap::with_capacity(paths.len());
        if self.is_empty() {
            for p in paths {
                out.insert(p.to_string(), Lookup::Missing);
            }
            return out;
        }
        let mut ask = Vec::new();
        {
            let memo = self.inner.memo.lock().expect("memo");
            let now = Instant::now();
            for p in paths {
                match memo.get(p.hash_part()) {
                    Some((until, l)) if *until > now => {
                        out.insert(p.to_string(), l.clone());
                    }
                    _ => ask.push(p.clone()),
                }
            }
        }
        ask.sort_by(|a, b| a.hash_part().cmp(b.hash_part()));
        ask.dedup();
        let answers: Vec<(StorePath, Lookup)> = futures::stream::iter(ask)
            .map(|p| async move {
                let l = self.ask_all(&p).await;
                (p, l)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut memo = self.inner.memo.lock().expect("memo");
        if memo.len() + answers.len() > MEMO_CAP {
            let now = Instant::now();
            memo.retain(|_, (until, _)| *until > now);
            if memo.len() + answers.len() > MEMO_CAP {
                memo.clear();
            }
        }
        let now = Instant::now();
        for (p, l) in answers {
            let ttl = match &l {
                Lookup::Found(_) => FOUND_TTL,
                Lookup::Missing => MISSING_TTL,
                Lookup::Unusable(_) => UNUSABLE_TTL,
            };
            memo.insert(p.hash_part().to_string(), (now + ttl, l.clone()));
            out.insert(p.to_string(), l);
        }
        out
    }

    pub async fn lookup(&self, path: &StorePath) -> Lookup {
        self.lookup_many(std::slice::from_ref(path)).await.remove(&path.to_string()).unwrap_or(Lookup::Missing)
    }

    /// Remembers that a path could not be had after all (its download
    /// failed), so the next walk builds it.
    pub fn forget_found(&self, path: &StorePath, reason: &str) {
        let until = Instant::now() + UNUSABLE_TTL;
        self.inner
            .memo
            .lock()
            .expect("memo")
            .insert(path.hash_part().to_string(), (until, Lookup::Unusable(Arc::from(reason))));
    }

    /// Asks each upstream in order; the first valid answer wins.
    async fn ask_all(&self, path: &StorePath) -> Lookup {
        let mut reasons = Vec::new();
        for base in &self.inner.bases {
            match self.ask(base, path).await {
                Ok(Some(ni)) => return Lookup::Found(Arc::new(Found { base: base.clone(), narinfo: ni })),
                Ok(None) => {}
                Err(reason) => reasons.push(format!("{base}: {reason}")),
            }
        }
        if reasons.is_empty() { Lookup::Missing } else { Lookup::Unusable(Arc::from(reasons.join("; "))) }
    }

    /// One upstream's narinfo for `path`: `Ok(None)` when it has none.
    async fn ask(&self, base: &str, path: &StorePath) -> Result<Option<NarInfo>, String> {
        let name = format!("{}.narinfo", path.hash_part());
        let text = if let Some(dir) = base.strip_prefix("file://") {
            match tokio::fs::read_to_string(format!("{dir}/{name}")).await {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e.to_string()),
            }
        } else {
            let t = self.inner.timeout;
            let slow = || format!("no answer within {} s", t.as_secs());
            let why = |e: reqwest::Error| if e.is_timeout() { slow() } else { describe(e) };
            let get = async {
                let r = self.inner.client.get(format!("{base}/{name}")).send().await.map_err(why)?;
                match r.status().as_u16() {
                    200 => {}
                    // S3 answers 403 for a key that does not exist.
                    404 | 403 | 410 => return Ok(None),
                    s => return Err(format!("HTTP {s} for {name}")),
                }
                if r.content_length().is_some_and(|n| n > 1 << 20) {
                    return Err(format!("{name} is larger than 1 MiB"));
                }
                let body = r.bytes().await.map_err(why)?;
                String::from_utf8(body.to_vec()).map(Some).map_err(|_| format!("{name} is not UTF-8"))
            };
            match tokio::time::timeout(t, get).await {
                Ok(Ok(Some(t))) => t,
                Ok(Ok(None)) => return Ok(None),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(slow()),
            }
        };
        let ni = NarInfo::parse(&text).map_err(|e| format!("{name}: {e}"))?;
        if ni.store_path != *path {
            return Err(format!("{name} describes {}", ni.store_path));
        }
        if !ni.verify(&self.inner.keys) {
            return Err(format!("{name} has no valid signature of a trusted public key"));
        }
        if !compression::supported(&ni.compression) {
            return Err(format!("{name}: unsupported compression {:?}", ni.compression));
        }
        if !safe_relative(&ni.url) {
            return Err(format!("{name}: URL {:?} is not a path inside the cache", ni.url));
        }
        Ok(Some(ni))
    }

    /// The NAR of a found path, decompressed, as it downloads.
    pub async fn nar(&self, found: &Found) -> Result<impl AsyncRead + Send + Unpin + 'static, UpstreamError> {
        let url = format!("{}/{}", found.base, found.narinfo.url);
        let source: Box<dyn AsyncRead + Send + Unpin> = if let Some(file) = url.strip_prefix("file://") {
            Box::new(tokio::fs::File::open(file).await?)
        } else {
            let r = self.inner.client.get(&url).send().await.map_err(|e| UpstreamError::Http(describe(e)))?;
            if r.status().as_u16() != 200 {
                return Err(UpstreamError::Http(format!("HTTP {} for {url}", r.status().as_u16())));
            }
            let stream = r.bytes_stream().map_err(|e| std::io::Error::other(describe(e)));
            Box::new(tokio_util::io::StreamReader::new(stream))
        };
        Ok(compression::decompressing(&found.narinfo.compression, source)?)
    }
}

/// A narinfo's `URL:` must stay inside its cache.
fn safe_relative(url: &str) -> bool {
    !url.is_empty()
        && !url.starts_with('/')
        && !url.contains("://")
        && url.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && url.chars().all(|c| c.is_ascii_alphanumeric() || "-_.+/".contains(c))
}

/// reqwest's errors say "error sending request" and hide the cause.
fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".into();
    }
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(&e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_stay_inside_the_cache() {
        assert!(safe_relative("nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz"));
        for bad in ["", "/etc/passwd", "../x", "nar/../../x", "http://evil/x", "nar//x", "nar/x y"] {
            assert!(!safe_relative(bad), "{bad}");
        }
    }

    #[test]
    fn substituters_are_checked() {
        assert!(Upstreams::new(&["https://cache.nixos.org/".into()], &[], Duration::from_secs(1)).is_ok());
        assert!(Upstreams::new(&["s3://bucket".into()], &[], Duration::from_secs(1)).is_err());
        assert!(Upstreams::new(&["https://x?priority=1".into()], &[], Duration::from_secs(1)).is_err());
        assert!(Upstreams::new(&[], &["not-a-key".into()], Duration::from_secs(1)).is_err());
    }
}
