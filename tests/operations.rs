//! Running as a service (docs/operations.md): signals and graceful shutdown
//! (of submits, of forwarding under load, of a running consumer handler),
//! systemd notifications and the watchdog, metrics, logs, TLS to the broker,
//! and the purge (docs/purge.md).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edge_outbox_testkit::amqp;
use edge_outbox_testkit::broker;
use edge_outbox_testkit::cli::run_bin;
use edge_outbox_testkit::consumer::{
    self, lines, sh_path, wait_consuming, wait_queue_settled, Reaper,
};
use edge_outbox_testkit::db::get_status;
use edge_outbox_testkit::journal::JournalEntry;
use edge_outbox_testkit::metrics::{self, free_port, sample, scrape};
use edge_outbox_testkit::prefill::{prefill_database, PrefillRow};
use edge_outbox_testkit::tls::{make_certificates, TlsListener};
use edge_outbox_testkit::{
    ok_id, refused, rt, wait_until, Agent, Cleanup, FaultProxy, JournalSocket, Mode, NotifySocket,
    Status,
};
use serde_json::{json, Value};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

const DEADLINE: Duration = Duration::from_secs(120);

// --------------------------------------------------- signals and shutdown

/// SIGTERM: a connection with nothing in flight is told `shutting_down`
/// at once and closed; what it sends then is not stored.
#[test]
fn shutting_down_is_answered_after_sigterm_then_the_agent_exits_0() {
    let mut agent = Agent::start(BIN);
    let mut c = agent.client();
    ok_id(&c.submit("ex", "rk", json!("before")));
    agent.terminate();
    let message = refused(&c.answer(), "shutting_down");
    assert!(message.contains("shutting down"), "{message}");
    // The agent may have closed the connection already: a failed write is
    // the same answer.
    let _ = c.send_raw(
        b"{\"exchange\":\"ex\",\"routing_key\":\"rk\",\"payload\":\"too late\",\"id\":\"late\"}\n",
    );
    assert_eq!(
        c.expect_closed(Duration::from_secs(10)),
        Vec::<Value>::new()
    );
    let status = agent.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(!agent.socket.exists(), "the socket file was left behind");
    assert_eq!(agent.rows(), 1);
    assert_eq!(agent.status_of("late"), None);
}

#[test]
fn sigint_stops_the_agent_like_sigterm() {
    let mut agent = Agent::start(BIN);
    ok_id(&agent.client().submit("ex", "rk", json!(1)));
    agent.signal("INT");
    let status = agent.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(!agent.socket.exists(), "the socket file was left behind");
    assert_eq!(agent.rows(), 1);
}

/// An agent consuming `queue` whose exec handler never finishes: each
/// handler run records its pid in `pids` (killed by the reaper on drop) and
/// touches `started`.
struct HungHandler {
    agent: Agent,
    started: PathBuf,
    pids: PathBuf,
    /// Held (not read) until the test ends, after the agent: a test takes
    /// `agent` and the paths out and leaves these in place.
    _reaper: Reaper,
    _work: tempfile::TempDir,
}

impl HungHandler {
    /// Starts the agent and waits until it consumes `queue`.
    fn start(url: &str, queue: &str) -> HungHandler {
        let work = tempfile::tempdir().expect("tempdir");
        let (started, pids) = (work.path().join("started"), work.path().join("pids"));
        let reaper = Reaper(pids.clone());
        let script = format!(
            "echo $$ >> {}; touch {}; exec sleep 600",
            sh_path(&pids),
            sh_path(&started)
        );
        let agent = Agent::builder(BIN)
            .consuming(url, queue)
            .exec_handler(&script)
            .set_str("consumer", "handler_timeout", "10m")
            .start();
        wait_consuming(&agent, queue);
        HungHandler {
            agent,
            started,
            pids,
            _reaper: reaper,
            _work: work,
        }
    }
}

/// A second signal ends the agent at once, even while the drain waits for
/// a consumer handler that will not finish.
#[test]
fn a_second_signal_exits_at_once() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("second-signal"));
    let hung = HungHandler::start(&url, &queue);
    let (mut agent, started) = (hung.agent, hung.started);
    ok_id(&agent.client().submit("ex", "rk", json!(1)));
    rt.block_on(amqp::publish_with_id(&url, "", &queue, b"", Some("hang")));
    wait_until("the handler to start", consumer::DEADLINE, || {
        started.exists()
    });
    agent.terminate();
    let socket = agent.socket.clone();
    wait_until("the socket file to go", Duration::from_secs(10), || {
        !socket.exists()
    });
    assert!(agent.is_running(), "the agent stopped draining early");
    let signalled = Instant::now();
    agent.terminate();
    let status = agent.wait_exit(Duration::from_secs(5));
    assert!(
        signalled.elapsed() < Duration::from_secs(3),
        "took {:?} after the second signal",
        signalled.elapsed()
    );
    assert_eq!(status.code(), Some(1), "{status}");
    assert_eq!(agent.rows(), 1);
}

#[test]
fn sighup_is_ignored_and_the_agent_keeps_serving() {
    let mut agent = Agent::start(BIN);
    agent.signal("HUP");
    wait_until("the SIGHUP logged", DEADLINE, || {
        agent.log_text().contains("SIGHUP")
    });
    assert!(agent.is_running());
    ok_id(&agent.client().submit("", "k", json!("still here")));
    agent.terminate();
    assert_eq!(agent.wait_exit(DEADLINE).code(), Some(0));
}

