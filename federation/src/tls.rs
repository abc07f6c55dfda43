//! TLS on the federation's API: its serving certificate from the mesh CA,
//! the client certificates it verifies, and the [`Principal`] each
//! connection authenticates as.
//!
//! The serving certificate is signed directly by the oldest trusted root
//! (during a rotation every client trusts it; it moves to the new root when
//! the old one is removed) for the
//! federation's SPIFFE ID (`spiffe://<td>/ns/fedmesh-system/sa/fedmesh-federation`)
//! and the DNS names and IP addresses it is reached by (`--tls-san`, plus
//! `localhost` and the loopback addresses). Its chain carries the root, so a
//! node that knows only the root's SHA-256 (from its join token) can check
//! it before it sends anything. It is renewed at half life and whenever the
//! trust record changes (a rotation), as workloads' are; connections open
//! keep their session.
//!
//! Client certificates are optional at the handshake (enrollment is
//! anonymous) and verified against every root of the trust record; what a
//! verified certificate makes its holder is decided by [`classify`].

use crate::auth::{Peer, Principal, OPERATOR_PATH};
use crate::ca::Ca;
use anyhow::Context as _;
use mesh_core::identity::Identity;
use mesh_core::name::ClusterName;
use rcgen::SanType;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, info, warn};

/// The federation's SPIFFE ID, below the trust domain.
pub const FEDERATION_PATH: &str = "/ns/fedmesh-system/sa/fedmesh-federation";
/// A handshake must complete within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;
/// How often the serving certificate is checked for renewal.
const REFRESH_EVERY: Duration = Duration::from_secs(5);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The names the serving certificate carries: `localhost`, the loopback
/// addresses, and `extra` (DNS names or IP addresses).
pub fn subject_alt_names(extra: &[String]) -> Result<Vec<SanType>, String> {
    let mut out = vec![
        SanType::DnsName("localhost".try_into().map_err(|e| format!("{e}"))?),
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
        SanType::IpAddress(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
    ];
    for s in extra {
        let san = match s.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                mesh_core::name::check_dns_name(s)
                    .map_err(|why| format!("invalid --tls-san {s:?}: {why}"))?;
                SanType::DnsName(
                    s.clone()
                        .try_into()
                        .map_err(|e| format!("invalid --tls-san {s:?}: {e}"))?,
                )
            }
        };
        if !out.contains(&san) {
            out.push(san);
        }
    }
    Ok(out)
}

struct Current {
    /// The trust record's roots the client verifier was built with.
    bundle_pem: String,
    /// The root the serving certificate chains to (the oldest trusted).
    signing: String,
    renew_at: SystemTime,
}

/// The server side's TLS material, swapped whole when it changes.
pub struct ServerTls {
    ca: Arc<Ca>,
    sans: Vec<SanType>,
    config: arc_swap::ArcSwap<rustls::ServerConfig>,
    /// The same certificate for the injection webhook: no client
    /// certificate asked (the API server presents none), HTTP/2 or 1.1.
    webhook: arc_swap::ArcSwap<rustls::ServerConfig>,
    current: Mutex<Current>,
}

impl ServerTls {
    /// Issues the serving certificate now.
    pub fn new(ca: Arc<Ca>, sans: Vec<SanType>) -> anyhow::Result<Arc<Self>> {
        let (config, webhook, current) = issue(&ca, &sans)?;
        Ok(Arc::new(Self {
            ca,
            sans,
            config: arc_swap::ArcSwap::from_pointee(config),
            webhook: arc_swap::ArcSwap::from_pointee(webhook),
            current: Mutex::new(current),
        }))
    }

    /// The configuration new connections are accepted with.
    pub fn config(&self) -> Arc<rustls::ServerConfig> {
        self.config.load_full()
    }

    /// The configuration the injection webhook accepts connections with:
    /// the same certificate, renewed with it.
    pub fn webhook_config(&self) -> Arc<rustls::ServerConfig> {
        self.webhook.load_full()
    }

