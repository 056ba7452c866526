//! Client: the CLI's side of the socket protocol (docs/protocol.md).
//!
//! Role: reach the running agent, send it [`Request`]s, read its answers as
//! typed [`Answer`]s: a single `submit`, a pipelined `submit --bulk` from
//! stdin, and the status request behind `status`.
//!
//! Invariants: every wait for the agent is bounded ([`CLIENT_TIMEOUT`]); an
//! agent that refuses the connection is heard out (its answer is read even
//! when sending the request failed); bulk mode writes while it reads, so
//! neither side's buffers can fill up and stall the other.

use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;

use super::runtime;
use crate::protocol::{Answer, Payload, Request, StatusAnswer, SubmitAnswer, SubmitRequest};

/// How long a client command waits for the agent to answer one request.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `status` waits for the agent before it reads the database.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// `--exchange` and `--routing-key`: a single submit's values, bulk lines'
/// defaults.
pub(super) struct RequestDefaults {
    pub(super) exchange: Option<String>,
    pub(super) routing_key: Option<String>,
}

/// The request of a single `submit`; the payload from the argument or stdin.
pub(super) fn single_request(
    defaults: &RequestDefaults,
    id: Option<String>,
    headers: &[String],
    content_type: Option<String>,
    json: bool,
    payload: Option<String>,
) -> anyhow::Result<Request> {
    let bytes = match payload.as_deref() {
        None | Some("-") => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading the payload from stdin")?;
            buf
        }
        Some(text) => text.as_bytes().to_vec(),
    };
    let payload = if json {
        let value: Value =
            serde_json::from_slice(&bytes).context("--json: the payload is not valid JSON")?;
        Payload::Json(value)
    } else {
        match String::from_utf8(bytes) {
            Ok(text) => Payload::Json(Value::String(text)),
            Err(e) => {
                Payload::Base64(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()))
            }
        }
    };
    Ok(Request::Submit(SubmitRequest {
        content_type,
        exchange: defaults.exchange.clone().unwrap_or_default(),
        headers: header_map(headers)?,
        id,
        payload,
        routing_key: defaults.routing_key.clone().unwrap_or_default(),
    }))
}

/// `--header K=V` flags as the request's headers; none is no `headers`.
fn header_map(headers: &[String]) -> anyhow::Result<Option<Map<String, Value>>> {
    if headers.is_empty() {
        return Ok(None);
    }
    let mut map = Map::new();
    for header in headers {
        let (k, v) = header
            .split_once('=')
            .ok_or_else(|| anyhow!("--header {header:?}: expected K=V"))?;
        // Numbers and booleans keep their type; anything else is a string.
        let value = match serde_json::from_str::<Value>(v) {
            Ok(n @ (Value::Number(_) | Value::Bool(_))) => n,
            _ => Value::String(v.to_string()),
        };
        map.insert(k.to_string(), value);
    }
    Ok(Some(map))
}

async fn connect(socket: &Path) -> anyhow::Result<UnixStream> {
    UnixStream::connect(socket).await.with_context(|| {
        format!(
            "cannot reach the agent at {} (is `edge-outbox run` running?)",
            socket.display()
        )
    })
}

/// Sends one request, returns the agent's answer.
async fn ask_agent<T: DeserializeOwned>(
    socket: &Path,
    request: &Request,
) -> anyhow::Result<Answer<T>> {
    let stream = connect(socket).await?;
    let (read_half, mut write_half) = stream.into_split();
    let line = request.to_line()?;
    // An agent that refuses the connection (unauthorized, too many
    // connections) answers and closes without reading: the write may fail
    // with a broken pipe while its answer is waiting to be read.
    let written = write_half.write_all(&line).await;
    let mut answer = String::new();
    let mut reader = BufReader::new(read_half);
    let read = tokio::time::timeout(CLIENT_TIMEOUT, reader.read_line(&mut answer))
        .await
        .map_err(|_| anyhow!("the agent did not answer within {CLIENT_TIMEOUT:?}"))?;
    if answer.is_empty() {
        written.context("sending the request to the agent")?;
        read.context("reading the agent's answer")?;
        bail!("the agent closed the connection without answering");
    }
    serde_json::from_str(&answer).context("the agent's answer is not a protocol answer")
}

