//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the
//! process runs), `/ready` (config is loaded and the node is not draining).

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::net::TcpListener;

/// State the admin endpoints read.
pub struct Admin {
    /// The metrics registry.
    pub registry: Registry,
    /// Config is loaded.
    pub ready: Arc<AtomicBool>,
    /// What `/ready` says while `ready` is false, e.g. "no routes yet".
    pub not_ready: &'static str,
    /// Draining after SIGTERM.
    pub draining: Arc<AtomicBool>,
}

impl Admin {
    fn respond(&self, path: &str) -> Response<Full<Bytes>> {
        let (status, ctype, body) = match path {
            "/metrics" => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                render(&self.registry),
            ),
            "/healthz" => (StatusCode::OK, "text/plain", "ok\n".to_string()),
            "/ready" => {
                if self.draining.load(Ordering::Acquire) {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "draining\n".to_string(),
                    )
                } else if self.ready.load(Ordering::Acquire) {
                    (StatusCode::OK, "text/plain", "ready\n".to_string())
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("{}\n", self.not_ready),
                    )
                }
            }
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found\n".to_string(),
            ),
        };
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    }

    /// Serves until the task is aborted.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let resp = this.respond(req.uri().path());
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    }
}

/// The registry in Prometheus text format.
pub fn render(reg: &Registry) -> String {
    let mut s = String::new();
    if prometheus_client::encoding::text::encode(&mut s, reg).is_err() {
        let _ = writeln!(s, "# encoding failed");
    }
    s
}
