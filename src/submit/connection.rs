//! Connection: serving one client of the submit socket.
//!
//! Role: admit the client (it comes with a connection slot; its peer
//! credentials are checked against `submit.allowed_uids` /
//! `submit.allowed_gids`), read
//! its request lines, hand each submit to the store at once, and write the
//! answers back in request order.
//!
//! Owns the two tasks of a connection: the *reader* (this task) parses lines
//! and queues a [`PendingAnswer`] per request; the *writer* resolves them in
//! order and writes them, flushing whenever the queue runs dry.
//!
//! Invariants:
//! - `ok` is written only after the store reported the row committed; the
//!   answers leave in the order the requests came.
//! - The queue holds at most [`PIPELINE_DEPTH`] answers: a client that never
//!   reads stops being read. A client that sends no line, or reads no
//!   answer, for `submit.idle_timeout` is dropped.
//! - A refused admission answers once and closes; a refused request leaves
//!   the connection usable.
//! - On shutdown the reader takes no further line: the lines it had taken
//!   are answered, then one `shutting_down` stands for everything the
//!   client sent after them, and the write side is shut
//!   (docs/protocol.md, Connection-level behaviour). The answers owed get
//!   [`STOP_WRITE`] in all; the connection then waits at most
//!   [`STOP_LINGER`] for the client to hang up (discarding what it still
//!   sends, so it reads its answers and an end of file rather than a
//!   reset) and is closed. A stop never waits for a client to go quiet.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::lines::{Line, LineReader};
use super::parse::{new_message, parse_request};
use super::Shared;
use crate::config::SubmitConfig;
use crate::protocol::{Accepted, Answer, ErrorCode, Refusal, Request, StatusAnswer, SubmitAnswer};
use crate::stop::StopTally;
use crate::store::{PendingInsert, StoreError};

/// Answers queued per connection before the reader waits for the writer.
const PIPELINE_DEPTH: usize = 4096;
/// After shutdown, how long a connection has to write the answers it owes.
const STOP_WRITE: Duration = Duration::from_secs(1);
/// After its last answer on shutdown, how long a connection waits for the
/// client to hang up before it is closed.
const STOP_LINGER: Duration = Duration::from_millis(250);

impl From<&StoreError> for Refusal {
    fn from(e: &StoreError) -> Self {
        let code = match e {
            StoreError::BufferFull { .. } => ErrorCode::BufferFull,
            StoreError::StorageFull(_) => ErrorCode::StorageFull,
            StoreError::Closed => ErrorCode::ShuttingDown,
            _ => ErrorCode::StorageError,
        };
        Refusal::new(code, e.to_string())
    }
}

impl Shared {
    /// The answer line for a submit, counted in the metrics.
    pub(super) fn answer(&self, answer: &SubmitAnswer) -> Vec<u8> {
        match answer {
            Answer::Ok(accepted) if accepted.duplicate => {
                self.metrics.submits_duplicate.inc();
            }
            Answer::Ok(_) => {
                self.metrics.submits_accepted.inc();
            }
            Answer::Refused(refusal) => self.metrics.refused(refusal.code.as_str()),
        };
        answer.to_line()
    }
}

/// An answer not yet written: a refusal, or waiting for its group commit.
enum PendingAnswer {
    Refused(Refusal),
    Stored { id: String, insert: PendingInsert },
    Status,
}

/// Serves one accepted connection to its end. `permit` is its connection
/// slot (a client without one is answered by the accept loop).
pub(super) async fn serve(
    stream: UnixStream,
    permit: OwnedSemaphorePermit,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    stop: Arc<StopTally>,
) {
    let refusal = admission(&stream, &shared.config);
    let (read_half, write_half) = stream.into_split();
    let (answers, queued) = mpsc::channel(PIPELINE_DEPTH);
    let idle = shared.config.idle_timeout;
    let writer = tokio::spawn(write_answers(
        write_half,
        queued,
        shared.clone(),
        idle,
        shutdown.clone(),
    ));
    let stopped = match refusal {
        Some(refusal) => {
            let _ = answers.send(PendingAnswer::Refused(refusal)).await;
            None
        }
        None => {
            let mut lines = LineReader::new(read_half, shared.max_line);
            match read_requests(&mut lines, &answers, &shared, &shutdown).await {
                ReadEnd::Stop => Some(lines),
                ReadEnd::Client => None,
            }
        }
    };
    drop(answers);
    let _ = writer.await;
    if let Some(mut lines) = stopped {
        linger(&mut lines).await;
        stop.connection_answered();
    }
    drop(permit);
}

/// Waits (at most [`STOP_LINGER`]) for the client to hang up after its last
/// answer, discarding what it still sends.
async fn linger(lines: &mut LineReader<OwnedReadHalf>) {
    let _ = tokio::time::timeout(STOP_LINGER, async {
        while let Ok(Line::Complete(_) | Line::TooLong(_)) = lines.next_line().await {}
    })
    .await;
}

/// Why the client may not be served, if it may not.
fn admission(stream: &UnixStream, config: &SubmitConfig) -> Option<Refusal> {
    match stream.peer_cred() {
        Ok(cred) if !authorized(config, cred.uid(), cred.gid()) => {
            tracing::warn!(
                uid = cred.uid(),
                gid = cred.gid(),
                "refused a client by its credentials"
            );
            Some(Refusal::new(
                ErrorCode::Unauthorized,
                format!(
                    "uid {} / gid {} is not in submit.allowed_uids or submit.allowed_gids",
                    cred.uid(),
                    cred.gid()
                ),
            ))
        }
        Ok(_) => None,
        Err(e) => Some(Refusal::new(
            ErrorCode::Unauthorized,
            format!("cannot read the peer's credentials: {e}"),
        )),
    }
}

