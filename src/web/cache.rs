//! The binary cache over HTTP, at the root of the server so the server's
//! URL is the substituter URL: `/nix-cache-info`, `/<hash>.narinfo`,
//! `/nar/<file>` (streamed, with `Range`), `/log/<drv>`, and uploads as
//! `nix copy --to http://…` sends them (a token required; what an upload
//! is trusted for is `Cache::ingest_upload`'s business). Names are
//! checked against Nix's alphabet before anything touches the disk, so no
//! request can reach outside the cache directory.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

use super::{AppState, WebError, auth};
use crate::cache::CacheError;
use crate::nix::{NarInfo, PublicKey, base32, store_path};

const NARINFO_TYPE: &str = "text/x-nix-narinfo";
const NAR_TYPE: &str = "application/x-nix-nar";

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

/// `<32 chars of nix base32>.narinfo` → the hash part.
fn narinfo_hash(file: &str) -> Option<&str> {
    file.strip_suffix(".narinfo").filter(|h| store_path::is_hash_part(h))
}

/// `<52 chars of nix base32>.nar[.ext]` with a known extension.
fn valid_nar_name(file: &str) -> bool {
    let Some((hash, rest)) = file.split_once('.') else { return false };
    hash.len() == base32::encoded_len(32)
        && base32::is_valid(hash)
        && matches!(rest, "nar" | "nar.zst" | "nar.xz" | "nar.bz2" | "nar.br" | "nar.gz" | "nar.lz4")
}

pub async fn cache_info(State(s): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/x-nix-cache-info")], s.cache.cache_info()).into_response()
}

pub async fn get_narinfo(State(s): State<AppState>, Path(file): Path<String>) -> Response {
    let Some(hash) = narinfo_hash(&file) else { return not_found() };
    match s.cache.storage().read(&format!("{hash}.narinfo")).await {
        Ok(Some(bytes)) => {
            crate::metrics::count(&crate::metrics::CACHE_NARINFO_HITS, 1);
            ([(header::CONTENT_TYPE, NARINFO_TYPE)], bytes).into_response()
        }
        Ok(None) => {
            crate::metrics::count(&crate::metrics::CACHE_NARINFO_MISSES, 1);
            not_found()
        }
        Err(e) => unavailable(e),
    }
}

/// The storage could not answer: 503, which Nix retries, never a 404,
/// which it would remember as a miss for an hour.
fn unavailable(e: crate::cache::StorageError) -> Response {
    crate::metrics::count(&crate::metrics::CACHE_STORAGE_ERRORS, 1);
    WebError::Unavailable(e.to_string()).into_response()
}

/// A byte range from a `Range` header, resolved against the file length:
/// `Ok(None)` for the whole file, `Err(())` when it cannot be satisfied.
fn parse_range(headers: &HeaderMap, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(v) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else { return Ok(None) };
    let Some(spec) = v.trim().strip_prefix("bytes=") else { return Ok(None) };
    // Several ranges would need multipart answers; serve the whole file.
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (len.saturating_sub(n), len.saturating_sub(1))
        }
        (s, "") => (s.parse().map_err(|_| ())?, len.saturating_sub(1)),
        (s, e) => {
            let (s, e): (u64, u64) = (s.parse().map_err(|_| ())?, e.parse().map_err(|_| ())?);
            (s, e.min(len.saturating_sub(1)))
        }
    };
    if len == 0 || start >= len || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

