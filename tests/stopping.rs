//! Stopping and restarting under load (docs/operations.md, Signals and
//! shutdown; Socket activation): a stop under a steady stream is fast and
//! says in its log line what it waited for; with socket activation a
//! restart under a stream costs the client no error.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use edge_outbox_testkit::{amqp, broker, ok_id, refused, rt, wait_until, Agent, Cleanup, Status};
use serde_json::{json, Value};

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

const DEADLINE: Duration = Duration::from_secs(120);

/// What a stop may take beyond waiting for the broker's confirms: 1 s
/// (docs/operations.md), plus room for a loaded two-core test machine to
/// schedule the exit.
const STOP_BOUND: Duration = Duration::from_millis(1_500);

/// Everything one connection was answered, in order, up to its end.
#[derive(Debug, Default)]
struct Answers {
    ok: Vec<String>,
    /// `shutting_down` answers, and whether an `ok` came after one.
    shutting_down: usize,
    ok_after_shutting_down: bool,
    other: Vec<Value>,
}

impl Answers {
    fn note(&mut self, answer: Value) {
        if answer["ok"] == json!(true) {
            self.ok_after_shutting_down |= self.shutting_down > 0;
            self.ok.push(ok_id(&answer));
        } else if answer["error"] == json!("shutting_down") {
            refused(&answer, "shutting_down");
            self.shutting_down += 1;
        } else {
            self.other.push(answer);
        }
    }
}

/// A line of the request stream: message `i` of client `name`.
fn request(exchange: &str, name: &str, i: usize) -> String {
    json!({"exchange": exchange, "routing_key": "k", "id": format!("{name}-{i}"),
           "payload": {"n": i, "pad": "x".repeat(100)}})
    .to_string()
}

/// Reads answers until the agent closes the connection.
fn read_all(stream: UnixStream) -> Answers {
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let mut answers = Answers::default();
    for line in BufReader::new(stream).lines() {
        match line {
            Ok(line) => answers.note(serde_json::from_str(&line).expect("answer JSON")),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("reading answers: {e}"),
        }
    }
    answers
}

