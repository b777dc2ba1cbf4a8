//! Opening a serve connection to a machine: `nix-store --serve --write`
//! (or the machine's `remote-program`, with `--store` for its
//! `remote-store`; for `ssh-ng://` machines the `nix-store` beside their
//! `nix-daemon`), over the machine's multiplexed SSH master (its key, its
//! pinned host key, compression as the machines file says), or as a local
//! process for `localhost`. The process's stderr carries the build log; a
//! reader task forwards it to whichever step is building on the connection,
//! and on request hands over everything the pipe holds at that moment and
//! detaches the log ([`Connection::end_log`]).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use super::machines::{Machine, Scheme, Transport};
use super::serve::{ServeConn, ServeError};

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("cannot connect to {machine}: {message}")]
    Ssh { machine: String, message: String },
    #[error("cannot start {program} on {machine}: {message}")]
    Spawn { machine: String, program: String, message: String },
    #[error("{machine}: {source}{hint}")]
    Handshake { machine: String, source: ServeError, hint: String },
    /// The remote program printed an error instead of answering.
    #[error("{machine}: `{command}` failed: {said}{hint}")]
    Remote { machine: String, command: String, said: String, hint: String },
    #[error("{machine}: connecting timed out after {secs} s")]
    Timeout { machine: String, secs: u64 },
}

pub type Reader = Box<dyn AsyncRead + Send + Sync + Unpin>;
pub type Writer = Box<dyn AsyncWrite + Send + Sync + Unpin>;

/// Where the build log of the connection's current step goes.
type LogTarget = Arc<Mutex<Option<crate::logs::Sink>>>;

enum Proc {
    /// Taken when the connection goes (see its `Drop`).
    Local(Option<tokio::process::Child>),
    Remote(#[allow(dead_code)] openssh::Child<Arc<openssh::Session>>),
}

/// A live serve connection.
pub struct Connection {
    pub serve: ServeConn<Reader, Writer>,
    log: LogTarget,
    /// Asks the stderr reader to end the log: forward what the pipe holds
    /// now, then detach it.
    end_log: mpsc::UnboundedSender<oneshot::Sender<()>>,
    /// The last stderr output, for errors that come with no reply.
    tail: Arc<Mutex<Vec<u8>>>,
    _proc: Proc,
}

impl Connection {
    /// Sends the connection's stderr (the build log) to `sink` until
    /// [`Connection::end_log`].
    pub fn log_to(&self, sink: crate::logs::Sink) {
        *self.log.lock().expect("log target") = Some(sink);
    }

    /// Ends the current log: forwards everything the stderr pipe holds
    /// now, then detaches the log. Called after a round trip that followed
    /// the build's result, by which time `nix-store` had written all of the
    /// build's log to its stderr; what the pipe held before this call is
    /// thereby in the log (decision 017 says how far that reaches over SSH).
    pub async fn end_log(&self) {
        let (ack, done) = oneshot::channel();
        // A reader that has ended (end of file) forwarded all there was.
        if self.end_log.send(ack).is_ok() {
            let _ = done.await;
        }
        *self.log.lock().expect("log target") = None;
    }

    /// What the remote printed last on stderr.
    pub fn stderr_tail(&self) -> String {
        String::from_utf8_lossy(&self.tail.lock().expect("tail")).into_owned()
    }
}

/// A connection that goes (a cancelled step, a timeout, an error) ends
/// its `nix-store`. A local one gets SIGTERM, on which Nix stops the build
/// it runs and kills the builder's processes; SIGKILL would leave the
/// builder, which Nix puts in a session of its own, running (it did, when
/// the process was also killed on drop: a cancelled build's builder went
/// on and wrote the output under the next attempt's). Only a `nix-store`
/// still there after [`LOCAL_STOP_GRACE`] is killed. A remote one ends
/// when its SSH channel closes. Both are tested by cancelling a build.
impl Drop for Connection {
    fn drop(&mut self) {
        let Proc::Local(c) = &mut self._proc else { return };
        let Some(mut child) = c.take() else { return };
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) has no memory effects; the child is ours and
            // not yet reaped.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if tokio::time::timeout(LOCAL_STOP_GRACE, child.wait()).await.is_err() {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
            });
        }
    }
}

