//! The PROXY protocol, version 2 (binary), as haproxy specifies it
//! (<https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>): how an
//! L4 relay or load balancer tells the server behind it who the client is.
//!
//! The sender writes one header at the very start of the connection, before
//! any byte of the client's own:
//!
//! | bytes | field |
//! |---|---|
//! | 12 | signature `\r\n\r\n\0\r\nQUIT\n` |
//! | 1 | version (high nibble, 2) and command (low nibble: 0 LOCAL, 1 PROXY) |
//! | 1 | address family (high nibble: 0 UNSPEC, 1 INET, 2 INET6, 3 UNIX) and transport (low nibble: 0 UNSPEC, 1 STREAM, 2 DGRAM) |
//! | 2 | length of what follows, big-endian |
//! | len | source and destination addresses, source and destination ports, then optional TLVs |
//!
//! [`encode_v2`] writes a PROXY header for a TCP connection; [`read_v2`]
//! reads exactly one header from a stream and not one byte more, so that
//! what follows (a TLS ClientHello) stays unread; [`parse_v2`] does the same
//! on a buffer. TLVs are skipped. The text version 1 (`PROXY TCP4 ...`) is
//! refused, by name.
//!
//! ```
//! # tokio_test_block_on(async {
//! use mesh_core::proxy_protocol::{encode_v2, read_v2, DEFAULT_MAX_LEN};
//! let src = "198.51.100.7:40000".parse().unwrap();
//! let dst = "203.0.113.1:15443".parse().unwrap();
//! let mut wire = encode_v2(src, dst);
//! wire.extend_from_slice(b"\x16\x03\x01"); // the ClientHello that follows
//! let mut r = &wire[..];
//! let h = read_v2(&mut r, DEFAULT_MAX_LEN).await.unwrap();
//! assert_eq!(h.source, Some(src));
//! assert_eq!(h.destination, Some(dst));
//! assert_eq!(r, b"\x16\x03\x01", "the bytes after the header are not read");
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12 bytes every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Length of the fixed part: signature, version and command, family, length.
pub const FIXED_LEN: usize = 16;

/// A sensible bound on the variable part (addresses and TLVs): 4 KiB, far
/// above the 216 bytes of the largest address block plus the few TLVs load
/// balancers add (AWS NLB's VPC endpoint ID, a few dozen bytes).
pub const DEFAULT_MAX_LEN: usize = 4096;

/// Start of a version 1 (text) header.
const V1_PREFIX: &[u8] = b"PROXY ";

const CMD_LOCAL: u8 = 0x0;
const CMD_PROXY: u8 = 0x1;
const AF_UNSPEC: u8 = 0x0;
const AF_INET: u8 = 0x1;
const AF_INET6: u8 = 0x2;
const AF_UNIX: u8 = 0x3;
const PROTO_STREAM: u8 = 0x1;
const PROTO_DGRAM: u8 = 0x2;

/// What a header says: the original connection's endpoints.
///
/// Both are `None` for a LOCAL command (a connection the relay made itself,
/// e.g. a health check), for the UNSPEC family, and for addresses other than
/// TCP over IPv4 or IPv6 (UNIX sockets, UDP): the receiver then keeps the
/// connection's own peer. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is
/// returned as the IPv4 address it maps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Header {
    /// The client: who opened the connection to the relay.
    pub source: Option<SocketAddr>,
    /// The address the client connected to (the relay's).
    pub destination: Option<SocketAddr>,
}

