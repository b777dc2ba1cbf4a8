//! The walk: from the derivations of new builds down through their inputs,
//! one level at a time for all of them together, stopping at every
//! derivation whose outputs are already in Kiln's cache or substitutable
//! from a trusted upstream (nothing below those is read). Each level costs
//! a concurrent read of its `.drv` files, one batched cache lookup and one
//! batched upstream lookup, whatever the number of derivations: a nixpkgs
//! job has thousands of inputs, most of them on the public cache. The
//! result is a plan; the graph turns it into steps.

use std::collections::{HashMap, HashSet};

use crate::cache::{Cache, CacheError};
use crate::nix::{Derivation, StorePath};
use crate::upstream::{Lookup, Upstreams};

/// Blocking threads a level's `.drv` files are read on.
const READ_THREADS: usize = 4;

/// What the walk learned of one derivation.
#[derive(Debug)]
pub(super) enum Node {
    /// Every output is in Kiln's cache.
    Cached,
    /// Every output can be substituted from an upstream.
    Substitutable,
    /// To be built from these input derivations.
    Build {
        system: String,
        features: Vec<String>,
        inputs: Vec<String>,
        /// Why an upstream that offered it could not be used, for its log.
        note: Option<String>,
    },
    /// The `.drv` cannot be read (deleted from the store, say).
    Missing(String),
}

/// Walks down from `tops`; `live` says which derivations already have live
/// steps (not walked again).
pub(super) async fn explore(
    tops: Vec<String>,
    live: impl Fn(&str) -> bool,
    cache: &Cache,
    upstreams: &Upstreams,
) -> Result<HashMap<String, Node>, CacheError> {
    let mut nodes: HashMap<String, Node> = HashMap::new();
    let mut first: HashSet<String> = HashSet::new();
    let mut frontier: Vec<String> = tops.into_iter().filter(|d| !live(d) && first.insert(d.clone())).collect();
    drop(first);
    while !frontier.is_empty() {
        // Read and parsed on blocking threads, a chunk each: one thread
        // hand-off per chunk, not per file.
        let chunk = frontier.len().div_ceil(READ_THREADS).max(1);
        let mut tasks = Vec::new();
        for part in frontier.chunks(chunk) {
            let part = part.to_vec();
            tasks.push(tokio::task::spawn_blocking(move || {
                part.into_iter()
                    .map(|d| {
                        let r = read_drv_blocking(&d);
                        (d, r)
                    })
                    .collect::<Vec<_>>()
            }));
        }
        let mut parsed: Vec<(String, Result<Derivation, String>)> = Vec::new();
        for t in tasks {
            parsed.extend(t.await.map_err(|e| CacheError::Io(std::io::Error::other(e)))?);
        }

        // Output paths of everything on this level, asked about at once.
        let mut outputs: HashMap<String, Vec<StorePath>> = HashMap::new();
        for (d, r) in &parsed {
            if let Ok(drv) = r {
                // A floating content-addressed output has no path yet: built.
                let outs: Option<Vec<StorePath>> = drv.output_paths().map(|(_, p)| p.ok()).collect();
                if let Some(outs) = outs.filter(|o| !o.is_empty()) {
                    outputs.insert(d.clone(), outs);
                }
            }
        }
        let all: Vec<StorePath> = outputs.values().flatten().cloned().collect();
        let cached = cache.own_paths(&all).await?;
        let uncached: Vec<StorePath> = outputs
            .values()
            .filter(|outs| !outs.iter().all(|p| cached.contains(&p.to_string())))
            .flatten()
            .cloned()
            .collect();
        let upstream = if upstreams.is_empty() || uncached.is_empty() {
            HashMap::new()
        } else {
            upstreams.lookup_many(&uncached).await
        };

        let mut inputs_of_level: Vec<String> = Vec::new();
        for (d, r) in parsed {
            let drv = match r {
                Ok(drv) => drv,
                Err(e) => {
                    nodes.insert(d, Node::Missing(e));
                    continue;
                }
            };
            let node = match outputs.get(d.as_str()) {
                Some(outs) if outs.iter().all(|p| cached.contains(&p.to_string())) => Node::Cached,
                Some(outs)
                    if outs.iter().all(|p| {
                        let p = p.to_string();
                        cached.contains(&p) || matches!(upstream.get(&p), Some(Lookup::Found(_)))
                    }) =>
                {
                    Node::Substitutable
                }
                other => {
                    let note = other.and_then(|outs| {
                        let why: Vec<String> = outs
                            .iter()
                            .filter_map(|p| match upstream.get(&p.to_string()) {
                                Some(Lookup::Unusable(r)) => Some(format!("{p}: {r}")),
                                _ => None,
                            })
                            .collect();
                        (!why.is_empty()).then(|| format!("not substituted, built instead: {}", why.join("; ")))
                    });
                    let inputs: Vec<String> = drv.input_drvs.iter().map(|(p, _)| p.to_string()).collect();
                    inputs_of_level.extend(inputs.iter().cloned());
                    Node::Build { system: drv.system.clone(), features: drv.required_features(), inputs, note }
                }
            };
            nodes.insert(d, node);
        }
        // The next level: inputs not walked yet (every derivation of this
        // level is in `nodes` by now), each once.
        let mut next_set: HashSet<&str> = HashSet::new();
        frontier = inputs_of_level
            .iter()
            .filter(|i| !live(i) && !nodes.contains_key(i.as_str()) && next_set.insert(i.as_str()))
            .cloned()
            .collect();
    }
    Ok(nodes)
}

pub(super) async fn read_drv(path: &str) -> Result<Derivation, String> {
    let path = path.to_string();
    tokio::task::spawn_blocking(move || read_drv_blocking(&path)).await.map_err(|e| e.to_string())?
}

fn read_drv_blocking(path: &str) -> Result<Derivation, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "the derivation {path} is missing from the coordinator's Nix store (deleted by hand or by a \
                 garbage collection); evaluate the jobset again to recreate it"
            ));
        }
        Err(e) => return Err(format!("cannot read {path}: {e}")),
    };
    Derivation::parse(&bytes).map_err(|e| format!("{path}: {e}"))
}
