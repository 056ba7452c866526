//! App: the one place that wires the components together and supervises them.
//!
//! Role: open the store, bind the socket, start every long-running task,
//! wait for a signal or for a task to end, then shut down in order.
//!
//! Shutdown order, and why:
//! 1. cancel the shared token: the submit server stops accepting and removes
//!    its socket file; connections answer what they already read;
//! 2. wait for the tasks, at most [`DRAIN_TIMEOUT`]; a task still running
//!    then is named in the log and abandoned (the table is the truth: what
//!    it held is redone at the next start);
//! 3. close the store last, so every answer the connections still owe can
//!    be committed first;
//! 4. log one line, `edge-outbox stopped`, saying what the stop waited for
//!    (connections answered, confirms awaited, tasks abandoned) and how long
//!    it took ([`crate::stop`]).
//!
//! A second SIGTERM/SIGINT exits at once. SIGHUP is logged and ignored
//! (no reload: the configuration is read at start). Any task that ends with an error
//! ends the agent with that error (exit 1), after the same orderly shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::broker::{BrokerError, Connector};
use crate::config::Config;
use crate::consume::Consumer;
use crate::expiry::Expiry;
use crate::forward::{ForwardError, Forwarder, Resend};
use crate::metrics::{report_source, Metrics, MetricsError, MetricsServer};
use crate::purge::Purge;
use crate::service::{self, Health, Prober, StatusNotifier, Watchdog};
use crate::status::{BrokerState, StatusReport};
use crate::stop::StopTally;
use crate::store::{Store, StoreError};
use crate::submit::{StatusSource, SubmitError, SubmitServer, SubmitSocket};

/// How long tasks get to finish after shutdown begins.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub(crate) enum AppError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Submit(#[from] SubmitError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("task {task} failed: {message}")]
    Task { task: &'static str, message: String },
}

