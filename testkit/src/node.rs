//! The restartable RabbitMQ node, for tests that stop, start or kill a broker.
//!
//! [`lock_restartable`] takes the node `edge_outbox_test@localhost` on
//! 127.0.0.1:5673 for one test. Hold the returned [`NodeGuard`] for the whole
//! test: it is an exclusive lock shared by every test process (nextest runs
//! each test in its own process), so such tests run one at a time. Tests that
//! only need that node up take [`share_restartable`] (a shared lock: they run
//! together, never during a test that stops it). `.config/nextest.toml` puts
//! these tests in a test group of their own, so a test waiting for the lock
//! does not hold a slot the other tests could use.
//!
//! The node is started once and then left running for later test processes
//! and runs (like the shared broker); its state lives in [`NODE_DIR`]. Node
//! operations block (they run `rabbitmqctl`): from an async test call them
//! inside `tokio::task::block_in_place` (multi-thread flavor) or
//! `spawn_blocking`.
//!
//! Timings measured on the 2-core test machine: a full boot 4-8 s (more while
//! cargo builds), `stop` (stop_app) ~1.4 s, `start` after `stop` ~2 s, `halt`
//! ~2.3 s, `kill9` ~20 ms; `start` after `halt` or `kill9` is a full boot.

use std::fs;
use std::net::SocketAddr;
use std::ops::Deref;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::broker::{amqp_check, port_answers, wait_amqp};
use crate::lock::{FileLock, LOCK_WAIT};
use crate::process::run;

/// Erlang node name of the restartable node.
pub const NODE_NAME: &str = "edge_outbox_test@localhost";
/// AMQP port of the restartable node (127.0.0.1 only).
pub const NODE_PORT: u16 = 5673;
/// Erlang distribution port of the restartable node.
pub const NODE_DIST_PORT: u16 = 25673;
/// Config, cookie, Mnesia data, logs and lock files of the restartable node.
pub const NODE_DIR: &str = "/tmp/edge-outbox-test-node";

const RABBITMQ_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const RABBITMQCTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// Deadline of one boot of the restartable node (port open and booted).
const BOOT_DEADLINE: Duration = Duration::from_secs(120);

/// Exclusive [`NodeGuard`]s currently held in this process.
static EXCLUSIVE_HELD: AtomicUsize = AtomicUsize::new(0);

/// The restartable node, checked to be up once per process (waiting for any
/// test that holds it stopped). Use a guard instead when the test needs the
/// node to stay up ([`share_restartable`]) or stops it ([`lock_restartable`]).
pub fn restartable() -> &'static Node {
    static ENSURED: AtomicBool = AtomicBool::new(false);
    let node = node();
    // A test of this process holding the exclusive guard controls the node:
    // taking the shared lock here would deadlock on it.
    if !ENSURED.load(Ordering::SeqCst) && EXCLUSIVE_HELD.load(Ordering::SeqCst) == 0 {
        let _shared = FileLock::acquire(&node.dir.join("use.lock"), false, LOCK_WAIT);
        node.ensure_up();
        ENSURED.store(true, Ordering::SeqCst);
    }
    node
}

/// Takes the restartable node for this test alone (a cross-process exclusive
/// lock, waiting up to 10 minutes for other tests) and makes sure it is up.
/// Hold the guard until the end of the test; [`Node::stop`], [`Node::halt`]
/// and [`Node::kill9`] need it. A node left stopped is started again by the
/// next test that takes a guard.
pub fn lock_restartable() -> NodeGuard {
    let node = node();
    let lock = FileLock::acquire(&node.dir.join("use.lock"), true, LOCK_WAIT);
    lock.note_holder();
    EXCLUSIVE_HELD.fetch_add(1, Ordering::SeqCst);
    let guard = NodeGuard {
        node,
        exclusive: true,
        _lock: lock,
    };
    node.ensure_up();
    guard
}

/// Takes a shared lock on the restartable node: many tests may hold one at
/// once, but no test stops the node while they do. The node is up on return.
pub fn share_restartable() -> NodeGuard {
    let node = node();
    let lock = FileLock::acquire(&node.dir.join("use.lock"), false, LOCK_WAIT);
    node.ensure_up();
    NodeGuard {
        node,
        exclusive: false,
        _lock: lock,
    }
}

fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    NODE.get_or_init(|| {
        let dir = PathBuf::from(NODE_DIR);
        if let Err(e) = fs::create_dir_all(&dir) {
            panic!("cannot create {}: {e}", dir.display());
        }
        Node {
            name: NODE_NAME.to_owned(),
            addr: SocketAddr::from(([127, 0, 0, 1], NODE_PORT)),
            dist_port: NODE_DIST_PORT,
            dir,
        }
    })
}

/// Holds the restartable node (see [`lock_restartable`], [`share_restartable`]);
/// dereferences to the [`Node`]. Dropping it releases the lock.
pub struct NodeGuard {
    node: &'static Node,
    exclusive: bool,
    _lock: FileLock,
}

impl Deref for NodeGuard {
    type Target = Node;
    fn deref(&self) -> &Node {
        self.node
    }
}

impl Drop for NodeGuard {
    fn drop(&mut self) {
        if self.exclusive {
            EXCLUSIVE_HELD.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A RabbitMQ node run from `rabbitmq-server -detached` with its own
/// environment (name, ports, Mnesia and log directories, Erlang cookie in its
/// own HOME) by the current user.
#[derive(Debug)]
pub struct Node {
    name: String,
    addr: SocketAddr,
    dist_port: u16,
    dir: PathBuf,
}

impl Node {
    /// AMQP URL (guest/guest, vhost `/`).
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// AMQP address, 127.0.0.1:5673.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Erlang node name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the node accepts an AMQP connection and opens a channel within 5 s.
    pub fn is_up(&self) -> bool {
        port_answers(self.addr) && amqp_check(&self.url(), Duration::from_secs(5)).is_ok()
    }

    /// OS pids of the node's Erlang VM (`beam.smp`; zombies left by a kill are
    /// not counted). Empty when the VM is not running.
    pub fn os_pids(&self) -> Vec<u32> {
        vm_pids(&self.home())
    }

    /// Graceful stop of the broker application (`rabbitmqctl stop_app`):
    /// clients get connection.close (320 CONNECTION_FORCED), new connections
    /// are refused; the Erlang VM keeps running, so [`Node::start`] is quick.
    /// A no-op when the VM is not running. Needs an exclusive [`NodeGuard`].
    pub fn stop(&self) {
        self.assert_exclusive("stop");
        let _boot = self.boot_lock();
        if self.os_pids().is_empty() {
            return; // halted or killed: already stopped
        }
        let t = Instant::now();
        if let Err(e) = self.ctl(&["stop_app"], Duration::from_secs(60)) {
            panic!("restartable node: stop_app failed: {e}");
        }
        self.wait_port_closed("stop_app", Duration::from_secs(30));
        eprintln!("restartable node: stopped (stop_app) in {:?}", t.elapsed());
    }

    /// Graceful stop of the whole node (`rabbitmqctl stop`): as [`Node::stop`],
    /// and the Erlang VM exits too; [`Node::start`] is then a full boot.
    /// A no-op when the VM is not running. Needs an exclusive [`NodeGuard`].
    pub fn halt(&self) {
        self.assert_exclusive("halt");
        let _boot = self.boot_lock();
        if self.os_pids().is_empty() {
            return; // already halted or killed
        }
        let t = Instant::now();
        if let Err(e) = self.ctl(&["stop"], Duration::from_secs(60)) {
            panic!("restartable node: rabbitmqctl stop failed: {e}");
        }
        self.wait_vm_gone("rabbitmqctl stop", Duration::from_secs(60));
        eprintln!("restartable node: halted in {:?}", t.elapsed());
    }

    /// Kills the node's Erlang VM with SIGKILL (no goodbye to clients: their
    /// sockets are reset by the kernel) and waits until it is gone. Bring it
    /// back with [`Node::start`]. Needs an exclusive [`NodeGuard`].
    pub fn kill9(&self) {
        self.assert_exclusive("kill9");
        let _boot = self.boot_lock();
        let t = Instant::now();
        let pids = self.os_pids();
        if pids.is_empty() {
            panic!("restartable node: kill9 but its VM is not running");
        }
        kill9_pids(&pids);
        self.wait_vm_gone("kill -9", Duration::from_secs(30));
        eprintln!("restartable node: killed {pids:?} in {:?}", t.elapsed());
    }

    /// Raises (or clears) a memory alarm: the broker blocks publishing
    /// connections (`connection.blocked`) until it is cleared.
    /// Needs an exclusive [`NodeGuard`].
    pub fn memory_alarm(&self, on: bool) {
        self.assert_exclusive("memory_alarm");
        let watermark = if on { "0.000001" } else { "0.4" };
        if let Err(e) = self.ctl(
            &["set_vm_memory_high_watermark", watermark],
            Duration::from_secs(60),
        ) {
            panic!("restartable node: set_vm_memory_high_watermark {watermark}: {e}");
        }
    }

    /// Starts the node (after [`Node::stop`], [`Node::halt`] or [`Node::kill9`])
    /// and waits until it has booted and accepts AMQP connections. Panics
    /// after about two minutes.
    pub fn start(&self) {
        let _boot = self.boot_lock();
        self.start_locked();
    }

    fn ensure_up(&self) {
        let _boot = self.boot_lock();
        if !self.is_up() {
            self.start_locked();
        }
    }

    fn start_locked(&self) {
        let t = Instant::now();
        if !self.os_pids().is_empty() {
            // The VM runs: the application was stopped (or is still booting).
            let res = self
                .ctl(&["start_app"], BOOT_DEADLINE)
                .and_then(|_| wait_amqp(&self.url(), Duration::from_secs(30)));
            match res {
                Ok(()) => {
                    eprintln!("restartable node: started (start_app) in {:?}", t.elapsed());
                    return;
                }
                Err(e) => {
                    eprintln!("restartable node: start_app failed ({e}); booting it afresh");
                    self.kill_vm();
                }
            }
        }
        if let Err(first) = self.boot() {
            // A boot can fail on data left broken by a kill; start from empty.
            eprintln!("restartable node: boot failed ({first}); wiping its data and retrying");
            self.kill_vm();
            let _ = fs::remove_dir_all(self.dir.join("mnesia"));
            if let Err(e) = self.boot() {
                self.kill_vm();
                panic!(
                    "restartable node {} did not start: {e}\n--- node log (tail) ---\n{}",
                    self.name,
                    self.log_tail()
                );
            }
        }
        eprintln!("restartable node: booted in {:?}", t.elapsed());
    }

    /// Full boot with `rabbitmq-server -detached`.
    fn boot(&self) -> Result<(), String> {
        self.write_files()?;
        let start = Instant::now();
        let mut cmd = Command::new(RABBITMQ_SERVER);
        cmd.arg("-detached");
        self.set_env(&mut cmd);
        run(&mut cmd, Duration::from_secs(30))?;
        while !port_answers(self.addr) {
            if start.elapsed() > BOOT_DEADLINE {
                return Err(format!(
                    "port {} not open after {BOOT_DEADLINE:?}",
                    self.addr
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // The port opens before the boot has finished.
        self.ctl(&["await_startup", "--timeout", "120"], BOOT_DEADLINE)?;
        let left = BOOT_DEADLINE.saturating_sub(start.elapsed());
        wait_amqp(&self.url(), left.max(Duration::from_secs(10)))
    }

    fn kill_vm(&self) {
        let pids = self.os_pids();
        if !pids.is_empty() {
            kill9_pids(&pids);
            self.wait_vm_gone("kill -9", Duration::from_secs(30));
        }
    }

    fn wait_port_closed(&self, after: &str, deadline: Duration) {
        let start = Instant::now();
        while port_answers(self.addr) {
            if start.elapsed() > deadline {
                panic!(
                    "restartable node: {} still open {deadline:?} after {after}",
                    self.addr
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_vm_gone(&self, after: &str, deadline: Duration) {
        let start = Instant::now();
        loop {
            let pids = self.os_pids();
            if pids.is_empty() && !port_answers(self.addr) {
                return;
            }
            if start.elapsed() > deadline {
                panic!("restartable node: VM {pids:?} still running {deadline:?} after {after}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn assert_exclusive(&self, what: &str) {
        assert!(
            EXCLUSIVE_HELD.load(Ordering::SeqCst) > 0,
            "Node::{what} needs the exclusive guard: call node::lock_restartable() first"
        );
    }

    /// Serializes boots and stops between processes (short-held).
    fn boot_lock(&self) -> FileLock {
        FileLock::acquire(&self.dir.join("boot.lock"), true, LOCK_WAIT)
    }

    fn ctl(&self, args: &[&str], deadline: Duration) -> Result<(), String> {
        let mut cmd = Command::new(RABBITMQCTL);
        cmd.arg("-n").arg(&self.name).args(args);
        self.set_env(&mut cmd);
        run(&mut cmd, deadline).map(drop)
    }

    fn home(&self) -> PathBuf {
        self.dir.join("home")
    }

    fn set_env(&self, cmd: &mut Command) {
        let d = &self.dir;
        cmd.current_dir(d)
            .env("HOME", self.home())
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", self.addr.ip().to_string())
            .env("RABBITMQ_NODE_PORT", self.addr.port().to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"));
    }

    fn write_files(&self) -> Result<(), String> {
        let d = &self.dir;
        for sub in ["home", "mnesia", "log"] {
            fs::create_dir_all(d.join(sub)).map_err(|e| format!("create {sub}: {e}"))?;
        }
        let cookie = self.home().join(".erlang.cookie");
        if !cookie.exists() {
            let value = uuid::Uuid::now_v7().simple().to_string().to_uppercase();
            fs::write(&cookie, value).map_err(|e| format!("write cookie: {e}"))?;
        }
        // Erlang refuses a cookie file that others can read.
        fs::set_permissions(&cookie, fs::Permissions::from_mode(0o400))
            .map_err(|e| format!("chmod cookie: {e}"))?;
        let files: [(&str, &str); 3] = [
            ("enabled_plugins", "[].\n"),
            (
                "rabbitmq.conf",
                concat!(
                    "# Written by testkit/src/node.rs\n",
                    "log.console = false\n",
                    "log.file.level = info\n",
                    "log.file.rotation.size = 10485760\n",
                    "log.file.rotation.count = 2\n",
                ),
            ),
            ("rabbitmq-env.conf", "# Written by testkit/src/node.rs\n"),
        ];
        for (name, content) in files {
            let path = d.join(name);
            if fs::read_to_string(&path).ok().as_deref() != Some(content) {
                fs::write(&path, content).map_err(|e| format!("write {name}: {e}"))?;
            }
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let path = self.dir.join("log").join(format!("{}.log", self.name));
        let text = fs::read_to_string(&path).unwrap_or_else(|e| format!("({e})"));
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// Beam processes started with `-home <home>` (the node's own HOME, which the
/// `erl` launcher passes on the command line), zombies excluded.
fn vm_pids(home: &Path) -> Vec<u32> {
    let marker = format!("\0-home\0{}\0", home.display());
    let mut pids = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return pids;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let proc_dir = entry.path();
        let Ok(comm) = fs::read_to_string(proc_dir.join("comm")) else {
            continue;
        };
        if comm.trim_end() != "beam.smp" {
            continue;
        }
        let Ok(stat) = fs::read_to_string(proc_dir.join("stat")) else {
            continue;
        };
        let state = stat
            .rsplit(')')
            .next()
            .and_then(|s| s.trim_start().chars().next());
        if matches!(state, Some('Z' | 'X') | None) {
            continue;
        }
        let Ok(cmdline) = fs::read(proc_dir.join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&marker) {
            pids.push(pid);
        }
    }
    pids
}

fn kill9_pids(pids: &[u32]) {
    for pid in pids {
        let mut cmd = Command::new("kill");
        cmd.arg("-9").arg(pid.to_string());
        if let Err(e) = run(&mut cmd, Duration::from_secs(10)) {
            eprintln!("kill -9 {pid}: {e}");
        }
    }
}
