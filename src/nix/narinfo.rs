//! `.narinfo`: the text file a binary cache serves for each store path,
//! naming its NAR, hashes, references and signatures. Rendering follows
//! Nix 2.8's field order exactly, so a narinfo Nix wrote parses and prints
//! back byte for byte; signatures are over Nix's fingerprint
//! `1;<path>;<narHash>;<narSize>;<ref>,<ref>…`.

use std::fmt::Write as _;

use thiserror::Error;

use super::hash::{Hash, HashAlgo, HashError};
use super::signing::{KeyError, PublicKey, Signature, SigningKey};
use super::store_path::{StorePath, StorePathError};

#[derive(Debug, Error)]
pub enum NarInfoError {
    #[error("narinfo is missing the {0} field")]
    Missing(&'static str),
    #[error("narinfo line {line} is malformed: {text:?}")]
    BadLine { line: usize, text: String },
    #[error("narinfo field {field} is invalid: {reason}")]
    BadField { field: &'static str, reason: String },
    #[error("narinfo has a bad store path: {0}")]
    Path(#[from] StorePathError),
    #[error("narinfo has a bad hash: {0}")]
    Hash(#[from] HashError),
    #[error("narinfo has a bad signature: {0}")]
    Sig(#[from] KeyError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    pub url: String,
    pub compression: String,
    pub file_hash: Option<Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: Hash,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    pub sigs: Vec<Signature>,
    pub ca: Option<String>,
}

impl NarInfo {
    pub fn parse(text: &str) -> Result<Self, NarInfoError> {
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = Vec::new();
        let mut deriver = None;
        let mut system = None;
        let mut sigs = Vec::new();
        let mut ca = None;
        let num = |field: &'static str, v: &str| {
            v.parse::<u64>().map_err(|e| NarInfoError::BadField { field, reason: e.to_string() })
        };
        for (i, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let (k, v) = line
                .split_once(": ")
                .or_else(|| line.strip_suffix(':').map(|k| (k, "")))
                .ok_or_else(|| NarInfoError::BadLine { line: i + 1, text: line.chars().take(80).collect() })?;
            match k {
                "StorePath" => store_path = Some(StorePath::parse(v)?),
                "URL" => url = Some(v.to_string()),
                "Compression" => compression = Some(v.to_string()),
                "FileHash" => file_hash = Some(Hash::parse(v)?),
                "FileSize" => file_size = Some(num("FileSize", v)?),
                "NarHash" => nar_hash = Some(Hash::parse(v)?),
                "NarSize" => nar_size = Some(num("NarSize", v)?),
                "References" => {
                    references = v
                        .split(' ')
                        .filter(|s| !s.is_empty())
                        .map(StorePath::from_base_name)
                        .collect::<Result<_, _>>()?
                }
                "Deriver" if v != "unknown-deriver" => deriver = Some(StorePath::from_base_name(v)?),
                "System" => system = Some(v.to_string()),
                "Sig" => sigs.push(Signature::parse(v)?),
                "CA" => ca = Some(v.to_string()),
                // Nix ignores fields it does not know; so do we.
                _ => {}
            }
        }
        let url = url.filter(|u| !u.is_empty()).ok_or(NarInfoError::Missing("URL"))?;
        let nar_hash: Hash = nar_hash.ok_or(NarInfoError::Missing("NarHash"))?;
        if nar_hash.algo() != HashAlgo::Sha256 {
            return Err(NarInfoError::BadField { field: "NarHash", reason: "must be sha256".into() });
        }
        let nar_size = nar_size.ok_or(NarInfoError::Missing("NarSize"))?;
        if nar_size == 0 {
            return Err(NarInfoError::BadField { field: "NarSize", reason: "must not be 0".into() });
        }
        Ok(NarInfo {
            store_path: store_path.ok_or(NarInfoError::Missing("StorePath"))?,
            url,
            // Nix's default when the field is absent.
            compression: compression.unwrap_or_else(|| "bzip2".to_string()),
            file_hash,
            file_size,
            nar_hash,
            nar_size,
            references,
            deriver,
            system,
            sigs,
            ca,
        })
    }

    pub fn render(&self) -> String {
        let mut s = String::with_capacity(512);
        let _ = writeln!(s, "StorePath: {}", self.store_path);
        let _ = writeln!(s, "URL: {}", self.url);
        let _ = writeln!(s, "Compression: {}", self.compression);
        if let Some(h) = &self.file_hash {
            let _ = writeln!(s, "FileHash: {h}");
        }
        if let Some(n) = self.file_size {
            let _ = writeln!(s, "FileSize: {n}");
        }
        let _ = writeln!(s, "NarHash: {}", self.nar_hash);
        let _ = writeln!(s, "NarSize: {}", self.nar_size);
        let refs: Vec<String> = self.references.iter().map(|r| r.base_name()).collect();
        let _ = writeln!(s, "References: {}", refs.join(" "));
        if let Some(d) = &self.deriver {
            let _ = writeln!(s, "Deriver: {}", d.base_name());
        }
        if let Some(sys) = &self.system {
            let _ = writeln!(s, "System: {sys}");
        }
        for sig in &self.sigs {
            let _ = writeln!(s, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(s, "CA: {ca}");
        }
        s
    }

    /// What Nix signs: `1;<path>;<narHash base32>;<narSize>;<sorted refs>`.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.store_path, &self.nar_hash, self.nar_size, &self.references)
    }

    /// Adds this key's signature, replacing an older one by the same key.
    pub fn sign(&mut self, key: &SigningKey) {
        let sig = key.sign(self.fingerprint().as_bytes());
        self.sigs.retain(|s| s.key_name() != key.name());
        self.sigs.push(sig);
    }

    /// True when one of the signatures is valid under one of `keys`.
    pub fn verify(&self, keys: &[PublicKey]) -> bool {
        let fp = self.fingerprint();
        self.sigs.iter().any(|sig| keys.iter().any(|k| k.verify(fp.as_bytes(), sig)))
    }
}

pub fn fingerprint(path: &StorePath, nar_hash: &Hash, nar_size: u64, refs: &[StorePath]) -> String {
    let mut refs: Vec<String> = refs.iter().map(|r| r.to_string()).collect();
    refs.sort();
    format!("1;{path};{nar_hash};{nar_size};{}", refs.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written by `nix copy --to file://…` (Nix 2.8), with a signature.
    const SIGNED: &str = "StorePath: /nix/store/ab3li50xq0nl4q5lxdyinb8w8y13my9s-f
URL: nar/09kxyd68d2nylk7ims23pj3i09s4nnv9p3dv6iij1q9canv42w6d.nar.xz
Compression: xz
FileHash: sha256:09kxyd68d2nylk7ims23pj3i09s4nnv9p3dv6iij1q9canv42w6d
FileSize: 124
NarHash: sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h
NarSize: 120
References: 
Sig: test-1:2zNrXMD9/T/OHTzUQwZb9iu/nPZ6D1ZkA6BgdCcc0vg+UTrxj5uVP5UP4X4h3XP/1NakoFEaY8i5KLqwWrfZCg==
CA: fixed:r:sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h
";

    #[test]
    fn roundtrips_and_verifies() {
        let n = NarInfo::parse(SIGNED).unwrap();
        assert_eq!(n.render(), SIGNED);
        assert!(n.references.is_empty());
        let pk = PublicKey::parse("test-1:M0UOOK9tewAMKv9W+oeRzOByZgve3T0gTr6c0Y39jYQ=").unwrap();
        assert!(n.verify(std::slice::from_ref(&pk)));
        let mut tampered = n.clone();
        tampered.nar_size += 1;
        assert!(!tampered.verify(&[pk]));
    }

    #[test]
    fn signing_replaces_own_signature_only() {
        let mut n = NarInfo::parse(SIGNED).unwrap();
        let k = SigningKey::generate("kiln-1").unwrap();
        n.sign(&k);
        n.sign(&k);
        assert_eq!(n.sigs.len(), 2);
        assert!(n.verify(&[k.public()]));
        assert!(NarInfo::parse(&n.render()).unwrap().verify(&[k.public()]));
    }

    #[test]
    fn malformed_narinfo_is_an_error() {
        let drop = |field: &str| SIGNED.lines().filter(|l| !l.starts_with(field)).collect::<Vec<_>>().join("\n");
        assert!(matches!(NarInfo::parse(&drop("StorePath")), Err(NarInfoError::Missing("StorePath"))));
        assert!(matches!(NarInfo::parse(&drop("NarHash")), Err(NarInfoError::Missing("NarHash"))));
        assert!(matches!(NarInfo::parse(&drop("URL")), Err(NarInfoError::Missing("URL"))));
        assert!(matches!(NarInfo::parse(&drop("NarSize")), Err(NarInfoError::Missing("NarSize"))));
        let bad_hash = SIGNED.replace("NarHash: sha256:1x", "NarHash: sha256:ex");
        assert!(matches!(NarInfo::parse(&bad_hash), Err(NarInfoError::Hash(_))));
        let bad_size = SIGNED.replace("NarSize: 120", "NarSize: -1");
        assert!(matches!(NarInfo::parse(&bad_size), Err(NarInfoError::BadField { field: "NarSize", .. })));
        assert!(matches!(NarInfo::parse("garbage line"), Err(NarInfoError::BadLine { line: 1, .. })));
        let bad_ref = SIGNED.replace("References: ", "References: ../../etc/passwd");
        assert!(matches!(NarInfo::parse(&bad_ref), Err(NarInfoError::Path(_))));
    }
}
