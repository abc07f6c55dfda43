//! fedmesh's WAN relay: a userspace TCP relay between regions with a
//! configurable delay, jitter, loss, bandwidth limit, cut and blackhole,
//! for kernels without `tc netem`.
//!
//! A [`Link`] listens on one address and relays every accepted connection
//! to one target through its [`Impairment`], which can be changed at any
//! time and applies to existing connections too. A [`Relay`] is a set of
//! named links plus an HTTP control API ([`control`]). In process:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use wan_relay::{Change, LinkSpec, Mode, Relay};
//! let spec: LinkSpec = "eu-to-us=127.0.0.1:0->127.0.0.1:15443".parse()?;
//! let relay = Relay::start([spec], Some("127.0.0.1:0".parse()?)).await?;
//! let link = relay.link("eu-to-us").ok_or("no link")?;
//! println!("connect to {}", link.addr());
//! link.set(&Change::new().delay(Duration::from_millis(40)).jitter(Duration::from_millis(5)))?;
//! link.set(&Change::new().mode(Mode::Cut))?;
//! relay.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! What it models, and what not, is in the crate's README.

#![warn(missing_docs)]

pub mod control;
pub mod impairment;
pub mod link;
pub mod relay;
pub mod spec;

pub use impairment::{Change, Impairment, InvalidChange, Mode};
pub use link::{Counters, Link, LinkOptions, LinkStatus};
pub use relay::{Relay, RelayConfig, SetError};
pub use spec::{InvalidSpec, LinkSpec};

use std::net::SocketAddr;

/// Why a link or a relay could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A link's listen address could not be bound.
    #[error("link {link}: cannot listen on {addr}: {source}")]
    Listen {
        /// The link's name.
        link: String,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The control API's address could not be bound.
    #[error("control API: cannot listen on {addr}: {source}")]
    ControlListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Two links have the same name.
    #[error("two links are named {0:?}")]
    DuplicateLink(String),
    /// The initial impairment is out of range.
    #[error("invalid impairment: {0}")]
    Impairment(#[from] InvalidChange),
    /// The link options are unusable.
    #[error("invalid link options: {0}")]
    Options(String),
}