/// SIGTERM in the middle of a pipelined burst: what was read before is
/// answered (and stored when ok), what comes after is `shutting_down`,
/// nothing acknowledged is lost, and the agent exits 0.
#[test]
fn sigterm_during_a_pipelined_burst_answers_in_order_and_loses_nothing() {
    const N: usize = 20_000;
    let mut agent = Agent::start(BIN);
    let mut c = agent.client();
    let mut writer = c.writer();
    let sender = std::thread::spawn(move || {
        let mut out = std::io::BufWriter::new(&mut writer);
        for i in 0..N {
            let line = json!({"exchange": "ex", "routing_key": "rk", "id": format!("t-{i}"), "payload": i});
            if writeln!(out, "{line}").is_err() {
                return;
            }
        }
        let _ = out.flush();
    });
    let mut ok = Vec::new();
    let mut late = 0;
    let mut i = 0;
    while let Some(answer) = c.read_answer() {
        if answer["ok"] == json!(true) {
            assert_eq!(late, 0, "ok after shutting_down: {answer}");
            assert_eq!(ok_id(&answer), format!("t-{i}"));
            ok.push(format!("t-{i}"));
        } else {
            refused(&answer, "shutting_down");
            late += 1;
        }
        i += 1;
        if i == 1_000 {
            agent.terminate();
        }
    }
    let _ = sender.join();
    let status = agent.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(ok.len() >= 1_000, "{} ok", ok.len());
    assert!(i <= N);
    eprintln!(
        "{} ok, {late} shutting_down, {} unanswered",
        ok.len(),
        N - i
    );
    agent.assert_all_stored(&ok);
    assert_eq!(
        agent.rows(),
        ok.len() as i64,
        "refused requests were stored"
    );
}

#[test]
fn sigterm_during_a_stream_loses_nothing_acknowledged() {
    let rt = rt();
    let url = broker::default_url();
    let exchange = amqp::unique("term-ex");
    let queue = amqp::unique("term-q");
    rt.block_on(amqp::declare_exchange_with_queue(
        &url, &exchange, &queue, "k",
    ));
    let mut agent = Agent::builder(BIN).forwarding_to(&url).start();
    let mut acked = Vec::new();
    std::thread::scope(|s| {
        let writer_agent = &agent;
        let submitter = s.spawn(|| {
            let mut client = writer_agent.client();
            let mut writer = client.writer();
            let lines: Vec<String> = (0..10_000)
                .map(|i| {
                    json!({"exchange": exchange, "routing_key": "k", "id": format!("t-{i}"),
                           "payload": {"n": i}})
                    .to_string()
                })
                .collect();
            let sender = std::thread::spawn(move || {
                use std::io::Write;
                for line in lines {
                    if writer.write_all(format!("{line}\n").as_bytes()).is_err() {
                        break;
                    }
                }
            });
            let mut ok = Vec::new();
            while let Some(answer) = client.read_answer() {
                if answer["ok"] == Value::Bool(true) {
                    ok.push(answer["id"].as_str().unwrap_or_default().to_string());
                }
            }
            let _ = sender.join();
            ok
        });
        wait_until("some forwarded", DEADLINE, || {
            writer_agent.count_status(Status::Delivered) > 500
        });
        Command::new("kill")
            .args(["-TERM", &writer_agent.pid().to_string()])
            .status()
            .expect("kill");
        acked = submitter.join().expect("submitter");
    });
    let status = agent.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    assert!(!acked.is_empty());
    // Every acknowledged message is confirmed or still waiting, never lost.
    let db = agent.db();
    for id in &acked {
        let status = db
            .query_row("SELECT status FROM msg_log WHERE id = ?1", [id], |r| {
                get_status(r, 0)
            })
            .unwrap_or_else(|e| panic!("acknowledged {id} is missing: {e}"));
        assert!(
            status == Status::Delivering || status == Status::Delivered,
            "{id} has status {status:?}"
        );
    }
    drop(db);
    agent.restart();
    wait_until("everything delivered after restart", DEADLINE, || {
        agent.count_status(Status::Delivering) == 0
    });
    let received: std::collections::HashSet<String> = rt
        .block_on(amqp::received(&url, &queue))
        .into_iter()
        .map(|m| m.message_id)
        .collect();
    for id in &acked {
        assert!(received.contains(id), "{id} never reached the queue");
    }
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

/// SIGTERM while a handler runs: the agent lets it finish (within the drain
/// bound), commits, acks, and exits 0.
#[test]
fn sigterm_lets_a_running_handler_finish_and_ack() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("con-term"));
    let work = tempfile::tempdir().expect("tempdir");
    let (started, runs) = (work.path().join("started"), work.path().join("runs"));
    let script = format!(
        "touch {}; sleep 2; echo done >> {}",
        sh_path(&started),
        sh_path(&runs)
    );
    let mut agent = Agent::builder(BIN)
        .consuming(&url, &queue)
        .exec_handler(&script)
        .start();
    wait_consuming(&agent, &queue);
    let id = amqp::unique("term");
    rt.block_on(amqp::publish_with_id(&url, "", &queue, b"", Some(&id)));
    wait_until("the handler to start", consumer::DEADLINE, || {
        started.exists()
    });
    agent.terminate();
    let exit = agent.wait_exit(Duration::from_secs(30));
    assert!(exit.success(), "exit status {exit}");
    assert_eq!(agent.status_of(&id), Some(Status::Consumed));
    assert_eq!(lines(&runs), ["done"]);
    wait_queue_settled(&queue);
}

