//! `meshctl`, the operator's tool: lists what the federation knows, and runs
//! the local demo. Output is a table by default and JSON with `-o json`;
//! errors go to stderr with an exit code from [`exit`].

pub mod cli;
pub mod client;
pub mod cmd;
pub mod demo;
pub mod drill;
pub mod netns;
pub mod output;

/// Exit codes: what a script can tell apart without reading stderr.
pub mod exit {
    /// The command failed (the federation refused it, or anything else).
    pub const FAILURE: u8 = 1;
    /// Bad command line (clap's own code for the same).
    pub const USAGE: u8 = 2;
    /// A drill ran to its end and missed an SLO (or left something broken).
    pub const DRILL_FAILED: u8 = 3;
    /// A drill's abort condition tripped: it stopped early and restored
    /// what it changed.
    pub const DRILL_ABORTED: u8 = 4;
    /// `--wait`: the change is stored but not every agent applied it
    /// before the timeout (or one rejected it).
    pub const NOT_IN_EFFECT: u8 = 5;
}

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
    /// A drill missed an SLO.
    #[error("{0}")]
    DrillFailed(String),
    /// A drill aborted.
    #[error("{0}")]
    DrillAborted(String),
    /// A change stored but not (yet) in effect everywhere.
    #[error("{0}")]
    NotInEffect(String),
    /// Anything else.
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

impl Error {
    /// The process's exit code for this error ([`exit`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::DrillFailed(_) => exit::DRILL_FAILED,
            Self::DrillAborted(_) => exit::DRILL_ABORTED,
            Self::NotInEffect(_) => exit::NOT_IN_EFFECT,
            _ => exit::FAILURE,
        }
    }
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
