//! Nix's signing keys and signatures: ed25519, written `name:base64`.
//! A secret key file holds the 64-byte keypair (seed then public key), a
//! public key the 32-byte key, a signature 64 bytes; the name ties a
//! signature to the key that checks it. Secret keys never implement `Debug`
//! with their bytes, so they cannot end up in a log.

use std::fmt;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer, Verifier};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("key {0:?} is not of the form name:base64")]
    Format(String),
    #[error("key {name:?} has {got} bytes, expected {expected}")]
    Length { name: String, got: usize, expected: usize },
    #[error("key {0:?}: the public half does not match the secret")]
    Mismatch(String),
    #[error("cannot read key file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot write key file {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("refusing to overwrite existing key file {0}")]
    Exists(String),
    #[error("no randomness available: {0}")]
    Random(String),
}

fn split(s: &str) -> Result<(&str, Vec<u8>), KeyError> {
    let s = s.trim();
    let (name, b64) = s.split_once(':').ok_or_else(|| KeyError::Format(redact(s)))?;
    if name.is_empty() {
        return Err(KeyError::Format(redact(s)));
    }
    let bytes = B64.decode(b64).map_err(|_| KeyError::Format(format!("{name}:…")))?;
    Ok((name, bytes))
}

// Error messages must not carry key material.
fn redact(s: &str) -> String {
    match s.split_once(':') {
        Some((n, _)) => format!("{n}:…"),
        None => "…".to_string(),
    }
}

fn fixed<const N: usize>(name: &str, bytes: Vec<u8>) -> Result<[u8; N], KeyError> {
    let got = bytes.len();
    bytes.try_into().map_err(|_| KeyError::Length { name: name.to_string(), got, expected: N })
}

pub struct SigningKey {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}:…)", self.name)
    }
}

