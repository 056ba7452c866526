//! CLI: the `edge-outbox` command line (docs/cli.md).
//!
//! Role: parse arguments (clap), load the configuration, run one command,
//! turn the outcome into an exit code (`exit.rs`, docs/cli.md, Exit codes):
//! 0 success, 65 bad data, 69 no agent, 75 try again later, 77 not allowed,
//! 78 bad configuration, 1 any other failure, 2 usage error (clap's own).
//!
//! Layout:
//! - `mod.rs`: the arguments, [`main`], exit codes, dispatch;
//! - `client.rs`: talking to the running agent over its socket (`submit`,
//!   single and bulk, and the status request), in [`crate::protocol`]'s
//!   typed requests and answers;
//! - `exit.rs`: the exit codes, and the one mapping from refusals and
//!   errors to them;
//! - `check.rs`: `status --check`, the verdict for monitoring;
//! - `commands.rs`: the other commands (`run`, `status`, `list`, `show`,
//!   `retry`, `purge`, `check-config`);
//! - `backlog.rs`: the backlog tools' filters (`list`, `export`, `retry`,
//!   `discard`), parsed once into a `store::RowFilter`, and `discard` and
//!   `export`;
//! - `report.rs`: how the status report and rows are printed.
//!
//! Client commands (`submit`, `status`) talk to the running agent over its
//! socket; `status` falls back to reading the database when no agent
//! answers. `list`, `show` and `export` read the database; `retry` and
//! `discard` write it on a connection of their own (safe while the agent
//! runs: WAL and a busy timeout). None of them asks the agent: they work
//! whether it runs or not (docs/cli.md, What each command talks to).
//! Output is plain text for people, `--json` for scripts. `-c FILE` is a
//! global option: it may stand before or after the subcommand, and every
//! command loads the configuration the same way, before it runs.
//!
//! Invariant: a closed stdout (`edge-outbox list | head`) is never a panic;
//! output goes through `out!`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::{self, Config, ConfigError};
use crate::store::{ListOrder, Status};

/// Like `println!`, but a closed stdout (`edge-outbox list | head`) is not
/// a panic: the output is simply dropped.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod backlog;
mod check;
mod client;
mod commands;
mod exit;
mod report;

/// `--ttl`: milliseconds, or a duration as the configuration writes them.
/// The agent checks the range (docs/protocol.md, `submit`).
fn parse_ttl(text: &str) -> Result<u64, String> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration (\"30s\", \"5m\") or milliseconds: {e}"))
        .and_then(|d| u64::try_from(d.as_millis()).map_err(|e| e.to_string()))
}

/// Exit code for a configuration that cannot be used (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = exit::Exit::Config.code();

#[derive(Debug, Parser)]
#[command(
    name = "edge-outbox",
    version,
    about = "Store-and-forward agent: local programs hand it messages over a Unix socket, \
             it keeps them in SQLite and delivers them to RabbitMQ"
)]
struct Cli {
    #[command(flatten)]
    config: ConfigArg,
    #[command(subcommand)]
    command: Command,
}

