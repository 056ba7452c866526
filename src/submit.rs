//! Submit: the Unix-socket front door (`../shared/SPEC.md`, "Submit protocol").
//!
//! Role: accept local programs' connections, read one JSON request per line,
//! store each message through the [`Store`], answer one JSON line per request
//! in request order.
//!
//! Owns: the socket file (created on start, a stale one from a crashed run
//! replaced, a live agent on the same path detected; removed on exit), the
//! per-connection tasks, the connection limit.
//!
//! Shape of a connection: a *reader* loop parses lines and hands each
//! request to the store at once (so a pipelining client's requests join the
//! same group commit), queueing the pending answer; a *writer* task resolves
//! the queued answers in order and writes them. The queue is bounded, so a
//! client that never reads stops being read.
//!
//! Invariants:
//! - `ok` is written only after the store reported the row committed.
//! - A refusal stores nothing; a `bad_request` or `too_large` leaves the
//!   connection usable; only `unauthorized` and the connection limit close it.
//! - Nothing a client sends can crash the agent or cost another client
//!   anything: lines are bounded, idle and non-reading clients are dropped
//!   after `submit.idle_timeout`, connections beyond `max_connections` are
//!   refused.
//! - On shutdown the listener closes and the socket file goes first; lines
//!   already read are answered, later ones get `shutting_down`.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::SubmitConfig;
use crate::metrics::Metrics;
use crate::store::{Inserted, NewMessage, PendingInsert, Store, StoreError};

/// AMQP short strings (exchange, routing key, message id) hold 255 bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Answers queued per connection before the reader waits for the writer.
const PIPELINE_DEPTH: usize = 4096;
/// After shutdown, how long a connection keeps answering `shutting_down`
/// while its client stays quiet, before it is closed.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

pub const CONTENT_TYPE_JSON: &str = "application/json";
pub const CONTENT_TYPE_TEXT: &str = "text/plain; charset=utf-8";
pub const CONTENT_TYPE_BYTES: &str = "application/octet-stream";

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("another edge-outbox agent is already listening on {0}")]
    AlreadyRunning(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("accepting connections on {path}: {source}")]
    Accept { path: PathBuf, source: io::Error },
}

/// The error codes of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    TooLarge,
    BufferFull,
    StorageFull,
    StorageError,
    Unauthorized,
    ShuttingDown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::BufferFull => "buffer_full",
            ErrorCode::StorageFull => "storage_full",
            ErrorCode::StorageError => "storage_error",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::ShuttingDown => "shutting_down",
        }
    }
}

/// A refused request: its code and a reason for a human.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Refusal::new(ErrorCode::BadRequest, message)
    }
}

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

/// One answer line.
#[derive(Debug, Serialize)]
struct Answer<'a> {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorCode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

fn answer_line(result: &Result<(String, Inserted), Refusal>) -> Vec<u8> {
    let answer = match result {
        Ok((id, inserted)) => Answer {
            ok: true,
            id: Some(id),
            duplicate: inserted.duplicate,
            error: None,
            message: None,
        },
        Err(refusal) => Answer {
            ok: false,
            id: None,
            duplicate: false,
            error: Some(refusal.code),
            message: Some(&refusal.message),
        },
    };
    let mut line = serde_json::to_vec(&answer).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    line
}

/// A parsed request.
#[derive(Debug)]
pub enum Request {
    Submit(NewMessage),
    Status,
}

/// Parses and validates one request line. `max_body` is the decoded-body limit.
pub fn parse_request(line: &[u8], max_body: u64) -> Result<Request, Refusal> {
    let value: Value = serde_json::from_slice(line)
        .map_err(|e| Refusal::bad(format!("not a JSON object: {e}")))?;
    let Value::Object(mut fields) = value else {
        return Err(Refusal::bad("a request is a JSON object"));
    };
    let op = match fields.remove("op") {
        None => "submit".to_string(),
        Some(Value::String(op)) => op,
        Some(_) => return Err(Refusal::bad("\"op\" must be a string")),
    };
    match op.as_str() {
        "submit" => parse_submit(fields, max_body).map(Request::Submit),
        "status" => Ok(Request::Status),
        other => Err(Refusal::bad(format!(
            "unknown op {other:?} (expected \"submit\" or \"status\")"
        ))),
    }
}