    /// Re-issues when due or when the trust record changed; returns whether
    /// it did.
    pub fn refresh(&self) -> anyhow::Result<bool> {
        let rec = self.ca.record();
        let due = {
            let c = self.current.lock().unwrap_or_else(|p| p.into_inner());
            c.bundle_pem != rec.bundle_pem() || SystemTime::now() >= c.renew_at
        };
        if !due {
            return Ok(false);
        }
        let (config, webhook, current) = issue(&self.ca, &self.sans)?;
        info!(signing_root = %current.signing, "federation serving certificate renewed");
        self.config.store(Arc::new(config));
        self.webhook.store(Arc::new(webhook));
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = current;
        Ok(true)
    }

    /// Keeps the certificate current for the replica's life.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.refresh() {
                warn!("cannot renew the federation's serving certificate: {e:#}");
            }
        }
    }

    /// The CA behind it.
    pub fn ca(&self) -> &Arc<Ca> {
        &self.ca
    }
}

fn issue(
    ca: &Ca,
    sans: &[SanType],
) -> anyhow::Result<(rustls::ServerConfig, rustls::ServerConfig, Current)> {
    let rec = ca.record();
    let key = rcgen::KeyPair::generate().context("generate the serving key")?;
    let ttl = ca.leaf_ttl();
    // Under the oldest trusted root: during a rotation every client trusts
    // it, whether or not it has learnt the new one yet.
    let oldest = ca.serving_root();
    let issued = ca
        .sign_direct_under(
            &oldest,
            &key,
            &format!("spiffe://{}{FEDERATION_PATH}", ca.trust_domain()),
            sans,
            ttl,
            false,
        )
        .context("sign the serving certificate")?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .context("the serving chain")?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(rec.bundle_pem().as_bytes()) {
        roots
            .add(c.context("the trust bundle")?)
            .context("a trust anchor")?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .context("client certificate verifier")?;
    let der = key.serialize_der();
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), PrivateKeyDer::Pkcs8(der.clone().into()))
        .context("serving certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let mut webhook = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, PrivateKeyDer::Pkcs8(der.into()))
        .context("serving certificate")?;
    webhook.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let life = issued
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    Ok((
        config,
        webhook,
        Current {
            bundle_pem: rec.bundle_pem(),
            signing: oldest,
            renew_at: SystemTime::now() + life / 2,
        },
    ))
}

/// What a verified client certificate chain makes its holder:
/// * a leaf issued by the intermediate the CA made for cluster C (the chain
///   `[leaf, intermediate]`), naming a workload SPIFFE ID: a node of C;
/// * a leaf issued directly by a trusted root for
///   `spiffe://<td>/fedmesh/operator/<name>`: that operator;
/// * anything else (no certificate, another issuer, another form): anonymous.
pub async fn classify(ca: &Ca, certs: &[CertificateDer<'_>]) -> Principal {
    let Some(leaf) = certs.first() else {
        return Principal::Anonymous;
    };
    let Some(uri) = spiffe_uri(leaf) else {
        return Principal::Anonymous;
    };
    let td = ca.trust_domain().as_str();
    // A chain may carry its root too (the CA's own chains do): drop it.
    let roots: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(ca.record().bundle_pem().as_bytes())
            .filter_map(Result::ok)
            .collect();
    let mut certs = certs;
    while let [rest @ .., last] = certs {
        if rest.is_empty() || !roots.iter().any(|r| r.as_ref() == last.as_ref()) {
            break;
        }
        certs = rest;
    }
    match certs {
        [_] => {
            let prefix = format!("spiffe://{td}{OPERATOR_PATH}");
            match uri.strip_prefix(&prefix) {
                Some(name) if crate::auth::check_operator_name(name).is_ok() => {
                    Principal::Operator {
                        name: name.to_string(),
                    }
                }
                _ => Principal::Anonymous,
            }
        }
        [_, inter] => {
            let Ok(identity) = uri.parse::<Identity>() else {
                return Principal::Anonymous;
            };
            if identity.trust_domain.as_str() != td {
                return Principal::Anonymous;
            }
            let Some(cluster) = issuer_cluster(leaf) else {
                return Principal::Anonymous;
            };
            match ca.is_cluster_intermediate(&cluster, inter.as_ref()).await {
                Ok(true) => Principal::Node { cluster, identity },
                Ok(false) => Principal::Anonymous,
                Err(e) => {
                    warn!(%cluster, "cannot check a client's intermediate: {e}");
                    Principal::Anonymous
                }
            }
        }
        _ => Principal::Anonymous,
    }
}

/// The one `spiffe://` URI SAN of a certificate.
fn spiffe_uri(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
        _ => None,
    });
    let first = uris.next()?;
    uris.next().is_none().then(|| first.to_string())
}

