//! The `kiln` command line: parses arguments, loads the configuration, sets
//! up logging, and hands over to the library. Exit codes: 0 ok, 1 a job or
//! check failed (or an operation failed), 2 bad usage or configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln::config::{Config, LogFormat};

#[derive(Parser)]
#[command(name = "kiln", version, about = "A continuous-integration build coordinator for Nix flakes")]
struct Cli {
    /// Configuration file (default: $KILN_CONFIG, else ./kiln.toml, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator: web UI, API and binary cache.
    Serve {
        /// The parts this process runs, of web,eval,queue,notify (default:
        /// all). Processes with different roles share one database; one
        /// queue runner per database, the others stand by.
        #[arg(long, value_name = "ROLES", default_value = "web,eval,queue,notify")]
        roles: String,
    },
    /// Evaluate a flake attribute into jobs once and print them.
    Eval {
        /// One JSON object per job and line (nix-eval-jobs' fields).
        #[arg(long)]
        json: bool,
        /// Evaluator processes (default: eval.workers).
        #[arg(long)]
        workers: Option<usize>,
        /// Memory limit per evaluator process in MiB (default: eval.max_memory_mib).
        #[arg(long, value_name = "MiB")]
        max_memory: Option<u64>,
        /// Keep only jobs for these systems (repeatable).
        #[arg(long = "system", value_name = "SYSTEM")]
        systems: Vec<String>,
        /// FLAKE_REF#ATTR, e.g. .#hydraJobs; without #ATTR, hydraJobs if present, else checks.
        #[arg(value_name = "FLAKE_REF#ATTR")]
        installable: String,
    },
    /// Evaluate a flake attribute and build every job on the builders, without a server.
    Build {
        /// Nix machines file (default: machines_file, else this machine).
        #[arg(long, value_name = "FILE")]
        machines: Option<PathBuf>,
        /// Keep the state (database, logs, signing key) here and reuse it in
        /// later runs (default: a temporary directory, removed at exit).
        #[arg(long, value_name = "DIR")]
        state: Option<PathBuf>,
        /// Binary cache directory to build into, kept after the run
        /// (default: <state>/cache, temporary without --state).
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// One JSON object per job (job, drvPath, buildstatus, status, outputs, machine, error, cache).
        #[arg(long)]
        json: bool,
        #[arg(value_name = "FLAKE_REF#ATTR")]
        installable: String,
    },
    /// The builders of the machines file.
    Machines {
        #[command(subcommand)]
        command: MachinesCommand,
    },
    /// Manage the binary cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Deploy an environment now, from this machine, with progress here:
    /// the break-glass path when the web UI cannot be reached. Runs the
    /// deployment itself unless a running server holds the environment
    /// (then follows it). Exit status 0 when it succeeded.
    Deploy {
        /// ENVIRONMENT, or PROJECT/ENVIRONMENT when several projects have one by that name.
        environment: String,
        /// The evaluation (default: the jobset's newest that succeeded).
        #[arg(long, value_name = "ID")]
        eval: Option<i64>,
        /// Only these hosts (comma-separated; default: every host).
        #[arg(long, value_name = "HOST,...", value_delimiter = ',')]
        hosts: Vec<String>,
    },
    /// Run on a pull host (`pull = true` in its environment): take each
    /// closure Kiln deploys to this host, switch to it, check it, roll back
    /// on failure, and report every step to Kiln.
    Agent {
        /// Kiln's URL, e.g. https://ci.example.org.
        #[arg(long, value_name = "URL")]
        server: String,
        /// This host's name in its environment.
        #[arg(long, value_name = "NAME")]
        host: String,
        /// The file holding this host's agent token ([deploy] agent_token_files on the server).
        #[arg(long, value_name = "FILE")]
        token_file: PathBuf,
    },
    /// Manage the database.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Make a signing key pair in Nix's format (name:base64).
    Keygen {
        /// Key name, e.g. ci.example.org-1.
        name: String,
        /// Where to write the secret key (mode 0600; never overwritten).
        #[arg(long, value_name = "FILE")]
        secret: PathBuf,
        /// Where to write the public key.
        #[arg(long, value_name = "FILE")]
        public: PathBuf,
    },
    /// Copy a cache directory into the configured storage (cache.storage =
    /// "s3"): NARs first, then narinfos; objects already there are skipped,
    /// so it resumes where it stopped. The old directory keeps serving
    /// meanwhile; run it once more after switching over.
    Copy {
        /// The cache directory to copy (e.g. kiln-state/cache).
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
    },
    /// Delete what retention no longer keeps (see cache.keep_uploads_days).
    Gc {
        /// Only report what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum MachinesCommand {
    /// Connect to every builder and report its Nix version and round-trip time.
    Check {
        /// Nix machines file (default: machines_file).
        #[arg(long, value_name = "FILE")]
        machines: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Apply pending migrations (serve does this at start too).
    Migrate,
}

/// Errors at the binary's edge, with the exit code each one means.
enum Failure {
    Usage(anyhow::Error),
    Failed(anyhow::Error),
    /// Stopped by SIGINT or SIGTERM (exit 130, as a shell reports SIGINT).
    Interrupted,
}

impl From<kiln::config::ConfigError> for Failure {
    fn from(e: kiln::config::ConfigError) -> Self {
        Failure::Usage(e.into())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("kiln: {e:#}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(e)) => {
            eprintln!("kiln: {e:#}");
            ExitCode::from(1)
        }
        Err(Failure::Interrupted) => {
            eprintln!("kiln: interrupted");
            ExitCode::from(130)
        }
    }
}

fn init_logging(format: LogFormat) {
    init_logging_to(format, std::io::stderr)
}

/// Logging to `writer`, which writes to stderr (colours when it is a terminal).
fn init_logging_to<W>(format: LogFormat, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Runtime::new().map_err(|e| Failure::Failed(e.into()))
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Cache { command: CacheCommand::Keygen { name, secret, public } } => {
            let key = kiln::nix::SigningKey::generate(&name).map_err(|e| Failure::Usage(e.into()))?;
            key.write_files(&secret, &public).map_err(|e| Failure::Failed(e.into()))?;
            println!("{}", key.public());
            Ok(())
        }
        Command::Build { machines, state, cache, json, installable } => {
            use std::io::IsTerminal;
            let config = Config::load(cli.config.as_deref())?;
            let places = kiln::build::Places::new(state, cache)
                .map_err(|e| Failure::Failed(anyhow::anyhow!("cannot make the state directory: {e}")))?;
            let config = places.configure(config);
            let tty = std::io::stderr().is_terminal();
            let progress = (!json || tty).then(|| kiln::build::Progress::new(tty));
            match &progress {
                Some(p) => {
                    let p = p.clone();
                    init_logging_to(config.log_format, move || p.log_writer())
                }
                None => init_logging(config.log_format),
            }
            let rt = runtime()?;
            let result = rt.block_on(build_command(config, &places, machines, json, installable, progress));
            // The queue's tasks (SSH masters, local builders) end before
            // the directory that holds their sockets is removed.
            rt.shutdown_timeout(std::time::Duration::from_secs(10));
            drop(places);
            result
        }
        Command::Machines { command: MachinesCommand::Check { machines } } => {
            let config = Config::load(cli.config.as_deref())?;
            init_logging(config.log_format);
            runtime()?.block_on(machines_check(config, machines))
        }
        Command::Cache { command: CacheCommand::Copy { from } } => {
            let config = Config::load(cli.config.as_deref())?;
            init_logging(config.log_format);
            runtime()?.block_on(async {
                let fail = |e: &dyn std::fmt::Display| Failure::Failed(anyhow::anyhow!("{e}"));
                if config.cache.storage != kiln::config::StorageKind::S3 {
                    return Err(fail(
                        &"kiln cache copy copies into a bucket: set cache.storage = \"s3\" and [cache.s3]",
                    ));
                }
                let storage = kiln::cache::Storage::open_s3(&config.cache.s3, &config.state_dir.join("cache-spool"))
                    .map_err(|e| fail(&e))?;
                let r = kiln::cache::copy::copy_dir(&from, &storage, |k| println!("copied {k}"))
                    .await
                    .map_err(|e| fail(&e))?;
                println!(
                    "copied {} files ({} bytes) to {}; {} were there already",
                    r.copied,
                    r.copied_bytes,
                    storage.location(),
                    r.skipped
                );
                Ok(())
            })
        }
        Command::Cache { command: CacheCommand::Gc { dry_run } } => {
            let config = Config::load(cli.config.as_deref())?;
            init_logging(config.log_format);
            runtime()?.block_on(async {
                let fail = |e: &dyn std::fmt::Display| Failure::Failed(anyhow::anyhow!("{e}"));
                let db = kiln::serve::open_db(&config).await.map_err(|e| fail(&e))?;
                let (key, _) =
                    kiln::cache::load_or_generate_key(&config.cache_secret_key_file(), &config.cache.key_name)
                        .map_err(|e| fail(&e))?;
                let cache = kiln::cache::Cache::open(&config, db.clone(), key).map_err(|e| fail(&e))?;
                let r = kiln::cache::gc::collect(&cache, config.cache.keep_uploads_days, dry_run)
                    .await
                    .map_err(|e| fail(&e))?;
                let verb = if dry_run { "would delete" } else { "deleted" };
                for p in &r.deleted_paths {
                    println!("{verb} {p}");
                }
                println!(
                    "{verb} {} paths and {} files ({} bytes); kept {} paths",
                    r.deleted_paths.len(),
                    r.deleted_files,
                    r.freed_bytes,
                    r.kept_paths
                );
                db.close().await;
                Ok(())
            })
        }
        Command::Eval { json, workers, max_memory, systems, installable } => {
            let config = Config::load(cli.config.as_deref())?;
            init_logging(config.log_format);
            let req = EvalArgs {
                installable,
                workers: workers.unwrap_or(config.eval.workers),
                max_memory_mib: max_memory.unwrap_or(config.eval.max_memory_mib),
                timeout_s: config.eval.timeout_s,
                evaluator: config.eval.evaluator,
                systems,
            };
            if req.workers == 0 {
                return Err(Failure::Usage(anyhow::anyhow!("--workers must be at least 1")));
            }
            runtime()?.block_on(eval_command(req, json))
        }
        Command::Deploy { environment, eval, hosts } => {
            let config = Config::load(cli.config.as_deref())?;
            init_logging(config.log_format);
            runtime()?.block_on(deploy_command(config, environment, eval, hosts))
        }
        Command::Agent { server, host, token_file } => {
            init_logging(LogFormat::Text);
            if !(server.starts_with("http://") || server.starts_with("https://")) {
                return Err(Failure::Usage(anyhow::anyhow!("--server must be an http:// or https:// URL")));
            }
            let token = kiln::config::read_secret(&token_file).map_err(|e| Failure::Usage(anyhow::anyhow!(e)))?;
            let reporter = kiln::deploy::agent::Reporter::new(&server, &host, token);
            runtime()?.block_on(async {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .map_err(|e| Failure::Failed(e.into()))?;
                let stop = async move {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                };
                kiln::deploy::agent::run(reporter, stop).await;
                Ok(())
            })
        }
        Command::Db { command: DbCommand::Migrate } => {
            let config = Config::load(cli.config.as_deref())?;
            init_logging(config.log_format);
            runtime()?.block_on(async {
                let db = kiln::serve::open_db(&config).await.map_err(|e| Failure::Failed(e.into()))?;
                db.close().await;
                Ok(())
            })
        }
        Command::Serve { roles } => {
            let roles =
                kiln::serve::Roles::parse(&roles).map_err(|e| Failure::Usage(anyhow::anyhow!("--roles: {e}")))?;
            let config = Config::load(cli.config.as_deref())?;
            init_logging(config.log_format);
            runtime()?.block_on(kiln::serve::run_roles(config, roles)).map_err(|e| match e {
                kiln::serve::ServeError::Config(c) => Failure::Usage(c.into()),
                e => Failure::Failed(e.into()),
            })
        }
    }
}

struct EvalArgs {
    installable: String,
    workers: usize,
    max_memory_mib: u64,
    timeout_s: u64,
    evaluator: kiln::config::Evaluator,
    systems: Vec<String>,
}

async fn eval_command(args: EvalArgs, json: bool) -> Result<(), Failure> {
    use kiln::eval;
    use std::io::Write;
    let (reference, attr) = match args.installable.rsplit_once('#') {
        Some((r, a)) => (r.to_string(), Some(a.to_string())),
        None => (args.installable.clone(), None),
    };
    let start = std::time::Instant::now();
    let locked = eval::lock(&reference).await.map_err(|e| Failure::Failed(e.into()))?;
    let attr = match attr.filter(|a| !a.is_empty()) {
        Some(a) => a,
        None => eval::default_root(&locked.url).await.map_err(|e| Failure::Failed(e.into()))?.to_string(),
    };
    let req = eval::EvalRequest {
        flake_ref: locked.url,
        roots: vec![eval::Root::parse(&attr, false)],
        systems: args.systems,
        workers: args.workers,
        max_memory_mib: args.max_memory_mib,
        timeout: std::time::Duration::from_secs(args.timeout_s),
        evaluator: args.evaluator,
        group_roots: false,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<eval::Job>();
    let printer = tokio::spawn(async move {
        let mut out = std::io::BufWriter::new(std::io::stdout());
        while let Some(job) = rx.recv().await {
            let line = if json {
                serde_json::to_string(&job).expect("jobs serialise")
            } else {
                match (&job.error, &job.drv_path) {
                    (Some(e), _) => {
                        format!("{}\terror: {}", job.attr, e.lines().next().unwrap_or("").trim_start_matches("error: "))
                    }
                    (None, Some(d)) => format!("{}\t{d}", job.attr),
                    (None, None) => job.attr.clone(),
                }
            };
            let _ = writeln!(out, "{line}");
            // Jobs stream: flush whenever no more are waiting, so a pipe sees
            // them as they come without a write per line.
            if rx.is_empty() {
                let _ = out.flush();
            }
        }
    });
    let result = eval::evaluate(&req, tx).await;
    let _ = printer.await;
    let stats = result.map_err(|e| Failure::Failed(e.into()))?;
    eprintln!(
        "kiln: {} jobs, {} with errors, in {:.1} s with {} workers ({} nix processes)",
        stats.jobs + stats.errors,
        stats.errors,
        start.elapsed().as_secs_f64(),
        req.workers,
        stats.processes
    );
    if stats.errors > 0 {
        return Err(Failure::Failed(anyhow::anyhow!("{} jobs failed to evaluate", stats.errors)));
    }
    Ok(())
}

async fn build_command(
    config: Config,
    places: &kiln::build::Places,
    machines: Option<PathBuf>,
    json: bool,
    installable: String,
    progress: Option<std::sync::Arc<kiln::build::Progress>>,
) -> Result<(), Failure> {
    use tokio::signal::unix::{SignalKind, signal};
    let fail = |e: &dyn std::fmt::Display| Failure::Failed(anyhow::anyhow!("{e}"));
    let machines = kiln::build::load_machines(&config, machines).map_err(|e| Failure::Usage(e.into()))?;
    let db = kiln::serve::open_db(&config).await.map_err(|e| fail(&e))?;
    let (key, _) = kiln::cache::load_or_generate_key(&config.cache_secret_key_file(), &config.cache.key_name)
        .map_err(|e| fail(&e))?;
    let public_key = key.public().to_string();
    let cache = kiln::cache::Cache::open(&config, db.clone(), key).map_err(|e| fail(&e))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| fail(&e))?;
    let run = kiln::build::run(&config, db.clone(), cache, machines, &installable, progress.clone());
    let outcome = tokio::select! {
        r = run => Some(r),
        _ = tokio::signal::ctrl_c() => None,
        _ = term.recv() => None,
    };
    let mut results = match outcome {
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            progress.iter().for_each(|p| p.end());
            return Err(fail(&e));
        }
        None => {
            progress.iter().for_each(|p| p.end());
            return Err(Failure::Interrupted);
        }
    };
    db.close().await;
    let cache_url = places.cache_url();
    for r in &mut results {
        r.cache = cache_url.clone();
    }

