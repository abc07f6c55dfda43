use super::*;
use proptest::prelude::*;

const MAX: usize = 16 * 1024;
const SNI: &str = "outbound_.9080_._.reviews.default.svc.cluster.local";

fn testdata(name: &str) -> Vec<u8> {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Recorded ClientHellos of real clients, with the server name and version they carry.
fn recorded() -> Vec<(&'static str, Vec<u8>, Option<&'static str>, u16)> {
    vec![
        (
            "openssl-tls13.bin",
            testdata("openssl-tls13.bin"),
            Some(SNI),
            0x0304,
        ),
        (
            "openssl-tls12.bin",
            testdata("openssl-tls12.bin"),
            Some("outbound_.9080_.v1_.reviews.default.svc.cluster.local"),
            0x0303,
        ),
        (
            "openssl-nosni.bin",
            testdata("openssl-nosni.bin"),
            None,
            0x0304,
        ),
        ("curl.bin", testdata("curl.bin"), Some(SNI), 0x0304),
        ("rustls.bin", testdata("rustls.bin"), Some(SNI), 0x0304),
    ]
}

fn done(buf: &[u8]) -> ClientHello {
    match parse(buf, MAX) {
        Ok(Peek::Done(h)) => h,
        other => panic!("expected a complete hello, got {other:?}"),
    }
}

#[test]
fn recorded_hellos_parse() {
    for (name, bytes, sni, version) in recorded() {
        let h = done(&bytes);
        assert_eq!(h.server_name.as_deref(), sni, "{name}");
        assert_eq!(h.version, version, "{name}");
        assert_eq!(
            h.len,
            bytes.len(),
            "{name}: the capture is exactly the hello"
        );
    }
}

/// Every strict prefix of a real hello asks for more; none errs or
/// completes early. This is what arrives as TCP delivers a hello in pieces.
#[test]
fn every_prefix_needs_more() {
    for (name, bytes, _, _) in recorded() {
        for n in 0..bytes.len() {
            match parse(&bytes[..n], MAX) {
                Ok(Peek::NeedMore(k)) => assert!(
                    k >= 1 && n + k <= bytes.len(),
                    "{name} prefix {n}: asks {k}"
                ),
                other => panic!("{name} prefix {n}: {other:?}"),
            }
        }
    }
}

/// Bytes after the hello (a client that pipelines) do not disturb it.
#[test]
fn bytes_after_the_hello_are_left_alone() {
    for (name, mut bytes, sni, _) in recorded() {
        let len = bytes.len();
        bytes.extend_from_slice(&[23, 3, 3, 0, 5, 1, 2, 3, 4, 5]);
        let h = done(&bytes);
        assert_eq!((h.len, h.server_name.as_deref()), (len, sni), "{name}");
    }
}

/// Splits the handshake message of a one-record hello into records of `size` bytes.
fn refragment(hello: &[u8], size: usize) -> Vec<u8> {
    let version = [hello[1], hello[2]];
    let msg = &hello[RECORD_HEADER..];
    let mut out = Vec::new();
    for chunk in msg.chunks(size) {
        out.push(CONTENT_HANDSHAKE);
        out.extend_from_slice(&version);
        out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[test]
fn a_hello_spanning_several_records() {
    for (name, bytes, sni, _) in recorded() {
        for size in [1, 2, 3, 4, 5, 7, 64, 100] {
            let split = refragment(&bytes, size);
            let h = done(&split);
            assert_eq!(
                h.server_name.as_deref(),
                sni,
                "{name} in {size}-byte records"
            );
            assert_eq!(h.len, split.len());
            // And every prefix of the fragmented form asks for more.
            for n in 0..split.len() {
                assert!(
                    matches!(parse(&split[..n], MAX), Ok(Peek::NeedMore(_))),
                    "{name}/{size} prefix {n}"
                );
            }
        }
    }
}

/// Builds a ClientHello handshake message by hand.
fn build(suites: &[u16], exts: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.push(0); // no session id
    body.extend_from_slice(&u16::try_from(suites.len() * 2).unwrap().to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // null compression
    let mut e = Vec::new();
    for (ty, data) in exts {
        e.extend_from_slice(&ty.to_be_bytes());
        e.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
        e.extend_from_slice(data);
    }
    body.extend_from_slice(&u16::try_from(e.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&e);
    let mut msg = vec![HANDSHAKE_CLIENT_HELLO];
    msg.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    msg.extend_from_slice(&body);
    record(&msg)
}

fn record(msg: &[u8]) -> Vec<u8> {
    let mut r = vec![CONTENT_HANDSHAKE, 3, 1];
    r.extend_from_slice(&u16::try_from(msg.len()).unwrap().to_be_bytes());
    r.extend_from_slice(msg);
    r
}

fn sni_ext(names: &[(u8, &str)]) -> Vec<u8> {
    let mut list = Vec::new();
    for (ty, n) in names {
        list.push(*ty);
        list.extend_from_slice(&u16::try_from(n.len()).unwrap().to_be_bytes());
        list.extend_from_slice(n.as_bytes());
    }
    let mut d = u16::try_from(list.len()).unwrap().to_be_bytes().to_vec();
    d.extend_from_slice(&list);
    d
}

#[test]
fn grease_values_are_skipped() {
    // GREASE (RFC 8701): reserved cipher suites, extension types and versions.
    let hello = build(
        &[0x0a0a, 0x1301, 0x1302],
        &[
            (0x1a1a, vec![]),
            (0, sni_ext(&[(0, SNI)])),
            (43, vec![4, 0xfa, 0xfa, 0x03, 0x04]),
            (0xfafa, vec![0]),
        ],
    );
    let h = done(&hello);
    assert_eq!(h.server_name.as_deref(), Some(SNI));
    assert_eq!(h.version, 0x0304);
}

#[test]
fn tls12_hello_without_extensions_has_no_name() {
    let mut msg = vec![HANDSHAKE_CLIENT_HELLO, 0, 0, 0];
    let mut body = vec![3, 3];
    body.extend_from_slice(&[1; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x00, 0x2f, 1, 0]);
    msg[3] = u8::try_from(body.len()).unwrap();
    msg.extend_from_slice(&body);
    let h = done(&record(&msg));
    assert_eq!(h.server_name, None);
    assert_eq!(h.version, 0x0303);
}

#[test]
fn refusals_say_why() {
    let good = build(&[0x1301], &[(0, sni_ext(&[(0, SNI)]))]);
    let cases: Vec<(Vec<u8>, HelloError)> = vec![
        (b"GET / HTTP/1.1\r\n\r\n".to_vec(), HelloError::NotTls),
        (b"\x16\x02\x00".to_vec(), HelloError::NotTls), // SSL 2-ish major version
        (b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(), HelloError::NotTls),
        (record(&[2, 0, 0, 1, 0]), HelloError::NotClientHello), // a ServerHello
        (
            vec![22, 3, 1, 0, 0],
            HelloError::Malformed("empty handshake record"),
        ),
        (
            vec![22, 3, 1, 0x40, 0x01],
            HelloError::Malformed("record longer than 2^14 bytes"),
        ),
        // Claims a 1 MiB hello: refused from the header alone, before buffering it.
        (
            vec![22, 3, 1, 0x40, 0x00, 1, 0x10, 0, 0],
            HelloError::TooLarge,
        ),
        (
            build(
                &[0x1301],
                &[(0, sni_ext(&[(0, SNI)])), (0, sni_ext(&[(0, SNI)]))],
            ),
            HelloError::Malformed("an extension appears twice"),
        ),
        (
            build(
                &[0x1301],
                &[(0, sni_ext(&[(0, "a.example"), (0, "b.example")]))],
            ),
            HelloError::Malformed("two host_name entries"),
        ),
        (
            build(&[0x1301], &[(0, sni_ext(&[(0, "bad name")]))]),
            HelloError::Malformed("host_name is empty or not printable ASCII"),
        ),
        (build(&[], &[]), HelloError::Malformed("cipher_suites")),
    ];
    for (bytes, want) in cases {
        assert_eq!(parse(&bytes, MAX), Err(want), "{bytes:02x?}");
    }
    // A record interrupting a multi-record hello.
    let mut split = refragment(&good, 10);
    let second = 15; // first record (5 + 10) then the second record's header
    split[second] = 23;
    assert_eq!(
        parse(&split, MAX),
        Err(HelloError::Malformed(
            "a non-handshake record interrupts the ClientHello"
        ))
    );
    // Bytes after the hello inside its own record.
    let mut msg = good[RECORD_HEADER..].to_vec();
    msg.push(0);
    assert_eq!(
        parse(&record(&msg), MAX),
        Err(HelloError::Malformed(
            "bytes after the ClientHello in its record"
        ))
    );
    // The size limit applies to what the client claims.
    assert_eq!(parse(&good, 20), Err(HelloError::TooLarge));
}

#[test]
fn hellos_from_rustls_now() {
    // A hello produced live by today's rustls, beside the recorded one.
    let bytes = rustls_hello(SNI);
    let h = done(&bytes);
    assert_eq!(h.server_name.as_deref(), Some(SNI));
    assert_eq!(h.version, 0x0304);
    if std::env::var_os("FEDMESH_BLESS").is_some() {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/rustls.bin");
        std::fs::write(p, &bytes).unwrap();
    }
}

fn rustls_hello(name: &str) -> Vec<u8> {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), server).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

proptest! {
    #[test]
    fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse(&b, MAX);
    }

    #[test]
    fn handshake_shaped_garbage_never_panics(
        len in 0u16..600,
        b in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut buf = vec![22, 3, 1];
        buf.extend_from_slice(&len.to_be_bytes());
        buf.push(1);
        buf.extend_from_slice(&b);
        let _ = parse(&buf, MAX);
    }

    /// Corrupting or truncating a real hello never panics, and whatever
    /// parses never claims more bytes than it was given.
    #[test]
    fn mutated_real_hellos_never_panic(
        which in 0usize..5, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut bytes = recorded().swap_remove(which).1;
        for (at, v) in flips {
            let i = at % bytes.len();
            bytes[i] = v;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        if let Ok(Peek::Done(h)) = parse(&bytes, MAX) {
            prop_assert!(h.len <= bytes.len());
        }
    }

    /// Any valid name in any fragmentation comes out as it went in.
    #[test]
    fn names_survive_fragmentation(name in "[a-z0-9]{1,20}(\\.[a-z0-9_-]{1,20}){0,4}", size in 1usize..80) {
        let hello = build(&[0x1301, 0x1302], &[(0x2a2a, vec![]), (0, sni_ext(&[(0, &name)]))]);
        let split = refragment(&hello, size);
        prop_assert_eq!(parse(&split, MAX), Ok(Peek::Done(ClientHello { server_name: Some(name), version: 0x0303, len: split.len() })));
    }
}