fn short_string(fields: &mut Map<String, Value>, key: &str) -> Result<Option<String>, Refusal> {
    match fields.remove(key) {
        None => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_NAME_LEN => Ok(Some(s)),
        Some(Value::String(s)) => Err(Refusal::bad(format!(
            "\"{key}\" is {} bytes, at most {MAX_NAME_LEN} are allowed",
            s.len()
        ))),
        Some(_) => Err(Refusal::bad(format!("\"{key}\" must be a string"))),
    }
}

fn parse_submit(mut fields: Map<String, Value>, max_body: u64) -> Result<NewMessage, Refusal> {
    let exchange = short_string(&mut fields, "exchange")?
        .ok_or_else(|| Refusal::bad("\"exchange\" is required (\"\" is the default exchange)"))?;
    let routing_key = short_string(&mut fields, "routing_key")?
        .ok_or_else(|| Refusal::bad("\"routing_key\" is required (it may be \"\")"))?;
    let id = match short_string(&mut fields, "id")? {
        Some(id) if id.is_empty() => return Err(Refusal::bad("\"id\" must not be empty")),
        Some(id) => id,
        None => uuid::Uuid::now_v7().to_string(),
    };
    let content_type = short_string(&mut fields, "content_type")?;
    let headers = match fields.remove("headers") {
        None | Some(Value::Null) => None,
        Some(Value::Object(h)) => {
            for (name, value) in &h {
                if name.len() > MAX_NAME_LEN {
                    return Err(Refusal::bad(format!(
                        "header name {:?}... is longer than {MAX_NAME_LEN} bytes",
                        name.chars().take(32).collect::<String>()
                    )));
                }
                if !matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
                    return Err(Refusal::bad(format!(
                        "header {name:?} must be a string, number or boolean"
                    )));
                }
            }
            Some(Value::Object(h).to_string())
        }
        Some(_) => return Err(Refusal::bad("\"headers\" must be an object")),
    };
    let payload = fields.remove("payload");
    let payload_base64 = fields.remove("payload_base64");
    if let Some(unknown) = fields.keys().next() {
        return Err(Refusal::bad(format!("unknown field {unknown:?}")));
    }
    let too_large = |size: u64| {
        Refusal::new(
            ErrorCode::TooLarge,
            format!("the message is {size} bytes, submit.max_message_size is {max_body}"),
        )
    };
    let (body, default_type) = match (payload, payload_base64) {
        (Some(_), Some(_)) => {
            return Err(Refusal::bad(
                "give either \"payload\" or \"payload_base64\", not both",
            ))
        }
        (None, None) => {
            return Err(Refusal::bad(
                "\"payload\" (any JSON value) or \"payload_base64\" is required",
            ))
        }
        (Some(Value::String(text)), None) => (text.into_bytes(), CONTENT_TYPE_TEXT),
        (Some(value), None) => (value.to_string().into_bytes(), CONTENT_TYPE_JSON),
        (None, Some(Value::String(encoded))) => {
            // Refuse before decoding: 4 base64 characters carry 3 bytes.
            let decoded_at_least = (encoded.trim_end_matches('=').len() as u64 * 3) / 4;
            if decoded_at_least > max_body {
                return Err(too_large(decoded_at_least));
            }
            let bytes = base64_engine()
                .decode(encoded.as_bytes())
                .map_err(|e| Refusal::bad(format!("\"payload_base64\" is not base64: {e}")))?;
            (bytes, CONTENT_TYPE_BYTES)
        }
        (None, Some(_)) => return Err(Refusal::bad("\"payload_base64\" must be a string")),
    };
    if body.len() as u64 > max_body {
        return Err(too_large(body.len() as u64));
    }
    Ok(NewMessage {
        id,
        body,
        exchange,
        routing_key,
        headers,
        content_type: content_type.unwrap_or_else(|| default_type.to_string()),
    })
}

/// Standard alphabet, padding optional.
pub fn base64_engine() -> base64::engine::GeneralPurpose {
    base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    )
}

/// Produces the status object for `{"op":"status"}`; given by the wiring.
pub type StatusSource = Arc<dyn Fn() -> Result<Value, String> + Send + Sync>;

