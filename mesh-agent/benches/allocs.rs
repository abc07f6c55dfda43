//! Heap allocations per request on the mesh path, counted by a counting
//! global allocator (`stats_alloc`) (issue 19): app -> outbound agent -> mTLS -> inbound
//! agent -> app, both agents built by the binary's code and run in this
//! process with a real federation (embedded registry) and a real HTTP
//! application (hyper, a fixed 200), beside the same requests sent straight to the backend in the
//! same run (the baseline: the client's and the backend's own allocations).
//! Everything runs on one worker thread, so the counts barely move from
//! run to run; what the agents add is the difference.
//!
//! Then the heap each idle keep-alive connection to the outbound listener
//! holds (1,000 of them, each after one request), beside sockets alone.
//!
//! Run: `cargo bench -p mesh-agent --bench allocs` (REQUESTS=N, default
//! 20,000 per row after 2,000 of warm-up; about 20 s).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../tests/support/mod.rs"]
mod support;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use std::net::SocketAddr;

/// Counts every allocation and the bytes asked for (stats_alloc wraps the
/// system allocator).
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// `n` GETs on one keep-alive HTTP/1.1 connection to `to` with `Host:
/// host`; every answer must be a 200. Returns allocations and bytes per
/// request.
async fn row(to: SocketAddr, host: &str, warm: usize, n: usize) -> (f64, f64) {
    let tcp = tokio::net::TcpStream::connect(to).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut region = None;
    for i in 0..warm + n {
        if i == warm {
            region = Some(Region::new(GLOBAL));
        }
        let req = http::Request::get("/bench")
            .header("host", host)
            .body(Empty::<Bytes>::new())
            .unwrap();
        s.ready().await.unwrap();
        let resp = s.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "request {i} to {to} failed");
        resp.into_body().collect().await.unwrap();
    }
    let c = region.expect("n > 0").change();
    #[allow(clippy::cast_precision_loss)]
    let per = |x: usize| x as f64 / n as f64;
    (
        per(c.allocations + c.reallocations),
        per(c.bytes_allocated + c.bytes_reallocated.max(0).unsigned_abs()),
    )
}

/// Heap bytes held per idle keep-alive connection: `n` connections to
/// `to`, one at a time, each having sent one GET (`Host: host`) and read
/// its 200 when `ask`, then kept open; the heap's growth over them, per
/// connection.
async fn idle(to: SocketAddr, host: &str, n: usize, ask: bool) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut held = Vec::with_capacity(n);
    let request = format!("GET /idle HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let region = Region::new(GLOBAL);
    for _ in 0..n {
        let mut c = tokio::net::TcpStream::connect(to).await.unwrap();
        if ask {
            c.write_all(request.as_bytes()).await.unwrap();
            let mut buf = [0u8; 4096];
            let mut got = 0;
            // The head, then as many body bytes as it announces.
            let want = loop {
                let k = c.read(&mut buf[got..]).await.unwrap();
                assert!(k > 0, "{to} closed the connection");
                got += k;
                let text = String::from_utf8_lossy(&buf[..got]).to_ascii_lowercase();
                if let Some(end) = text.find("\r\n\r\n") {
                    assert!(text.starts_with("http/1.1 200"), "{to} answered {text}");
                    let len: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    break end + 4 + len;
                }
            };
            while got < want {
                got += c.read(&mut buf[got..]).await.unwrap();
            }
        }
        held.push(c);
    }
    // Let every connection's task go idle.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let c = region.change();
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_wrap)]
    let net = c.bytes_allocated as isize - c.bytes_deallocated as isize + c.bytes_reallocated;
    drop(held);
    #[allow(clippy::cast_precision_loss)]
    let per = net as f64 / n as f64;
    per
}

/// The application: a fixed 200 over HTTP/1.1, recording nothing, so that
/// what it allocates is the same whoever calls it.
async fn app() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        http_body_util::Full::new(Bytes::from_static(b"hello from backend\n")),
                    ))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn main() {
    // `cargo bench` passes --bench and measures; `cargo test --benches` (the
    // test suite) runs it small, so that it cannot rot.
    let measure = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if measure { 20_000 } else { 100 });
    let (warm, conns) = if measure { (2_000, 1_000) } else { (10, 20) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mesh = support::Mesh::one_cluster_on("127.0.0.1").await;
        let app = app().await;
        let backend = mesh.c1_agent("backend", app, 9080, &[]).await;
        let frontend = mesh.c1_agent("frontend", app, 9080, &[]).await;
        support::wait_endpoints(&frontend, "backend", 1).await;
        let host = "backend.default:9080";
        let direct = row(app, host, warm, n).await;
        let mesh_path = row(frontend.outbound, host, warm, n).await;
        println!("allocations per request, {n} requests per row on one keep-alive connection");
        println!("{:<28} {:>12} {:>12}", "row", "allocs/req", "bytes/req");
        for (name, (a, b)) in [
            ("direct (client + app)", direct),
            ("mesh path (+ two agents)", mesh_path),
        ] {
            println!("{name:<28} {a:>12.1} {b:>12.0}");
        }
        println!(
            "{:<28} {:>12.1} {:>12.0}",
            "the two agents",
            mesh_path.0 - direct.0,
            mesh_path.1 - direct.1
        );
        // Idle connections: sockets alone (to a listener that only accepts
        // and keeps them), then to the outbound listener after a request.
        let bare = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bare_addr = bare.local_addr().unwrap();
        let keeper = tokio::spawn(async move {
            let mut kept = Vec::with_capacity(conns);
            while let Ok((s, _)) = bare.accept().await {
                kept.push(s);
            }
        });
        let sockets = idle(bare_addr, host, conns, false).await;
        keeper.abort();
        let agent = idle(frontend.outbound, host, conns, true).await;
        println!();
        println!("heap held per idle keep-alive connection, {conns} connections");
        println!("{:<28} {:>12}", "row", "bytes/conn");
        println!("{:<28} {sockets:>12.0}", "sockets alone (both ends)");
        println!("{:<28} {agent:>12.0}", "to the outbound agent");
        println!("{:<28} {:>12.0}", "the agent's share", agent - sockets);
        support::stop(vec![frontend, backend]).await;
    });
}
