//! The fedmesh east-west gateway: one per cluster, the only door between
//! clusters. It will route TLS connections from remote clusters on the
//! ClientHello's SNI without decrypting them.
//!
//! Today it parses and validates its configuration and runs until SIGTERM;
//! the data path is issue #3.

pub mod config;
