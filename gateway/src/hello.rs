//! A pure parser of the TLS ClientHello, the only bytes the gateway reads
//! before choosing an upstream. No sockets: it takes the bytes buffered so
//! far and says "need more", "here is the hello", or why the bytes are not
//! one. The caller keeps the bytes and replays them to the upstream, so the
//! TLS session itself is never touched.
//!
//! Handles what real clients send: a ClientHello split over TCP segments
//! (just call again with more bytes) and over several TLS records, GREASE
//! values, TLS 1.2 and 1.3 hellos, hellos without SNI or without extensions.

/// TLS record header: type (1), legacy version (2), length (2). RFC 8446 5.1.
const RECORD_HEADER: usize = 5;
/// Largest plaintext record fragment, 2^14 bytes (RFC 8446 5.1).
const MAX_RECORD: usize = 1 << 14;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Handshake header: type (1), length (3).
const HANDSHAKE_HEADER: usize = 4;
const EXT_SERVER_NAME: u16 = 0;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const SNI_HOST_NAME: u8 = 0;
const TLS13: u16 = 0x0304;

/// What the gateway learns from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The server name, if the client sent one (lowercase is not enforced here).
    pub server_name: Option<String>,
    /// Highest protocol version offered: 0x0304 for TLS 1.3 (from
    /// supported_versions), else the legacy version (0x0303 for TLS 1.2).
    pub version: u16,
    /// Bytes of the buffer the records holding the hello take, headers included.
    pub len: usize,
}

/// The outcome of looking at the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// The whole ClientHello has arrived.
    Done(ClientHello),
    /// A prefix of a plausible ClientHello: read more (at least this many more bytes).
    NeedMore(usize),
}

/// Why the bytes are not a ClientHello we accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HelloError {
    /// The first byte is not a TLS handshake record: not TLS at all.
    #[error("not a TLS handshake")]
    NotTls,
    /// A handshake message other than ClientHello came first.
    #[error("first handshake message is not a ClientHello")]
    NotClientHello,
    /// The ClientHello is longer than the configured maximum.
    #[error("ClientHello larger than the configured maximum")]
    TooLarge,
    /// The bytes break the TLS encoding; the reason names the part.
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
}

/// Parses the ClientHello at the start of `buf`, accepting a handshake
/// message of at most `max_hello` bytes.
///
/// ```
/// use gateway::hello::{parse, Peek};
/// assert_eq!(parse(&[22, 3, 1], 16384), Ok(Peek::NeedMore(2)));
/// assert!(parse(b"GET / HTTP/1.1\r\n", 16384).is_err());
/// ```
pub fn parse(buf: &[u8], max_hello: usize) -> Result<Peek, HelloError> {
    let mut off = 0;
    // Handshake bytes of the complete records before the current one. Stays
    // empty (no allocation) when the hello fits in its first record, as it
    // almost always does.
    let mut earlier: Vec<u8> = Vec::new();
    loop {
        let rest = &buf[off..];
        if rest.len() < RECORD_HEADER {
            check_record_header(rest, off == 0)?;
            return Ok(Peek::NeedMore(RECORD_HEADER - rest.len()));
        }
        let rec_len = check_record_header(rest, off == 0)?;
        let frag = &rest[RECORD_HEADER..rest.len().min(RECORD_HEADER + rec_len)];
        // Refuse a non-hello or an oversized hello as soon as its header shows.
        let total = hello_len(&earlier, frag, max_hello)?;
        if frag.len() < rec_len {
            return Ok(Peek::NeedMore(rec_len - frag.len()));
        }
        off += RECORD_HEADER + rec_len;
        let visible = earlier.len() + frag.len();
        match total {
            Some(t) if visible >= t => {
                if visible > t {
                    return Err(HelloError::Malformed(
                        "bytes after the ClientHello in its record",
                    ));
                }
                if earlier.is_empty() {
                    return finish(&frag[HANDSHAKE_HEADER..], off);
                }
                earlier.extend_from_slice(frag);
                return finish(&earlier[HANDSHAKE_HEADER..], off);
            }
            _ => earlier.extend_from_slice(frag),
        }
    }
}

