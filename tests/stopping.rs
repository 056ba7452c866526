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
