//! Running one step on one machine: send the input closure the builder
//! lacks (from Kiln's cache, or the local store for sources), build the
//! derivation with the log streamed into the log store, and fetch each
//! output with its path info straight into the cache. What goes wrong is
//! sorted into the build's fault (the derivation failed) and the machine's
//! (connection, protocol, transfer), which is retried elsewhere.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::builder::connection::{ConnectError, Connection};
use crate::builder::serve::{AddInfo, BuildOptions, BuildStatus as NixStatus, ServeError};
use crate::cache::{Cache, CacheError, Origin, PathInfo};
use crate::db::builds::BuildStatus;
use crate::nix::{Derivation, Hash, StorePath};

/// The result of one attempt.
#[derive(Debug)]
pub enum Outcome {
    /// Built (or already there): output name and path.
    Built { outputs: Vec<(String, String)>, log: Vec<u8> },
    /// The derivation's own failure: not retried.
    Failed { status: BuildStatus, error: String, log: Vec<u8> },
    /// The machine's or the connection's fault: retried elsewhere.
    MachineFault { error: String, log: Vec<u8> },
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("cache: {0}")]
    Cache(#[from] CacheError),
    #[error("{0}")]
    Other(String),
}

pub struct StepSpec<'a> {
    pub drv_path: &'a str,
    pub max_silent_s: u64,
    pub timeout_s: u64,
    pub max_log_bytes: u64,
}

/// Where an input path's NAR comes from.
enum Source {
    Cache(Box<crate::nix::NarInfo>),
    Local,
}

