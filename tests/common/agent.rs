//! A real `edge-outbox` agent on a temp directory: its own TOML config, a
//! real SQLite file, a real Unix socket, its log in a file.
//!
//! ```ignore
//! let agent = Agent::builder().set("store", "max_pending", "3").start();
//! let mut c = agent.client();
//! let answer = c.submit("ex", "rk", json!("hello"));
//! assert_eq!(agent.db_count("SELECT COUNT(*) FROM msg_log"), 1);
//! ```
//!
//! The broker defaults to a dead port (`127.0.0.1:1`): forwarding is not
//! what these tests are about. [`AgentBuilder::set`] overrides any key.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::wait_until;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");
/// How long an agent gets to start listening.
pub const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a client waits for one answer before the test fails.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// A broker address nothing listens on.
pub const DEAD_BROKER: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

/// Fills the (new) database at `path` with `rows` rows of 512-byte bodies in
/// one transaction, as the agent would have stored them: `row(i)` gives
/// each row's id, status, routing key and create_time. For backlog tests
/// that would take too long to submit.
pub fn prefill_database(path: &Path, rows: i64, row: impl Fn(i64) -> (String, i64, String, i64)) {
    let mut db = rusqlite::Connection::open(path).expect("creating the database");
    db.execute_batch("PRAGMA auto_vacuum = INCREMENTAL; PRAGMA journal_mode = WAL;")
        .expect("pragmas");
    db.execute_batch(include_str!("../../schema.sql"))
        .expect("schema");
    db.execute_batch(&format!(
        "PRAGMA user_version = {}",
        edge_outbox::store::SCHEMA_VERSION
    ))
    .expect("version");
    let tx = db.transaction().expect("transaction");
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO msg_log (id, msg, exchange, routing_key, status, create_time, \
                 update_time, content_type) VALUES (?1, ?2, '', ?3, ?4, ?5, ?5, 'text/plain')",
            )
            .expect("prepare");
        let body = "x".repeat(512);
        for i in 0..rows {
            let (id, status, routing_key, create_time) = row(i);
            insert
                .execute(rusqlite::params![
                    id,
                    body,
                    routing_key,
                    status,
                    create_time
                ])
                .expect("insert");
        }
    }
    tx.commit().expect("commit");
}

/// An agent forwarding to the broker at `url`, with fast retry timings.
pub fn forwarding_agent(url: &str) -> AgentBuilder {
    Agent::builder()
        .set("broker", "urls", format!("[{}]", toml_str(url)))
        .set_str("broker", "connect_timeout", "2s")
        .set_str("publish", "retry_interval", "200ms")
        .set_str("publish", "resend_every", "300ms")
}

/// A TOML string literal for `s` (paths, durations, sizes).
pub fn toml_str(s: impl AsRef<str>) -> String {
    toml::Value::String(s.as_ref().to_string()).to_string()
}

/// The configuration of an agent to start: section → key → TOML value.
#[derive(Debug, Clone)]
pub struct AgentBuilder {
    sections: BTreeMap<String, BTreeMap<String, String>>,
    env: Vec<(String, String)>,
}

impl AgentBuilder {
    /// Sets `[section] key = value`; `value` is TOML (`"3"`, `"\"1s\""`,
    /// `"[12345]"`); see [`toml_str`] for strings. Replaces the default.
    pub fn set(mut self, section: &str, key: &str, value: impl Into<String>) -> Self {
        self.sections
            .entry(section.to_string())
            .or_default()
            .insert(key.to_string(), value.into());
        self
    }

    /// Sets a string key (quoted for TOML).
    pub fn set_str(self, section: &str, key: &str, value: impl AsRef<str>) -> Self {
        self.set(section, key, toml_str(value))
    }

    /// Removes a key the harness sets by default (e.g. `broker.urls`).
    pub fn unset(mut self, section: &str, key: &str) -> Self {
        if let Some(keys) = self.sections.get_mut(section) {
            keys.remove(key);
        }
        self
    }

