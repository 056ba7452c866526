//! Metrics: `/metrics` and `/health` on `metrics.listen`
//! (docs/operations.md, Metrics and Health).
//!
//! Role: own the registry and every metric, and serve both endpoints. Components hold an
//! `Arc<Metrics>` and bump counters as events happen (submits, publishes,
//! confirms, returns, nacks, timeouts, reconnects, deliveries, duplicates,
//! handler failures, confirm latency, time waited for the rate cap); what the database knows (rows by
//! status, delivering, oldest delivering age, database size, free disk) is read
//! at scrape time, so it is never stale.
//!
//! Formats: the Prometheus text format 0.0.4 unless the request's `Accept`
//! header prefers OpenMetrics 1.0.0 (content negotiation, as scrapers do it);
//! the same registry is encoded either way, so every metric has its HELP and
//! TYPE in both. Besides the agent's own `edge_outbox_*` metrics: the build
//! (`edge_outbox_build_info`) and the process (`process_*`, read from
//! `/proc` at scrape time).
//!
//! Invariants: metrics never hold up the work: counters are atomics, and the
//! scrape reads the database through the reader pool, not the writer. A
//! labelled counter has every label value it can take from the start, at 0
//! (a rate needs the zero). A figure that cannot be read is left out of the
//! scrape (or counted as an error), never shown as a made-up 0.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::protocol::ErrorCode;
use crate::service::Health;
use crate::status::StatusReport;
use crate::store::Reader;

/// The two exposition formats a scraper may ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// Prometheus text format 0.0.4 (`text/plain; version=0.0.4`).
    Text,
    /// OpenMetrics text 1.0.0 (`application/openmetrics-text`).
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header prefers: OpenMetrics when it asks for
    /// `application/openmetrics-text` with a quality at least that of any
    /// plain-text range it also names; else (no header included) plain text.
    pub(crate) fn negotiate(accept: Option<&str>) -> Format {
        let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
        for range in accept.unwrap_or_default().split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let quality = parts
                .filter_map(|p| p.strip_prefix("q="))
                .find_map(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(quality),
                "text/plain" | "text/*" | "*/*" => text = text.max(quality),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Format::Text => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PriorityLabel {
    priority: String,
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
    free_disk: MaybeGauge,
    in_flight: Gauge,
    broker_connected: Gauge,
    pub report_errors: Counter,
    pub throttled_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    throttled: Gauge,
    max_rate: Gauge,
    max_bytes_rate: Gauge,
    pub expired: Counter,
    backlog: Family<PriorityLabel, Gauge>,
    expired_rows: Gauge,
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
        let mut registry = Registry::default();
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
            free_disk: MaybeGauge::new(
                "free_disk_bytes",
                "Free space on the database's filesystem",
            ),
            in_flight: Gauge::default(),
            broker_connected: Gauge::default(),
            report_errors: Counter::default(),
            throttled_seconds: Counter::default(),
            throttled: Gauge::default(),
            max_rate: Gauge::default(),
            max_bytes_rate: Gauge::default(),
            expired: Counter::default(),
            backlog: Family::default(),
            expired_rows: Gauge::default(),
            rows_purged_for_room: Counter::default(),
            registry: Registry::default(),
        };
        // Label values at 0 from the start: a refusal reason that has never
        // happened is a 0, not a missing series (docs/operations.md, Metrics).
        for code in ErrorCode::ALL {
            let _ = m.submits_refused.get_or_create(&ReasonLabel {
                reason: code.as_str().to_string(),
            });
        }
        // Process metrics under their conventional, unprefixed names.
        registry.register_collector(Box::new(ProcessCollector));
        let r = registry.sub_registry_with_prefix("edge_outbox");
        r.register(
            "build",
            "The agent's version (always 1)",
            Info::new(vec![(
                "version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            )]),
        );
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
        // Left out of a scrape when the filesystem cannot be read.
        r.register_collector(Box::new(m.free_disk.clone()));
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
            "report_errors",
            "Scrapes whose database figures could not be read (those gauges then hold the last figures read)",
            m.report_errors.clone(),
        );
        r.register(
            "throttled_seconds",
            "Time the forwarder waited for the rate cap (publish.max_rate, publish.max_bytes_rate)",
            m.throttled_seconds.clone(),
        );
        r.register(
            "throttled",
            "1 while the rate cap holds publishing back",
            m.throttled.clone(),
        );
        r.register(
            "publish_max_rate",
            "publish.max_rate in messages per second; 0: no cap",
            m.max_rate.clone(),
        );
        r.register(
            "publish_max_bytes_rate",
            "publish.max_bytes_rate in bytes per second; 0: no cap",
            m.max_bytes_rate.clone(),
        );
        r.register(
            "expired",
            "Messages that expired before they were published (marked failed, \"expired\")",
            m.expired.clone(),
        );
        r.register(
            "backlog",
            "Messages waiting to be forwarded (delivering) by priority",
            m.backlog.clone(),
        );
        r.register(
            "expired_rows",
            "Rows in msg_log that expired before they were published",
            m.expired_rows.clone(),
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
        self.free_disk.set(report.free_disk_bytes);
        for priority in 0..=crate::store::MAX_PRIORITY {
            let n = report
                .delivering_by_priority
                .get(&priority)
                .copied()
                .unwrap_or(0);
            self.backlog
                .get_or_create(&PriorityLabel {
                    priority: priority.to_string(),
                })
                .set(n as i64);
        }
        self.expired_rows.set(report.expired as i64);
        if let Some(b) = &report.broker {
            self.in_flight.set(b.in_flight as i64);
            self.broker_connected.set(i64::from(b.connected));
            self.throttled.set(i64::from(b.throttled));
            self.max_rate.set(i64::from(b.max_rate.unwrap_or(0)));
            self.max_bytes_rate
                .set(i64::try_from(b.max_bytes_rate.unwrap_or(0)).unwrap_or(i64::MAX));
        }
    }

    /// The exposition in `format`.
    pub(crate) fn encode(&self, format: Format) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = match format {
            Format::Text => {
                prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry)
            }
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut text, &self.registry)
            }
        };
        text
    }
}

