//! The fedmesh east-west gateway: one per cluster, the only door between
//! clusters. It routes TLS connections from remote clusters on the
//! ClientHello's SNI without decrypting them, to a local endpoint of an
//! exported service.
//!
//! Used by the `fedmesh-gateway` binary and the tests: [`app::build`] binds
//! and starts everything and returns a [`app::Bound`].

pub mod app;
pub mod config;
pub mod discovery;
pub mod hello;
pub mod metrics;
pub mod probe;
pub mod proxy;
pub mod route;
pub mod trace;
