//! Service: talking to systemd (`Type=notify`).
//!
//! Role: READY once the database is open and the socket listens (the broker
//! may still be down), STOPPING when shutdown begins, and WATCHDOG pings
//! only while the agent's loops make progress: each ping follows a round of
//! probes that the store writer and the forwarder must answer, so a wedged
//! loop stops the pings and systemd restarts the agent. The same round of
//! probes answers `/health` on the metrics listener ([`Health`];
//! docs/operations.md, Health), under systemd or not.
//!
//! Without `NOTIFY_SOCKET` (not under systemd) every notification is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::store::Store;

/// The receiving end of liveness probes: a loop answers each one it sees.
pub(crate) type ProbeRx = mpsc::Receiver<oneshot::Sender<()>>;

/// Sends probes to one loop.
#[derive(Clone)]
pub(crate) struct Prober {
    name: &'static str,
    tx: mpsc::Sender<oneshot::Sender<()>>,
}

impl Prober {
    pub(crate) fn new(name: &'static str) -> (Prober, ProbeRx) {
        let (tx, rx) = mpsc::channel(1);
        (Prober { name, tx }, rx)
    }

    async fn probe(&self) -> Result<(), &'static str> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(reply).await.map_err(|_| self.name)?;
        answer.await.map_err(|_| self.name)
    }
}

/// Answers a probe taken from a [`ProbeRx`] in a loop's `select!`.
pub(crate) fn answer(probe: Option<oneshot::Sender<()>>) {
    if let Some(reply) = probe {
        let _ = reply.send(());
    }
}

pub(crate) fn ready() {
    let _ = sd_notify::notify(&[NotifyState::Ready]);
}

pub(crate) fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// The watchdog interval systemd asked for, if any.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// One round of probes: the store writer commits one, then every loop
/// answers one, each within `deadline`; `Err` names the first that did not.
async fn probe_all(store: &Store, probers: &[Prober], deadline: Duration) -> Result<(), String> {
    let store = tokio::time::timeout(deadline, store.probe()).await;
    if !matches!(store, Ok(Ok(()))) {
        return Err(format!(
            "the store writer did not commit a probe within {deadline:?}"
        ));
    }
    for prober in probers {
        if !matches!(
            tokio::time::timeout(deadline, prober.probe()).await,
            Ok(Ok(()))
        ) {
            return Err(format!(
                "the {} loop did not answer a probe within {deadline:?}",
                prober.name
            ));
        }
    }
    Ok(())
}

/// How long `/health` waits for each probe.
const HEALTH_DEADLINE: Duration = Duration::from_secs(5);
/// How long a `/health` answer is reused: a flood of requests costs the
/// writer at most one probe commit per period.
const HEALTH_REUSE: Duration = Duration::from_secs(1);

/// `/health`: the watchdog's round of probes, run on request.
pub(crate) struct Health {
    store: Store,
    probers: Vec<Prober>,
    /// The last answer and when it was had; the lock also makes concurrent
    /// requests share one round.
    last: tokio::sync::Mutex<Option<(tokio::time::Instant, Result<(), String>)>>,
}

impl Health {
    pub(crate) fn new(store: Store, probers: Vec<Prober>) -> Health {
        Health {
            store,
            probers,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// `Ok` when every loop answered; else why not.
    pub(crate) async fn check(&self) -> Result<(), String> {
        let mut last = self.last.lock().await;
        if let Some((at, answer)) = &*last {
            if at.elapsed() < HEALTH_REUSE {
                return answer.clone();
            }
        }
        let answer = probe_all(&self.store, &self.probers, HEALTH_DEADLINE).await;
        *last = Some((tokio::time::Instant::now(), answer.clone()));
        answer
    }
}

/// Pings the watchdog every half interval, after every probe answered.
pub(crate) struct Watchdog {
    interval: Duration,
    store: Store,
    probers: Vec<Prober>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ServiceError {}

impl Watchdog {
    pub(crate) fn new(interval: Duration, store: Store, probers: Vec<Prober>) -> Self {
        Watchdog {
            interval,
            store,
            probers,
        }
    }

    /// One round: probes every loop; true when all answered in time.
    pub(crate) async fn run_once(&self) -> bool {
        match probe_all(&self.store, &self.probers, self.interval / 2).await {
            Ok(()) => true,
            Err(reason) => {
                tracing::error!("watchdog: {reason}; not pinging");
                false
            }
        }
    }

    pub(crate) async fn run(self, shutdown: CancellationToken) -> Result<(), ServiceError> {
        let mut ticks = tokio::time::interval(self.interval / 2);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = ticks.tick() => {}
            }
            let healthy = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                healthy = self.run_once() => healthy,
            };
            if healthy {
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
            }
        }
    }
}

/// How often `STATUS=` is refreshed under systemd.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Keeps `systemctl status` showing the backlog and the broker state.
pub(crate) struct StatusNotifier {
    report: crate::metrics::ReportSource,
}

impl StatusNotifier {
    /// `None` when not under systemd (no `NOTIFY_SOCKET`).
    pub(crate) fn new(report: crate::metrics::ReportSource) -> Option<Self> {
        std::env::var_os("NOTIFY_SOCKET").map(|_| StatusNotifier { report })
    }

    /// One `STATUS=` line from a fresh report.
    pub(crate) async fn run_once(&self) {
        let report = self.report.clone();
        let Ok(Some(r)) = tokio::task::spawn_blocking(move || report()).await else {
            return;
        };
        let broker = match &r.broker {
            Some(b) if b.connected => format!(
                "connected to {}, {} in flight",
                b.url.as_deref().unwrap_or("?"),
                b.in_flight
            ),
            _ => "broker not connected".to_string(),
        };
        let line = format!(
            "{} delivering, {} failed; {broker}",
            r.counts.delivering, r.counts.failed
        );
        let _ = sd_notify::notify(&[NotifyState::Status(&line)]);
    }

    pub(crate) async fn run(self, shutdown: CancellationToken) -> Result<(), ServiceError> {
        let mut ticks = tokio::time::interval(STATUS_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = ticks.tick() => self.run_once().await,
            }
        }
    }
}