/// SIGTERM while a handler runs past the drain bound: the agent stops the
/// handler, exits 0 without recording anything, and the delivery is back in
/// the queue.
#[test]
fn sigterm_with_a_handler_past_the_drain_bound_gives_the_delivery_back() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique("con-term-long"));
    let hung = HungHandler::start(&url, &queue);
    let (mut agent, started, pids) = (hung.agent, hung.started, hung.pids);
    let id = amqp::unique("term-long");
    rt.block_on(amqp::publish_with_id(&url, "", &queue, b"", Some(&id)));
    wait_until("the handler to start", consumer::DEADLINE, || {
        started.exists()
    });
    let t = Instant::now();
    agent.terminate();
    let exit = agent.wait_exit(Duration::from_secs(60));
    assert!(exit.success(), "exit status {exit}");
    eprintln!("shutdown with a hanging handler took {:?}", t.elapsed());
    assert_eq!(agent.status_of(&id), None, "nothing recorded");
    wait_until("the delivery back in the queue", consumer::DEADLINE, || {
        broker::queue_counts(&queue) == Some((1, 0))
    });
    let pid = lines(&pids);
    let proc_dir = PathBuf::from(format!("/proc/{}", pid[0].trim()));
    wait_until("the handler process to be gone", consumer::DEADLINE, || {
        !proc_dir.exists()
    });
}

// ---------------------------------------------------------------- systemd

/// Needs the writer wedge, which only a `test-hooks` build has.
#[cfg(feature = "test-hooks")]
#[test]
fn ready_and_watchdog_arrive_and_stop_when_the_writer_is_wedged() {
    let notify = NotifySocket::new();
    let started = Instant::now();
    let mut agent = Agent::builder(BIN)
        .env("NOTIFY_SOCKET", notify.path.to_str().unwrap_or_default())
        .env("WATCHDOG_USEC", "1000000")
        .env("EDGE_OUTBOX_WEDGE_FOR_TESTS", "3")
        .start();
    let got = notify.collect(Duration::from_millis(2500).saturating_sub(started.elapsed()));
    assert!(got.iter().any(|(_, m)| m.contains("READY=1")), "{got:?}");
    let pings = got.iter().filter(|(_, m)| m.contains("WATCHDOG=1")).count();
    assert!(
        pings >= 3,
        "pings every half interval while healthy: {got:?}"
    );
    // Past the wedge time, the next group the writer takes wedges it.
    let _ = notify.collect(Duration::from_millis(3200).saturating_sub(started.elapsed()));
    let mut client = agent.client();
    client.send(&json!({"exchange": "", "routing_key": "k", "payload": 1}));
    // Let any ping already under way land, then expect silence.
    let _ = notify.collect(Duration::from_millis(1000));
    let later = notify.collect(Duration::from_millis(2500));
    assert!(
        !later.iter().any(|(_, m)| m.contains("WATCHDOG=1")),
        "no pings once the writer is wedged: {later:?}"
    );
    agent.kill9();
}

#[test]
fn stopping_is_announced_on_sigterm() {
    let notify = NotifySocket::new();
    let mut agent = Agent::builder(BIN)
        .env("NOTIFY_SOCKET", notify.path.to_str().unwrap_or_default())
        .start();
    let got = notify.collect(Duration::from_millis(300));
    assert!(got.iter().any(|(_, m)| m.contains("READY=1")), "{got:?}");
    agent.terminate();
    let mut stopping = false;
    let start = Instant::now();
    while !stopping && start.elapsed() < DEADLINE {
        stopping = notify
            .collect(Duration::from_millis(200))
            .iter()
            .any(|(_, m)| m.contains("STOPPING=1"));
    }
    assert!(stopping);
    assert_eq!(agent.wait_exit(DEADLINE).code(), Some(0));
}

// ------------------------------------------------------- metrics and logs

#[test]
fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let rt = rt();
    let url = broker::default_url();
    let exchange = amqp::unique("metrics-ex");
    let queue = amqp::unique("metrics-q");
    rt.block_on(amqp::declare_exchange_with_queue(
        &url, &exchange, &queue, "k",
    ));
    let port = free_port();
    let agent = Agent::builder(BIN)
        .forwarding_to(&url)
        .set_str("metrics", "listen", format!("127.0.0.1:{port}"))
        .start();
    let before = scrape(port);
    assert!(
        !before.contains("# EOF"),
        "plain Prometheus text unless OpenMetrics is asked for"
    );
    assert_eq!(sample(&before, "edge_outbox_submits_accepted_total"), 0.0);
    // Every refusal reason is there before the first refusal.
    assert_eq!(
        sample(
            &before,
            "edge_outbox_submits_refused_total{reason=\"buffer_full\"}"
        ),
        0.0
    );
    let mut client = agent.client();
    for i in 0..25 {
        ok_id(&client.submit(&exchange, "k", json!(i)));
    }
    let bad = client.request(&json!({"exchange": 1}));
    assert_eq!(bad["ok"], Value::Bool(false));
    wait_until("delivered", DEADLINE, || {
        agent.count_status(Status::Delivered) == 25
    });
    let after = scrape(port);
    assert_eq!(sample(&after, "edge_outbox_submits_accepted_total"), 25.0);
    assert_eq!(
        sample(
            &after,
            "edge_outbox_submits_refused_total{reason=\"bad_request\"}"
        ),
        1.0
    );
    assert!(sample(&after, "edge_outbox_publishes_total") >= 25.0);
    assert_eq!(sample(&after, "edge_outbox_confirms_total"), 25.0);
    assert_eq!(
        sample(&after, "edge_outbox_confirm_latency_seconds_count"),
        25.0
    );
    assert_eq!(
        sample(&after, "edge_outbox_rows{status=\"delivered\"}"),
        25.0
    );
    assert_eq!(sample(&after, "edge_outbox_delivering"), 0.0);
    assert_eq!(sample(&after, "edge_outbox_broker_connected"), 1.0);
    assert!(sample(&after, "edge_outbox_database_size_bytes") > 0.0);
    assert!(sample(&after, "edge_outbox_free_disk_bytes") > 0.0);
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

