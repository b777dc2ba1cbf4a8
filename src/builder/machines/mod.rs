//! The Nix machines file (`/etc/nix/machines`, or `machines_file`): one
//! builder per line, `URI SYSTEMS SSH-KEY MAX-JOBS SPEED-FACTOR
//! SUPPORTED-FEATURES MANDATORY-FEATURES PUBLIC-HOST-KEY`, `-` for a
//! default, `;` also separating entries and `#` starting a comment up to
//! the next one (as Nix 2.8's `machines.cc` reads them). URIs are Nix's:
//! `ssh://` (the serve protocol), `ssh-ng://` (Nix's daemon protocol over
//! SSH; Kiln speaks the serve protocol to the `nix-store` beside the remote
//! `nix-daemon` instead, decision 013), a bare host meaning `ssh://host`,
//! and `localhost`, `local`, `daemon`, `auto` for building on the
//! coordinator itself. Kiln also takes a port (`ssh://host:2222`). Every
//! store setting Nix 2.8 accepts for SSH stores (`?ssh-key=`,
//! `?base64-ssh-public-host-key=`, `?compress=`, `?remote-program=`, …)
//! is accepted with Nix's meaning, or, when it has no effect on how Kiln
//! builds, accepted and listed as such; an unknown setting makes the line
//! unusable. A bad line is reported with its number and reason and
//! skipped; the rest stay in use.

use std::path::{Path, PathBuf};

use base64::Engine;

mod uri;

use uri::{beside_nix_daemon, parse_uri, settings};

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

/// The store URI scheme of a line, which decides Nix's defaults for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `localhost`, `local`, `daemon`, `auto`: the coordinator itself.
    Local,
    /// `ssh://` (or a bare host): Nix's serve protocol, `nix-store --serve`.
    Ssh,
    /// `ssh-ng://`: Nix's daemon protocol, `nix-daemon --stdio`; Kiln
    /// runs the serve protocol over the same SSH connection instead.
    SshNg,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// The URI as written, which names the machine everywhere.
    pub uri: String,
    pub scheme: Scheme,
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
    /// The program Kiln runs with `--serve --write`, a shell word list as
    /// in Nix: `?remote-program=` for `ssh://` (default `nix-store`); for
    /// `ssh-ng://`, the `nix-store` beside its remote program's
    /// `nix-daemon`.
    pub remote_program: String,
    /// `?compress=`: `ssh -C`.
    pub compress: bool,
    /// Settings Nix accepts that do not change how Kiln builds here, as
    /// written (`priority=10`), to be shown rather than silently dropped.
    pub inert_settings: Vec<String>,
}

impl Machine {
    /// The coordinator itself with `max_jobs` slots, as when no machines
    /// file is given.
    pub fn local(max_jobs: u32) -> Machine {
        Machine {
            uri: "localhost".into(),
            scheme: Scheme::Local,
            transport: Transport::Local,
            systems: vec![crate::builder::local_system().to_string()],
            ssh_key: None,
            max_jobs,
            speed_factor: 1.0,
            supported_features: vec![],
            mandatory_features: vec![],
            host_key: None,
            remote_store: None,
            remote_program: "nix-store".into(),
            compress: false,
            inert_settings: vec![],
        }
    }

    /// Whether this machine may build a step for `system` needing `features`.
    pub fn fits(&self, system: &str, features: &[String]) -> bool {
        let system_ok = system == "builtin" || self.systems.iter().any(|s| s == system);
        system_ok
            && features.iter().all(|f| self.supported_features.contains(f) || self.mandatory_features.contains(f))
            && self.mandatory_features.iter().all(|m| features.contains(m))
    }

    /// The arguments after the remote program.
    pub fn serve_args(&self) -> Vec<String> {
        let mut args = vec!["--serve".to_string(), "--write".to_string()];
        if let Some(store) = &self.remote_store {
            args.push("--store".into());
            args.push(store.clone());
        }
        args
    }

    /// The command Kiln runs on the machine, as the remote shell gets it.
    pub fn remote_command(&self) -> String {
        let mut s = self.remote_program.clone();
        for a in self.serve_args() {
            s.push(' ');
            s.push_str(&shell_quote(&a));
        }
        s
    }

