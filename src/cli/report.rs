//! Report: how the CLI prints the status report and `msg_log` rows.
//!
//! Owns the human formats (`status`, `list`, `show`) and the JSON shape of
//! a row in `list --json` / `show --json` (the row's fields plus
//! `status_code`, and the body as text or base64).
//!
//! Invariant: times print as RFC 3339 seconds, a missing one as `-`; a body
//! that is not text prints as base64, never as lossy bytes.

use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use crate::status::StatusReport;
use crate::store::Row;

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

pub(super) fn print_status(r: &StatusReport) {
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
        Some(age) => out!("oldest delivering: {} old", format_age(age)),
        None => out!("oldest delivering: none"),
    }
    out!("{}", backlog_line(r));
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
    if let Some(b) = r
        .broker
        .as_ref()
        .filter(|b| b.max_rate.is_some() || b.max_bytes_rate.is_some())
    {
        let caps: Vec<String> = b
            .max_rate
            .map(|m| format!("{m} messages/s"))
            .into_iter()
            .chain(
                b.max_bytes_rate
                    .map(|m| format!("{}/s", bytesize::ByteSize(m))),
            )
            .collect();
        out!(
            "rate cap:  {}, {}; {} waited in all",
            caps.join(" and "),
            if b.throttled {
                "throttled now"
            } else {
                "not throttling"
            },
            format_age(i64::try_from(b.throttled_ms).unwrap_or(i64::MAX))
        );
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

/// The backlog per priority, highest first, and the expired rows:
/// `backlog:   9: 3, 0: 1000 (by priority); 12 expired`.
fn backlog_line(r: &StatusReport) -> String {
    let by_priority = if r.delivering_by_priority.is_empty() {
        "empty".to_string()
    } else {
        let parts: Vec<String> = r
            .delivering_by_priority
            .iter()
            .rev()
            .map(|(p, n)| format!("{p}: {n}"))
            .collect();
        format!("{} (by priority)", parts.join(", "))
    };
    format!("backlog:   {by_priority}; {} expired", r.expired)
}

/// A row for `--json` output (not a protocol answer: built here, for
/// scripts reading the CLI).
pub(super) fn row_json(row: &Row, with_body: bool) -> Value {
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

pub(super) fn print_table(rows: &[Row]) {
    out!(
        "{:<38} {:<10} {:>5}  {:<20} {:<20} {:<20} {:>3}  LAST ERROR",
        "ID",
        "STATUS",
        "TRIES",
        "EXCHANGE",
        "ROUTING KEY",
        "CREATED",
        "PRI"
    );
    for r in rows {
        out!(
            "{:<38} {:<10} {:>5}  {:<20} {:<20} {:<20} {:>3}  {}",
            r.id,
            r.status.name(),
            r.try_count,
            r.exchange,
            r.routing_key,
            format_time(r.create_time),
            r.priority,
            r.last_error.as_deref().unwrap_or("")
        );
    }
}

pub(super) fn print_row(r: &Row) {
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
    out!("priority:      {}", r.priority);
    out!("expires:       {}", format_time(r.expire_time));
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
