//! The control API over real HTTP: raw requests and the typed client.

// Test code: a panic is a failure with a location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wan_relay::control::{Client, ClientError};
use wan_relay::{Change, Impairment, LinkOptions, Mode, Relay};

/// One HTTP/1.1 request on a fresh connection: the status and the JSON body.
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    let resp = String::from_utf8(resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    (status, serde_json::from_str(body).unwrap())
}

async fn two_links() -> Relay {
    let echo = echo_server().await;
    relay_with(
        &[("a", echo), ("b", echo)],
        LinkOptions::default(),
        Impairment::default(),
        true,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_put_round_trip() {
    within(60, async {
        let relay = two_links().await;
        let ctl = relay.control_addr().unwrap();
        // Some traffic for the counters.
        let mut s = connect(&relay, "a").await;
        rtt(&mut s, b"count me").await;

        // A chunk is counted once written on: the echo can come back
        // before the count is in, so the counters are read until it is.
        let (status, all) = loop {
            let (status, all) = http(ctl, "GET", "/links", "").await;
            if all["links"]["a"]["counters"]["bytes_to_target"] == 8
                && all["links"]["a"]["counters"]["bytes_to_client"] == 8
            {
                break (status, all);
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        assert_eq!(status, 200);
        let a = &all["links"]["a"];
        assert_eq!(a["name"], "a");
        assert_eq!(
            a["listen"],
            relay.link("a").unwrap().addr().to_string().as_str()
        );
        assert_eq!(
            a["target"],
            relay.link("a").unwrap().target().to_string().as_str()
        );
        assert_eq!(
            a["impairment"],
            json!({"delay_ms": 0, "jitter_ms": 0, "loss": 0.0, "rto_ms": 200, "rate_mbps": 0.0, "mode": "pass"})
        );
        assert_eq!(a["counters"]["accepted"], 1);
        assert_eq!(a["counters"]["active"], 1);
        assert_eq!(a["counters"]["bytes_to_target"], 8);
        assert_eq!(a["counters"]["bytes_to_client"], 8);
        assert_eq!(a["options"]["max_in_flight"], 4 << 20);
        assert_eq!(all["links"]["b"]["counters"]["accepted"], 0);

        let (status, a) = http(
            ctl,
            "PUT",
            "/links/a",
            r#"{"delay_ms":30,"jitter_ms":5,"loss":0.01,"mode":"blackhole"}"#,
        )
        .await;
        assert_eq!(status, 200, "{a}");
        assert_eq!(
            a["impairment"],
            json!({"delay_ms": 30, "jitter_ms": 5, "loss": 0.01, "rto_ms": 200, "rate_mbps": 0.0, "mode": "blackhole"})
        );
        let i = relay.link("a").unwrap().impairment();
        assert_eq!(i.delay, Duration::from_millis(30));
        assert_eq!(i.mode, Mode::Blackhole);

        // Partial update: only the loss changes.
        let (status, a) = http(ctl, "PUT", "/links/a/", r#"{"loss":0.5,"mode":"pass"}"#).await;
        assert_eq!(status, 200, "{a}");
        let (status, got) = http(ctl, "GET", "/links/a", "").await;
        assert_eq!(status, 200);
        assert_eq!(got["impairment"]["loss"], 0.5);
        assert_eq!(got["impairment"]["delay_ms"], 30);
        assert_eq!(got["impairment"]["mode"], "pass");
        // b untouched.
        assert_eq!(
            relay.link("b").unwrap().impairment(),
            Impairment::default()
        );
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_are_refused_naming_the_field() {
    within(60, async {
        let relay = two_links().await;
        let ctl = relay.control_addr().unwrap();
        for (body, field) in [
            (r#"{"loss":1.5}"#, "loss"),
            (r#"{"delay_ms":-10}"#, "delay_ms"),
            (r#"{"jitter_ms":"5ms"}"#, "jitter_ms"),
            (r#"{"mode":"drop"}"#, "mode"),
            (r#"{"delay_ms":10,"colour":"red"}"#, "colour"),
            (r#"{"rate_mbps":-1}"#, "rate_mbps"),
            (r#"{"delay_ms":"#, "body"),
            (r#"[1,2]"#, "body"),
        ] {
            let (status, err) = http(ctl, "PUT", "/links/a", body).await;
            assert_eq!(status, 400, "{body}: {err}");
            let msg = err["error"].as_str().unwrap();
            assert!(msg.starts_with(field), "{body}: {msg}");
        }
        // Nothing changed, not even the valid field beside a bad one.
        assert_eq!(relay.link("a").unwrap().impairment(), Impairment::default());
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_links_and_paths_are_404_and_other_methods_405() {
    within(60, async {
        let relay = two_links().await;
        let ctl = relay.control_addr().unwrap();
        let (status, err) = http(ctl, "GET", "/links/nope", "").await;
        assert_eq!(status, 404);
        assert!(err["error"].as_str().unwrap().contains("nope"));
        let (status, _) = http(ctl, "PUT", "/links/nope", r#"{"delay_ms":1}"#).await;
        assert_eq!(status, 404);
        let (status, _) = http(ctl, "GET", "/elsewhere", "").await;
        assert_eq!(status, 404);
        let (status, _) = http(ctl, "DELETE", "/links/a", "").await;
        assert_eq!(status, 405);
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_many_is_all_or_nothing() {
    within(60, async {
        let relay = two_links().await;
        let ctl = relay.control_addr().unwrap();
        let (status, res) =
            http(ctl, "PUT", "/links", r#"{"links":["a","b"],"delay_ms":10}"#).await;
        assert_eq!(status, 200, "{res}");
        assert_eq!(res["links"]["a"]["impairment"]["delay_ms"], 10);
        assert_eq!(res["links"]["b"]["impairment"]["delay_ms"], 10);

        let (status, err) = http(
            ctl,
            "PUT",
            "/links",
            r#"{"links":["a","zzz"],"delay_ms":99}"#,
        )
        .await;
        assert_eq!(status, 404);
        assert!(err["error"].as_str().unwrap().contains("zzz"), "{err}");
        for (body, field) in [
            (r#"{"links":["a","b"],"loss":2}"#, "loss"),
            (r#"{"links":[],"loss":0}"#, "links"),
            (r#"{"links":"a","loss":0}"#, "links"),
            (r#"{"loss":0}"#, "links"),
            (r#"{"links":["a"],"nope":1}"#, "nope"),
        ] {
            let (status, err) = http(ctl, "PUT", "/links", body).await;
            assert_eq!(status, 400, "{body}: {err}");
            assert!(
                err["error"].as_str().unwrap().starts_with(field),
                "{body}: {err}"
            );
        }
        for name in ["a", "b"] {
            let i = relay.link(name).unwrap().impairment();
            assert_eq!(i.delay, Duration::from_millis(10), "{name}");
            assert_eq!(i.loss, 0.0, "{name}");
        }
        // The in-process API is all-or-nothing too.
        let err = relay
            .set_many(
                &["a", "b", "c"],
                &Change::new().delay(Duration::from_millis(7)),
            )
            .unwrap_err();
        assert!(err.to_string().contains("\"c\""), "{err}");
        assert_eq!(
            relay.link("a").unwrap().impairment().delay,
            Duration::from_millis(10)
        );
        relay.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_client() {
    within(60, async {
        let relay = two_links().await;
        let client = Client::new(relay.control_addr().unwrap());
        let all = client.list().await.unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(all["a"].listen, relay.link("a").unwrap().addr());

        let a = client
            .set(
                "a",
                &Change::new()
                    .delay(Duration::from_millis(25))
                    .jitter(Duration::from_micros(1500))
                    .mode(Mode::Cut),
            )
            .await
            .unwrap();
        assert_eq!(a.impairment.delay, Duration::from_millis(25));
        assert_eq!(a.impairment.jitter, Duration::from_micros(1500));
        assert_eq!(a.impairment.mode, Mode::Cut);
        assert_eq!(client.get("a").await.unwrap().impairment, a.impairment);
        assert_eq!(relay.link("a").unwrap().impairment(), a.impairment);

        let both = client
            .set_many(&["a", "b"], &Change::new().mode(Mode::Pass).loss(0.25))
            .await
            .unwrap();
        assert_eq!(both.len(), 2);
        assert!(both
            .values()
            .all(|l| l.impairment.loss == 0.25 && l.impairment.mode == Mode::Pass));

        match client.get("zzz").await {
            Err(ClientError::Status {
                status: 404,
                message,
                ..
            }) => {
                assert!(message.contains("zzz"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        match client.set("a", &Change::new().loss(3.0)).await {
            Err(ClientError::Status {
                status: 400,
                message,
                ..
            }) => {
                assert!(message.starts_with("loss"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        match client
            .set_many(&["a", "zzz"], &Change::new().loss(0.5))
            .await
        {
            Err(ClientError::Status { status: 404, .. }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(relay.link("a").unwrap().impairment().loss, 0.25);

        let addr = relay.control_addr().unwrap();
        relay.shutdown().await;
        // Nothing listens any more.
        match Client::new(addr).list().await {
            Err(ClientError::Transport { .. }) => {}
            other => panic!("{other:?}"),
        }
    })
    .await;
}
