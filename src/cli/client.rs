//! Client: the CLI's side of the socket protocol (docs/protocol.md).
//!
//! Role: reach the running agent, send it [`Request`]s, read its answers as
//! typed [`Answer`]s: a single `submit`, a pipelined `submit --bulk` from
//! stdin, and the status request behind `status`.
//!
//! Invariants: every wait for the agent is bounded ([`CLIENT_TIMEOUT`]); an
//! agent that refuses the connection is heard out (its answer is read even
//! when sending the request failed); bulk mode writes while it reads, so
//! neither side's buffers can fill up and stall the other. A `--json`
//! payload, a `--header` number and a bulk line reach the agent as the user
//! wrote them: nothing is parsed into a value and written back (no number
//! rounded, no key reordered).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;

use super::exit::{ClientError, Exit};
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
        // Its JSON text as given (surrounding whitespace aside), unparsed.
        let raw: Box<RawValue> = serde_json::from_slice(&bytes).map_err(|e| {
            ClientError::BadInput(format!("--json: the payload is not valid JSON: {e}"))
        })?;
        Payload::Json(raw)
    } else {
        match String::from_utf8(bytes) {
            Ok(text) => Payload::Json(json_string(&text)?),
            Err(e) => {
                Payload::Base64(base64::engine::general_purpose::STANDARD.encode(e.into_bytes()))
            }
        }
    };
    Ok(Request::Submit(SubmitRequest {
        content_type,
        exchange: defaults.exchange.clone().unwrap_or_default(),
        headers: header_object(headers)?,
        id,
        payload,
        priority: None,
        routing_key: defaults.routing_key.clone().unwrap_or_default(),
        ttl: None,
    }))
}

/// `text` as a JSON string.
fn json_string(text: &str) -> anyhow::Result<Box<RawValue>> {
    Ok(RawValue::from_string(serde_json::to_string(text)?)?)
}

/// `--header K=V` flags as the request's headers object; none is no
/// `headers`. A later flag for the same K wins.
fn header_object(headers: &[String]) -> anyhow::Result<Option<Box<RawValue>>> {
    if headers.is_empty() {
        return Ok(None);
    }
    let mut object = BTreeMap::new();
    for header in headers {
        let (k, v) = header
            .split_once('=')
            .ok_or_else(|| ClientError::BadInput(format!("--header {header:?}: expected K=V")))?;
        // Numbers and booleans keep their type, their text as written (the
        // agent judges whether the number fits); anything else is a string.
        let value = match serde_json::from_str::<Box<RawValue>>(v) {
            Ok(raw) if is_number_or_boolean(raw.get()) => raw,
            _ => json_string(v)?,
        };
        object.insert(k, value);
    }
    Ok(Some(RawValue::from_string(serde_json::to_string(
        &object,
    )?)?))
}

/// Whether valid JSON text is a number or a boolean.
fn is_number_or_boolean(json: &str) -> bool {
    json == "true" || json == "false" || json.starts_with(|c: char| c == '-' || c.is_ascii_digit())
}

async fn connect(socket: &Path) -> anyhow::Result<UnixStream> {
    UnixStream::connect(socket)
        .await
        .map_err(|e| ClientError::unreachable(socket, e).into())
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
        .map_err(|_| ClientError::NoAnswer(CLIENT_TIMEOUT))?;
    if answer.is_empty() {
        written.context("sending the request to the agent")?;
        read.context("reading the agent's answer")?;
        return Err(ClientError::Closed.into());
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
            Exit::for_refusal(refusal.code).into()
        }
    })
}

