//! CLI: the `edge-outbox` command line (`../shared/SPEC.md`, "Command line").
//!
//! Role: parse arguments (clap), load the configuration, run one command,
//! turn the outcome into an exit code: 0 success, 1 failure or refusal,
//! 2 usage error (clap's own), 78 bad configuration.
//!
//! Client commands (`submit`, `status`) talk to the running agent over its
//! socket; `status` falls back to reading the database when no agent
//! answers. `list` and `show` read the database; `retry` writes it on a
//! connection of its own (safe while the agent runs: WAL and a busy timeout).
//! Output is plain text for people, `--json` for scripts.

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use base64::Engine;
use clap::{Parser, Subcommand};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::config::{self, Config, ConfigError};
use crate::status::StatusReport;
use crate::store::{Admin, Reader, Row, Status, StoreError};

/// Like `println!`, but a closed stdout (`edge-outbox list | head`) is not
/// a panic: the output is simply dropped.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Exit code for a configuration that cannot be used (sysexits EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;
/// How long a client command waits for the agent to answer one request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Parser)]
#[command(
    name = "edge-outbox",
    version,
    about = "Store-and-forward agent: local programs hand it messages over a Unix socket, \
             it keeps them in SQLite and delivers them to RabbitMQ"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Configuration file (TOML). Default: $EDGE_OUTBOX_CONFIG, else built-in defaults.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent in the foreground.
    Run {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Hand a message to the running agent; prints its id.
    Submit {
        #[command(flatten)]
        config: ConfigArg,
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
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long)]
        json: bool,
    },
    /// List messages, newest first.
    List {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, value_parser = ["delivering", "delivered", "failed", "consumed"])]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u64,
        #[arg(long)]
        json: bool,
    },
    /// Show one message, with its body.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Move failed messages back to delivering (try_count 0, due now).
    Retry {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(required_unless_present = "failed", conflicts_with = "failed")]
        ids: Vec<String>,
        /// Every failed message.
        #[arg(long)]
        failed: bool,
    },
    /// Delete old delivered/consumed rows (purge.retention) and old failed
    /// rows (purge.failed_retention); never undelivered ones.
    Purge {
        #[command(flatten)]
        config: ConfigArg,
        /// Only count what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Check the configuration and print the effective values.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArg,
    },
}