/// How long a local `nix-store` has to stop its build after SIGTERM.
const LOCAL_STOP_GRACE: Duration = Duration::from_secs(10);

/// A machine's SSH master, if open. Each machine has its own lock, so
/// connecting to a dead machine (up to the connect timeout) holds up
/// nobody but the steps bound for that machine.
type Slot = Arc<tokio::sync::Mutex<Master>>;

#[derive(Default)]
enum Master {
    #[default]
    None,
    Open(Arc<openssh::Session>),
    /// The last attempt failed: those that waited for it fail with it
    /// rather than wait the connect timeout again each.
    Failed {
        at: std::time::Instant,
        error: String,
        timeout: bool,
    },
}

/// How long a failed connection attempt answers for the attempts that
/// waited on it.
const FAILED_FOR: Duration = Duration::from_secs(5);

/// One SSH master per machine, opened on first use and reopened when dead.
pub struct Sessions {
    dir: PathBuf,
    sessions: Mutex<HashMap<String, Slot>>,
    pub connect_timeout: Duration,
    pub progress_timeout: Duration,
}

impl Sessions {
    pub fn new(state_dir: &Path, connect_timeout: Duration, progress_timeout: Duration) -> Self {
        Sessions { dir: state_dir.join("ssh"), sessions: Mutex::new(HashMap::new()), connect_timeout, progress_timeout }
    }

    async fn session(&self, m: &Machine) -> Result<Arc<openssh::Session>, ConnectError> {
        let slot = self.sessions.lock().expect("sessions").entry(m.uri.clone()).or_default().clone();
        let mut session = slot.lock().await;
        match &*session {
            Master::Open(s) => {
                if s.check().await.is_ok() {
                    return Ok(s.clone());
                }
                *session = Master::None;
            }
            Master::Failed { at, error, timeout } if at.elapsed() < FAILED_FOR => {
                let machine = m.uri.clone();
                return Err(if *timeout {
                    ConnectError::Timeout { machine, secs: self.connect_timeout.as_secs() }
                } else {
                    ConnectError::Ssh { machine, message: error.clone() }
                });
            }
            _ => {}
        }
        let r = self.open(m).await;
        *session = match &r {
            Ok(s) => Master::Open(s.clone()),
            Err(e) => Master::Failed {
                at: std::time::Instant::now(),
                error: match e {
                    ConnectError::Ssh { message, .. } => message.clone(),
                    e => e.to_string(),
                },
                timeout: matches!(e, ConnectError::Timeout { .. }),
            },
        };
        r
    }

    async fn open(&self, m: &Machine) -> Result<Arc<openssh::Session>, ConnectError> {
        let Transport::Ssh { user, host, port } = &m.transport else { unreachable!("local machines have no session") };
        let login = SshLogin {
            user: user.as_deref(),
            host,
            port: *port,
            key_file: m.ssh_key.as_deref(),
            pinned_host_key: m.host_key.as_deref(),
        };
        let compress = m.compress;
        let opened = open_ssh(&self.dir, &login, self.connect_timeout, |b| {
            b.server_alive_interval(Duration::from_secs(15));
            if compress {
                b.compression(true);
            }
        })
        .await;
        match opened {
            Ok(s) => Ok(Arc::new(s)),
            Err(SshFailure::Timeout) => {
                Err(ConnectError::Timeout { machine: m.uri.clone(), secs: self.connect_timeout.as_secs() })
            }
            Err(SshFailure::Failed(message)) => Err(ConnectError::Ssh { machine: m.uri.clone(), message }),
            Err(SshFailure::HostKey { got }) => Err(ConnectError::Ssh {
                machine: m.uri.clone(),
                message: host_key_message(
                    got.as_deref(),
                    match m.host_key {
                        Some(_) => "the one the machines file pins (its 8th field or base64-ssh-public-host-key)",
                        None => "in known_hosts, and the machines file pins none (its 8th field)",
                    },
                ),
            }),
        }
    }

    /// Forgets a machine's master (after an error), so the next connection
    /// opens a new one. Never waits: a connection being opened meanwhile
    /// lands in the forgotten slot and is dropped with it.
    pub fn forget(&self, m: &Machine) {
        self.sessions.lock().expect("sessions").remove(&m.uri);
    }

