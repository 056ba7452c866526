//! Submit: the Unix-socket front door (docs/protocol.md).
//!
//! Role: accept local programs' connections, read one JSON request per line,
//! store each message through the [`Store`], answer one JSON line per request
//! in request order. The request and answer types are [`crate::protocol`];
//! this component is the server side of them.
//!
//! Owns: the socket file (created on start, a stale one from a crashed run
//! replaced, a live agent on the same path detected; removed on exit) or,
//! under socket activation, the listening socket systemd passed (used as
//! it is, never unlinked), the accept loop, the per-connection tasks, the
//! connection limit.
//!
//! Layout:
//! - `mod.rs`: the socket file, the accept loop, shutdown;
//! - `activation.rs`: the listening socket passed by systemd (`LISTEN_FDS`);
//! - `connection.rs`: serving one connection: admission by peer
//!   credentials, the reader and writer tasks, idle timeouts;
//! - `parse.rs`: a request line → a typed request → a `NewMessage`, or a
//!   refusal that names the fault;
//! - `lines.rs`: the bounded, cancel-safe line reader.
//!
//! Pipelining and ordering: a connection's *reader* parses lines and hands
//! each submit to the store at once (so a pipelining client's requests join
//! the same group commit), queueing the pending answer; its *writer* awaits
//! the queued answers in order and writes them. The queue is bounded, so a
//! client that never reads stops being read.
//!
//! Invariants:
//! - `ok` is written only after the store reported the row committed.
//! - A refusal stores nothing; a `bad_request` or `too_large` leaves the
//!   connection usable; only `unauthorized` and the connection limit close it.
//! - Nothing a client sends can crash the agent or cost another client
//!   anything: lines are bounded (`submit.max_message_size` sets the limit),
//!   idle and non-reading clients are dropped after `submit.idle_timeout`,
//!   connections beyond `submit.max_connections` are answered `buffer_full`
//!   and closed by the accept loop itself (one descriptor, for one write).
//! - No client waits unanswered for a descriptor: when `accept` fails with
//!   `EMFILE`/`ENFILE` the loop closes a spare descriptor it keeps for that,
//!   accepts the client, answers `buffer_full` and closes it, then takes
//!   the spare back. `submit.max_connections` is clamped at start so that
//!   this stays the exception (crate::fd_limit; docs/operations.md, File
//!   descriptors). Other transient accept failures pause the loop instead
//!   of ending it.
//! - On shutdown the listener closes and the socket file goes first (a
//!   passed socket stays: the service manager keeps it listening); each
//!   connection answers the lines it had taken, then one `shutting_down`,
//!   and is closed (`connection.rs`); the server returns when every
//!   connection has ended, about 1 s at most.

mod activation;
mod connection;
mod lines;
mod parse;
pub(crate) use parse::breaks_submit_rules;

use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::SubmitConfig;
use crate::metrics::Metrics;
use crate::protocol::{Answer, ErrorCode, Refusal};
use crate::status::StatusReport;
use crate::stop::StopTally;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SubmitError {
    #[error("another edge-outbox agent is already listening on {0}")]
    AlreadyRunning(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("accepting connections on {path}: {source}")]
    Accept { path: PathBuf, source: io::Error },
    #[error("socket activation: {0}")]
    Activation(String),
}

/// Produces the report for `{"op":"status"}`; given by the wiring, so this
/// component needs to know nothing of the forwarder.
pub(crate) type StatusSource = Arc<dyn Fn() -> Result<StatusReport, String> + Send + Sync>;

/// A bound socket, not yet serving. Binding first lets the caller report
/// readiness (and fail early) before the server runs.
pub(crate) struct SubmitSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Passed by systemd: not ours to unlink.
    activated: bool,
}

