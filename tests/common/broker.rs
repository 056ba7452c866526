//! RabbitMQ for the tests: the shared broker and a second node tests may stop,
//! start and kill.
//!
//! - [`default_url`]: the shared broker on 127.0.0.1:5672 (the one
//!   `scripts/test-setup` starts). Never stop it: every test uses it. Give
//!   your queues and exchanges [`unique`] names so tests can run in parallel.
//! - [`lock_restartable`]: the restartable node `edge_outbox_test@localhost`
//!   on 127.0.0.1:5673, for tests that stop, start or kill a broker. Hold the
//!   returned [`NodeGuard`] for the whole test: it is an exclusive lock shared
//!   by every test process (nextest runs each test in its own process), so
//!   such tests run one at a time. Tests that only need that node up take
//!   [`share_restartable`] (a shared lock: they run together, never during a
//!   test that stops it).
//!
//! The restartable node is started once and then left running for later test
//! processes and runs (like the shared broker); its state lives in
//! [`NODE_DIR`]. Node operations block (they run `rabbitmqctl`): from an async
//! test call them inside `tokio::task::block_in_place` (multi-thread flavor)
//! or `spawn_blocking`. A test waiting for the exclusive guard holds its
//! nextest slot while it waits; a nextest test group with `max-threads = 1`
//! for such tests keeps the other slots busy.
//!
//! Timings measured on the 2-core test machine: a full boot 4-8 s (more while
//! cargo builds), `stop` (stop_app) ~1.4 s, `start` after `stop` ~2 s, `halt`
//! ~2.3 s, `kill9` ~20 ms; `start` after `halt` or `kill9` is a full boot.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::ops::Deref;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lapin::message::BasicGetMessage;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

/// Address of the shared broker.
pub const DEFAULT_ADDR: &str = "127.0.0.1:5672";
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
const SETUP_LOCK: &str = "/tmp/edge-outbox-test-setup.lock";

/// How long a test waits for another test's [`NodeGuard`] before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(600);
/// Deadline of one boot of the restartable node (port open and booted).
const BOOT_DEADLINE: Duration = Duration::from_secs(120);
/// Deadline of each broker call made by the async helpers below.
const AMQP_DEADLINE: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// The shared broker
// ---------------------------------------------------------------------------

/// AMQP URL of the shared broker on 127.0.0.1:5672, starting it with
/// `scripts/test-setup` when nothing answers there. Cached per process.
pub fn default_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let addr: SocketAddr = DEFAULT_ADDR.parse().expect("DEFAULT_ADDR parses");
        let url = format!("amqp://guest:guest@{addr}/%2f");
        if !port_answers(addr) {
            // Several test processes may get here at once: one runs the script.
            let _lock = FileLock::acquire(Path::new(SETUP_LOCK), true, LOCK_WAIT);
            if !port_answers(addr) {
                let root = Path::new(env!("CARGO_MANIFEST_DIR"));
                let mut cmd = Command::new("bash");
                cmd.arg(root.join("scripts/test-setup")).current_dir(root);
                if let Err(e) = run(&mut cmd, Duration::from_secs(600)) {
                    panic!("nothing answers on {addr} and scripts/test-setup failed: {e}");
                }
            }
        }
        // The AMQP port opens a little before the node has finished booting.
        if let Err(e) = wait_amqp(&url, Duration::from_secs(60)) {
            panic!("the shared broker on {addr} does not accept AMQP connections: {e}");
        }
        url
    })
    .clone()
}

// ---------------------------------------------------------------------------
// The restartable node
// ---------------------------------------------------------------------------

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
            "Node::{what} needs the exclusive guard: call broker::lock_restartable() first"
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
                    "# Written by tests/common/broker.rs\n",
                    "log.console = false\n",
                    "log.file.level = info\n",
                    "log.file.rotation.size = 10485760\n",
                    "log.file.rotation.count = 2\n",
                ),
            ),
            ("rabbitmq-env.conf", "# Written by tests/common/broker.rs\n"),
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

// ---------------------------------------------------------------------------
// Cross-process locks
// ---------------------------------------------------------------------------

/// A `flock` on a file; released when dropped, or by the kernel when the
/// process dies (so a crashed or killed test never leaves it held).
struct FileLock {
    file: File,
}

