//! CLI: the `edge-outbox` command line (docs/cli.md).
//!
//! Role: parse arguments (clap), load the configuration, run one command,
//! turn the outcome into an exit code: 0 success, 1 failure or refusal,
//! 2 usage error (clap's own), 78 bad configuration.
//!
//! Layout:
//! - `mod.rs`: the arguments, [`main`], exit codes, dispatch;
//! - `client.rs`: talking to the running agent over its socket (`submit`,
//!   single and bulk, and the status request), in [`crate::protocol`]'s
//!   typed requests and answers;
//! - `commands.rs`: the other commands (`run`, `status`, `list`, `show`,
//!   `retry`, `purge`, `check-config`);
//! - `report.rs`: how the status report and rows are printed.
//!
//! Client commands (`submit`, `status`) talk to the running agent over its
//! socket; `status` falls back to reading the database when no agent
//! answers. `list` and `show` read the database; `retry` writes it on a
//! connection of its own (safe while the agent runs: WAL and a busy timeout).
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

/// Like `println!`, but a closed stdout (`edge-outbox list | head`) is not
/// a panic: the output is simply dropped.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

mod client;
mod commands;
mod report;

/// Exit code for a configuration that cannot be used (sysexits EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

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
        #[arg(long, conflicts_with_all = ["payload", "id", "json"])]
        bulk: bool,
        /// The payload; "-" or nothing reads stdin (bytes that are not UTF-8
        /// are sent as base64, byte-exact).
        payload: Option<String>,
    },
    /// Counts per status, oldest pending age, broker connection, db size.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// List messages, newest first.
    List {
        #[arg(long, value_parser = ["delivering", "delivered", "failed", "consumed"])]
        status: Option<String>,
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
        #[arg(required_unless_present = "failed", conflicts_with = "failed")]
        ids: Vec<String>,
        /// Every failed message.
        #[arg(long)]
        failed: bool,
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
            ExitCode::FAILURE
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
            let request =
                client::single_request(&defaults, id, &headers, content_type, json, payload)?;
            client::submit_one(&socket, &request)
        }
        Command::Status { json, .. } => commands::status(&config, json),
        Command::List {
            status,
            limit,
            json,
            ..
        } => commands::list(&config, status.as_deref(), limit, json),
        Command::Show { id, json, .. } => commands::show(&config, &id, json),
        Command::Purge { dry_run, .. } => commands::purge(&config, dry_run),
        Command::Retry { ids, failed, .. } => commands::retry(&config, &ids, failed),
    }
}