    /// An environment variable for the agent process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Writes the config and starts the agent; returns once its socket accepts.
    pub fn start(self) -> Agent {
        let mut agent = self.prepare();
        agent.spawn_and_wait_ready();
        agent
    }

    /// Writes the config in a new temp dir but does not start the agent.
    pub fn prepare(self) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("eo")
            .tempdir()
            .expect("creating a temp dir");
        let root = dir.path().to_path_buf();
        let mut sections = self.sections;
        let mut defaults = |section: &str, key: &str, value: String| {
            sections
                .entry(section.to_string())
                .or_default()
                .entry(key.to_string())
                .or_insert(value);
        };
        defaults(
            "store",
            "path",
            toml_str(root.join("outbox.db").to_string_lossy()),
        );
        defaults(
            "submit",
            "socket",
            toml_str(root.join("s.sock").to_string_lossy()),
        );
        defaults("broker", "urls", format!("[{}]", toml_str(DEAD_BROKER)));
        defaults("broker", "connect_timeout", toml_str("1s"));
        let config_text = render(&sections);
        let config = root.join("agent.toml");
        std::fs::write(&config, &config_text).expect("writing the agent config");
        let parsed: toml::Table = toml::from_str(&config_text).expect("the harness wrote bad TOML");
        let get = |section: &str, key: &str| -> PathBuf {
            parsed[section][key]
                .as_str()
                .map(PathBuf::from)
                .expect("a path key")
        };
        let socket = get("submit", "socket");
        assert!(
            socket.as_os_str().len() < 107,
            "socket path too long: {}",
            socket.display()
        );
        Agent {
            db: get("store", "path"),
            socket,
            log: root.join("agent.log"),
            config,
            config_text,
            env: self.env,
            child: None,
            dir,
        }
    }
}

fn render(sections: &BTreeMap<String, BTreeMap<String, String>>) -> String {
    let mut text = String::new();
    for (section, keys) in sections {
        text.push_str(&format!("[{section}]\n"));
        for (key, value) in keys {
            text.push_str(&format!("{key} = {value}\n"));
        }
        text.push('\n');
    }
    text
}

/// A running (or stopped) agent and its temp directory.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub config_text: String,
    pub socket: PathBuf,
    pub db: PathBuf,
    pub log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

/// What a CLI run gave.
#[derive(Debug)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

impl Agent {
    pub fn builder() -> AgentBuilder {
        AgentBuilder {
            sections: BTreeMap::new(),
            env: Vec::new(),
        }
    }

    /// An agent on the defaults of the harness.
    pub fn start() -> Agent {
        Agent::builder().start()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        // The tests' own environment must not configure the agent.
        for (key, _) in std::env::vars() {
            if key.starts_with("EDGE_OUTBOX_") {
                cmd.env_remove(key);
            }
        }
        cmd.env_remove("RUST_LOG");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    fn log_file(&self) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("opening the agent log")
    }

