//! The Nix machines file (`/etc/nix/machines`, or `machines_file`): one
//! builder per line, `URI SYSTEMS SSH-KEY MAX-JOBS SPEED-FACTOR
//! SUPPORTED-FEATURES MANDATORY-FEATURES PUBLIC-HOST-KEY`, `-` for a
//! default, `#` comments, `;` also separating entries (as `--builders`
//! takes them). URIs are Nix's: `ssh://user@host[:port]`, with
//! `?remote-store=…` and `?remote-program=…`, a bare `host` meaning
//! `ssh://host`, and `localhost`/`local` for building on the coordinator
//! itself. A bad line is reported with its number and reason and skipped;
//! the rest stay in use.

use std::path::{Path, PathBuf};

use base64::Engine;

/// How Kiln reaches a builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// `nix-store --serve` on the coordinator itself.
    Local,
    Ssh {
        user: Option<String>,
        host: String,
        port: Option<u16>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// The URI as written, which names the machine everywhere.
    pub uri: String,
    pub transport: Transport,
    pub systems: Vec<String>,
    pub ssh_key: Option<PathBuf>,
    pub max_jobs: u32,
    pub speed_factor: f64,
    pub supported_features: Vec<String>,
    pub mandatory_features: Vec<String>,
    /// The host key line (`ssh-ed25519 AAAA…`), decoded from base64.
    pub host_key: Option<String>,
    /// `?remote-store=` (passed as `--store`).
    pub remote_store: Option<String>,
    /// `?remote-program=` (default `nix-store`).
    pub remote_program: String,
}

impl Machine {
    /// Whether this machine may build a step for `system` needing `features`.
    pub fn fits(&self, system: &str, features: &[String]) -> bool {
        let system_ok = system == "builtin" || self.systems.iter().any(|s| s == system);
        system_ok
            && features.iter().all(|f| self.supported_features.contains(f) || self.mandatory_features.contains(f))
            && self.mandatory_features.iter().all(|m| features.contains(m))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub reason: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// Parses a machines file; returns the good machines and the bad lines.
pub fn parse(text: &str) -> (Vec<Machine>, Vec<LineError>) {
    let mut machines = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("");
        for entry in line.split(';') {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            match parse_entry(entry) {
                Ok(m) => {
                    if machines.iter().any(|o: &Machine| o.uri == m.uri) {
                        errors.push(LineError { line: i + 1, reason: format!("{} is listed twice", m.uri) });
                    } else {
                        machines.push(m);
                    }
                }
                Err(reason) => errors.push(LineError { line: i + 1, reason }),
            }
        }
    }
    (machines, errors)
}

pub fn load(path: &Path) -> std::io::Result<(Vec<Machine>, Vec<LineError>)> {
    Ok(parse(&std::fs::read_to_string(path)?))
}

fn field(f: Option<&str>) -> Option<&str> {
    f.filter(|s| *s != "-" && !s.is_empty())
}

fn list(f: Option<&str>) -> Vec<String> {
    field(f).map(|s| s.split(',').filter(|x| !x.is_empty()).map(str::to_string).collect()).unwrap_or_default()
}

fn parse_entry(entry: &str) -> Result<Machine, String> {
    let mut f = entry.split_whitespace();
    let uri = f.next().ok_or("empty entry")?.to_string();
    let systems = list(f.next());
    let ssh_key = field(f.next()).map(PathBuf::from);
    let max_jobs = match field(f.next()) {
        Some(s) => s.parse::<u32>().map_err(|_| format!("max jobs {s:?} is not a number"))?,
        None => 1,
    };
    let speed_factor = match field(f.next()) {
        Some(s) => s
            .parse::<f64>()
            .ok()
            .filter(|v| *v > 0.0 && v.is_finite())
            .ok_or(format!("speed factor {s:?} is not a positive number"))?,
        None => 1.0,
    };
    let supported_features = list(f.next());
    let mandatory_features = list(f.next());
    let host_key = match field(f.next()) {
        Some(b64) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| "the public host key is not base64".to_string())?;
            let line = String::from_utf8(bytes).map_err(|_| "the public host key is not text".to_string())?;
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next()) {
                (Some(kt), Some(k)) if kt.starts_with("ssh-") || kt.starts_with("ecdsa-") => Some(format!("{kt} {k}")),
                _ => return Err("the public host key is not an OpenSSH public key line".into()),
            }
        }
        None => None,
    };
    if let Some(extra) = f.next() {
        return Err(format!("unexpected field {extra:?} after the host key"));
    }
    let (transport, query) = parse_uri(&uri)?;
    if systems.is_empty() && transport != Transport::Local {
        return Err("no systems given".into());
    }
    let mut remote_store = None;
    let mut remote_program = "nix-store".to_string();
    for (k, v) in query {
        match k.as_str() {
            "remote-store" => remote_store = Some(v),
            "remote-program" => remote_program = v,
            // Nix accepts these store settings; they do not change how Kiln talks.
            "compress" | "max-connections" | "log-fd" => {}
            other => return Err(format!("unknown store setting {other:?}")),
        }
    }
    let mut systems = systems;
    if systems.is_empty() {
        systems.push(crate::builder::local_system().to_string());
    }
    Ok(Machine {
        uri,
        transport,
        systems,
        ssh_key,
        max_jobs,
        speed_factor,
        supported_features,
        mandatory_features,
        host_key,
        remote_store,
        remote_program,
    })
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("bad percent-encoding")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "bad percent-encoding")?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "URI is not UTF-8".to_string())
}