/// Produces the status report at scrape time (given by the wiring).
pub(crate) type ReportSource = Arc<dyn Fn() -> Option<StatusReport> + Send + Sync>;

/// The `/metrics` and `/health` endpoints.
pub(crate) struct MetricsServer {
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    report: ReportSource,
    health: Option<Arc<Health>>,
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
            health: None,
        })
    }

    /// Serves `/health` from these probes (without it `/health` is a 404).
    pub(crate) fn with_health(self, health: Health) -> MetricsServer {
        MetricsServer {
            health: Some(Arc::new(health)),
            ..self
        }
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
            let health = self.health.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        let metrics = metrics.clone();
                        let report = report.clone();
                        let health = health.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                respond(&request, &metrics, report, health.as_deref()).await,
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

fn plain(status: StatusCode, body: String, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

const TEXT: &str = "text/plain; charset=utf-8";

async fn respond(
    request: &Request<hyper::body::Incoming>,
    metrics: &Metrics,
    report: ReportSource,
    health: Option<&Health>,
) -> Response<Full<Bytes>> {
    match (request.uri().path(), health) {
        ("/metrics", _) => {}
        // docs/operations.md, Health: the watchdog's probes, on demand.
        ("/health", Some(health)) => {
            return match health.check().await {
                Ok(()) => plain(StatusCode::OK, "ok\n".into(), TEXT),
                Err(reason) => plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("unhealthy: {reason}\n"),
                    TEXT,
                ),
            };
        }
        _ => {
            return plain(
                StatusCode::NOT_FOUND,
                "edge-outbox: metrics are at /metrics, health at /health\n".into(),
                TEXT,
            )
        }
    }
    match tokio::task::spawn_blocking(move || report()).await {
        Ok(Some(report)) => metrics.observe(&report),
        _ => {
            metrics.report_errors.inc();
        }
    }
    let accept = request
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let format = Format::negotiate(accept);
    plain(
        StatusCode::OK,
        metrics.encode(format),
        format.content_type(),
    )
}

/// A report source reading `reader` (and the forwarder's state).
pub(crate) fn report_source(reader: Reader, broker: crate::status::BrokerState) -> ReportSource {
    Arc::new(move || StatusReport::collect(&reader, Some(&broker)).ok())
}

/// A gauge that may have no value: then it is left out of the scrape (a
/// figure that cannot be read is not a 0).
#[derive(Clone, Debug)]
struct MaybeGauge {
    name: &'static str,
    help: &'static str,
    value: Arc<std::sync::Mutex<Option<u64>>>,
}

impl MaybeGauge {
    fn new(name: &'static str, help: &'static str) -> MaybeGauge {
        MaybeGauge {
            name,
            help,
            value: Arc::default(),
        }
    }

    fn set(&self, value: Option<u64>) {
        if let Ok(mut v) = self.value.lock() {
            *v = value;
        }
    }
}

impl Collector for MaybeGauge {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let value = self.value.lock().ok().and_then(|v| *v);
        if let Some(value) = value {
            let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            let help = format!("{}.", self.help);
            let metric = encoder.encode_descriptor(self.name, &help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

/// The process metrics every exporter has (`process_*`), read from `/proc`
/// at scrape time; each one that cannot be read is left out.
#[derive(Debug)]
struct ProcessCollector;

/// What `/proc/self/stat` says, in the units of the metrics.
struct ProcStat {
    cpu_seconds: f64,
    start_ticks: u64,
    virtual_bytes: u64,
    resident_bytes: u64,
}

impl ProcStat {
    fn read() -> Option<ProcStat> {
        let text = std::fs::read_to_string("/proc/self/stat").ok()?;
        // The command name (field 2) may hold spaces and parentheses: the
        // fields from 3 on follow the last ')'.
        let fields: Vec<&str> = text
            .get(text.rfind(')')? + 1..)?
            .split_whitespace()
            .collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        Some(ProcStat {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            start_ticks: field(22)?,
            virtual_bytes: field(23)?,
            resident_bytes: field(24)?.saturating_mul(rustix::param::page_size() as u64),
        })
    }
}

/// The boot time, epoch seconds (`btime` in `/proc/stat`; hidden from the
/// agent under the unit's `ProcSubset=pid`).
fn boot_time() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|t| t.trim().parse().ok())
}

fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

fn encode_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: Option<f64>,
) -> Result<(), std::fmt::Error> {
    if let Some(value) = value {
        let gauge = ConstGauge::new(value);
        let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
        gauge.encode(metric)?;
    }
    Ok(())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stat = ProcStat::read();
        if let Some(stat) = &stat {
            let cpu = prometheus_client::metrics::counter::ConstCounter::new(stat.cpu_seconds);
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                cpu.metric_type(),
            )?;
            cpu.encode(metric)?;
        }
        encode_gauge(
            &mut encoder,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            stat.as_ref().map(|s| s.resident_bytes as f64),
        )?;
        encode_gauge(
            &mut encoder,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            stat.as_ref().map(|s| s.virtual_bytes as f64),
        )?;
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        encode_gauge(
            &mut encoder,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            stat.as_ref()
                .zip(boot_time())
                .map(|(s, boot)| boot as f64 + s.start_ticks as f64 / ticks),
        )?;
        encode_gauge(
            &mut encoder,
            "process_open_fds",
            "Number of open file descriptors.",
            open_fds().map(|n| n as f64),
        )?;
        let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        encode_gauge(
            &mut encoder,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            limit.map(|n| n as f64),
        )?;
        Ok(())
    }
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
        for format in [Format::Text, Format::OpenMetrics] {
            let text = m.encode(format);
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

    #[test]
    fn plain_text_unless_openmetrics_is_preferred() {
        use Format::*;
        for (accept, want) in [
            (None, Text),
            (Some(""), Text),
            (Some("*/*"), Text),
            (Some("text/plain; version=0.0.4"), Text),
            (Some("application/openmetrics-text"), OpenMetrics),
            // Prometheus 2.x's scrape header.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                     version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                OpenMetrics,
            ),
            (
                Some("text/plain;q=0.9, application/openmetrics-text;q=0.5"),
                Text,
            ),
            (Some("application/openmetrics-text;q=0"), Text),
            (Some("Application/OpenMetrics-Text; q=bad"), OpenMetrics),
        ] {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
        assert!(Text.content_type().starts_with("text/plain; version=0.0.4"));
        assert!(OpenMetrics
            .content_type()
            .starts_with("application/openmetrics-text; version=1.0.0"));
    }

    /// Every sample belongs to a family announced by HELP and TYPE, in
    /// both formats (what `promtool check metrics` insists on).
    #[test]
    fn every_sample_has_help_and_type_in_both_formats() {
        let m = Metrics::new();
        for format in [Format::Text, Format::OpenMetrics] {
            let text = m.encode(format);
            let (mut help, mut kind) = (Vec::new(), Vec::new());
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("# HELP ") {
                    help.push(rest.split(' ').next().unwrap().to_string());
                } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                    kind.push(rest.split(' ').next().unwrap().to_string());
                } else if !line.starts_with('#') {
                    let name = line.split(['{', ' ']).next().unwrap();
                    let family = help
                        .iter()
                        .filter(|h| name.starts_with(h.as_str()))
                        .max_by_key(|h| h.len());
                    assert!(family.is_some(), "{format:?}: no HELP for {line}\n{text}");
                    assert!(
                        kind.contains(family.unwrap()),
                        "{format:?}: no TYPE for {line}"
                    );
                    if format == Format::Text {
                        let base = family.unwrap();
                        assert!(
                            ["", "_bucket", "_sum", "_count"]
                                .iter()
                                .any(|suffix| name == format!("{base}{suffix}")),
                            "text format: {name} is not its family {base}"
                        );
                    }
                }
            }
            assert_eq!(
                text.trim_end().ends_with("# EOF"),
                format == Format::OpenMetrics,
                "{format:?}"
            );
        }
    }

    #[test]
    fn refusal_reasons_build_and_process_are_there_from_the_start() {
        let text = Metrics::new().encode(Format::Text);
        for code in ErrorCode::ALL {
            let line = format!(
                "edge_outbox_submits_refused_total{{reason=\"{}\"}} 0",
                code.as_str()
            );
            assert!(text.contains(&line), "{line}\n{text}");
        }
        let build = format!(
            "edge_outbox_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{text}");
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_max_fds ",
        ] {
            let value: f64 = text
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in\n{text}"))
                .parse()
                .unwrap();
            assert!(value >= 0.0, "{name}{value}");
        }
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter"),
            "{text}"
        );
    }

    #[test]
    fn free_disk_is_left_out_when_it_cannot_be_read() {
        let m = Metrics::new();
        assert!(!m
            .encode(Format::Text)
            .contains("edge_outbox_free_disk_bytes"));
        m.free_disk.set(Some(42));
        for format in [Format::Text, Format::OpenMetrics] {
            let text = m.encode(format);
            assert!(text.contains("edge_outbox_free_disk_bytes 42\n"), "{text}");
            assert!(
                text.contains("# TYPE edge_outbox_free_disk_bytes gauge"),
                "{text}"
            );
        }
        m.free_disk.set(None);
        assert!(!m
            .encode(Format::Text)
            .contains("edge_outbox_free_disk_bytes"));
    }
}