impl SigningKey {
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        if name.is_empty() || name.contains(':') {
            return Err(KeyError::Format(name.to_string()));
        }
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(SigningKey { name: name.to_string(), key: ed25519_dalek::SigningKey::from_bytes(&seed) })
    }

    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split(s)?;
        let kp: [u8; 64] = fixed(name, bytes)?;
        let key =
            ed25519_dalek::SigningKey::from_keypair_bytes(&kp).map_err(|_| KeyError::Mismatch(name.to_string()))?;
        Ok(SigningKey { name: name.to_string(), key })
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let s = std::fs::read_to_string(path)
            .map_err(|source| KeyError::Read { path: path.display().to_string(), source })?;
        Self::parse(&s)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The secret in Nix's file format. Handle with care.
    pub fn to_secret_string(&self) -> String {
        format!("{}:{}", self.name, B64.encode(self.key.to_keypair_bytes()))
    }

    pub fn public(&self) -> PublicKey {
        PublicKey { name: self.name.clone(), key: self.key.verifying_key() }
    }

    pub fn sign(&self, msg: &[u8]) -> Signature {
        Signature { name: self.name.clone(), bytes: self.key.sign(msg).to_bytes() }
    }

    /// Writes the pair as `nix-store --generate-binary-cache-key` does (no
    /// trailing newline), the secret with mode 0600. Refuses to overwrite.
    pub fn write_files(&self, secret: &Path, public: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        for p in [secret, public] {
            if p.exists() {
                return Err(KeyError::Exists(p.display().to_string()));
            }
        }
        let werr = |p: &Path| {
            let path = p.display().to_string();
            move |source| KeyError::Write { path, source }
        };
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(secret).map_err(werr(secret))?;
        f.write_all(self.to_secret_string().as_bytes()).map_err(werr(secret))?;
        f.sync_all().map_err(werr(secret))?;
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o644).open(public).map_err(werr(public))?;
        f.write_all(self.public().to_string().as_bytes()).map_err(werr(public))?;
        f.sync_all().map_err(werr(public))?;
        Ok(())
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl PublicKey {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split(s)?;
        let b: [u8; 32] = fixed(name, bytes)?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&b).map_err(|_| KeyError::Format(format!("{name}:…")))?;
        Ok(PublicKey { name: name.to_string(), key })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when `sig` is by this key (same name) and is valid for `msg`.
    pub fn verify(&self, msg: &[u8], sig: &Signature) -> bool {
        sig.name == self.name && self.key.verify(msg, &ed25519_dalek::Signature::from_bytes(&sig.bytes)).is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

#[derive(Clone, PartialEq, Eq)]
pub struct Signature {
    name: String,
    bytes: [u8; 64],
}

impl Signature {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        let (name, bytes) = split(s)?;
        Ok(Signature { name: name.to_string(), bytes: fixed(name, bytes)? })
    }

    pub fn key_name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A pair made by `nix-store --generate-binary-cache-key test-1 sk pk`, and
    // the signature Nix 2.8 put on the narinfo of a store path with it.
    const SK: &str = "test-1:MAxZdsC4GP3hMlciyApmBAOMW9laZpgG3/toQnpWzEYzRQ44r217AAwq/1b6h5HM4HJmC97dPSBOvpzRjf2NhA==";
    const PK: &str = "test-1:M0UOOK9tewAMKv9W+oeRzOByZgve3T0gTr6c0Y39jYQ=";
    const FP: &str = "1;/nix/store/ab3li50xq0nl4q5lxdyinb8w8y13my9s-f;sha256:1xmr8jicvzszfzpz46g37mlpvbzjl2wpwvl2b05psipssyp1sm8h;120;";
    const SIG: &str = "test-1:2zNrXMD9/T/OHTzUQwZb9iu/nPZ6D1ZkA6BgdCcc0vg+UTrxj5uVP5UP4X4h3XP/1NakoFEaY8i5KLqwWrfZCg==";

    #[test]
    fn nix_keys_and_signatures_interoperate() {
        let sk = SigningKey::parse(SK).unwrap();
        assert_eq!(sk.public().to_string(), PK);
        assert_eq!(sk.to_secret_string(), SK);
        let pk = PublicKey::parse(PK).unwrap();
        let sig = Signature::parse(SIG).unwrap();
        assert!(pk.verify(FP.as_bytes(), &sig));
        // ed25519 is deterministic: our signature is Nix's, byte for byte.
        assert_eq!(sk.sign(FP.as_bytes()).to_string(), SIG);
        assert!(!pk.verify(b"1;other", &sig));
        let other = SigningKey::generate("test-1").unwrap();
        assert!(!other.public().verify(FP.as_bytes(), &sig));
        let renamed = Signature::parse(&SIG.replace("test-1", "test-2")).unwrap();
        assert!(!pk.verify(FP.as_bytes(), &renamed));
    }

    #[test]
    fn bad_keys_are_errors_without_secrets_in_them() {
        assert!(matches!(SigningKey::parse("nocolon"), Err(KeyError::Format(_))));
        assert!(matches!(SigningKey::parse(":abc"), Err(KeyError::Format(_))));
        assert!(matches!(PublicKey::parse(SK), Err(KeyError::Length { got: 64, .. })));
        let err = SigningKey::parse("k:!!!notbase64secret").unwrap_err().to_string();
        assert!(!err.contains("notbase64secret"), "{err}");
        // A keypair whose public half is someone else's.
        let a = SigningKey::generate("k").unwrap();
        let b = SigningKey::generate("k").unwrap();
        let mut kp = a.key.to_keypair_bytes();
        kp[32..].copy_from_slice(b.key.verifying_key().as_bytes());
        assert!(matches!(SigningKey::parse(&format!("k:{}", B64.encode(kp))), Err(KeyError::Mismatch(_))));
        assert!(!format!("{a:?}").contains(&a.to_secret_string()[2..]));
    }

    #[test]
    fn key_files_are_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (s, p) = (d.path().join("sk"), d.path().join("pk"));
        let k = SigningKey::generate("cache-1").unwrap();
        k.write_files(&s, &p).unwrap();
        assert_eq!(std::fs::metadata(&s).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(SigningKey::load(&s).unwrap().public(), k.public());
        assert!(matches!(k.write_files(&s, &p), Err(KeyError::Exists(_))));
    }
}