fn parse_uri(uri: &str) -> Result<(Transport, Vec<(String, String)>), String> {
    if uri == "local://" {
        return Ok((Transport::Local, vec![]));
    }
    let rest = match uri.split_once("://") {
        Some(("ssh", r)) => r,
        Some(("ssh-ng", _)) => return Err("ssh-ng:// (the daemon protocol) is not supported; use ssh://".into()),
        Some((s, _)) => return Err(format!("unsupported URI scheme {s:?}")),
        None => uri,
    };
    let (authority, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let authority = authority.trim_end_matches('/');
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(percent_decode(u)?), h),
        None => (None, authority),
    };
    let (host, port) = if let Some(h) = hostport.strip_prefix('[') {
        let (h, rest) = h.split_once(']').ok_or("unclosed [ in host")?;
        (h.to_string(), rest.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(format!("bad host in {uri:?}"));
    }
    let port = port.map(|p| p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))).transpose()?;
    let mut q = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or(format!("bad query parameter {pair:?}"))?;
        q.push((percent_decode(k)?, percent_decode(v)?));
    }
    // Nix runs `localhost` builds locally; Kiln does the same unless a user
    // or port says SSH is meant.
    if (host == "localhost" || host == "local") && user.is_none() && port.is_none() {
        return Ok((Transport::Local, q));
    }
    Ok((Transport::Ssh { user, host, port }, q))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUVoV3Y5VXRaVjRJVENqM2ZVMnN0cXN1Sk9xUlVxK3AzU0pKWjN4MzlBaWggcm9vdEBob3N0Cg==";

    #[test]
    fn parses_nix_machines_files() {
        let text = format!(
            "# builders\n\
             ssh://root@127.0.0.1?remote-store=local%3Froot%3D/tmp/b1&remote-program=/w/nix-store x86_64-linux /k 2 1 - - {KEY}\n\
             \n\
             ssh://root@127.0.0.1:2222 x86_64-linux,aarch64-linux - 4 2.5 kvm,big-parallel kvm\n\
             builder2 i686-linux ; localhost x86_64-linux - 8\n"
        );
        let (m, errors) = parse(&text);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].transport, Transport::Ssh { user: Some("root".into()), host: "127.0.0.1".into(), port: None });
        assert_eq!(m[0].remote_store.as_deref(), Some("local?root=/tmp/b1"));
        assert_eq!(m[0].remote_program, "/w/nix-store");
        assert_eq!(m[0].ssh_key, Some(PathBuf::from("/k")));
        assert_eq!(m[0].max_jobs, 2);
        assert!(m[0].host_key.as_deref().unwrap().starts_with("ssh-ed25519 AAAA"));
        assert_eq!(
            m[1].transport,
            Transport::Ssh { user: Some("root".into()), host: "127.0.0.1".into(), port: Some(2222) }
        );
        assert_eq!((m[1].max_jobs, m[1].speed_factor), (4, 2.5));
        assert_eq!(m[1].systems, ["x86_64-linux", "aarch64-linux"]);
        assert_eq!(m[2].transport, Transport::Ssh { user: None, host: "builder2".into(), port: None });
        assert_eq!(m[3].transport, Transport::Local);
        assert_eq!(m[3].max_jobs, 8);

        // Fitting: system, supported and mandatory features.
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(m[1].fits("aarch64-linux", &f(&["kvm"])));
        assert!(!m[1].fits("aarch64-linux", &f(&[])), "kvm is mandatory");
        assert!(!m[1].fits("x86_64-linux", &f(&["kvm", "cuda"])));
        assert!(m[0].fits("builtin", &f(&[])));
        assert!(!m[0].fits("aarch64-linux", &f(&[])));
    }

    #[test]
    fn bad_lines_are_reported_and_skipped() {
        let text = "ok x86_64-linux\nbad x86_64-linux - many\nssh-ng://h x86_64-linux\nnosystems\nh2 x86_64-linux - 1 0\nh3 x86_64-linux - - - - - notbase64!\nok x86_64-linux\nh4 x86_64-linux - 1 1 - - - extra\nssh://h5?colour=red x86_64-linux\n";
        let (m, e) = parse(text);
        assert_eq!(m.len(), 1);
        let lines: Vec<usize> = e.iter().map(|e| e.line).collect();
        assert_eq!(lines, [2, 3, 4, 5, 6, 7, 8, 9]);
        assert!(e[0].reason.contains("max jobs"));
        assert!(e[1].reason.contains("ssh-ng"));
        assert!(e[5].reason.contains("twice"));
        assert!(e[7].reason.contains("colour"));
        assert_eq!(e[0].to_string(), "line 2: max jobs \"many\" is not a number");
    }
}
