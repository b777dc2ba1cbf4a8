//! The compressions binary caches use for NAR files (`Compression:` in a
//! narinfo): `xz` (cache.nixos.org's), `zstd` (Kiln's default) and `none`.
//! Decoding is synchronous (xz2 and zstd are); [`decompressing`] runs it on
//! a blocking thread between two async streams, so a NAR read from a file
//! or an HTTP body arrives decompressed without ever being whole in memory.

use std::io::Read;

use tokio::io::AsyncRead;

/// Whether Kiln can decode NAR files compressed this way.
pub fn supported(compression: &str) -> bool {
    matches!(compression, "" | "none" | "xz" | "zstd")
}

/// A reader that decodes `compression` from `r`.
pub fn decoder<'a>(compression: &str, r: impl Read + Send + 'a) -> std::io::Result<Box<dyn Read + Send + 'a>> {
    Ok(match compression {
        "" | "none" => Box::new(r),
        "xz" => Box::new(xz2::read::XzDecoder::new_multi_decoder(r)),
        "zstd" => Box::new(zstd::stream::read::Decoder::with_buffer(std::io::BufReader::new(r))?),
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!("unsupported NAR compression {other:?}"),
            ));
        }
    })
}

/// Decodes `compression` from an async stream into an async stream. Errors
/// of the source or the decoder end the output stream with that error.
pub fn decompressing(
    compression: &str,
    source: impl AsyncRead + Send + Unpin + 'static,
) -> std::io::Result<impl AsyncRead + Send + Unpin + 'static> {
    if !supported(compression) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("unsupported NAR compression {compression:?}"),
        ));
    }
    let compression = compression.to_string();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let bridge = tokio_util::io::SyncIoBridge::new(source);
        let mut r = match decoder(&compression, bridge) {
            Ok(r) => r,
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                return;
            }
        };
        loop {
            let mut buf = vec![0u8; 256 * 1024];
            match r.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Ok(buf.into())).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    Ok(tokio_util::io::StreamReader::new(futures::stream::poll_fn(move |cx| rx.poll_recv(cx))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn round_trips_each_compression() {
        let data: Vec<u8> = (0..300_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let xz = {
            let mut e = xz2::write::XzEncoder::new(Vec::new(), 1);
            std::io::Write::write_all(&mut e, &data).unwrap();
            e.finish().unwrap()
        };
        let zst = zstd::encode_all(&data[..], 1).unwrap();
        for (c, bytes) in [("xz", xz), ("zstd", zst), ("none", data.clone())] {
            let mut out = Vec::new();
            decompressing(c, std::io::Cursor::new(bytes)).unwrap().read_to_end(&mut out).await.unwrap();
            assert_eq!(out, data, "{c}");
        }
        assert!(decompressing("bzip2", std::io::Cursor::new(vec![])).is_err());
    }

    #[tokio::test]
    async fn a_corrupt_stream_is_an_error() {
        let mut zst = zstd::encode_all(&vec![7u8; 1 << 20][..], 1).unwrap();
        zst.truncate(zst.len() / 2);
        let mut out = Vec::new();
        let r = decompressing("zstd", std::io::Cursor::new(zst)).unwrap().read_to_end(&mut out).await;
        assert!(r.is_err(), "a truncated zstd stream must not end quietly");
    }
}