    /// How Kiln talks to the machine, in words for people.
    pub fn protocol(&self) -> String {
        match self.scheme {
            Scheme::Local => "serve protocol, on this machine".into(),
            Scheme::Ssh => "serve protocol over SSH".into(),
            Scheme::SshNg => "ssh-ng: serve protocol over SSH, to the nix-store beside the remote nix-daemon".into(),
        }
    }
}

/// A word as a POSIX shell reads it back (as the `openssh` crate quotes
/// the arguments it sends).
fn shell_quote(w: &str) -> String {
    if !w.is_empty() && w.bytes().all(|c| c.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&c)) {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    /// The entry as written (one of a line's `;`-separated entries).
    pub entry: String,
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
        // Nix splits entries at `;` first, then cuts each at `#`.
        for entry in line.split(';') {
            let entry = entry.split('#').next().unwrap_or("").trim();
            if entry.is_empty() {
                continue;
            }
            let error = |reason: String| LineError { line: i + 1, entry: entry.to_string(), reason };
            match parse_entry(entry) {
                Ok(m) => {
                    if machines.iter().any(|o: &Machine| o.uri == m.uri) {
                        errors.push(error(format!("{} is listed twice", m.uri)));
                    } else {
                        machines.push(m);
                    }
                }
                Err(reason) => errors.push(error(reason)),
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

/// A host key as the 8th field or `base64-ssh-public-host-key` give it:
/// base64 of an OpenSSH public key line (`ssh-ed25519 AAAA… comment`).
fn decode_host_key(b64: &str, what: &str) -> Result<String, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| format!("the public host key ({what}) is not base64"))?;
    let line = String::from_utf8(bytes).map_err(|_| format!("the public host key ({what}) is not text"))?;
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(kt), Some(k)) if ["ssh-", "ecdsa-", "sk-"].iter().any(|p| kt.starts_with(p)) => Ok(format!("{kt} {k}")),
        _ => Err(format!("the public host key ({what}) is not an OpenSSH public key line")),
    }
}

