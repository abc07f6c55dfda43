//! Shared domain types and mechanisms of fedmesh. Binds no sockets.
//!
//! Every name that crosses a crate boundary is a validated newtype from
//! [`name`]; wire messages from `mesh-api` become these types through
//! [`convert`], which names the offending field when a value is refused.

#![warn(missing_docs)]

pub mod cidr;
pub mod client_config;
pub mod cluster;
pub mod convert;
pub mod duration;
pub mod endpoint;
pub mod flag;
pub mod identity;
pub mod locality;
pub mod log;
pub mod name;
pub mod policy;
pub mod proxy_protocol;
pub mod retry;
pub mod service;
pub mod signal;
pub mod sni;
