//! The relay's data path on loopback: pass-through, delay, jitter, loss,
//! rate, cut, blackhole, runtime changes and bounded buffering.
//!
//! Timing assertions are lower bounds (guaranteed by the relay's clock) and
//! orderings between links in the same test; never tight upper bounds.

// Test code: a panic is a failure with a location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wan_relay::{Change, LinkOptions, Mode};

const MS: fn(u64) -> Duration = Duration::from_millis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_a_mebibyte_both_ways_intact() {
    within(60, async {
        let echo = echo_server().await;
        let relay = relay(&[("a", echo)], LinkOptions::default()).await;
        let s = connect(&relay, "a").await;
        let payload: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let (mut r, mut w) = s.into_split();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&sent).await.unwrap();
            // Half-close: the FIN goes through, the echo server closes after it.
            w.shutdown().await.unwrap();
            w
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        let _w = writer.await.unwrap();
        assert_eq!(back.len(), payload.len());
        assert!(back == payload, "the payload came back altered");
        let c = relay.link("a").unwrap().counters();
        assert_eq!(c.accepted, 1);
        assert_eq!(c.bytes_to_target, 1 << 20);
        assert_eq!(c.bytes_to_client, 1 << 20);
        assert_eq!(c.reset + c.errors, 0);
        // The connection ends once both FINs are through.
        let deadline = Instant::now() + Duration::from_secs(10);
        while relay.link("a").unwrap().counters().active != 0 {
            assert!(Instant::now() < deadline, "connection still active");
            tokio::time::sleep(MS(10)).await;
        }
        assert_eq!(relay.link("a").unwrap().counters().in_flight_to_target, 0);
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_applies_in_each_direction() {
    within(60, async {
        let echo = echo_server().await;
        let relay = relay(&[("slow", echo), ("fast", echo)], LinkOptions::default()).await;
        relay
            .link("slow")
            .unwrap()
            .set(&Change::new().delay(MS(50)))
            .unwrap();
        let mut slow = connect(&relay, "slow").await;
        let mut fast = connect(&relay, "fast").await;
        let mut slow_min = Duration::MAX;
        let mut fast_min = Duration::MAX;
        for i in 0..5u8 {
            let t = rtt(&mut slow, &[i; 100]).await;
            assert!(t >= MS(100), "round trip with 50 ms each way took {t:?}");
            slow_min = slow_min.min(t);
            fast_min = fast_min.min(rtt(&mut fast, &[i; 100]).await);
        }
        assert!(
            fast_min * 2 < slow_min,
            "no-delay link {fast_min:?} vs 50 ms link {slow_min:?}"
        );
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_does_not_limit_throughput_to_a_chunk_per_delay() {
    within(60, async {
        let echo = echo_server().await;
        let relay = relay(&[("a", echo)], LinkOptions::default()).await;
        relay
            .link("a")
            .unwrap()
            .set(&Change::new().delay(MS(100)))
            .unwrap();
        let s = connect(&relay, "a").await;
        let (mut r, mut w) = s.into_split();
        // 4 MiB at 16 KiB per chunk is 256 chunks: one per delay would take 50 s.
        let start = Instant::now();
        let writer = tokio::spawn(async move {
            w.write_all(&vec![7u8; 4 << 20]).await.unwrap();
            w.shutdown().await.unwrap();
            w
        });
        let mut n = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let k = r.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            n += k;
        }
        let _w = writer.await.unwrap();
        let took = start.elapsed();
        assert_eq!(n, 4 << 20);
        assert!(took >= MS(200), "{took:?}");
        assert!(
            took < Duration::from_secs(25),
            "delay throttled throughput: {took:?}"
        );
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitter_never_reorders_bytes() {
    within(60, async {
        let echo = echo_server().await;
        let relay = relay(&[("j", echo)], LinkOptions::default()).await;
        let link = relay.link("j").unwrap();
        link.set(&Change::new().delay(MS(5)).jitter(MS(20)))
            .unwrap();
        let s = connect(&relay, "j").await;
        let (mut r, mut w) = s.into_split();
        const N: u32 = 20_000;
        let writer = tokio::spawn(async move {
            for batch in 0..N / 50 {
                let mut bytes = Vec::with_capacity(200);
                for k in batch * 50..(batch + 1) * 50 {
                    bytes.extend_from_slice(&k.to_be_bytes());
                }
                w.write_all(&bytes).await.unwrap();
                // Separate chunks, each with its own jitter sample.
                if batch % 4 == 0 {
                    tokio::time::sleep(MS(1)).await;
                }
            }
            w
        });
        let mut buf = vec![0u8; N as usize * 4];
        r.read_exact(&mut buf).await.unwrap();
        let _w = writer.await.unwrap();
        for (i, c) in buf.chunks_exact(4).enumerate() {
            let k = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
            assert_eq!(k, i as u32, "byte order broken at number {i}");
        }
        assert!(link.counters().accepted == 1);
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_costs_a_retransmission_timeout_per_chunk() {
    within(60, async {
        let echo = echo_server().await;
        let relay = relay(&[("lossy", echo), ("clean", echo)], LinkOptions::default()).await;
        relay
            .link("lossy")
            .unwrap()
            .set(&Change::new().loss(1.0).rto(MS(200)))
            .unwrap();
        relay
            .link("clean")
            .unwrap()
            .set(&Change::new().loss(0.0).rto(MS(200)))
            .unwrap();
        let mut lossy = connect(&relay, "lossy").await;
        let mut clean = connect(&relay, "clean").await;
        let mut clean_min = Duration::MAX;
        for i in 0..3u8 {
            // One chunk each way, each lost once: two RTOs per round trip.
            let t = rtt(&mut lossy, &[i; 10]).await;
            assert!(t >= MS(400), "lossy round trip {t:?}");
            clean_min = clean_min.min(rtt(&mut clean, &[i; 10]).await);
        }
        assert!(clean_min < MS(200), "loss 0 round trip {clean_min:?}");
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_bandwidth() {
    within(60, async {
        let echo = echo_server().await;
        let relay = relay(&[("narrow", echo), ("wide", echo)], LinkOptions::default()).await;
        // 8 Mbit/s = 1 MB/s: 512 KiB takes at least 0.52 s each way.
        relay
            .link("narrow")
            .unwrap()
            .set(&Change::new().rate_mbps(8.0))
            .unwrap();
        let mut times = Vec::new();
        for name in ["narrow", "wide"] {
            let mut s = connect(&relay, name).await;
            let payload = vec![1u8; 512 << 10];
            let start = Instant::now();
            let (mut r, mut w) = s.split();
            let (_, back) = tokio::join!(async { w.write_all(&payload).await.unwrap() }, async {
                let mut back = vec![0u8; payload.len()];
                r.read_exact(&mut back).await.unwrap();
                back
            });
            assert!(back == payload);
            times.push(start.elapsed());
        }
        assert!(
            times[0] >= MS(500),
            "8 Mbit/s link moved 512 KiB in {:?}",
            times[0]
        );
        assert!(
            times[1] < times[0],
            "unlimited {:?} vs limited {:?}",
            times[1],
            times[0]
        );
        // The limit is the link's, shared by its connections: two at once
        // moving 256 KiB each take as long as one moving 512 KiB.
        let start = Instant::now();
        let one_way = |mut s: tokio::net::TcpStream| async move {
            let payload = vec![2u8; 256 << 10];
            let (mut r, mut w) = s.split();
            let (_, back) = tokio::join!(async { w.write_all(&payload).await.unwrap() }, async {
                let mut back = vec![0u8; payload.len()];
                r.read_exact(&mut back).await.unwrap();
                back
            });
            assert!(back == payload);
        };
        let (s1, s2) = (
            connect(&relay, "narrow").await,
            connect(&relay, "narrow").await,
        );
        tokio::join!(one_way(s1), one_way(s2));
        let both = start.elapsed();
        assert!(
            both >= MS(500),
            "two connections moved 2 x 256 KiB in {both:?}"
        );
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_resets_and_refuses_then_pass_restores() {
    within(60, async {
        let echo = echo_server().await;
        let relay = relay(&[("a", echo)], LinkOptions::default()).await;
        let link = relay.link("a").unwrap();
        let mut old = connect(&relay, "a").await;
        rtt(&mut old, b"hello").await;
        link.set(&Change::new().mode(Mode::Cut)).unwrap();
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_secs(10), old.read(&mut buf))
            .await
            .expect("the cut connection was neither reset nor closed")
        {
            Ok(0) => {}
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            Ok(n) => panic!("read {n} bytes through a cut"),
        }
        // A new connection is accepted by the kernel and reset at once.
        match tokio::net::TcpStream::connect(link.addr()).await {
            Err(_) => {}
            Ok(mut s) => assert!(
                is_closed(&mut s, b"x", 10).await,
                "new connection not reset"
            ),
        }
        let c = link.counters();
        assert_eq!(c.reset, 1, "{c:?}");
        assert!(c.refused >= 1, "{c:?}");
        link.set(&Change::new().mode(Mode::Pass)).unwrap();
        let mut new = connect(&relay, "a").await;
        rtt(&mut new, b"back again").await;
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackhole_holds_silently_then_pass_restores() {
    within(60, async {
        let echo = echo_server().await;
        let relay = relay(&[("a", echo)], LinkOptions::default()).await;
        let link = relay.link("a").unwrap();
        let mut busy = connect(&relay, "a").await;
        let mut idle = connect(&relay, "a").await;
        rtt(&mut busy, b"one").await;
        rtt(&mut idle, b"two").await;
        link.set(&Change::new().mode(Mode::Blackhole)).unwrap();

        // Existing connection: open, nothing comes back, no reset.
        busy.write_all(b"into the void").await.unwrap();
        assert!(
            silent_for(&mut busy, 500).await,
            "bytes or a close came through a blackhole"
        );
        // New connection: accepted, then ignored.
        let mut new = connect(&relay, "a").await;
        new.write_all(b"hello?").await.unwrap();
        assert!(
            silent_for(&mut new, 500).await,
            "a new connection got an answer"
        );
        let c = link.counters();
        assert_eq!(c.reset, 0, "{c:?}");
        assert_eq!(c.active, 3, "{c:?}");
        assert!(c.bytes_discarded >= 19, "{c:?}");

        link.set(&Change::new().mode(Mode::Pass)).unwrap();
        // Connections that lost bytes in the blackhole are reset...
        assert!(
            is_closed(&mut busy, b"", 10).await,
            "busy connection not reset"
        );
        assert!(
            is_closed(&mut new, b"", 10).await,
            "new connection not reset"
        );
        // ...one that lost nothing resumes...
        rtt(&mut idle, b"still here").await;
        // ...and new connections work.
        let mut fresh = connect(&relay, "a").await;
        rtt(&mut fresh, b"fresh").await;
        assert_eq!(link.counters().reset, 2);
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_accepted_in_a_blackhole_connects_when_it_ends_if_nothing_was_lost() {
    within(60, async {
        let echo = echo_server().await;
        let relay = relay(&[("a", echo)], LinkOptions::default()).await;
        let link = relay.link("a").unwrap();
        link.set(&Change::new().mode(Mode::Blackhole)).unwrap();
        let mut s = connect(&relay, "a").await;
        assert!(silent_for(&mut s, 200).await);
        link.set(&Change::new().mode(Mode::Pass)).unwrap();
        rtt(&mut s, b"late but whole").await;
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_applies_to_an_existing_connection() {
    within(60, async {
        let echo = echo_server().await;
        let relay = relay(&[("a", echo)], LinkOptions::default()).await;
        let mut s = connect(&relay, "a").await;
        let mut before = Duration::MAX;
        for _ in 0..3 {
            before = before.min(rtt(&mut s, b"ping").await);
        }
        relay
            .link("a")
            .unwrap()
            .set(&Change::new().delay(MS(100)))
            .unwrap();
        let after = rtt(&mut s, b"ping").await;
        assert!(after >= MS(200), "{after:?}");
        assert!(before * 2 < after, "before {before:?}, after {after:?}");
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffering_is_bounded_when_the_far_side_does_not_read() {
    within(60, async {
        let sink = sink_server().await;
        let options = LinkOptions {
            max_in_flight: 64 << 10,
            read_buffer: 8 << 10,
            ..LinkOptions::default()
        };
        let relay = relay(&[("a", sink)], options).await;
        let link = relay.link("a").unwrap();
        let mut s = connect(&relay, "a").await;
        let chunk = vec![3u8; 64 << 10];
        let mut written = 0usize;
        let cap = 256usize << 20;
        // Write until a write stalls for a second.
        while let Ok(r) = tokio::time::timeout(Duration::from_secs(1), s.write_all(&chunk)).await {
            r.unwrap();
            written += chunk.len();
            assert!(
                written < cap,
                "the relay took {written} bytes without stalling"
            );
        }
        let c = link.counters();
        let bound = (options.max_in_flight + options.read_buffer) as u64;
        assert!(c.peak_in_flight <= bound, "{c:?}");
        assert!(c.in_flight_to_target <= bound, "{c:?}");
        // The bound also counts 64 bytes per queued chunk (8 KiB here).
        assert!(
            c.in_flight_to_target >= options.max_in_flight as u64 * 3 / 4,
            "the relay stopped reading before its bound: {c:?}"
        );
        drop(s);
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_target_resets_the_client() {
    within(60, async {
        // A port that was just free: nothing listens there.
        let free = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let relay = relay(&[("a", free)], LinkOptions::default()).await;
        // The relay accepts, fails to reach the target and resets: the
        // reset can come before the client's connect has completed, which
        // then fails with ECONNRESET; either way the client sees a reset.
        match tokio::net::TcpStream::connect(relay.link("a").unwrap().addr()).await {
            Ok(mut s) => assert!(is_closed(&mut s, b"", 10).await),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
        assert_eq!(relay.link("a").unwrap().counters().errors, 1);
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_and_frees_the_port() {
    within(60, async {
        let echo = echo_server().await;
        let relay = relay(&[("a", echo)], LinkOptions::default()).await;
        let addr = relay.link("a").unwrap().addr();
        let mut s = connect(&relay, "a").await;
        rtt(&mut s, b"x").await;
        relay.shutdown().await;
        assert!(is_closed(&mut s, b"", 10).await);
        // The listener is gone: the port can be bound again.
        tokio::net::TcpListener::bind(addr).await.unwrap();
    })
    .await;
}
