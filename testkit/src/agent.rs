//! A real `edge-outbox` agent process on a temp directory of its own: its
//! TOML config, a real SQLite file, a real Unix socket, its log in a file.
//!
//! ```ignore
//! const BIN: &str = env!("CARGO_BIN_EXE_edge-outbox");
//! let agent = Agent::builder(BIN).set("store", "max_pending", "3").start();
//! let mut c = agent.client();
//! let answer = c.submit("ex", "rk", json!("hello"));
//! assert_eq!(agent.rows(), 1);
//! ```
//!
//! The binary's path comes from the caller: `CARGO_BIN_EXE_edge-outbox` is
//! only set when the main package's own tests and benches are compiled.
//! [`Agent`] owns the process: dropping it kills the agent (SIGKILL) and,
//! when the test is failing, prints the agent's config and log tail. Talking
//! to it: [`crate::client`] (socket), [`crate::cli`] (command line),
//! [`crate::db`] (its database).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::config::AgentBuilder;
use crate::wait::wait_until;

/// How long an agent gets to start listening.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// A running (or stopped) agent and its temp directory.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub config_text: String,
    pub socket: PathBuf,
    pub db: PathBuf,
    pub log: PathBuf,
    /// The `edge-outbox` binary (for `run` and the CLI commands).
    pub(crate) bin: PathBuf,
    pub(crate) env: Vec<(String, String)>,
    /// `RLIMIT_NOFILE` (soft, hard) for the agent's processes.
    pub(crate) fd_limit: Option<(u64, u64)>,
    pub(crate) child: Option<Child>,
}

impl Agent {
    /// The configuration of an agent running the binary at `bin` (pass
    /// `env!("CARGO_BIN_EXE_edge-outbox")`), on the kit's defaults.
    pub fn builder(bin: impl Into<PathBuf>) -> AgentBuilder {
        AgentBuilder::new(bin.into())
    }

    /// An agent on the defaults of the kit, started.
    pub fn start(bin: impl Into<PathBuf>) -> Agent {
        Agent::builder(bin).start()
    }

    /// The agent's temp directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A command for the binary, with the test's own `EDGE_OUTBOX_*` and
    /// `RUST_LOG` removed (they must not configure the agent) and the
    /// builder's environment set.
    pub(crate) fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        for (key, _) in std::env::vars() {
            if key.starts_with("EDGE_OUTBOX_") {
                cmd.env_remove(key);
            }
        }
        cmd.env_remove("RUST_LOG");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some((soft, hard)) = self.fd_limit {
            use rustix::process::{setrlimit, Resource, Rlimit};
            use std::os::unix::process::CommandExt;
            let limit = Rlimit {
                current: Some(soft),
                maximum: Some(hard),
            };
            // SAFETY: between fork and exec only setrlimit runs: one system
            // call, no allocation, no lock.
            unsafe {
                cmd.pre_exec(move || {
                    setrlimit(Resource::Nofile, limit).map_err(std::io::Error::from)
                });
            }
        }
        cmd
    }

    /// Sets (or replaces) an environment variable of the agent's processes
    /// from the next start on: for values that depend on the agent's own
    /// files, such as [`Agent::log_stream`].
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// `DEVICE:INODE` of the agent's log file (created if need be): what
    /// systemd puts in `JOURNAL_STREAM` when stderr is the journal's stream.
    pub fn log_stream(&self) -> String {
        use std::os::unix::fs::MetadataExt;
        let meta = self
            .log_file()
            .metadata()
            .expect("the agent log's metadata");
        format!("{}:{}", meta.dev(), meta.ino())
    }

    fn log_file(&self) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("opening the agent log")
    }

    /// Starts `edge-outbox run` and waits until its socket accepts.
    pub(crate) fn spawn_and_wait_ready(&mut self) {
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
