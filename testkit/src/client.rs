//! [`Client`]: a connection to the agent's socket speaking the line protocol
//! (docs/protocol.md): JSON requests in, one JSON answer per line out, in
//! order. [`ok_id`] and [`refused`] check an answer.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agent::Agent;

/// How long a client waits for one answer before the test fails.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// A protocol client: one connection, lines in, JSON answers out.
pub struct Client {
    pub stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(socket: &Path) -> Client {
        let stream = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
        Client::from_stream(stream)
    }

    pub fn from_stream(stream: UnixStream) -> Client {
        stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .expect("read timeout");
        let reader =
            BufReader::with_capacity(64 * 1024, stream.try_clone().expect("cloning the stream"));
        Client { stream, reader }
    }

    /// Another handle on the connection, for a writer thread.
    pub fn writer(&self) -> UnixStream {
        self.stream.try_clone().expect("cloning the stream")
    }

    /// Writes raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Writes one line (a newline is added).
    pub fn send_line(&mut self, line: &str) {
        let mut bytes = line.as_bytes().to_vec();
        bytes.push(b'\n');
        self.send_raw(&bytes).expect("writing a request");
    }

    /// Writes one JSON request.
    pub fn send(&mut self, request: &Value) {
        self.send_line(&request.to_string());
    }

    /// The next answer line; `None` at EOF (or a reset connection).
    pub fn read_answer(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(
                serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {line:?}")),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("reading an answer: {e}"),
        }
    }

    /// The next answer; panics at EOF.
    pub fn answer(&mut self) -> Value {
        self.read_answer()
            .expect("the agent closed the connection instead of answering")
    }

    /// Sends one request and reads its answer.
    pub fn request(&mut self, request: &Value) -> Value {
        self.send(request);
        self.answer()
    }

    /// Submits `payload` (any JSON value) and returns the answer.
    pub fn submit(&mut self, exchange: &str, routing_key: &str, payload: Value) -> Value {
        self.request(&serde_json::json!({
            "exchange": exchange,
            "routing_key": routing_key,
            "payload": payload,
        }))
    }

    /// Submits `payload` under the client-chosen `id` to exchange `ex` with
    /// routing key `rk`, and returns the answer.
    pub fn submit_with_id(&mut self, id: &str, payload: Value) -> Value {
        self.request(&serde_json::json!({
            "exchange": "ex",
            "routing_key": "rk",
            "id": id,
            "payload": payload,
        }))
    }

    /// Waits until the agent closes the connection: reads (and returns) any
    /// answers still coming, then EOF. Panics after `deadline`.
    pub fn expect_closed(&mut self, deadline: Duration) -> Vec<Value> {
        self.stream
            .set_read_timeout(Some(deadline))
            .expect("read timeout");
        let mut answers = Vec::new();
        let start = Instant::now();
        loop {
            let mut line = String::new();
            match self.reader.read_line(&mut line) {
                Ok(0) => return answers,
                Ok(_) => answers.push(serde_json::from_str(&line).expect("answer JSON")),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return answers,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("the connection was still open after {:?}", start.elapsed())
                }
                Err(e) => panic!("reading: {e}"),
            }
        }
    }

    /// Reads everything until EOF (for tests of raw behaviour).
    pub fn read_to_end(&mut self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = self.reader.read_to_end(&mut buf);
        buf
    }
}

/// Asserts an `ok` answer and returns its id.
pub fn ok_id(answer: &Value) -> String {
    assert_eq!(answer["ok"], Value::Bool(true), "expected ok, got {answer}");
    answer["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {answer}"))
        .to_string()
}

/// Asserts a refusal with `code` and returns its message.
pub fn refused(answer: &Value, code: &str) -> String {
    assert_eq!(
        answer["ok"],
        Value::Bool(false),
        "expected a refusal, got {answer}"
    );
    assert_eq!(
        answer["error"],
        Value::String(code.into()),
        "wrong code in {answer}"
    );
    let message = answer["message"].as_str().unwrap_or_default().to_string();
    assert!(!message.is_empty(), "no message in {answer}");
    message
}

/// Submits `n` messages with ids `{prefix}-{i}` (a 200-byte pad each) on one
/// pipelined connection: a writer thread sends while this thread reads the
/// answers. Returns the ids, every one answered `ok`.
pub fn submit_many(
    agent: &Agent,
    exchange: &str,
    routing_key: &str,
    prefix: &str,
    n: usize,
) -> Vec<String> {
    let mut client = agent.client();
    let mut writer = client.writer();
    let lines: Vec<String> = (0..n)
        .map(|i| {
            serde_json::json!({"exchange": exchange, "routing_key": routing_key,
                   "id": format!("{prefix}-{i}"), "payload": {"n": i, "pad": "x".repeat(200)}})
            .to_string()
        })
        .collect();
    let sender = std::thread::spawn(move || {
        for line in lines {
            writer.write_all(line.as_bytes()).expect("write");
            writer.write_all(b"\n").expect("write");
        }
    });
    let ids = (0..n).map(|_| ok_id(&client.answer())).collect();
    sender.join().expect("sender");
    ids
}

/// Sends `requests` (any JSON requests) on one pipelined connection, a
/// writer thread sending while this thread reads, and returns the answers
/// in request order.
pub fn request_many(agent: &Agent, requests: &[Value]) -> Vec<Value> {
    let mut client = agent.client();
    let mut writer = client.writer();
    let mut bytes = Vec::new();
    for request in requests {
        bytes.extend_from_slice(request.to_string().as_bytes());
        bytes.push(b'\n');
    }
    let sender = std::thread::spawn(move || writer.write_all(&bytes).expect("write"));
    let answers = (0..requests.len()).map(|_| client.answer()).collect();
    sender.join().expect("sender");
    answers
}
