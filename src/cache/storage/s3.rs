//! The cache on S3-compatible object storage, through `object_store`
//! (decision 023). Keys are the directory layout's, under an optional
//! prefix. An object is written from a finished temporary file in the
//! spool directory: one PUT when small, a multipart upload of 8 MiB parts
//! when large, so a NAR is never whole in memory. Every failure to reach
//! the store is `Unavailable` (a reader answers 503, never a 404 that a Nix
//! client would remember as a miss), and its message names the key and
//! the error, never the credentials.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig, WriteMultipart,
};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::local::{TEMP_PREFIX, list_files, temp_in};
use super::{ByteStream, StorageError};

/// Objects larger than this go up in parts of this size.
const PART: usize = 8 * 1024 * 1024;

/// `[cache.s3]`: where the bucket is and how to sign for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Settings {
    pub bucket: String,
    /// Keys go under this prefix (no leading or trailing `/`); empty: the
    /// bucket's root.
    pub prefix: String,
    /// `https://s3.example.org` for S3-compatible servers; empty: AWS.
    pub endpoint: String,
    pub region: String,
    /// `path` (`endpoint/bucket/key`, what most S3-compatible servers
    /// want) or `virtual` (`bucket.endpoint/key`, AWS's default).
    pub addressing: String,
    /// Files holding the access key id and secret; without them, the
    /// usual AWS environment variables, then the instance profile.
    pub access_key_id_file: Option<PathBuf>,
    pub secret_access_key_file: Option<PathBuf>,
    /// Seconds one request may take before the store counts as unavailable.
    pub timeout_s: u64,
    /// Answer NAR downloads with a redirect to a presigned URL of the
    /// object (valid `redirect_ttl_s`), so NAR bytes flow from the bucket
    /// to clients without passing through Kiln. Off: Kiln streams them.
    pub redirect_nars: bool,
    pub redirect_ttl_s: u64,
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings {
            bucket: String::new(),
            prefix: String::new(),
            endpoint: String::new(),
            region: "us-east-1".to_string(),
            addressing: "path".to_string(),
            access_key_id_file: None,
            secret_access_key_file: None,
            timeout_s: 30,
            redirect_nars: false,
            redirect_ttl_s: 600,
        }
    }
}

#[derive(Clone)]
pub(super) struct Bucket {
    store: Arc<AmazonS3>,
    bucket: String,
    prefix: String,
    spool: PathBuf,
    /// With `redirect_nars`, how long a presigned URL lives.
    redirect_ttl: Option<Duration>,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket").field("bucket", &self.bucket).field("prefix", &self.prefix).finish()
    }
}

fn unavailable(key: &str, e: object_store::Error) -> StorageError {
    StorageError::Unavailable(format!("{key}: {e}"))
}

fn read_secret(path: &Path) -> Result<String, StorageError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| StorageError::Io { path: path.display().to_string(), source })
}

