//! Prometheus metrics of the gateway, under the `fedmesh_gateway_` prefix.
//! Handles are resolved once per connection; counting a byte is one atomic add.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::fmt::Write as _;

/// Why a connection was refused before any byte reached an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// The first bytes are not a TLS handshake.
    NotTls,
    /// A handshake message other than ClientHello.
    NotClientHello,
    /// The ClientHello breaks the TLS encoding.
    MalformedHello,
    /// The ClientHello is over the configured size.
    HelloTooLarge,
    /// The ClientHello did not arrive in time (slowloris).
    HandshakeTimeout,
    /// The client closed before its ClientHello was complete.
    ClientClosed,
    /// The ClientHello has no server name.
    NoSni,
    /// The server name is no route and not an AUTO_PASSTHROUGH name.
    MalformedSni,
    /// No such service in this cluster.
    UnknownService,
    /// The service is not exported from this cluster.
    NotExported,
    /// The service, port or subset has no healthy endpoint.
    NoHealthyEndpoint,
    /// Every endpoint tried refused or timed out.
    ConnectFailed,
    /// The gateway is at its connection limit.
    ConnectionLimit,
    /// The source address opens connections too fast.
    RateLimited,
    /// The source address holds its share of connections already.
    SourceConnectionLimit,
    /// A source that must send a PROXY protocol v2 header
    /// (`--proxy-protocol-from`) sent none, or an invalid one.
    ProxyProtocol,
    /// Handshakes in progress already hold `--max-handshake-memory` of
    /// ClientHello buffers: this one could not grow its own.
    HandshakeMemory,
}

impl Reject {
    /// The label value and access-log reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotTls => "not_tls",
            Self::NotClientHello => "not_client_hello",
            Self::MalformedHello => "malformed_hello",
            Self::HelloTooLarge => "hello_too_large",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::ClientClosed => "client_closed",
            Self::NoSni => "no_sni",
            Self::MalformedSni => "malformed_sni",
            Self::UnknownService => "unknown_service",
            Self::NotExported => "not_exported",
            Self::NoHealthyEndpoint => "no_healthy_endpoint",
            Self::ConnectFailed => "connect_failed",
            Self::ConnectionLimit => "connection_limit",
            Self::RateLimited => "rate_limited",
            Self::SourceConnectionLimit => "source_connection_limit",
            Self::ProxyProtocol => "proxy_protocol",
            Self::HandshakeMemory => "handshake_memory",
        }
    }
}

impl EncodeLabelValue for Reject {
    fn encode(&self, e: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        e.write_str(self.as_str())
    }
}

/// Which way bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the remote client to the local endpoint.
    Upstream,
    /// From the local endpoint back to the client.
    Downstream,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, e: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        e.write_str(match self {
            Self::Upstream => "upstream",
            Self::Downstream => "downstream",
        })
    }
}

/// Labels of a routed connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ConnLabels {
    /// `namespace/name`, or the static route's server name.
    pub service: String,
    /// Cluster of the source address (a registered endpoint's or
    /// gateway's), or `unknown` for a source the registry does not know.
    pub source_cluster: String,
    /// This gateway's cluster.
    pub destination_cluster: String,
}

/// Labels of a byte counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ByteLabels {
    /// `namespace/name`, or the static route's server name.
    pub service: String,
    /// Cluster of the source address, or `unknown`.
    pub source_cluster: String,
    /// This gateway's cluster.
    pub destination_cluster: String,
    /// Which way.
    pub direction: Direction,
}

/// Labels of a rejection.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RejectLabels {
    /// Why.
    pub reason: Reject,
}

/// The gateway's metrics.
pub struct Metrics {
    /// Connections open now (accepted and not yet closed).
    pub active: Gauge,
    /// Connections routed to an endpoint.
    pub connections: Family<ConnLabels, Counter>,
    /// Bytes spliced.
    pub bytes: Family<ByteLabels, Counter>,
    /// Connections refused.
    pub rejections: Family<RejectLabels, Counter>,
    /// Bytes ClientHello buffers hold beyond the first KiB of each.
    pub handshake_memory: Gauge,
}

impl Metrics {
    /// Registers the metrics under `fedmesh_gateway_`.
    pub fn register(reg: &mut Registry) -> Self {
        let reg = reg.sub_registry_with_prefix("fedmesh_gateway");
        let m = Self {
            active: Gauge::default(),
            connections: Family::default(),
            bytes: Family::default(),
            rejections: Family::default(),
            handshake_memory: Gauge::default(),
        };
        reg.register(
            "handshake_memory_bytes",
            "Bytes of ClientHello buffers held beyond the first KiB of each (bounded by --max-handshake-memory)",
            m.handshake_memory.clone(),
        );
        reg.register(
            "connections_active",
            "Connections open now",
            m.active.clone(),
        );
        reg.register(
            "connections",
            "Connections routed to a local endpoint",
            m.connections.clone(),
        );
        reg.register("bytes", "Bytes spliced, by direction", m.bytes.clone());
        reg.register(
            "rejections",
            "Connections refused, by reason",
            m.rejections.clone(),
        );
        m
    }

    /// Counts a refusal.
    pub fn reject(&self, r: Reject) {
        self.rejections
            .get_or_create(&RejectLabels { reason: r })
            .inc();
    }
}

pub use mesh_node::admin::render;
