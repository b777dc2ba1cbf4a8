//! Running one step on one machine: get the input closure onto the builder
//! (what it lacks: it substitutes upstream paths itself when it can, Kiln
//! sends the rest from its cache, the local store or an upstream), build
//! the derivation with the log streamed into the log store, and fetch each
//! output with its path info straight into the cache. What goes wrong is
//! sorted by whose fault it is: the derivation's (it failed), the
//! machine's (connection, protocol, transfer: retried elsewhere), or the
//! coordinator's own (cache storage full, an input gone, an upstream that
//! no longer delivers), which never counts against the machine.

use std::collections::HashSet;
use std::time::Duration;

use crate::builder::connection::{ConnectError, Connection};
use crate::builder::serve::{BuildOptions, BuildStatus as NixStatus, ServeError};
use crate::cache::{Cache, CacheError, Origin, PathInfo};
use crate::db::builds::BuildStatus;
use crate::nix::{Hash, StorePath};
use crate::upstream::Upstreams;

use super::inputs::{InputError, SendError, Source, input_closure, send_path};

/// The result of one attempt. Its log is on disk, not here: the attempt
/// started it in the log store ([`run_step`]'s `log`).
#[derive(Debug)]
pub enum Outcome {
    /// Built (or already there): output name and path. `failed_output`:
    /// an output has `nix-support/failed` (Hydra's "failed with output");
    /// `products` and `metrics`: what the outputs' `nix-support/` declared.
    Built {
        outputs: Vec<(String, String)>,
        failed_output: bool,
        products: Vec<crate::products::Product>,
        metrics: Vec<crate::products::Metric>,
    },
    /// The derivation's own failure, or a limit it exceeded: not retried.
    Failed { status: BuildStatus, error: String },
    /// The machine's or the connection's fault: retried elsewhere.
    MachineFault { error: String },
    /// The coordinator's own fault: reported as itself, never blamed on
    /// the machine, not remembered as a failure of the derivation.
    CoordinatorFault { error: String },
    /// Inputs an upstream offered could not be had after all: they are to
    /// be built instead.
    Unsubstitutable { paths: Vec<String>, error: String },
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

pub struct StepSpec<'a> {
    pub drv_path: &'a str,
    /// Which try of the step this is (1 for the first): names its log.
    pub try_no: u32,
    pub max_silent_s: u64,
    pub timeout_s: u64,
    pub max_log_bytes: u64,
    /// Ask the builder to substitute upstream inputs itself first.
    pub builders_substitute: bool,
    /// Keep upstream inputs in Kiln's cache as they are sent.
    pub mirror_upstream: bool,
    /// Written at the top of the log (why an upstream copy was not used).
    pub note: Option<&'a str>,
}

