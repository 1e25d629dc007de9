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
//! conflict, 4 not found, 141 standard output closed (`| head`).
#![deny(missing_docs)]

mod audit;
mod bench;
mod bench_commands;
mod bench_projections;
mod bench_relay;
mod bench_snapshots;
mod bench_upcast;
mod commands;
mod database;
mod demo;
mod deploy;
mod dlq_backend;
mod dlq_show;
mod generate;
mod import;
mod keys;
mod output;
mod registry;
mod relay;
mod snapshots;
mod ui;
mod upcast;

use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};

pub use database::Database;
pub use output::OutputFormat;
pub use registry::Registry;
pub use ui::LogFormat;

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
/// Exit code: standard output was closed before everything was written
/// (`chronicle read all | head -1`); nothing is printed. 128 + SIGPIPE, the
/// status a shell reports for a process that SIGPIPE ended.
pub const EXIT_BROKEN_PIPE: u8 = 141;

/// `chronicle --help`, before the subcommands.
const LONG_ABOUT: &str = "\
Chronicle: an event store on PostgreSQL.

Set up and inspect the store (migrate, status), write and read events
(append, read, state), run and inspect projections (projections, dlq),
deploy them to a serverless provider and watch them there (deploy, scale,
monitor, undeploy), publish events to message brokers (relay), evolve
stored events (upcast), list and drop aggregate snapshots (snapshots),
manage field-encryption keys and their audit log (keys, audit), drive the
embedded development cluster (dev), measure against raw PostgreSQL
(bench), take the guided tour (demo), and set up your shell (completions,
man).

Without --database-url (or DATABASE_URL) a private PostgreSQL is started
in ./.chronicle/postgres (or $CHRONICLE_HOME) and used.";

/// `chronicle --help`, after the options.
const AFTER_LONG_HELP: &str = "\
Examples:
  chronicle demo                                  # the guided tour
  chronicle migrate
  chronicle append --aggregate-id 0193a1b2-0000-7000-8000-000000000001 \\
      --aggregate-type user --event-type UserRegistered --data '{\"name\":\"Ada\"}'
  chronicle read all --output json | head -5
  chronicle completions bash > ~/.local/share/bash-completion/completions/chronicle
  chronicle man --out-dir ~/.local/share/man/man1

Output: results on standard output (--output table|json; JSON lists are one
object per line), everything else (progress, notes, logs) on standard error.

Connecting: an unreachable database fails after 5 s (the URL's
connect_timeout, or --connect-timeout 30s, sets it; `projections run`
retries for 30 s). A Neon compute scaled to zero may need 15 s or more.

Exit codes: 0 success, 1 failure, 2 usage, 3 concurrency conflict,
4 not found, 141 standard output closed before the end (| head).

Environment: DATABASE_URL (for the commands that open a database; `dev`,
`completions` and `man` open none), CHRONICLE_HOME (the embedded cluster's
folder, and the default keyring's), CHRONICLE_LOG (a log filter such as
`debug` or `chronicle_projections=trace`; it wins over --quiet and
--verbose; one that does not parse is refused), CHRONICLE_KEYRING (keys,
upcast), CHRONICLE_UPCASTERS (upcast, and the projections' lazy upcasting),
CHRONICLE_LISTEN_URL (projections run), NO_COLOR (no colours in logs;
they have none either when standard error is not a terminal).";

/// Chronicle: an event store on PostgreSQL.
#[derive(Debug, Parser)]
#[command(
    name = "chronicle",
    version,
    about = "An event store on PostgreSQL: events, projections, upcasts, encryption keys, audit",
    long_about = LONG_ABOUT,
    after_help = "Examples:\n  chronicle demo\n  chronicle read all --output json | head -5\n\n\
                  `chronicle --help` says more; `chronicle help COMMAND` explains a command.",
    after_long_help = AFTER_LONG_HELP
)]
pub struct Cli {
    /// PostgreSQL URL; without it, a private cluster in ./.chronicle/postgres
    /// (or $CHRONICLE_HOME) is started and used.
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// How long to wait for the database to accept a connection (e.g. `5s`,
    /// `30s`): retrying while it is unreachable or starting, then failing
    /// with one line naming the host and port. Default: the URL's
    /// `connect_timeout` (seconds), else 5s; `projections run` keeps
    /// retrying for 30s by default. A Neon compute scaled to zero may need
    /// `--connect-timeout 15s` or more to wake.
    #[arg(long, global = true, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub connect_timeout: Option<std::time::Duration>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// Say less: no progress bars or informational lines, only results,
    /// warnings and errors (logging at `error`).
    #[arg(long, short, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Say more on standard error: logging at `info` (-v), `debug` (-vv),
    /// `trace` (-vvv). CHRONICLE_LOG, when set, wins.
    #[arg(long, short, global = true, action = ArgAction::Count)]
    pub verbose: u8,
    /// How log lines are written to standard error: `text` for people
    /// (coloured only on a terminal, never with NO_COLOR set) or `json`,
    /// one object per line, for log shippers.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: commands::Command,
}