impl Bucket {
    pub(super) fn open(s: &S3Settings, spool: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(spool)
            .map_err(|source| StorageError::Io { path: spool.display().to_string(), source })?;
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&s.bucket)
            .with_region(&s.region)
            .with_virtual_hosted_style_request(s.addressing == "virtual")
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(s.endpoint.starts_with("http://"))
                    .with_timeout(Duration::from_secs(s.timeout_s.max(1)))
                    .with_connect_timeout(Duration::from_secs(s.timeout_s.clamp(1, 10))),
            )
            // A few quick retries, then "unavailable": a reader waits
            // seconds, not the default three minutes.
            .with_retry(RetryConfig {
                max_retries: 3,
                retry_timeout: Duration::from_secs(s.timeout_s.max(1)),
                ..RetryConfig::default()
            });
        if !s.endpoint.is_empty() {
            b = b.with_endpoint(&s.endpoint);
        }
        if let (Some(id), Some(secret)) = (&s.access_key_id_file, &s.secret_access_key_file) {
            b = b.with_access_key_id(read_secret(id)?).with_secret_access_key(read_secret(secret)?);
        }
        let store = b.build().map_err(|e| StorageError::Unavailable(format!("bucket {}: {e}", s.bucket)))?;
        Ok(Bucket {
            store: Arc::new(store),
            bucket: s.bucket.clone(),
            prefix: s.prefix.trim_matches('/').to_string(),
            spool: spool.to_path_buf(),
            redirect_ttl: s.redirect_nars.then(|| Duration::from_secs(s.redirect_ttl_s.max(60))),
        })
    }

    pub(super) fn location(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    fn object(&self, key: &str) -> ObjectPath {
        if self.prefix.is_empty() { ObjectPath::from(key) } else { ObjectPath::from(format!("{}/{key}", self.prefix)) }
    }

    /// A presigned GET URL of `key`, when NARs are redirected. Signing is
    /// local (no request); the URL carries a signature, so it is never
    /// logged.
    pub(super) async fn presigned(&self, key: &str) -> Result<Option<String>, StorageError> {
        use object_store::signer::Signer;
        let Some(ttl) = self.redirect_ttl else { return Ok(None) };
        let url = self
            .store
            .signed_url(reqwest::Method::GET, &self.object(key), ttl)
            .await
            .map_err(|e| unavailable(key, e))?;
        Ok(Some(url.to_string()))
    }

    pub(super) fn temp(&self) -> Result<(std::fs::File, PathBuf), StorageError> {
        temp_in(&self.spool)
    }

    pub(super) async fn commit(&self, tmp: &Path, key: &str) -> Result<(), StorageError> {
        let r = self.upload(tmp, key).await;
        let _ = tokio::fs::remove_file(tmp).await;
        r
    }

    pub(super) async fn upload(&self, tmp: &Path, key: &str) -> Result<(), StorageError> {
        let io = |source| StorageError::Io { path: tmp.display().to_string(), source };
        let mut f = tokio::fs::File::open(tmp).await.map_err(io)?;
        let len = f.metadata().await.map_err(io)?.len();
        let path = self.object(key);
        if len <= PART as u64 {
            let mut buf = Vec::with_capacity(len as usize);
            f.read_to_end(&mut buf).await.map_err(io)?;
            self.store.put(&path, PutPayload::from(buf)).await.map_err(|e| unavailable(key, e))?;
            return Ok(());
        }
        let upload = self.store.put_multipart(&path).await.map_err(|e| unavailable(key, e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART);
        let mut buf = vec![0u8; 1024 * 1024];
        let written: Result<(), StorageError> = async {
            loop {
                // At most a few parts in flight: memory stays bounded.
                w.wait_for_capacity(4).await.map_err(|e| unavailable(key, e))?;
                let n = f.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    return Ok(());
                }
                w.write(&buf[..n]);
            }
        }
        .await;
        match written {
            Ok(()) => {
                w.finish().await.map_err(|e| unavailable(key, e))?;
                Ok(())
            }
            Err(e) => {
                let _ = w.abort().await;
                Err(e)
            }
        }
    }

    pub(super) async fn put_bytes(&self, key: &str, bytes: Vec<u8>) -> Result<(), StorageError> {
        self.store.put(&self.object(key), PutPayload::from(bytes)).await.map_err(|e| unavailable(key, e))?;
        Ok(())
    }

    pub(super) async fn size(&self, key: &str) -> Result<Option<u64>, StorageError> {
        match self.store.head(&self.object(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(unavailable(key, e)),
        }
    }

    pub(super) async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self.store.delete(&self.object(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(unavailable(key, e)),
        }
    }

    /// `f` of every key, 32 requests at a time, answers in key order.
    pub(super) async fn each<T, F, Fut>(&self, keys: Vec<String>, f: F) -> Result<Vec<T>, StorageError>
    where
        F: Fn(Bucket, String) -> Fut,
        Fut: std::future::Future<Output = Result<T, StorageError>>,
    {
        futures::stream::iter(keys.into_iter().map(|k| f(self.clone(), k)))
            .buffered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect()
    }

    pub(super) async fn delete_many(&self, keys: Vec<String>) -> Result<(), StorageError> {
        let paths: Vec<object_store::Result<ObjectPath>> = keys.iter().map(|k| Ok(self.object(k))).collect();
        let mut results = self.store.delete_stream(futures::stream::iter(paths).boxed());
        while let Some(r) = results.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(unavailable("batch delete", e)),
            }
        }
        Ok(())
    }

    pub(super) async fn list(&self, dir: &str) -> Result<Vec<(String, u64, u64)>, StorageError> {
        let prefix = match (self.prefix.is_empty(), dir.is_empty()) {
            (true, true) => None,
            (true, false) => Some(ObjectPath::from(dir)),
            (false, true) => Some(ObjectPath::from(self.prefix.as_str())),
            (false, false) => Some(ObjectPath::from(format!("{}/{dir}", self.prefix))),
        };
        let now = chrono::Utc::now();
        // Only the objects directly under `dir`, as on a directory.
        let listed = self.store.list_with_delimiter(prefix.as_ref()).await.map_err(|e| unavailable(dir, e))?;
        Ok(listed
            .objects
            .into_iter()
            .filter_map(|m| {
                let name = m.location.filename()?.to_string();
                let age = (now - m.last_modified).num_seconds().max(0) as u64;
                Some((name, m.size, age))
            })
            .collect())
    }

    pub(super) fn remove_temp(&self, name: &str) {
        let _ = std::fs::remove_file(self.spool.join(name));
    }

    pub(super) fn spool_temps(&self) -> Vec<(String, u64, u64)> {
        list_files(&self.spool).unwrap_or_default().into_iter().filter(|(n, ..)| n.starts_with(TEMP_PREFIX)).collect()
    }

    pub(super) async fn read(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        match self.store.get(&self.object(key)).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| unavailable(key, e))?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(unavailable(key, e)),
        }
    }

    pub(super) async fn read_range(
        &self,
        key: &str,
        start: u64,
        count: u64,
    ) -> Result<Option<ByteStream>, StorageError> {
        let range = if count == u64::MAX { GetRange::Offset(start) } else { GetRange::Bounded(start..start + count) };
        let opts = GetOptions { range: Some(range), ..GetOptions::default() };
        let r = match self.store.get_opts(&self.object(key), opts).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(unavailable(key, e)),
        };
        let key = key.to_string();
        let stream = r.into_stream().map_err(move |e| std::io::Error::other(unavailable(&key, e)));
        Ok(Some(Box::pin(coalesce(stream, 256 * 1024))))
    }

    /// The object in a new spool file.
    pub(super) async fn fetch(&self, key: &str) -> Result<Option<PathBuf>, StorageError> {
        let Some(mut stream) = self.read_range(key, 0, u64::MAX).await? else { return Ok(None) };
        let (f, tmp) = self.temp()?;
        let mut f = tokio::fs::File::from_std(f);
        let copied: std::io::Result<()> = async {
            use tokio::io::AsyncWriteExt;
            while let Some(chunk) = stream.next().await {
                f.write_all(&chunk?).await?;
            }
            f.flush().await
        }
        .await;
        if let Err(e) = copied {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(StorageError::Unavailable(format!("{key}: {e}")));
        }
        Ok(Some(tmp))
    }
}

