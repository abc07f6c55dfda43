//! `PeerAuthentication`: whether a workload accepts plain text, mutual TLS or
//! both (Istio `security/v1/peer_authentication.proto`), and the mode in
//! effect for a workload port ([`effective_mode`]).

use super::authorization::{selector_matches, validate_selector};
use super::destination_rule::WorkloadMatchSelector;
use super::validate::Ctx;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// mTLS settings for the selected workloads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    /// Workloads this applies to; absent: the whole namespace (the whole mesh
    /// in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadMatchSelector>,
    /// The mode for the workload's ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<PeerMtls>,
    /// Per-port modes (only with a selector), by workload port.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<u32, PeerMtls>,
}

/// An mTLS setting.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerMtls {
    /// The mode; `UNSET` inherits from the parent.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// How a workload accepts connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the parent (namespace, then mesh); PERMISSIVE at the top.
    #[default]
    Unset,
    /// Plain text only.
    Disable,
    /// Both plain text and mTLS.
    Permissive,
    /// mTLS only.
    Strict,
}

impl MtlsMode {
    fn or(self, parent: MtlsMode) -> MtlsMode {
        if self == MtlsMode::Unset {
            parent
        } else {
            self
        }
    }
}

impl PeerAuthentication {
    fn mode(&self) -> MtlsMode {
        self.mtls.as_ref().map_or(MtlsMode::Unset, |m| m.mode)
    }
}

/// The mTLS mode of `port` of a workload of `workload_namespace` with
/// `labels`, given the PeerAuthentications of the mesh, each with its
/// namespace, with Istio's precedence:
///
/// 1. a policy of the workload's namespace whose selector matches (if
///    several, the first given: pass them oldest first, as Istio picks the
///    oldest); its `portLevelMtls` entry for `port`, else its `mtls`;
/// 2. the policy of the workload's namespace without selector;
/// 3. the policy of the root namespace without selector (mesh-wide);
/// 4. `PERMISSIVE`.
///
/// At each level `UNSET` (or no `mtls`) inherits from the next one.
pub fn effective_mode(
    policies: &[(&str, &PeerAuthentication)],
    root_namespace: &str,
    workload_namespace: &str,
    labels: &BTreeMap<String, String>,
    port: u16,
) -> MtlsMode {
    let mesh = policies
        .iter()
        .find(|(ns, p)| *ns == root_namespace && p.selector.is_none())
        .map_or(MtlsMode::Unset, |(_, p)| p.mode())
        .or(MtlsMode::Permissive);
    let namespace = policies
        .iter()
        .find(|(ns, p)| *ns == workload_namespace && p.selector.is_none())
        .map_or(MtlsMode::Unset, |(_, p)| p.mode())
        .or(mesh);
    let Some((_, w)) = policies.iter().find(|(ns, p)| {
        *ns == workload_namespace
            && p.selector.is_some()
            && selector_matches(p.selector.as_ref(), labels)
    }) else {
        return namespace;
    };
    let workload = w.mode().or(namespace);
    w.port_level_mtls
        .get(&u32::from(port))
        .map_or(workload, |m| m.mode.or(workload))
}

impl PeerAuthentication {
    /// Istio `ValidatePeerAuthentication`.
    pub(crate) fn validate(&self, c: &mut Ctx<'_>) {
        validate_selector(c, self.selector.as_ref());
        if self.selector.is_none() && !self.port_level_mtls.is_empty() {
            c.error(
                "spec.portLevelMtls",
                "requires a selector: mesh-wide and namespace-wide policies cannot have port-level mTLS",
            );
        }
        for port in self.port_level_mtls.keys() {
            c.port(&format!("spec.portLevelMtls.{port}"), *port);
        }
    }
}