/// Why a header was refused. Every message starts with what was expected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes do not start with the version 2 signature.
    #[error(
        "expected a PROXY protocol v2 header from a trusted source, got bytes that are not one"
    )]
    NotV2,
    /// A version 1 (text) header: only version 2 is accepted.
    #[error("expected a PROXY protocol v2 header from a trusted source, got a v1 (text) header: configure the sender for v2")]
    Version1,
    /// The signature is right, the version nibble is not 2.
    #[error("expected a PROXY protocol v2 header, got version {0}")]
    Version(u8),
    /// A command other than LOCAL (0) or PROXY (1).
    #[error("PROXY protocol v2 header: unknown command {0:#x} (expected 0 LOCAL or 1 PROXY)")]
    Command(u8),
    /// An address family or transport the specification does not define.
    #[error("PROXY protocol v2 header: unknown address family and transport {0:#04x}")]
    Family(u8),
    /// The announced length is over the reader's bound.
    #[error("PROXY protocol v2 header: {len} bytes of addresses and TLVs announced, more than the {max} accepted")]
    TooLong {
        /// The announced length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The announced length cannot hold the family's addresses.
    #[error("PROXY protocol v2 header: {len} bytes announced, too short for {family} addresses ({need} bytes)")]
    TooShort {
        /// `TCP4`, `UDP6`, `UNIX`...
        family: &'static str,
        /// The announced length.
        len: usize,
        /// What the family's addresses take.
        need: usize,
    },
    /// The stream ended inside the header.
    #[error(
        "PROXY protocol v2 header truncated: the connection closed after {got} of {want} bytes"
    )]
    Truncated {
        /// Bytes of the header received.
        got: usize,
        /// Bytes known to be needed so far.
        want: usize,
    },
    /// Reading failed.
    #[error("reading the PROXY protocol v2 header: {0}")]
    Io(#[from] io::Error),
}

/// A PROXY header for a TCP connection from `src` to `dst`: TCP4 when both
/// are IPv4, else TCP6 (an IPv4 address mapped to `::ffff:a.b.c.d`). 28 or
/// 52 bytes, no TLV.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_LEN + 36);
    out.extend_from_slice(&SIGNATURE);
    out.push(0x20 | CMD_PROXY);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            out.push((AF_INET << 4) | PROTO_STREAM);
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
        }
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(ip) => ip.to_ipv6_mapped(),
                IpAddr::V6(ip) => ip,
            };
            out.push((AF_INET6 << 4) | PROTO_STREAM);
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&v6(src).octets());
            out.extend_from_slice(&v6(dst).octets());
        }
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// A LOCAL header (UNSPEC family, no address): the relay's own connection,
/// e.g. a health check. 16 bytes.
pub fn encode_v2_local() -> Vec<u8> {
    let mut out = Vec::with_capacity(FIXED_LEN);
    out.extend_from_slice(&SIGNATURE);
    out.push(0x20 | CMD_LOCAL);
    out.push(AF_UNSPEC);
    out.extend_from_slice(&0u16.to_be_bytes());
    out
}

/// Reads one version 2 header from `r`: exactly its 16 fixed bytes, then
/// exactly the length they announce (at most `max_len`), never a byte more.
///
/// Refuses a stream as soon as its first bytes cannot be a version 2
/// header (without waiting for all 16). Does not time out: wrap it in the
/// caller's deadline.
pub async fn read_v2<R: AsyncRead + Unpin>(r: &mut R, max_len: usize) -> Result<Header, Error> {
    let mut fixed = [0u8; FIXED_LEN];
    let mut got = 0;
    while got < FIXED_LEN {
        let n = r.read(&mut fixed[got..]).await?;
        if n == 0 {
            check_prefix(&fixed[..got])?;
            return Err(if is_signature_prefix(&fixed[..got]) {
                Error::Truncated {
                    got,
                    want: FIXED_LEN,
                }
            } else {
                // An undecided v1 prefix ("PROX"): not v2 either way.
                Error::NotV2
            });
        }
        got += n;
        check_prefix(&fixed[..got])?;
    }
    let fixed_part = parse_fixed(&fixed, max_len)?;
    let mut body = vec![0u8; fixed_part.len];
    let mut read = 0;
    while read < body.len() {
        let n = r.read(&mut body[read..]).await?;
        if n == 0 {
            return Err(Error::Truncated {
                got: FIXED_LEN + read,
                want: FIXED_LEN + body.len(),
            });
        }
        read += n;
    }
    Ok(parse_body(&fixed_part, &body))
}

