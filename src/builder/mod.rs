//! Builders: the machines of the Nix machines file and Kiln's connections
//! to them. A connection is a `nix-store --serve --write` process, over one
//! multiplexed SSH master per machine (OpenSSH through the `openssh`
//! crate, host keys checked against the machines file) or run locally for
//! `localhost`; `ssh-ng://` machines get the same, with the `nix-store`
//! beside their `nix-daemon` (decision 013). `serve` speaks Nix's serve
//! protocol on it.

pub mod connection;
pub mod machines;
pub mod serve;

/// The system this coordinator builds for itself (`localhost` machines
/// without a systems field).
pub fn local_system() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "x86_64-linux",
        "aarch64" => "aarch64-linux",
        "x86" => "i686-linux",
        _ => "unknown-linux",
    }
}
