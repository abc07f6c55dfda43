//! Traffic mirroring (the route's `mirror`): a copy of the request, sent
//! and forgotten.

use super::*;

impl Outbound {
    /// Sends a copy to the mirror destination from a task of its own and
    /// forgets it (Istio appends `-shadow` to the host of a mirrored request).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mirror(
        self: &Arc<Self>,
        table: &Arc<Table>,
        dest: &Dest,
        parts: &Parts,
        authority: &str,
        port: Option<u16>,
        bytes: Bytes,
        peer: SocketAddr,
    ) {
        let shadow = shadow_host(authority);
        let parts = clone_parts(parts);
        let Some(sel) = self.candidates(table, dest, port, &parts, peer) else {
            return;
        };
        let Some(c) = lb::pick(
            sel.cands(),
            Algorithm::Random,
            &[],
            &[],
            &self.rr,
            &sel.prep.spread,
        ) else {
            return;
        };
        let target = self.target(&c.item, sel.prep.h2 || parts.version == Version::HTTP_2);
        let req = build_request(parts, &shadow, target.proto, body::full(bytes));
        let limits = sel.prep.policy.pool;
        self.metrics
            .mirrored
            .get_or_create(&ServiceLabels {
                direction: "outbound",
                service: sel.prep.label.clone(),
            })
            .inc();
        let this = self.clone();
        tokio::spawn(async move {
            match this.pool.send(&target, req, limits).await {
                Ok(resp) => {
                    // Read the answer so the connection can be reused.
                    let _ = resp.into_body().collect().await;
                }
                Err(e) => debug!("mirror: {e}"),
            }
        });
    }
}

/// The host of a mirrored copy: Istio appends `-shadow` to the host,
/// before the port.
pub(super) fn shadow_host(authority: &str) -> String {
    match split_authority(authority) {
        (host, Some(p)) => format!("{host}-shadow:{p}"),
        (host, None) => format!("{host}-shadow"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirrored_copy_goes_to_the_shadow_host() {
        assert_eq!(
            shadow_host("reviews.default:9080"),
            "reviews.default-shadow:9080"
        );
        assert_eq!(shadow_host("reviews"), "reviews-shadow");
        assert_eq!(shadow_host("[::1]:80"), "[::1]-shadow:80");
    }
}