/// A bound socket, not yet serving. Binding first lets the caller report
/// readiness (and fail early) before the server runs.
pub struct SubmitSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl SubmitSocket {
    /// Creates the socket file: replaces a stale one, refuses when a live
    /// agent answers on it or when the path is something else.
    pub fn bind(config: &SubmitConfig) -> Result<SubmitSocket, SubmitError> {
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
        Ok(SubmitSocket { listener, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The submit server: a bound socket and what its connections need.
pub struct SubmitServer {
    socket: SubmitSocket,
    shared: Arc<Shared>,
}

struct Shared {
    config: SubmitConfig,
    store: Store,
    status: StatusSource,
    metrics: Arc<Metrics>,
    max_line: usize,
}

impl Shared {
    /// The answer line for a result, counted in the metrics.
    fn answer(&self, result: &Result<(String, Inserted), Refusal>) -> Vec<u8> {
        match result {
            Ok((_, inserted)) if inserted.duplicate => {
                self.metrics.submits_duplicate.inc();
            }
            Ok(_) => {
                self.metrics.submits_accepted.inc();
            }
            Err(refusal) => self.metrics.refused(refusal.code.as_str()),
        };
        answer_line(result)
    }
}

impl SubmitServer {
    pub fn new(
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
        }
    }

    /// Serves until `shutdown`, then removes the socket file and waits for
    /// the connections to answer what they read.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), SubmitError> {
        let SubmitServer { socket, shared } = self;
        let slots = Arc::new(Semaphore::new(shared.config.max_connections.get()));
        let connections = TaskTracker::new();
        let result = loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                accepted = socket.listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, _)) => {
                    let permit = slots.clone().try_acquire_owned().ok();
                    let shared = shared.clone();
                    let shutdown = shutdown.clone();
                    connections.spawn(serve(stream, permit, shared, shutdown));
                }
                // Out of file descriptors and the like: the agent lives on.
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
        let _ = std::fs::remove_file(&socket.path);
        connections.close();
        connections.wait().await;
        result
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_codes::EMFILE | libc_codes::ENFILE | libc_codes::ENOBUFS | libc_codes::ENOMEM)
    ) || matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
    )
}

mod libc_codes {
    pub const EMFILE: i32 = 24;
    pub const ENFILE: i32 = 23;
    pub const ENOBUFS: i32 = 105;
    pub const ENOMEM: i32 = 12;
}

/// An answer not yet written: a refusal, or waiting for its group commit.
enum PendingAnswer {
    Refused(Refusal),
    Stored { id: String, insert: PendingInsert },
    Status,
}

async fn serve(
    stream: UnixStream,
    permit: Option<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let refusal = match (&permit, stream.peer_cred()) {
        (None, _) => Some(Refusal::new(
            ErrorCode::BufferFull,
            format!(
                "too many connections (submit.max_connections = {})",
                shared.config.max_connections
            ),
        )),
        (Some(_), Ok(cred)) if !authorized(&shared.config, cred.uid(), cred.gid()) => {
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
        (Some(_), Err(e)) => Some(Refusal::new(
            ErrorCode::Unauthorized,
            format!("cannot read the peer's credentials: {e}"),
        )),
        _ => None,
    };
    let (read_half, write_half) = stream.into_split();
    let (answers, queued) = mpsc::channel(PIPELINE_DEPTH);
    let idle = shared.config.idle_timeout;
    let writer = tokio::spawn(write_answers(write_half, queued, shared.clone(), idle));
    match refusal {
        Some(refusal) => {
            let _ = answers.send(PendingAnswer::Refused(refusal)).await;
        }
        None => read_requests(read_half, &answers, &shared, &shutdown).await,
    }
    drop(answers);
    let _ = writer.await;
    drop(permit);
}

fn authorized(config: &SubmitConfig, uid: u32, gid: u32) -> bool {
    (config.allowed_uids.is_empty() && config.allowed_gids.is_empty())
        || config.allowed_uids.contains(&uid)
        || config.allowed_gids.contains(&gid)
}

async fn read_requests(
    read_half: OwnedReadHalf,
    answers: &mpsc::Sender<PendingAnswer>,
    shared: &Shared,
    shutdown: &CancellationToken,
) {
    let mut lines = LineReader::new(read_half, shared.max_line);
    let max_body = shared.config.max_message_size.as_u64();
    let mut draining = false;
    loop {
        let wait = if draining {
            DRAIN_GRACE
        } else {
            shared.config.idle_timeout
        };
        let read = tokio::select! {
            // Shutdown first: once it has begun (the socket file is gone), a
            // line that arrives is refused, never stored by the luck of a
            // random branch order.
            biased;
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                continue;
            }
            read = tokio::time::timeout(wait, lines.next_line()) => read,
        };
        let pending = match read {
            Err(_) | Ok(Ok(Line::Eof)) | Ok(Err(_)) => return,
            Ok(Ok(Line::TooLong(len))) => PendingAnswer::Refused(Refusal::new(
                ErrorCode::TooLarge,
                format!(
                    "the request line is over {} bytes (at least {len}); \
                     the limit follows submit.max_message_size",
                    shared.max_line
                ),
            )),
            Ok(Ok(Line::Complete(_))) if draining => PendingAnswer::Refused(Refusal::new(
                ErrorCode::ShuttingDown,
                "the agent is shutting down",
            )),
            Ok(Ok(Line::Complete(line))) => match parse_request(&line, max_body) {
                Err(refusal) => PendingAnswer::Refused(refusal),
                Ok(Request::Status) => PendingAnswer::Status,
                Ok(Request::Submit(message)) => {
                    let id = message.id.clone();
                    match shared.store.enqueue_insert(message).await {
                        Ok(insert) => PendingAnswer::Stored { id, insert },
                        Err(e) => PendingAnswer::Refused(Refusal::from(&e)),
                    }
                }
            },
        };
        if answers.send(pending).await.is_err() {
            return;
        }
    }
}

