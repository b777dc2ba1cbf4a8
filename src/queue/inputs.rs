//! A step's inputs: what of their closure the builder lacks, where each
//! missing path's NAR comes from (Kiln's cache, the coordinator's store or
//! a trusted upstream), and sending it to the builder.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use crate::builder::connection::Connection;
use crate::builder::serve::{AddInfo, ServeError};
use crate::cache::{Cache, Origin, PathInfo};
use crate::nix::StorePath;
use crate::upstream::{Found, Lookup, Upstreams};

/// Where an input path's NAR comes from.
pub(super) enum Source {
    Cache(Box<crate::nix::NarInfo>),
    Local,
    Upstream(Arc<Found>),
}

/// Why the inputs could not be gathered.
pub(super) enum InputError {
    /// The coordinator's own trouble (a `.drv` or an input gone).
    Coordinator(String),
    /// These upstream paths cannot be had any more.
    Upstream(Vec<String>, String),
    /// Asking the builder failed: the machine's fault.
    Serve(ServeError),
}

type ClosureEntry = (String, Option<AddInfo>, Source);

/// What the builder lacks of the closure of `roots`, references before
/// referrers, each with where its NAR comes from (Kiln's cache if it has
/// it, else the coordinator's store for sources and `.drv` files, else a
/// trusted upstream); and the paths of it the builder has. Walked a level
/// at a time: the builder is asked once per level which paths it has, and
/// nothing below one it has is looked at (a valid path's references are
/// valid), and the cache is asked once per level for the rest. A nixpkgs
/// input's closure runs to hundreds of paths, most of them on a builder
/// that has built before: asking about each of them cost a query apiece.
pub(super) async fn input_closure(
    conn: &mut Connection,
    cache: &Cache,
    upstreams: &Upstreams,
    roots: &[String],
) -> Result<(Vec<ClosureEntry>, HashSet<String>), InputError> {
    let mut infos: HashMap<String, (AddInfo, Source)> = HashMap::new();
    let mut valid: HashSet<String> = HashSet::new();
    let mut local: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = roots.iter().cloned().collect();
    let mut level: Vec<String> = seen.iter().cloned().collect();
    level.sort();
    while !level.is_empty() {
        let has = conn.serve.query_valid_paths(&level, true).await.map_err(InputError::Serve)?;
        valid.extend(has);
        let need: Vec<StorePath> = level
            .iter()
            .filter(|p| !valid.contains(*p))
            .map(|p| StorePath::parse(p).map_err(|e| InputError::Coordinator(e.to_string())))
            .collect::<Result<_, _>>()?;
        let mut next: Vec<String> = Vec::new();
        let mut below = |refs: &[String], of: &str, next: &mut Vec<String>| {
            for r in refs {
                if r != of && seen.insert(r.clone()) {
                    next.push(r.clone());
                }
            }
        };
        let found =
            cache.narinfos(&need).await.map_err(|e| InputError::Coordinator(format!("reading the cache: {e}")))?;
        let mut elsewhere = Vec::new();
        for sp in need {
            let p = sp.to_string();
            match found.get(&p) {
                Some(ni) => {
                    let add = add_info(ni);
                    below(&add.references, &p, &mut next);
                    infos.insert(p, (add, Source::Cache(Box::new(ni.clone()))));
                }
                None => elsewhere.push(sp),
            }
        }
        if !elsewhere.is_empty() {
            // What the local store has is sent from there (with its
            // closure, below); the rest must come from an upstream.
            let names: Vec<String> = elsewhere.iter().map(|p| p.to_string()).collect();
            let valid_here = local_valid(&names).await.map_err(InputError::Coordinator)?;
            let mut ask = Vec::new();
            for p in elsewhere {
                if valid_here.contains(&p.to_string()) {
                    local.push(p.to_string());
                } else {
                    ask.push(p);
                }
            }
            if !ask.is_empty() {
                let answers = upstreams.lookup_many(&ask).await;
                let mut gone = Vec::new();
                let mut why = Vec::new();
                for p in ask {
                    let name = p.to_string();
                    match answers.get(&name) {
                        Some(Lookup::Found(f)) => {
                            let add = add_info(&f.narinfo);
                            below(&add.references, &name, &mut next);
                            infos.insert(name, (add, Source::Upstream(f.clone())));
                        }
                        Some(Lookup::Unusable(r)) => {
                            why.push(r.to_string());
                            gone.push(name);
                        }
                        _ => gone.push(name),
                    }
                }
                if !gone.is_empty() {
                    let error = format!(
                        "input {} is in neither Kiln's cache, the coordinator's store nor an upstream{}",
                        gone.join(", "),
                        if why.is_empty() { String::new() } else { format!(" ({})", why.join("; ")) }
                    );
                    return Err(if upstreams.is_empty() {
                        InputError::Coordinator(error)
                    } else {
                        InputError::Upstream(gone, error)
                    });
                }
            }
        }
        level = next;
    }
    if !local.is_empty() {
        let closure = local_infos(&local).await.map_err(InputError::Coordinator)?;
        let names: Vec<String> = closure.iter().map(|(p, _)| p.clone()).filter(|p| !valid.contains(p)).collect();
        if !names.is_empty() {
            valid.extend(conn.serve.query_valid_paths(&names, true).await.map_err(InputError::Serve)?);
        }
        for (path, add) in closure {
            if !valid.contains(&path) {
                infos.entry(path).or_insert((add, Source::Local));
            }
        }
    }
    // References first (the builder refuses a path whose references are missing).
    let mut ordered = Vec::with_capacity(infos.len());
    let mut done: HashSet<String> = HashSet::new();
    let mut keys: Vec<String> = infos.keys().cloned().collect();
    keys.sort();
    fn visit(p: &str, infos: &HashMap<String, (AddInfo, Source)>, done: &mut HashSet<String>, out: &mut Vec<String>) {
        if !done.insert(p.to_string()) {
            return;
        }
        if let Some((info, _)) = infos.get(p) {
            for r in &info.references {
                if r != p {
                    visit(r, infos, done, out);
                }
            }
            out.push(p.to_string());
        }
    }
    for k in &keys {
        visit(k, &infos, &mut done, &mut ordered);
    }
    let entries = ordered
        .into_iter()
        .map(|p| {
            let (info, source) = infos.remove(&p).expect("visited paths have info");
            (p, Some(info), source)
        })
        .collect();
    Ok((entries, valid))
}

