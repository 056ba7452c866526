//! Exit codes: the one place that turns a command's outcome into the
//! process's exit code (docs/cli.md, Exit codes;
//! docs/decisions/0033-sysexits-exit-codes.md).
//!
//! Role: name every code the CLI uses ([`Exit`]), map an agent's refusal
//! ([`Exit::for_refusal`]) and an error ([`Exit::for_error`]) to one, and
//! carry the errors that decide a code ([`ClientError`]).
//!
//! Invariant: a script can tell "try again later" (75) from "this input
//! will never do" (65), "you may not" (77) and "no agent" (69); 1 is left
//! for everything else that failed, 2 is clap's usage error.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use crate::protocol::ErrorCode;

/// The exit codes of `edge-outbox` (sysexits.h names in brackets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Exit {
    Success,
    /// Any other failure.
    Failure,
    /// The input can never be accepted as it is (`EX_DATAERR`).
    DataErr,
    /// No agent to talk to (`EX_UNAVAILABLE`).
    Unavailable,
    /// Try again later: the agent is busy, full or stopping (`EX_TEMPFAIL`).
    TempFail,
    /// Not allowed to talk to the agent (`EX_NOPERM`).
    NoPerm,
    /// The configuration cannot be used (`EX_CONFIG`).
    Config,
}

impl Exit {
    pub(super) const fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::DataErr => 65,
            Exit::Unavailable => 69,
            Exit::TempFail => 75,
            Exit::NoPerm => 77,
            Exit::Config => 78,
        }
    }

    /// The code for an agent's refusal of a request.
    pub(super) fn for_refusal(code: ErrorCode) -> Exit {
        match code {
            ErrorCode::BadRequest | ErrorCode::TooLarge => Exit::DataErr,
            ErrorCode::BufferFull
            | ErrorCode::StorageFull
            | ErrorCode::StorageError
            | ErrorCode::ShuttingDown => Exit::TempFail,
            ErrorCode::Unauthorized => Exit::NoPerm,
        }
    }

    /// The code for an error a command failed with: the first
    /// [`ClientError`] in its chain decides; anything else is a failure.
    pub(super) fn for_error(error: &anyhow::Error) -> Exit {
        error
            .chain()
            .find_map(|cause| cause.downcast_ref::<ClientError>())
            .map_or(Exit::Failure, ClientError::exit)
    }

    /// Of several refusals (a bulk run), the code a script should act on
    /// first: retrying can cure a `TempFail`, so it wins; then `NoPerm`
    /// over `DataErr`.
    pub(super) fn most_urgent(self, other: Exit) -> Exit {
        let rank = |e: Exit| match e {
            Exit::Success => 0,
            Exit::DataErr => 1,
            Exit::NoPerm => 2,
            Exit::Failure | Exit::Unavailable | Exit::Config => 3,
            Exit::TempFail => 4,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit.code())
    }
}

/// Errors of talking to the agent whose exit code is not 1.
#[derive(Debug, thiserror::Error)]
pub(super) enum ClientError {
    /// Connecting to the socket failed: no agent (`ENOENT`,
    /// `ECONNREFUSED`), or not allowed (`EACCES`).
    #[error("cannot reach the agent at {path} (is `edge-outbox run` running?): {source}")]
    Unreachable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent did not answer within {0:?}")]
    NoAnswer(Duration),
    #[error("the agent closed the connection without answering all requests")]
    Closed,
    /// The user's input that no agent would accept (`--json` that is not
    /// JSON, a `--header` without `=`).
    #[error("{0}")]
    BadInput(String),
}

impl ClientError {
    pub(super) fn unreachable(path: &Path, source: std::io::Error) -> ClientError {
        ClientError::Unreachable {
            path: path.display().to_string(),
            source,
        }
    }

    fn exit(&self) -> Exit {
        match self {
            ClientError::Unreachable { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Exit::NoPerm
            }
            ClientError::Unreachable { .. } => Exit::Unavailable,
            ClientError::NoAnswer(_) | ClientError::Closed => Exit::TempFail,
            ClientError::BadInput(_) => Exit::DataErr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_code() {
        let codes: Vec<(&str, u8)> = ErrorCode::ALL
            .iter()
            .map(|c| (c.as_str(), Exit::for_refusal(*c).code()))
            .collect();
        assert_eq!(
            codes,
            [
                ("bad_request", 65),
                ("too_large", 65),
                ("buffer_full", 75),
                ("storage_full", 75),
                ("storage_error", 75),
                ("unauthorized", 77),
                ("shutting_down", 75),
            ]
        );
    }

    #[test]
    fn errors_are_classified_through_their_context() {
        use std::io::{Error, ErrorKind};
        let path = Path::new("/run/x.sock");
        let classify = |e: ClientError| {
            let e = anyhow::Error::new(e).context("submitting");
            Exit::for_error(&e).code()
        };
        let io = |kind| ClientError::unreachable(path, Error::from(kind));
        assert_eq!(classify(io(ErrorKind::NotFound)), 69);
        assert_eq!(classify(io(ErrorKind::ConnectionRefused)), 69);
        assert_eq!(classify(io(ErrorKind::PermissionDenied)), 77);
        assert_eq!(classify(ClientError::NoAnswer(Duration::from_secs(1))), 75);
        assert_eq!(classify(ClientError::Closed), 75);
        assert_eq!(classify(ClientError::BadInput("x".into())), 65);
        assert_eq!(Exit::for_error(&anyhow::anyhow!("disk")).code(), 1);
    }

    #[test]
    fn retry_later_is_the_most_urgent() {
        let all = [Exit::DataErr, Exit::NoPerm, Exit::TempFail];
        assert_eq!(
            all.iter().fold(Exit::Success, |a, b| a.most_urgent(*b)),
            Exit::TempFail
        );
        assert_eq!(Exit::DataErr.most_urgent(Exit::NoPerm), Exit::NoPerm);
        assert_eq!(Exit::Success.most_urgent(Exit::DataErr), Exit::DataErr);
    }
}