/// Content negotiation, the build and process metrics, as a scraper sees
/// them (docs/operations.md, Metrics).
#[test]
fn metrics_are_plain_text_unless_openmetrics_is_asked_for() {
    let port = free_port();
    let agent = Agent::builder(BIN)
        .set_str("metrics", "listen", format!("127.0.0.1:{port}"))
        .start();
    let plain = metrics::get(port, "/metrics", None);
    assert_eq!(plain.status, 200);
    assert_eq!(
        plain.content_type,
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert!(!plain.body.contains("# EOF"), "{}", plain.body);
    assert!(
        plain
            .body
            .contains("# HELP edge_outbox_submits_accepted_total "),
        "counters have their help under the sample's name: {}",
        plain.body
    );
    let open = metrics::get(
        port,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    );
    assert_eq!(open.status, 200);
    assert!(
        open.content_type
            .starts_with("application/openmetrics-text; version=1.0.0"),
        "{open:?}"
    );
    assert!(open.body.trim_end().ends_with("# EOF"), "{}", open.body);
    for body in [&plain.body, &open.body] {
        let build = format!(
            "edge_outbox_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(sample(body, &build), 1.0);
        assert!(sample(body, "process_resident_memory_bytes") > 1e6);
        assert!(sample(body, "process_cpu_seconds_total") >= 0.0);
        let fds = sample(body, "process_open_fds");
        assert!(fds > 3.0 && fds < sample(body, "process_max_fds"), "{fds}");
    }
    drop(agent);
}

/// `/health`: 200 while the watchdog's probes are answered, 503 with the
/// reason once the store writer is wedged (docs/operations.md, Health).
/// Needs the writer wedge, which only a `test-hooks` build has.
#[cfg(feature = "test-hooks")]
#[test]
fn health_answers_200_and_503_once_the_writer_is_wedged() {
    let port = free_port();
    let started = Instant::now();
    let mut agent = Agent::builder(BIN)
        .set_str("metrics", "listen", format!("127.0.0.1:{port}"))
        .env("EDGE_OUTBOX_WEDGE_FOR_TESTS", "5")
        .start();
    let healthy = metrics::get(port, "/health", None);
    // Taken before the wedge time, or this run says nothing about health.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the agent took {:?} to start and answer",
        started.elapsed()
    );
    assert_eq!(
        (healthy.status, healthy.body.as_str()),
        (200, "ok\n"),
        "{healthy:?}"
    );
    wait_until("the wedge time", DEADLINE, || {
        started.elapsed() > Duration::from_millis(5200)
    });
    // The next group the writer takes wedges it.
    agent
        .client()
        .send(&json!({"exchange": "", "routing_key": "k", "payload": 1}));
    let mut sick = metrics::get(port, "/health", None);
    let until = Instant::now() + DEADLINE;
    while sick.status == 200 && Instant::now() < until {
        sick = metrics::get(port, "/health", None);
    }
    assert_eq!(sick.status, 503, "{sick:?}");
    assert!(
        sick.body
            .starts_with("unhealthy: the store writer did not commit a probe"),
        "{sick:?}"
    );
    let other = metrics::get(port, "/nothing", None);
    assert_eq!(other.status, 404, "{other:?}");
    agent.kill9();
}

#[test]
fn json_logs_are_one_object_per_line() {
    let mut agent = Agent::builder(BIN).set_str("log", "format", "json").start();
    let mut client = agent.client();
    ok_id(&client.submit("", "k", json!("x")));
    agent.terminate();
    assert_eq!(agent.wait_exit(DEADLINE).code(), Some(0));
    let log = agent.log_text();
    let mut lines = 0;
    // The harness marks starts in the same file; everything else is the agent's.
    for line in log
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("----- harness"))
    {
        let event: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(event.get("level").is_some(), "{line}");
        lines += 1;
    }
    assert!(lines >= 2, "{log}");
    assert!(log.contains("\"message\":\"edge-outbox ready\""), "{log}");
}

/// The agent's log says what it is doing (and has no password in it).
#[test]
fn the_log_names_the_socket_and_database() {
    let mut agent = Agent::start(BIN);
    agent.terminate();
    assert!(agent.wait_exit(Duration::from_secs(30)).success());
    let log = agent.log_text();
    assert!(log.contains("ready"), "{log}");
    assert!(log.contains(&agent.socket.display().to_string()), "{log}");
    assert!(!log.contains("guest:guest"), "{log}");
}

