//! Transparent capture: connections that iptables REDIRECTed to the
//! outbound listener carry their original destination, read with
//! `SO_ORIGINAL_DST` (`IP6T_SO_ORIGINAL_DST` for IPv6).

use std::net::SocketAddr;
use tokio::net::TcpStream;

/// The destination the application dialled before the redirect, or `None`
/// for a connection that was not redirected (or an error).
pub fn original_dst(s: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(s);
    let local = s.local_addr().ok()?;
    let orig = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    }
    .ok()?
    .as_socket()?;
    // Not redirected: the "original" destination is the listener itself.
    (orig != local).then_some(orig)
}