/// Joins the small chunks an HTTP body arrives in (a few KiB each) into
/// chunks of up to `max` bytes, without waiting for more than is already
/// there: fewer, larger writes on the way out to the client.
fn coalesce(
    inner: impl futures::Stream<Item = std::io::Result<Bytes>> + Send + Unpin + 'static,
    max: usize,
) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    use std::task::Poll;
    let mut inner = inner.fuse();
    let mut buf = bytes::BytesMut::new();
    let mut failed: Option<std::io::Error> = None;
    futures::stream::poll_fn(move |cx| {
        if let Some(e) = failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        loop {
            match inner.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    if buf.is_empty() && chunk.len() >= max {
                        return Poll::Ready(Some(Ok(chunk)));
                    }
                    buf.extend_from_slice(&chunk);
                    if buf.len() >= max {
                        return Poll::Ready(Some(Ok(buf.split().freeze())));
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    if buf.is_empty() {
                        return Poll::Ready(Some(Err(e)));
                    }
                    failed = Some(e);
                    return Poll::Ready(Some(Ok(buf.split().freeze())));
                }
                Poll::Ready(None) => {
                    return Poll::Ready((!buf.is_empty()).then(|| Ok(buf.split().freeze())));
                }
                Poll::Pending => {
                    return if buf.is_empty() { Poll::Pending } else { Poll::Ready(Some(Ok(buf.split().freeze()))) };
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn small_chunks_are_joined_and_an_error_comes_after_the_bytes_before_it() {
        let chunks: Vec<std::io::Result<Bytes>> =
            (0..10u8).map(|i| Ok(Bytes::from(vec![i; 3]))).chain([Err(std::io::Error::other("cut"))]).collect();
        let out: Vec<std::io::Result<Bytes>> = coalesce(futures::stream::iter(chunks), 8).collect().await;
        let sizes: Vec<usize> = out.iter().filter_map(|c| c.as_ref().ok().map(|b| b.len())).collect();
        assert_eq!(sizes, vec![9, 9, 9, 3]);
        let joined: Vec<u8> = out.iter().filter_map(|c| c.as_ref().ok()).flat_map(|b| b.to_vec()).collect();
        assert_eq!(joined, (0..10u8).flat_map(|i| [i; 3]).collect::<Vec<_>>());
        assert!(out.last().unwrap().is_err(), "the error is last");
    }
}