fn add_info(ni: &crate::nix::NarInfo) -> AddInfo {
    AddInfo {
        path: ni.store_path.to_string(),
        deriver: ni.deriver.as_ref().map(|d| d.to_string()),
        nar_hash: ni.nar_hash.to_string(),
        references: ni.references.iter().map(|r| r.to_string()).collect(),
        nar_size: ni.nar_size,
        ca: ni.ca.clone(),
    }
}

/// Which of `paths` the coordinator's own Nix store holds.
async fn local_valid(paths: &[String]) -> Result<HashSet<String>, String> {
    let invalid = crate::nix::command::output(
        "nix-store",
        ["--check-validity", "--print-invalid"].into_iter().map(String::from).chain(paths.iter().cloned()),
    )
    .await
    .map_err(|e| format!("asking the local store: {e}"))?;
    let invalid: HashSet<&str> = std::str::from_utf8(&invalid).unwrap_or("").lines().collect();
    Ok(paths.iter().filter(|p| !invalid.contains(p.as_str())).cloned().collect())
}

/// Path infos of local store paths and their closures.
async fn local_infos(paths: &[String]) -> Result<Vec<(String, AddInfo)>, String> {
    let out = crate::nix::command::output(
        "nix",
        ["path-info", "--json", "--recursive"].into_iter().map(String::from).chain(paths.iter().cloned()),
    )
    .await
    .map_err(|e| format!("an input is missing from the coordinator's store: {e}"))?;
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Info {
        path: String,
        nar_hash: String,
        nar_size: u64,
        #[serde(default)]
        references: Vec<String>,
        deriver: Option<String>,
        ca: Option<String>,
    }
    let list: Vec<Info> = serde_json::from_slice(&out).map_err(|e| e.to_string())?;
    Ok(list
        .into_iter()
        .map(|i| {
            let add = AddInfo {
                path: i.path.clone(),
                deriver: i.deriver,
                nar_hash: i.nar_hash,
                references: i.references,
                nar_size: i.nar_size,
                ca: i.ca,
            };
            (i.path, add)
        })
        .collect())
}

