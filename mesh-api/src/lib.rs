//! The fedmesh wire contract: protobuf messages and tonic services shared by
//! the federation, gateways, agents and meshctl.
//!
//! This crate holds generated code only. The sources are the `.proto` files
//! under `proto/`; the generated Rust lives in `src/gen/` and is checked in so
//! that building fedmesh needs no `protoc`. `tests/bootstrap.rs` regenerates it
//! and fails when the checked-in copy is stale (run it with
//! `FEDMESH_BLESS=1` to update). Domain types and validation live in
//! `mesh-core`: raw protobuf never travels further than a service's edge.

/// Messages and services of package `fedmesh.v1`.
#[allow(clippy::all, clippy::pedantic, unreachable_pub, rust_2018_idioms)]
pub mod v1 {
    include!("gen/fedmesh.v1.rs");
}

/// The `.proto` files this crate was generated from, relative to the crate root.
pub const PROTO_FILES: &[&str] = &[
    "proto/fedmesh/v1/types.proto",
    "proto/fedmesh/v1/registration.proto",
    "proto/fedmesh/v1/discovery.proto",
    "proto/fedmesh/v1/admin.proto",
    "proto/fedmesh/v1/identity.proto",
    "proto/fedmesh/v1/traffic.proto",
];