/// Parses a version 2 header at the start of `buf`: `Ok(None)` if `buf`
/// is too short to tell yet (16 bytes at least, then the announced length),
/// else the header and its length in bytes (what follows it is not part of
/// it). Refuses as [`read_v2`] does, as soon as the bytes present allow.
pub fn parse_v2(buf: &[u8], max_len: usize) -> Result<Option<(Header, usize)>, Error> {
    check_prefix(&buf[..buf.len().min(FIXED_LEN)])?;
    let Some(fixed) = buf.first_chunk::<FIXED_LEN>() else {
        return Ok(None);
    };
    let fixed_part = parse_fixed(fixed, max_len)?;
    let total = FIXED_LEN + fixed_part.len;
    match buf.get(FIXED_LEN..total) {
        Some(body) => Ok(Some((parse_body(&fixed_part, body), total))),
        None => Ok(None),
    }
}

fn is_signature_prefix(p: &[u8]) -> bool {
    let n = p.len().min(SIGNATURE.len());
    p[..n] == SIGNATURE[..n]
}

/// Refuses bytes that cannot start a version 2 header. `p` is at most 16 bytes.
fn check_prefix(p: &[u8]) -> Result<(), Error> {
    if is_signature_prefix(p) {
        return Ok(());
    }
    let n = p.len().min(V1_PREFIX.len());
    if p[..n] == V1_PREFIX[..n] {
        // "PROXY " is a v1 header; fewer bytes of it: wait for more (the
        // stream ending there is refused as not v2 by the reader).
        return if n == V1_PREFIX.len() {
            Err(Error::Version1)
        } else {
            Ok(())
        };
    }
    Err(Error::NotV2)
}

/// The fixed part, checked.
struct Fixed {
    command: u8,
    family: u8,
    len: usize,
}

fn parse_fixed(f: &[u8; FIXED_LEN], max_len: usize) -> Result<Fixed, Error> {
    if f[..12] != SIGNATURE {
        // Callers check the prefix first; kept so that this never trusts them.
        return Err(Error::NotV2);
    }
    let version = f[12] >> 4;
    if version != 2 {
        return Err(Error::Version(version));
    }
    let command = f[12] & 0x0f;
    if command != CMD_LOCAL && command != CMD_PROXY {
        return Err(Error::Command(command));
    }
    let family = f[13];
    let len = usize::from(u16::from_be_bytes([f[14], f[15]]));
    if len > max_len {
        return Err(Error::TooLong { len, max: max_len });
    }
    if command == CMD_PROXY {
        // A LOCAL header's address block is ignored, whatever it says.
        let (af, proto) = (family >> 4, family & 0x0f);
        if af > AF_UNIX || proto > PROTO_DGRAM {
            return Err(Error::Family(family));
        }
        if let Some((name, need)) = address_block(af, proto) {
            if len < need {
                return Err(Error::TooShort {
                    family: name,
                    len,
                    need,
                });
            }
        }
    }
    Ok(Fixed {
        command,
        family,
        len,
    })
}

/// The name and size of a family's address block; `None` for UNSPEC.
fn address_block(af: u8, proto: u8) -> Option<(&'static str, usize)> {
    let (names, need) = match af {
        AF_INET => (["INET", "TCP4", "UDP4"], 12),
        AF_INET6 => (["INET6", "TCP6", "UDP6"], 36),
        AF_UNIX => (["UNIX", "UNIX_STREAM", "UNIX_DGRAM"], 216),
        _ => return None,
    };
    Some((names[usize::from(proto.min(2))], need))
}

