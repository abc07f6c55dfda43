//! Fuzzes the PROXY protocol header parser the gateway runs on connections
//! from `--proxy-protocol-from` sources (`mesh_core::proxy_protocol`):
//! `parse_v2` on a buffer and `read_v2` on a stream that hands the same bytes
//! over in pieces. Never a panic; both agree; an accepted header is 16 bytes
//! plus at most the bound, every strict prefix of it asks for more, the
//! reader consumes exactly it and not a byte more, and the addresses it names
//! encode back (`encode_v2`) to a header that parses to the same addresses.
//! Version 1 (text) headers are refused by name; they are in the corpus too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::proxy_protocol::{encode_v2, parse_v2, read_v2, Error, Header, FIXED_LEN};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, ReadBuf};

/// A stream that returns at most `step` bytes per read and counts what it gave.
struct Pieces<'a> {
    data: &'a [u8],
    pos: usize,
    step: usize,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.step.min(buf.remaining()).min(self.data.len() - self.pos);
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Runs a future that never waits (the stream is always ready).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("read_v2 waited on a stream that is always ready"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, bytes)) = data.split_first() else { return };
    // The bound: the gateway's (4096), or a small one to reach TooLong.
    let max_len = if ctl & 0x80 == 0 { mesh_core::proxy_protocol::DEFAULT_MAX_LEN } else { usize::from(ctl & 0x3f) * 4 };
    let step = usize::from(ctl & 0x0f) + 1;

    let parsed = parse_v2(bytes, max_len);
    let mut stream = Pieces { data: bytes, pos: 0, step };
    let read = now(read_v2(&mut stream, max_len));

    match &parsed {
        Ok(Some((h, len))) => {
            let len = *len;
            assert!(len >= FIXED_LEN && len <= bytes.len() && len - FIXED_LEN <= max_len);
            // The reader agrees and leaves what follows the header unread.
            assert_eq!(read.as_ref().ok(), Some(h), "read_v2 disagrees: {read:?}");
            assert_eq!(stream.pos, len, "read_v2 read past the header");
            // Every strict prefix asks for more.
            let cut = usize::from(ctl) % len;
            assert!(matches!(parse_v2(&bytes[..cut], max_len), Ok(None)), "prefix of {len} refused at {cut}");
            // Same header whatever follows it.
            let mut longer = bytes[..len].to_vec();
            longer.extend_from_slice(b"\x16\x03\x01");
            assert_eq!(parse_v2(&longer, max_len).ok().flatten(), Some((*h, len)));
            // Both addresses or neither; what is named encodes back.
            assert_eq!(h.source.is_some(), h.destination.is_some());
            if let (Some(s), Some(d)) = (h.source, h.destination) {
                let wire = encode_v2(s, d);
                let back = parse_v2(&wire, max_len.max(36));
                assert!(
                    matches!(back, Ok(Some((Header { source: Some(s2), destination: Some(d2) }, n)))
                        if s2 == s && d2 == d && n == wire.len()),
                    "{s} -> {d} encodes to a header that parses to {back:?}"
                );
            }
        }
        // Too short to tell: the stream ends inside the header.
        Ok(None) => assert!(
            matches!(read, Err(Error::Truncated { .. } | Error::NotV2)),
            "parse_v2 wants more, read_v2 says {read:?}"
        ),
        Err(e) => {
            assert!(read.is_err(), "parse_v2 refused ({e}), read_v2 accepted {read:?}");
            // Messages are for logs: bounded.
            assert!(e.to_string().len() < 256);
        }
    }
});