pub async fn get_nar(State(s): State<AppState>, Path(file): Path<String>, headers: HeaderMap) -> Response {
    if !valid_nar_name(&file) {
        return not_found();
    }
    let key = format!("nar/{file}");
    match s.cache.storage().redirect(&key).await {
        Ok(Some(url)) => {
            crate::metrics::count(&crate::metrics::CACHE_NARS, 1);
            let mut r = StatusCode::TEMPORARY_REDIRECT.into_response();
            if let Ok(v) = HeaderValue::from_str(&url) {
                r.headers_mut().insert(header::LOCATION, v);
                return r;
            }
        }
        Ok(None) => {}
        Err(e) => return unavailable(e),
    }
    let len = match s.cache.storage().size(&key).await {
        Ok(Some(len)) => len,
        Ok(None) => return not_found(),
        Err(e) => return unavailable(e),
    };
    let (status, start, count) = match parse_range(&headers, len) {
        Ok(None) => (StatusCode::OK, 0, len),
        Ok(Some((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        Err(()) => {
            return (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{len}"))])
                .into_response();
        }
    };
    crate::metrics::count(&crate::metrics::CACHE_NARS, 1);
    crate::metrics::count(&crate::metrics::CACHE_NAR_BYTES, count);
    let stream = match s.cache.storage().read_range(&key, start, count).await {
        Ok(Some(stream)) => stream,
        // Deleted between the two looks (garbage collection).
        Ok(None) => return not_found(),
        Err(e) => return unavailable(e),
    };
    let mut r = Response::new(Body::from_stream(stream));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(NAR_TYPE));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT {
        let v = format!("bytes {start}-{}/{len}", start + count - 1);
        h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&v).expect("ascii"));
    }
    r
}

pub async fn get_log(State(s): State<AppState>, Path(drv): Path<String>) -> Response {
    const TEXT: &str = "text/plain; charset=utf-8";
    // Still building: the log so far (a live log first: a stored one may
    // be an earlier build's of the same derivation).
    if let Some(f) = s.logs.follow(&drv) {
        return ([(header::CONTENT_TYPE, TEXT)], super::live::stream_reader(f.so_far())).into_response();
    }
    s.logs.fetch_shared(&drv).await;
    match s.logs.open(&drv) {
        // Decompressed on a blocking thread, a chunk at a time.
        Some(r) => ([(header::CONTENT_TYPE, TEXT)], super::live::stream_reader(r)).into_response(),
        None => not_found(),
    }
}

/// `PUT /nar/<file>`: an uploaded NAR, held as pending until a narinfo
/// that names it arrives.
pub async fn put_nar(
    State(s): State<AppState>,
    Path(file): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, WebError> {
    auth::require_upload(&s, &headers).await?;
    if !valid_nar_name(&file) {
        return Err(WebError::BadRequest(format!("{file:?} is not a NAR file name")));
    }
    let max = s.cache.max_upload_bytes();
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(WebError::TooLarge(max));
    }
    let key = format!("pending/{file}");
    let (f, tmp) = s.cache.storage().temp_for(&key).map_err(|e| cache_error(e.into()))?;
    let mut f = tokio::fs::File::from_std(f);
    let mut written = 0u64;
    let mut stream = body.into_data_stream();
    let result: Result<(), WebError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| WebError::BadRequest(format!("upload interrupted: {e}")))?;
            written += chunk.len() as u64;
            if written > max {
                return Err(WebError::TooLarge(max));
            }
            f.write_all(&chunk).await.map_err(|e| cache_error(CacheError::Io(e)))?;
        }
        if declared.is_some_and(|n| n != written) {
            return Err(WebError::BadRequest("upload is shorter than its Content-Length".into()));
        }
        f.sync_all().await.map_err(|e| cache_error(CacheError::Io(e)))?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(e);
    }
    s.cache.storage().commit(&tmp, &key).await.map_err(|e| cache_error(e.into()))?;
    Ok(StatusCode::OK.into_response())
}

