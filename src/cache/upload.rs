//! Uploads: what `nix copy --to` sent is kept as the uploader made it (its
//! NAR file, URL and signatures) once every hash and size is checked; Kiln
//! signs it too only when a trusted upload key did (decision 014).

use std::io::Read;

use super::write::RemoveOnDrop;
use super::*;
use crate::nix::hash::Sha256Stream;

impl Cache {
    /// Stores what `nix copy --to` uploaded, as the uploader made it: the
    /// NAR file at the `pending` key (compressed as the narinfo says) must
    /// decompress to a valid NAR with the narinfo's NarHash and NarSize,
    /// hash to its FileHash and FileSize (when given) and to the name in
    /// its URL; it is then kept under that URL, so the uploader's own Nix,
    /// which remembers the narinfo it wrote, can fetch it back. Without
    /// `pending`, the NAR file must already be at that URL. The narinfo
    /// keeps the uploader's fields and signatures; Kiln adds its signature
    /// only with `cache.require_upload_signatures` and a valid signature of
    /// one of `cache.trusted_upload_keys`. A path already in the cache is
    /// kept as it is. Nothing is stored unless every check passes.
    pub async fn ingest_upload(
        &self,
        uploaded: NarInfo,
        pending: Option<String>,
    ) -> Result<(NarInfo, bool), CacheError> {
        if let Some(existing) = self.kept(&uploaded.store_path, Origin::Upload).await? {
            return Ok((existing, false));
        }
        if uploaded.nar_size > self.inner.max_upload_bytes {
            return Err(CacheError::TooLarge(self.inner.max_upload_bytes));
        }
        let inner = self.inner.clone();
        let check = uploaded.clone();
        let w = tokio::task::spawn_blocking(move || inner.store_upload(&check, pending.as_deref()))
            .await
            .map_err(|e| CacheError::Io(std::io::Error::other(e)))??;
        let mut ni = uploaded;
        ni.file_hash = Some(w.file_hash);
        ni.file_size = Some(w.file_size);
        let vouched = !self.inner.vouched_upload_keys.is_empty() && ni.verify(&self.inner.vouched_upload_keys);
        if vouched {
            ni.sign(&self.inner.key);
        }
        let row = self.row(&ni, Origin::Upload, vouched);
        self.record(ni, row).await
    }
}

/// The NAR file extension Nix gives a compression method; only the ones
/// Kiln can decompress.
fn nar_extension(compression: &str) -> Result<&'static str, CacheError> {
    match compression {
        "none" | "" => Ok(""),
        "xz" => Ok(".xz"),
        "zstd" => Ok(".zst"),
        other => Err(CacheError::Compression(other.to_string())),
    }
}

/// Reads through to `inner`, hashing and counting what it reads.
struct HashingReader<R> {
    inner: R,
    hash: Sha256Stream,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Parses a NAR from `nar` to its end and checks its hash and size; stops
/// reading as soon as it is longer than `size`.
fn check_nar(nar: impl Read, hash: &Hash, size: u64) -> Result<(), CacheError> {
    let (got, got_size) = super::write::read_nar(nar, |_, len| {
        if len > size {
            return Err(CacheError::Mismatch(format!("the NAR is longer than its NarSize of {size} bytes")));
        }
        Ok(())
    })?;
    if &got != hash || got_size != size {
        return Err(CacheError::Mismatch(format!(
            "narinfo says {hash} ({size} bytes), the NAR is {got} ({got_size} bytes)"
        )));
    }
    Ok(())
}

impl Inner {
    /// Claims an uploaded NAR file from its `pending` key (so a second upload of the
    /// same name cannot swap it while it is checked), checks it against the
    /// narinfo, and moves it to the narinfo's URL. Without `pending`, the
    /// file already at the URL is checked instead: Nix does not send a NAR
    /// file the cache already has (another path with the same contents).
    fn store_upload(&self, ni: &NarInfo, pending: Option<&str>) -> Result<Written, CacheError> {
        let key = ni.url.clone();
        let ext = nar_extension(&ni.compression)?;
        if !key.ends_with(&format!(".nar{ext}")) {
            return Err(CacheError::FileMismatch(format!(
                "URL {key} does not end in .nar{ext}, as Compression: {} says",
                ni.compression
            )));
        }
        let missing =
            |k: &str| CacheError::Io(std::io::Error::new(std::io::ErrorKind::NotFound, format!("{k} is gone")));
        // `guard` removes the file this check reads when it is a copy.
        let (tmp, claimed, _guard) = match pending {
            Some(pending) => {
                let tmp = self.storage.claim_blocking(pending, &key)?.ok_or_else(|| missing(pending))?;
                (tmp.clone(), true, RemoveOnDrop(Some(tmp)))
            }
            None => {
                let (file, copy) = self.storage.fetch_blocking(&key)?.ok_or_else(|| missing(&key))?;
                (file.clone(), false, RemoveOnDrop(copy.then_some(file)))
            }
        };
        let f = std::fs::File::open(&tmp).map_err(CacheError::Io)?;
        let mut file =
            HashingReader { inner: std::io::BufReader::with_capacity(256 * 1024, f), hash: Sha256Stream::new() };
        match ext {
            "" => check_nar(&mut file, &ni.nar_hash, ni.nar_size)?,
            ".xz" => check_nar(xz2::read::XzDecoder::new_multi_decoder(&mut file), &ni.nar_hash, ni.nar_size)?,
            _ => check_nar(
                zstd::stream::read::Decoder::new(&mut file).map_err(CacheError::Io)?,
                &ni.nar_hash,
                ni.nar_size,
            )?,
        }
        // A decoder may stop at the end of its stream: the file is all of it.
        std::io::copy(&mut file, &mut std::io::sink()).map_err(CacheError::Io)?;
        let file_size = file.hash.len();
        let file_hash = file.hash.finish();
        if ni.file_hash.as_ref().is_some_and(|h| h != &file_hash) || ni.file_size.is_some_and(|n| n != file_size) {
            return Err(CacheError::FileMismatch(format!(
                "FileHash {} ({} bytes) claimed, the file is {file_hash} ({file_size} bytes)",
                ni.file_hash.as_ref().map(|h| h.to_string()).unwrap_or_else(|| "-".into()),
                ni.file_size.map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            )));
        }
        // Named by its hash like every NAR file here, so a file of that name
        // is always these bytes, whoever stored it.
        let named = format!("nar/{}.nar{ext}", file_hash.to_base32());
        if key != named {
            return Err(CacheError::FileMismatch(format!("URL {key} should be {named} for these bytes")));
        }
        if claimed && !self.storage.exists_blocking(&key)? {
            self.storage.commit_blocking(&tmp, &key)?;
        }
        Ok(Written { nar_hash: ni.nar_hash.clone(), nar_size: ni.nar_size, file_hash, file_size, key })
    }
}
