//! The fedmesh control plane: the global endpoint registry (etcd or embedded),
//! cluster liveness, and the registration, discovery and admin APIs.
//!
//! Used by both the `fedmesh-federation` binary and the tests.

pub mod store;