    // The end of each failed step's log, once per step, as Nix shows it.
    let mut shown = std::collections::HashSet::new();
    for r in &results {
        if let Some(l) = &r.failed_log
            && shown.insert(l.drv_path.clone())
        {
            eprintln!("kiln: {}: {}; last lines of the log of {}:", r.job, r.status, l.drv_path);
            for line in l.tail.lines() {
                eprintln!("  > {line}");
            }
        }
    }
    if json {
        for r in &results {
            println!("{}", serde_json::to_string(r).expect("results serialise"));
        }
    } else {
        let w = results.iter().map(|r| r.job.len()).max().unwrap_or(3).max(3);
        println!("{:<w$}  {:<20}  {:<28}  output or error", "job", "status", "machine");
        for r in &results {
            let out = r.outputs.get("out").or_else(|| r.outputs.values().next()).cloned();
            let error = r.error.as_deref().and_then(|e| e.lines().next()).map(str::to_string);
            let machine = r.machine.as_deref().unwrap_or("-");
            let machine = machine.split('?').next().unwrap_or(machine);
            println!("{:<w$}  {:<20}  {:<28}  {}", r.job, r.status, machine, out.or(error).unwrap_or_default());
        }
        if let Some(url) = &cache_url {
            // Without --state the key is made for this run alone.
            let whose = if places.temporary() { ", a key made for this run" } else { "" };
            println!("outputs are in the binary cache {url} (signed by {public_key}{whose})");
        }
    }
    if cache_url.is_none() && results.iter().any(|r| !r.outputs.is_empty()) {
        eprintln!("kiln: the binary cache of this run was temporary; --cache DIR or --state DIR keeps it");
    }
    if kiln::build::any_failed(&results) {
        return Err(Failure::Failed(anyhow::anyhow!(
            "{} of {} jobs failed",
            results.iter().filter(|r| r.buildstatus != Some(0)).count(),
            results.len()
        )));
    }
    Ok(())
}