/// Builds one step on `conn`. `phase` is told of each phase as it starts.
pub async fn run_step(
    conn: &mut Connection,
    cache: &Cache,
    logs: &crate::logs::Logs,
    spec: &StepSpec<'_>,
    mut phase: impl FnMut(&'static str),
) -> Result<Outcome, StepError> {
    let drv_bytes = tokio::fs::read(spec.drv_path)
        .await
        .map_err(|e| StepError::Other(format!("cannot read {}: {e}", spec.drv_path)))?;
    let drv = Derivation::parse(&drv_bytes).map_err(|e| StepError::Other(format!("{}: {e}", spec.drv_path)))?;

    // The outputs of input derivations this one uses, and its sources.
    let mut inputs: Vec<String> = Vec::new();
    for (input, outs) in &drv.input_drvs {
        let text = tokio::fs::read(input.to_string())
            .await
            .map_err(|e| StepError::Other(format!("cannot read {input}: {e}")))?;
        let d = Derivation::parse(&text).map_err(|e| StepError::Other(format!("{input}: {e}")))?;
        for o in &d.outputs {
            if outs.contains(&o.name) && !o.path.is_empty() {
                inputs.push(o.path.clone());
            }
        }
    }
    let input_outputs = inputs.clone();
    inputs.extend(drv.input_srcs.iter().map(|p| p.to_string()));

    // The closure of the inputs, references first.
    let closure = input_closure(cache, &inputs).await?;
    let names: Vec<String> = closure.iter().map(|(p, _, _)| p.clone()).collect();
    let valid: HashSet<String> = conn.serve.query_valid_paths(&names, true).await?.into_iter().collect();
    let missing: Vec<_> = closure.into_iter().filter(|(p, _, _)| !valid.contains(p)).collect();
    if !missing.is_empty() {
        phase("sending inputs");
        for (path, info, source) in &missing {
            send_path(conn, cache, path, info, source).await?;
        }
    }

    // A builder that already has the outputs (a retry after Kiln died, say)
    // succeeds at once: Hydra would loop on it (NixOS/hydra#431).
    let outputs: Vec<(String, String)> =
        drv.outputs.iter().filter(|o| !o.path.is_empty()).map(|o| (o.name.clone(), o.path.clone())).collect();
    let out_paths: Vec<String> = outputs.iter().map(|(_, p)| p.clone()).collect();
    let already: HashSet<String> = conn.serve.query_valid_paths(&out_paths, true).await?.into_iter().collect();
    let mut log = Vec::new();
    if already.len() < out_paths.len() {
        phase("building");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        conn.log_to(Some(tx));
        // The log goes to viewers as it arrives.
        let limit = spec.max_log_bytes.clamp(1 << 20, 256 << 20) as usize;
        logs.start_live(spec.drv_path, limit);
        let live = logs.clone();
        let drv_name = spec.drv_path.to_string();
        let forwarder = tokio::spawn(async move {
            while let Some(chunk) = rx.recv().await {
                live.append_live(&drv_name, &chunk);
            }
        });
        let opts = BuildOptions {
            max_silent_s: spec.max_silent_s,
            timeout_s: spec.timeout_s,
            max_log_bytes: spec.max_log_bytes,
        };
        // The builder enforces the timeouts; Kiln waits a little longer.
        let wait = Duration::from_secs(spec.timeout_s.max(spec.max_silent_s).saturating_add(120));
        let result = conn.serve.build_derivation(spec.drv_path, &drv, &input_outputs, opts, wait).await;
        // Let the last lines of stderr arrive before the log is closed.
        tokio::time::sleep(Duration::from_millis(20)).await;
        conn.log_to(None);
        let _ = forwarder.await;
        log = logs.finish_live(spec.drv_path);
        let result = match result {
            Ok(r) => r,
            Err(e) => return Ok(Outcome::MachineFault { error: e.to_string(), log }),
        };
        if !result.status.is_success() {
            let status = match result.status {
                NixStatus::TimedOut => BuildStatus::TimedOut,
                NixStatus::LogLimitExceeded => BuildStatus::LogLimitExceeded,
                NixStatus::NotDeterministic => BuildStatus::NotDeterministic,
                NixStatus::PermanentFailure
                | NixStatus::OutputRejected
                | NixStatus::InputRejected
                | NixStatus::DependencyFailed => BuildStatus::Failed,
                // Nix's transient or internal errors are the machine's.
                _ => return Ok(Outcome::MachineFault { error: result.error, log }),
            };
            return Ok(Outcome::Failed { status, error: result.error, log });
        }
    }

    phase("receiving outputs");
    let infos = conn.serve.query_path_infos(&out_paths).await?;
    for (_, path) in &outputs {
        let sp = StorePath::parse(path).map_err(|e| StepError::Other(e.to_string()))?;
        if cache.contains(&sp).await? {
            continue;
        }
        let info = infos
            .iter()
            .find(|i| &i.path == path)
            .ok_or_else(|| StepError::Other(format!("the builder lacks {path} after building it")))?;
        let references = info
            .references
            .iter()
            .map(|r| StorePath::parse(r))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StepError::Other(e.to_string()))?;
        let deriver = StorePath::parse(spec.drv_path).ok();
        let expect = Hash::parse(&info.nar_hash).ok().map(|h| (h, info.nar_size));
        let path_info = PathInfo { path: sp, references, deriver, ca: info.ca.clone() };
        // Straight from the connection into the cache: never whole in memory.
        let (rx, mut tx) = tokio::io::duplex(1 << 20);
        let ingest = cache.ingest(path_info, rx, expect, Origin::Build);
        let pump = async {
            let r = conn.serve.dump_store_path(path, &mut tx).await;
            drop(tx);
            r
        };
        let (ingested, pumped) = tokio::join!(ingest, pump);
        pumped?;
        ingested?;
    }
    Ok(Outcome::Built { outputs, log })
}

type ClosureEntry = (String, Option<AddInfo>, Source);