fn authorized(config: &SubmitConfig, uid: u32, gid: u32) -> bool {
    (config.allowed_uids.is_empty() && config.allowed_gids.is_empty())
        || config.allowed_uids.contains(&uid)
        || config.allowed_gids.contains(&gid)
}

/// Why [`read_requests`] returned.
enum ReadEnd {
    /// The client hung up, went idle, or the connection failed.
    Client,
    /// The agent is stopping: the `shutting_down` answer is queued.
    Stop,
}

async fn read_requests(
    lines: &mut LineReader<OwnedReadHalf>,
    answers: &mpsc::Sender<PendingAnswer>,
    shared: &Shared,
    shutdown: &CancellationToken,
) -> ReadEnd {
    loop {
        let read = tokio::select! {
            // Shutdown first: once it has begun, no further line is taken,
            // never one stored by the luck of a random branch order.
            biased;
            _ = shutdown.cancelled() => {
                let refusal = Refusal::new(ErrorCode::ShuttingDown, "the agent is shutting down");
                let _ = answers.send(PendingAnswer::Refused(refusal)).await;
                return ReadEnd::Stop;
            }
            read = tokio::time::timeout(shared.config.idle_timeout, lines.next_line()) => read,
        };
        let pending = match read {
            Err(_) | Ok(Ok(Line::Eof)) | Ok(Err(_)) => return ReadEnd::Client,
            Ok(Ok(Line::TooLong(len))) => PendingAnswer::Refused(Refusal::new(
                ErrorCode::TooLarge,
                format!(
                    "the request line is over {} bytes (at least {len}); \
                     the limit follows submit.max_message_size",
                    shared.max_line
                ),
            )),
            Ok(Ok(Line::Complete(line))) => handle(&line, shared).await,
        };
        if answers.send(pending).await.is_err() {
            return ReadEnd::Client;
        }
    }
}

/// One request line: refused, or a status request, or handed to the store.
async fn handle(line: &[u8], shared: &Shared) -> PendingAnswer {
    let max_body = shared.config.max_message_size.as_u64();
    let message = match parse_request(line) {
        Err(refusal) => return PendingAnswer::Refused(refusal),
        Ok(Request::Status) => return PendingAnswer::Status,
        Ok(Request::Submit(submit)) => match new_message(submit, max_body) {
            Err(refusal) => return PendingAnswer::Refused(refusal),
            Ok(message) => message,
        },
    };
    let id = message.id.clone();
    match shared.store.enqueue_insert(message).await {
        Ok(insert) => PendingAnswer::Stored { id, insert },
        Err(e) => PendingAnswer::Refused(Refusal::from(&e)),
    }
}

/// Resolves answers in request order and writes them, flushing whenever no
/// further answer is queued, then shuts the write side. A client that stops
/// reading for `idle` is dropped; once the stop has begun, what is still
/// owed gets [`STOP_WRITE`] in all.
async fn write_answers(
    write_half: OwnedWriteHalf,
    queued: mpsc::Receiver<PendingAnswer>,
    shared: Arc<Shared>,
    idle: Duration,
    shutdown: CancellationToken,
) {
    let stop_deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(STOP_WRITE).await;
    };
    tokio::select! {
        () = write_all_answers(write_half, queued, &shared, idle) => {}
        () = stop_deadline => {
            tracing::debug!("answers still owed {STOP_WRITE:?} after the stop began; closing the connection");
        }
    }
}

async fn write_all_answers(
    write_half: OwnedWriteHalf,
    mut queued: mpsc::Receiver<PendingAnswer>,
    shared: &Arc<Shared>,
    idle: Duration,
) {
    let mut out = BufWriter::with_capacity(64 * 1024, write_half);
    loop {
        let next = match queued.try_recv() {
            Ok(next) => next,
            Err(mpsc::error::TryRecvError::Empty) => {
                if !matches!(tokio::time::timeout(idle, out.flush()).await, Ok(Ok(()))) {
                    return;
                }
                match queued.recv().await {
                    Some(next) => next,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        let line = match next {
            PendingAnswer::Refused(refusal) => shared.answer(&Answer::Refused(refusal)),
            PendingAnswer::Stored { id, insert } => {
                let answer = match insert.await {
                    Ok(inserted) => Answer::Ok(Accepted {
                        id,
                        duplicate: inserted.duplicate,
                        made_room: inserted.made_room,
                    }),
                    Err(e) => {
                        tracing::debug!(message_id = %id, error = %e, "submit refused");
                        Answer::Refused(Refusal::from(&e))
                    }
                };
                shared.answer(&answer)
            }
            PendingAnswer::Status => status_line(shared).await,
        };
        if !matches!(
            tokio::time::timeout(idle, out.write_all(&line)).await,
            Ok(Ok(()))
        ) {
            return;
        }
    }
    let _ = tokio::time::timeout(idle, async {
        let _ = out.flush().await;
        let _ = out.shutdown().await;
    })
    .await;
}

/// The answer to a status request; the report is read off the runtime's
/// worker threads (it queries the database).
async fn status_line(shared: &Arc<Shared>) -> Vec<u8> {
    let source = shared.status.clone();
    let report = tokio::task::spawn_blocking(move || source())
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    match report {
        Ok(report) => StatusAnswer::Ok(report).to_line(),
        Err(e) => StatusAnswer::Refused(Refusal::new(ErrorCode::StorageError, e)).to_line(),
    }
}