fn parse_entry(entry: &str) -> Result<Machine, String> {
    let mut f = entry.split_whitespace();
    let uri = f.next().ok_or("empty entry")?.to_string();
    if let Some(file) = uri.strip_prefix('@') {
        return Err(format!("includes (@{file}) are not supported: list the machines in this file"));
    }
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
    let host_key_field = field(f.next()).map(|b64| decode_host_key(b64, "8th field")).transpose()?;
    if let Some(extra) = f.next() {
        return Err(format!("unexpected field {extra:?} after the host key"));
    }
    let (scheme, transport, query) = parse_uri(&uri)?;
    let s = settings(scheme, &query)?;
    // As Nix's Machine::openStore: the line's own fields win over the
    // URI's settings.
    let ssh_key = ssh_key.or(s.ssh_key);
    let host_key = match host_key_field {
        Some(k) => Some(k),
        None => s.host_key.as_deref().map(|b64| decode_host_key(b64, "base64-ssh-public-host-key")).transpose()?,
    };
    let remote_program = match scheme {
        Scheme::SshNg => beside_nix_daemon(s.remote_program.as_deref().unwrap_or("nix-daemon"))?,
        Scheme::Ssh | Scheme::Local => s.remote_program.unwrap_or_else(|| "nix-store".to_string()),
    };
    let mut systems = systems;
    if systems.is_empty() {
        // Nix's default: the platform of the machine reading the file.
        systems.push(crate::builder::local_system().to_string());
    }
    Ok(Machine {
        uri,
        scheme,
        transport,
        systems,
        ssh_key,
        max_jobs,
        speed_factor,
        supported_features,
        mandatory_features,
        host_key,
        remote_store: s.remote_store,
        remote_program,
        compress: s.compress,
        inert_settings: s.inert,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUVoV3Y5VXRaVjRJVENqM2ZVMnN0cXN1Sk9xUlVxK3AzU0pKWjN4MzlBaWggcm9vdEBob3N0Cg==";

    fn one(line: &str) -> Machine {
        let (m, e) = parse(line);
        assert!(e.is_empty(), "{line}: {e:?}");
        assert_eq!(m.len(), 1);
        m.into_iter().next().unwrap()
    }

    fn reason(line: &str) -> String {
        let (m, e) = parse(line);
        assert!(m.is_empty(), "{line} was accepted");
        assert_eq!(e.len(), 1, "{e:?}");
        e[0].reason.clone()
    }

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
        assert_eq!(m[0].scheme, Scheme::Ssh);
        assert_eq!(m[0].remote_store.as_deref(), Some("local?root=/tmp/b1"));
        assert_eq!(m[0].remote_program, "/w/nix-store");
        assert_eq!(m[0].remote_command(), "/w/nix-store --serve --write --store 'local?root=/tmp/b1'");
        assert_eq!(m[0].ssh_key, Some(PathBuf::from("/k")));
        assert_eq!(m[0].max_jobs, 2);
        assert!(m[0].host_key.as_deref().unwrap().starts_with("ssh-ed25519 AAAA"));
        assert!(!m[0].compress);
        assert_eq!(
            m[1].transport,
            Transport::Ssh { user: Some("root".into()), host: "127.0.0.1".into(), port: Some(2222) }
        );
        assert_eq!((m[1].max_jobs, m[1].speed_factor), (4, 2.5));
        assert_eq!(m[1].systems, ["x86_64-linux", "aarch64-linux"]);
        assert_eq!(m[1].remote_command(), "nix-store --serve --write");
        assert_eq!(m[2].transport, Transport::Ssh { user: None, host: "builder2".into(), port: None });
        assert_eq!(m[3].transport, Transport::Local);
        assert_eq!(m[3].max_jobs, 8);
        let here = one("localhost?remote-store=local%3Froot%3D/tmp/b&remote-program=/w/nix-store x86_64-linux - 2");
        assert_eq!((&here.transport, here.scheme), (&Transport::Local, Scheme::Local));
        assert_eq!(here.remote_command(), "/w/nix-store --serve --write --store 'local?root=/tmp/b'");

        // Fitting: system, supported and mandatory features.
        let f = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(m[1].fits("aarch64-linux", &f(&["kvm"])));
        assert!(!m[1].fits("aarch64-linux", &f(&[])), "kvm is mandatory");
        assert!(!m[1].fits("x86_64-linux", &f(&["kvm", "cuda"])));
        assert!(m[0].fits("builtin", &f(&[])));
        assert!(!m[0].fits("aarch64-linux", &f(&[])));
    }

    /// What NixOS writes for `nix.buildMachines` entries with
    /// `protocol = "ssh-ng"`: `ssh-ng://user@host`, the key in field 3,
    /// supported features including the mandatory ones, the host key in
    /// field 8.
    #[test]
    fn ssh_ng_lines_as_nixos_renders_them() {
        let m = one(&format!(
            "ssh-ng://builder@b1.example.org x86_64-linux,aarch64-linux /run/keys/b 8 2 kvm,big-parallel,benchmark benchmark {KEY}"
        ));
        assert_eq!(m.scheme, Scheme::SshNg);
        assert_eq!(
            m.transport,
            Transport::Ssh { user: Some("builder".into()), host: "b1.example.org".into(), port: None }
        );
        assert_eq!(m.ssh_key, Some(PathBuf::from("/run/keys/b")));
        assert!(m.host_key.as_deref().unwrap().starts_with("ssh-ed25519 AAAA"));
        assert_eq!(m.mandatory_features, ["benchmark"]);
        // ssh-ng's remote program is nix-daemon; Kiln runs nix-store.
        assert_eq!(m.remote_program, "nix-store");
        assert!(m.protocol().contains("nix-store beside the remote nix-daemon"), "{}", m.protocol());

        // NixOS with the defaults: no user, `-` for unset fields.
        let m = one("ssh-ng://mac - - 1 1 - - -");
        assert_eq!(m.transport, Transport::Ssh { user: None, host: "mac".into(), port: None });
        assert_eq!(m.systems, [crate::builder::local_system()], "Nix's default: this machine's system");
        assert_eq!((m.ssh_key.as_ref(), m.host_key.as_ref()), (None, None));

        // A remote program named as a nix-daemon: the nix-store beside it,
        // with its arguments.
        let m = one("ssh-ng://mac?remote-program=/nix/var/nix/profiles/default/bin/nix-daemon aarch64-darwin");
        assert_eq!(m.remote_program, "/nix/var/nix/profiles/default/bin/nix-store");
        let m =
            one("ssh-ng://m2?remote-program=nix-daemon%20--option%20x%20y&remote-store=local%3Froot%3D/s x86_64-linux");
        assert_eq!(m.remote_command(), "nix-store --option x y --serve --write --store 'local?root=/s'");

        // ssh-ng://localhost builds here, as Nix does.
        let m = one("ssh-ng://localhost x86_64-linux");
        assert_eq!((m.transport, m.scheme, m.remote_program.as_str()), (Transport::Local, Scheme::SshNg, "nix-store"));

        // A remote program that is not a nix-daemon cannot be mapped.
        let r = reason("ssh-ng://h?remote-program=/opt/daemon-wrapper x86_64-linux");
        assert!(r.contains("not one") && r.contains("ssh://"), "{r}");
        // ssh://'s default stays nix-store; a nix-daemon there is used as given.
        assert_eq!(one("ssh://h?remote-program=/x/nix-daemon x86_64-linux").remote_program, "/x/nix-daemon");
    }

    #[test]
    fn every_ssh_store_setting_nix_accepts() {
        // The connection settings, percent-decoded as Nix does.
        let m = one(&format!(
            "ssh://root@h:22?ssh-key=/k%20ey&base64-ssh-public-host-key={}&compress=true\
             &remote-program=/opt/nix/bin/nix-store&remote-store=local%3Froot%3D/b x86_64-linux",
            KEY.replace('=', "%3D")
        ));
        assert_eq!(m.ssh_key, Some(PathBuf::from("/k ey")));
        assert!(m.host_key.as_deref().unwrap().starts_with("ssh-ed25519 AAAA"));
        assert!(m.compress);
        assert_eq!(m.remote_program, "/opt/nix/bin/nix-store");
        assert_eq!(m.remote_store.as_deref(), Some("local?root=/b"));
        assert!(m.inert_settings.is_empty());
        // A base64 `=` needs no escaping: only the first `=` splits.
        assert!(one(&format!("ssh://h?base64-ssh-public-host-key={KEY} x86_64-linux")).host_key.is_some());
        for (v, b) in [("yes", true), ("1", true), ("false", false), ("no", false), ("0", false)] {
            assert_eq!(one(&format!("ssh://h?compress={v} x86_64-linux")).compress, b, "{v}");
        }

        // As Nix's Machine::openStore: the line's fields win over the URI.
        let other_key = base64::engine::general_purpose::STANDARD.encode("ssh-ed25519 AAAAotherkey other@host\n");
        let m = one(&format!(
            "ssh-ng://h?ssh-key=/uri-key&base64-ssh-public-host-key={other_key} x86_64-linux /field-key 1 1 - - {KEY}"
        ));
        assert_eq!(m.ssh_key, Some(PathBuf::from("/field-key")));
        assert!(m.host_key.as_deref().unwrap().contains("AAAAC3NzaC1lZDI1NTE5AAAAIEhW"), "{:?}", m.host_key);
        // Empty values mean unset, as in Nix.
        let m = one("ssh://h?ssh-key=&base64-ssh-public-host-key=&remote-store= x86_64-linux");
        assert_eq!((m.ssh_key, m.host_key, m.remote_store), (None, None, None));

        // Accepted with no effect, and listed.
        let m = one("ssh://h?max-connections=4&log-fd=4&path-info-cache-size=0&priority=10&trusted=1\
             &want-mass-query=yes&system-features=kvm%20big&extra-system-features=nixos-test\
             &store=/nix/store&max-connection-age=60 x86_64-linux - 1 1 kvm");
        assert_eq!(
            m.inert_settings,
            [
                "max-connections=4",
                "log-fd=4",
                "path-info-cache-size=0",
                "priority=10",
                "trusted=1",
                "want-mass-query=yes",
                "system-features=kvm big",
                "extra-system-features=nixos-test",
                "max-connection-age=60"
            ]
        );
        assert_eq!(m.supported_features, ["kvm"], "features come from the fields, as in Nix");
        let m = one("ssh-ng://h?max-connections=2&max-connection-age=5&store=/nix/store/ x86_64-linux");
        assert_eq!(m.inert_settings, ["max-connections=2", "max-connection-age=5"]);
    }

    #[test]
    fn settings_with_bad_values_and_unknown_settings_are_refused() {
        for (line, want) in [
            ("ssh://h?compress=maybe x86_64-linux", "\"compress\" has invalid value \"maybe\""),
            ("ssh://h?trusted=2 x86_64-linux", "\"trusted\" has invalid value"),
            ("ssh://h?want-mass-query= x86_64-linux", "\"want-mass-query\" has invalid value"),
            ("ssh://h?max-connections=many x86_64-linux", "\"max-connections\" has invalid value"),
            ("ssh://h?priority=1.5 x86_64-linux", "\"priority\" has invalid value"),
            ("ssh-ng://h?max-connection-age=-1 x86_64-linux", "\"max-connection-age\" has invalid value"),
            ("ssh://h?log-fd=x x86_64-linux", "\"log-fd\" has invalid value"),
            ("ssh://h?path-info-cache-size=big x86_64-linux", "\"path-info-cache-size\" has invalid value"),
            ("ssh://h?store=/gnu/store x86_64-linux", "Kiln builds for /nix/store"),
            ("ssh://h?remote-program= x86_64-linux", "remote-program is empty"),
            ("ssh://h5?colour=red x86_64-linux", "unknown store setting \"colour\""),
            (
                "ssh-ng://h?ssh-kye=/k x86_64-linux",
                "unknown store setting \"ssh-kye\" (not one Nix accepts for ssh-ng://",
            ),
            ("ssh://h?%73sh-key=/k x86_64-linux", "unknown store setting \"%73sh-key\""),
            ("ssh://h?compress=1&compress=0 x86_64-linux", "\"compress\" is given twice"),
            ("ssh://h?compress x86_64-linux", "has no value"),
            ("ssh://h?ssh-key=/a%2 x86_64-linux", "bad percent-encoding"),
            ("ssh://h?ssh-key=/a%zz x86_64-linux", "bad percent-encoding"),
            ("ssh://h?base64-ssh-public-host-key=bm9wZQ%3D%3D x86_64-linux", "not an OpenSSH public key line"),
            ("ssh://h?base64-ssh-public-host-key=!! x86_64-linux", "(base64-ssh-public-host-key) is not base64"),
            ("http://cache.example.org x86_64-linux", "scheme \"http\" cannot build"),
            ("unix:///run/nix x86_64-linux", "scheme \"unix\""),
            ("/tmp/store x86_64-linux", "local store path"),
            ("local?root=/tmp/s x86_64-linux", "localhost?remote-store="),
            ("@/etc/nix/more-machines", "includes (@/etc/nix/more-machines) are not supported"),
            ("ssh://-oProxyCommand=x x86_64-linux", "bad host"),
        ] {
            let r = reason(line);
            assert!(r.contains(want), "{line}: {r}");
        }
    }

    #[test]
    fn bad_lines_are_reported_and_skipped() {
        let text = "ok x86_64-linux\nbad x86_64-linux - many\nssh-ng://h x86_64-linux ; gone://h\nnosystems\nh2 x86_64-linux - 1 0\nh3 x86_64-linux - - - - - notbase64!\nok x86_64-linux\nh4 x86_64-linux - 1 1 - - - extra\nssh://h5?colour=red x86_64-linux\n";
        let (m, e) = parse(text);
        assert_eq!(m.iter().map(|m| m.uri.as_str()).collect::<Vec<_>>(), ["ok", "ssh-ng://h", "nosystems"]);
        let lines: Vec<usize> = e.iter().map(|e| e.line).collect();
        assert_eq!(lines, [2, 3, 5, 6, 7, 8, 9]);
        assert!(e[0].reason.contains("max jobs"));
        assert_eq!(e[1].entry, "gone://h");
        assert!(e[1].reason.contains("\"gone\""));
        assert!(e[4].reason.contains("twice"));
        assert!(e[6].reason.contains("colour"));
        assert_eq!(e[0].to_string(), "line 2: max jobs \"many\" is not a number");
        assert_eq!(e[0].entry, "bad x86_64-linux - many");
    }

    #[test]
    fn comments_end_at_the_next_entry_as_in_nix() {
        let (m, e) = parse("a x86_64-linux # old ; b x86_64-linux\n# c x86_64-linux\nlocal; daemon ; auto\n");
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(m.iter().map(|m| m.uri.as_str()).collect::<Vec<_>>(), ["a", "b", "local", "daemon", "auto"]);
        assert!(m[2..].iter().all(|m| m.transport == Transport::Local && m.scheme == Scheme::Local));
    }
}