/// `PUT /<hash>.narinfo`: the last step of an upload. The pending NAR it
/// names (or, when Nix skipped sending it because the cache has a file of
/// that name, that file) is checked against the narinfo and published as
/// the uploader made it: under its URL, with its signatures, and signed by
/// Kiln only when a trusted upload key signed it. A mismatch keeps nothing.
pub async fn put_narinfo(
    State(s): State<AppState>,
    Path(file): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, WebError> {
    auth::require_upload(&s, &headers).await?;
    let hash = narinfo_hash(&file).ok_or_else(|| WebError::BadRequest(format!("{file:?} is not a narinfo name")))?;
    if body.len() > 64 * 1024 {
        return Err(WebError::TooLarge(64 * 1024));
    }
    let text = std::str::from_utf8(&body).map_err(|_| WebError::BadRequest("narinfo is not UTF-8".into()))?;
    let info = NarInfo::parse(text).map_err(|e| WebError::BadRequest(e.to_string()))?;
    if info.store_path.hash_part() != hash {
        return Err(WebError::BadRequest(format!("narinfo is for {}, not {hash}", info.store_path)));
    }
    if s.config.cache.require_upload_signatures {
        let keys: Vec<PublicKey> =
            s.config.cache.trusted_upload_keys.iter().filter_map(|k| PublicKey::parse(k).ok()).collect();
        if !info.verify(&keys) {
            return Err(WebError::Forbidden("the narinfo is not signed by a trusted upload key".into()));
        }
    }
    let nar = info
        .url
        .strip_prefix("nar/")
        .filter(|n| valid_nar_name(n))
        .ok_or_else(|| WebError::BadRequest(format!("narinfo URL {:?} is not nar/<file>", info.url)))?
        .to_string();
    let pending = format!("pending/{nar}");
    let storage = s.cache.storage();
    let source = if storage.exists(&pending).await.map_err(|e| cache_error(e.into()))? {
        Some(pending.clone())
    } else if s.cache.contains(&info.store_path).await.map_err(cache_error)? {
        return Ok(StatusCode::OK.into_response());
    } else if storage.exists(&info.url).await.map_err(|e| cache_error(e.into()))? {
        None
    } else {
        return Err(WebError::BadRequest(format!("upload nar/{nar} before its narinfo")));
    };
    let r = s.cache.ingest_upload(info, source).await;
    let _ = storage.delete(&pending).await;
    match r {
        Ok(_) => Ok(StatusCode::OK.into_response()),
        Err(e) => Err(cache_error(e)),
    }
}

fn cache_error(e: CacheError) -> WebError {
    match e {
        CacheError::Mismatch(_) | CacheError::FileMismatch(_) | CacheError::Nar(_) | CacheError::Compression(_) => {
            WebError::BadRequest(e.to_string())
        }
        CacheError::TooLarge(n) => WebError::TooLarge(n),
        CacheError::Storage(e) if e.is_unavailable() => WebError::Unavailable(e.to_string()),
        other => WebError::Internal(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_disk() {
        assert_eq!(narinfo_hash("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz.narinfo"), Some("7h7qgvs4kgzsn8a6rb273saxyqh4jxlz"));
        for bad in [
            "../etc/passwd.narinfo",
            "7h7qgvs4kgzsn8a6rb273saxyqh4jxlze.narinfo",
            "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo",
            "x.narinfo",
            ".narinfo",
        ] {
            assert_eq!(narinfo_hash(bad), None, "{bad}");
        }
        let good = format!("{}.nar.zst", "0".repeat(52));
        assert!(valid_nar_name(&good));
        assert!(!valid_nar_name(&format!("{}.nar.zst", "e".repeat(52))));
        assert!(!valid_nar_name("../../x.nar"));
        assert!(!valid_nar_name(&format!("{}.nar.sh", "0".repeat(52))));
    }

    #[test]
    fn ranges() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
            m
        };
        assert_eq!(parse_range(&HeaderMap::new(), 10), Ok(None));
        assert_eq!(parse_range(&h("bytes=0-3"), 10), Ok(Some((0, 3))));
        assert_eq!(parse_range(&h("bytes=5-"), 10), Ok(Some((5, 9))));
        assert_eq!(parse_range(&h("bytes=-4"), 10), Ok(Some((6, 9))));
        assert_eq!(parse_range(&h("bytes=8-100"), 10), Ok(Some((8, 9))));
        assert_eq!(parse_range(&h("bytes=10-"), 10), Err(()));
        assert_eq!(parse_range(&h("bytes=5-2"), 10), Err(()));
        assert_eq!(parse_range(&h("bytes=x-2"), 10), Err(()));
        assert_eq!(parse_range(&h("bytes=0-1,3-4"), 10), Ok(None));
    }
}