/// Resolves answers in request order and writes them, flushing whenever no
/// further answer is queued. A client that stops reading for `idle` is dropped.
async fn write_answers(
    write_half: OwnedWriteHalf,
    mut queued: mpsc::Receiver<PendingAnswer>,
    shared: Arc<Shared>,
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
            PendingAnswer::Refused(refusal) => shared.answer(&Err(refusal)),
            PendingAnswer::Stored { id, insert } => {
                let result = insert.await;
                if let Err(e) = &result {
                    tracing::debug!(message_id = %id, error = %e, "submit refused");
                }
                shared.answer(
                    &result
                        .map(|inserted| (id, inserted))
                        .map_err(|e| Refusal::from(&e)),
                )
            }
            PendingAnswer::Status => status_line(&shared).await,
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

async fn status_line(shared: &Arc<Shared>) -> Vec<u8> {
    let source = shared.status.clone();
    let value = tokio::task::spawn_blocking(move || source())
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    let mut line = match value {
        Ok(mut report) => {
            if let Value::Object(map) = &mut report {
                map.insert("ok".into(), Value::Bool(true));
            }
            serde_json::to_vec(&report).unwrap_or_default()
        }
        Err(e) => answer_line(&Err(Refusal::new(ErrorCode::StorageError, e))),
    };
    if line.last() != Some(&b'\n') {
        line.push(b'\n');
    }
    line
}

/// What [`LineReader::next_line`] read.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Complete(Vec<u8>),
    /// A line over the limit, skipped whole; its length so far.
    TooLong(usize),
    Eof,
}

/// Newline-delimited lines with a length limit. Cancel-safe: its state
/// lives in the struct, so a line read half-way survives a `select!`.
pub struct LineReader<R> {
    reader: BufReader<R>,
    max: usize,
    line: Vec<u8>,
    seen: usize,
}

impl<R: tokio::io::AsyncRead + Unpin> LineReader<R> {
    pub fn new(reader: R, max: usize) -> Self {
        LineReader {
            reader: BufReader::with_capacity(64 * 1024, reader),
            max,
            line: Vec::new(),
            seen: 0,
        }
    }

