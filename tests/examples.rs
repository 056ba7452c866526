//! The client examples of `examples/` (docs/protocol.md, Examples), each
//! run against a real agent through what a producer meets: the agent not
//! running yet (no socket), the buffer full (`buffer_full`), a restart
//! (`shutting_down`, a closed connection, no socket), then a broker that
//! drains the buffer. Each client must end with every message `ok` and
//! stored once under its stable id; run again on the same input, every
//! message is answered `duplicate`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use edge_outbox_testkit::config::DEAD_BROKER;
use edge_outbox_testkit::{amqp, broker, rt, toml_str, wait_until, Agent, Cleanup};
use serde_json::json;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");

const DEADLINE: Duration = Duration::from_secs(120);

/// Messages per run: more than the buffer holds.
const MESSAGES: usize = 12;
/// `store.max_pending` of the agent: the client meets `buffer_full`.
const MAX_PENDING: usize = 5;

fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(path)
}

/// The payload lines a client reads: JSON values of several kinds.
fn payloads(name: &str) -> String {
    let mut text = String::new();
    for i in 0..MESSAGES {
        let line = match i % 3 {
            0 => json!({"n": i, "client": name}),
            1 => json!(format!("message {i} from {name}")),
            _ => json!(i),
        };
        text.push_str(&line.to_string());
        text.push('\n');
    }
    text
}

/// A client started on `agent`'s socket with its payloads on stdin, its
/// output in `OUT.stdout` / `OUT.stderr` of the agent's directory.
struct Run {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Run {
    fn start(
        mut cmd: Command,
        agent: &Agent,
        queue: &str,
        prefix: &str,
        input: &str,
        out: &str,
    ) -> Run {
        let stdout = agent.path().join(format!("{out}.stdout"));
        let stderr = agent.path().join(format!("{out}.stderr"));
        let mut child = cmd
            .arg(&agent.socket)
            .args(["", queue, prefix])
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("starting the client");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("writing the payloads");
        Run {
            child,
            stdout,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn stdout(&self) -> Vec<String> {
        std::fs::read_to_string(&self.stdout)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn wait(&mut self) -> ExitStatus {
        let mut status = None;
        wait_until("the client to finish", DEADLINE, || {
            status = self.child.try_wait().expect("waiting for the client");
            status.is_some()
        });
        status.expect("exit status")
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("===== client stderr =====\n{}", self.stderr());
        }
    }
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

/// The whole story for one client: see the file's header.
fn exercise(name: &str, command: impl Fn() -> Command) {
    let rt = rt();
    let url = broker::default_url();
    let mut cleanup = Cleanup::new(&url);
    let queue = cleanup.queue(amqp::unique(&format!("example-{name}")));
    rt.block_on(amqp::declare_queue(&url, &queue));
    // Prepared, not started: the socket does not exist yet.
    let mut agent = Agent::builder(BIN)
        .set("store", "max_pending", MAX_PENDING.to_string())
        .prepare();
    let prefix = amqp::unique(name);
    let input = payloads(name);
    let mut run = Run::start(command(), &agent, &queue, &prefix, &input, "first");

    wait_until("a retry for the missing socket", DEADLINE, || {
        run.stderr().contains("retrying: no socket")
    });
    agent.restart();
    wait_until("the buffer full and a retry for it", DEADLINE, || {
        agent.rows() == MAX_PENDING as i64 && run.stderr().contains("retrying: buffer_full")
    });
    // The broker becomes reachable: restart the agent on it, under the client.
    agent.config_text = agent.config_text.replace(
        &format!("[{}]", toml_str(DEAD_BROKER)),
        &format!("[{}]", toml_str(&url)),
    );
    std::fs::write(&agent.config, &agent.config_text).expect("rewriting the config");
    agent.restart();

    let status = run.wait();
    let stderr = run.stderr();
    assert!(status.success(), "{name} exited {status}:\n{stderr}");
    let expected: Vec<String> = (1..=MESSAGES).map(|n| format!("{prefix}-{n}")).collect();
    let printed = run.stdout();
    assert_eq!(printed.len(), MESSAGES, "{printed:?}");
    for (line, id) in printed.iter().zip(&expected) {
        assert!(
            *line == format!("{id} ok") || *line == format!("{id} duplicate"),
            "{line:?} for {id}"
        );
    }
    let mut sorted = expected.clone();
    sorted.sort();
    assert_eq!(stored_ids(&agent), sorted, "each message stored once");
    eprintln!(
        "{name}: {} retries: {}",
        stderr.lines().count(),
        [
            "no socket",
            "buffer_full",
            "shutting_down",
            "connection lost",
            "no answer"
        ]
        .iter()
        .map(|r| format!("{r} × {}", stderr.matches(r).count()))
        .collect::<Vec<_>>()
        .join(", ")
    );
    drop(run);

    // Stable ids: the same input again stores nothing new.
    let mut again = Run::start(command(), &agent, &queue, &prefix, &input, "again");
    let status = again.wait();
    assert!(status.success(), "{name} exited {status} on the rerun");
    let want: Vec<String> = expected
        .iter()
        .map(|id| format!("{id} duplicate"))
        .collect();
    assert_eq!(again.stdout(), want);
    assert_eq!(stored_ids(&agent), sorted);
    agent.wait_all_delivered(MESSAGES as i64, DEADLINE);
    assert_eq!(rt.block_on(amqp::queue_len(&url, &queue)), MESSAGES as u32);
}

#[test]
fn the_python_example_retries_through_a_missing_socket_a_full_buffer_and_a_restart() {
    exercise("python", || {
        let mut cmd = Command::new("python3");
        cmd.arg(example("python/submit.py"));
        cmd
    });
}

#[test]
fn the_shell_example_retries_through_a_missing_socket_a_full_buffer_and_a_restart() {
    exercise("shell", || {
        let mut cmd = Command::new("sh");
        cmd.arg(example("shell/submit.sh"));
        cmd
    });
}

#[test]
fn the_c_example_retries_through_a_missing_socket_a_full_buffer_and_a_restart() {
    let build = tempfile::tempdir().expect("tempdir");
    let binary = build.path().join("edge-outbox-submit");
    let compiled = Command::new("gcc")
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-o"])
        .arg(&binary)
        .arg(example("c/submit.c"))
        .output()
        .expect("running gcc");
    assert!(
        compiled.status.success(),
        "gcc failed:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    exercise("c", || Command::new(&binary));
}

#[test]
fn the_go_example_retries_through_a_missing_socket_a_full_buffer_and_a_restart() {
    let build = tempfile::tempdir().expect("tempdir");
    let binary = build.path().join("edge-outbox-submit");
    // Go's caches in the temp dir: the test needs no home directory, and
    // never reaches for the network (standard library only, no module).
    let compiled = Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg(example("go/submit.go"))
        .env("GOCACHE", build.path().join("cache"))
        .env("GOPATH", build.path().join("gopath"))
        .env("GOTOOLCHAIN", "local")
        .env("GOFLAGS", "-mod=mod")
        .env("GOPROXY", "off")
        .output()
        .expect("running go (scripts/test-setup installs golang-go)");
    assert!(
        compiled.status.success(),
        "go build failed:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    exercise("go", || Command::new(&binary));
}
