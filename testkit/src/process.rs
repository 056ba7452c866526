//! Helper processes the kit runs to completion (`rabbitmqctl`,
//! `scripts/test-setup`, `kill`), each with a deadline.
//!
//! Output goes to a temporary file, never a pipe: a daemon the command
//! leaves behind (`rabbitmq-server -detached`) cannot hold a pipe of ours
//! open and hang the read. Each command runs in its own process group.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd`, killing it at the deadline. Ok with its output (stdout and
/// stderr together) when it exits 0, Err with the output otherwise.
pub(crate) fn run(cmd: &mut Command, deadline: Duration) -> Result<String, String> {
    let desc = format!("{cmd:?}");
    let mut out = tempfile::tempfile().map_err(|e| format!("{desc}: tempfile: {e}"))?;
    let (stdout, stderr) = match (out.try_clone(), out.try_clone()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return Err(format!("{desc}: {e}")),
    };
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    let mut child = cmd.spawn().map_err(|e| format!("{desc}: spawn: {e}"))?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{desc}: no exit after {deadline:?}; output:\n{}",
                    read_all(&mut out)
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("{desc}: wait: {e}")),
        }
    };
    let output = read_all(&mut out);
    if status.success() {
        Ok(output)
    } else {
        Err(format!("{desc}: {status}; output:\n{output}"))
    }
}

fn read_all(file: &mut File) -> String {
    let mut bytes = Vec::new();
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}
