//! Hashes as Nix writes them: `algo:base16`, `algo:base32` (Nix's base32),
//! `algo:base64` and SRI `algo-base64`. Kiln computes sha256 (NAR hashes,
//! file hashes, store path fingerprints) and sha512; md5 and sha1 are parsed
//! and printed only, as they appear in fixed-output derivations.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::Digest;
use thiserror::Error;

use super::base32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HashAlgo {
    Md5,
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlgo {
    pub const fn size(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    pub fn from_name(s: &str) -> Result<Self, HashError> {
        match s {
            "md5" => Ok(HashAlgo::Md5),
            "sha1" => Ok(HashAlgo::Sha1),
            "sha256" => Ok(HashAlgo::Sha256),
            "sha512" => Ok(HashAlgo::Sha512),
            other => Err(HashError::UnknownAlgo(other.to_string())),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    #[error("unknown hash algorithm {0:?}")]
    UnknownAlgo(String),
    #[error("hash {0:?} has no algorithm prefix")]
    NoAlgo(String),
    #[error("hash {hash:?} has a length that fits no encoding of {algo}")]
    BadLength { hash: String, algo: &'static str },
    #[error("hash {0:?} is not valid in its encoding")]
    BadEncoding(String),
}

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash {
    algo: HashAlgo,
    bytes: Vec<u8>,
}

/// The textual forms Nix prints a hash in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Base16,
    Base32,
    Base64,
    Sri,
}

impl Hash {
    pub fn new(algo: HashAlgo, bytes: Vec<u8>) -> Result<Self, HashError> {
        if bytes.len() != algo.size() {
            return Err(HashError::BadLength { hash: to_hex(&bytes), algo: algo.name() });
        }
        Ok(Hash { algo, bytes })
    }

    pub fn sha256(data: &[u8]) -> Self {
        Hash { algo: HashAlgo::Sha256, bytes: sha2::Sha256::digest(data).to_vec() }
    }

    pub fn sha256_from_digest(digest: [u8; 32]) -> Self {
        Hash { algo: HashAlgo::Sha256, bytes: digest.to_vec() }
    }

    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Parses `algo:hash` in base16, base32 or base64, or SRI `algo-base64`.
    pub fn parse(s: &str) -> Result<Self, HashError> {
        if let Some((algo, rest)) = s.split_once(':') {
            let algo = HashAlgo::from_name(algo)?;
            Self::parse_bare(rest, algo)
        } else if let Some((algo, rest)) = s.split_once('-') {
            let algo = HashAlgo::from_name(algo)?;
            let bytes = B64.decode(rest).map_err(|_| HashError::BadEncoding(s.to_string()))?;
            Hash::new(algo, bytes).map_err(|_| HashError::BadLength { hash: s.to_string(), algo: algo.name() })
        } else {
            Err(HashError::NoAlgo(s.to_string()))
        }
    }

    /// Parses a hash without prefix whose algorithm is known (as in a `.drv`
    /// output's hash field), choosing the encoding by length as Nix does.
    pub fn parse_bare(s: &str, algo: HashAlgo) -> Result<Self, HashError> {
        let size = algo.size();
        let bad = || HashError::BadEncoding(s.to_string());
        let bytes = if s.len() == size * 2 {
            from_hex(s).ok_or_else(bad)?
        } else if s.len() == base32::encoded_len(size) {
            base32::decode(s, size).map_err(|_| bad())?
        } else if s.len() == size.div_ceil(3) * 4 {
            B64.decode(s).map_err(|_| bad())?
        } else {
            return Err(HashError::BadLength { hash: s.to_string(), algo: algo.name() });
        };
        Hash::new(algo, bytes)
    }

    pub fn encode(&self, enc: Encoding) -> String {
        let a = self.algo.name();
        match enc {
            Encoding::Base16 => format!("{a}:{}", to_hex(&self.bytes)),
            Encoding::Base32 => format!("{a}:{}", base32::encode(&self.bytes)),
            Encoding::Base64 => format!("{a}:{}", B64.encode(&self.bytes)),
            Encoding::Sri => format!("{a}-{}", B64.encode(&self.bytes)),
        }
    }

    pub fn to_hex(&self) -> String {
        to_hex(&self.bytes)
    }

    pub fn to_base32(&self) -> String {
        base32::encode(&self.bytes)
    }
}

/// Nix's default textual form for narinfo and fingerprints: `sha256:<base32>`.
impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode(Encoding::Base32))
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode(Encoding::Sri))
    }
}

impl FromStr for Hash {
    type Err = HashError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Hash::parse(s)
    }
}

pub fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 0xf) as usize] as char);
    }
    s
}

pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    s.as_bytes().chunks(2).map(|p| Some(nib(p[0])? << 4 | nib(p[1])?)).collect()
}

/// A sha256 computed over a stream, for NARs and compressed files.
#[derive(Default, Clone)]
pub struct Sha256Stream {
    inner: sha2::Sha256,
    len: u64,
}

impl Sha256Stream {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.len += data.len() as u64;
    }
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn finish(self) -> Hash {
        Hash::sha256_from_digest(self.inner.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn all_forms_parse_to_the_same_hash() {
        let h = Hash::sha256(b"");
        assert_eq!(h.to_hex(), EMPTY_HEX);
        for enc in [Encoding::Base16, Encoding::Base32, Encoding::Base64, Encoding::Sri] {
            assert_eq!(Hash::parse(&h.encode(enc)).unwrap(), h, "{enc:?}");
        }
        assert_eq!(h.encode(Encoding::Sri), "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=");
        assert_eq!(h.to_string(), "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
    }

    #[test]
    fn bad_hashes_are_errors() {
        assert!(matches!(Hash::parse("sha256:abc"), Err(HashError::BadLength { .. })));
        assert!(matches!(Hash::parse("blake9:abc"), Err(HashError::UnknownAlgo(_))));
        assert!(matches!(Hash::parse("abc"), Err(HashError::NoAlgo(_))));
        let bad32 = format!("sha256:{}", "e".repeat(52));
        assert!(matches!(Hash::parse(&bad32), Err(HashError::BadEncoding(_))));
        assert!(Hash::parse_bare(&"g".repeat(40), HashAlgo::Sha1).is_err());
    }

    #[test]
    fn stream_matches_one_shot() {
        let mut s = Sha256Stream::new();
        s.update(b"hello ");
        s.update(b"world");
        assert_eq!(s.len(), 11);
        assert_eq!(s.finish(), Hash::sha256(b"hello world"));
    }
}
