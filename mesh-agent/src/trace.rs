//! Distributed tracing: W3C `traceparent`/`tracestate` and B3 (single `b3`
//! and multi `x-b3-*`) read from requests, `x-request-id` made when
//! absent, one span per request exported over OTLP/gRPC when an endpoint
//! is configured, and this span injected as the parent of the request
//! passed on.
//!
//! Without `--otlp-endpoint` there is no [`Tracer`]: requests keep the
//! trace headers they came with and only `x-request-id` is added.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{
    span_processor_with_async_runtime::BatchSpanProcessor, BatchConfigBuilder, Sampler, SdkTracer,
    SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use std::time::Duration;

/// `x-request-id`.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Builds the OTLP/gRPC exporter, the batch span processor on tokio and
/// a provider with a parent-based ratio sampler. Must run in a tokio runtime.
pub fn provider(
    endpoint: &str,
    service_name: &str,
    ratio: f64,
    attrs: Vec<KeyValue>,
) -> anyhow::Result<SdkTracerProvider> {
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
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(service_name.to_string())
                .with_attributes(attrs)
                .build(),
        )
        .build())
}

/// Flushes and stops a provider without blocking the async runtime.
pub async fn shutdown(provider: SdkTracerProvider) {
    let r =
        tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(Duration::from_secs(5)))
            .await;
    if let Ok(Err(e)) = r {
        tracing::debug!("tracer shutdown: {e}");
    }
}

/// The agent's tracer, when spans are exported.
#[derive(Clone)]
pub struct Tracer {
    tracer: SdkTracer,
    cluster: String,
}

impl Tracer {
    /// A tracer from `provider`; `cluster` is this agent's cluster.
    pub fn new(provider: &SdkTracerProvider, cluster: String) -> Self {
        Self {
            tracer: provider.tracer("fedmesh-agent"),
            cluster,
        }
    }
}

/// Which B3 form a request came with (answered in the same form).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum B3Form {
    None,
    Single,
    Multi,
}

/// The trace context of one request, its span when exported, and its
/// `x-request-id`.
pub struct ReqSpan {
    span: Option<opentelemetry_sdk::trace::Span>,
    b3: B3Form,
}

impl ReqSpan {
    /// Reads the trace headers of `headers`, makes `x-request-id` when
    /// absent, and starts a span (`kind`, named `name`) when `tracer` is set;
    /// its context then replaces the trace headers.
    pub fn start<B>(
        tracer: Option<&Tracer>,
        req: &mut http::Request<B>,
        kind: SpanKind,
        name: impl FnOnce() -> String,
    ) -> Self {
        let headers = req.headers_mut();
        if !headers.contains_key(REQUEST_ID) {
            if let Ok(v) = HeaderValue::from_str(&uuid_v4()) {
                headers.insert(REQUEST_ID, v);
            }
        }
        let Some(t) = tracer else {
            return Self {
                span: None,
                b3: B3Form::None,
            };
        };
        let headers = req.headers();
        let (parent, b3) = extract(headers);
        let cx = match parent {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        let mut attrs = vec![
            KeyValue::new("http.request.method", req.method().to_string()),
            KeyValue::new("url.path", req.uri().path().to_string()),
        ];
        if let Some(id) = headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()) {
            attrs.push(KeyValue::new(
                "http.request.header.x-request-id",
                id.to_string(),
            ));
        }
        attrs.push(KeyValue::new(
            if kind == SpanKind::Client {
                "fedmesh.source_cluster"
            } else {
                "fedmesh.destination_cluster"
            },
            t.cluster.clone(),
        ));
        let span = t
            .tracer
            .span_builder(name())
            .with_kind(kind)
            .with_attributes(attrs)
            .start_with_context(&t.tracer, &cx);
        let me = Self {
            span: Some(span),
            b3,
        };
        me.inject(req.headers_mut());
        me
    }

    /// Whether a span is being recorded (attributes and events are kept).
    pub fn recording(&self) -> bool {
        self.span.as_ref().is_some_and(|s| s.is_recording())
    }

    /// Renames the span.
    pub fn rename(&mut self, name: String) {
        if let Some(s) = &mut self.span {
            s.update_name(name);
        }
    }

    /// Sets attributes, made only when the span records.
    pub fn attrs(&mut self, f: impl FnOnce() -> Vec<KeyValue>) {
        if let Some(s) = self.span.as_mut().filter(|s| s.is_recording()) {
            s.set_attributes(f());
        }
    }

    /// Adds an event, its attributes made only when the span records.
    pub fn event(&mut self, name: &'static str, f: impl FnOnce() -> Vec<KeyValue>) {
        if let Some(s) = self.span.as_mut().filter(|s| s.is_recording()) {
            s.add_event(name, f());
        }
    }

    /// Replaces the trace headers with this span as the parent.
    fn inject(&self, headers: &mut HeaderMap) {
        let Some(s) = &self.span else { return };
        let sc = s.span_context();
        let sampled = sc.is_sampled();
        let set = |h: &mut HeaderMap, k: HeaderName, v: String| {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        };
        set(
            headers,
            TRACEPARENT,
            format!(
                "00-{}-{}-{:02x}",
                sc.trace_id(),
                sc.span_id(),
                sc.trace_flags().to_u8()
            ),
        );
        let state = sc.trace_state().header();
        if state.is_empty() {
            headers.remove(TRACESTATE);
        } else {
            set(headers, TRACESTATE, state);
        }
        let flag = if sampled { "1" } else { "0" };
        match self.b3 {
            B3Form::None => {}
            B3Form::Single => set(
                headers,
                B3,
                format!("{}-{}-{flag}", sc.trace_id(), sc.span_id()),
            ),
            B3Form::Multi => {
                set(headers, B3_TRACE, sc.trace_id().to_string());
                set(headers, B3_SPAN, sc.span_id().to_string());
                set(headers, B3_SAMPLED, flag.to_string());
                headers.remove(B3_PARENT);
                headers.remove(B3_FLAGS);
            }
        }
    }

