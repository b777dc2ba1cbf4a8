//! What Kiln does on a host, over SSH: read which closure its profile
//! points at, switch it (get the closure, set the profile to the exact
//! store path, activate), confirm the switch, run health checks, and roll
//! back to an exact previous path. Every command opens its own SSH
//! connection (host key checked strictly, as for builders): a host that
//! stops accepting connections after a switch must be noticed, and a
//! multiplexed master would hide that.
//!
//! A switch arms a watchdog on the host before activating (deploy-rs's
//! "magic rollback"): unless Kiln confirms within `confirm_timeout_s` of
//! the activation's end, the host itself sets the profile back and
//! activates the previous closure. Kiln and the watchdog decide once, by
//! who creates `<work_dir>/decided` first, so a late confirmation and the
//! watchdog cannot both act. Activation runs detached from the SSH session
//! (its output and exit status go to files in the work directory), so a
//! connection that drops during activation does not stop it halfway.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

use super::spec::{HealthCheck, target_parts};
use crate::builder::connection::{SshFailure, SshLogin, host_key_message, open_ssh};

#[derive(Debug, Error)]
pub enum HostError {
    #[error("cannot reach {host}: {message}")]
    Unreachable { host: String, message: String },
    #[error("{host}: {what} timed out after {secs} s")]
    Timeout { host: String, what: String, secs: u64 },
    #[error("{host}: {what} failed: {message}")]
    Failed { host: String, what: String, message: String },
    #[error("coordinator: {0}")]
    Local(String),
}

/// How Kiln reaches a host: over SSH, or, for the pull agent running on
/// the host itself, here.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    pub host_key: Option<String>,
    pub local: bool,
}

impl Target {
    pub fn new(name: &str, target: &str, host_key: Option<&str>) -> Result<Target, HostError> {
        let (user, host, port) = target_parts(target).map_err(HostError::Local)?;
        Ok(Target { name: name.to_string(), user, host, port, host_key: host_key.map(str::to_string), local: false })
    }

    /// How Kiln reaches a push host as its environment declares it.
    pub fn of(name: &str, h: &super::spec::Host) -> Result<Target, HostError> {
        let target = h.target.as_deref().ok_or_else(|| HostError::Local(format!("{name} is a pull host")))?;
        Target::new(name, target, h.host_key.as_deref())
    }

    /// This machine (the agent's view of its own host).
    pub fn local(name: &str) -> Target {
        Target { name: name.to_string(), user: None, host: String::new(), port: None, host_key: None, local: true }
    }
}

/// SSH settings shared by every host.
#[derive(Debug, Clone)]
pub struct Ssh {
    /// Control sockets and pinned known_hosts files.
    pub dir: PathBuf,
    pub key: Option<PathBuf>,
    pub connect_timeout: Duration,
}

/// A remote command's result.
#[derive(Debug)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
    /// Both streams, for a log.
    pub fn text(&self) -> String {
        let mut s = self.stdout.clone();
        if !self.stderr.is_empty() {
            if !s.is_empty() && !s.ends_with('\n') {
                s.push('\n');
            }
            s.push_str(&self.stderr);
        }
        s
    }
}

/// One health check's outcome, as stored and shown.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct CheckResult {
    pub command: String,
    pub ok: bool,
    pub output: String,
}

/// A shell word for `s`, single-quoted.
pub fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Output kept per command (the tail).
const KEEP: usize = 64 * 1024;

fn tail(mut s: String) -> String {
    if s.len() > KEEP {
        let mut cut = s.len() - KEEP;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        s = format!("[… {cut} bytes cut …]\n{}", &s[cut..]);
    }
    s
}

impl Ssh {
    async fn open(&self, t: &Target) -> Result<openssh::Session, HostError> {
        let login = SshLogin {
            user: t.user.as_deref(),
            host: &t.host,
            port: t.port,
            key_file: self.key.as_deref(),
            pinned_host_key: t.host_key.as_deref(),
        };
        let unreachable = |message: String| HostError::Unreachable { host: t.name.clone(), message };
        open_ssh(&self.dir, &login, self.connect_timeout, |b| {
            b.server_alive_interval(Duration::from_secs(5));
        })
        .await
        .map_err(|e| match e {
            SshFailure::Timeout => {
                unreachable(format!("connecting timed out after {} s", self.connect_timeout.as_secs()))
            }
            SshFailure::HostKey { got } => unreachable(host_key_message(
                got.as_deref(),
                if t.host_key.is_some() { "the environment's host_key" } else { "in known_hosts" },
            )),
            SshFailure::Failed(message) => unreachable(message),
        })
    }

