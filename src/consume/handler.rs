//! Handler: the effect of one message (docs/consuming.md, Handlers).
//!
//! Owns the handler processes: `record` runs nothing (the commit of status
//! 3 is the effect: end-to-end proof of arrival); `exec` runs
//! `consumer.exec` with the body on stdin and the message's facts in the
//! environment (`EDGE_OUTBOX_MESSAGE_ID`, `EDGE_OUTBOX_EXCHANGE`,
//! `EDGE_OUTBOX_ROUTING_KEY`, `EDGE_OUTBOX_REDELIVERED`), stdout discarded,
//! stderr captured for the failure reason.
//!
//! Invariants:
//! - A handler runs in its own process group: a timeout
//!   (`consumer.handler_timeout`) kills everything it started, not only it.
//! - Stdin is fed while stderr is drained, so a handler that writes a lot
//!   before reading cannot deadlock against the agent.
//! - Stderr is read to the end (only its first [`STDERR_KEEP`] bytes are
//!   kept), so a verbose handler is never killed by SIGPIPE; once the
//!   handler has exited, its exit status decides within [`STDERR_GRACE`]
//!   even if a background process it left holds stderr open.
//! - Exit status 0 is success whatever stderr says.

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, Command};

use super::message::Message;
use crate::config::{ConsumerConfig, HandlerKind};

/// How much of a handler's stderr is kept (the rest is read and dropped).
const STDERR_KEEP: usize = 64 * 1024;
/// After the handler exits, how long its stderr may stay open (held by a
/// process it left in the background) before the exit status decides.
const STDERR_GRACE: Duration = Duration::from_millis(200);

/// Runs the effect of one message.
#[derive(Debug, Clone)]
pub(crate) enum Handler {
    /// Only records the consumption: end-to-end proof of arrival.
    Record,
    /// Runs a command: body on stdin, the message's facts in the environment.
    Exec {
        argv: Vec<String>,
        timeout: Duration,
    },
}

impl Handler {
    pub(crate) fn from_config(config: &ConsumerConfig) -> Handler {
        match config.handler {
            HandlerKind::Record => Handler::Record,
            HandlerKind::Exec => Handler::Exec {
                argv: config.exec.clone(),
                timeout: config.handler_timeout,
            },
        }
    }

    /// Runs the handler on one delivery: `Err` carries the reason.
    pub(crate) async fn run(&self, message: &Message) -> Result<(), String> {
        match self {
            Handler::Record => Ok(()),
            Handler::Exec { argv, timeout } => run_exec(argv, *timeout, message).await,
        }
    }
}

async fn run_exec(argv: &[String], timeout: Duration, message: &Message) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("consumer.exec is empty".into());
    };
    let mut child = command(program, args, message)
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let group = child
        .id()
        .and_then(|pid| rustix::process::Pid::from_raw(pid as i32));
    // Taken out here so the pipe stays open until the kill below.
    let mut stderr = child.stderr.take();
    let body = message.body.clone();
    let waited = tokio::time::timeout(timeout, wait(&mut child, body, &mut stderr)).await;
    match waited {
        Ok((err, Ok(status))) if status.success() => {
            if !err.is_empty() {
                tracing::info!(message_id = ?message.id, stderr = %String::from_utf8_lossy(&err).trim_end(), "handler stderr");
            }
            Ok(())
        }
        Ok((err, Ok(status))) => Err(failure(program, status, &err)),
        Ok((_, Err(e))) => Err(format!("waiting for {program}: {e}")),
        Err(_) => {
            if let Some(group) = group {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
            let _ = child.kill().await;
            Err(format!(
                "handler {program} killed after consumer.handler_timeout ({})",
                humantime::format_duration(timeout)
            ))
        }
    }
}

