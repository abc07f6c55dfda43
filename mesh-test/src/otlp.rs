//! A real OTLP collector for tests: rotel (PyPI `rotel`, binary
//! `rotel-agent`), started on loopback with its detailed debug log of
//! traces, and a reader of the spans it printed.

// Test support: a failure here is the test's failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::missing_panics_doc)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running rotel-agent; killed when dropped.
pub struct Rotel {
    child: Child,
    out: PathBuf,
    grpc: String,
    _dir: tempfile::TempDir,
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The rotel-agent binary: `$ROTEL_AGENT`, else `.deps/rotel-agent` (scripts/deps.sh).
fn rotel_binary() -> PathBuf {
    let p = std::env::var_os("ROTEL_AGENT").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.deps/rotel-agent"),
        PathBuf::from,
    );
    assert!(
        p.is_file(),
        "rotel-agent (the OTLP collector this test needs) not found at {}: run scripts/deps.sh \
         (or set ROTEL_AGENT to the binary from PyPI's `rotel` wheel)",
        p.display()
    );
    p
}

impl Rotel {
    /// Starts rotel on two free loopback ports; waits until it listens.
    pub async fn start() -> Self {
        let bin = rotel_binary();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("rotel.out");
        let (g, h) = (crate::free_port(), crate::free_port());
        let grpc = format!("127.0.0.1:{g}");
        let child = Command::new(bin)
            .args([
                "start",
                "--otlp-grpc-endpoint",
                &grpc,
                "--otlp-http-endpoint",
                &format!("127.0.0.1:{h}"),
                "--exporter",
                "blackhole",
                "--debug-log",
                "traces",
                "--debug-log-verbosity",
                "detailed",
            ])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
            .expect("start rotel-agent");
        let r = Self {
            child,
            out,
            grpc,
            _dir: dir,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while tokio::net::TcpStream::connect(&r.grpc).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "rotel did not listen on {} in time",
                r.grpc
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        r
    }

    /// Its OTLP/gRPC endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Every span it printed so far.
    pub fn spans(&self) -> Vec<Span> {
        parse(&std::fs::read_to_string(&self.out).unwrap_or_default())
    }

    /// Waits (bounded) until `pred` holds over the spans received.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let spans = self.spans();
            if pred(&spans) {
                return spans;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "rotel never received {what}; got:\n{spans:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One span as rotel's detailed debug log prints it.
#[derive(Debug, Clone, Default)]
pub struct Span {
    /// `service.name` of its resource.
    pub service: String,
    /// Trace ID (hex).
    pub trace: String,
    /// Parent span ID (hex), empty for a root.
    pub parent: String,
    /// Span ID (hex).
    pub id: String,
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: String,
    /// Attributes, in order.
    pub attrs: Vec<(String, String)>,
    /// Event names, in order.
    pub events: Vec<String>,
}

impl Span {
    /// The value of attribute `k`.
    pub fn attr(&self, k: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(a, _)| a == k)
            .map(|(_, v)| v.as_str())
    }
}

/// Spans from rotel's detailed debug log.
pub fn parse(text: &str) -> Vec<Span> {
    #[derive(PartialEq)]
    enum In {
        Resource,
        Attrs,
        Events,
        Other,
    }
    let mut spans: Vec<Span> = Vec::new();
    let mut service = String::new();
    let mut section = In::Other;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("ResourceSpans #") {
            service.clear();
            section = In::Other;
        } else if t == "Resource attributes:" {
            section = In::Resource;
        } else if t.starts_with("Span #") {
            spans.push(Span {
                service: service.clone(),
                ..Span::default()
            });
            section = In::Other;
        } else if t == "Attributes:" {
            section = In::Attrs;
        } else if t == "Events:" {
            section = In::Events;
        } else if t == "Links:" {
            section = In::Other;
        } else if let Some(kv) = t.strip_prefix("-> ") {
            let Some((k, v)) = kv.split_once(": ") else {
                continue;
            };
            let v = v
                .strip_suffix(')')
                .and_then(|v| v.split_once('(').map(|(_, v)| v))
                .unwrap_or(v)
                .to_string();
            match (&section, spans.last_mut()) {
                (In::Resource, _) if k == "service.name" => service = v,
                (In::Attrs, Some(s)) => s.attrs.push((k.to_string(), v)),
                (In::Events, Some(s)) if k == "Name" => s.events.push(v),
                _ => {}
            }
        } else if let Some((k, v)) = t.split_once(" : ").or_else(|| t.split_once(": ")) {
            let Some(s) = spans.last_mut() else { continue };
            let v = v.trim().to_string();
            match k.trim() {
                "Trace ID" => s.trace = v,
                "Parent ID" => s.parent = v,
                "ID" => s.id = v,
                "Name" => s.name = v,
                "Kind" => s.kind = v,
                _ => {}
            }
        }
    }
    spans
}
