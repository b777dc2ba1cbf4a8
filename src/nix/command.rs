//! Running the real `nix` commands: every invocation gets the experimental
//! features Kiln relies on, and a failure carries the command line and
//! Nix's own error text (Hydra hides it; we show it).

use std::ffi::OsStr;
use std::process::Stdio;

use thiserror::Error;
use tokio::process::Command;

#[derive(Debug, Error)]
pub enum NixCommandError {
    #[error("cannot run {program}: {source} (is Nix installed and on PATH?)")]
    Spawn { program: String, source: std::io::Error },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed { command: String, status: String, stderr: String },
}

/// A `tokio` command for a Nix program (`nix`, `nix-store`, …) with
/// `nix-command` and `flakes` enabled on top of the caller's `NIX_CONFIG`.
pub fn nix_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    let mut conf = std::env::var("NIX_CONFIG").unwrap_or_default();
    if !conf.is_empty() {
        conf.push('\n');
    }
    conf.push_str("extra-experimental-features = nix-command flakes");
    cmd.env("NIX_CONFIG", conf).stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// Runs a Nix program to completion and returns its stdout.
pub async fn output<I, S>(program: &str, args: I) -> Result<Vec<u8>, NixCommandError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = nix_command(program)
        .args(&args)
        .output()
        .await
        .map_err(|source| NixCommandError::Spawn { program: program.to_string(), source })?;
    if !out.status.success() {
        let command = std::iter::once(program.to_string())
            .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ");
        return Err(NixCommandError::Failed {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out.stdout)
}

/// The version `nix --version` reports, e.g. `2.8.0`.
pub async fn version() -> Result<String, NixCommandError> {
    let out = output("nix", ["--version"]).await?;
    let s = String::from_utf8_lossy(&out);
    Ok(s.split_whitespace().last().unwrap_or("").to_string())
}