/// `submit`: sends one request, prints the id or the refusal.
pub(super) fn submit_one(socket: &Path, request: &Request) -> anyhow::Result<ExitCode> {
    let answer: SubmitAnswer = runtime()?.block_on(ask_agent(socket, request))?;
    Ok(match answer {
        Answer::Ok(accepted) => {
            if accepted.duplicate {
                out!("{} (duplicate: already stored)", accepted.id);
            } else {
                out!("{}", accepted.id);
            }
            ExitCode::SUCCESS
        }
        Answer::Refused(refusal) => {
            eprintln!(
                "edge-outbox: refused ({}): {}",
                refusal.code, refusal.message
            );
            ExitCode::FAILURE
        }
    })
}

/// The agent's status report; `None` when no agent answers in time, or
/// it refused (said on stderr): the caller reads the database instead.
pub(super) fn ask_status(socket: &Path) -> anyhow::Result<Option<crate::status::StatusReport>> {
    let answer: Option<StatusAnswer> = runtime()?.block_on(async {
        tokio::time::timeout(STATUS_TIMEOUT, ask_agent(socket, &Request::Status))
            .await
            .ok()
            .and_then(Result::ok)
    });
    Ok(match answer {
        Some(Answer::Ok(report)) => Some(report),
        // An agent that refuses us (unauthorized, too many connections) is
        // no reason to fail: the database has the counts.
        Some(Answer::Refused(refusal)) => {
            eprintln!(
                "edge-outbox: the agent refused the status request ({}: {}); \
                 reading the database instead",
                refusal.code, refusal.message
            );
            None
        }
        None => None,
    })
}

/// What bulk mode reads from an `ok` answer. A line may be any request and
/// only a submit's answer has an id; another prints an empty line.
#[derive(Deserialize)]
struct Settled {
    #[serde(default)]
    id: String,
}

/// `submit --bulk`: streams stdin's request lines to the agent while
/// reading its answers; prints one id per line, refusals on stderr.
pub(super) async fn submit_bulk(
    socket: &Path,
    defaults: &RequestDefaults,
) -> anyhow::Result<ExitCode> {
    let stream = connect(socket).await?;
    let (read_half, write_half) = stream.into_split();
    let (exchange, routing_key) = (defaults.exchange.clone(), defaults.routing_key.clone());
    let sender = tokio::task::spawn_blocking(move || send_lines(write_half, exchange, routing_key));
    let mut answers = BufReader::new(read_half).lines();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let (mut received, mut refused) = (0u64, 0u64);
    while let Some(answer) = tokio::time::timeout(CLIENT_TIMEOUT, answers.next_line())
        .await
        .map_err(|_| anyhow!("the agent did not answer within {CLIENT_TIMEOUT:?}"))??
    {
        received += 1;
        match serde_json::from_str::<Answer<Settled>>(&answer)? {
            Answer::Ok(settled) => writeln!(out, "{}", settled.id)?,
            Answer::Refused(refusal) => {
                refused += 1;
                eprintln!(
                    "edge-outbox: line {received}: refused ({}): {}",
                    refusal.code, refusal.message
                );
            }
        }
    }
    out.flush()?;
    let sent = sender.await??;
    if received < sent {
        bail!("the agent answered {received} of {sent} requests");
    }
    Ok(if refused == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Bulk mode's sender, on a blocking thread (stdin is blocking): writes the
/// lines in batches, then closes the write side; how many it sent.
fn send_lines(
    mut write_half: OwnedWriteHalf,
    exchange: Option<String>,
    routing_key: Option<String>,
) -> anyhow::Result<u64> {
    let handle = tokio::runtime::Handle::current();
    let mut sent = 0u64;
    let mut batch = Vec::with_capacity(64 * 1024);
    for line in std::io::stdin().lock().lines() {
        let line = line.context("reading stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        // The line passes through as the client wrote it (the agent judges
        // it), only the defaults filled in.
        let request = match serde_json::from_str::<Value>(&line) {
            Ok(Value::Object(mut map)) => {
                if let Some(e) = &exchange {
                    map.entry("exchange").or_insert_with(|| json!(e));
                }
                if let Some(k) = &routing_key {
                    map.entry("routing_key").or_insert_with(|| json!(k));
                }
                serde_json::to_vec(&map)?
            }
            // Let the agent explain what is wrong with the line.
            _ => line.into_bytes(),
        };
        batch.extend_from_slice(&request);
        batch.push(b'\n');
        sent += 1;
        if batch.len() >= 32 * 1024 {
            handle.block_on(write_half.write_all(&batch))?;
            batch.clear();
        }
    }
    handle.block_on(async {
        write_half.write_all(&batch).await?;
        write_half.shutdown().await
    })?;
    Ok(sent)
}