pub(super) enum SendError {
    /// The connection failed: the machine's fault.
    Serve(ServeError),
    /// The coordinator could not read what it was to send.
    Coordinator(String),
    /// The upstream did not deliver.
    Upstream(String),
}

pub(super) async fn send_path(
    conn: &mut Connection,
    cache: &Cache,
    upstreams: &Upstreams,
    path: &str,
    info: &Option<AddInfo>,
    source: &Source,
    mirror: bool,
) -> Result<(), SendError> {
    let info = info.as_ref().expect("closure entries carry info");
    let local_side = |e: ServeError, what: &dyn Fn(String) -> SendError| match e {
        ServeError::Local(io) => what(format!("sending {path}: {io}")),
        other => SendError::Serve(other),
    };
    match source {
        Source::Local => {
            let (mut rx, mut tx) = tokio::io::duplex(1 << 20);
            let p = Path::new(path).to_path_buf();
            let dump = tokio::spawn(async move { crate::nix::nar::dump_path_async(&p, &mut tx).await });
            let sent = conn.serve.add_to_store_nar(info, &mut rx).await;
            let dumped = dump.await.map_err(|e| SendError::Coordinator(e.to_string()))?;
            if let Err(e) = dumped {
                return Err(SendError::Coordinator(format!("reading {path} from the local store: {e}")));
            }
            sent.map_err(|e| local_side(e, &SendError::Coordinator))
        }
        Source::Cache(ni) => {
            let f = match cache.storage().reader(&ni.url).await {
                Ok(Some(f)) => f,
                Ok(None) => {
                    return Err(SendError::Coordinator(format!(
                        "input {path} is in the cache index but its NAR {} is missing",
                        ni.url
                    )));
                }
                Err(e) => {
                    return Err(SendError::Coordinator(format!(
                        "input {path} is in the cache index but its NAR cannot be read: {e}"
                    )));
                }
            };
            let mut nar = crate::nix::compression::decompressing(&ni.compression, f)
                .map_err(|e| SendError::Coordinator(e.to_string()))?;
            conn.serve.add_to_store_nar(info, &mut nar).await.map_err(|e| local_side(e, &SendError::Coordinator))
        }
        Source::Upstream(found) => {
            if mirror {
                // Into Kiln's cache first (verified against its NarHash),
                // then on from there.
                let nar = upstreams.nar(found).await.map_err(|e| SendError::Upstream(e.to_string()))?;
                let ni = &found.narinfo;
                let pi = PathInfo {
                    path: ni.store_path.clone(),
                    references: ni.references.clone(),
                    deriver: ni.deriver.clone(),
                    ca: ni.ca.clone(),
                };
                let (stored, _) =
                    match cache.ingest(pi, nar, Some((ni.nar_hash.clone(), ni.nar_size)), Origin::Upstream).await {
                        Ok(r) => r,
                        Err(e) if e.is_coordinator_side() => return Err(SendError::Coordinator(e.to_string())),
                        Err(e) => return Err(SendError::Upstream(format!("{}: {e}", found.base))),
                    };
                return Box::pin(send_path(
                    conn,
                    cache,
                    upstreams,
                    path,
                    &Some(info.clone()),
                    &Source::Cache(Box::new(stored)),
                    false,
                ))
                .await;
            }
            let mut nar = upstreams.nar(found).await.map_err(|e| SendError::Upstream(e.to_string()))?;
            // The builder checks the NAR against its NarHash as it adds it.
            conn.serve
                .add_to_store_nar(info, &mut nar)
                .await
                .map_err(|e| local_side(e, &|m| SendError::Upstream(format!("{}: {m}", found.base))))
        }
    }
}
