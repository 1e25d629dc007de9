//! The `chronicle` command line, as a library so that an application can
//! ship the same CLI from its own binary.
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     // Or `chronicle_cli::run(registry)` with handlers of your own.
//!     chronicle_cli::main()
//! }
//! ```
//!
//! Exit codes: 0 success, 1 any other failure, 2 usage error, 3 concurrency
//! conflict, 4 not found.
#![deny(missing_docs)]

mod audit;
mod bench;
mod bench_projections;
mod bench_upcast;
mod commands;
mod database;
mod demo;
mod dlq_show;
mod keys;
mod output;
mod registry;
mod upcast;

use std::process::ExitCode;

use clap::Parser;

pub use database::Database;
pub use output::OutputFormat;
pub use registry::Registry;

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: any failure without a more specific code.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: the command line was wrong.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: an optimistic-concurrency conflict.
pub const EXIT_CONFLICT: u8 = 3;
/// Exit code: what was asked for does not exist.
pub const EXIT_NOT_FOUND: u8 = 4;

/// Chronicle: an event store on PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "chronicle", version, about, long_about = None)]
pub struct Cli {
    /// PostgreSQL URL; without it, a private cluster in ./.chronicle/postgres
    /// (or $CHRONICLE_HOME) is started and used.
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: commands::Command,
}

/// The stock binary: [`run`] with [`Registry::with_examples`].
pub fn main() -> ExitCode {
    run(Registry::with_examples())
}

/// Parses the process's arguments, runs the command with the projection
/// handlers in `registry`, prints errors, and returns the documented exit
/// code.
pub fn run(registry: Registry) -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { EXIT_OK });
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CHRONICLE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(commands::run(cli, &registry)) {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The exit code for an error: conflicts 3, not-found 4, usage 2, else 1.
fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        let core =
            cause
                .downcast_ref::<chronicle_core::Error>()
                .or_else(|| match cause.downcast_ref::<chronicle_postgres::Error>() {
                    Some(chronicle_postgres::Error::Store(core)) => Some(core),
                    _ => None,
                });
        if let Some(core) = core {
            return match core {
                chronicle_core::Error::Conflict { .. } => EXIT_CONFLICT,
                chronicle_core::Error::NotFound(_) => EXIT_NOT_FOUND,
                chronicle_core::Error::Invalid(_) => EXIT_USAGE,
                _ => EXIT_FAILURE,
            };
        }
        if let Some(code) = cause
            .downcast_ref::<chronicle_upcast::RunError>()
            .and_then(upcast::exit_code)
        {
            return code;
        }
        if cause.downcast_ref::<commands::UsageError>().is_some() {
            return EXIT_USAGE;
        }
        if cause.downcast_ref::<commands::NotFound>().is_some() {
            return EXIT_NOT_FOUND;
        }
    }
    EXIT_FAILURE
}
