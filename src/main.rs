//! The `kiln` command line: parses arguments, loads the configuration, sets
//! up logging, and hands over to the library. Exit codes: 0 ok, 1 a job or
//! check failed (or an operation failed), 2 bad usage or configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kiln::config::{Config, LogFormat};

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "A continuous-integration build coordinator for Nix flakes"
)]
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
    Serve,
    /// Manage the binary cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
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
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
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
        Command::Cache {
            command:
                CacheCommand::Keygen {
                    name,
                    secret,
                    public,
                },
        } => {
            let key =
                kiln::nix::SigningKey::generate(&name).map_err(|e| Failure::Usage(e.into()))?;
            key.write_files(&secret, &public)
                .map_err(|e| Failure::Failed(e.into()))?;
            println!("{}", key.public());
            Ok(())
        }
        Command::Db {
            command: DbCommand::Migrate,
        } => {
            let config = Config::load(cli.config.as_deref())?;
            init_logging(config.log_format);
            runtime()?.block_on(async {
                let db = kiln::serve::open_db(&config)
                    .await
                    .map_err(|e| Failure::Failed(e.into()))?;
                db.close().await;
                Ok(())
            })
        }
        Command::Serve => {
            let config = Config::load(cli.config.as_deref())?;
            init_logging(config.log_format);
            runtime()?
                .block_on(kiln::serve::run(config))
                .map_err(|e| match e {
                    kiln::serve::ServeError::Config(c) => Failure::Usage(c.into()),
                    e => Failure::Failed(e.into()),
                })
        }
    }
}