/// Parses the command line and runs it; the process's exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let config_file = match &cli.command {
        Command::Run { config }
        | Command::Submit { config, .. }
        | Command::Status { config, .. }
        | Command::List { config, .. }
        | Command::Show { config, .. }
        | Command::Retry { config, .. }
        | Command::Purge { config, .. }
        | Command::CheckConfig { config } => config.file.clone(),
    };
    let config = match config::load(config_file.as_deref()) {
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
        Command::Run { .. } => {
            crate::app::init_logging(&config.log);
            match runtime()?.block_on(crate::app::run(config)) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                // A password or TLS file that cannot be read is a
                // configuration problem: exit 78, so systemd does not loop.
                Err(crate::app::AppError::Broker(e)) => {
                    eprintln!("edge-outbox: bad configuration: {e}");
                    Ok(ExitCode::from(EXIT_CONFIG))
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::CheckConfig { .. } => {
            out!("configuration OK");
            out!("{}", effective_config(&config)?.trim_end());
            Ok(ExitCode::SUCCESS)
        }
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
            let defaults = RequestDefaults {
                exchange,
                routing_key,
            };
            if bulk {
                return runtime()?.block_on(submit_bulk(&socket, &defaults));
            }
            let request = single_request(&defaults, id, &headers, content_type, json, payload)?;
            let answer = runtime()?.block_on(ask_agent(&socket, &request))?;
            Ok(report_answer(&answer))
        }
        Command::Status { json, .. } => status(&config, json),
        Command::List {
            status,
            limit,
            json,
            ..
        } => {
            let status = status.as_deref().and_then(Status::from_name);
            let rows = Reader::open(&config.store.path)?.list(status, limit)?;
            if json {
                let rows: Vec<Value> = rows.iter().map(|r| row_json(r, false)).collect();
                out!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_table(&rows);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { id, json, .. } => {
            let Some(row) = Reader::open(&config.store.path)?.get(&id)? else {
                eprintln!("edge-outbox: no message with id {id:?}");
                return Ok(ExitCode::FAILURE);
            };
            if json {
                out!("{}", serde_json::to_string_pretty(&row_json(&row, true))?);
            } else {
                print_row(&row);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Purge { dry_run, .. } => {
            let report = crate::purge::purge_database(&config.store.path, &config.purge, dry_run)?;
            let d = report.deleted;
            let verb = if dry_run { "would delete" } else { "deleted" };
            out!(
                "{verb} {} row(s): {} delivered, {} consumed (older than {}), {} failed (older than {})",
                d.total(),
                d.delivered,
                d.consumed,
                config::format_duration(config.purge.retention),
                d.failed,
                config::format_duration(config.purge.failed_retention),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Retry { ids, failed, .. } => {
            let mut admin = Admin::open(&config.store.path)?;
            if failed {
                let n = admin.retry_failed()?;
                out!("{n} failed message(s) moved back to delivering");
                return Ok(ExitCode::SUCCESS);
            }
            let skipped = admin.retry(&ids)?;
            let moved = ids.len() - skipped.len();
            out!("{moved} message(s) moved back to delivering");
            for id in &skipped {
                eprintln!(
                    "edge-outbox: {id}: not a failed message (missing, or in another status)"
                );
            }
            Ok(if skipped.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn effective_config(config: &Config) -> anyhow::Result<String> {
    let mut shown = config.clone();
    shown.broker.urls = shown
        .broker
        .urls
        .iter()
        .map(|u| config::redact_url(u))
        .collect();
    Ok(toml::to_string(&shown)?)
}

struct RequestDefaults {
    exchange: Option<String>,
    routing_key: Option<String>,
}

fn single_request(
    defaults: &RequestDefaults,
    id: Option<String>,
    headers: &[String],
    content_type: Option<String>,
    json: bool,
    payload: Option<String>,
) -> anyhow::Result<Value> {
    let mut request = Map::new();
    request.insert(
        "exchange".into(),
        json!(defaults.exchange.clone().unwrap_or_default()),
    );
    request.insert(
        "routing_key".into(),
        json!(defaults.routing_key.clone().unwrap_or_default()),
    );
    let bytes = match payload.as_deref() {
        None | Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading the payload from stdin")?;
            buf
        }
        Some(text) => text.as_bytes().to_vec(),
    };
    if json {
        let value: Value =
            serde_json::from_slice(&bytes).context("--json: the payload is not valid JSON")?;
        request.insert("payload".into(), value);
    } else {
        match String::from_utf8(bytes) {
            Ok(text) => request.insert("payload".into(), Value::String(text)),
            Err(e) => request.insert(
                "payload_base64".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(e.into_bytes())),
            ),
        };
    }
    if let Some(id) = id {
        request.insert("id".into(), Value::String(id));
    }
    if let Some(ct) = content_type {
        request.insert("content_type".into(), Value::String(ct));
    }
    if !headers.is_empty() {
        let mut map = Map::new();
        for header in headers {
            let (k, v) = header
                .split_once('=')
                .ok_or_else(|| anyhow!("--header {header:?}: expected K=V"))?;
            // Numbers and booleans keep their type; anything else is a string.
            let value = match serde_json::from_str::<Value>(v) {
                Ok(n @ (Value::Number(_) | Value::Bool(_))) => n,
                _ => Value::String(v.to_string()),
            };
            map.insert(k.to_string(), value);
        }
        request.insert("headers".into(), Value::Object(map));
    }
    Ok(Value::Object(request))
}

async fn connect(socket: &Path) -> anyhow::Result<UnixStream> {
    UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach the agent at {} (is `edge-outbox run` running?)",
            socket.display()
        )
    })
}

/// Sends one request, returns the agent's answer.
async fn ask_agent(socket: &Path, request: &Value) -> anyhow::Result<Value> {
    let stream = connect(socket).await?;
    let (read_half, mut write_half) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    // An agent that refuses the connection (unauthorized, too many
    // connections) answers and closes without reading: the write may fail
    // with a broken pipe while its answer is waiting to be read.
    let written = write_half.write_all(&line).await;
    let mut answer = String::new();
    let mut reader = BufReader::new(read_half);
    let read = tokio::time::timeout(CLIENT_TIMEOUT, reader.read_line(&mut answer))
        .await
        .map_err(|_| anyhow!("the agent did not answer within {CLIENT_TIMEOUT:?}"))?;
    if answer.is_empty() {
        written.context("sending the request to the agent")?;
        read.context("reading the agent's answer")?;
        bail!("the agent closed the connection without answering");
    }
    serde_json::from_str(&answer).context("the agent's answer is not JSON")
}

fn report_answer(answer: &Value) -> ExitCode {
    if answer["ok"] == Value::Bool(true) {
        let id = answer["id"].as_str().unwrap_or_default();
        if answer["duplicate"] == Value::Bool(true) {
            out!("{id} (duplicate: already stored)");
        } else {
            out!("{id}");
        }
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "edge-outbox: refused ({}): {}",
            answer["error"].as_str().unwrap_or("unknown"),
            answer["message"].as_str().unwrap_or("")
        );
        ExitCode::FAILURE
    }
}

/// Streams stdin's request lines to the agent while reading its answers.
async fn submit_bulk(socket: &Path, defaults: &RequestDefaults) -> anyhow::Result<ExitCode> {
    let stream = connect(socket).await?;
    let (read_half, mut write_half) = stream.into_split();
    let (exchange, routing_key) = (defaults.exchange.clone(), defaults.routing_key.clone());
    let sender = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let handle = tokio::runtime::Handle::current();
        let mut sent = 0u64;
        let mut batch = Vec::with_capacity(64 * 1024);
        for line in std::io::stdin().lock().lines() {
            let line = line.context("reading stdin")?;
            if line.trim().is_empty() {
                continue;
            }
            let request = match serde_json::from_str::<Value>(&line) {
                Ok(Value::Object(mut map)) => {
                    if let Some(e) = &exchange {
                        map.entry("exchange").or_insert_with(|| json!(e));
                    }
                    if let Some(k) = &routing_key {
                        map.entry("routing_key").or_insert_with(|| json!(k));
                    }
                    serde_json::to_vec(&map)?
                }
                // Let the agent explain what is wrong with the line.
                _ => line.into_bytes(),
            };
            batch.extend_from_slice(&request);
            batch.push(b'\n');
            sent += 1;
            if batch.len() >= 32 * 1024 {
                handle.block_on(write_half.write_all(&batch))?;
                batch.clear();
            }
        }
        handle.block_on(async {
            write_half.write_all(&batch).await?;
            write_half.shutdown().await
        })?;
        Ok(sent)
    });
    let mut answers = BufReader::new(read_half).lines();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut received, mut refused) = (0u64, 0u64);
    while let Some(answer) = tokio::time::timeout(CLIENT_TIMEOUT, answers.next_line())
        .await
        .map_err(|_| anyhow!("the agent did not answer within {CLIENT_TIMEOUT:?}"))??
    {
        received += 1;
        let answer: Value = serde_json::from_str(&answer)?;
        if answer["ok"] == Value::Bool(true) {
            writeln!(out, "{}", answer["id"].as_str().unwrap_or_default())?;
        } else {
            refused += 1;
            eprintln!(
                "edge-outbox: line {received}: refused ({}): {}",
                answer["error"].as_str().unwrap_or("unknown"),
                answer["message"].as_str().unwrap_or("")
            );
        }
    }
    out.flush()?;
    let sent = sender.await??;
    if received < sent {
        bail!("the agent answered {received} of {sent} requests");
    }
    Ok(if refused == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn status(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let from_agent = runtime()?.block_on(async {
        let socket = &config.submit.socket;
        tokio::time::timeout(
            Duration::from_secs(5),
            ask_agent(socket, &json!({"op":"status"})),
        )
        .await
        .ok()
        .and_then(Result::ok)
    });
    // An agent that refuses us (unauthorized, too many connections) is no
    // reason to fail: the database has the counts.
    let from_agent = from_agent.filter(|answer| {
        let ok = answer["ok"] == Value::Bool(true);
        if !ok {
            eprintln!(
                "edge-outbox: the agent refused the status request ({}: {}); \
                 reading the database instead",
                answer["error"].as_str().unwrap_or("unknown"),
                answer["message"].as_str().unwrap_or("")
            );
        }
        ok
    });
    let report: StatusReport = match from_agent {
        Some(mut answer) => {
            if let Value::Object(map) = &mut answer {
                map.remove("ok");
            }
            serde_json::from_value(answer).context("the agent's status answer")?
        }
        None => match Reader::open(&config.store.path) {
            Ok(reader) => StatusReport::collect(&reader, None)?,
            Err(e @ StoreError::Missing(_)) => return Err(e.into()),
            Err(e) => return Err(e.into()),
        },
    };
    if json {
        out!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_status(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn format_time(ms: Option<i64>) -> String {
    match ms.and_then(|ms| u64::try_from(ms).ok()) {
        Some(ms) => {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .to_string()
        }
        None => "-".into(),
    }
}

fn format_age(ms: i64) -> String {
    let secs = u64::try_from(ms / 1000).unwrap_or(0);
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

fn print_status(r: &StatusReport) {
    let source = if r.source == "agent" {
        "agent running"
    } else {
        "agent not running: read from the database"
    };
    out!("edge-outbox {} ({source})", r.version);
    let c = &r.counts;
    out!(
        "messages:  {} delivering, {} delivered, {} failed, {} consumed",
        c.delivering,
        c.delivered,
        c.failed,
        c.consumed
    );
    match r.oldest_delivering_age_ms {
        Some(age) => out!("oldest undelivered: {} old", format_age(age)),
        None => out!("oldest undelivered: none waiting"),
    }
    match &r.broker {
        Some(b) if b.connected => out!(
            "broker:    connected to {} since {}, {} in flight{}",
            b.url.as_deref().unwrap_or("?"),
            format_time(b.since),
            b.in_flight,
            if b.blocked {
                " (blocked by the broker)"
            } else {
                ""
            }
        ),
        Some(b) => out!(
            "broker:    not connected{}{}",
            b.since
                .map(|t| format!(" since {}", format_time(Some(t))))
                .unwrap_or_default(),
            b.last_error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        ),
        None => out!("broker:    unknown (agent not running)"),
    }
    out!(
        "database:  {} ({}{})",
        r.db_path,
        bytesize::ByteSize(r.db_size_bytes),
        r.free_disk_bytes
            .map(|f| format!(", {} free on its filesystem", bytesize::ByteSize(f)))
            .unwrap_or_default()
    );
}

fn row_json(row: &Row, with_body: bool) -> Value {
    let mut v = serde_json::to_value(row).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("status_code".into(), json!(row.status as i64));
        if with_body {
            if row.body_is_text {
                map.insert(
                    "body".into(),
                    Value::String(String::from_utf8_lossy(&row.body).into_owned()),
                );
            } else {
                map.insert(
                    "body_base64".into(),
                    Value::String(base64::engine::general_purpose::STANDARD.encode(&row.body)),
                );
            }
        }
    }
    v
}

fn print_table(rows: &[Row]) {
    out!(
        "{:<38} {:<10} {:>5}  {:<20} {:<20} {:<20} LAST ERROR",
        "ID",
        "STATUS",
        "TRIES",
        "EXCHANGE",
        "ROUTING KEY",
        "CREATED"
    );
    for r in rows {
        out!(
            "{:<38} {:<10} {:>5}  {:<20} {:<20} {:<20} {}",
            r.id,
            r.status.name(),
            r.try_count,
            r.exchange,
            r.routing_key,
            format_time(r.create_time),
            r.last_error.as_deref().unwrap_or("")
        );
    }
}

fn print_row(r: &Row) {
    out!("id:            {}", r.id);
    out!("status:        {} ({})", r.status.name(), r.status as i64);
    out!("exchange:      {:?}", r.exchange);
    out!("routing key:   {:?}", r.routing_key);
    out!("tries failed:  {}", r.try_count);
    out!("created:       {}", format_time(r.create_time));
    out!("updated:       {}", format_time(r.update_time));
    out!("next try:      {}", format_time(r.next_try_time));
    out!(
        "content type:  {}",
        r.content_type.as_deref().unwrap_or("-")
    );
    out!("headers:       {}", r.headers.as_deref().unwrap_or("-"));
    out!("last error:    {}", r.last_error.as_deref().unwrap_or("-"));
    if r.body_is_text {
        out!(
            "body ({} bytes):\n{}",
            r.body.len(),
            String::from_utf8_lossy(&r.body)
        );
    } else {
        out!(
            "body ({} bytes, base64):\n{}",
            r.body.len(),
            base64::engine::general_purpose::STANDARD.encode(&r.body)
        );
    }
}