/// The stock binary: [`run`] with [`Registry::with_demo`].
pub fn main() -> ExitCode {
    run(Registry::with_demo())
}

/// Parses the process's arguments, runs the command with the projection
/// handlers in `registry`, prints errors, and returns the documented exit
/// code.
///
/// It also sets the process's panic hook so that a `println!` into a closed
/// pipe ends the process quietly with [`EXIT_BROKEN_PIPE`], and starts
/// logging to standard error (`CHRONICLE_LOG`, `--quiet`, `--verbose`).
pub fn run(registry: Registry) -> ExitCode {
    output::exit_quietly_on_closed_pipe_panics();
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Ok((Cli::from_arg_matches(&m)?, m)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => {
            // --help and --version go to standard output, errors to
            // standard error.
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            return match e.print() {
                Err(io) if io.kind() == std::io::ErrorKind::BrokenPipe => {
                    ExitCode::from(EXIT_BROKEN_PIPE)
                }
                _ => ExitCode::from(code),
            };
        }
    };
    if let Err(e) = ui::init(
        ui::Verbosity::from_flags(cli.quiet, cli.verbose),
        cli.log_format,
    ) {
        ui::notice!("error: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    // A flag is honoured or refused: --database-url on a command that
    // opens no database is refused. DATABASE_URL in the environment is
    // ambient, for the commands that use it; `dev` says it leaves it alone.
    if let Some(command) = commands::without_database(&cli.command) {
        if matches.value_source("connect_timeout") == Some(ValueSource::CommandLine) {
            ui::notice!(
                "error: --connect-timeout does not apply to `chronicle {command}`, which opens no \
                 database; leave it out"
            );
            return ExitCode::from(EXIT_USAGE);
        }
        if matches.value_source("database_url") == Some(ValueSource::CommandLine) {
            ui::notice!(
                "error: --database-url does not apply to `chronicle {command}`, which opens no \
                 database; leave it out"
            );
            return ExitCode::from(EXIT_USAGE);
        }
        if command == "dev" && cli.database_url.is_some() {
            ui::notice!(
                "note: DATABASE_URL is set; `chronicle dev` manages the embedded cluster, not \
                 that database"
            );
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            ui::notice!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let started = std::time::Instant::now();
    let outcome = runtime.block_on(async {
        let outcome = commands::run(cli, &registry).await;
        // The command's pools are dropped: let their connections say
        // goodbye to the server before the runtime stops.
        chronicle_postgres::connections_closed(std::time::Duration::from_secs(2)).await;
        outcome
    });
    tracing::debug!("finished in {:.3} s", started.elapsed().as_secs_f64());
    match outcome {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(e) => {
            let code = exit_code(&e);
            if code != EXIT_BROKEN_PIPE {
                ui::notice!("error: {e:#}");
            }
            ExitCode::from(code)
        }
    }
}

/// The exit code for an error: a closed standard output 141, conflicts 3,
/// not-found 4, usage 2, else 1.
fn exit_code(e: &anyhow::Error) -> u8 {
    // Only standard output's own EPIPE: a database connection's broken
    // pipe is a failure to report.
    if e.chain()
        .filter_map(|c| c.downcast_ref::<output::StdoutError>())
        .any(output::StdoutError::is_closed_pipe)
    {
        return EXIT_BROKEN_PIPE;
    }
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
        if let Some(
            chronicle_projections::Error::NoDeadLetters { .. }
            | chronicle_projections::Error::NotRegistered(_),
        ) = cause.downcast_ref::<chronicle_projections::Error>()
        {
            return EXIT_NOT_FOUND;
        }
        match cause.downcast_ref::<chronicle_cloudflare::Error>() {
            Some(chronicle_cloudflare::Error::Invalid(_)) => return EXIT_USAGE,
            Some(chronicle_cloudflare::Error::NotDeployed(..)) => return EXIT_NOT_FOUND,
            _ => {}
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
