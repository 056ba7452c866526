//! Commands: what each subcommand but `submit` does (docs/cli.md).
//!
//! Role: run the agent (`run`), show the configuration (`check-config`),
//! report status (from the agent, else from the database), read rows
//! (`list`, `show`), and two admin writes (`retry`, `purge`); `discard`
//! and `export` are `backlog.rs`.
//!
//! Invariants: each returns the exit code the command documents; the
//! database commands open their own connections (safe beside a running
//! agent); a refusal by the agent never fails `status`.

use std::process::ExitCode;

use serde_json::Value;

use super::report::{print_row, print_status, print_table, row_json};
use super::{client, runtime, EXIT_CONFIG};
use crate::broker::{broker_targets, BrokerError};
use crate::config::{self, Config};
use crate::status::StatusReport;
use crate::store::{Admin, Database, ListOrder, Reader, RowFilter};

/// `run`: the agent in the foreground until a signal.
pub(super) fn run(config: Config) -> anyhow::Result<ExitCode> {
    crate::logging::init(&config.log);
    match runtime()?.block_on(crate::app::run(config)) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(crate::app::AppError::Broker(e)) => Ok(broker_failure(&e)),
        Err(e) => Err(e.into()),
    }
}

/// A password or TLS file that cannot be read (or a URL that does not
/// parse) is a configuration problem: exit 78, so systemd does not loop.
/// `run` and `check-config` say it in the same words.
fn broker_failure(e: &BrokerError) -> ExitCode {
    eprintln!("edge-outbox: bad configuration: {e}");
    if let BrokerError::PasswordFile { path, .. } = e {
        if path.starts_with("/run/credentials")
            && std::env::var_os("CREDENTIALS_DIRECTORY").is_none()
        {
            eprintln!(
                "edge-outbox: hint: {} is a systemd credential, there only while the unit \
                 runs; outside it, point the key at the credential's source: \
                 EDGE_OUTBOX_BROKER_PASSWORD_FILE=/etc/edge-outbox/broker-password",
                path.display()
            );
        }
    }
    ExitCode::from(EXIT_CONFIG)
}

/// `check-config`: the effective configuration, passwords redacted; the
/// warnings on stderr (stdout stays the configuration). Exit 78, with
/// `run`'s own message, when a file the configuration names cannot be read.
pub(super) fn check_config(config: &Config) -> anyhow::Result<ExitCode> {
    // The files `run` reads before it starts (password, CA, certificate,
    // key), read the same way: what fails `run` fails here first.
    if let Err(e) = broker_targets(&config.broker) {
        return Ok(broker_failure(&e));
    }
    for warning in config.warnings() {
        eprintln!("edge-outbox: warning: {warning}");
    }
    out!("configuration OK");
    out!("{}", effective_config(config)?.trim_end());
    Ok(ExitCode::SUCCESS)
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

/// `status`: the agent's report, or the database's when no agent answers.
pub(super) fn status(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let report = match client::ask_status(&config.submit.socket)? {
        Some(report) => report,
        None => {
            StatusReport::collect(&Reader::open(&Database::from_config(&config.store)?)?, None)?
        }
    };
    if json {
        out!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_status(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// `list`: the rows `filter` selects, in `order`.
pub(super) fn list(
    config: &Config,
    filter: &RowFilter,
    order: ListOrder,
    limit: u64,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let rows = Reader::open(&Database::from_config(&config.store)?)?.list(filter, order, limit)?;
    if json {
        let rows: Vec<Value> = rows.iter().map(|r| row_json(r, false)).collect();
        out!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print_table(&rows);
    }
    Ok(ExitCode::SUCCESS)
}

/// `show`: one row with its body; exit 1 when there is none.
pub(super) fn show(config: &Config, id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let Some(row) = Reader::open(&Database::from_config(&config.store)?)?.get(id)? else {
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

/// `purge`: deletes (or counts, with `--dry-run`) what the retention allows.
pub(super) fn purge(config: &Config, dry_run: bool) -> anyhow::Result<ExitCode> {
    let report = crate::purge::purge_database(
        &Database::from_config(&config.store)?,
        &config.purge,
        dry_run,
    )?;
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

/// `retry`: failed rows back to delivering, by id or those `selection`
/// picks (`--failed` and filters); exit 1 when an id was not a failed row.
pub(super) fn retry(
    config: &Config,
    ids: &[String],
    selection: Option<&RowFilter>,
) -> anyhow::Result<ExitCode> {
    let mut admin = Admin::open(&Database::from_config(&config.store)?)?;
    if let Some(filter) = selection {
        let n = admin.retry_failed(filter)?;
        out!("{n} failed message(s) moved back to delivering");
        return Ok(ExitCode::SUCCESS);
    }
    let skipped = admin.retry(ids)?;
    let moved = ids.len() - skipped.len();
    out!("{moved} message(s) moved back to delivering");
    for id in &skipped {
        eprintln!("edge-outbox: {id}: not a failed message (missing, or in another status)");
    }
    Ok(if skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
