//! The fedmesh control plane: the global endpoint registry (etcd or embedded),
//! cluster liveness, and the registration, discovery and admin APIs.
//!
//! Used by both the `fedmesh-federation` binary and the tests: `main.rs`
//! parses flags into a [`config::Config`] and calls [`app::build`].

pub mod app;
pub mod audit;
pub mod auth;
pub mod ca;
pub mod config;
pub mod engine;
pub mod grpc;
pub mod inject;
pub mod kube_auth;
pub mod kube_crds;
pub mod kube_discovery;
pub mod leader;
pub mod leases;
pub mod metrics;
pub mod registry;
pub mod replicas;
pub mod state;
pub mod store;
pub mod sync;
pub mod tls;
pub mod tokens;
pub mod traffic;
pub mod trust;
pub mod weights;
