//! Serving HTTP/1.1 and HTTP/2 (h2c or ALPN) on accepted connections, with
//! graceful drain: on stop the listener closes, idle connections close,
//! requests in flight finish up to the deadline.

use crate::body::Body;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// A request's answer, boxed.
type BoxedAnswer =
    std::pin::Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// `handler` as hyper's service. Its future is boxed per request: hyper
/// keeps room for one in every connection, idle ones included, and a
/// request's future is kilobytes (`the_request_future_stays_small` in
/// `outbound` and `inbound` prints them) where a box is a pointer.
fn service<H, F>(
    handler: H,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Body>,
    Error = Infallible,
    Future = BoxedAnswer,
> + Clone
where
    H: Fn(Request<Incoming>) -> F + Send + Sync + Clone + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    hyper::service::service_fn(move |req| {
        let f = handler(req);
        Box::pin(async move { Ok::<_, Infallible>(f.await) }) as BoxedAnswer
    })
}

/// Serves one connection with `handler` until it ends or the drain closes it.
pub fn watched<I, H, F>(io: I, handler: H, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Send + Sync + Clone + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let svc = service(handler);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(1024);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    let conn = watcher.watch(conn.into_owned());
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!("connection ended: {e}");
        }
    });
}

/// [`watched`], for a connection a policy change may end: once `revoked`
/// completes, the connection is shut down gracefully (HTTP/1.1 closes after
/// the request in flight, HTTP/2 sends GOAWAY) and closed after `drain`.
/// `stop` (the listener's) drains it as [`watched`] connections are; the
/// listener's drain waits for it.
pub fn watched_revocable<I, H, F, R>(
    io: I,
    handler: H,
    watcher: Watcher,
    mut stop: watch::Receiver<bool>,
    revoked: R,
    drain: Duration,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>) -> F + Send + Sync + Clone + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
    R: Future<Output = ()> + Send + 'static,
{
    let svc = service(handler);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(1024);
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .into_owned();
    tokio::spawn(async move {
        // Held, not used: the listener's drain waits until it is dropped.
        let _watcher = watcher;
        let mut conn = std::pin::pin!(conn);
        let by_policy = tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!("connection ended: {e}");
                }
                return;
            }
            () = stopped(&mut stop) => false,
            () = revoked => true,
        };
        conn.as_mut().graceful_shutdown();
        if by_policy {
            let _ = tokio::time::timeout(drain, conn).await;
        } else {
            let _ = conn.await;
        }
    });
}

/// Waits for `stop`, then for the connections `graceful` watches to finish,
/// up to `deadline`. Returns whether some were cut off.
pub async fn drain(
    name: &'static str,
    mut stop: watch::Receiver<bool>,
    graceful: GracefulShutdown,
    deadline: Duration,
) -> bool {
    let _ = stop.wait_for(|s| *s).await;
    info!(listener = name, "draining");
    match tokio::time::timeout(deadline, graceful.shutdown()).await {
        Ok(()) => false,
        Err(_) => {
            warn!(
                listener = name,
                ?deadline,
                "drain deadline reached; closing remaining connections"
            );
            true
        }
    }
}

/// Completes once `stop` turns true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The next connection of `listener` (with TCP_NODELAY set), or `None` once
/// `stop` turns true. Accept errors (e.g. out of file descriptors) are
/// logged and retried after a short pause.
pub async fn accept(
    name: &'static str,
    listener: &tokio::net::TcpListener,
    stop: &mut watch::Receiver<bool>,
) -> Option<(tokio::net::TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    return Some((tcp, peer));
                }
                Err(e) => {
                    warn!(listener = name, "accept: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            () = stopped(stop) => return None,
        }
    }
}
