//! Store paths: `/nix/store/<32 chars of nix base32>-<name>`. Parsing checks
//! the hash part and Nix's name rules, so a path that reaches the database,
//! the cache or a URL route is always one Nix itself would accept. Also
//! computes the path of a text file added to the store (how `.drv` paths
//! are made), which lets tests check our hashing against real Nix.

use std::fmt;
use std::str::FromStr;

use sha2::Digest;
use thiserror::Error;

use super::base32;
use super::hash::to_hex;

pub const STORE_DIR: &str = "/nix/store";
/// Length of the hash part in characters (20 bytes in nix base32).
pub const HASH_PART_LEN: usize = 32;
pub const HASH_BYTES: usize = 20;
/// Nix 2.8 rejects names longer than this.
pub const MAX_NAME_LEN: usize = 211;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StorePathError {
    #[error("{0:?} is not in the Nix store {STORE_DIR}")]
    NotInStore(String),
    #[error("store path {0:?} has an invalid hash part")]
    BadHash(String),
    #[error("store path {0:?} has an empty name")]
    EmptyName(String),
    #[error("store path {0:?} has a name longer than {MAX_NAME_LEN} characters")]
    NameTooLong(String),
    #[error("store path {path:?} has the invalid character {ch:?} in its name")]
    BadNameChar { path: String, ch: char },
    #[error("store path {0:?} has the name \".\" or \"..\"")]
    DotName(String),
}

#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    // Kept as text: the hash part is compared and printed far more often than
    // it is decoded, and sorting by text matches Nix's own ordering.
    hash: String,
    name: String,
}

impl StorePath {
    /// Parses a full path (`/nix/store/…`).
    pub fn parse(s: &str) -> Result<Self, StorePathError> {
        let base = s
            .strip_prefix(STORE_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(s.to_string()))?;
        Self::from_base_name_for(base, s)
    }

    /// Parses the base name (`<hash>-<name>`), as narinfo references are written.
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        Self::from_base_name_for(base, base)
    }

    fn from_base_name_for(base: &str, whole: &str) -> Result<Self, StorePathError> {
        if base.len() < HASH_PART_LEN + 1 || base.as_bytes()[HASH_PART_LEN] != b'-' {
            return Err(StorePathError::BadHash(whole.to_string()));
        }
        let (hash, name) = (&base[..HASH_PART_LEN], &base[HASH_PART_LEN + 1..]);
        if !is_hash_part(hash) {
            return Err(StorePathError::BadHash(whole.to_string()));
        }
        check_name(name, whole)?;
        Ok(StorePath { hash: hash.to_string(), name: name.to_string() })
    }

    pub fn from_parts(hash_bytes: &[u8; HASH_BYTES], name: &str) -> Result<Self, StorePathError> {
        check_name(name, name)?;
        Ok(StorePath { hash: base32::encode(hash_bytes), name: name.to_string() })
    }

    /// The 32-character hash part, which names the path's `.narinfo`.
    pub fn hash_part(&self) -> &str {
        &self.hash
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> String {
        format!("{}-{}", self.hash, self.name)
    }

    pub fn is_derivation(&self) -> bool {
        self.name.ends_with(".drv")
    }

    /// Nix's `makeStorePath`: sha256 of `type:sha256:<hex>:<storedir>:<name>`,
    /// folded to 20 bytes.
    pub fn make(path_type: &str, inner_sha256: &[u8; 32], name: &str) -> Result<Self, StorePathError> {
        let s = format!("{path_type}:sha256:{}:{STORE_DIR}:{name}", to_hex(inner_sha256));
        let h: [u8; 32] = sha2::Sha256::digest(s.as_bytes()).into();
        Self::from_parts(&compress_hash(&h), name)
    }

    /// The path Nix gives a text file added with `builtins.toFile` or as a
    /// `.drv`: type `text:<ref>:<ref>…`, hash of the contents.
    pub fn make_text(name: &str, contents: &[u8], references: &[StorePath]) -> Result<Self, StorePathError> {
        let mut ty = String::from("text");
        let mut refs: Vec<String> = references.iter().map(|r| r.to_string()).collect();
        refs.sort();
        for r in refs {
            ty.push(':');
            ty.push_str(&r);
        }
        let h: [u8; 32] = sha2::Sha256::digest(contents).into();
        Self::make(&ty, &h, name)
    }
}

/// Nix's `compressHash`: XOR-fold a digest into `HASH_BYTES` bytes.
pub fn compress_hash(h: &[u8]) -> [u8; HASH_BYTES] {
    let mut out = [0u8; HASH_BYTES];
    for (i, b) in h.iter().enumerate() {
        out[i % HASH_BYTES] ^= b;
    }
    out
}

pub fn is_hash_part(s: &str) -> bool {
    s.len() == HASH_PART_LEN && base32::is_valid(s)
}

fn check_name(name: &str, whole: &str) -> Result<(), StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::EmptyName(whole.to_string()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong(whole.to_string()));
    }
    // Nix 2.8 accepts a leading period (`nix-store --add .hidden` makes
    // one); only "." and ".." themselves would be dangerous.
    if name == "." || name == ".." {
        return Err(StorePathError::DotName(whole.to_string()));
    }
    if let Some(ch) = name.chars().find(|&c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c))) {
        return Err(StorePathError::BadNameChar { path: whole.to_string(), ch });
    }
    Ok(())
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}-{}", self.hash, self.name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StorePath::parse(s)
    }
}

impl serde::Serialize for StorePath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for StorePath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        StorePath::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-hello-2.12.1";

    #[test]
    fn parses_and_prints() {
        let p = StorePath::parse(P).unwrap();
        assert_eq!(p.hash_part(), "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz");
        assert_eq!(p.name(), "hello-2.12.1");
        assert_eq!(p.to_string(), P);
        assert_eq!(StorePath::from_base_name(&p.base_name()).unwrap(), p);
        assert!(!p.is_derivation());
    }

    #[test]
    fn rejects_what_nix_rejects() {
        use StorePathError::*;
        let h = "7h7qgvs4kgzsn8a6rb273saxyqh4jxlz";
        let bad = |s: &str| StorePath::parse(s).unwrap_err();
        assert!(matches!(bad("/tmp/x"), NotInStore(_)));
        assert!(matches!(bad("/nix/storex/abc"), NotInStore(_)));
        assert!(matches!(bad("/nix/store/short-x"), BadHash(_)));
        // 'e' is not in the alphabet.
        assert!(matches!(bad(&format!("/nix/store/e{}-x", &h[1..])), BadHash(_)));
        assert!(matches!(bad(&format!("/nix/store/{h}-")), EmptyName(_)));
        assert!(matches!(bad(&format!("/nix/store/{h}-..")), DotName(_)));
        assert!(StorePath::parse(&format!("/nix/store/{h}-.hidden")).is_ok(), "Nix 2.8 makes these");
        assert!(matches!(bad(&format!("/nix/store/{h}-a/b")), BadNameChar { ch: '/', .. }));
        assert!(matches!(bad(&format!("/nix/store/{h}-a b")), BadNameChar { ch: ' ', .. }));
        assert!(matches!(bad(&format!("/nix/store/{h}-{}", "a".repeat(212))), NameTooLong(_)));
        assert!(StorePath::parse(&format!("/nix/store/{h}-{}", "a".repeat(211))).is_ok());
        assert!(StorePath::parse(&format!("/nix/store/{h}-a+b-c.d_e?f=g")).is_ok());
    }
}
