//! xtask: build-time tasks that need the command line's definition, run by
//! `scripts/build-deb` (docs/operations.md, "The Debian package").
//!
//! Role: write the man pages and the shell completions of `edge-outbox`
//! from [`edge_outbox::cli::command`], the same `clap::Command` the binary
//! parses, so they cannot drift from it. A separate workspace binary, not a
//! hidden subcommand: the shipped binary carries none of this code or its
//! dependencies (docs/decisions/0037-man-page-and-completions-from-an-xtask.md).
//!
//! Usage:
//!   cargo run -p xtask -- man DIR          # DIR/edge-outbox.1, DIR/edge-outbox-<sub>.1
//!   cargo run -p xtask -- completions DIR  # DIR/edge-outbox.bash, DIR/_edge-outbox, DIR/edge-outbox.fish
//!
//! Invariant: every failure (a bad argument, a directory that cannot be
//! written) is a message and exit 1, never a panic.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap_complete::Shell;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [task, dir] if task == "man" => man(Path::new(dir)),
        [task, dir] if task == "completions" => completions(Path::new(dir)),
        _ => Err("usage: xtask man DIR | xtask completions DIR".to_string()),
    };
    match result {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `edge-outbox.1` and one page per subcommand (`edge-outbox-submit.1`...),
/// as `man edge-outbox` and `man edge-outbox-submit` find them.
fn man(dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let command = edge_outbox::cli::command();
    clap_mangen::generate_to(command, dir)
        .map_err(|e| format!("cannot write the man pages to {}: {e}", dir.display()))?;
    listing(dir)
}

/// Bash, zsh and fish completions, under the names each shell's vendor
/// directory expects.
fn completions(dir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let mut written = Vec::new();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut command = edge_outbox::cli::command();
        let path =
            clap_complete::generate_to(shell, &mut command, "edge-outbox", dir).map_err(|e| {
                format!(
                    "cannot write the {shell} completion to {}: {e}",
                    dir.display()
                )
            })?;
        written.push(path);
    }
    Ok(written)
}

fn listing(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        paths.push(entry.path());
    }
    paths.sort();
    Ok(paths)
}
