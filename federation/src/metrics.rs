//! The federation's own metrics, served on its admin port (`--admin ADDR`)
//! with `/healthz` and `/ready` (ready while the registry is reachable).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Labels of an API call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `Service/Method`, e.g. `Admin/ListClusters`.
    pub rpc: String,
    /// The gRPC code, e.g. `Ok`, `PermissionDenied`.
    pub code: String,
    /// `anonymous`, `workload`, `gateway`, `operator`, `insecure`, `federation`.
    pub principal: String,
}

/// Labels of a CA certificate's expiry.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaLabels {
    /// `root` or `intermediate`.
    pub kind: String,
    /// The root's SHA-256 (hex; the intermediate's root for an intermediate).
    pub root: String,
    /// The intermediate's cluster; empty for a root.
    pub cluster: String,
}

/// Labels of an injection review.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InjectLabels {
    /// `injected`, `left` (opted out, or injected already), `skipped`
    /// (cannot be meshed; a warning went back) or `invalid` (refused).
    pub outcome: String,
}

/// The federation's metrics.
pub struct Metrics {
    /// API calls by RPC, outcome and principal kind.
    pub calls: Family<CallLabels, Counter>,
    /// 1 while the registry is reachable.
    pub registry_reachable: Gauge,
    /// Discovery subscribers of this replica.
    pub subscribers: Gauge,
    /// End of validity (Unix seconds) of each trusted root and each
    /// cluster's intermediate under them.
    pub ca_not_after: Family<CaLabels, Gauge>,
    /// Sidecar-injection reviews by outcome.
    pub injections: Family<InjectLabels, Counter>,
}

impl crate::inject::Observe for Metrics {
    fn reviewed(&self, outcome: &'static str) {
        self.injections
            .get_or_create(&InjectLabels {
                outcome: outcome.to_string(),
            })
            .inc();
    }
}

impl Metrics {
    /// Registers the metrics in `reg`.
    pub fn register(reg: &mut Registry) -> Arc<Self> {
        let m = Arc::new(Self {
            calls: Family::default(),
            registry_reachable: Gauge::default(),
            subscribers: Gauge::default(),
            ca_not_after: Family::default(),
            injections: Family::default(),
        });
        reg.register(
            "fedmesh_federation_api_calls",
            "API calls by RPC, gRPC code and the caller's principal kind",
            m.calls.clone(),
        );
        reg.register(
            "fedmesh_federation_registry_reachable",
            "1 while the registry answers",
            m.registry_reachable.clone(),
        );
        reg.register(
            "fedmesh_federation_subscribers",
            "Discovery streams open on this replica",
            m.subscribers.clone(),
        );
        reg.register(
            "fedmesh_federation_ca_not_after_seconds",
            "End of validity (Unix seconds) of the trusted roots and the clusters' intermediates",
            m.ca_not_after.clone(),
        );
        reg.register(
            "fedmesh_federation_injection_reviews",
            "Sidecar-injection webhook reviews by outcome",
            m.injections.clone(),
        );
        m
    }

    /// Sets the CA expiry gauges to `roots` and `intermediates` (and drops
    /// label sets no longer trusted).
    pub fn set_ca(
        &self,
        roots: &[mesh_api::v1::RootInfo],
        intermediates: &[mesh_api::v1::IntermediateInfo],
    ) {
        self.ca_not_after.clear();
        for r in roots {
            self.ca_not_after
                .get_or_create(&CaLabels {
                    kind: "root".into(),
                    root: r.sha256.clone(),
                    cluster: String::new(),
                })
                .set(r.not_after_unix_ms / 1000);
        }
        for i in intermediates {
            self.ca_not_after
                .get_or_create(&CaLabels {
                    kind: "intermediate".into(),
                    root: i.root_sha256.clone(),
                    cluster: i.cluster.clone(),
                })
                .set(i.not_after_unix_ms / 1000);
        }
    }

    /// The observer the API's authorization layer reports each call to.
    pub fn observer(self: &Arc<Self>) -> crate::auth::CallObserver {
        let m = self.clone();
        Arc::new(
            move |path: &str, code: tonic::Code, principal: &'static str| {
                let rpc = path
                    .strip_prefix("/fedmesh.v1.")
                    .unwrap_or("unknown")
                    .to_string();
                // The label set stays bounded: unknown methods share one label.
                let rpc = if crate::auth::rule(path).is_some() {
                    rpc
                } else {
                    "unknown".to_string()
                };
                m.calls
                    .get_or_create(&CallLabels {
                        rpc,
                        code: format!("{code:?}"),
                        principal: principal.to_string(),
                    })
                    .inc();
            },
        )
    }
}