async fn deploy_command(
    config: Config,
    environment: String,
    eval: Option<i64>,
    hosts: Vec<String>,
) -> Result<(), Failure> {
    use kiln::deploy::cli::{self, CliError};
    let fail = |e: &dyn std::fmt::Display| Failure::Failed(anyhow::anyhow!("{e}"));
    let db = kiln::serve::open_db(&config).await.map_err(|e| fail(&e))?;
    let (project, env) = cli::find(&db, &environment).await.map_err(|e| match e {
        CliError::Name(m) => Failure::Usage(anyhow::anyhow!(m)),
        e => fail(&e),
    })?;
    let only = (!hosts.is_empty()).then_some(hosts.as_slice());
    let d = match kiln::deploy::deploy_now(&db, &env, eval, only, "cli").await.map_err(|e| fail(&e))? {
        Ok(d) => d,
        Err(why) => return Err(Failure::Failed(anyhow::anyhow!("cannot deploy {project}/{}: {why}", env.name))),
    };
    eprintln!("kiln: deployment {} of {project}/{}: evaluation {}", d.id, env.name, d.eval_id);
    let (key, _) = kiln::cache::load_or_generate_key(&config.cache_secret_key_file(), &config.cache.key_name)
        .map_err(|e| fail(&e))?;
    let ctx = kiln::serve::deploy_ctx(&config, &db, &key.public(), None);
    let deployer = kiln::deploy::Deployer::new(ctx, format!("cli:{}", std::process::id()));
    let id = d.id;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(|e| fail(&e))?;
    let ended = tokio::select! {
        r = cli::run_and_follow(&deployer, &db, env.id, id, |l| println!("{l}")) => r.map_err(|e| fail(&e))?,
        _ = tokio::signal::ctrl_c() => return Err(interrupted(id)),
        _ = term.recv() => return Err(interrupted(id)),
    };
    db.close().await;
    match ended.status.as_str() {
        kiln::db::deployments::SUCCEEDED => {
            eprintln!("kiln: deployment {id} succeeded");
            Ok(())
        }
        s => Err(Failure::Failed(anyhow::anyhow!(
            "deployment {id} {s}{}",
            ended.error.map(|e| format!(": {e}")).unwrap_or_default()
        ))),
    }
}