/// The addresses, for PROXY over TCP4 or TCP6. `body` holds `f.len` bytes,
/// at least the family's address block (checked by [`parse_fixed`]).
fn parse_body(f: &Fixed, body: &[u8]) -> Header {
    if f.command != CMD_PROXY || f.family & 0x0f != PROTO_STREAM {
        return Header::default();
    }
    let addrs = match f.family >> 4 {
        AF_INET => inet::<4>(body, |o| Ipv4Addr::from(o).into()),
        AF_INET6 => inet::<16>(body, |o| Ipv6Addr::from(o).to_canonical()),
        _ => None,
    };
    match addrs {
        Some((s, d)) => Header {
            source: Some(s),
            destination: Some(d),
        },
        None => Header::default(),
    }
}

/// Source and destination from an address block of `N`-byte addresses:
/// source address, destination address, source port, destination port.
fn inet<const N: usize>(
    body: &[u8],
    ip: impl Fn([u8; N]) -> IpAddr,
) -> Option<(SocketAddr, SocketAddr)> {
    let (src, rest) = body.split_first_chunk::<N>()?;
    let (dst, rest) = rest.split_first_chunk::<N>()?;
    let (sport, rest) = rest.split_first_chunk::<2>()?;
    let (dport, _) = rest.split_first_chunk::<2>()?;
    Some((
        SocketAddr::new(ip(*src), u16::from_be_bytes(*sport)),
        SocketAddr::new(ip(*dst), u16::from_be_bytes(*dport)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    /// Reads with `read_v2`, checks `parse_v2` agrees; the header and what
    /// was left unread.
    fn read(bytes: &[u8]) -> Result<(Header, Vec<u8>), Error> {
        let mut r = bytes;
        let got = block_on(read_v2(&mut r, DEFAULT_MAX_LEN));
        let parsed = parse_v2(bytes, DEFAULT_MAX_LEN);
        match (&got, &parsed) {
            (Ok(h), Ok(Some((p, n)))) => {
                assert_eq!(h, p);
                assert_eq!(*n, bytes.len() - r.len());
            }
            (Err(Error::Truncated { .. }), Ok(None)) => {}
            // A v1 prefix cut short: the reader knows it ended, the parser waits.
            (Err(Error::NotV2), Ok(None)) => {}
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            _ => panic!("read_v2 {got:?} but parse_v2 {parsed:?}"),
        }
        got.map(|h| (h, r.to_vec()))
    }

    fn header(cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut v = SIGNATURE.to_vec();
        v.push(cmd);
        v.push(family);
        v.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn round_trips_tcp4() {
        let (src, dst) = (sa("198.51.100.7:40000"), sa("203.0.113.1:15443"));
        let mut wire = encode_v2(src, dst);
        assert_eq!(wire.len(), 28);
        assert_eq!(&wire[12..16], &[0x21, 0x11, 0, 12]);
        wire.extend_from_slice(b"\x16\x03\x01rest");
        let (h, rest) = read(&wire).unwrap();
        assert_eq!(h.source, Some(src));
        assert_eq!(h.destination, Some(dst));
        assert_eq!(rest, b"\x16\x03\x01rest");
    }

    #[test]
    fn round_trips_tcp6() {
        let (src, dst) = (sa("[2001:db8::7]:40000"), sa("[2001:db8::1]:15443"));
        let wire = encode_v2(src, dst);
        assert_eq!(wire.len(), 52);
        assert_eq!(&wire[12..16], &[0x21, 0x21, 0, 36]);
        let (h, rest) = read(&wire).unwrap();
        assert_eq!(
            h,
            Header {
                source: Some(src),
                destination: Some(dst)
            }
        );
        assert!(rest.is_empty());
    }

    #[test]
    fn mixed_families_go_as_tcp6_and_come_back_as_given() {
        for (src, dst) in [
            (sa("198.51.100.7:1"), sa("[2001:db8::1]:2")),
            (sa("[2001:db8::7]:1"), sa("203.0.113.1:2")),
        ] {
            let wire = encode_v2(src, dst);
            assert_eq!(wire[13], 0x21);
            let (h, _) = read(&wire).unwrap();
            assert_eq!(h.source, Some(src));
            assert_eq!(h.destination, Some(dst));
        }
    }

    #[test]
    fn local_and_unspec_carry_no_address() {
        let (h, rest) = read(&[encode_v2_local(), b"tls".to_vec()].concat()).unwrap();
        assert_eq!(h, Header::default());
        assert_eq!(rest, b"tls");
        // LOCAL ignores whatever address block it carries, family included.
        let (h, _) = read(&header(0x20, 0x11, &[1; 12])).unwrap();
        assert_eq!(h, Header::default());
        let (h, _) = read(&header(0x20, 0xff, &[1; 3])).unwrap();
        assert_eq!(h, Header::default());
        // PROXY with UNSPEC, UNIX and UDP: no TCP addresses.
        let (h, _) = read(&header(0x21, 0x00, b"")).unwrap();
        assert_eq!(h, Header::default());
        let (h, _) = read(&header(0x21, 0x31, &[0; 216])).unwrap();
        assert_eq!(h, Header::default());
        let (h, _) = read(&header(0x21, 0x12, &[1; 12])).unwrap();
        assert_eq!(h, Header::default());
    }

    #[test]
    fn tlvs_are_skipped() {
        let mut body = vec![198, 51, 100, 7, 10, 0, 0, 1, 0x9c, 0x40, 0x3c, 0x4b];
        // PP2_TYPE_AWS (0xEA): a VPC endpoint ID; then a NOOP.
        body.extend_from_slice(&[0xea, 0x00, 0x17, 0x01]);
        body.extend_from_slice(b"vpce-08d2bf15fac5001c9");
        body.extend_from_slice(&[0x04, 0x00, 0x02, 0, 0]);
        let mut wire = header(0x21, 0x11, &body);
        wire.extend_from_slice(b"\x16after");
        let (h, rest) = read(&wire).unwrap();
        assert_eq!(h.source, Some(sa("198.51.100.7:40000")));
        assert_eq!(h.destination, Some(sa("10.0.0.1:15435")));
        assert_eq!(rest, b"\x16after");
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let tcp4 = encode_v2(sa("1.2.3.4:5"), sa("6.7.8.9:10"));
        let mut too_long = tcp4.clone();
        too_long[14..16].copy_from_slice(&4097u16.to_be_bytes());
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "TLS",
                vec![22, 3, 1, 2, 0, 1, 0, 1, 252, 3, 3, 0, 0, 0, 0, 0, 0],
                "expected a PROXY protocol v2 header from a trusted source, got bytes that are not one",
            ),
            (
                "HTTP",
                b"GET / HTTP/1.1\r\n".to_vec(),
                "got bytes that are not one",
            ),
            (
                "v1",
                b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 15443\r\n".to_vec(),
                "got a v1 (text) header",
            ),
            (
                "version 1 nibble",
                [&SIGNATURE[..], &[0x11, 0x11, 0, 12], &[0; 12]].concat(),
                "got version 1",
            ),
            (
                "command",
                [&SIGNATURE[..], &[0x22, 0x11, 0, 12], &[0; 12]].concat(),
                "unknown command 0x2",
            ),
            (
                "family",
                [&SIGNATURE[..], &[0x21, 0x41, 0, 12], &[0; 12]].concat(),
                "unknown address family and transport 0x41",
            ),
            (
                "transport",
                [&SIGNATURE[..], &[0x21, 0x13, 0, 12], &[0; 12]].concat(),
                "unknown address family and transport 0x13",
            ),
            (
                "too long",
                too_long,
                "4097 bytes of addresses and TLVs announced, more than the 4096 accepted",
            ),
            (
                "too short for TCP4",
                [&SIGNATURE[..], &[0x21, 0x11, 0, 11], &[0; 11]].concat(),
                "too short for TCP4 addresses (12 bytes)",
            ),
            (
                "too short for TCP6",
                [&SIGNATURE[..], &[0x21, 0x21, 0, 12], &[0; 12]].concat(),
                "too short for TCP6 addresses (36 bytes)",
            ),
            (
                "truncated fixed part",
                tcp4[..10].to_vec(),
                "closed after 10 of 16 bytes",
            ),
            (
                "truncated addresses",
                tcp4[..20].to_vec(),
                "closed after 20 of 28 bytes",
            ),
            ("empty", vec![], "closed after 0 of 16 bytes"),
            ("v1 cut short", b"PROX".to_vec(), "got bytes that are not one"),
        ];
        for (what, bytes, want) in cases {
            let e = read(&bytes).unwrap_err().to_string();
            assert!(e.contains(want), "{what}: {e:?} should say {want:?}");
        }
    }

    #[test]
    fn refuses_early_without_waiting_for_16_bytes() {
        // One byte that cannot start a signature: refused at once.
        assert!(matches!(parse_v2(&[0x16], 4096), Err(Error::NotV2)));
        assert!(matches!(parse_v2(b"PROXY ", 4096), Err(Error::Version1)));
        // A signature prefix, or a v1 prefix: more is needed.
        assert!(matches!(parse_v2(&SIGNATURE[..5], 4096), Ok(None)));
        assert!(matches!(parse_v2(b"PRO", 4096), Ok(None)));
        let tcp4 = encode_v2(sa("1.2.3.4:5"), sa("6.7.8.9:10"));
        assert!(matches!(parse_v2(&tcp4[..27], 4096), Ok(None)));
        assert!(matches!(parse_v2(&tcp4, 4096), Ok(Some((_, 28)))));
        // The bound is on the variable part.
        assert!(matches!(
            parse_v2(&tcp4, 11),
            Err(Error::TooLong { len: 12, max: 11 })
        ));
    }

    #[test]
    fn reads_a_header_split_across_reads() {
        let wire = encode_v2(sa("[2001:db8::7]:1"), sa("[2001:db8::1]:2"));
        let mut tail = wire.clone();
        tail.extend_from_slice(b"hello");
        for n in 1..=3 {
            let mut r = Chunked { bytes: &tail, n };
            let h = block_on(read_v2(&mut r, 4096)).unwrap();
            assert_eq!(h.source, Some(sa("[2001:db8::7]:1")));
            assert_eq!(r.bytes, b"hello");
        }
    }

    /// A reader handing out at most `n` bytes per read.
    struct Chunked<'a> {
        bytes: &'a [u8],
        n: usize,
    }

    impl AsyncRead for Chunked<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let k = self.n.min(self.bytes.len()).min(buf.remaining());
            let (head, tail) = self.bytes.split_at(k);
            buf.put_slice(head);
            self.bytes = tail;
            std::task::Poll::Ready(Ok(()))
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            b in proptest::collection::vec(any::<u8>(), 0..80),
            signature in any::<bool>(),
            max in 0usize..100,
        ) {
            let bytes = if signature { [&SIGNATURE[..], &b].concat() } else { b };
            let _ = parse_v2(&bytes, max);
            let mut r = &bytes[..];
            let before = r.len();
            if let Ok(h) = block_on(read_v2(&mut r, max)) {
                // What was consumed is exactly the header parse_v2 sees.
                let (p, n) = parse_v2(&bytes, max).unwrap().unwrap();
                prop_assert_eq!(h, p);
                prop_assert_eq!(n, before - r.len());
            }
        }

        #[test]
        fn any_tcp_addresses_round_trip(
            s in any::<SocketAddr>(),
            d in any::<SocketAddr>(),
        ) {
            let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
            let (h, rest) = read(&encode_v2(s, d)).unwrap();
            prop_assert_eq!(h.source, Some(canon(s)));
            prop_assert_eq!(h.destination, Some(canon(d)));
            prop_assert!(rest.is_empty());
        }
    }
}
