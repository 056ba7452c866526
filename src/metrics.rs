//! Metrics: Prometheus text format at `/metrics` (`metrics.listen`).
//!
//! Role: own the registry and every metric. Components hold an
//! `Arc<Metrics>` and bump counters as events happen (submits, publishes,
//! confirms, returns, nacks, timeouts, reconnects, deliveries, duplicates,
//! handler failures, confirm latency); what the database knows (rows by
//! status, delivering, oldest delivering age, database size, free disk) is read
//! at scrape time, so it is never stale.
//!
//! Invariant: metrics never hold up the work: counters are atomics, and the
//! scrape reads the database through the reader pool, not the writer.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::status::StatusReport;
use crate::store::Reader;

#[derive(Debug, thiserror::Error)]
pub(crate) enum MetricsError {
    #[error("cannot listen on metrics.listen {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: String,
}

/// Every metric of the agent.
pub(crate) struct Metrics {
    registry: Registry,
    pub submits_accepted: Counter,
    pub submits_duplicate: Counter,
    pub submits_refused: Family<ReasonLabel, Counter>,
    pub publishes: Counter,
    pub confirms: Counter,
    pub returns: Counter,
    pub nacks: Counter,
    pub confirm_timeouts: Counter,
    pub channel_closes: Counter,
    pub connects: Counter,
    pub connect_failures: Counter,
    pub confirm_latency: Histogram,
    pub deliveries: Counter,
    pub duplicates: Counter,
    pub handler_failures: Counter,
    pub dead_lettered: Counter,
    rows: Family<StatusLabel, Gauge>,
    delivering: Gauge,
    oldest_delivering_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    db_size: Gauge,
    free_disk: Gauge,
    in_flight: Gauge,
    broker_connected: Gauge,
    /// Settled rows the store purged to make room under `store.max_db_size`
    /// (the store counts them: `Store::open_counting`).
    pub rows_purged_for_room: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    // One flat list of registrations, longer than a function should be:
    // it is the catalogue of every metric (name, help, kind) in one place,
    // matching docs/operations.md, Metrics; splitting it would scatter it.
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("edge_outbox");
        let m = Metrics {
            submits_accepted: Counter::default(),
            submits_duplicate: Counter::default(),
            submits_refused: Family::default(),
            publishes: Counter::default(),
            confirms: Counter::default(),
            returns: Counter::default(),
            nacks: Counter::default(),
            confirm_timeouts: Counter::default(),
            channel_closes: Counter::default(),
            connects: Counter::default(),
            connect_failures: Counter::default(),
            confirm_latency: Histogram::new([
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            deliveries: Counter::default(),
            duplicates: Counter::default(),
            handler_failures: Counter::default(),
            dead_lettered: Counter::default(),
            rows: Family::default(),
            delivering: Gauge::default(),
            oldest_delivering_age: Gauge::default(),
            db_size: Gauge::default(),
            free_disk: Gauge::default(),
            in_flight: Gauge::default(),
            broker_connected: Gauge::default(),
            rows_purged_for_room: Counter::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "submits_accepted",
            "Messages stored and acknowledged on the socket",
            m.submits_accepted.clone(),
        );
        r.register(
            "submits_duplicate",
            "Submits answered ok as duplicates of a stored id",
            m.submits_duplicate.clone(),
        );
        r.register(
            "submits_refused",
            "Submits refused, by error code",
            m.submits_refused.clone(),
        );
        r.register(
            "publishes",
            "Publish attempts sent to the broker",
            m.publishes.clone(),
        );
        r.register(
            "confirms",
            "Broker acks without a return (delivered)",
            m.confirms.clone(),
        );
        r.register(
            "returns",
            "Messages returned by the broker (unroutable)",
            m.returns.clone(),
        );
        r.register("nacks", "Broker nacks", m.nacks.clone());
        r.register(
            "confirm_timeouts",
            "Confirms not received within publish.confirm_timeout",
            m.confirm_timeouts.clone(),
        );
        r.register(
            "channel_closes",
            "Publishing channels closed by the broker (404 and the like)",
            m.channel_closes.clone(),
        );
        r.register(
            "connects",
            "Broker connections established",
            m.connects.clone(),
        );
        r.register(
            "connect_failures",
            "Failed broker connection attempts",
            m.connect_failures.clone(),
        );
        r.register(
            "confirm_latency_seconds",
            "Time from publish to confirm",
            m.confirm_latency.clone(),
        );
        r.register(
            "consumer_deliveries",
            "Deliveries taken by the consumer",
            m.deliveries.clone(),
        );
        r.register(
            "consumer_duplicates",
            "Deliveries of already consumed messages (acked, not run)",
            m.duplicates.clone(),
        );
        r.register(
            "handler_failures",
            "Consumer handler runs that failed",
            m.handler_failures.clone(),
        );
        r.register(
            "consumer_rejected",
            "Deliveries rejected after consumer.max_attempts",
            m.dead_lettered.clone(),
        );
        r.register("rows", "Rows in msg_log by status", m.rows.clone());
        r.register(
            "delivering",
            "Messages waiting to be forwarded (status 0, delivering)",
            m.delivering.clone(),
        );
        r.register(
            "oldest_delivering_age_seconds",
            "Age of the oldest delivering message (status 0)",
            m.oldest_delivering_age.clone(),
        );
        r.register(
            "database_size_bytes",
            "Database and WAL file size",
            m.db_size.clone(),
        );
        r.register(
            "free_disk_bytes",
            "Free space on the database's filesystem",
            m.free_disk.clone(),
        );
        r.register(
            "in_flight",
            "Messages published and not yet confirmed",
            m.in_flight.clone(),
        );
        r.register(
            "broker_connected",
            "1 when the forwarder is connected",
            m.broker_connected.clone(),
        );
        r.register(
            "rows_purged_for_room",
            "Settled rows purged to make room under store.max_db_size",
            m.rows_purged_for_room.clone(),
        );
        Metrics { registry, ..m }
    }

    pub(crate) fn refused(&self, reason: &str) {
        self.submits_refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Sets the gauges from a status report.
    fn observe(&self, report: &StatusReport) {
        let c = &report.counts;
        for (status, n) in [
            ("delivering", c.delivering),
            ("delivered", c.delivered),
            ("failed", c.failed),
            ("consumed", c.consumed),
        ] {
            self.rows
                .get_or_create(&StatusLabel {
                    status: status.into(),
                })
                .set(n as i64);
        }
        self.delivering.set(c.delivering as i64);
        self.oldest_delivering_age
            .set(report.oldest_delivering_age_ms.unwrap_or(0) as f64 / 1000.0);
        self.db_size.set(report.db_size_bytes as i64);
        self.free_disk
            .set(report.free_disk_bytes.unwrap_or(0) as i64);
        if let Some(b) = &report.broker {
            self.in_flight.set(b.in_flight as i64);
            self.broker_connected.set(i64::from(b.connected));
        }
    }

    /// The Prometheus text exposition.
    pub(crate) fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Produces the status report at scrape time (given by the wiring).
pub(crate) type ReportSource = Arc<dyn Fn() -> Option<StatusReport> + Send + Sync>;

/// The `/metrics` endpoint.
pub(crate) struct MetricsServer {
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    report: ReportSource,
}

impl MetricsServer {
    pub(crate) async fn bind(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        report: ReportSource,
    ) -> Result<MetricsServer, MetricsError> {
        let bind_error = |source| MetricsError::Bind {
            addr: addr.to_string(),
            source,
        };
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(bind_error)?;
        Ok(MetricsServer {
            listener,
            metrics,
            report,
        })
    }

    pub(crate) async fn run(self, shutdown: CancellationToken) -> Result<(), MetricsError> {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                accepted = self.listener.accept() => accepted,
            };
            let Ok((stream, _)) = accepted else {
                // Out of descriptors or the like: scrapes are best effort.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            };
            let metrics = self.metrics.clone();
            let report = self.report.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let metrics = metrics.clone();
                        let report = report.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                respond(&request, &metrics, report).await,
                            )
                        }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(30),
                    hyper::server::conn::http1::Builder::new().serve_connection(io, service),
                )
                .await;
            });
        }
    }
}

async fn respond(
    request: &Request<hyper::body::Incoming>,
    metrics: &Metrics,
    report: ReportSource,
) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, body: String, content_type: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    if request.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "edge-outbox: metrics are at /metrics\n".into(),
            "text/plain; charset=utf-8",
        );
    }
    if let Ok(Some(report)) = tokio::task::spawn_blocking(move || report()).await {
        metrics.observe(&report);
    }
    plain(
        StatusCode::OK,
        metrics.encode(),
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )
}

/// A report source reading `reader` (and the forwarder's state).
pub(crate) fn report_source(reader: Reader, broker: crate::status::BrokerState) -> ReportSource {
    Arc::new(move || StatusReport::collect(&reader, Some(&broker)).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_counters_and_labels() {
        let m = Metrics::new();
        m.submits_accepted.inc();
        m.refused("buffer_full");
        m.confirm_latency.observe(0.02);
        let text = m.encode();
        assert!(
            text.contains("edge_outbox_submits_accepted_total 1"),
            "{text}"
        );
        assert!(
            text.contains("edge_outbox_submits_refused_total{reason=\"buffer_full\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("edge_outbox_confirm_latency_seconds_count 1"),
            "{text}"
        );
    }
}