/// Stopped mid-deployment: what happens to it.
fn interrupted(id: i64) -> Failure {
    eprintln!(
        "kiln: deployment {id} is left running: a Kiln server resumes it once this process's hold on the environment expires (15 s)"
    );
    Failure::Interrupted
}

async fn machines_check(config: Config, machines: Option<PathBuf>) -> Result<(), Failure> {
    let Some(file) = machines.or_else(|| config.machines_file()) else {
        return Err(Failure::Usage(anyhow::anyhow!("no machines file: give --machines or set machines_file")));
    };
    let (list, errors) =
        kiln::builder::machines::load(&file).map_err(|e| Failure::Usage(anyhow::anyhow!("{}: {e}", file.display())))?;
    for e in &errors {
        eprintln!("kiln: {}: {e}; skipped: {}", file.display(), e.entry);
    }
    let sessions = kiln::builder::connection::Sessions::new(
        &config.state_dir,
        std::time::Duration::from_secs(config.queue.connect_timeout_s),
        std::time::Duration::from_secs(config.queue.progress_timeout_s),
    );
    let mut bad = !errors.is_empty();
    println!("{:<40}  {:<24}  {:<8}  {:>8}  status", "machine", "systems", "protocol", "rtt ms");
    for m in &list {
        let name = m.uri.split('?').next().unwrap_or(&m.uri);
        let start = std::time::Instant::now();
        let r = async {
            let mut c = sessions.connect(m).await.map_err(|e| e.to_string())?;
            let t = std::time::Instant::now();
            c.serve.query_valid_paths(&[], false).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((c.serve.remote_version, t.elapsed()))
        }
        .await;
        match r {
            Ok((v, rtt)) => println!(
                "{:<40}  {:<24}  {:<8}  {:>8.1}  ok (connected in {:.0} ms; features: {}; {}: {}{})",
                name,
                m.systems.join(","),
                format!("{}.{}", v >> 8, v & 0xff),
                rtt.as_secs_f64() * 1000.0,
                (start.elapsed() - rtt).as_secs_f64() * 1000.0,
                if m.supported_features.is_empty() { "-".to_string() } else { m.supported_features.join(",") },
                m.protocol(),
                m.remote_command(),
                if m.inert_settings.is_empty() {
                    String::new()
                } else {
                    format!("; no effect in Kiln: {}", m.inert_settings.join(" "))
                }
            ),
            Err(e) => {
                bad = true;
                println!("{:<40}  {:<24}  {:<8}  {:>8}  {e}", name, m.systems.join(","), "-", "-");
            }
        }
    }
    if bad {
        return Err(Failure::Failed(anyhow::anyhow!("some machines are unusable")));
    }
    Ok(())
}