    /// Ends the span with the response status.
    pub fn end(mut self, status: u16) {
        if let Some(s) = &mut self.span {
            if s.is_recording() {
                s.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status),
                ));
                if status >= 500 {
                    s.set_status(Status::error(format!("HTTP {status}")));
                }
            }
            s.end();
        }
    }
}

/// The parent context of a request: W3C first, then B3.
fn extract(h: &HeaderMap) -> (Option<SpanContext>, B3Form) {
    let get = |k: &HeaderName| h.get(k).and_then(|v| v.to_str().ok()).map(str::trim);
    let b3 = if h.contains_key(B3) {
        B3Form::Single
    } else if h.contains_key(B3_TRACE) {
        B3Form::Multi
    } else {
        B3Form::None
    };
    if let Some(sc) = get(&TRACEPARENT).and_then(|tp| parse_traceparent(tp, get(&TRACESTATE))) {
        return (Some(sc), b3);
    }
    let sc = match b3 {
        B3Form::Single => get(&B3).and_then(parse_b3_single),
        B3Form::Multi => parse_b3(
            get(&B3_TRACE),
            get(&B3_SPAN),
            get(&B3_SAMPLED),
            get(&B3_FLAGS),
        ),
        B3Form::None => None,
    };
    (sc, b3)
}

fn hex_id<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn trace_id(s: &str) -> Option<TraceId> {
    let id = if s.len() == 16 {
        let mut b = [0u8; 16];
        b[8..].copy_from_slice(&hex_id::<8>(s)?);
        b
    } else {
        hex_id::<16>(s)?
    };
    Some(TraceId::from_bytes(id)).filter(|t| *t != TraceId::INVALID)
}

fn span_id(s: &str) -> Option<SpanId> {
    Some(SpanId::from_bytes(hex_id::<8>(s)?)).filter(|s| *s != SpanId::INVALID)
}

fn remote(t: TraceId, s: SpanId, sampled: bool, state: TraceState) -> SpanContext {
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    SpanContext::new(t, s, flags, true, state)
}

/// `00-<trace-id>-<parent-id>-<flags>` (W3C Trace Context).
fn parse_traceparent(tp: &str, state: Option<&str>) -> Option<SpanContext> {
    let mut it = tp.split('-');
    let (ver, t, s, f) = (it.next()?, it.next()?, it.next()?, it.next()?);
    if ver.len() != 2 || ver == "ff" || (ver == "00" && it.next().is_some()) {
        return None;
    }
    let flags = hex_id::<1>(f)?[0];
    let state = state
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(remote(
        trace_id(t).filter(|_| t.len() == 32)?,
        span_id(s)?,
        flags & 1 == 1,
        state,
    ))
}

/// `b3: {TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]`.
fn parse_b3_single(v: &str) -> Option<SpanContext> {
    let mut it = v.split('-');
    let (t, s) = (it.next()?, it.next()?);
    parse_b3(Some(t), Some(s), it.next(), None)
}

fn parse_b3(
    t: Option<&str>,
    s: Option<&str>,
    sampled: Option<&str>,
    flags: Option<&str>,
) -> Option<SpanContext> {
    let sampled = flags == Some("1") || matches!(sampled, None | Some("1" | "d" | "true"));
    Some(remote(
        trace_id(t?)?,
        span_id(s?)?,
        sampled,
        TraceState::default(),
    ))
}

/// A random (version 4) UUID.
pub fn uuid_v4() -> String {
    let mut b: [u8; 16] = fastrand::u128(..).to_be_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn w3c_and_b3_are_read() {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let (sc, form) = extract(&h);
        let sc = sc.unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(form, B3Form::None);

        let mut h = HeaderMap::new();
        h.insert(
            B3,
            HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        );
        let (sc, form) = extract(&h);
        assert_eq!(
            sc.unwrap().trace_id().to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert_eq!(form, B3Form::Single);

        let mut h = HeaderMap::new();
        h.insert(B3_TRACE, HeaderValue::from_static("a3ce929d0e0e4736"));
        h.insert(B3_SPAN, HeaderValue::from_static("00f067aa0ba902b7"));
        h.insert(B3_SAMPLED, HeaderValue::from_static("0"));
        let (sc, form) = extract(&h);
        let sc = sc.unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert!(!sc.is_sampled());
        assert_eq!(form, B3Form::Multi);

        for bad in [
            "00-0000-00f067aa0ba902b7-01",
            "zz",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        ] {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, HeaderValue::from_static(bad));
            assert!(extract(&h).0.is_none(), "{bad}");
        }
    }

    #[test]
    fn request_ids_are_uuid_v4() {
        let id = uuid_v4();
        assert_eq!(id.len(), 36);
        assert_eq!(id.as_bytes()[14], b'4');
        assert!(matches!(id.as_bytes()[19], b'8' | b'9' | b'a' | b'b'));
        assert_ne!(id, uuid_v4());
    }
}
