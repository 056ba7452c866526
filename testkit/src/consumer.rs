//! Fixtures of the consumer tests (docs/consuming.md): waiting for the
//! agent's consumer and for its queue to settle, and the files and processes
//! an `exec` handler script leaves behind.
//!
//! A handler script reports to the test through files in a temp directory
//! (one line per run: [`lines`]); paths go into the script as single-quoted
//! shell words ([`sh_path`]). Handlers that hang write their pid so a
//! [`Reaper`] can kill what an agent killed with -9 left running.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::agent::Agent;
use crate::broker;
use crate::wait::wait_until;

/// How long any single wait of these fixtures may take on the noisy test machine.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// Waits until the agent's log says its consumer consumes `queue`.
pub fn wait_consuming(agent: &Agent, queue: &str) {
    wait_until("the consumer to consume", DEADLINE, || {
        agent
            .log_text()
            .lines()
            .any(|l| l.contains("consuming") && l.contains(queue))
    });
}

/// Waits until `queue` (on the shared broker) holds nothing: no ready and
/// no unacked message.
pub fn wait_queue_settled(queue: &str) {
    wait_until(&format!("{queue}: 0 ready, 0 unacked"), DEADLINE, || {
        broker::queue_counts(queue) == Some((0, 0))
    });
}

/// Lines of `path`; none when it does not exist yet.
pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A single-quoted shell word for `path` (temp paths hold no quotes).
pub fn sh_path(path: &Path) -> String {
    let s = path.to_str().expect("a UTF-8 path");
    assert!(!s.contains('\''), "{s}");
    format!("'{s}'")
}

/// SIGKILLs, when dropped, the handler processes whose pids a test's
/// handler wrote to a file (they outlive an agent killed with -9), after
/// checking that each pid still runs `sleep`.
pub struct Reaper(pub PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in lines(&self.0) {
            let Ok(pid) = pid.trim().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.starts_with(b"sleep") {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}