/// Checks as much of a record header as `h` holds; returns the record length
/// once all five bytes are there. `first` is the hello's first record.
fn check_record_header(h: &[u8], first: bool) -> Result<usize, HelloError> {
    if let Some(&t) = h.first() {
        if t != CONTENT_HANDSHAKE {
            return Err(if first {
                HelloError::NotTls
            } else {
                HelloError::Malformed("a non-handshake record interrupts the ClientHello")
            });
        }
    }
    if let Some(&major) = h.get(1) {
        if major != 3 {
            return Err(HelloError::NotTls);
        }
    }
    let Some(len) = h.get(3..5) else {
        return Ok(0);
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if len == 0 {
        return Err(HelloError::Malformed("empty handshake record")); // RFC 8446 5.1
    }
    if len > MAX_RECORD {
        return Err(HelloError::Malformed("record longer than 2^14 bytes"));
    }
    Ok(len)
}

/// The handshake message's total length (header included) once its header
/// is visible in `earlier` followed by `frag`; refuses a non-ClientHello or
/// one over `max`.
fn hello_len(earlier: &[u8], frag: &[u8], max: usize) -> Result<Option<usize>, HelloError> {
    let mut head = [0u8; HANDSHAKE_HEADER];
    let mut n = 0;
    for (dst, src) in head.iter_mut().zip(earlier.iter().chain(frag)) {
        *dst = *src;
        n += 1;
    }
    if n >= 1 && head[0] != HANDSHAKE_CLIENT_HELLO {
        return Err(HelloError::NotClientHello);
    }
    if n < HANDSHAKE_HEADER {
        return Ok(None);
    }
    let body = (usize::from(head[1]) << 16) | (usize::from(head[2]) << 8) | usize::from(head[3]);
    if body > max {
        return Err(HelloError::TooLarge);
    }
    Ok(Some(HANDSHAKE_HEADER + body))
}

/// A cursor over a byte slice that fails with the name of what was cut short.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.b.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a 1- or 2-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(what)?;
        self.take(usize::from(n), what)
    }

    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }
}

/// Parses a ClientHello body (after the handshake header). RFC 8446 4.1.2.
fn finish(body: &[u8], len: usize) -> Result<Peek, HelloError> {
    let mut r = Reader { b: body };
    let legacy_version = r.u16("legacy_version")?;
    r.take(32, "random")?;
    let session_id = r.vec8("legacy_session_id")?;
    if session_id.len() > 32 {
        return Err(HelloError::Malformed(
            "legacy_session_id longer than 32 bytes",
        ));
    }
    let suites = r.vec16("cipher_suites")?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher_suites"));
    }
    if r.vec8("legacy_compression_methods")?.is_empty() {
        return Err(HelloError::Malformed("legacy_compression_methods"));
    }
    let mut hello = ClientHello {
        server_name: None,
        version: legacy_version,
        len,
    };
    if r.b.is_empty() {
        // TLS 1.2 allows a hello without extensions (RFC 5246 7.4.1.2).
        return Ok(Peek::Done(hello));
    }
    let mut exts = Reader {
        b: r.vec16("extensions")?,
    };
    if !r.b.is_empty() {
        return Err(HelloError::Malformed("bytes after the extensions"));
    }
    // Each extension type at most once (RFC 8446 4.2). Types are u16; GREASE
    // values (0x?A?A) are ordinary unknown types and simply skipped.
    let mut seen: Vec<u16> = Vec::with_capacity(24);
    while !exts.b.is_empty() {
        let ty = exts.u16("extension type")?;
        let data = exts.vec16("extension data")?;
        if seen.contains(&ty) {
            return Err(HelloError::Malformed("an extension appears twice"));
        }
        seen.push(ty);
        match ty {
            EXT_SERVER_NAME => hello.server_name = server_name(data)?,
            EXT_SUPPORTED_VERSIONS => {
                let mut v = Reader { b: data };
                let list = v.vec8("supported_versions")?;
                if list.len() % 2 != 0 || !v.b.is_empty() {
                    return Err(HelloError::Malformed("supported_versions"));
                }
                if list
                    .chunks_exact(2)
                    .any(|c| u16::from_be_bytes([c[0], c[1]]) == TLS13)
                {
                    hello.version = TLS13;
                }
            }
            _ => {}
        }
    }
    Ok(Peek::Done(hello))
}

/// The host_name of a server_name extension (RFC 6066 section 3).
fn server_name(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut r = Reader { b: data };
    let mut list = Reader {
        b: r.vec16("server_name_list")?,
    };
    if !r.b.is_empty() {
        return Err(HelloError::Malformed("bytes after server_name_list"));
    }
    let mut host = None;
    while !list.b.is_empty() {
        let ty = list.u8("server name type")?;
        let name = list.vec16("server name")?;
        if ty == SNI_HOST_NAME {
            if host.is_some() {
                return Err(HelloError::Malformed("two host_name entries"));
            }
            if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
                return Err(HelloError::Malformed(
                    "host_name is empty or not printable ASCII",
                ));
            }
            // Checked ASCII above, so this cannot fail.
            host = Some(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok(host)
}

#[cfg(test)]
mod tests;