/// Under journald (stderr is the stream `JOURNAL_STREAM` names) the agent
/// speaks journald's native protocol: a warning is priority 4, an info line
/// 5, and the event's fields are journal fields. Without a reachable
/// journal it says so once and logs to stderr.
#[test]
fn under_journald_entries_carry_their_priority_and_fields() {
    let mut journal = JournalSocket::bind();
    let mut agent = Agent::builder(BIN).prepare();
    let stream = agent.log_stream();
    agent.set_env("JOURNAL_STREAM", &stream);
    agent.restart();
    let socket = agent.socket.display().to_string();
    let is_ready = |e: &JournalEntry| e.get("MESSAGE").as_deref() == Some("edge-outbox ready");
    let is_unreachable =
        |e: &JournalEntry| e.get("MESSAGE").as_deref() == Some("cannot connect to the broker");
    let entries = journal.collect_until("the ready line and a broker warning", DEADLINE, |es| {
        es.iter().any(is_ready) && es.iter().any(is_unreachable)
    });
    let ready = entries.iter().find(|e| is_ready(e)).expect("ready");
    assert_eq!(ready.get("PRIORITY").as_deref(), Some("5"), "{ready:?}");
    assert_eq!(ready.get("EO_SOCKET"), Some(socket.clone()), "{ready:?}");
    assert_eq!(
        ready.get("SYSLOG_IDENTIFIER").as_deref(),
        Some("edge-outbox"),
        "{ready:?}"
    );
    let warning = entries.iter().find(|e| is_unreachable(e)).expect("warning");
    assert_eq!(warning.get("PRIORITY").as_deref(), Some("4"), "{warning:?}");
    assert_eq!(
        warning.get("EO_ROLE").as_deref(),
        Some("publisher"),
        "{warning:?}"
    );
    let broker = warning.get("EO_BROKER").unwrap_or_default();
    assert!(broker.contains("127.0.0.1:1"), "{warning:?}");
    assert!(!broker.contains("guest:guest"), "{warning:?}");
    // Nothing went to stderr: the journal has it all.
    agent.terminate();
    assert!(agent.wait_exit(DEADLINE).success());
    let log = agent.log_text();
    assert!(!log.contains("ready"), "{log}");

    // stderr redirected elsewhere (the variable names another stream):
    // plain lines on stderr, with timestamps.
    agent.set_env("JOURNAL_STREAM", "0:0");
    agent.restart();
    wait_until("the ready line on stderr", DEADLINE, || {
        agent.log_text().contains("edge-outbox ready")
    });
    agent.terminate();
    assert!(agent.wait_exit(DEADLINE).success());

    // The journal unreachable: said once on stderr, then the log goes there.
    journal.remove();
    agent.set_env("JOURNAL_STREAM", &stream);
    agent.restart();
    wait_until(
        "the ready line on stderr after the fallback",
        DEADLINE,
        || agent.log_text().matches("edge-outbox ready").count() == 2,
    );
    let log = agent.log_text();
    assert_eq!(log.matches("cannot reach journald").count(), 1, "{log}");
}

// -------------------------------------------------------------------- TLS

#[test]
fn a_tls_connection_delivers_and_a_wrong_ca_fails_fast() {
    let rt = rt();
    let url = broker::default_url();
    let exchange = amqp::unique("tls-ex");
    let queue = amqp::unique("tls-q");
    rt.block_on(amqp::declare_exchange_with_queue(
        &url, &exchange, &queue, "k",
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = make_certificates(dir.path(), "right");
    let (wrong_ca, _, _) = make_certificates(dir.path(), "wrong");
    let listener = TlsListener::start(&cert, &key);
    let tls_url = format!("amqps://guest:guest@localhost:{}/%2f", listener.port);

    let agent = Agent::builder(BIN)
        .forwarding_to(&tls_url)
        .set_str("broker", "tls_ca_file", &ca)
        .start();
    let id = ok_id(&agent.client().submit(&exchange, "k", json!("over TLS")));
    wait_until("delivered over TLS", DEADLINE, || {
        agent.count_status(Status::Delivered) == 1
    });
    let received = rt.block_on(amqp::received(&url, &queue));
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].message_id, id);

    let refused = Agent::builder(BIN)
        .forwarding_to(&tls_url)
        .set_str("broker", "tls_ca_file", &wrong_ca)
        .start();
    let id = ok_id(
        &refused
            .client()
            .submit(&exchange, "k", json!("not trusted")),
    );
    let started = Instant::now();
    let mut error = String::new();
    wait_until("a clear TLS error", Duration::from_secs(15), || {
        let status = refused.cli(&["status", "--json"]).json();
        error = status["broker"]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        !error.is_empty()
    });
    eprintln!("wrong CA noticed after {:?}: {error}", started.elapsed());
    let lowered = error.to_lowercase();
    assert!(
        lowered.contains("certificate")
            || lowered.contains("tls")
            || lowered.contains("unknownissuer"),
        "{error}"
    );
    // Retried like any unreachable broker: nothing attempted, nothing counted.
    let row = refused
        .db()
        .query_row(
            "SELECT status, try_count FROM msg_log WHERE id = ?1",
            [&id],
            |r| Ok((get_status(r, 0)?, r.get::<_, i64>(1)?)),
        )
        .expect("row");
    assert_eq!(row, (Status::Delivering, 0));
    rt.block_on(amqp::delete(&url, &exchange, &queue));
}

// ------------------------------------------------------------------ purge