impl FileLock {
    fn acquire(path: &Path, exclusive: bool, deadline: Duration) -> FileLock {
        use rustix::fs::{flock, FlockOperation};
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
        {
            Ok(f) => f,
            Err(e) => panic!("cannot open lock file {}: {e}", path.display()),
        };
        let op = if exclusive {
            FlockOperation::NonBlockingLockExclusive
        } else {
            FlockOperation::NonBlockingLockShared
        };
        let start = Instant::now();
        loop {
            match flock(&file, op) {
                Ok(()) => return FileLock { file },
                Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {}
                Err(e) => panic!("flock {}: {e}", path.display()),
            }
            if start.elapsed() > deadline {
                let holder = fs::read_to_string(path).unwrap_or_default();
                panic!(
                    "waited {deadline:?} for the lock {} (last exclusive holder: {})",
                    path.display(),
                    holder.trim()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Records who holds an exclusive lock, for the timeout message above.
    fn note_holder(&self) {
        let test = std::thread::current().name().unwrap_or("?").to_owned();
        let exe = std::env::args().next().unwrap_or_default();
        let note = format!("pid {} ({exe}, test {test})\n", std::process::id());
        let mut file = &self.file;
        let _ = file.set_len(0);
        let _ = file.seek(SeekFrom::Start(0));
        let _ = file.write_all(note.as_bytes());
    }
}

// ---------------------------------------------------------------------------
// Processes, ports and readiness
// ---------------------------------------------------------------------------

/// Runs a command with its output in a temporary file (a daemon it leaves
/// behind cannot hold a pipe of ours open), in its own process group, and
/// kills it at the deadline. Ok when it exits 0.
fn run(cmd: &mut Command, deadline: Duration) -> Result<String, String> {
    let desc = format!("{cmd:?}");
    let mut out = tempfile::tempfile().map_err(|e| format!("{desc}: tempfile: {e}"))?;
    let (stdout, stderr) = match (out.try_clone(), out.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return Err(format!("{desc}: {e}")),
    };
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| format!("{desc}: spawn: {e}"))?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{desc}: no exit after {deadline:?}; output:\n{}",
                    read_all(&mut out)
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{desc}: wait: {e}")),
        }
    };
    let output = read_all(&mut out);
    if status.success() {
        Ok(output)
    } else {
        Err(format!("{desc}: {status}; output:\n{output}"))
    }
}

fn read_all(file: &mut File) -> String {
    let mut bytes = Vec::new();
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Whether a TCP connection to `addr` succeeds within 1 s.
pub fn port_answers(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// Polls [`amqp_check`] until it succeeds; Err with the last error after `deadline`.
fn wait_amqp(url: &str, deadline: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let err = match amqp_check(url, Duration::from_secs(5)) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if start.elapsed() > deadline {
            return Err(format!(
                "no AMQP connection to {url} within {deadline:?}: {err}"
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Opens an AMQP connection and a channel, then closes them; on a thread of
/// its own with its own runtime, so it may be called from sync or async code.
fn amqp_check(url: &str, timeout: Duration) -> Result<(), String> {
    let url = url.to_owned();
    on_own_runtime(move || async move {
        let attempt = async {
            let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
            let channel = conn.create_channel().await?;
            let _ = channel.close(200, "OK".into()).await;
            conn.close(200, "OK".into()).await
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    })
}

/// Runs a future to completion on a new thread with a new runtime.
fn on_own_runtime<F, Fut>(f: F) -> Result<(), String>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        rt.block_on(f())
    })
    .join()
    .unwrap_or_else(|_| Err("panicked".to_owned()))
}

// ---------------------------------------------------------------------------
// Names and AMQP helpers (async; each call has its own connection and a 15 s deadline)
// ---------------------------------------------------------------------------

/// A name no other test uses: `prefix-<uuid v7>`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// Connects to `url`; panics after 15 s or on error.
pub async fn connect(url: &str) -> Connection {
    let what = format!("connect to {url}");
    deadline(
        &what,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
}

async fn deadline<T>(what: &str, fut: impl std::future::Future<Output = lapin::Result<T>>) -> T {
    match tokio::time::timeout(AMQP_DEADLINE, fut).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what}: {e}"),
        Err(_) => panic!("{what}: no answer within {AMQP_DEADLINE:?}"),
    }
}

/// Runs `f` on a fresh connection and channel, then closes both.
async fn with_channel<T, F, Fut>(url: &str, what: &str, f: F) -> T
where
    F: FnOnce(Channel) -> Fut,
    Fut: std::future::Future<Output = lapin::Result<T>>,
{
    let conn = connect(url).await;
    let channel = deadline(&format!("{what}: open channel"), conn.create_channel()).await;
    let value = deadline(what, f(channel)).await;
    let _ = tokio::time::timeout(AMQP_DEADLINE, conn.close(200, "OK".into())).await;
    value
}

/// Declares a durable classic queue.
pub async fn declare_queue(url: &str, queue: &str) {
    let q = queue.to_owned();
    with_channel(url, &format!("declare queue {queue}"), |ch| async move {
        ch.queue_declare(
            q.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .map(drop)
    })
    .await
}

/// Declares a durable direct exchange and a durable queue bound to it with
/// `routing_key`.
pub async fn declare_exchange_with_queue(
    url: &str,
    exchange: &str,
    queue: &str,
    routing_key: &str,
) {
    declare_bound_queue(url, exchange, ExchangeKind::Direct, queue, routing_key).await
}

/// Number of ready messages in `queue` (passive declare; panics if it does not exist).
pub async fn queue_len(url: &str, queue: &str) -> u32 {
    let q = queue.to_owned();
    with_channel(url, &format!("queue_len {queue}"), |ch| async move {
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        ch.queue_declare(q.into(), options, FieldTable::default())
            .await
            .map(|q| q.message_count())
    })
    .await
}

/// Takes every message in `queue` (basic.get until empty, acking each), in order.
pub async fn get_all(url: &str, queue: &str) -> Vec<BasicGetMessage> {
    let q = queue.to_owned();
    with_channel(url, &format!("get_all {queue}"), |ch| async move {
        let mut messages = Vec::new();
        while let Some(msg) = ch
            .basic_get(q.clone().into(), BasicGetOptions::default())
            .await?
        {
            msg.delivery.acker.ack(BasicAckOptions::default()).await?;
            messages.push(msg);
        }
        Ok(messages)
    })
    .await
}

/// Publishes one persistent message and waits for the broker's confirm.
pub async fn publish(url: &str, exchange: &str, routing_key: &str, payload: &[u8]) {
    let (x, rk, body) = (
        exchange.to_owned(),
        routing_key.to_owned(),
        payload.to_vec(),
    );
    let what = format!("publish to {exchange:?} ({routing_key})");
    with_channel(url, &what, |ch| async move {
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        let confirm = ch
            .basic_publish(
                x.into(),
                rk.into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await?
            .await?;
        if confirm.is_ack() {
            Ok(())
        } else {
            panic!("publish: broker nacked: {confirm:?}");
        }
    })
    .await
}

/// Deletes `queue` (no error if it does not exist).
pub async fn delete_queue(url: &str, queue: &str) {
    let q = queue.to_owned();
    with_channel(url, &format!("delete queue {queue}"), |ch| async move {
        ch.queue_delete(q.into(), QueueDeleteOptions::default())
            .await
            .map(drop)
    })
    .await
}

/// Deletes `exchange` (no error if it does not exist).
pub async fn delete_exchange(url: &str, exchange: &str) {
    let x = exchange.to_owned();
    with_channel(
        url,
        &format!("delete exchange {exchange}"),
        |ch| async move {
            ch.exchange_delete(x.into(), ExchangeDeleteOptions::default())
                .await
        },
    )
    .await
}

/// Deletes the queues and exchanges it was given when dropped, best effort
/// (errors are ignored, nothing panics; runs on its own thread and runtime,
/// so it works at the end of sync and async tests alike, and while unwinding).
pub struct Cleanup {
    url: String,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Cleanup {
    /// Cleans up on the broker at `url` (use a direct URL, not a proxied one).
    pub fn new(url: &str) -> Cleanup {
        Cleanup {
            url: url.to_owned(),
            queues: Vec::new(),
            exchanges: Vec::new(),
        }
    }

    /// Registers a queue; returns its name.
    pub fn queue(&mut self, name: impl Into<String>) -> String {
        let name = name.into();
        self.queues.push(name.clone());
        name
    }

    /// Registers an exchange; returns its name.
    pub fn exchange(&mut self, name: impl Into<String>) -> String {
        let name = name.into();
        self.exchanges.push(name.clone());
        name
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.queues.is_empty() && self.exchanges.is_empty() {
            return;
        }
        let url = self.url.clone();
        let queues = std::mem::take(&mut self.queues);
        let exchanges = std::mem::take(&mut self.exchanges);
        let _ = on_own_runtime(move || async move {
            let work = async {
                let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
                for q in queues {
                    let ch = conn.create_channel().await?;
                    let _ = ch
                        .queue_delete(q.into(), QueueDeleteOptions::default())
                        .await;
                }
                for x in exchanges {
                    let ch = conn.create_channel().await?;
                    let _ = ch
                        .exchange_delete(x.into(), ExchangeDeleteOptions::default())
                        .await;
                }
                conn.close(200, "OK".into()).await
            };
            match tokio::time::timeout(Duration::from_secs(10), work).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timeout".to_owned()),
            }
        });
    }
}

/// A message as a test looks at it.
#[derive(Debug, Clone)]
pub struct Received {
    pub message_id: String,
    pub body: Vec<u8>,
    pub delivery_mode: Option<u8>,
    pub content_type: Option<String>,
    /// Header values rendered as text (`"7"`, `"true"`, `"s"`).
    pub headers: std::collections::BTreeMap<String, String>,
    pub timestamp: Option<u64>,
}

/// Takes every message from `queue` (acking each), in queue order.
pub async fn received(url: &str, queue: &str) -> Vec<Received> {
    use lapin::types::AMQPValue;
    get_all(url, queue)
        .await
        .into_iter()
        .map(|m| {
            let p = &m.delivery.properties;
            let headers = p
                .headers()
                .as_ref()
                .map(|t| {
                    t.inner()
                        .iter()
                        .map(|(k, v)| {
                            let text = match v {
                                AMQPValue::LongString(s) => s.to_string(),
                                AMQPValue::Boolean(b) => b.to_string(),
                                AMQPValue::LongLongInt(i) => i.to_string(),
                                AMQPValue::LongInt(i) => i.to_string(),
                                AMQPValue::Double(d) => d.to_string(),
                                other => format!("{other:?}"),
                            };
                            (k.as_str().to_string(), text)
                        })
                        .collect()
                })
                .unwrap_or_default();
            Received {
                message_id: p
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_string())
                    .unwrap_or_default(),
                body: m.delivery.data.clone(),
                delivery_mode: *p.delivery_mode(),
                content_type: p.content_type().as_ref().map(|s| s.as_str().to_string()),
                headers,
                timestamp: *p.timestamp(),
            }
        })
        .collect()
}

/// Deletes a test's exchange and queue.
pub async fn delete(url: &str, exchange: &str, queue: &str) {
    delete_queue(url, queue).await;
    delete_exchange(url, exchange).await;
}

/// The shared broker's address (for a proxy in front of it).
pub fn default_addr() -> SocketAddr {
    default_url();
    DEFAULT_ADDR.parse().expect("DEFAULT_ADDR")
}

// ---------------------------------------------------------------------------
// Consumer tests: message ids, bulk publishing, queue arguments, unacked counts
// ---------------------------------------------------------------------------

/// Publishes one persistent message, with `message_id` when given, and waits
/// for the broker's confirm.
pub async fn publish_with_id(
    url: &str,
    exchange: &str,
    routing_key: &str,
    payload: &[u8],
    message_id: Option<&str>,
) {
    let messages = vec![(message_id.map(str::to_owned), payload.to_vec())];
    publish_many(url, exchange, routing_key, &messages).await;
}

/// Publishes persistent messages (`(message_id, body)`, in order) on one
/// channel with pipelined confirms (at most 256 outstanding); returns once
/// every one is confirmed. Panics on a nack. 15 s deadline per confirm.
pub async fn publish_many(
    url: &str,
    exchange: &str,
    routing_key: &str,
    messages: &[(Option<String>, Vec<u8>)],
) {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    const WINDOW: usize = 256;
    let conn = connect(url).await;
    let ch = deadline("publish_many: open channel", conn.create_channel()).await;
    deadline(
        "publish_many: confirm_select",
        ch.confirm_select(ConfirmSelectOptions::default()),
    )
    .await;
    let mut confirms = FuturesUnordered::new();
    for (id, body) in messages {
        if confirms.len() >= WINDOW {
            let next = async { confirms.next().await.expect("an outstanding confirm") };
            let confirm: lapin::Confirmation = deadline("publish_many: confirm", next).await;
            assert!(confirm.is_ack(), "publish_many: broker nacked: {confirm:?}");
        }
        let mut properties = BasicProperties::default().with_delivery_mode(2);
        if let Some(id) = id {
            properties = properties.with_message_id(id.as_str().into());
        }
        let confirm = deadline(
            "publish_many: publish",
            ch.basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties,
            ),
        )
        .await;
        confirms.push(confirm);
    }
    while let Some(confirm) = tokio::time::timeout(AMQP_DEADLINE, confirms.next())
        .await
        .expect("publish_many: no confirm within the deadline")
    {
        let confirm = confirm.unwrap_or_else(|e| panic!("publish_many: confirm: {e}"));
        assert!(confirm.is_ack(), "publish_many: broker nacked: {confirm:?}");
    }
    let _ = tokio::time::timeout(AMQP_DEADLINE, conn.close(200, "OK".into())).await;
}

/// Declares a durable exchange of `kind` and a durable classic queue bound to
/// it with `routing_key` (e.g. a queue collecting a dead-letter fanout).
pub async fn declare_bound_queue(
    url: &str,
    exchange: &str,
    kind: ExchangeKind,
    queue: &str,
    routing_key: &str,
) {
    let (x, q, rk) = (
        exchange.to_owned(),
        queue.to_owned(),
        routing_key.to_owned(),
    );
    let what = format!("declare {kind:?} exchange {exchange} -> queue {queue} ({routing_key})");
    with_channel(url, &what, |ch| async move {
        ch.exchange_declare(
            x.clone().into(),
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(
            q.clone().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            q.into(),
            x.into(),
            rk.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    })
    .await
}

/// Declares a durable queue with `arguments` (e.g. `x-max-length`).
pub async fn declare_queue_with_args(url: &str, queue: &str, arguments: FieldTable) {
    let q = queue.to_owned();
    with_channel(url, &format!("declare queue {queue}"), |ch| async move {
        ch.queue_declare(q.into(), QueueDeclareOptions::durable(), arguments)
            .await
            .map(drop)
    })
    .await
}

/// `(messages_ready, messages_unacknowledged)` of `queue` on the shared
/// broker, from `rabbitmqctl list_queues`; `None` when there is no such
/// queue. Blocks about 1 s.
pub fn queue_counts(queue: &str) -> Option<(u64, u64)> {
    let info = queue_info(queue, &["messages_ready", "messages_unacknowledged"])?;
    Some((
        info[0].parse().expect("messages_ready"),
        info[1].parse().expect("messages_unacknowledged"),
    ))
}

/// The `items` (`type`, `arguments`, `consumers`, ...) of `queue` on the
/// shared broker, from `rabbitmqctl list_queues` (the Debian wrapper; needs
/// root, else `sudo -n`); `None` when there is no such queue. Blocks about 1 s.
pub fn queue_info(queue: &str, items: &[&str]) -> Option<Vec<String>> {
    use std::os::unix::fs::MetadataExt;
    let root = fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    let mut cmd = if root {
        Command::new("rabbitmqctl")
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", "rabbitmqctl"]);
        c
    };
    cmd.args(["-q", "list_queues", "--no-table-headers", "name"])
        .args(items);
    let out = run(&mut cmd, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("rabbitmqctl list_queues: {e}"));
    out.lines().find_map(|line| {
        let mut fields = line.split('\t');
        (fields.next() == Some(queue)).then(|| fields.map(|f| f.trim().to_owned()).collect())
    })
}