    /// Runs `script` with `sh` on the host over a new connection (or here,
    /// for a local target).
    pub async fn sh(&self, t: &Target, what: &str, script: &str, timeout: Duration) -> Result<Output, HostError> {
        if t.local {
            return local_sh(t, what, script, timeout).await;
        }
        let session = self.open(t).await?;
        let run = async {
            let mut cmd = session.command("sh");
            cmd.arg("-c").arg(script);
            cmd.output().await
        };
        let r = tokio::time::timeout(timeout, run).await;
        let _ = session.close().await;
        match r {
            Err(_) => Err(HostError::Timeout { host: t.name.clone(), what: what.into(), secs: timeout.as_secs() }),
            Ok(Err(e)) => Err(HostError::Unreachable { host: t.name.clone(), message: e.to_string() }),
            Ok(Ok(o)) => {
                let out = Output {
                    code: o.status.code(),
                    stdout: tail(String::from_utf8_lossy(&o.stdout).into_owned()),
                    stderr: tail(String::from_utf8_lossy(&o.stderr).into_owned()),
                };
                // ssh's own failure (the connection, not the command).
                if out.code == Some(255) && out.stdout.is_empty() {
                    return Err(HostError::Unreachable {
                        host: t.name.clone(),
                        message: out.stderr.trim().to_string(),
                    });
                }
                Ok(out)
            }
        }
    }

    /// The store path `profile` points at now (`None`: no profile yet).
    pub async fn current(&self, t: &Target, profile: &str) -> Result<Option<String>, HostError> {
        let script = format!("if [ -e {p} ]; then readlink -f {p}; fi", p = q(profile));
        let o = self.sh(t, "reading the profile", &script, Duration::from_secs(60)).await?;
        if !o.ok() {
            return Err(failed(t, "reading the profile", &o));
        }
        let p = o.stdout.trim();
        Ok((!p.is_empty()).then(|| p.to_string()))
    }

    /// Ends an earlier switch's watchdog (after a restart of Kiln) so it
    /// cannot act later; says whether it had already rolled back.
    pub async fn disarm(&self, t: &Target, work_dir: &str) -> Result<bool, HostError> {
        let script = format!(
            "D={d}; if mkdir \"$D/decided\" 2>/dev/null; then echo disarmed > \"$D/decision\"; \
             else while [ \"$(cat \"$D/decision\" 2>/dev/null)\" = watchdog ] && [ ! -e \"$D/watchdog.rc\" ]; do sleep 0.2; done; fi; \
             cat \"$D/decision\" 2>/dev/null || true",
            d = q(work_dir)
        );
        let o = self.sh(t, "ending an earlier watchdog", &script, Duration::from_secs(120)).await?;
        Ok(o.stdout.trim() == "watchdog")
    }