#[test]
fn purge_deletes_old_settled_rows_never_pending_and_dry_run_deletes_nothing() {
    let mut agent = Agent::builder(BIN).set("purge", "batch_size", "7").start();
    let mut client = agent.client();
    let ids: Vec<String> = (0..60)
        .map(|i| ok_id(&client.submit("", "k", json!(i))))
        .collect();
    agent.terminate();
    agent.wait_exit(DEADLINE);
    // Age the rows by hand: 10 of each (status, age in days).
    let now = edge_outbox::store::now_ms();
    let plan = [
        (Status::Delivering, 400),
        (Status::Delivered, 40),
        (Status::Consumed, 40),
        (Status::Delivered, 1),
        (Status::Failed, 40),
        (Status::Failed, 100),
    ];
    let db = agent.db();
    for (i, id) in ids.iter().enumerate() {
        let (status, days) = plan[i / 10];
        db.execute(
            "UPDATE msg_log SET status = ?2, create_time = ?3 WHERE id = ?1",
            rusqlite::params![id, status, now - days * 86_400_000],
        )
        .expect("age a row");
    }
    drop(db);
    let dry = agent.cli(&["purge", "--dry-run"]);
    assert_eq!(dry.code, 0, "{dry:?}");
    assert!(
        dry.stdout
            .contains("would delete 30 row(s): 10 delivered, 10 consumed"),
        "{}",
        dry.stdout
    );
    assert!(dry.stdout.contains("10 failed"), "{}", dry.stdout);
    assert_eq!(agent.rows(), 60, "a dry run deletes nothing");

    let real = agent.cli(&["purge"]);
    assert_eq!(real.code, 0, "{real:?}");
    assert!(real.stdout.contains("deleted 30 row(s)"), "{}", real.stdout);
    let counts = agent.status_counts();
    let count = |status| counts.iter().find(|(s, _)| *s == status).map(|(_, n)| *n);
    assert_eq!(
        count(Status::Delivering),
        Some(10),
        "status 0 is never purged"
    );
    assert_eq!(
        count(Status::Delivered),
        Some(10),
        "recent delivered rows stay"
    );
    assert_eq!(
        count(Status::Failed),
        Some(10),
        "failed rows younger than 90d stay"
    );
    assert_eq!(count(Status::Consumed), None);
}

/// Purging a million old rows while the agent takes submits: no submit
/// waits more than a few tens of milliseconds. Slow (a minute or two):
/// `cargo nextest run --release --test operations --run-ignored only`.
#[test]
#[ignore]
fn purging_a_million_rows_stalls_submits_only_briefly() {
    const ROWS: i64 = 1_000_000;
    let mut agent = Agent::builder(BIN).prepare();
    let old = edge_outbox::store::now_ms() - 40 * 86_400_000;
    prefill_database(&agent.db, ROWS, 512, |i| PrefillRow {
        id: format!("old-{i}"),
        status: Status::Delivered,
        routing_key: String::new(),
        create_time: old,
        next_try_time: None,
    });
    agent.restart();
    let mut purge = Command::new(BIN)
        .args(["purge", "-c"])
        .arg(&agent.config)
        .stdout(Stdio::piped())
        .spawn()
        .expect("purge");
    let mut client = agent.client();
    let mut waits = Vec::new();
    while purge.try_wait().expect("purge status").is_none() {
        let started = Instant::now();
        ok_id(&client.submit("", "k", json!(waits.len())));
        waits.push(started.elapsed());
    }
    let submits = waits.len();
    waits.sort();
    let worst = waits.last().copied().unwrap_or_default();
    eprintln!(
        "submit waits: median {:?}, p99 {:?}, p99.9 {:?}, over 50ms: {}",
        waits[submits / 2],
        waits[submits * 99 / 100],
        waits[submits * 999 / 1000],
        waits
            .iter()
            .filter(|w| **w > Duration::from_millis(50))
            .count()
    );
    let output = purge.wait_with_output().expect("purge output");
    assert!(output.status.success());
    eprintln!(
        "{}; {submits} submits meanwhile, the slowest took {worst:?}",
        String::from_utf8_lossy(&output.stdout).trim()
    );
    assert_eq!(agent.count_status(Status::Delivered), 0);
    // Judged on the 99.9th percentile: on a shared 2-core machine a few
    // waits are the scheduler's, whatever the agent does.
    assert!(
        waits[submits * 999 / 1000] < Duration::from_millis(50),
        "submits waited too long during the purge"
    );
    assert!(
        worst < Duration::from_millis(500),
        "a submit waited {worst:?}"
    );
}

// --------------------------------------------------- configuration and CLI

