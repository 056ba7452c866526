//! Activation: the listening socket systemd passes (socket activation,
//! docs/operations.md, Socket activation).
//!
//! Role: when the service manager started the agent with `LISTEN_FDS=1`
//! and `LISTEN_PID` naming this process (`edge-outbox.socket`, or
//! `systemd-socket-activate`), take descriptor 3 as the submit listener
//! instead of binding one. The socket outlives the agent in the service
//! manager, so connections made while the agent restarts wait in the
//! kernel's queue.
//!
//! Invariants:
//! - The descriptor is taken at most once per process, and only after it
//!   was checked to be a listening Unix stream socket bound to the path
//!   `submit.socket` names; anything else is a start-up failure that says
//!   which, never a socket served by mistake.
//! - It is close-on-exec from here on (`sd_notify::listen_fds`), so `exec`
//!   handlers do not inherit it; the variables may stay: `LISTEN_PID`
//!   names this process, not theirs.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::net::sockopt;

use super::SubmitError;

/// Whether this process took its passed descriptor already.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The listener systemd passed, with the path it is bound to; `None` when
/// the agent was not socket-activated.
pub(super) fn passed_listener(
    configured: &Path,
) -> Result<Option<(UnixListener, PathBuf)>, SubmitError> {
    let refuse = |why: String| SubmitError::Activation(why);
    let mut fds = sd_notify::listen_fds().map_err(|e| refuse(format!("LISTEN_FDS: {e}")))?;
    let fd = match (fds.len(), fds.next()) {
        (0, _) | (_, None) => return Ok(None),
        (1, Some(fd)) => fd,
        (n, Some(_)) => {
            return Err(refuse(format!(
                "{n} descriptors passed (LISTEN_FDS={n}); the agent takes one, the submit socket"
            )))
        }
    };
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(refuse("the passed socket was taken already".into()));
    }
    // SAFETY: the service manager passed descriptor `fd` to this very
    // process (LISTEN_PID is ours), nothing else in the process owns it,
    // and TAKEN makes this the one place that takes ownership of it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    match sockopt::socket_type(&owned) {
        Ok(rustix::net::SocketType::STREAM) => {}
        Ok(other) => {
            return Err(refuse(format!(
                "descriptor {fd} is not a stream socket ({other:?})"
            )))
        }
        Err(e) => return Err(refuse(format!("descriptor {fd} is not a socket: {e}"))),
    }
    if !sockopt::socket_acceptconn(&owned).unwrap_or(false) {
        return Err(refuse(format!("descriptor {fd} is not a listening socket")));
    }
    let listener = UnixListener::from(owned);
    let address = listener
        .local_addr()
        .map_err(|e| refuse(format!("descriptor {fd} is not a Unix socket: {e}")))?;
    let path = address
        .as_pathname()
        .ok_or_else(|| refuse(format!("descriptor {fd} has no path (abstract or unnamed)")))?
        .to_path_buf();
    if !same_socket(&path, configured) {
        return Err(refuse(format!(
            "the passed socket is {} but submit.socket is {}; make them the same \
             (ListenStream= in edge-outbox.socket)",
            path.display(),
            configured.display()
        )));
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| refuse(format!("descriptor {fd}: {e}")))?;
    Ok(Some((listener, path)))
}

/// The same path, or two paths to the same socket file.
fn same_socket(a: &Path, b: &Path) -> bool {
    if a == b {
        return true;
    }
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}
