//! The shared RabbitMQ broker every test and benchmark uses, on
//! 127.0.0.1:5672 (the one `scripts/test-setup` installs and starts).
//!
//! - [`default_url`]: its AMQP URL, starting it when nothing answers there.
//!   Never stop it: every test uses it. Give your queues and exchanges
//!   [`crate::amqp::unique`] names so tests can run in parallel.
//! - [`queue_counts`], [`queue_info`]: what `rabbitmqctl list_queues` says
//!   about a queue (unacked counts and queue types are not in AMQP).
//!
//! Tests that stop, start or kill a broker use the restartable node instead
//! ([`crate::node`]).

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};

use crate::lock::{FileLock, LOCK_WAIT};
use crate::process::run;
use crate::wait::on_own_runtime;

/// Address of the shared broker.
pub const DEFAULT_ADDR: &str = "127.0.0.1:5672";

/// Held while one test process runs `scripts/test-setup` for all of them.
const SETUP_LOCK: &str = "/tmp/edge-outbox-test-setup.lock";

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
                // The repository root: the kit lives in `testkit/`.
                let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
                let mut cmd = Command::new("bash");
                cmd.arg(root.join("scripts/test-setup")).current_dir(&root);
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

/// The shared broker's address (for a proxy in front of it).
pub fn default_addr() -> SocketAddr {
    default_url();
    DEFAULT_ADDR.parse().expect("DEFAULT_ADDR")
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

/// Whether a TCP connection to `addr` succeeds within 1 s.
pub fn port_answers(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// Polls [`amqp_check`] until it succeeds; Err with the last error after `deadline`.
pub(crate) fn wait_amqp(url: &str, deadline: Duration) -> Result<(), String> {
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
pub(crate) fn amqp_check(url: &str, timeout: Duration) -> Result<(), String> {
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