    /// Starts `edge-outbox run` and waits until its socket accepts.
    fn spawn_and_wait_ready(&mut self) {
        assert!(self.child.is_none(), "the agent is already running");
        let log = self.log_file();
        let mut marker = log.try_clone().expect("log fd");
        let _ = writeln!(marker, "----- harness: starting the agent -----");
        let child = self
            .command()
            .arg("run")
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawning edge-outbox run");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "the agent exited during start-up ({status}); its log:\n{}",
                    self.log_text()
                );
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if start.elapsed() > START_DEADLINE {
                panic!(
                    "the agent did not listen on {} within {START_DEADLINE:?}; its log:\n{}",
                    self.socket.display(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the agent again on the same directory and config (stopping it
    /// first with SIGTERM if it still runs). Also starts an agent that was
    /// only [`AgentBuilder::prepare`]d.
    pub fn restart(&mut self) {
        if self.is_running() {
            self.terminate();
            let status = self.wait_exit(Duration::from_secs(30));
            assert!(status.success(), "agent exited with {status} on SIGTERM");
        }
        self.child = None;
        self.spawn_and_wait_ready();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent is not running").id()
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().expect("waiting for the agent"))
    }

    /// The process has not exited (it may not be reaped yet otherwise).
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM; does not wait.
    pub fn terminate(&mut self) {
        self.signal("TERM");
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`).
    pub fn signal(&mut self, name: &str) {
        let pid = self.pid();
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} {pid} failed");
    }

    /// Waits for the process to exit; panics after `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let mut status = None;
        wait_until("the agent to exit", deadline, || {
            status = self.try_wait();
            status.is_some()
        });
        status.expect("exit status")
    }

    /// Everything the agent wrote to stdout and stderr so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A client connected to the agent's socket.
    pub fn client(&self) -> Client {
        Client::connect(&self.socket)
    }

    /// A read-write connection on the database (the agent may run: WAL).
    pub fn db(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(&self.db).expect("opening the database");
        conn.busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        conn
    }

    /// One integer from `sql`.
    pub fn db_count(&self, sql: &str) -> i64 {
        self.db()
            .query_row(sql, [], |r| r.get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Rows in `msg_log` with status code `status`.
    pub fn count_status(&self, status: i64) -> i64 {
        self.db_count(&format!(
            "SELECT COUNT(*) FROM msg_log WHERE status = {status}"
        ))
    }

    /// Rows in `msg_log`.
    pub fn rows(&self) -> i64 {
        self.db_count("SELECT COUNT(*) FROM msg_log")
    }

    /// Rows per status code.
    pub fn status_counts(&self) -> BTreeMap<i64, i64> {
        let conn = self.db();
        let mut stmt = conn
            .prepare("SELECT status, COUNT(*) FROM msg_log GROUP BY status")
            .expect("prepare");
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query");
        rows.map(|r| r.expect("row")).collect()
    }

    /// Runs `edge-outbox ARGS[0] -c CONFIG ARGS[1..]`.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        self.cli_stdin(args, b"")
    }

    /// [`Agent::cli`] with `stdin` as standard input.
    pub fn cli_stdin(&self, args: &[&str], stdin: &[u8]) -> CliOutput {
        let mut full: Vec<String> = Vec::new();
        if let Some((first, rest)) = args.split_first() {
            full.push(first.to_string());
            full.push("-c".into());
            full.push(self.config.to_string_lossy().into_owned());
            full.extend(rest.iter().map(|s| s.to_string()));
        }
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        self.cli_raw(&full, stdin)
    }

    /// Runs the binary with exactly `args` (no `-c`), in the temp dir.
    pub fn cli_raw(&self, args: &[&str], stdin: &[u8]) -> CliOutput {
        run_bin(self.command(), self.path(), args, stdin)
    }
}

static CLI_RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs the binary to completion (at most 120 s) with `stdin`, in `dir`.
pub fn run_bin(mut cmd: Command, dir: &Path, args: &[&str], stdin: &[u8]) -> CliOutput {
    let n = CLI_RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = dir.join(format!("cli-{n}"));
    let (in_path, out_path, err_path) = (
        base.with_extension("in"),
        base.with_extension("out"),
        base.with_extension("err"),
    );
    std::fs::write(&in_path, stdin).expect("writing stdin");
    let mut child = cmd
        .args(args)
        .current_dir(dir)
        .stdin(File::open(&in_path).expect("stdin file"))
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawning the CLI");
    let deadline = Duration::from_secs(120);
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() <= deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            outcome => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("edge-outbox {args:?} did not finish within {deadline:?}: {outcome:?}");
            }
        }
    };
    let output = CliOutput {
        code: status.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    };
    for p in [in_path, out_path, err_path] {
        let _ = std::fs::remove_file(p);
    }
    output
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "===== agent config ({}) =====\n{}===== agent log ({}) =====\n{}===== end of agent log =====",
                self.config.display(),
                self.config_text,
                self.log.display(),
                tail(&self.log_text(), 200)
            );
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = all[start..].join("\n");
    out.push('\n');
    out
}

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
