//! Nix's own formats, implemented natively so Kiln never has to shell out to
//! read or write them: store paths and their hashes, Nix's base32, hashes in
//! every textual form Nix prints, `.drv` files (ATerm), NAR archives
//! (a streaming writer and a push parser that validates with bounded memory),
//! `.narinfo` files and ed25519 signing keys and signatures. The crates.io
//! `nix-compat` is an empty placeholder, so this module is ours; every part
//! is tested against what the real `nix` 2.8 prints (see `tests/nix_golden.rs`).

pub mod base32;
pub mod command;
pub mod compression;
pub mod derivation;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod signing;
pub mod store_path;

pub use derivation::Derivation;
pub use hash::{Hash, HashAlgo};
pub use narinfo::NarInfo;
pub use signing::{PublicKey, Signature, SigningKey};
pub use store_path::{STORE_DIR, StorePath};