type TaskResult = (&'static str, Result<(), String>);

/// Runs the agent until SIGTERM/SIGINT or a task failure.
pub(crate) async fn run(mut config: Config) -> Result<(), AppError> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    // Before anything opens a descriptor the budget must account for.
    crate::fd_limit::apply(&mut config);
    let mut signals = Signals::install()?;
    let started = start(&config).await?;
    let store = started.store.clone();
    let shutdown = CancellationToken::new();
    let tally = StopTally::new();
    let mut tasks = spawn_tasks(&config, started, &shutdown, &tally);
    let mut failure = signals.until_stop(&mut tasks).await;
    let stopping = Instant::now();
    service::stopping();
    shutdown.cancel();
    signals.second_one_exits();
    let abandoned = drain(&mut tasks, &mut failure).await;
    store.close().await;
    let waited = tally.figures();
    tracing::info!(
        connections = waited.connections,
        confirms = waited.confirms,
        unconfirmed = waited.unconfirmed,
        abandoned,
        duration_ms = u64::try_from(stopping.elapsed().as_millis()).unwrap_or(u64::MAX),
        "edge-outbox stopped"
    );
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What start-up opened and bound, before READY.
struct Started {
    store: Store,
    broker: BrokerState,
    metrics: Arc<Metrics>,
    socket: SubmitSocket,
    metrics_server: Option<MetricsServer>,
    publish_connector: Connector,
    /// The consumer's queue and connector, when there is a consumer.
    consumer: Option<(String, Connector)>,
}

/// Opens the store and binds every listener, then tells systemd READY.
/// Everything that listens is bound before READY: a port or a socket in
/// use is a start-up failure, not a task that dies later.
async fn start(config: &Config) -> Result<Started, AppError> {
    let publish_connector = Connector::new(&config.broker, "publisher")?;
    let consumer = match &config.consumer.queue {
        Some(queue) => Some((queue.clone(), Connector::new(&config.broker, "consumer")?)),
        None => None,
    };
    let metrics = Arc::new(Metrics::new());
    let store = {
        let store_config = config.store.clone();
        let room_purged = metrics.rows_purged_for_room.clone();
        tokio::task::spawn_blocking(move || Store::open_counting(&store_config, room_purged))
            .await
            .map_err(|e| AppError::Task {
                task: "store-open",
                message: e.to_string(),
            })??
            .with_max_age(config.publish.max_age)
    };
    let broker = BrokerState::default();
    let listeners = async {
        let socket = SubmitSocket::bind(&config.submit)?;
        let metrics_server = match config.metrics.listen {
            None => None,
            Some(listen) => {
                let report = report_source(store.reader().clone(), broker.clone());
                Some(MetricsServer::bind(listen, metrics.clone(), report).await?)
            }
        };
        Ok::<_, AppError>((socket, metrics_server))
    };
    let (socket, metrics_server) = match listeners.await {
        Ok(bound) => bound,
        Err(e) => {
            store.close().await;
            return Err(e);
        }
    };
    tracing::info!(
        socket = %socket.path().display(),
        socket_activated = socket.activated(),
        database = %config.store.path.display(),
        metrics = %config.metrics.listen.map(|a| a.to_string()).unwrap_or_default(),
        version = env!("CARGO_PKG_VERSION"),
        "edge-outbox ready"
    );
    service::ready();
    Ok(Started {
        store,
        broker,
        metrics,
        socket,
        metrics_server,
        publish_connector,
        consumer,
    })
}

/// Starts every long-running task.
fn spawn_tasks(
    config: &Config,
    started: Started,
    shutdown: &CancellationToken,
    tally: &Arc<StopTally>,
) -> JoinSet<TaskResult> {
    let Started {
        store,
        broker,
        metrics,
        socket,
        metrics_server,
        publish_connector,
        consumer,
    } = started;
    let mut tasks: JoinSet<TaskResult> = JoinSet::new();
    let status_source: StatusSource = {
        let reader = store.reader().clone();
        let broker = broker.clone();
        Arc::new(move || StatusReport::collect(&reader, Some(&broker)).map_err(|e| e.to_string()))
    };
    let server = SubmitServer::new(
        socket,
        config.submit.clone(),
        store.clone(),
        status_source,
        metrics.clone(),
    )
    .noting_stop_in(tally.clone());
    spawn(&mut tasks, "submit", server.run(shutdown.clone()));
    let (forwarder_prober, forwarder_probes) = Prober::new("publish");
    if let Some(server) = metrics_server {
        // `/health` runs the watchdog's probes (docs/operations.md, Health).
        let health = Health::new(store.clone(), vec![forwarder_prober.clone()]);
        spawn(
            &mut tasks,
            "metrics",
            server.with_health(health).run(shutdown.clone()),
        );
    }
    // The forwarder declares the agent's own consumer topology before it
    // publishes, so nothing goes to an exchange the agent itself creates
    // before that exchange exists (docs/forwarding.md, Connection).
    let own_topology = config
        .consumer
        .queue
        .clone()
        .map(|queue| (queue, config.consumer.clone()));
    let (forwarder, passes) = Forwarder::new(
        config.publish.clone(),
        own_topology,
        publish_connector,
        store.clone(),
        broker.clone(),
        forwarder_probes,
        metrics.clone(),
    );
    let forwarder = forwarder.noting_stop_in(tally.clone());
    spawn(&mut tasks, "publish", forwarder.run(shutdown.clone()));
    let resend = Resend::new(config.publish.resend_every, passes);
    spawn(&mut tasks, "resend", resend.run(shutdown.clone()));
    if let Some(interval) = service::watchdog_interval() {
        let watchdog = Watchdog::new(interval, store.clone(), vec![forwarder_prober]);
        spawn(&mut tasks, "watchdog", watchdog.run(shutdown.clone()));
    } else {
        drop(forwarder_prober);
    }
    if let Some(notifier) =
        StatusNotifier::new(report_source(store.reader().clone(), broker.clone()))
    {
        spawn(&mut tasks, "notify-status", notifier.run(shutdown.clone()));
    }
    let purge = Purge::new(config.purge.clone(), store.clone());
    spawn(&mut tasks, "purge", purge.run(shutdown.clone()));
    let expiry = Expiry::new(store.clone(), metrics.clone());
    spawn(&mut tasks, "expiry", expiry.run(shutdown.clone()));
    if let Some((queue, connector)) = consumer {
        let consumer = Consumer::new(queue, config.consumer.clone(), connector, store, metrics);
        spawn(&mut tasks, "consume", consumer.run(shutdown.clone()));
    }
    tasks
}

/// The signals the agent acts on.
struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl Signals {
    fn install() -> Result<Signals, AppError> {
        let install = |kind| signal(kind).map_err(AppError::Signals);
        Ok(Signals {
            terminate: install(SignalKind::terminate())?,
            interrupt: install(SignalKind::interrupt())?,
            hangup: install(SignalKind::hangup())?,
        })
    }

    /// Waits for SIGTERM/SIGINT (→ `None`) or a task that ends, which is a
    /// failure: tasks end only on shutdown. SIGHUP is logged and ignored.
    async fn until_stop(&mut self, tasks: &mut JoinSet<TaskResult>) -> Option<AppError> {
        loop {
            tokio::select! {
                _ = self.terminate.recv() => {
                    tracing::info!(signal = "SIGTERM", "shutting down");
                    return None;
                }
                _ = self.interrupt.recv() => {
                    tracing::info!(signal = "SIGINT", "shutting down");
                    return None;
                }
                _ = self.hangup.recv() => {
                    tracing::info!(signal = "SIGHUP", "ignored: the configuration is read at start; restart the agent to apply changes");
                }
                Some(ended) = tasks.join_next() => {
                    return Some(task_failure(ended).unwrap_or(AppError::Task {
                        task: "a task",
                        message: "ended before shutdown".into(),
                    }));
                }
            }
        }
    }

    /// From now on a second SIGTERM/SIGINT means "now": exit at once.
    fn second_one_exits(self) {
        let Signals {
            mut terminate,
            mut interrupt,
            ..
        } = self;
        tokio::spawn(async move {
            tokio::select! {
                _ = terminate.recv() => {},
                _ = interrupt.recv() => {},
            }
            tracing::warn!("second signal: exiting at once");
            std::process::exit(1);
        });
    }
}

/// Waits for the tasks, at most [`DRAIN_TIMEOUT`]; a task still running
/// then is named in the log and abandoned. The first failure is kept.
/// Returns how many tasks were abandoned.
async fn drain(tasks: &mut JoinSet<TaskResult>, failure: &mut Option<AppError>) -> usize {
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(ended) = tasks.join_next().await {
            if let Some(e) = task_failure(ended) {
                failure.get_or_insert(e);
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            tasks = tasks.len(),
            "tasks still running after the drain timeout; abandoning them"
        );
        tasks.abort_all();
    }
    tasks.len()
}

fn spawn<E: std::fmt::Display>(
    tasks: &mut JoinSet<TaskResult>,
    name: &'static str,
    task: impl Future<Output = Result<(), E>> + Send + 'static,
) {
    tasks.spawn(async move {
        tracing::debug!(task = name, "task started");
        (name, task.await.map_err(|e| e.to_string()))
    });
}

fn task_failure(ended: Result<TaskResult, tokio::task::JoinError>) -> Option<AppError> {
    match ended {
        Ok((task, Ok(()))) => {
            tracing::debug!(task, "task finished");
            None
        }
        Ok((task, Err(message))) => {
            tracing::error!(task, error = %message, "task failed");
            Some(AppError::Task { task, message })
        }
        Err(e) => {
            tracing::error!(error = %e, "task panicked");
            Some(AppError::Task {
                task: "unknown",
                message: e.to_string(),
            })
        }
    }
}
