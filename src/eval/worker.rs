//! One evaluator worker process: the real `nix eval` running an expression
//! from `eval::expr`, with a hard memory limit (`RLIMIT_AS`: allocation
//! fails and Nix stops with "out of memory"), its job lines read from stderr
//! as they are traced, and Nix's own error text kept for the job it belongs
//! to.

use std::process::Stdio;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::nix::command::nix_command;

/// What a worker reports for one job, as traced by `expr::prelude`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct RawJob {
    pub attr_path: Vec<String>,
    pub drv_path: Option<String>,
    pub name: Option<String>,
    pub system: Option<String>,
    pub outputs: Option<std::collections::BTreeMap<String, String>>,
    pub meta: Option<serde_json::Map<String, serde_json::Value>>,
    pub constituents: Option<Vec<String>>,
    pub named_constituents: Option<Vec<String>>,
    /// A catchable error (throw, assert): the job must be evaluated alone
    /// without `tryEval` to learn the message.
    #[serde(default)]
    pub error: bool,
    /// Set by us when the traced line was not valid UTF-8.
    #[serde(skip)]
    pub bad_utf8: bool,
    /// Set by us from the line's group root: a store file that references
    /// this job's derivation (see [`crate::gcroots`]).
    #[serde(skip)]
    pub gc_root: Option<String>,
}

/// A traced line when the expression roots its groups.
#[derive(Deserialize)]
struct Group {
    jobs: Vec<RawJob>,
    root: Option<String>,
}

/// A line a worker traced: a job, or the name a classification started on.
#[derive(Debug)]
// Passed by value once per job: a box would be one more allocation each.
#[allow(clippy::large_enum_variant)]
pub enum Traced {
    Job(RawJob),
    Name(String),
}

#[derive(Debug, Clone)]
pub struct Failure {
    /// Nix's error, from its first `error:` line on.
    pub message: String,
    pub out_of_memory: bool,
}

pub struct Limits {
    pub max_memory_mib: u64,
}