/// A confirm timeout within two heartbeats (or no heartbeat) is allowed,
/// with a warning: `check-config` prints it and exits 0, `run` logs it.
#[test]
fn a_confirm_timeout_within_two_heartbeats_is_warned_of_not_refused() {
    let mut agent = Agent::builder(BIN)
        .set_str("publish", "confirm_timeout", "10s")
        .prepare();
    let out = agent.cli(&["check-config"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("configuration OK"), "{out:?}");
    assert!(
        out.stderr.contains(
            "warning: publish.confirm_timeout (10s) is not more than twice broker.heartbeat (10s)"
        ),
        "{out:?}"
    );
    assert!(out.stderr.contains("liveness probe"), "{out:?}");
    agent.restart();
    let log = agent.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("publish.confirm_timeout (10s)")),
        "{log}"
    );
    // No heartbeat at all.
    let agent = Agent::builder(BIN)
        .set_str("broker", "heartbeat", "0s")
        .prepare();
    let out = agent.cli(&["check-config"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("broker.heartbeat is 0"), "{out:?}");
    // The defaults warn of nothing.
    let out = Agent::builder(BIN).prepare().cli(&["check-config"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(!out.stderr.contains("warning"), "{out:?}");
}

/// `list`, `show` and `status` (no agent) on a database they cannot open
/// fail within 2 s, exit 1, with the real cause; `run` reports a corrupt
/// file as before and leaves it untouched.
#[test]
fn the_cli_fails_at_once_with_the_cause_on_a_database_it_cannot_open() {
    let agent = Agent::builder(BIN).prepare();
    let garbage = vec![0x42u8; 8192];
    std::fs::write(&agent.db, &garbage).expect("writing garbage");
    for args in [
        &["list"][..],
        &["show", "some-id"],
        &["status"],
        &["purge", "--dry-run"],
    ] {
        let start = Instant::now();
        let out = agent.cli(args);
        let took = start.elapsed();
        assert_eq!(out.code, 1, "{args:?}: {out:?}");
        assert!(
            took < Duration::from_secs(2),
            "{args:?} took {took:?}: {out:?}"
        );
        assert!(out.stderr.contains("is corrupt"), "{args:?}: {out:?}");
        assert!(out.stderr.contains("not a database"), "{args:?}: {out:?}");
    }
    let out = agent.cli(&["run"]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("is corrupt"), "{out:?}");
    assert!(out.stderr.contains("left untouched"), "{out:?}");
    assert_eq!(std::fs::read(&agent.db).expect("the file"), garbage);

    // A database this user may not read: as root, the CLI runs as nobody.
    let dir = tempfile::tempdir().expect("tempdir");
    let mode = |path: &std::path::Path, bits: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(bits)).expect("chmod");
    };
    mode(dir.path(), 0o755);
    let db = dir.path().join("private.db");
    let conn = rusqlite::Connection::open(&db).expect("a database");
    edge_outbox::store::apply_schema(&conn).expect("schema");
    drop(conn);
    mode(&db, 0o000);
    let config = dir.path().join("cli.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\npath = {}\n[submit]\nsocket = {}\n",
            edge_outbox_testkit::toml_str(db.to_string_lossy()),
            edge_outbox_testkit::toml_str(dir.path().join("none.sock").to_string_lossy())
        ),
    )
    .expect("config");
    mode(&config, 0o644);
    let config = config.to_string_lossy().into_owned();
    for command in ["list", "status"] {
        let mut cmd = Command::new(BIN);
        if rustix::process::geteuid().is_root() {
            use std::os::unix::process::CommandExt;
            cmd.uid(65534).gid(65534);
        }
        let start = Instant::now();
        let out = run_bin(cmd, dir.path(), &[command, "-c", &config], b"");
        let took = start.elapsed();
        assert_eq!(out.code, 1, "{command}: {out:?}");
        assert!(
            took < Duration::from_secs(2),
            "{command} took {took:?}: {out:?}"
        );
        assert!(
            out.stderr.contains("Permission denied"),
            "{command}: {out:?}"
        );
    }
}

// ------------------------------------------------- exit codes and checks