/// The figures of the agent's `edge-outbox stopped` line: `name=value` pairs.
fn stop_line(log: &str) -> Vec<(String, String)> {
    let line = log
        .lines()
        .rfind(|l| l.contains("edge-outbox stopped"))
        .unwrap_or_else(|| panic!("no `edge-outbox stopped` line in the log:\n{log}"));
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn figure(fields: &[(String, String)], name: &str) -> u64 {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or_else(|| panic!("no figure {name} in {fields:?}"))
}

/// The ids of every row, sorted.
fn stored_ids(agent: &Agent) -> Vec<String> {
    let db = agent.db();
    let mut statement = db
        .prepare("SELECT id FROM msg_log ORDER BY id")
        .expect("prepare");
    let ids = statement
        .query_map([], |r| r.get::<_, String>(0))
        .expect("query")
        .collect::<Result<Vec<_>, _>>()
        .expect("ids");
    ids
}

/// SIGTERM while a pipelining client streams as fast as it can and another
/// submits one message at a time: each connection gets its answers, then
/// at most one `shutting_down`, then its end; the agent exits within the
/// bound; every `ok` is a row; the log line says what the stop waited for.
#[test]
fn a_stop_under_a_steady_stream_is_fast_and_explained() {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let exchange = cleanup.exchange(amqp::unique("stop-ex"));
    let queue = cleanup.queue(amqp::unique("stop-q"));
    rt.block_on(amqp::declare_exchange_with_queue(
        &url, &exchange, &queue, "k",
    ));
    let mut agent = Agent::builder(BIN).forwarding_to(&url).start();

    // A pipelining client: a writer thread sends until the agent hangs up.
    let piped = UnixStream::connect(&agent.socket).expect("connect");
    let mut writer = piped.try_clone().expect("clone");
    let piped_exchange = exchange.clone();
    let piped_sender = std::thread::spawn(move || {
        let mut sent = 0;
        loop {
            let line = request(&piped_exchange, "piped", sent) + "\n";
            if writer.write_all(line.as_bytes()).is_err() {
                return sent;
            }
            sent += 1;
        }
    });
    let piped_reader = std::thread::spawn(move || read_all(piped));

    // A one-at-a-time client: sends a request, reads its answer, again.
    let single = UnixStream::connect(&agent.socket).expect("connect");
    let single_exchange = exchange.clone();
    let single_client = std::thread::spawn(move || {
        single
            .set_read_timeout(Some(DEADLINE))
            .expect("read timeout");
        let mut reader = BufReader::new(single.try_clone().expect("clone"));
        let mut writer = single;
        let mut answers = Answers::default();
        for i in 0.. {
            let line = request(&single_exchange, "single", i) + "\n";
            if writer.write_all(line.as_bytes()).is_err() {
                break;
            }
            let mut answer = String::new();
            match reader.read_line(&mut answer) {
                Ok(0) => break,
                Ok(_) => answers.note(serde_json::from_str(&answer).expect("answer JSON")),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("reading an answer: {e}"),
            }
        }
        answers
    });

    // A connection that sends nothing.
    let idle = UnixStream::connect(&agent.socket).expect("connect");

    wait_until("a steady stream being delivered", DEADLINE, || {
        agent.count_status(Status::Delivered) > 2_000
    });
    let signalled = Instant::now();
    agent.terminate();
    let status = agent.wait_exit(DEADLINE);
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{status}");

    let sent = piped_sender.join().expect("piped sender");
    let piped = piped_reader.join().expect("piped reader");
    let single = single_client.join().expect("single client");
    let idle = read_all(idle);
    let log = agent.log_text();
    let fields = stop_line(&log);
    let (connections, confirms, duration_ms) = (
        figure(&fields, "connections"),
        figure(&fields, "confirms"),
        figure(&fields, "duration_ms"),
    );
    eprintln!(
        "stop took {took:?} (the agent says {duration_ms} ms); {} connections answered, \
         {confirms} confirms awaited; piped: {sent} sent, {} ok, {} shutting_down; \
         single: {} ok, {} shutting_down; idle: {} shutting_down",
        connections,
        piped.ok.len(),
        piped.shutting_down,
        single.ok.len(),
        single.shutting_down,
        idle.shutting_down,
    );
    for (name, answers) in [("piped", &piped), ("single", &single), ("idle", &idle)] {
        assert!(
            answers.shutting_down <= 1,
            "{name}: {} shutting_down answers",
            answers.shutting_down
        );
        assert!(
            !answers.ok_after_shutting_down,
            "{name}: ok after shutting_down"
        );
        assert!(answers.other.is_empty(), "{name}: {:?}", answers.other);
    }
    assert_eq!(idle.shutting_down, 1, "the idle connection was not told");
    assert!(!piped.ok.is_empty() && !single.ok.is_empty());
    assert_eq!(connections, 3, "{fields:?}");
    assert!(took < STOP_BOUND, "the stop took {took:?}");
    assert!(
        duration_ms < STOP_BOUND.as_millis() as u64,
        "the agent says the stop took {duration_ms} ms"
    );
    // Every `ok` is a row, and nothing refused was stored.
    let mut ok: Vec<String> = piped.ok.iter().chain(&single.ok).cloned().collect();
    ok.sort();
    assert_eq!(stored_ids(&agent), ok);
}

// ------------------------------------------------------ socket activation

/// What a retrying one-at-a-time client met, in the order it submitted.
#[derive(Debug, Default)]
struct Retrying {
    /// Ids answered `ok`, in order.
    ok: Vec<String>,
    /// Connects that failed (`ENOENT`, `ECONNREFUSED`): what a client sees
    /// of a restart without socket activation. Must stay 0.
    connect_errors: Vec<String>,
    /// `shutting_down` answers, and connections that ended without an
    /// answer (a write or read meeting the closed connection): both mean
    /// "reconnect and resend".
    shutting_down: usize,
    cut: usize,
    /// The longest time one message took, resends included.
    slowest: Duration,
}

/// Submits `{name}-0`, `{name}-1`, … one at a time until `stop`, resending
/// on `shutting_down` or a connection that ended over a new connection
/// (docs/protocol.md, Error codes), as the examples in `examples/` do.
fn retrying_client(
    socket: &std::path::Path,
    name: &str,
    stop: &std::sync::atomic::AtomicBool,
    progress: &std::sync::atomic::AtomicUsize,
) -> Retrying {
    use std::sync::atomic::Ordering;
    let mut seen = Retrying::default();
    let mut connection: Option<(BufReader<UnixStream>, UnixStream)> = None;
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let id = format!("{name}-{i}");
        let line =
            json!({"exchange": "", "routing_key": "k", "id": id, "payload": i}).to_string() + "\n";
        let started = Instant::now();
        loop {
            assert!(started.elapsed() < DEADLINE, "{id} never answered ok");
            let (reader, writer) = match connection.as_mut() {
                Some(c) => c,
                None => match UnixStream::connect(socket) {
                    Ok(stream) => {
                        stream
                            .set_read_timeout(Some(DEADLINE))
                            .expect("read timeout");
                        let reader = BufReader::new(stream.try_clone().expect("clone"));
                        connection.insert((reader, stream))
                    }
                    Err(e) => {
                        seen.connect_errors.push(e.to_string());
                        std::thread::sleep(Duration::from_millis(50)); // a client's backoff
                        continue;
                    }
                },
            };
            let mut answer = String::new();
            let answered = writer
                .write_all(line.as_bytes())
                .and_then(|()| reader.read_line(&mut answer));
            match answered {
                Ok(n) if n > 0 => {
                    let answer: Value = serde_json::from_str(&answer).expect("answer JSON");
                    if answer["ok"] == json!(true) {
                        assert_eq!(ok_id(&answer), id);
                        break;
                    }
                    refused(&answer, "shutting_down");
                    seen.shutting_down += 1;
                }
                Ok(_) => seen.cut += 1,
                Err(e) => {
                    assert!(
                        matches!(
                            e.kind(),
                            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                        ),
                        "{id}: {e}"
                    );
                    seen.cut += 1;
                }
            }
            connection = None;
        }
        seen.slowest = seen.slowest.max(started.elapsed());
        seen.ok.push(id);
        progress.fetch_add(1, Ordering::SeqCst);
        i += 1;
    }
    seen
}