impl SubmitSocket {
    /// The socket systemd passed (socket activation), else a socket file
    /// the agent creates: a stale one is replaced; a live agent answering
    /// on it, or a path that is something else, is refused.
    pub(crate) fn bind(config: &SubmitConfig) -> Result<SubmitSocket, SubmitError> {
        if let Some((listener, path)) = activation::passed_listener(&config.socket)? {
            let listener =
                UnixListener::from_std(listener).map_err(|source| SubmitError::Bind {
                    path: path.clone(),
                    source,
                })?;
            return Ok(SubmitSocket {
                listener,
                path,
                activated: true,
            });
        }
        let path = config.socket.clone();
        let bind_error = |source| SubmitError::Bind {
            path: path.clone(),
            source,
        };
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_socket() => {
                match std::os::unix::net::UnixStream::connect(&path) {
                    Ok(_) => return Err(SubmitError::AlreadyRunning(path)),
                    Err(_) => {
                        tracing::info!(socket = %path.display(), "replacing a stale socket file");
                        std::fs::remove_file(&path).map_err(bind_error)?;
                    }
                }
            }
            Ok(_) => return Err(SubmitError::NotASocket(path)),
            Err(_) => {}
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(bind_error)?;
        }
        let listener = UnixListener::bind(&path).map_err(bind_error)?;
        std::fs::set_permissions(
            &path,
            std::fs::Permissions::from_mode(config.socket_mode.bits()),
        )
        .map_err(bind_error)?;
        Ok(SubmitSocket {
            listener,
            path,
            activated: false,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The socket was passed by systemd (socket activation).
    pub(crate) fn activated(&self) -> bool {
        self.activated
    }
}

/// The submit server: a bound socket and what its connections need.
pub(crate) struct SubmitServer {
    socket: SubmitSocket,
    shared: Arc<Shared>,
    /// Where the stop's connections are counted.
    stop: Arc<StopTally>,
}

/// What every connection of the server reads.
struct Shared {
    config: SubmitConfig,
    store: Store,
    status: StatusSource,
    metrics: Arc<Metrics>,
    /// Longest request line, computed once from `submit.max_message_size`.
    max_line: usize,
}

impl SubmitServer {
    pub(crate) fn new(
        socket: SubmitSocket,
        config: SubmitConfig,
        store: Store,
        status: StatusSource,
        metrics: Arc<Metrics>,
    ) -> Self {
        let max_line = config.max_line_length();
        SubmitServer {
            socket,
            shared: Arc::new(Shared {
                config,
                store,
                status,
                metrics,
                max_line,
            }),
            stop: StopTally::new(),
        }
    }

    /// Counts the connections answered on shutdown in `tally`.
    pub(crate) fn noting_stop_in(mut self, tally: Arc<StopTally>) -> Self {
        self.stop = tally;
        self
    }

    /// Serves until `shutdown`, then removes the socket file and waits for
    /// the connections to answer what they read.
    pub(crate) async fn run(self, shutdown: CancellationToken) -> Result<(), SubmitError> {
        let SubmitServer {
            socket,
            shared,
            stop,
        } = self;
        let slots = Arc::new(Semaphore::new(shared.config.max_connections.get()));
        let connections = TaskTracker::new();
        let mut spare = Spare::open();
        let mut starved = Starved::default();
        let result = loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                accepted = socket.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => match slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let shared = shared.clone();
                        let shutdown = shutdown.clone();
                        let stop = stop.clone();
                        connections
                            .spawn(connection::serve(stream, permit, shared, shutdown, stop));
                    }
                    Err(_) => refuse_now(stream, &shared, too_many_connections(&shared.config)),
                },
                // No descriptor for the next client: free the spare, take
                // the client with it, answer and close it, take the spare
                // back. The client learns why; it never waits in the backlog.
                Err(e) if is_out_of_descriptors(&e) => {
                    let answered = match spare.release() {
                        true => match socket.listener.accept().now_or_never() {
                            Some(Ok((stream, _))) => {
                                refuse_now(stream, &shared, out_of_descriptors());
                                true
                            }
                            _ => false,
                        },
                        false => false,
                    };
                    spare = Spare::open();
                    starved.note(&e, answered);
                    if !answered {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                // Out of memory and the like: the agent lives on.
                Err(e) if is_transient_accept_error(&e) => {
                    tracing::warn!(error = %e, "accept failed, pausing briefly");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(source) => {
                    break Err(SubmitError::Accept {
                        path: socket.path.clone(),
                        source,
                    })
                }
            }
        };
        drop(socket.listener);
        // A passed socket stays: the service manager still listens on it,
        // and the next agent's clients are queueing there.
        if !socket.activated {
            let _ = std::fs::remove_file(&socket.path);
        }
        connections.close();
        connections.wait().await;
        result
    }
}

/// The answer to a client beyond `submit.max_connections`.
fn too_many_connections(config: &SubmitConfig) -> Refusal {
    Refusal::new(
        ErrorCode::BufferFull,
        format!(
            "too many connections (submit.max_connections = {})",
            config.max_connections
        ),
    )
}

/// The answer to a client accepted with the spare descriptor.
fn out_of_descriptors() -> Refusal {
    Refusal::new(
        ErrorCode::BufferFull,
        "too many connections: the agent is out of file descriptors",
    )
}

/// Answers a client that gets no connection slot and closes it, here in
/// the accept loop: it holds its descriptor only for one write, so refused
/// clients never use descriptors beyond the reserve (crate::fd_limit). The
/// request is not read (docs/decisions/0004-connection-limit-answer.md).
fn refuse_now(stream: tokio::net::UnixStream, shared: &Shared, refusal: Refusal) {
    let line = shared.answer(&Answer::Refused(refusal));
    // A new connection's send buffer is empty: a line this short fits, so
    // a non-blocking write either takes it whole or the client is gone.
    if let Ok(stream) = stream.into_std() {
        let _ = (&stream).write(&line);
    }
}

/// One descriptor held open (on `/dev/null`) for the moment the process has
/// none left: closing it lets the accept loop take one client to answer.
struct Spare(Option<std::fs::File>);

impl Spare {
    fn open() -> Spare {
        Spare(std::fs::File::open("/dev/null").ok())
    }

    /// Closes the spare; `false` when there was none to close.
    fn release(&mut self) -> bool {
        self.0.take().is_some()
    }
}

/// Running out of descriptors, reported at most once per [`STARVED_REPORT`]
/// with how many clients were answered `buffer_full` for it meanwhile.
#[derive(Default)]
struct Starved {
    last_report: Option<Instant>,
    answered: u64,
}

const STARVED_REPORT: Duration = Duration::from_secs(10);

impl Starved {
    fn note(&mut self, error: &io::Error, answered: bool) {
        self.answered += u64::from(answered);
        if self
            .last_report
            .is_some_and(|at| at.elapsed() < STARVED_REPORT)
        {
            return;
        }
        tracing::warn!(
            error = %error,
            refused = self.answered,
            "out of file descriptors: clients are answered buffer_full and closed \
             (submit.max_connections is clamped to the limit at start; something else holds descriptors)"
        );
        self.last_report = Some(Instant::now());
        self.answered = 0;
    }
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_codes::EMFILE | libc_codes::ENFILE)
    )
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_codes::ENOBUFS | libc_codes::ENOMEM)
    ) || matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
    )
}

/// Linux errno values, spelled out to spare a `libc` dependency.
mod libc_codes {
    pub(super) const EMFILE: i32 = 24;
    pub(super) const ENFILE: i32 = 23;
    pub(super) const ENOBUFS: i32 = 105;
    pub(super) const ENOMEM: i32 = 12;
}
