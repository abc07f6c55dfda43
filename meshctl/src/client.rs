//! Connecting to the federation.

use crate::Error;
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How long to wait for the federation to accept a connection. It answers at
/// once when up; 3 s rides out a busy machine without leaving a user staring.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Normalises `host:port` to `http://host:port`.
pub fn normalize(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    }
}

/// Connects, or explains in one line why not.
pub async fn connect(url: &str) -> Result<Channel, Error> {
    let url = normalize(url);
    let unreachable = |reason: String| Error::Unreachable {
        url: url.clone(),
        reason,
    };
    let ep = Endpoint::from_shared(url.clone())
        .map_err(|e| Error::Usage(format!("invalid --federation {url:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT);
    ep.connect().await.map_err(|e| unreachable(root_cause(&e)))
}

/// The innermost error message: tonic's outer ones say only "transport error".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
