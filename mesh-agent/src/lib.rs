//! The fedmesh agent: runs beside each workload and does the sidecar work.
//!
//! Outbound ([`outbound`]): the application's HTTP/1.1, HTTP/2 and gRPC
//! requests are routed by the VirtualServices and DestinationRules the
//! federation pushes ([`table`], [`route`]), balanced with locality
//! preference and outlier detection ([`lb`]), retried, timed out, rate
//! limited ([`ratelimit`]), with faults injected and traffic mirrored, over
//! pooled mTLS connections ([`pool`], [`tls`]) to the destination's agent or
//! its cluster's gateway. Inbound ([`inbound`]): mTLS from peers to the
//! application. The workload's endpoint is registered with the federation
//! with the health of its readiness probe ([`register`]).

pub mod app;
pub mod body;
pub mod config;
pub mod hashring;
pub mod inbound;
pub mod jwt;
pub mod lb;
pub mod load;
pub mod locality;
pub mod metrics;
pub mod outbound;
pub mod pool;
pub mod ratelimit;
pub mod reason;
pub mod register;
pub mod retry_budget;
pub mod route;
pub mod serve;
pub mod table;
pub mod tls;
pub mod trace;
pub mod transparent;