    /// Sets the profile to `path` and starts its activation (with the
    /// watchdog armed when there is a previous closure), without waiting.
    #[allow(clippy::too_many_arguments)] // each is one fact of the switch
    pub async fn start_switch(
        &self,
        t: &Target,
        path: &str,
        previous: Option<&str>,
        profile: &str,
        activate: &str,
        work_dir: &str,
        confirm_timeout_s: u64,
        activate_timeout_s: u64,
        substituter: Option<(&str, &str)>,
    ) -> Result<Output, HostError> {
        let fetch = match substituter {
            Some((url, key)) => format!(
                "nix-store --realise \"$P\" --option extra-substituters {} --option extra-trusted-public-keys {}",
                q(url),
                q(key)
            ),
            None => "nix-store --realise \"$P\"".to_string(),
        };
        let watchdog = match previous {
            Some(prev) => format!(
                "setsid sh -c {} kiln-watchdog \"$D\" {} \"$PROFILE\" \"$ACT\" {} {} </dev/null >/dev/null 2>&1 &",
                q(WATCHDOG),
                q(prev),
                confirm_timeout_s,
                activate_timeout_s + confirm_timeout_s
            ),
            None => String::new(),
        };
        let script = format!(
            "set -u\nP={p}; PROFILE={profile}; D={d}; ACT={act}\n\
             mkdir -p \"$D\" || exit 1\n\
             if ! nix-store --check-validity \"$P\" 2>/dev/null; then\n\
               echo \"kiln: fetching $P\"\n  {fetch} >/dev/null || {{ echo \"kiln: this host cannot get $P\" >&2; exit 1; }}\nfi\n\
             mkdir -p \"$(dirname \"$PROFILE\")\" && nix-env -p \"$PROFILE\" --set \"$P\" || exit 1\n\
             {watchdog}\n\
             setsid sh -c {activation} kiln-activate \"$D\" \"$P\" \"$PROFILE\" \"$ACT\" </dev/null >/dev/null 2>&1 &\n\
             echo \"kiln: $PROFILE -> $P, activating\"\n",
            p = q(path),
            profile = q(profile),
            d = q(work_dir),
            act = q(activate),
            activation = q(ACTIVATION),
        );
        let o = self.sh(t, "switching", &script, Duration::from_secs(activate_timeout_s.max(60))).await?;
        if !o.ok() {
            return Err(failed(t, "switching", &o));
        }
        Ok(o)
    }

    /// Waits for the activation started by [`Ssh::start_switch`] to end;
    /// returns its exit status and output.
    pub async fn wait_activation(&self, t: &Target, work_dir: &str, timeout: Duration) -> Result<Output, HostError> {
        let script = format!(
            "D={d}; while [ ! -e \"$D/activate.rc\" ]; do sleep 0.2; done; cat \"$D/activate.log\"; exit \"$(cat \"$D/activate.rc\")\"",
            d = q(work_dir)
        );
        self.sh(t, "activation", &script, timeout).await
    }

    /// Confirms the switch, over a new connection: true when this ended the
    /// watchdog, false when the watchdog had already decided to roll back.
    pub async fn confirm(&self, t: &Target, work_dir: &str) -> Result<bool, HostError> {
        let script = format!(
            "D={d}; if mkdir \"$D/decided\" 2>/dev/null; then echo kiln > \"$D/decision\"; echo confirmed; \
             else cat \"$D/decision\"; fi",
            d = q(work_dir)
        );
        let o = self.sh(t, "confirming", &script, Duration::from_secs(30)).await?;
        Ok(o.stdout.trim() == "confirmed")
    }

    /// What the watchdog did, once it has decided and finished (waiting up
    /// to `timeout` for that): its rollback's output when it rolled back,
    /// `None` when Kiln's confirmation came first.
    pub async fn watchdog_outcome(
        &self,
        t: &Target,
        work_dir: &str,
        timeout: Duration,
    ) -> Result<Option<Output>, HostError> {
        let script = format!(
            "D={d}; while [ ! -s \"$D/decision\" ]; do sleep 0.2; done; \
             [ \"$(cat \"$D/decision\")\" = watchdog ] || exit 3; \
             while [ ! -e \"$D/watchdog.rc\" ]; do sleep 0.2; done; cat \"$D/rollback.log\"; exit \"$(cat \"$D/watchdog.rc\")\"",
            d = q(work_dir)
        );
        let o = self.sh(t, "reading the watchdog", &script, timeout).await?;
        Ok((o.code != Some(3)).then_some(o))
    }

    /// Runs one health check with its timeout (enforced on the host, and
    /// here should the host not answer).
    pub async fn check(&self, t: &Target, c: &HealthCheck, path: &str, profile: &str) -> CheckResult {
        let script = format!(
            "export KILN_PATH={p} KILN_PROFILE={profile}; exec timeout {s} sh -c {cmd} 2>&1",
            p = q(path),
            profile = q(profile),
            s = c.timeout_s,
            cmd = q(&c.command)
        );
        let r = self.sh(t, "health check", &script, Duration::from_secs(c.timeout_s + 30)).await;
        let (ok, output) = match r {
            Ok(o) if o.ok() => (true, o.text()),
            Ok(o) if o.code == Some(124) => (false, format!("{}\n[timed out after {} s]", o.text(), c.timeout_s)),
            Ok(o) => {
                (false, format!("{}\n[exit status {}]", o.text(), o.code.map_or("none".into(), |c| c.to_string())))
            }
            Err(e) => (false, e.to_string()),
        };
        CheckResult { command: c.command.clone(), ok, output }
    }

