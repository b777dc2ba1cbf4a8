//! Writing a NAR into storage: streamed through the validator, the NAR hash
//! and the compressor into a temporary file, then renamed to its
//! content-addressed name; a storage error (a full disk) is the
//! coordinator's, never the source's.

use std::io::{Read, Write};
use std::path::PathBuf;

use super::*;
use crate::nix::hash::Sha256Stream;
use crate::nix::nar::{NarError, NarParser};

impl Inner {
    /// Streams a NAR through the validator, the NAR hash and the compressor
    /// into a temporary file, then gives it its content-addressed name. On
    /// any error, or a NAR that does not match `expect`, nothing is kept.
    pub(super) fn write_nar(
        &self,
        nar: impl Read,
        expect: Option<(Hash, u64)>,
        limit: u64,
    ) -> Result<Written, CacheError> {
        let ext = match self.compression {
            Compression::Zstd => ".zst",
            Compression::Xz => ".xz",
            Compression::None => "",
        };
        // The final name depends on the file hash, known only at the end.
        let (file, tmp) = self.storage.temp_for("nar/pending")?;
        let guard = RemoveOnDrop(Some(tmp.clone()));
        // Writing is the storage's side: its errors (a full disk) are the
        // coordinator's, never the NAR source's.
        let store_err =
            |e: std::io::Error| CacheError::Storage(StorageError::Io { path: tmp.display().to_string(), source: e });
        let hashing =
            HashingWriter { inner: std::io::BufWriter::with_capacity(256 * 1024, file), hash: Sha256Stream::new() };
        let mut enc: Box<dyn Encoder> = match self.compression {
            Compression::Zstd => {
                Box::new(zstd::stream::write::Encoder::new(hashing, self.zstd_level).map_err(store_err)?)
            }
            Compression::Xz => Box::new(xz2::write::XzEncoder::new(hashing, 6)),
            Compression::None => Box::new(Plain(hashing)),
        };
        let (nar_hash, nar_size) = read_nar(nar, |chunk, len| {
            if len > limit {
                return Err(CacheError::TooLarge(limit));
            }
            enc.write_all(chunk).map_err(store_err)
        })?;
        if let Some((h, size)) = &expect
            && (h != &nar_hash || *size != nar_size)
        {
            return Err(CacheError::Mismatch(format!(
                "narinfo says {h} ({size} bytes), the NAR is {nar_hash} ({nar_size} bytes)"
            )));
        }
        let hashing = enc.finish_box().map_err(store_err)?;
        let file_size = hashing.hash.len();
        let file_hash = hashing.hash.finish();
        let file = hashing.inner.into_inner().map_err(|e| store_err(e.into_error()))?;
        file.sync_all().map_err(store_err)?;
        drop(file);
        let key = format!("nar/{}.nar{ext}", file_hash.to_base32());
        if self.storage.exists_blocking(&key)? {
            // Same bytes already stored (content-addressed): keep the old file.
            drop(guard);
        } else {
            self.storage.commit_blocking(&tmp, &key)?;
            std::mem::forget(guard);
        }
        Ok(Written { nar_hash, nar_size, file_hash, file_size, key })
    }
}

pub(super) struct RemoveOnDrop(pub(super) Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256Stream,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

type Sink = HashingWriter<std::io::BufWriter<std::fs::File>>;

/// The three compressors behind one face, each handing back the sink.
trait Encoder: Write {
    fn finish_box(self: Box<Self>) -> std::io::Result<Sink>;
}

impl Encoder for zstd::stream::write::Encoder<'static, Sink> {
    fn finish_box(self: Box<Self>) -> std::io::Result<Sink> {
        (*self).finish()
    }
}

impl Encoder for xz2::write::XzEncoder<Sink> {
    fn finish_box(self: Box<Self>) -> std::io::Result<Sink> {
        (*self).finish()
    }
}

struct Plain(Sink);

impl Write for Plain {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

impl Encoder for Plain {
    fn finish_box(self: Box<Self>) -> std::io::Result<Sink> {
        let mut s = self.0;
        s.flush()?;
        Ok(s)
    }
}

/// Reads a NAR from `nar` to its end, checking that it parses and has
/// nothing after it, and hands each chunk, with the length read so far, to
/// `each` (which may stop it); returns the NAR's hash and size.
pub(super) fn read_nar(
    mut nar: impl Read,
    mut each: impl FnMut(&[u8], u64) -> Result<(), CacheError>,
) -> Result<(Hash, u64), CacheError> {
    let mut parser = NarParser::new();
    let mut nar_hash = Sha256Stream::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match nar.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CacheError::Io(e)),
        };
        let chunk = &buf[..n];
        if parser.feed(chunk, &mut |_| {})? != n {
            return Err(CacheError::Nar(NarError::Trailing));
        }
        nar_hash.update(chunk);
        each(chunk, nar_hash.len())?;
    }
    parser.finish()?;
    let size = nar_hash.len();
    Ok((nar_hash.finish(), size))
}
