//! The fedmesh east-west gateway: one per cluster, the only door between
//! clusters. It routes TLS connections from remote clusters on the
//! ClientHello's SNI without decrypting them.

pub mod config;
pub mod hello;