    /// Sets the profile back to `previous` and activates it.
    pub async fn roll_back(
        &self,
        t: &Target,
        previous: &str,
        profile: &str,
        activate: &str,
        timeout: Duration,
    ) -> Result<Output, HostError> {
        let script = format!(
            "set -u; export KILN_PATH={p} KILN_PROFILE={profile}; nix-env -p \"$KILN_PROFILE\" --set \"$KILN_PATH\" && \
             echo \"kiln: $KILN_PROFILE -> $KILN_PATH (rollback), activating\" && eval {act} 2>&1",
            p = q(previous),
            profile = q(profile),
            act = q(activate)
        );
        let o = self.sh(t, "rollback", &script, timeout).await?;
        if !o.ok() {
            return Err(failed(t, "rollback", &o));
        }
        Ok(o)
    }
}

/// The agent's commands: the same scripts, run here. The detached parts
/// (activation, watchdog) start their own sessions, so they outlive this
/// process as they outlive an SSH connection.
async fn local_sh(t: &Target, what: &str, script: &str, timeout: Duration) -> Result<Output, HostError> {
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c").arg(script).stdin(std::process::Stdio::null()).kill_on_drop(true);
    match tokio::time::timeout(timeout, cmd.output()).await {
        Err(_) => Err(HostError::Timeout { host: t.name.clone(), what: what.into(), secs: timeout.as_secs() }),
        Ok(Err(e)) => Err(HostError::Local(format!("cannot run sh: {e}"))),
        Ok(Ok(o)) => Ok(Output {
            code: o.status.code(),
            stdout: tail(String::from_utf8_lossy(&o.stdout).into_owned()),
            stderr: tail(String::from_utf8_lossy(&o.stderr).into_owned()),
        }),
    }
}

fn failed(t: &Target, what: &str, o: &Output) -> HostError {
    HostError::Failed {
        host: t.name.clone(),
        what: what.into(),
        message: format!("exit status {}: {}", o.code.map_or("none".into(), |c| c.to_string()), o.text().trim()),
    }
}

/// Runs the activation command detached: `$1` work dir, `$2` closure, `$3`
/// profile, `$4` command.
const ACTIVATION: &str = r#"export KILN_PATH="$2" KILN_PROFILE="$3"; eval "$4" >"$1/activate.log" 2>&1; echo $? >"$1/activate.rc.tmp"; mv "$1/activate.rc.tmp" "$1/activate.rc""#;

/// The watchdog: `$1` work dir, `$2` previous closure, `$3` profile, `$4`
/// activation command, `$5` seconds to wait for a confirmation after the
/// activation ends, `$6` the longest it waits for the activation.
const WATCHDOG: &str = r#"D="$1"; i=0
while [ ! -e "$D/activate.rc" ] && [ "$i" -lt "$6" ]; do sleep 1; i=$((i+1)); done
i=0
while [ "$i" -lt "$5" ]; do [ -e "$D/decided" ] && exit 0; sleep 1; i=$((i+1)); done
mkdir "$D/decided" 2>/dev/null || exit 0
echo watchdog > "$D/decision"
export KILN_PATH="$2" KILN_PROFILE="$3"
{ nix-env -p "$3" --set "$2" && eval "$4"; } >"$D/rollback.log" 2>&1
echo $? > "$D/watchdog.rc""#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_the_shell() {
        for s in ["plain", "it's", "a b", "$HOME", "'", "x\"y", "a\nb"] {
            let out = std::process::Command::new("sh").arg("-c").arg(format!("printf %s {}", q(s))).output().unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap(), s);
        }
    }

    #[test]
    fn long_output_keeps_its_tail() {
        let s = "é".repeat(KEEP);
        let t = tail(s.clone());
        assert!(t.len() < s.len() && t.ends_with('é') && t.starts_with("[…"));
        assert_eq!(tail("short".into()), "short");
    }
}
