//! [`NotifySocket`]: a systemd notification socket (`NOTIFY_SOCKET`) owned
//! by the test, collecting what the agent announces: `READY=1`,
//! `WATCHDOG=1`, `STOPPING=1` (docs/operations.md, systemd).

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// Datagrams the agent sends to a test-owned NOTIFY_SOCKET.
pub struct NotifySocket {
    socket: UnixDatagram,
    /// Pass it to the agent as `NOTIFY_SOCKET`.
    pub path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Default for NotifySocket {
    fn default() -> NotifySocket {
        NotifySocket::new()
    }
}

impl NotifySocket {
    /// Binds a new socket in a temp dir of its own.
    pub fn new() -> NotifySocket {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        NotifySocket {
            socket,
            path,
            _dir: dir,
        }
    }

    /// Messages received within `window`.
    pub fn collect(&self, window: Duration) -> Vec<(Duration, String)> {
        let start = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while start.elapsed() < window {
            if let Ok(n) = self.socket.recv(&mut buf) {
                got.push((
                    start.elapsed(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ));
            }
        }
        got
    }
}