/// The handler's command: argv, environment, pipes, process group.
fn command(program: &str, args: &[String], message: &Message) -> Command {
    let mut command = Command::new(program);
    command
        .args(args)
        .env(
            "EDGE_OUTBOX_MESSAGE_ID",
            message.id.as_deref().unwrap_or(""),
        )
        .env("EDGE_OUTBOX_EXCHANGE", &message.exchange)
        .env("EDGE_OUTBOX_ROUTING_KEY", &message.routing_key)
        .env(
            "EDGE_OUTBOX_REDELIVERED",
            if message.redelivered { "1" } else { "0" },
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what it started too.
        .process_group(0)
        .kill_on_drop(true);
    command
}

/// Feeds `body` to the child's stdin and drains `stderr` until the child
/// has exited: returns the stderr kept and the exit status.
async fn wait(
    child: &mut Child,
    body: Vec<u8>,
    stderr: &mut Option<ChildStderr>,
) -> (Vec<u8>, std::io::Result<ExitStatus>) {
    let stdin = child.stdin.take();
    // Feed stdin and drain stderr concurrently: a handler that writes a lot
    // before reading must not deadlock against us.
    let feed = async move {
        if let Some(mut stdin) = stdin {
            // A handler that exits without reading its input is its business.
            let _ = stdin.write_all(&body).await;
        }
    };
    // Read stderr to the end (keeping the first STDERR_KEEP bytes): closing
    // it early would kill a verbose handler with SIGPIPE. Once the handler
    // has exited, stop reading after STDERR_GRACE: a background process it
    // left may hold stderr open indefinitely.
    let mut err = Vec::new();
    let (exited_tx, exited_rx) = tokio::sync::oneshot::channel::<()>();
    let read_stderr = async {
        let Some(stderr) = stderr.as_mut() else {
            return;
        };
        let mut chunk = [0u8; 8192];
        while let Ok(n @ 1..) = stderr.read(&mut chunk).await {
            let room = STDERR_KEEP.saturating_sub(err.len());
            err.extend_from_slice(&chunk[..n.min(room)]);
        }
    };
    let run = async {
        let ((), status) = tokio::join!(feed, child.wait());
        let _ = exited_tx.send(());
        status
    };
    let drain = async {
        tokio::select! {
            () = read_stderr => {}
            () = async {
                let _ = exited_rx.await;
                tokio::time::sleep(STDERR_GRACE).await;
            } => {}
        }
    };
    let (status, ()) = tokio::join!(run, drain);
    (err, status)
}

/// The reason a handler that exited with `status` failed, with its stderr.
fn failure(program: &str, status: ExitStatus, err: &[u8]) -> String {
    let stderr = String::from_utf8_lossy(err).trim_end().to_string();
    let code = status
        .code()
        .map(|c| format!("exit status {c}"))
        .unwrap_or_else(|| format!("{status}"));
    if stderr.is_empty() {
        format!("handler {program} failed: {code}")
    } else {
        format!("handler {program} failed: {code}: {stderr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &[u8]) -> Message {
        Message {
            id: Some("m-1".into()),
            exchange: "ex".into(),
            routing_key: "rk".into(),
            redelivered: true,
            body: body.to_vec(),
            headers: None,
            content_type: None,
        }
    }

    #[tokio::test]
    async fn exec_passes_body_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "cat > {0}; echo \"$EDGE_OUTBOX_MESSAGE_ID $EDGE_OUTBOX_EXCHANGE $EDGE_OUTBOX_ROUTING_KEY $EDGE_OUTBOX_REDELIVERED\" >> {0}",
            out.display()
        );
        let handler = Handler::Exec {
            argv: vec!["sh".into(), "-c".into(), script],
            timeout: Duration::from_secs(10),
        };
        handler.run(&message(b"hello\n")).await.unwrap();
        let written = std::fs::read_to_string(&out).unwrap();
        assert_eq!(written, "hello\nm-1 ex rk 1\n");
    }

    #[tokio::test]
    async fn exec_failure_carries_stderr_and_timeout_kills() {
        let handler = Handler::Exec {
            argv: vec!["sh".into(), "-c".into(), "echo boom >&2; exit 3".into()],
            timeout: Duration::from_secs(10),
        };
        let err = handler.run(&message(b"")).await.unwrap_err();
        assert!(
            err.contains("exit status 3") && err.contains("boom"),
            "{err}"
        );
        let slow = Handler::Exec {
            argv: vec!["sleep".into(), "30".into()],
            timeout: Duration::from_millis(200),
        };
        let started = std::time::Instant::now();
        let err = slow.run(&message(b"")).await.unwrap_err();
        assert!(err.contains("killed"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
