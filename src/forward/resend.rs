//! Resend: the periodic pass (docs/forwarding.md, Passes).
//!
//! Role: every `publish.resend_every`, ask the forwarder for a full pass
//! over the backlog, so rows whose retry time came, and rows whose outcome
//! was unknown, are published again without waiting for new traffic.
//!
//! Owns: [`Resend`], the timer, and the request/answer pair it uses
//! ([`PassRequest`], [`PassReport`]). The forwarder answers a request once
//! the pass it started is published; [`Resend::run_once`] is one such
//! request, waited for.
//!
//! Invariants:
//! - At most one pass request of this job is outstanding: the next tick
//!   waits for the answer (ticks missed meanwhile are delayed, not bunched).
//! - No pass is asked for at start: the forwarder starts with a pass of its
//!   own when its link comes up.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ResendError {
    #[error("the forwarder is gone")]
    ForwarderGone,
}

/// Asks the forwarder for a full pass; answered when it is published.
pub(crate) struct PassRequest {
    pub(crate) reply: oneshot::Sender<PassReport>,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct PassReport {
    /// Rows the pass published (first publishes and re-publishes alike).
    pub(crate) published: u64,
}

/// The periodic resend job.
pub(crate) struct Resend {
    every: Duration,
    passes: mpsc::Sender<PassRequest>,
}

impl Resend {
    /// `passes` is the forwarder's request channel.
    pub(crate) fn new(every: Duration, passes: mpsc::Sender<PassRequest>) -> Self {
        Resend { every, passes }
    }

    /// One full pass: returns once the forwarder has published every row
    /// that was due (while the broker is unreachable, that waits for it).
    pub(crate) async fn run_once(&self) -> Result<PassReport, ResendError> {
        let (reply, answer) = oneshot::channel();
        self.passes
            .send(PassRequest { reply })
            .await
            .map_err(|_| ResendError::ForwarderGone)?;
        answer.await.map_err(|_| ResendError::ForwarderGone)
    }

    /// A pass every `publish.resend_every` until `shutdown`.
    pub(crate) async fn run(self, shutdown: CancellationToken) -> Result<(), ResendError> {
        let mut ticks = tokio::time::interval(self.every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the forwarder starts with a pass of its own
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = ticks.tick() => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                report = self.run_once() => {
                    let report = report?;
                    if report.published > 0 {
                        tracing::debug!(published = report.published, "resend pass done");
                    }
                }
            }
        }
    }
}