/// The running agent's answer to a status request, waiting at most
/// [`STATUS_TIMEOUT`] (`status --check`: every way of not getting a report
/// is an error that knows its exit code).
pub(super) fn query_status(socket: &Path) -> anyhow::Result<StatusAnswer> {
    runtime()?.block_on(async {
        tokio::time::timeout(STATUS_TIMEOUT, ask_agent(socket, &Request::Status))
            .await
            .map_err(|_| ClientError::NoAnswer(STATUS_TIMEOUT))?
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
    let (mut received, mut exit) = (0u64, Exit::Success);
    while let Some(answer) = tokio::time::timeout(CLIENT_TIMEOUT, answers.next_line())
        .await
        .map_err(|_| ClientError::NoAnswer(CLIENT_TIMEOUT))??
    {
        received += 1;
        match serde_json::from_str::<Answer<Settled>>(&answer)? {
            Answer::Ok(settled) => writeln!(out, "{}", settled.id)?,
            Answer::Refused(refusal) => {
                exit = exit.most_urgent(Exit::for_refusal(refusal.code));
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
        return Err(anyhow::Error::new(ClientError::Closed)
            .context(format!("the agent answered {received} of {sent} requests")));
    }
    Ok(exit.into())
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
        let request = with_defaults(line, exchange.as_deref(), routing_key.as_deref())?;
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

/// A bulk line with `--exchange` and `--routing-key` filled in where it has
/// no such member; every byte the user wrote passes through unchanged (the
/// agent judges the line). A line that is not a JSON object goes as it is,
/// for the agent to explain what is wrong with it.
fn with_defaults(
    line: String,
    exchange: Option<&str>,
    routing_key: Option<&str>,
) -> anyhow::Result<Vec<u8>> {
    let Ok(members) = serde_json::from_str::<HashMap<String, IgnoredAny>>(&line) else {
        return Ok(line.into_bytes());
    };
    let mut missing = String::new();
    for (name, default) in [("exchange", exchange), ("routing_key", routing_key)] {
        if let (Some(value), false) = (default, members.contains_key(name)) {
            missing.push_str(&serde_json::to_string(name)?);
            missing.push(':');
            missing.push_str(&serde_json::to_string(value)?);
            missing.push(',');
        }
    }
    if missing.is_empty() {
        return Ok(line.into_bytes());
    }
    // Inserted right after the opening brace (the parse found one there,
    // after JSON whitespace only).
    let brace = line.len() - line.trim_start().len();
    let rest = &line[brace + 1..];
    if rest.trim_start().starts_with('}') {
        missing.pop();
    }
    let mut out = Vec::with_capacity(line.len() + missing.len());
    out.extend_from_slice(&line.as_bytes()[..=brace]);
    out.extend_from_slice(missing.as_bytes());
    out.extend_from_slice(rest.as_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(line: &str, exchange: Option<&str>, routing_key: Option<&str>) -> String {
        String::from_utf8(with_defaults(line.to_string(), exchange, routing_key).unwrap()).unwrap()
    }

    #[test]
    fn bulk_defaults_are_inserted_and_the_rest_kept_byte_for_byte() {
        let line = r#" {"payload": {"n":98765432109876543210, "n":1e-400}}"#;
        assert_eq!(
            filled(line, Some("ex"), Some("rk")),
            r#" {"exchange":"ex","routing_key":"rk","payload": {"n":98765432109876543210, "n":1e-400}}"#
        );
        assert_eq!(
            filled(r#"{"payload":1,"exchange":null}"#, Some("ex"), Some("rk")),
            r#"{"routing_key":"rk","payload":1,"exchange":null}"#
        );
        assert_eq!(
            filled("{ }", Some("e\"\n"), None),
            "{\"exchange\":\"e\\\"\\n\" }"
        );
        assert_eq!(filled(r#"{"payload":1}"#, None, None), r#"{"payload":1}"#);
        assert_eq!(filled("not json", Some("e"), None), "not json");
        assert_eq!(filled("[1]", Some("e"), None), "[1]");
    }

    #[test]
    fn header_flags_keep_their_text() {
        let flags = [
            "n=98765432109876543210".to_string(),
            "f=1.50".to_string(),
            "b=true".to_string(),
            "s=hello world".to_string(),
            "q=\"quoted\"".to_string(),
            "e=".to_string(),
        ];
        let object = header_object(&flags).unwrap().unwrap();
        assert_eq!(
            object.get(),
            r#"{"b":true,"e":"","f":1.50,"n":98765432109876543210,"q":"\"quoted\"","s":"hello world"}"#
        );
        assert!(header_object(&["novalue".to_string()]).is_err());
        assert!(header_object(&[]).unwrap().is_none());
    }
}