/// The closure of `roots`, references before referrers, each with where
/// its NAR comes from: Kiln's cache if it has it, else the local store.
async fn input_closure(cache: &Cache, roots: &[String]) -> Result<Vec<ClosureEntry>, StepError> {
    let mut infos: HashMap<String, (AddInfo, Source)> = HashMap::new();
    let mut todo: VecDeque<String> = roots.iter().cloned().collect();
    let mut local: Vec<String> = Vec::new();
    while let Some(p) = todo.pop_front() {
        if infos.contains_key(&p) || local.contains(&p) {
            continue;
        }
        let sp = StorePath::parse(&p).map_err(|e| StepError::Other(e.to_string()))?;
        match cache.narinfo(&sp).await? {
            Some(ni) => {
                let add = AddInfo {
                    path: p.clone(),
                    deriver: ni.deriver.as_ref().map(|d| d.to_string()),
                    nar_hash: ni.nar_hash.to_string(),
                    references: ni.references.iter().map(|r| r.to_string()).collect(),
                    nar_size: ni.nar_size,
                    ca: ni.ca.clone(),
                };
                todo.extend(add.references.iter().filter(|r| **r != p).cloned());
                infos.insert(p, (add, Source::Cache(Box::new(ni))));
            }
            None => local.push(p),
        }
    }
    if !local.is_empty() {
        // Sources and .drv inputs live in the coordinator's store.
        let out = crate::nix::command::output(
            "nix",
            ["path-info", "--json", "--recursive"].into_iter().map(String::from).chain(local.iter().cloned()),
        )
        .await
        .map_err(|e| StepError::Other(format!("an input is neither in the cache nor in the local store: {e}")))?;
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
        let list: Vec<Info> = serde_json::from_slice(&out).map_err(|e| StepError::Other(e.to_string()))?;
        for i in list {
            if infos.contains_key(&i.path) {
                continue;
            }
            let add = AddInfo {
                path: i.path.clone(),
                deriver: i.deriver,
                nar_hash: i.nar_hash,
                references: i.references,
                nar_size: i.nar_size,
                ca: i.ca,
            };
            infos.insert(i.path, (add, Source::Local));
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
    Ok(ordered
        .into_iter()
        .map(|p| {
            let (info, source) = infos.remove(&p).expect("visited paths have info");
            (p, Some(info), source)
        })
        .collect())
}

async fn send_path(
    conn: &mut Connection,
    cache: &Cache,
    path: &str,
    info: &Option<AddInfo>,
    source: &Source,
) -> Result<(), StepError> {
    let info = info.as_ref().expect("closure entries carry info");
    match source {
        Source::Local => {
            let (rx, mut tx) = tokio::io::duplex(1 << 20);
            let p = Path::new(path).to_path_buf();
            let dump = tokio::spawn(async move { crate::nix::nar::dump_path_async(&p, &mut tx).await });
            let mut rx = rx;
            conn.serve.add_to_store_nar(info, &mut rx).await?;
            dump.await.map_err(|e| StepError::Other(e.to_string()))?.map_err(|e| StepError::Other(e.to_string()))?;
        }
        Source::Cache(ni) => {
            // Decompressed on a blocking thread, streamed through a pipe.
            let file = cache.storage().path(&ni.url).map_err(CacheError::from)?;
            let compression = ni.compression.clone();
            let (rx, tx) = tokio::io::duplex(1 << 20);
            let writer = tokio::spawn(async move {
                let mut tx = tx;
                let (btx, mut brx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
                let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    let f = std::io::BufReader::new(std::fs::File::open(&file)?);
                    let mut r: Box<dyn std::io::Read> = match compression.as_str() {
                        "zstd" => Box::new(zstd::stream::read::Decoder::with_buffer(f)?),
                        "xz" => Box::new(xz2::read::XzDecoder::new(f)),
                        _ => Box::new(f),
                    };
                    loop {
                        let mut buf = vec![0u8; 256 * 1024];
                        let n = r.read(&mut buf)?;
                        if n == 0 {
                            return Ok(());
                        }
                        buf.truncate(n);
                        if btx.blocking_send(buf).is_err() {
                            return Ok(());
                        }
                    }
                });
                use tokio::io::AsyncWriteExt;
                while let Some(chunk) = brx.recv().await {
                    if tx.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                reader.await.map_err(std::io::Error::other)?
            });
            let mut rx = rx;
            conn.serve.add_to_store_nar(info, &mut rx).await?;
            // Drain in case the NAR was longer than narinfo says.
            let mut rest = Vec::new();
            let _ = rx.read_to_end(&mut rest).await;
            writer.await.map_err(|e| StepError::Other(e.to_string()))?.map_err(|e| StepError::Other(e.to_string()))?;
        }
    }
    Ok(())
}
