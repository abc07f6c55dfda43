//! The fedmesh agent: runs beside each workload and does the sidecar work
//! (routing, retries, mTLS, authorization, metrics).
//!
//! Today it parses and validates its configuration and runs until SIGTERM;
//! the data plane is issue #4.

pub mod config;