/// The cluster the leaf's issuer names (`fedmesh intermediate CA (<cluster>)`).
fn issuer_cluster(leaf: &CertificateDer<'_>) -> Option<ClusterName> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let cn = cert.issuer().iter_common_name().next()?.as_str().ok()?;
    let name = cn
        .strip_prefix("fedmesh intermediate CA (")?
        .strip_suffix(')')?;
    ClusterName::new(name).ok()
}

/// A connection the API serves: TLS (or plain with `--insecure-plaintext`),
/// with who it is.
pub struct Conn {
    io: Io,
    peer: Peer,
    /// Its place among the open connections, given back when it closes.
    _live: Option<tokio::sync::OwnedSemaphorePermit>,
}

enum Io {
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Plain(TcpStream),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Tls(s) => s.is_write_vectored(),
            Io::Plain(s) => s.is_write_vectored(),
        }
    }
}

/// Accepts connections on `listener`: TLS handshakes (at most
/// [`MAX_HANDSHAKES`] at once, each within [`HANDSHAKE_TIMEOUT`]), then the
/// principal; `tls: None` is `--insecure-plaintext`. The stream ends when
/// the server drops it.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    max_connections: usize,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel::<io::Result<Conn>>(64);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let open = Arc::new(Semaphore::new(max_connections.max(1)));
        loop {
            // A slot for the connection's life, then one for its handshake.
            let live = tokio::select! {
                p = open.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                () = tx.closed() => return,
            };
            let permit = tokio::select! {
                p = handshakes.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                () = tx.closed() => return,
            };
            let (tcp, remote) = tokio::select! {
                a = listener.accept() => match a {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let mut conn = match tls {
                    None => Conn {
                        io: Io::Plain(tcp),
                        peer: Peer {
                            remote: Some(remote),
                            principal: Principal::Insecure,
                        },
                        _live: None,
                    },
                    Some(tls) => match handshake(&tls, tcp, remote).await {
                        Some(c) => c,
                        None => return,
                    },
                };
                conn._live = Some(live);
                drop(permit);
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn handshake(tls: &ServerTls, tcp: TcpStream, remote: SocketAddr) -> Option<Conn> {
    // A rotation's step takes effect from the next connection on, not at
    // the next tick.
    if let Err(e) = tls.refresh() {
        warn!("cannot renew the federation's serving certificate: {e:#}");
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%remote, "TLS handshake failed: {e}");
            return None;
        }
        Err(_) => {
            debug!(%remote, "TLS handshake timed out");
            return None;
        }
    };
    let certs: Vec<CertificateDer<'static>> = stream
        .get_ref()
        .1
        .peer_certificates()
        .map(<[CertificateDer<'_>]>::to_vec)
        .unwrap_or_default();
    let principal = classify(&tls.ca, &certs).await;
    debug!(%remote, principal = %principal, "client connected");
    Some(Conn {
        io: Io::Tls(Box::new(stream)),
        peer: Peer {
            remote: Some(remote),
            principal,
        },
        _live: None,
    })
}

/// Refuses `--insecure-plaintext` on any address but loopback.
pub fn check_plaintext_listen(addr: SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "--insecure-plaintext serves the API without TLS or authentication and listens on loopback only; --listen {addr} is not a loopback address"
        ))
    }
}