/// With socket activation (the socket held across restarts, as
/// `edge-outbox.socket` holds it), two restarts under a stream of submits
/// cost the client no error: its reconnects wait in the kernel's queue for
/// the next agent, every message ends `ok` and stored, and the agent never
/// unlinks the socket.
#[test]
fn restarts_under_a_stream_cost_a_socket_activated_client_no_error() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let mut agent = Agent::builder(BIN).socket_activated().start();
    let socket = agent.socket.clone();
    let (stop, progress) = (AtomicBool::new(false), AtomicUsize::new(0));
    let seen = std::thread::scope(|s| {
        let client = s.spawn(|| retrying_client(&socket, "act", &stop, &progress));
        for restart in 1..=2 {
            let before = progress.load(Ordering::SeqCst);
            wait_until("the stream to flow", DEADLINE, || {
                progress.load(Ordering::SeqCst) > before + 300
            });
            let t = Instant::now();
            agent.restart();
            eprintln!("restart {restart} took {:?}", t.elapsed());
            assert!(socket.exists(), "the socket file was unlinked");
        }
        let before = progress.load(Ordering::SeqCst);
        wait_until("the stream to flow after the restarts", DEADLINE, || {
            progress.load(Ordering::SeqCst) > before + 300
        });
        stop.store(true, Ordering::SeqCst);
        client.join().expect("client")
    });
    eprintln!(
        "{} ok, {} shutting_down, {} cut, slowest message {:?}, connect errors {:?}",
        seen.ok.len(),
        seen.shutting_down,
        seen.cut,
        seen.slowest,
        seen.connect_errors
    );
    assert!(seen.connect_errors.is_empty(), "{:?}", seen.connect_errors);
    assert!(
        seen.shutting_down + seen.cut <= 2 * 2,
        "more than one reconnect per restart"
    );
    let mut ok = seen.ok.clone();
    ok.sort();
    assert_eq!(stored_ids(&agent), ok);
    assert!(agent
        .log_text()
        .lines()
        .filter(|l| l.contains("edge-outbox ready"))
        .all(|l| l.contains("socket_activated=true")));
}

/// `systemd-socket-activate` (no systemd running) binds the socket and
/// execs the agent on the first connection: it serves on that socket,
/// stops cleanly and leaves the socket file to its owner.
#[test]
fn systemd_socket_activate_runs_the_agent_on_its_socket() {
    let mut agent = Agent::builder(BIN)
        .through_systemd_socket_activate()
        .start();
    let mut c = agent.client();
    let id = ok_id(&c.submit("", "k", json!("via systemd-socket-activate")));
    assert_eq!(c.request(&json!({"op": "status"}))["ok"], json!(true));
    agent.terminate();
    assert_eq!(
        refused(&c.answer(), "shutting_down"),
        "the agent is shutting down"
    );
    let status = agent.wait_exit(DEADLINE);
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(
        agent.socket.exists(),
        "the agent unlinked a socket it did not create"
    );
    assert_eq!(stored_ids(&agent), vec![id]);
    let log = agent.log_text();
    assert!(log.contains("socket_activated=true"), "{log}");
}

/// A passed socket that is not the one `submit.socket` names is a start-up
/// failure that says which two paths differ; nothing is served on it.
#[test]
fn a_passed_socket_elsewhere_than_submit_socket_is_refused() {
    let agent = Agent::builder(BIN).prepare();
    let other = agent.path().join("other.sock");
    let log = std::fs::File::create(agent.path().join("activate.log")).expect("log");
    let mut child = std::process::Command::new(edge_outbox_testkit::agent::SYSTEMD_SOCKET_ACTIVATE)
        .arg("-l")
        .arg(&other)
        .arg(BIN)
        .args(["run", "-c"])
        .arg(&agent.config)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("systemd-socket-activate");
    let mut exit = None;
    wait_until(
        "the tool to listen, then the agent to exit",
        DEADLINE,
        || {
            let _ = UnixStream::connect(&other);
            exit = child.try_wait().expect("wait");
            exit.is_some()
        },
    );
    let status = exit.expect("exit status");
    let log = std::fs::read_to_string(agent.path().join("activate.log")).expect("log");
    assert!(!status.success(), "{status}\n{log}");
    assert!(
        log.contains("the passed socket is") && log.contains("but submit.socket is"),
        "{log}"
    );
    assert!(
        !agent.socket.exists(),
        "the agent bound submit.socket itself"
    );
}
