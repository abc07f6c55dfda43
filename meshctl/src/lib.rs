//! `meshctl`, the operator's tool: lists what the federation knows, and runs
//! the local demo. Output is a table by default and JSON with `-o json`;
//! errors go to stderr with exit code 1.

pub mod cli;
pub mod client;
pub mod cmd;
pub mod demo;
pub mod drill;
pub mod netns;
pub mod output;

/// A failure to report on stderr: one line, no backtrace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The federation could not be reached.
    #[error("cannot reach the federation at {url}: {reason}")]
    Unreachable {
        /// The URL tried.
        url: String,
        /// Why.
        reason: String,
    },
    /// No credential, or the federation did not accept it.
    #[error("{0}")]
    Unauthenticated(String),
    /// The credential lacks a right.
    #[error("{0}")]
    PermissionDenied(String),
    /// The federation answered with an error.
    #[error("{0}")]
    Status(String),
    /// Bad input on the command line.
    #[error("{0}")]
    Usage(String),
    /// Input files with errors: every one, a line each.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    /// Anything else.
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl From<tonic::Status> for Error {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::Unavailable => {
                Self::Status(format!("federation unavailable: {}", s.message()))
            }
            tonic::Code::Unauthenticated => {
                Self::Unauthenticated(format!("not authenticated: {}", s.message()))
            }
            tonic::Code::PermissionDenied => {
                Self::PermissionDenied(format!("permission denied: {}", s.message()))
            }
            tonic::Code::InvalidArgument => {
                Self::Invalid(s.message().lines().map(str::to_string).collect())
            }
            _ => Self::Status(s.message().to_string()),
        }
    }
}