    /// Opens a serve connection to `m` and does the handshake.
    pub async fn connect(&self, m: &Machine) -> Result<Connection, ConnectError> {
        let args = m.serve_args();
        let spawn_err = |message: String| ConnectError::Spawn {
            machine: m.uri.clone(),
            program: m.remote_program.clone(),
            message,
        };
        let (stdin, stdout, stderr, stderr_fd, proc): (Writer, Reader, Reader, RawFd, Proc) = match &m.transport {
            Transport::Local => {
                // The remote program is a shell word list in Nix; here
                // without a shell, its words.
                let mut words = m.remote_program.split_whitespace();
                let mut c = crate::nix::command::nix_command(words.next().unwrap_or("nix-store"));
                c.args(words).args(&args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
                // Stopped by SIGTERM when the connection goes, not killed.
                c.kill_on_drop(false);
                // ETXTBSY: a program written a moment ago may still be open
                // for writing in a process forked meanwhile; it passes.
                let mut tries = 0;
                let mut child = loop {
                    match c.spawn() {
                        Ok(child) => break child,
                        Err(e) if e.raw_os_error() == Some(26) && tries < 20 => {
                            tries += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
                        }
                        Err(e) => return Err(spawn_err(e.to_string())),
                    }
                };
                let stdin = child.stdin.take().expect("piped");
                let stdout = child.stdout.take().expect("piped");
                let stderr = child.stderr.take().expect("piped");
                let fd = stderr.as_raw_fd();
                (Box::new(stdin), Box::new(stdout), Box::new(stderr), fd, Proc::Local(Some(child)))
            }
            Transport::Ssh { .. } => {
                let session = self.session(m).await?;
                // Unquoted, as Nix sends it: the remote shell reads it.
                let mut cmd = openssh::Session::to_raw_command(session, m.remote_program.clone());
                cmd.args(&args)
                    .stdin(openssh::Stdio::piped())
                    .stdout(openssh::Stdio::piped())
                    .stderr(openssh::Stdio::piped());
                let mut child = match cmd.spawn().await {
                    Ok(c) => c,
                    Err(e) => {
                        self.forget(m);
                        return Err(spawn_err(e.to_string()));
                    }
                };
                let stdin = child.stdin().take().expect("piped");
                let stdout = child.stdout().take().expect("piped");
                let stderr = child.stderr().take().expect("piped");
                let fd = stderr.as_raw_fd();
                (Box::new(stdin), Box::new(stdout), Box::new(stderr), fd, Proc::Remote(child))
            }
        };
        let log: LogTarget = Arc::new(Mutex::new(None));
        let tail = Arc::new(Mutex::new(Vec::new()));
        let (end_log, ends) = mpsc::unbounded_channel();
        tokio::spawn(forward_stderr(stderr, stderr_fd, ends, log.clone(), tail.clone()));
        let serve = match tokio::time::timeout(
            self.connect_timeout,
            ServeConn::handshake(stdout, stdin, self.progress_timeout),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                // The remote's own words say more than "end of file".
                tokio::time::sleep(Duration::from_millis(50)).await;
                let said = String::from_utf8_lossy(&tail.lock().expect("tail")).trim().to_string();
                let hint = match m.scheme {
                    Scheme::SshNg => " (ssh-ng://: Kiln runs the nix-store beside nix-daemon)".to_string(),
                    Scheme::Ssh | Scheme::Local => String::new(),
                };
                let machine = m.uri.clone();
                return Err(if said.is_empty() {
                    ConnectError::Handshake { machine, source, hint }
                } else {
                    ConnectError::Remote { machine, command: m.remote_command(), said, hint }
                });
            }
            Err(_) => {
                return Err(ConnectError::Timeout { machine: m.uri.clone(), secs: self.connect_timeout.as_secs() });
            }
        };
        Ok(Connection { serve, log, end_log, tail, _proc: proc })
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = Vec::new();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push(c.to_string());
        cur = c.source();
    }
    s.join(": ")
}