/// `-c FILE`, one option of the whole command line: `global` lets it stand
/// before the subcommand (`edge-outbox -c FILE status`) or after it.
#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Configuration file (TOML). Default: $EDGE_OUTBOX_CONFIG, else built-in defaults.
    #[arg(short = 'c', long = "config", value_name = "FILE", global = true)]
    file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent in the foreground.
    Run,
    /// Hand a message to the running agent; prints its id.
    Submit {
        /// The agent's socket (default: submit.socket from the configuration).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Exchange to publish to ("" is the default exchange).
        #[arg(long, required_unless_present = "bulk")]
        exchange: Option<String>,
        /// Routing key.
        #[arg(long = "routing-key", required_unless_present = "bulk")]
        routing_key: Option<String>,
        /// Client id: submitting the same id twice stores the message once.
        #[arg(long)]
        id: Option<String>,
        /// AMQP header, repeatable.
        #[arg(long = "header", value_name = "K=V")]
        headers: Vec<String>,
        /// Content type (default: from the payload's kind).
        #[arg(long = "content-type")]
        content_type: Option<String>,
        /// The payload is JSON: validated and sent as application/json.
        #[arg(long)]
        json: bool,
        /// Read NDJSON requests from stdin (one protocol request per line),
        /// pipelined; print one id per line. --exchange and --routing-key fill
        /// in lines that lack them.
        #[arg(long, conflicts_with_all = ["payload", "id", "json", "priority", "ttl"])]
        bulk: bool,
        /// Priority, 0 to 9 (default 0): the backlog goes out highest first.
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
        priority: Option<u8>,
        /// How long the message may wait to be published: "30s", "5m", or
        /// milliseconds (default: publish.max_age, else for ever).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// The payload; "-" or nothing reads stdin (bytes that are not UTF-8
        /// are sent as base64, byte-exact).
        payload: Option<String>,
    },
    /// Counts per status, oldest pending age, broker connection, db size.
    Status {
        #[arg(long, conflicts_with = "check")]
        json: bool,
        /// Print one OK/CRITICAL line and exit non-zero when the agent is
        /// not running, the broker has been disconnected too long, or the
        /// backlog is too old (for cron, monitoring, ExecStartPost).
        #[arg(long)]
        check: bool,
        /// With --check: CRITICAL when the oldest delivering message is
        /// older than D (e.g. 10m). Default: not checked.
        #[arg(long, value_name = "D", requires = "check", value_parser = humantime::parse_duration)]
        max_age: Option<std::time::Duration>,
        /// With --check: CRITICAL when the broker has been disconnected
        /// longer than D.
        #[arg(long, value_name = "D", requires = "check", value_parser = humantime::parse_duration,
              default_value = "5m")]
        max_disconnected: std::time::Duration,
    },
    /// List messages, newest first (--oldest: oldest first).
    List {
        /// Only messages of this status.
        #[arg(long, value_parser = backlog::parse_status)]
        status: Option<Status>,
        #[command(flatten)]
        filters: backlog::Filters,
        /// Oldest first (default: newest first).
        #[arg(long)]
        oldest: bool,
        #[arg(long, default_value_t = 100)]
        limit: u64,
        #[arg(long)]
        json: bool,
    },
    /// Show one message, with its body.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Move failed messages back to delivering (try_count 0, due now).
    Retry {
        #[arg(
            required_unless_present = "failed",
            conflicts_with_all = ["failed", "exchange", "routing_key", "error", "older_than"]
        )]
        ids: Vec<String>,
        /// Every failed message (that the filters select).
        #[arg(long)]
        failed: bool,
        #[command(flatten)]
        filters: backlog::Filters,
    },
    /// Delete failed messages; move delivering ones to failed
    /// ("discarded by operator"). Delivered and consumed ones are refused.
    Discard {
        #[arg(
            required_unless_present = "failed",
            conflicts_with_all = ["failed", "exchange", "routing_key", "error", "older_than"]
        )]
        ids: Vec<String>,
        /// Delete every failed message (that the filters select).
        #[arg(long)]
        failed: bool,
        #[command(flatten)]
        filters: backlog::Filters,
    },
    /// Print messages as NDJSON submit requests, oldest first, for
    /// `submit --bulk` on another host (default: the delivering ones).
    Export {
        /// Only messages of this status (default: delivering).
        #[arg(long, value_parser = backlog::parse_status, default_value = "delivering")]
        status: Status,
        #[command(flatten)]
        filters: backlog::Filters,
        /// At most N messages (default: all).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Delete old delivered/consumed rows (purge.retention) and old failed
    /// rows (purge.failed_retention); never undelivered ones.
    Purge {
        /// Only count what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check the configuration and print the effective values.
    CheckConfig,
}

/// The command-line definition, for what is generated from it: the man
/// pages and shell completions of the Debian package (`xtask`,
/// docs/decisions/0037-man-page-and-completions-from-an-xtask.md).
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// Parses the command line and runs it; the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match config::load(cli.config.file.as_deref()) {
        Ok(config) => config,
        Err(e) => return config_failure(&e),
    };
    match execute(cli.command, config) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("edge-outbox: {}", describe(&e));
            exit::Exit::for_error(&e).into()
        }
    }
}

/// The error and its causes, each said once (many messages already quote
/// their cause).
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

fn config_failure(e: &ConfigError) -> ExitCode {
    eprintln!("edge-outbox: bad configuration: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn execute(command: Command, config: Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run => commands::run(config),
        Command::CheckConfig => commands::check_config(&config),
        Command::Submit {
            socket,
            exchange,
            routing_key,
            id,
            headers,
            content_type,
            json,
            bulk,
            payload,
            priority,
            ttl,
            ..
        } => {
            let socket = socket.unwrap_or_else(|| config.submit.socket.clone());
            let defaults = client::RequestDefaults {
                exchange,
                routing_key,
            };
            if bulk {
                return runtime()?.block_on(client::submit_bulk(&socket, &defaults));
            }
            let mut request =
                client::single_request(&defaults, id, &headers, content_type, json, payload)?;
            if let crate::protocol::Request::Submit(submit) = &mut request {
                submit.priority = priority;
                submit.ttl = ttl;
            }
            client::submit_one(&socket, &request)
        }
        Command::Status {
            check: true,
            max_age,
            max_disconnected,
            ..
        } => Ok(check::status_check(
            &config,
            &check::Bounds {
                max_age,
                max_disconnected,
            },
        )),
        Command::Status { json, .. } => commands::status(&config, json),
        Command::List {
            status,
            filters,
            oldest,
            limit,
            json,
            ..
        } => {
            let order = if oldest {
                ListOrder::OldestFirst
            } else {
                ListOrder::NewestFirst
            };
            commands::list(&config, &filters.select(status), order, limit, json)
        }
        Command::Show { id, json, .. } => commands::show(&config, &id, json),
        Command::Purge { dry_run, .. } => commands::purge(&config, dry_run),
        Command::Retry {
            ids,
            failed,
            filters,
            ..
        } => {
            let selection = failed.then(|| filters.select(Some(Status::Failed)));
            commands::retry(&config, &ids, selection.as_ref())
        }
        Command::Discard {
            ids,
            failed,
            filters,
            ..
        } => {
            let selection = failed.then(|| filters.select(Some(Status::Failed)));
            backlog::discard(&config, &ids, selection.as_ref())
        }
        Command::Export {
            status,
            filters,
            limit,
            ..
        } => backlog::export(&config, &filters.select(Some(status)), limit),
    }
}