/// Runs `nix eval --json --expr EXPR` in pure mode; calls `on_trace` for
/// every line starting with `trace: <nonce>`; returns stdout on success.
pub async fn run(
    expr: &str,
    nonce: &str,
    limits: &Limits,
    mut on_trace: impl FnMut(Traced),
) -> Result<Vec<u8>, Failure> {
    let mut cmd = nix_command("nix");
    cmd.args(["eval", "--json", "--option", "pure-eval", "true", "--expr", expr])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let limit = limits.max_memory_mib.saturating_mul(1024 * 1024);
    if limit > 0 {
        // SAFETY: setrlimit is async-signal-safe and touches only this
        // (forked, not yet exec'd) process.
        unsafe {
            cmd.pre_exec(move || {
                let rl = libc::rlimit { rlim_cur: limit as libc::rlim_t, rlim_max: limit as libc::rlim_t };
                if libc::setrlimit(libc::RLIMIT_AS, &rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    // Stopped by the guard below instead: SIGKILL would leave the builders
    // of import-from-derivation running.
    cmd.kill_on_drop(false);
    let mut child = cmd.spawn().map_err(|e| Failure {
        message: format!("cannot run nix: {e} (is Nix installed and on PATH?)"),
        out_of_memory: false,
    })?;
    let mut guard = StopOnDrop(child.id());
    let started = std::time::Instant::now();
    let mut stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let out_task = tokio::spawn(async move {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v).await;
        v
    });
    let prefix = format!("trace: {nonce}");
    let mut other = Tail::default();
    let mut lines = BufReader::with_capacity(1 << 20, stderr).split(b'\n');
    while let Ok(Some(line)) = lines.next_segment().await {
        match line.strip_prefix(prefix.as_bytes()) {
            Some(json) => {
                let (text, bad_utf8) = match std::str::from_utf8(json) {
                    Ok(s) => (std::borrow::Cow::Borrowed(s), false),
                    Err(_) => (String::from_utf8_lossy(json), true),
                };
                let group = if text.starts_with('[') {
                    serde_json::from_str::<Vec<RawJob>>(&text).ok().map(|jobs| Group { jobs, root: None })
                } else {
                    serde_json::from_str::<Group>(&text).ok()
                };
                if let Some(Group { jobs, root }) = group {
                    for mut job in jobs {
                        // Only the names that lost bytes are at fault.
                        job.bad_utf8 = bad_utf8 && job.attr_path.iter().any(|c| c.contains('\u{fffd}'));
                        job.gc_root = root.clone();
                        on_trace(Traced::Job(job));
                    }
                } else if let Ok(n) = serde_json::from_str::<NameLine>(&text) {
                    on_trace(Traced::Name(n.name));
                }
            }
            None => other.push(&line),
        }
    }
    let status =
        child.wait().await.map_err(|e| Failure { message: format!("waiting for nix: {e}"), out_of_memory: false })?;
    guard.0 = None;
    let out = out_task.await.unwrap_or_default();
    tracing::debug!(ms = started.elapsed().as_millis() as u64, ok = status.success(), "nix worker finished");
    if status.success() {
        return Ok(out);
    }
    let text = other.text();
    let out_of_memory = text.contains("out of memory") || text.contains("Out of Memory");
    let mut message = error_message(&text);
    if message.is_empty() {
        use std::os::unix::process::ExitStatusExt;
        message = match status.signal() {
            Some(sig) => format!("nix was killed by signal {sig}"),
            None => format!("nix failed ({status}) without an error message"),
        };
    }
    if out_of_memory {
        message = format!("evaluation exceeded the memory limit of {} MiB: {message}", limits.max_memory_mib);
    }
    Err(Failure { message, out_of_memory })
}

/// Stops a worker that is abandoned (evaluation timed out or cancelled):
/// SIGINT lets Nix stop its builders and clean up; SIGKILL follows if it
/// has not exited within a few seconds.
struct StopOnDrop(Option<u32>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let Some(pid) = self.0 else { return };
        let pid = pid as libc::pid_t;
        // SAFETY: plain signal sends to our own child.
        unsafe { libc::kill(pid, libc::SIGINT) };
        std::thread::spawn(move || {
            for _ in 0..50 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                let mut status = 0;
                // Reaps it if it exited; non-zero means it is gone.
                if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } != 0 {
                    return;
                }
            }
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let mut status = 0;
            unsafe { libc::waitpid(pid, &mut status, 0) };
        });
    }
}

#[derive(Deserialize)]
struct NameLine {
    name: String,
}

/// The last 64 KiB of a process's other stderr lines.
#[derive(Default)]
struct Tail {
    buf: std::collections::VecDeque<String>,
    bytes: usize,
}

impl Tail {
    const MAX: usize = 64 * 1024;
    fn push(&mut self, line: &[u8]) {
        let s = String::from_utf8_lossy(line).into_owned();
        self.bytes += s.len() + 1;
        self.buf.push_back(s);
        while self.bytes > Self::MAX && self.buf.len() > 1 {
            let old = self.buf.pop_front().expect("non-empty");
            self.bytes -= old.len() + 1;
        }
    }
    fn text(&self) -> String {
        self.buf.iter().map(String::as_str).collect::<Vec<_>>().join("\n")
    }
}

/// Nix's error text without colour codes and the `--show-trace` hint,
/// starting at its first `error:` line (warnings before it are noise).
pub fn error_message(stderr: &str) -> String {
    let clean = strip_ansi(stderr);
    let start = clean.find("error:").unwrap_or(0);
    clean[start..]
        .lines()
        .filter(|l| !l.contains("use '--show-trace' to show detailed location information"))
        .filter(|l| !l.starts_with("GC Warning:"))
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_string()
}

pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_is_nix_own_text() {
        let s = "warning: Git tree is dirty\n\u{1b}[31;1merror:\u{1b}[0m attribute 'x' missing\n\n       at flake.nix:1:1\n(use '--show-trace' to show detailed location information)\n";
        assert_eq!(error_message(s), "error: attribute 'x' missing\n\n       at flake.nix:1:1");
    }
}