    pub async fn next_line(&mut self) -> io::Result<Line> {
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                let seen = std::mem::take(&mut self.seen);
                let line = std::mem::take(&mut self.line);
                return Ok(match seen {
                    0 => Line::Eof,
                    n if n > self.max => Line::TooLong(n),
                    _ => Line::Complete(line),
                });
            }
            let newline = available.iter().position(|b| *b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            self.seen += chunk.len();
            if self.seen <= self.max {
                self.line.extend_from_slice(chunk);
            } else {
                self.line = Vec::new();
            }
            let consumed = chunk.len() + usize::from(newline.is_some());
            self.reader.consume(consumed);
            if newline.is_some() {
                let seen = std::mem::take(&mut self.seen);
                let mut line = std::mem::take(&mut self.line);
                if seen > self.max {
                    return Ok(Line::TooLong(seen));
                }
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Line::Complete(line));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(line: &str) -> Result<NewMessage, Refusal> {
        match parse_request(line.as_bytes(), 1024)? {
            Request::Submit(m) => Ok(m),
            Request::Status => panic!("not a submit"),
        }
    }

    #[test]
    fn payload_kinds_and_content_types() {
        let m = submit(r#"{"exchange":"e","routing_key":"k","payload":{"name":"yolo"}}"#).unwrap();
        assert_eq!(m.body, br#"{"name":"yolo"}"#);
        assert_eq!(m.content_type, CONTENT_TYPE_JSON);
        let m = submit(r#"{"exchange":"","routing_key":"","payload":"héllo"}"#).unwrap();
        assert_eq!(m.body, "héllo".as_bytes());
        assert_eq!(m.content_type, CONTENT_TYPE_TEXT);
        let m = submit(r#"{"exchange":"","routing_key":"","payload_base64":"AP8B"}"#).unwrap();
        assert_eq!(m.body, vec![0, 255, 1]);
        assert_eq!(m.content_type, CONTENT_TYPE_BYTES);
        let m = submit(
            r#"{"exchange":"","routing_key":"","payload":1,"content_type":"x/y","id":"c1","headers":{"a":1,"b":"s","c":true}}"#,
        )
        .unwrap();
        assert_eq!(m.content_type, "x/y");
        assert_eq!(m.id, "c1");
        assert!(m.headers.unwrap().contains("\"a\":1"));
    }

    #[test]
    fn bad_requests_are_named() {
        for (line, needle) in [
            ("nope", "not a JSON object"),
            ("[1]", "JSON object"),
            (r#"{"routing_key":"k","payload":1}"#, "exchange"),
            (r#"{"exchange":"e","payload":1}"#, "routing_key"),
            (r#"{"exchange":"e","routing_key":"k"}"#, "payload"),
            (
                r#"{"exchange":"e","routing_key":"k","payload":1,"payload_base64":"AA=="}"#,
                "not both",
            ),
            (
                r#"{"exchange":"e","routing_key":"k","payload_base64":"!!"}"#,
                "base64",
            ),
            (
                r#"{"exchange":"e","routing_key":"k","payload":1,"id":""}"#,
                "id",
            ),
            (
                r#"{"exchange":"e","routing_key":"k","payload":1,"headers":{"a":[1]}}"#,
                "header",
            ),
            (
                r#"{"exchange":"e","routing_key":"k","payload":1,"colour":"red"}"#,
                "colour",
            ),
            (r#"{"op":"dance"}"#, "unknown op"),
        ] {
            let err = parse_request(line.as_bytes(), 1024).unwrap_err();
            assert_eq!(err.code, ErrorCode::BadRequest, "{line}");
            assert!(err.message.contains(needle), "{line}: {}", err.message);
        }
        let long = "x".repeat(256);
        let err = submit(&format!(
            r#"{{"exchange":"{long}","routing_key":"k","payload":1}}"#
        ))
        .unwrap_err();
        assert!(err.message.contains("255"), "{}", err.message);
    }

    #[test]
    fn size_limit_is_on_the_decoded_body() {
        let big = "x".repeat(1025);
        let err = submit(&format!(
            r#"{{"exchange":"","routing_key":"","payload":"{big}"}}"#
        ))
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge);
        let ok = "x".repeat(1024);
        assert!(submit(&format!(
            r#"{{"exchange":"","routing_key":"","payload":"{ok}"}}"#
        ))
        .is_ok());
        let encoded = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 1025]);
        let err = submit(&format!(
            r#"{{"exchange":"","routing_key":"","payload_base64":"{encoded}"}}"#
        ))
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge);
    }

    #[tokio::test]
    async fn line_reader_skips_long_lines_and_keeps_going() {
        let input: &[u8] = b"short\n0123456789abcdef\r\n\nlast";
        let mut lines = LineReader::new(input, 8);
        assert_eq!(
            lines.next_line().await.unwrap(),
            Line::Complete(b"short".to_vec())
        );
        assert!(matches!(lines.next_line().await.unwrap(), Line::TooLong(_)));
        assert_eq!(
            lines.next_line().await.unwrap(),
            Line::Complete(b"last".to_vec())
        );
        assert_eq!(lines.next_line().await.unwrap(), Line::Eof);
    }
}
