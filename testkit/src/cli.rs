//! The agent's command line (docs/cli.md), run to completion: what a test
//! sees is a [`CliOutput`] (exit code, stdout, stderr).
//!
//! Standard input, output and error go through files in the agent's temp
//! directory, never pipes, so a command that misbehaves cannot deadlock the
//! test on a full pipe; a command that runs past 120 s fails the test.

use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agent::Agent;

/// What a CLI run gave.
#[derive(Debug)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Stdout parsed as JSON (for `--json`); panics when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

impl Agent {
    /// Runs `edge-outbox ARGS[0] -c CONFIG ARGS[1..]`.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        self.cli_stdin(args, b"")
    }

    /// [`Agent::cli`] with `stdin` as standard input.
    pub fn cli_stdin(&self, args: &[&str], stdin: &[u8]) -> CliOutput {
        let mut full: Vec<String> = Vec::new();
        if let Some((first, rest)) = args.split_first() {
            full.push(first.to_string());
            full.push("-c".into());
            full.push(self.config.to_string_lossy().into_owned());
            full.extend(rest.iter().map(|s| s.to_string()));
        }
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        self.cli_raw(&full, stdin)
    }

    /// Runs the binary with exactly `args` (no `-c`), in the temp dir.
    pub fn cli_raw(&self, args: &[&str], stdin: &[u8]) -> CliOutput {
        run_bin(self.command(), self.path(), args, stdin)
    }
}

/// Numbers the stdin/stdout/stderr files of each run in this process.
static CLI_RUNS: AtomicUsize = AtomicUsize::new(0);

/// Runs the binary to completion (at most 120 s) with `stdin`, in `dir`.
pub fn run_bin(mut cmd: Command, dir: &Path, args: &[&str], stdin: &[u8]) -> CliOutput {
    let n = CLI_RUNS.fetch_add(1, Ordering::Relaxed);
    let base = dir.join(format!("cli-{n}"));
    let (in_path, out_path, err_path) = (
        base.with_extension("in"),
        base.with_extension("out"),
        base.with_extension("err"),
    );
    std::fs::write(&in_path, stdin).expect("writing stdin");
    let mut child = cmd
        .args(args)
        .current_dir(dir)
        .stdin(File::open(&in_path).expect("stdin file"))
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawning the CLI");
    let deadline = Duration::from_secs(120);
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() <= deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            outcome => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("edge-outbox {args:?} did not finish within {deadline:?}: {outcome:?}");
            }
        }
    };
    let output = CliOutput {
        code: status.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    };
    for p in [in_path, out_path, err_path] {
        let _ = std::fs::remove_file(p);
    }
    output
}