/// Where Kiln logs in over SSH: what builders and deployment targets share.
pub struct SshLogin<'a> {
    pub user: Option<&'a str>,
    pub host: &'a str,
    pub port: Option<u16>,
    pub key_file: Option<&'a Path>,
    /// A pinned host key line (`ssh-ed25519 AAAA…`); without it, the
    /// user's known_hosts must know the host.
    pub pinned_host_key: Option<&'a str>,
}

/// Why an SSH master could not be opened.
pub enum SshFailure {
    Timeout,
    /// Strict checking refused the host's key; `got` is its fingerprint.
    HostKey {
        got: Option<String>,
    },
    Failed(String),
}

/// "Host key verification failed", with the key the host offered and
/// where the expected one comes from (ssh's own banner says it at length).
pub fn host_key_message(got: Option<&str>, expected: &str) -> String {
    format!(
        "Host key verification failed: the host's key{} is not {expected}",
        got.map(|k| format!(" ({k})")).unwrap_or_default()
    )
}

/// Opens an SSH master to `login` with strict host key checking (a
/// pinned key goes into a known_hosts file of Kiln's own in `dir`, named
/// by host, port and key); `configure` adds the caller's own settings.
pub async fn open_ssh(
    dir: &Path,
    login: &SshLogin<'_>,
    connect_timeout: Duration,
    configure: impl FnOnce(&mut openssh::SessionBuilder),
) -> Result<openssh::Session, SshFailure> {
    std::fs::create_dir_all(dir).map_err(|e| SshFailure::Failed(format!("{}: {e}", dir.display())))?;
    let mut b = openssh::SessionBuilder::default();
    b.known_hosts_check(openssh::KnownHosts::Strict)
        .connect_timeout(connect_timeout)
        .control_directory(dir)
        // A master Kiln no longer uses (Kiln was killed, say) goes away;
        // openssh's default keeps it for ever.
        .control_persist(openssh::ControlPersist::IdleFor(std::num::NonZeroUsize::new(60).expect("non-zero")));
    if let Some(u) = login.user {
        b.user(u.to_string());
    }
    if let Some(p) = login.port {
        b.port(p);
    }
    if let Some(k) = login.key_file {
        b.keyfile(k);
    }
    if let Some(key) = login.pinned_host_key {
        let name = crate::nix::Hash::sha256(format!("{} {:?} {key}", login.host, login.port).as_bytes()).to_hex();
        let file = dir.join(format!("known_hosts-{}", &name[..16]));
        let mut lines = format!("{} {key}\n", login.host);
        if let Some(p) = login.port {
            lines.push_str(&format!("[{}]:{p} {key}\n", login.host));
        }
        std::fs::write(&file, lines).map_err(|e| SshFailure::Failed(format!("{}: {e}", file.display())))?;
        b.user_known_hosts_file(&file);
    }
    configure(&mut b);
    match tokio::time::timeout(connect_timeout + Duration::from_secs(5), b.connect(login.host)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => {
            let message = format!("{e}: {}", source_chain(&e));
            if message.contains("Host key verification failed") {
                let got = message.split_whitespace().find(|w| w.starts_with("SHA256:"));
                return Err(SshFailure::HostKey { got: got.map(|k| k.trim_end_matches('.').to_string()) });
            }
            Err(SshFailure::Failed(message))
        }
        Err(_) => Err(SshFailure::Timeout),
    }
}

/// How long a log that was behind waits for the stream to go quiet, and at most.
const CATCH_UP_QUIET: std::time::Duration = std::time::Duration::from_millis(100);
const CATCH_UP_MAX: std::time::Duration = std::time::Duration::from_secs(10);

