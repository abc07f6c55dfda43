//! Connection spans exported over OTLP/gRPC. The gateway passes TLS
//! through without reading it, so it cannot see a request's trace headers:
//! each connection is a trace of its own, a `gateway <sni>` span whose
//! `client.address`/`client.port` equal the `fedmesh.upstream.local_address`
//! the calling agent records on its request span (the join key).

use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{
    span_processor_with_async_runtime::BatchSpanProcessor, BatchConfigBuilder, SdkTracer,
    SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

/// The gateway's tracer and the provider to flush on drain.
#[derive(Clone)]
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Tracing {
    /// The OTLP/gRPC exporter and a batch span processor on the tokio
    /// runtime this is called in.
    pub fn new(endpoint: &str, cluster: &str) -> anyhow::Result<Self> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(Duration::from_secs(5))
            .build()?;
        let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(Duration::from_secs(1))
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(
                Resource::builder()
                    .with_service_name("fedmesh-gateway")
                    .with_attributes([KeyValue::new("fedmesh.cluster", cluster.to_string())])
                    .build(),
            )
            .build();
        let tracer = provider.tracer("fedmesh-gateway");
        Ok(Self { provider, tracer })
    }

    /// Starts the span of a routed connection accepted at `start`.
    pub fn connection(
        &self,
        start: SystemTime,
        sni: &str,
        client: SocketAddr,
        source_cluster: &str,
        service: &str,
    ) -> ConnSpan {
        let span = self
            .tracer
            .span_builder(format!("gateway {sni}"))
            .with_kind(SpanKind::Server)
            .with_start_time(start)
            .with_attributes(vec![
                KeyValue::new("tls.server_name", sni.to_string()),
                KeyValue::new("client.address", client.ip().to_string()),
                KeyValue::new("client.port", i64::from(client.port())),
                KeyValue::new("fedmesh.client", client.to_string()),
                KeyValue::new("fedmesh.source_cluster", source_cluster.to_string()),
                KeyValue::new("fedmesh.service", service.to_string()),
            ])
            .start(&self.tracer);
        ConnSpan(span)
    }

    /// Flushes and stops the exporter without blocking the runtime.
    pub async fn shutdown(self) {
        let p = self.provider;
        let r =
            tokio::task::spawn_blocking(move || p.shutdown_with_timeout(Duration::from_secs(5)))
                .await;
        if let Ok(Err(e)) = r {
            tracing::debug!("tracer shutdown: {e}");
        }
    }
}

/// The span of one connection.
pub struct ConnSpan(opentelemetry_sdk::trace::Span);

impl ConnSpan {
    /// Records the endpoint the connection was spliced to.
    pub fn endpoint(&mut self, addr: SocketAddr) {
        self.0.set_attribute(KeyValue::new(
            "fedmesh.destination_endpoint",
            addr.to_string(),
        ));
    }

    /// Ends the span with the close reason and byte counts.
    pub fn end(mut self, reason: &'static str, up: u64, down: u64, failed: bool) {
        self.0.set_attributes([
            KeyValue::new("fedmesh.close_reason", reason),
            KeyValue::new(
                "fedmesh.bytes_upstream",
                i64::try_from(up).unwrap_or(i64::MAX),
            ),
            KeyValue::new(
                "fedmesh.bytes_downstream",
                i64::try_from(down).unwrap_or(i64::MAX),
            ),
        ]);
        if failed {
            self.0.set_status(Status::error(reason));
        }
        self.0.end();
    }
}