/// Each refusal as a user meets it: the exit code says whether to retry
/// (75), fix the input (65), get permission (77) or start the agent (69)
/// (docs/cli.md, Exit codes).
#[test]
fn every_refusal_has_an_exit_code_that_says_what_to_do() {
    let submit = |agent: &Agent, extra: &[&str]| {
        let mut args = vec!["submit", "--exchange", "", "--routing-key", "k"];
        args.extend_from_slice(extra);
        agent.cli(&args)
    };
    let mut agent = Agent::builder(BIN)
        .set("store", "max_pending", "1")
        .set_str("submit", "max_message_size", "1KiB")
        .start();
    let out = submit(&agent, &["--id", "first", "x"]);
    assert_eq!(out.code, 0, "{out:?}");
    // buffer_full: retry later.
    let out = submit(&agent, &["--id", "second", "x"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(out.stderr.contains("buffer_full"), "{out:?}");
    // too_large, and input no agent would take: bad data.
    let out = submit(&agent, &[&"x".repeat(2000)]);
    assert_eq!(out.code, 65, "{out:?}");
    assert!(out.stderr.contains("too_large"), "{out:?}");
    let out = submit(&agent, &["--json", "{not json"]);
    assert_eq!(out.code, 65, "{out:?}");
    let out = submit(&agent, &["--header", "novalue", "x"]);
    assert_eq!(out.code, 65, "{out:?}");
    // Bulk: a line of bad data alone is 65; with a full buffer besides, 75
    // (retrying is what can help first).
    let out = agent.cli_stdin(&["submit", "--bulk"], b"not json\n");
    assert_eq!(out.code, 65, "{out:?}");
    let out = agent.cli_stdin(
        &["submit", "--bulk", "--exchange", "", "--routing-key", "k"],
        b"not json\n{\"payload\":2}\n",
    );
    assert_eq!(out.code, 75, "{out:?}");
    // No agent: the socket file left by a killed agent (ECONNREFUSED), then
    // no socket at all (ENOENT).
    agent.kill9();
    assert!(agent.socket.exists());
    let out = submit(&agent, &["x"]);
    assert_eq!(out.code, 69, "{out:?}");
    assert!(out.stderr.contains("cannot reach the agent"), "{out:?}");
    std::fs::remove_file(&agent.socket).expect("removing the stale socket");
    let out = submit(&agent, &["x"]);
    assert_eq!(out.code, 69, "{out:?}");

    // The connection limit (buffer_full on connect): retry later.
    let agent = Agent::builder(BIN)
        .set("submit", "max_connections", "1")
        .start();
    // Admitted once the harness's readiness probe has given its slot back.
    let mut held = None;
    wait_until("a connection admitted", DEADLINE, || {
        let mut c = agent.client();
        let _ = c.send_raw(b"{\"op\":\"status\"}\n");
        let admitted = c.read_answer().is_some_and(|a| a["ok"] == json!(true));
        if admitted {
            held = Some(c);
        }
        admitted
    });
    let out = submit(&agent, &["x"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(out.stderr.contains("too many connections"), "{out:?}");
    drop(held);
    // storage_full: retry later.
    let agent = Agent::builder(BIN)
        .set_str("store", "min_free_disk", "1PiB")
        .start();
    let out = submit(&agent, &["x"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(out.stderr.contains("storage_full"), "{out:?}");
    // unauthorized (tests/limits.rs has more): not allowed.
    let agent = Agent::builder(BIN)
        .set("submit", "allowed_uids", "[12345]")
        .start();
    let out = submit(&agent, &["x"]);
    assert_eq!(out.code, 77, "{out:?}");
}

/// A socket this user may not open (EACCES) is 77, not "no agent".
#[test]
fn a_socket_the_user_may_not_open_exits_77() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to run the CLI as another user");
        return;
    }
    let agent = Agent::builder(BIN).start();
    // The agent's directory is private: nobody cannot reach its socket.
    let dir = tempfile::tempdir().expect("tempdir");
    let mode = |path: &std::path::Path, bits: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(bits)).expect("chmod");
    };
    mode(dir.path(), 0o755);
    mode(agent.path(), 0o700);
    let config = dir.path().join("cli.toml");
    std::fs::write(
        &config,
        format!(
            "[submit]\nsocket = {}\n",
            edge_outbox_testkit::toml_str(agent.socket.to_string_lossy())
        ),
    )
    .expect("config");
    mode(&config, 0o644);
    let mut cmd = Command::new(BIN);
    {
        use std::os::unix::process::CommandExt;
        cmd.uid(65534).gid(65534);
    }
    let config = config.to_string_lossy().into_owned();
    let out = run_bin(
        cmd,
        dir.path(),
        &[
            "submit",
            "-c",
            &config,
            "--exchange",
            "",
            "--routing-key",
            "k",
            "x",
        ],
        b"",
    );
    assert_eq!(out.code, 77, "{out:?}");
    assert!(out.stderr.contains("Permission denied"), "{out:?}");
}

/// Runs `status --check ARGS` until its exit code is `code` and its line
/// starts with `line` (the agent's view changes asynchronously); the last
/// output.
fn check_until(
    agent: &Agent,
    args: &[&str],
    code: i32,
    line: &str,
) -> edge_outbox_testkit::cli::CliOutput {
    let mut full = vec!["status", "--check"];
    full.extend_from_slice(args);
    let until = Instant::now() + DEADLINE;
    loop {
        let out = agent.cli(&full);
        if (out.code == code && out.stdout.starts_with(line)) || Instant::now() > until {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `status --check` in each state (docs/cli.md, `status --check`): healthy,
/// the agent down, the broker unreachable too long, a backlog too old.
#[test]
fn status_check_says_ok_or_critical_with_its_exit_code() {
    let url = broker::default_url();
    // Healthy: connected, nothing old.
    let agent = Agent::builder(BIN).forwarding_to(&url).start();
    let out = check_until(&agent, &["--max-age", "1h"], 0, "OK: broker connected");
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.starts_with("OK: broker connected"), "{out:?}");
    assert_eq!(out.stdout.lines().count(), 1, "{out:?}");

    // The broker unreachable (refused by the fault proxy) for longer than
    // the bound: CRITICAL, exit 1, and the line says why.
    let proxy = FaultProxy::start(broker::default_addr());
    proxy.set_mode(Mode::Refuse);
    let agent = Agent::builder(BIN)
        .forwarding_to(&proxy.url_for(&url))
        .start();
    let out = check_until(&agent, &["--max-disconnected", "1s"], 1, "CRITICAL");
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout.starts_with("CRITICAL: broker disconnected for "),
        "{out:?}"
    );
    assert!(out.stdout.contains("longer than 1s"), "{out:?}");
    // Within the default bound (5 minutes) that is still OK.
    let out = agent.cli(&["status", "--check"]);
    assert_eq!(out.code, 0, "{out:?}");

    // A backlog older than --max-age (the broker still away, but allowed).
    ok_id(&agent.client().submit("", "k", json!(1)));
    let out = check_until(
        &agent,
        &["--max-age", "1s", "--max-disconnected", "1h"],
        1,
        "CRITICAL",
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout
            .starts_with("CRITICAL: the oldest delivering message is "),
        "{out:?}"
    );
    assert!(out.stdout.contains("(1 delivering)"), "{out:?}");

    // The agent down: 69, whatever the database holds.
    let mut agent = agent;
    agent.terminate();
    assert_eq!(agent.wait_exit(DEADLINE).code(), Some(0));
    let out = agent.cli(&["status", "--check"]);
    assert_eq!(out.code, 69, "{out:?}");
    assert!(
        out.stdout.starts_with("CRITICAL: the agent is not running"),
        "{out:?}"
    );
    // Plain `status` still reads the database and exits 0.
    let out = agent.cli(&["status"]);
    assert_eq!(out.code, 0, "{out:?}");
}