/// Builds one step on `conn`. `phase` is told of each phase as it starts.
/// If it builds, the build's log goes to `log`, started here; whatever
/// this returns, the caller ends that log (see `dispatch::run_attempt`):
/// after a clean end it is detached from the connection already, after a
/// broken one its last bytes arrive when the connection is dropped.
pub async fn run_step(
    conn: &mut Connection,
    cache: &Cache,
    upstreams: &Upstreams,
    logs: &crate::logs::Logs,
    spec: &StepSpec<'_>,
    log: &mut Option<crate::logs::LiveLog>,
    mut phase: impl FnMut(&'static str),
) -> Result<Outcome, StepError> {
    let coordinator = |error: String| Ok(Outcome::CoordinatorFault { error });
    let drv = match super::walk::read_drv(spec.drv_path).await {
        Ok(d) => d,
        Err(e) => return coordinator(e),
    };

    // The outputs of input derivations this one uses, and its sources.
    let mut inputs: Vec<String> = Vec::new();
    for (input, outs) in &drv.input_drvs {
        let d = match super::walk::read_drv(&input.to_string()).await {
            Ok(d) => d,
            Err(e) => return coordinator(e),
        };
        for o in &d.outputs {
            if outs.contains(&o.name) && !o.path.is_empty() {
                inputs.push(o.path.clone());
            }
        }
    }
    let input_outputs = inputs.clone();
    inputs.extend(drv.input_srcs.iter().map(|p| p.to_string()));

    // The closure of the inputs, references first, and what the builder lacks.
    let (closure, mut valid) = match input_closure(conn, cache, upstreams, &inputs).await {
        Ok(c) => c,
        Err(InputError::Coordinator(e)) => return coordinator(e),
        Err(InputError::Upstream(paths, error)) => {
            return Ok(unsubstitutable(cache, paths, &input_outputs, error).await);
        }
        Err(InputError::Serve(e)) => return Err(e.into()),
    };
    let from_upstream: Vec<String> = closure
        .iter()
        .filter(|(p, _, s)| matches!(s, Source::Upstream(_)) && !valid.contains(p))
        .map(|(p, _, _)| p.clone())
        .collect();
    // Mirroring means Kiln fetches upstream inputs itself, into its cache.
    if spec.builders_substitute && !spec.mirror_upstream && !from_upstream.is_empty() {
        phase("sending inputs");
        // Substitution can take a while on a big closure; the build's own
        // timeout bounds it.
        let wait = Duration::from_secs(spec.timeout_s.max(600));
        valid.extend(conn.serve.substitute_paths(&from_upstream, wait).await?);
    }
    let missing: Vec<_> = closure.into_iter().filter(|(p, _, _)| !valid.contains(p)).collect();
    if !missing.is_empty() {
        phase("sending inputs");
        for (path, info, source) in &missing {
            match send_path(conn, cache, upstreams, path, info, source, spec.mirror_upstream).await {
                Ok(()) => {}
                Err(SendError::Upstream(e)) => {
                    return Ok(unsubstitutable(cache, vec![path.clone()], &input_outputs, e).await);
                }
                Err(SendError::Coordinator(e)) => return coordinator(e),
                Err(SendError::Serve(e)) => return Err(e.into()),
            }
        }
    }

    // A builder that already has the outputs (a retry after Kiln died, say)
    // succeeds at once: Hydra would loop on it (NixOS/hydra#431).
    let outputs: Vec<(String, String)> =
        drv.outputs.iter().filter(|o| !o.path.is_empty()).map(|o| (o.name.clone(), o.path.clone())).collect();
    let out_paths: Vec<String> = outputs.iter().map(|(_, p)| p.clone()).collect();
    let already: HashSet<String> = conn.serve.query_valid_paths(&out_paths, true).await?.into_iter().collect();
    if already.len() < out_paths.len() {
        phase("building");
        let limit = spec.max_log_bytes.clamp(1 << 20, 256 << 20);
        let live = match logs.start(spec.drv_path, spec.try_no, limit) {
            Ok(l) => log.insert(l),
            Err(e) => return coordinator(format!("cannot write the build log: {e}")),
        };
        if let Some(note) = spec.note {
            live.append(&format!("kiln: {note}\n")).await;
        }
        conn.log_to(live.sink());
        let opts = BuildOptions {
            max_silent_s: spec.max_silent_s,
            timeout_s: spec.timeout_s,
            max_log_bytes: spec.max_log_bytes,
        };
        // The builder enforces the timeouts; Kiln waits a little longer.
        let wait = Duration::from_secs(spec.timeout_s.max(spec.max_silent_s).saturating_add(120));
        let result = match conn.serve.build_derivation(spec.drv_path, &drv, &input_outputs, opts, wait).await {
            Ok(r) => r,
            Err(e) => return Ok(Outcome::MachineFault { error: e.to_string() }),
        };
        if !result.status.is_success() {
            // The stderr of the build may trail its result (separate pipes,
            // separate SSH streams): a round trip after it, then what the
            // pipe holds, and the log is complete (decision 017).
            conn.serve.query_valid_paths(&[], false).await?;
            conn.end_log().await;
            let status = match result.status {
                NixStatus::TimedOut => BuildStatus::TimedOut,
                NixStatus::LogLimitExceeded => BuildStatus::LogLimitExceeded,
                NixStatus::NotDeterministic => BuildStatus::NotDeterministic,
                NixStatus::PermanentFailure
                | NixStatus::OutputRejected
                | NixStatus::InputRejected
                | NixStatus::DependencyFailed => BuildStatus::Failed,
                // Nix's transient or internal errors are the machine's.
                _ => return Ok(Outcome::MachineFault { error: result.error }),
            };
            return Ok(Outcome::Failed { status, error: result.error });
        }
    }

    phase("receiving outputs");
    let infos = conn.serve.query_path_infos(&out_paths).await?;
    if log.is_some() {
        // That query was the round trip after the build's result.
        conn.end_log().await;
    }
    let parsed: Vec<StorePath> = match out_paths.iter().map(|p| StorePath::parse(p)).collect() {
        Ok(v) => v,
        Err(e) => return Ok(Outcome::MachineFault { error: e.to_string() }),
    };
    let have = match cache.own_paths(&parsed).await {
        Ok(h) => h,
        Err(e) => return Ok(coordinator_fault(&e)),
    };
    let mut failed_output = false;
    let (mut products, mut metrics) = (Vec::new(), Vec::new());
    for ((_, path), sp) in outputs.iter().zip(parsed) {
        if have.contains(path) {
            continue;
        }
        let Some(info) = infos.iter().find(|i| &i.path == path) else {
            return Ok(Outcome::MachineFault { error: format!("the builder lacks {path} after building it") });
        };
        // Known before a byte moves: the output limit is the derivation's
        // problem (Hydra's status 11), not a transfer to retry.
        if info.nar_size > cache.max_output_bytes() {
            let error = output_limit(path, info.nar_size, cache.max_output_bytes());
            return Ok(Outcome::Failed { status: BuildStatus::OutputLimitExceeded, error });
        }
        let references = match info.references.iter().map(|r| StorePath::parse(r)).collect::<Result<Vec<_>, _>>() {
            Ok(r) => r,
            Err(e) => return Ok(Outcome::MachineFault { error: e.to_string() }),
        };
        let deriver = StorePath::parse(spec.drv_path).ok();
        let expect = Hash::parse(&info.nar_hash).ok().map(|h| (h, info.nar_size));
        let path_info = PathInfo { path: sp, references, deriver, ca: info.ca.clone() };
        // Straight from the connection into the cache: never whole in memory.
        let (rx, mut tx) = tokio::io::duplex(1 << 20);
        let ingest = cache.ingest(path_info, rx, expect, Origin::Build);
        let mut support = crate::products::Support::default();
        let pump = async {
            let r = conn.serve.dump_store_path(path, &mut tx, &mut |e| support.see(&e)).await;
            drop(tx);
            r
        };
        let (ingested, pumped) = tokio::join!(ingest, pump);
        failed_output |= support.failed;
        if let Some(text) = &support.products {
            products.extend(crate::products::parse_products(text, path, &support));
        }
        if let Some(text) = &support.metrics {
            metrics.extend(crate::products::parse_metrics(text));
        }
        // The cache's error explains the pump's (a full disk closes the pipe).
        match ingested {
            Err(CacheError::TooLarge(limit)) => {
                let error = output_limit(path, info.nar_size, limit);
                return Ok(Outcome::Failed { status: BuildStatus::OutputLimitExceeded, error });
            }
            Err(e) if e.is_coordinator_side() => return Ok(coordinator_fault(&e)),
            Err(e) => {
                let error = match pumped {
                    Err(p) if !p.is_local() => p.to_string(),
                    _ => format!("the builder sent a bad output {path}: {e}"),
                };
                return Ok(Outcome::MachineFault { error });
            }
            Ok(_) => pumped?,
        };
    }
    Ok(Outcome::Built { outputs, failed_output, products, metrics })
}

/// Upstream paths that did not arrive, with the step's own inputs that
/// were to come from an upstream: those are what the next walk builds (a
/// failed path deep in an upstream closure has no derivation in the walk).
async fn unsubstitutable(cache: &Cache, mut paths: Vec<String>, inputs: &[String], error: String) -> Outcome {
    let parsed: Vec<StorePath> = inputs.iter().filter_map(|p| StorePath::parse(p).ok()).collect();
    let own = cache.own_paths(&parsed).await.unwrap_or_default();
    paths.extend(inputs.iter().filter(|p| !own.contains(*p)).cloned());
    paths.sort();
    paths.dedup();
    Outcome::Unsubstitutable { paths, error }
}

fn output_limit(path: &str, size: u64, limit: u64) -> String {
    format!("output {path} is {} MiB, more than queue.max_output_mib ({} MiB)", size.div_ceil(1 << 20), limit >> 20)
}

fn coordinator_fault(e: &CacheError) -> Outcome {
    let error = if e.is_storage_full() {
        format!("cache storage full: {e}")
    } else {
        format!("the coordinator could not store the output: {e}")
    };
    Outcome::CoordinatorFault { error }
}
