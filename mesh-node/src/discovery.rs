//! The client side of the federation's Discovery stream, shared by agents and
//! gateways.
//!
//! [`run`] subscribes, hands every message to a [`Sink`], makes a complete
//! snapshot or delta live with [`Sink::publish`], answers each version with an
//! ACK or, when some items could not be applied, a NACK naming them, and
//! reconnects with exponential backoff when the stream ends. Between
//! connections the sink keeps serving what it last published: static
//! stability is the sink's published view outliving the stream.

use mesh_api::v1 as api;
use mesh_api::v1::discovery_client::DiscoveryClient;
use mesh_api::v1::discovery_request::Request as Req;
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Reconnect backoff: first wait.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Reconnect backoff: longest wait.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Snapshots can be large (100k endpoints is ~15 MiB in chunks of ~300 KiB);
/// this bounds one message.
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Most reasons quoted in one NACK.
const NACK_REASONS: usize = 3;

/// What a subscriber does with the stream.
pub trait Sink: Send {
    /// A snapshot begins: the next messages replace everything. The view
    /// published last keeps serving until [`Sink::publish`].
    fn reset(&mut self);

    /// Applies one message; returns a description of each item that could
    /// not be applied (the rest is applied).
    fn apply(&mut self, msg: api::DiscoveryResponse) -> Vec<String>;

    /// Makes everything applied so far live, as `version`.
    fn publish(&mut self, version: i64) -> impl Future<Output = ()> + Send;

    /// Periodic work while connected (every [`Subscription::tick`]); returns
    /// whether the view changed and should be published again.
    fn tick(&mut self) -> impl Future<Output = bool> + Send {
        async { false }
    }

    /// The version published last, for re-publishing after a tick.
    fn version(&self) -> i64;

    /// SHA-256 (hex) of the root the subscriber's own certificate chains to,
    /// reported with every ACK (empty: none from the mesh CA). When it
    /// changes, the next tick ACKs the current version again to say so.
    fn certificate_root(&self) -> String {
        String::new()
    }
}

/// Who subscribes, and where.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// Federation URL (`https://host:port`).
    pub url: String,
    /// How the federation is trusted and who this node is to it.
    pub tls: Option<std::sync::Arc<crate::fed::FedTls>>,
    /// The first message of every stream.
    pub subscribe: api::Subscribe,
    /// How often [`Sink::tick`] runs while connected.
    pub tick: Duration,
}

/// Follows the federation forever: connect, subscribe, apply, answer; on any
/// failure keep the last published view and reconnect with backoff.
pub async fn run<S: Sink>(sub: Subscription, sink: &mut S) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        match session(&sub, sink).await {
            Ok(()) => warn!(url = %sub.url, "federation closed the discovery stream; reconnecting"),
            Err(e) => warn!(url = %sub.url, "discovery: {e:#}; serving the last config"),
        }
        if started.elapsed() > BACKOFF_MAX {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn session<S: Sink>(sub: &Subscription, sink: &mut S) -> anyhow::Result<()> {
    if sub.tls.as_ref().is_some_and(|t| !t.has_client()) {
        anyhow::bail!("no certificate for the federation yet (enrolling)");
    }
    let ch = crate::fed::channel(&sub.url, sub.tls.as_ref(), |e| {
        e.connect_timeout(Duration::from_secs(2))
            .tcp_keepalive(Some(Duration::from_secs(10)))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
    })
    .await?;
    let mut client = DiscoveryClient::new(ch).max_decoding_message_size(MAX_MESSAGE);
    let (tx, rx) = mpsc::channel(16);
    tx.send(request(Req::Subscribe(sub.subscribe.clone())))
        .await?;
    let mut stream = client
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    info!(url = %sub.url, node = %sub.subscribe.node_id, "subscribed to the federation");
    let mut errors = Vec::new();
    let mut reported_root = String::new();
    let mut acked = None::<i64>;
    let mut tick = tokio::time::interval(sub.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let msg = tokio::select! {
            m = stream.message() => m?,
            _ = tick.tick() => {
                if sink.tick().await {
                    let v = sink.version();
                    sink.publish(v).await;
                }
                let root = sink.certificate_root();
                if let Some(version) = acked.filter(|_| root != reported_root) {
                    tx.send(request(Req::Ack(api::Ack { version, certificate_root_sha256: root.clone() }))).await?;
                    reported_root = root;
                }
                continue;
            }
        };
        let Some(msg) = msg else { return Ok(()) };
        let version = msg.version;
        let chunk = msg.snapshot;
        if chunk.as_ref().is_some_and(|c| c.index == 0) {
            sink.reset();
            errors.clear();
        }
        errors.extend(sink.apply(msg));
        if chunk.as_ref().is_some_and(|c| !c.last) {
            continue;
        }
        sink.publish(version).await;
        reported_root = sink.certificate_root();
        let answer = if errors.is_empty() {
            acked = Some(version);
            Req::Ack(api::Ack {
                version,
                certificate_root_sha256: reported_root.clone(),
            })
        } else {
            let reason = nack_reason(&errors);
            warn!(version, %reason, "applied a config version partly");
            Req::Nack(api::Nack {
                version,
                reason,
                certificate_root_sha256: reported_root.clone(),
            })
        };
        errors.clear();
        tx.send(request(answer)).await?;
    }
}

/// One line: how many items were skipped and the first few reasons.
pub fn nack_reason(errors: &[String]) -> String {
    format!(
        "{} invalid item(s) skipped: {}",
        errors.len(),
        errors
            .iter()
            .take(NACK_REASONS)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ")
    )
}

fn request(r: Req) -> api::DiscoveryRequest {
    api::DiscoveryRequest { request: Some(r) }
}
