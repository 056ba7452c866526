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
//!
//! Socket activation ([`AgentBuilder::socket_activated`],
//! [`AgentBuilder::through_systemd_socket_activate`]): the socket is passed
//! to the agent, which is then ready when its log says `edge-outbox ready`
//! (a connect succeeds before that: the kernel queues it).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::client::Client;
use crate::config::AgentBuilder;
use crate::wait::wait_until;

/// How long an agent gets to start listening.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// `systemd-socket-activate`, from the Debian package `systemd`.
pub const SYSTEMD_SOCKET_ACTIVATE: &str = "/usr/bin/systemd-socket-activate";

/// Who listens on the agent's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Activation {
    /// The agent binds it.
    None,
    /// The kit holds it and passes it at each start ([`AgentBuilder::socket_activated`]).
    Held,
    /// `systemd-socket-activate` binds and passes it ([`AgentBuilder::through_systemd_socket_activate`]).
    Tool,
}

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
    pub(crate) activation: Activation,
    /// The listening socket the kit holds for [`Activation::Held`].
    pub(crate) held: Option<UnixListener>,
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
        self.command_for(self.bin.as_os_str())
    }

    /// [`Agent::command`] with another program (a launcher of the binary).
    fn command_for(&self, program: &std::ffi::OsStr) -> Command {
        let mut cmd = Command::new(program);
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

    /// `edge-outbox run` as the builder's activation launches it.
    fn run_command(&self) -> Command {
        let mut cmd = match self.activation {
            Activation::None => self.command(),
            Activation::Held => {
                let mut cmd = self.command_for("sh".as_ref());
                // `$$` is the shell's pid, which `exec` hands to the agent.
                cmd.arg("-c")
                    .arg(r#"export LISTEN_PID=$$ LISTEN_FDS=1; exec "$0" "$@""#)
                    .arg(&self.bin);
                let held = self.held.as_ref().expect("the held socket");
                pass_as_fd3(&mut cmd, held.as_raw_fd());
                cmd
            }
            Activation::Tool => {
                let mut cmd = self.command_for(SYSTEMD_SOCKET_ACTIVATE.as_ref());
                cmd.arg("-l").arg(&self.socket);
                for (k, v) in &self.env {
                    cmd.arg(format!("-E{k}={v}"));
                }
                cmd.arg(&self.bin);
                cmd
            }
        };
        cmd.arg("run").arg("-c").arg(&self.config);
        cmd
    }

    /// Starts `edge-outbox run` and waits until it is ready: its socket
    /// accepts or, with socket activation, its log says so.
    pub(crate) fn spawn_and_wait_ready(&mut self) {
        assert!(self.child.is_none(), "the agent is already running");
        let log = self.log_file();
        let log_start = self.log_text().len();
        let mut marker = log.try_clone().expect("log fd");
        let _ = writeln!(marker, "----- harness: starting the agent -----");
        let child = self
            .run_command()
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawning edge-outbox run");
        self.child = Some(child);
        let start = Instant::now();
        let mut poked = false;
        loop {
            if let Some(status) = self.try_wait() {
                panic!(
                    "the agent exited during start-up ({status}); its log:\n{}",
                    self.log_text()
                );
            }
            let ready = match self.activation {
                Activation::None => UnixStream::connect(&self.socket).is_ok(),
                Activation::Held | Activation::Tool => {
                    // systemd-socket-activate execs the agent on the first
                    // connection: make one.
                    if self.activation == Activation::Tool && !poked {
                        poked = UnixStream::connect(&self.socket).is_ok();
                    }
                    self.log_text()
                        .get(log_start..)
                        .is_some_and(|new| new.contains("edge-outbox ready"))
                }
            };
            if ready {
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

/// Makes `fd` the child's descriptor 3, inherited across `exec`, as the
/// service manager passes a listening socket (`SD_LISTEN_FDS_START`).
fn pass_as_fd3(cmd: &mut Command, fd: std::os::fd::RawFd) {
    use std::mem::ManuallyDrop;
    use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec only dup2 and fcntl run: system calls,
    // no allocation, no lock. `fd` stays open in the parent (the Agent holds
    // the listener) until the child has exec'd. Descriptor 3 of the child
    // is never closed here (ManuallyDrop): it is what the agent inherits.
    unsafe {
        cmd.pre_exec(move || {
            let mut target = ManuallyDrop::new(OwnedFd::from_raw_fd(3));
            if fd != 3 {
                rustix::io::dup2(BorrowedFd::borrow_raw(fd), &mut target)?;
            }
            rustix::io::fcntl_setfd(&*target, rustix::io::FdFlags::empty())?;
            Ok(())
        });
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = all[start..].join("\n");
    out.push('\n');
    out
}