/// Copies the process's stderr to the current log target, keeping the last
/// 8 KiB for error messages. A request to end the log is answered once
/// everything the pipe held when it was taken up has gone to the target,
/// and the target is detached: nothing read later joins that log. `fd` is
/// `stderr`'s own descriptor, which lives as long as this task.
async fn forward_stderr(
    mut stderr: Reader,
    fd: RawFd,
    mut ends: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
    log: LogTarget,
    tail: Arc<Mutex<Vec<u8>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            biased;
            Some(ack) = ends.recv() => {
                // Whatever was read before is forwarded already (one loop);
                // what the pipe holds now can be read without waiting.
                let mut pending = pipe_holds(fd);
                let behind = pending > 0;
                while pending > 0 {
                    let want = pending.min(buf.len());
                    let n = match stderr.read(&mut buf[..want]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    forward(&buf[..n], &log, &tail).await;
                    pending -= n;
                }
                // A reader that was behind (a big log) left a full pipe, and
                // over SSH the `ssh` client then holds the rest in its own
                // buffer while it delivers the result on stdout: take what
                // comes until the stream has been quiet for a moment.
                if behind {
                    let until = tokio::time::Instant::now() + CATCH_UP_MAX;
                    loop {
                        let quiet = tokio::time::Instant::now() + CATCH_UP_QUIET;
                        match tokio::time::timeout_at(quiet.min(until), stderr.read(&mut buf)).await {
                            Ok(Ok(n)) if n > 0 => forward(&buf[..n], &log, &tail).await,
                            _ => break,
                        }
                    }
                }
                *log.lock().expect("log target") = None;
                let _ = ack.send(());
            }
            r = stderr.read(&mut buf) => {
                let n = match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                forward(&buf[..n], &log, &tail).await;
            }
        }
    }
}

async fn forward(chunk: &[u8], log: &LogTarget, tail: &Mutex<Vec<u8>>) {
    {
        let mut t = tail.lock().expect("tail");
        t.extend_from_slice(chunk);
        let excess = t.len().saturating_sub(8192);
        t.drain(..excess);
    }
    let sink = log.lock().expect("log target").clone();
    if let Some(sink) = sink {
        // Waits while the log's writer is behind: the pipe fills and the
        // builder waits, instead of the log growing in memory.
        let _ = sink.send(bytes::Bytes::copy_from_slice(chunk)).await;
    }
}

/// How many bytes a pipe holds unread (FIONREAD); 0 if it cannot say.
fn pipe_holds(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the pointer, which points at
    // `n`; `fd` is open (its reader is alive in the caller).
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
    if r == 0 { n.max(0) as usize } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process that writes `lines` × 100 bytes to stderr, then `ok` to
    /// stdout, then waits: the order `nix-store` keeps between a build's
    /// log and its result.
    fn writer(lines: u32) -> tokio::process::Child {
        tokio::process::Command::new("/bin/sh")
            .args([
                "-c",
                &format!(
                    "i=0; while [ $i -lt {lines} ]; do printf '%099d\\n' $i >&2; i=$((i+1)); done; echo ok; read x"
                ),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    /// What ending the log after the answer forwards: with the reader
    /// started before the process writes (racing it), and after
    /// (everything still in the pipe when the end is asked for).
    #[tokio::test]
    async fn ending_a_log_forwards_all_the_pipe_held_when_the_answer_came() {
        use tokio::io::AsyncBufReadExt;
        for late_reader in [false, true] {
            for _ in 0..10 {
                let mut child = writer(600);
                let stderr = child.stderr.take().unwrap();
                let fd = stderr.as_raw_fd();
                let (sink, mut log) = mpsc::channel(1024);
                let target: LogTarget = Arc::new(Mutex::new(Some(sink)));
                let (end, ends) = mpsc::unbounded_channel();
                let tail = Arc::new(Mutex::new(Vec::new()));
                // Futures are lazy: nothing reads until it is spawned.
                let mut reader = Some(forward_stderr(Box::new(stderr), fd, ends, target.clone(), tail));
                if !late_reader {
                    tokio::spawn(reader.take().unwrap());
                }
                let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
                let mut answer = String::new();
                out.read_line(&mut answer).await.unwrap();
                assert_eq!(answer, "ok\n");
                let (ack, done) = oneshot::channel();
                end.send(ack).unwrap();
                if let Some(r) = reader.take() {
                    tokio::spawn(r);
                }
                done.await.unwrap();
                assert!(target.lock().unwrap().is_none(), "detached");
                let mut got = 0;
                while let Ok(chunk) = log.try_recv() {
                    got += chunk.len();
                }
                assert_eq!(got, 60_000, "late reader: {late_reader}");
            }
        }
    }
}
