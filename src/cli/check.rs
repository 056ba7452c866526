//! Check: `status --check`, the agent's health in one line and an exit
//! code, for cron, monitoring and `ExecStartPost` (docs/cli.md, `status
//! --check`; docs/decisions/0034-status-check.md).
//!
//! Role: ask the running agent for its status report and judge it against
//! the bounds: the broker disconnected for longer than `--max-disconnected`,
//! the oldest delivering message older than `--max-age`.
//!
//! Invariants: exactly one line on stdout, starting `OK`, `CRITICAL` or
//! `UNKNOWN` (the Nagios plugin convention); the exit code comes from
//! [`Exit`]: 0 OK, 1 a bound exceeded, 69 no agent, 75 no answer in time,
//! 77 not allowed to ask. The database is never read: a check is about the
//! running agent.

use std::process::ExitCode;
use std::time::Duration;

use super::exit::Exit;
use super::{client, describe};
use crate::config::Config;
use crate::protocol::Answer;
use crate::status::StatusReport;

/// What `--check` holds the report to.
pub(super) struct Bounds {
    /// The oldest delivering message may be at most this old; `None`: not
    /// checked.
    pub(super) max_age: Option<Duration>,
    /// The broker may be disconnected at most this long.
    pub(super) max_disconnected: Duration,
}

/// `status --check`: prints the verdict, returns its exit code.
pub(super) fn status_check(config: &Config, bounds: &Bounds) -> ExitCode {
    let (line, exit) = match client::query_status(&config.submit.socket) {
        Ok(Answer::Ok(report)) => match verdict(&report, bounds, crate::store::now_ms()) {
            Ok(fine) => (format!("OK: {fine}"), Exit::Success),
            Err(problems) => (format!("CRITICAL: {}", problems.join("; ")), Exit::Failure),
        },
        Ok(Answer::Refused(refusal)) => (
            format!(
                "UNKNOWN: the agent refused the status request ({}: {})",
                refusal.code, refusal.message
            ),
            Exit::for_refusal(refusal.code),
        ),
        Err(e) => {
            let exit = Exit::for_error(&e);
            let state = match exit {
                Exit::Unavailable => "CRITICAL: the agent is not running",
                Exit::TempFail => "CRITICAL: the agent is not answering",
                _ => "UNKNOWN",
            };
            (format!("{state}: {}", describe(&e)), exit)
        }
    };
    out!("{line}");
    exit.into()
}

/// `Ok(summary)` when the report is within the bounds, else every bound it
/// exceeds. `now` is epoch ms.
fn verdict(report: &StatusReport, bounds: &Bounds, now: i64) -> Result<String, Vec<String>> {
    let mut problems = Vec::new();
    let delivering = report.counts.delivering;
    let broker = match &report.broker {
        Some(b) if b.connected => {
            format!("broker connected to {}", b.url.as_deref().unwrap_or("?"))
        }
        Some(b) => {
            // No `since` yet: the first connection attempt is under way.
            let down = b.since.map_or(0, |t| (now - t).max(0));
            let down = Duration::from_millis(u64::try_from(down).unwrap_or(0));
            let text = format!(
                "broker disconnected for {}{}",
                human(down),
                b.last_error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
            if down > bounds.max_disconnected {
                problems.push(format!(
                    "{text}, longer than {}",
                    human(bounds.max_disconnected)
                ));
            }
            text
        }
        None => "broker state unknown".to_string(),
    };
    let oldest = report
        .oldest_delivering_age_ms
        .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(0)));
    if let (Some(age), Some(max)) = (oldest, bounds.max_age) {
        if age > max {
            problems.push(format!(
                "the oldest delivering message is {} old, older than {} ({delivering} delivering)",
                human(age),
                human(max)
            ));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let backlog = match oldest {
        Some(age) => format!("{delivering} delivering, the oldest {} old", human(age)),
        None => "nothing delivering".to_string(),
    };
    Ok(format!("{broker}; {backlog}"))
}

/// A duration in whole seconds, as `humantime` writes it (`2m 5s`).
fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::BrokerStatus;

    fn report(broker: Option<BrokerStatus>, oldest_ms: Option<i64>) -> StatusReport {
        serde_json::from_value(serde_json::json!({
            "source": "agent",
            "version": "0",
            "counts": {"delivering": 3, "delivered": 0, "failed": 0, "consumed": 0},
            "oldest_delivering_age_ms": oldest_ms,
            "broker": broker,
            "db_path": "x",
            "db_size_bytes": 0,
            "free_disk_bytes": null,
        }))
        .unwrap()
    }

    fn broker(connected: bool, since: Option<i64>) -> Option<BrokerStatus> {
        Some(BrokerStatus {
            connected,
            url: Some("amqp://h".into()),
            since,
            last_error: (!connected).then(|| "refused".into()),
            ..BrokerStatus::default()
        })
    }

    const BOUNDS: Bounds = Bounds {
        max_age: Some(Duration::from_secs(600)),
        max_disconnected: Duration::from_secs(300),
    };

    #[test]
    fn within_the_bounds_is_ok() {
        let now = 1_000_000_000;
        let fine = verdict(&report(broker(true, Some(0)), Some(599_000)), &BOUNDS, now);
        assert_eq!(
            fine.unwrap(),
            "broker connected to amqp://h; 3 delivering, the oldest 9m 59s old"
        );
        // Disconnected, but not for long; and still on the first attempt.
        assert!(verdict(
            &report(broker(false, Some(now - 300_000)), None),
            &BOUNDS,
            now
        )
        .is_ok());
        assert!(verdict(&report(broker(false, None), None), &BOUNDS, now).is_ok());
        // No --max-age: any age will do.
        let no_age = Bounds {
            max_age: None,
            ..BOUNDS
        };
        assert!(verdict(&report(broker(true, None), Some(i64::MAX)), &no_age, now).is_ok());
    }

    #[test]
    fn each_exceeded_bound_is_named() {
        let now = 1_000_000_000;
        let problems = verdict(
            &report(broker(false, Some(now - 301_000)), Some(601_000)),
            &BOUNDS,
            now,
        )
        .unwrap_err();
        assert_eq!(
            problems,
            [
                "broker disconnected for 5m 1s (refused), longer than 5m",
                "the oldest delivering message is 10m 1s old, older than 10m (3 delivering)",
            ]
        );
    }
}
