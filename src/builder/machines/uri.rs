//! Store URIs of machines-file entries: the scheme, where it leads (SSH
//! host, user and port, or this machine), and the settings after `?`,
//! checked against every setting Nix 2.8 knows for SSH stores.

use std::path::PathBuf;

use super::{Scheme, Transport};

/// For `ssh-ng://`: the `nix-store` in the directory of the remote
/// program, which Nix runs as `nix-daemon --stdio`. Nix installs both
/// names side by side (in Nix 2.4 and later both are the `nix` binary).
pub(super) fn beside_nix_daemon(program: &str) -> Result<String, String> {
    let program = program.trim();
    let end = program.find(char::is_whitespace).unwrap_or(program.len());
    let (exe, rest) = program.split_at(end);
    let (dir, base) = match exe.rsplit_once('/') {
        Some((d, b)) => (Some(d), b),
        None => (None, exe),
    };
    if base != "nix-daemon" {
        return Err(format!(
            "ssh-ng:// runs remote-program {program:?} as Nix's daemon, and Kiln speaks the serve protocol to the \
             nix-store beside a nix-daemon; {exe:?} is not one: write ssh:// with remote-program=PATH-TO-nix-store"
        ));
    }
    Ok(match dir {
        Some(d) => format!("{d}/nix-store{rest}"),
        None => format!("nix-store{rest}"),
    })
}

/// The store settings of a URI, checked as Nix 2.8 checks them.
#[derive(Default)]
pub(super) struct Settings {
    pub(super) ssh_key: Option<PathBuf>,
    pub(super) host_key: Option<String>,
    pub(super) compress: bool,
    pub(super) remote_program: Option<String>,
    pub(super) remote_store: Option<String>,
    pub(super) inert: Vec<String>,
}

/// Nix's boolean settings: `true`/`yes`/`1`, `false`/`no`/`0`.
pub(super) fn boolean(k: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => Err(format!("setting {k:?} has invalid value {v:?} (true or false)")),
    }
}

pub(super) fn integer(k: &str, v: &str, unsigned: bool) -> Result<(), String> {
    let ok = if unsigned { v.parse::<u32>().is_ok() } else { v.parse::<i32>().is_ok() };
    if ok { Ok(()) } else { Err(format!("setting {k:?} has invalid value {v:?} (a number)")) }
}

/// Every setting Nix 2.8 knows for `ssh://` (LegacySSHStoreConfig) and
/// `ssh-ng://` (SSHStoreConfig, RemoteStoreConfig) stores, plus the
/// generic StoreConfig ones. Nix warns about a setting it does not know
/// and goes on; Kiln refuses the line instead, so a typo (`ssh-kye`) is
/// seen on `/machines` rather than acted on half-way.
pub(super) fn settings(scheme: Scheme, query: &[(String, String)]) -> Result<Settings, String> {
    let mut s = Settings::default();
    for (i, (k, v)) in query.iter().enumerate() {
        if query[..i].iter().any(|(o, _)| o == k) {
            return Err(format!("setting {k:?} is given twice"));
        }
        match k.as_str() {
            "ssh-key" => s.ssh_key = (!v.is_empty()).then(|| PathBuf::from(v)),
            "base64-ssh-public-host-key" => s.host_key = (!v.is_empty()).then(|| v.clone()),
            "compress" => s.compress = boolean(k, v)?,
            "remote-program" if v.trim().is_empty() => return Err("remote-program is empty".into()),
            "remote-program" => s.remote_program = Some(v.clone()),
            "remote-store" => s.remote_store = (!v.is_empty()).then(|| v.clone()),
            // The store directory must be Kiln's: its paths are built there.
            "store" => {
                if v.trim_end_matches('/') != crate::nix::STORE_DIR {
                    return Err(format!("store {v:?}: Kiln builds for {}", crate::nix::STORE_DIR));
                }
            }
            // Accepted, with no effect on Kiln's builds (README, "Builders
            // and the queue"): Kiln opens one serve process per running
            // step up to max-jobs, as Nix's build hook does whatever the
            // pool size; reads the remote's stderr as the build log itself;
            // and keeps no path-info cache or substituter list of builders.
            "max-connections" | "log-fd" | "path-info-cache-size" | "priority" => {
                integer(k, v, false)?;
                s.inert.push(format!("{k}={v}"));
            }
            "max-connection-age" => {
                integer(k, v, true)?;
                s.inert.push(format!("{k}={v}"));
            }
            "trusted" | "want-mass-query" => {
                boolean(k, v)?;
                s.inert.push(format!("{k}={v}"));
            }
            // Nix's Machine::openStore always replaces them with the
            // line's features fields, which Kiln reads as well.
            "system-features" | "extra-system-features" => s.inert.push(format!("{k}={v}")),
            _ => {
                let scheme = match scheme {
                    Scheme::SshNg => "ssh-ng://",
                    Scheme::Ssh | Scheme::Local => "ssh://",
                };
                return Err(format!("unknown store setting {k:?} (not one Nix accepts for {scheme} stores)"));
            }
        }
    }
    Ok(s)
}

/// Nix's `percentDecode` (for setting values), stricter: a `%` must be
/// followed by two hex digits.
pub(super) fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()));
            let hex = hex.ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
            out.push(u8::from_str_radix(hex, 16).expect("two hex digits"));
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// A store URI's scheme, where it leads and its settings (name, value).
pub(super) type ParsedUri = (Scheme, Transport, Vec<(String, String)>);

pub(super) fn parse_uri(uri: &str) -> Result<ParsedUri, String> {
    let (scheme, rest) = match uri.split_once("://") {
        Some(("ssh", r)) => (Scheme::Ssh, r),
        Some(("ssh-ng", r)) => (Scheme::SshNg, r),
        Some(("local", "")) => return Ok((Scheme::Local, Transport::Local, vec![])),
        Some((s, _)) => {
            return Err(format!(
                "store URI scheme {s:?} cannot build for Kiln: use ssh://, ssh-ng://, or localhost for this machine"
            ));
        }
        // Nix's words for the store of the machine reading the file.
        None if ["local", "daemon", "auto"].contains(&uri) => return Ok((Scheme::Local, Transport::Local, vec![])),
        None if uri.split('?').next().is_some_and(|b| ["local", "daemon", "auto"].contains(&b)) => {
            return Err(format!(
                "{uri:?} is a local store with settings; for a store here write localhost?remote-store=… (percent-encoded)"
            ));
        }
        None if uri.split('?').next().is_some_and(|b| b.contains('/')) => {
            return Err(format!("{uri:?} is a local store path; Kiln builds over ssh://, ssh-ng:// or on localhost"));
        }
        None => (Scheme::Ssh, uri),
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
    if host.is_empty() || host.starts_with('-') || host.contains(|c: char| c.is_whitespace() || c == '/') {
        return Err(format!("bad host in {uri:?}"));
    }
    let port = port.map(|p| p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))).transpose()?;
    // As Nix's decodeQuery: names as written, values percent-decoded.
    let mut q = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or(format!("store setting {pair:?} has no value (name=value)"))?;
        q.push((k.to_string(), percent_decode(v)?));
    }
    // Nix runs `localhost` builds locally; Kiln does the same unless a user
    // or port says SSH is meant.
    if (host == "localhost" || host == "local") && user.is_none() && port.is_none() {
        return Ok((if scheme == Scheme::SshNg { Scheme::SshNg } else { Scheme::Local }, Transport::Local, q));
    }
    Ok((scheme, Transport::Ssh { user, host, port }, q))
}
