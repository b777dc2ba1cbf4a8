//! Kiln's signing key: loaded from `cache.secret_key_file`, or generated
//! there (with its `.pub` beside it) on first start.

use std::path::{Path, PathBuf};

use super::CacheError;
use crate::nix::signing::SigningKey;

/// Where the public half of a generated key goes: beside the secret.
pub fn public_key_path(secret: &Path) -> PathBuf {
    secret.with_extension("pub")
}

/// Loads the signing key, generating it (and its `.pub`) if absent.
/// Returns the key and whether it was generated now.
pub fn load_or_generate_key(secret: &Path, name: &str) -> Result<(SigningKey, bool), CacheError> {
    if secret.exists() {
        return Ok((SigningKey::load(secret)?, false));
    }
    if let Some(dir) = secret.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| CacheError::Dir { path: dir.display().to_string(), source })?;
        use std::os::unix::fs::PermissionsExt;
        // Only tighten a directory Kiln made for its keys.
        if dir.ends_with("keys") {
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
    }
    let key = SigningKey::generate(name)?;
    let public = public_key_path(secret);
    if public.exists() {
        // A stale public key without its secret would mislead users.
        let _ = std::fs::remove_file(&public);
    }
    key.write_files(secret, &public)?;
    Ok((key, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_loads() {
        let d = tempfile::tempdir().unwrap();
        let sk = d.path().join("keys/cache.sec");
        let (k1, new1) = load_or_generate_key(&sk, "kiln-1").unwrap();
        let (k2, new2) = load_or_generate_key(&sk, "kiln-1").unwrap();
        assert!(new1 && !new2);
        assert_eq!(k1.public(), k2.public());
        let pubtext = std::fs::read_to_string(public_key_path(&sk)).unwrap();
        assert_eq!(pubtext, k1.public().to_string());
    }
}
