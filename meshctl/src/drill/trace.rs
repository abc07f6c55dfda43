//! A drill's timeline as a trace, exported over OTLP beside the traces of
//! the requests it sent: a root span for the drill (its steps as events)
//! and a child span per fault, from injection to repair, with events at its
//! first impact, the weights moving off the faulted clusters, the end of
//! the shift and the recovery.

use super::report::Report;
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Exports `r`'s timeline to the OTLP/gRPC collector at `endpoint`;
/// returns the trace ID.
pub async fn export(r: &Report, endpoint: &str) -> Result<String, String> {
    let provider = mesh_agent::trace::provider(
        endpoint,
        "meshctl-drill",
        1.0,
        vec![KeyValue::new("fedmesh.drill", r.name.clone())],
    )
    .map_err(|e| format!("OTLP exporter for {endpoint}: {e:#}"))?;
    let tracer = provider.tracer("meshctl-drill");
    let t0 = UNIX_EPOCH + Duration::from_millis(u64::try_from(r.started_unix_ms).unwrap_or(0));
    let at = |ms: f64| -> SystemTime { t0 + Duration::from_secs_f64(ms.max(0.0) / 1000.0) };
    #[allow(clippy::cast_possible_wrap)]
    let mut root = tracer
        .span_builder(format!("drill {}", r.name))
        .with_kind(SpanKind::Internal)
        .with_start_time(t0)
        .with_attributes(vec![
            KeyValue::new("fedmesh.drill.outcome", r.outcome.clone()),
            KeyValue::new("fedmesh.drill.requests", r.sent as i64),
            KeyValue::new("fedmesh.drill.failed", r.failed as i64),
            KeyValue::new("fedmesh.drill.success_rate", r.success_rate),
            KeyValue::new("fedmesh.drill.p99_ms", r.p99_ms),
        ])
        .start(&tracer);
    for s in &r.timeline {
        root.add_event_with_timestamp(
            s.kind.clone(),
            at(s.at_ms),
            vec![KeyValue::new("what", s.what.clone())],
        );
    }
    if !r.passed() {
        root.set_status(Status::error(
            r.aborted.clone().unwrap_or_else(|| r.outcome.clone()),
        ));
    }
    let trace_id = root.span_context().trace_id().to_string();
    let cx = Context::current_with_span(root);
    for f in &r.faults {
        let repaired = f.repaired_ms.unwrap_or(r.duration_ms);
        let recovered = f.recovered_ms.map(|ms| repaired + ms);
        #[allow(clippy::cast_possible_wrap)]
        let mut span = tracer
            .span_builder(format!("fault {}", f.step))
            .with_kind(SpanKind::Internal)
            .with_start_time(at(f.at_ms))
            .with_attributes(vec![
                KeyValue::new("fedmesh.drill.time_to_shift_ms", f.time_to_shift_ms),
                KeyValue::new("fedmesh.drill.failed", f.failed as i64),
            ])
            .start_with_context(&tracer, &cx);
        let mut event = |name: &'static str, ms: Option<f64>| {
            if let Some(ms) = ms {
                span.add_event_with_timestamp(name, at(ms), Vec::new());
            }
        };
        event("first_impact", f.first_impact_ms.map(|d| f.at_ms + d));
        event("weights_off", f.weights_off_ms.map(|d| f.at_ms + d));
        event("shifted", Some(f.at_ms + f.time_to_shift_ms));
        event("repaired", f.repaired_ms);
        event("recovered", recovered);
        span.end_with_timestamp(at(recovered.unwrap_or(repaired).max(repaired)));
    }
    cx.span().end_with_timestamp(at(r.duration_ms));
    drop(cx);
    mesh_agent::trace::shutdown(provider).await;
    Ok(trace_id)
}
