//! Backlog tools: the filters shared by `list`, `export`, `retry` and
//! `discard`, and the `discard` and `export` commands (docs/cli.md,
//! Filters, `discard`, `export`).
//!
//! Role: parse each filter once, at the command line, into a typed
//! [`RowFilter`] (a status, a duration turned into a time), and hand it to
//! the store, which alone turns it into SQL with bound parameters.
//!
//! Like `list` and `retry`, these commands use the database directly, never
//! the agent: they work whether the agent runs or not, and a running agent
//! sees their changes through the table (docs/storage.md, One agent per
//! database).
//!
//! Invariants:
//! - `discard` never acts silently: it prints what it did with counts, and
//!   names every id it left alone on stderr (exit 1 then).
//! - `export` writes submit requests (docs/protocol.md) whose body is the
//!   row's, byte for byte: a text body as a JSON string (the body is its
//!   UTF-8 text), any other as `payload_base64`; the row's id, exchange,
//!   routing key, headers and content type go with it. A write error on
//!   stdout fails the command (a full disk must not pass for a complete
//!   export); only a closed pipe (`export | head`) ends it quietly.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use serde_json::value::RawValue;

use crate::config::Config;
use crate::protocol::{Payload, Request, SubmitRequest};
use crate::store::{now_ms, Admin, Database, Discarded, ListOrder, Reader, Row, RowFilter, Status};

/// The filters every backlog command takes (docs/cli.md, Filters).
#[derive(Debug, Clone, clap::Args)]
pub(super) struct Filters {
    /// Only messages to this exchange (exact; "" is the default exchange).
    #[arg(long, value_name = "E")]
    exchange: Option<String>,
    /// Only messages with this routing key (exact).
    #[arg(long = "routing-key", value_name = "K")]
    routing_key: Option<String>,
    /// Only messages whose last error contains TEXT (case-sensitive).
    #[arg(long, value_name = "TEXT")]
    error: Option<String>,
    /// Only messages stored longer than D ago (e.g. 90s, 30m, 2h, 7d).
    #[arg(long = "older-than", value_name = "D", value_parser = parse_age)]
    older_than: Option<Duration>,
}

impl Filters {
    /// The typed filter, with `status`; `--older-than` counts back from now.
    pub(super) fn select(self, status: Option<Status>) -> RowFilter {
        RowFilter {
            status,
            exchange: self.exchange,
            routing_key: self.routing_key,
            error: self.error,
            created_before: self.older_than.map(|age| {
                now_ms().saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
            }),
        }
    }
}

/// `--status NAME`: a status name as docs/storage.md, Statuses, spells it.
pub(super) fn parse_status(name: &str) -> Result<Status, String> {
    Status::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = Status::ALL.iter().map(|s| s.name()).collect();
        format!("expected one of {}", names.join(", "))
    })
}

/// `--older-than D`: a duration as the configuration writes them.
fn parse_age(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?} is not a duration: {e}"))
}

/// `discard`: by id (failed rows deleted, delivering rows moved to failed,
/// others refused), or every failed row `selection` picks, deleted.
pub(super) fn discard(
    config: &Config,
    ids: &[String],
    selection: Option<&RowFilter>,
) -> anyhow::Result<ExitCode> {
    let mut admin = Admin::open(&Database::from_config(&config.store)?)?;
    if let Some(filter) = selection {
        let n = admin.discard_failed(filter)?;
        out!("{n} failed message(s) deleted");
        return Ok(ExitCode::SUCCESS);
    }
    let Discarded {
        deleted,
        failed,
        refused,
        missing,
    } = admin.discard(ids)?;
    out!(
        "{} message(s) discarded: {} failed deleted, {} delivering moved to failed",
        deleted.len() + failed.len(),
        deleted.len(),
        failed.len()
    );
    for (id, status) in &refused {
        eprintln!(
            "edge-outbox: {id}: not discarded: it is {} (only failed and delivering \
             messages can be discarded; the purge deletes settled ones)",
            status.name()
        );
    }
    for id in &missing {
        eprintln!("edge-outbox: {id}: no message with this id");
    }
    Ok(if refused.is_empty() && missing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `export`: the rows `filter` picks, oldest first, one submit request per
/// line on stdout; the count on stderr. Exit 1 when a row could not be
/// written as a request (it is named, the others are exported).
pub(super) fn export(
    config: &Config,
    filter: &RowFilter,
    limit: Option<u64>,
) -> anyhow::Result<ExitCode> {
    let reader = Reader::open(&Database::from_config(&config.store)?)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut skipped = 0u64;
    let visited = reader.visit(
        filter,
        ListOrder::OldestFirst,
        limit,
        |row| match submit_line(&row) {
            Ok(line) => out.write_all(&line).map_err(Stop::Write),
            Err(e) => {
                skipped += 1;
                eprintln!("edge-outbox: {}: not exported: {e:#}", row.id);
                Ok(())
            }
        },
    );
    let written = match visited.and_then(|n| out.flush().map(|()| n).map_err(Stop::Write)) {
        Ok(n) => n - skipped,
        Err(Stop::Write(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            return Ok(ExitCode::SUCCESS)
        }
        Err(Stop::Write(e)) => return Err(e).context("writing the export to stdout"),
        Err(Stop::Store(e)) => return Err(e.into()),
    };
    eprintln!("edge-outbox: exported {written} message(s)");
    Ok(if skipped == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Why an export stopped.
enum Stop {
    Store(crate::store::StoreError),
    Write(std::io::Error),
}

impl From<crate::store::StoreError> for Stop {
    fn from(e: crate::store::StoreError) -> Self {
        Stop::Store(e)
    }
}

/// `row` as one submit request line that stores the same message again.
fn submit_line(row: &Row) -> anyhow::Result<Vec<u8>> {
    let text = row
        .body_is_text
        .then(|| std::str::from_utf8(&row.body).ok())
        .flatten();
    let payload = match text {
        // A JSON string's body is its UTF-8 text: byte for byte.
        Some(text) => Payload::Json(RawValue::from_string(serde_json::to_string(text)?)?),
        None => Payload::Base64(base64::engine::general_purpose::STANDARD.encode(&row.body)),
    };
    let headers = row
        .headers
        .as_ref()
        .map(|text| RawValue::from_string(text.clone()))
        .transpose()
        .context("its stored headers are not JSON")?;
    let request = Request::Submit(SubmitRequest {
        content_type: row.content_type.clone(),
        exchange: row.exchange.clone(),
        headers,
        id: Some(row.id.clone()),
        payload,
        priority: (row.priority > 0).then_some(row.priority),
        routing_key: row.routing_key.clone(),
        // The time it has left, from now: the importing host applies it anew.
        ttl: row.expire_time.map(|at| {
            u64::try_from(at.saturating_sub(now_ms()))
                .unwrap_or(0)
                .max(1)
        }),
    });
    Ok(request.to_line()?)
}
