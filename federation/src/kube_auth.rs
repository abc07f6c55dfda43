//! Kubernetes ServiceAccount attestation: a workload proves its identity
//! with a projected ServiceAccount token for the federation's audience, and
//! the federation asks the API server of the workload's cluster about it
//! with a `TokenReview` (`authentication.k8s.io/v1`).
//!
//! A token is accepted only when the review says `authenticated`, lists the
//! federation's audience in `status.audiences`, and names a ServiceAccount
//! (`system:serviceaccount:<namespace>:<name>`, both valid names); it grants
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<name>`.
//!
//! The token is a secret: it is sent to the API server only, and every
//! message built here has it scrubbed out, whatever the API answered.

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use mesh_core::identity::Identity;
use mesh_core::name::{ClusterName, Namespace, ServiceAccount, TrustDomain};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

/// The audience a workload's token must be for, unless
/// `--kube-token-audience` says otherwise.
pub const DEFAULT_AUDIENCE: &str = "fedmesh";

/// How long to wait for a TCP (and TLS) connection to an API server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a whole review may take, retries included.
const REVIEW_TIMEOUT: Duration = Duration::from_secs(10);

/// Prefix of a ServiceAccount's username.
const SA_PREFIX: &str = "system:serviceaccount:";

/// Which clusters' API servers check tokens, and for which audience.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KubeAuthConfig {
    /// The audience tokens must be for (`--kube-token-audience`).
    pub audience: String,
    /// For each cluster, its kubeconfig file, or `None` for the inferred
    /// configuration (in-cluster service account, else `KUBECONFIG`).
    pub clusters: BTreeMap<ClusterName, Option<PathBuf>>,
}

impl Default for KubeAuthConfig {
    fn default() -> Self {
        Self {
            audience: DEFAULT_AUDIENCE.into(),
            clusters: BTreeMap::new(),
        }
    }
}

/// Why a Kubernetes token was refused, or could not be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KubeAuthError {
    /// The credential is empty.
    #[error("kubernetes_token: empty")]
    Empty,
    /// No API server is configured for the cluster.
    #[error(
        "kubernetes_token: this federation checks no Kubernetes tokens of cluster {0} \
         (no Kubernetes API configured for it: --kube-cluster)"
    )]
    NoApi(ClusterName),
    /// The API server did not authenticate the token.
    #[error("kubernetes_token: the Kubernetes API of cluster {cluster} did not authenticate the token: {reason}")]
    Unauthenticated {
        /// The cluster asked.
        cluster: ClusterName,
        /// `status.error` of the review.
        reason: String,
    },
    /// Authenticated, but not for the federation's audience.
    #[error(
        "kubernetes_token: the token is not for audience {audience:?} (the review lists {got:?})"
    )]
    WrongAudience {
        /// The audience required.
        audience: String,
        /// `status.audiences` of the review.
        got: Vec<String>,
    },
    /// Authenticated as someone who is not a ServiceAccount.
    #[error(
        "kubernetes_token: the token is {username:?}'s, not a service account's \
         (system:serviceaccount:<namespace>:<name>)"
    )]
    NotServiceAccount {
        /// `status.user.username` of the review.
        username: String,
    },
    /// A ServiceAccount whose names are not valid mesh names.
    #[error("kubernetes_token: service account {username:?}: {reason}")]
    BadName {
        /// `status.user.username` of the review.
        username: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The API server refused the federation's own credentials (401) or
    /// does not let them create tokenreviews (403).
    #[error(
        "the federation lacks permission to create tokenreviews (authentication.k8s.io/v1) in \
         cluster {cluster}: the Kubernetes API answered {api}; {hint}"
    )]
    NoPermission {
        /// The cluster asked.
        cluster: ClusterName,
        /// The API's answer: code, reason, message.
        api: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// The API server cannot be reached or answered an error.
    #[error("the Kubernetes API of cluster {cluster} is unavailable: {reason}")]
    Unavailable {
        /// The cluster asked.
        cluster: ClusterName,
        /// The error.
        reason: String,
    },
}

impl KubeAuthError {
    /// The gRPC status a caller gets.
    pub fn status(&self) -> tonic::Status {
        let msg = self.to_string();
        match self {
            Self::Empty
            | Self::NoApi(_)
            | Self::Unauthenticated { .. }
            | Self::WrongAudience { .. } => tonic::Status::unauthenticated(msg),
            Self::NotServiceAccount { .. } | Self::BadName { .. } => {
                tonic::Status::permission_denied(msg)
            }
            Self::NoPermission { .. } | Self::Unavailable { .. } => tonic::Status::unavailable(msg),
        }
    }
}

struct Cluster {
    client: kube::Client,
}

/// Checks Kubernetes tokens with the TokenReview API of each configured cluster.
pub struct KubeAuth {
    audience: String,
    clusters: HashMap<ClusterName, Cluster>,
}

impl std::fmt::Debug for KubeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAuth")
            .field("audience", &self.audience)
            .field("clusters", &self.clusters.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KubeAuth {
    /// Checks no cluster's tokens.
    pub fn none() -> Self {
        Self {
            audience: DEFAULT_AUDIENCE.into(),
            clusters: HashMap::new(),
        }
    }

    /// Builds a client for every configured cluster, from its kubeconfig or
    /// the inferred configuration. Fails naming the cluster and the flag.
    pub async fn connect(cfg: &KubeAuthConfig) -> anyhow::Result<Self> {
        // kube's TLS takes the process's rustls provider; the workspace uses ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut clusters = HashMap::new();
        for (name, path) in &cfg.clusters {
            let mut config = match path {
                Some(p) => {
                    let flag = format!("--kube-cluster {name}={}", p.display());
                    let kc = Kubeconfig::read_from(p)
                        .map_err(|e| anyhow::anyhow!("{flag}: cannot read the kubeconfig: {e}"))?;
                    kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                        .await
                        .map_err(|e| anyhow::anyhow!("{flag}: unusable kubeconfig: {e}"))?
                }
                None => kube::Config::infer().await.map_err(|e| {
                    anyhow::anyhow!(
                        "--kube-cluster {name}: no Kubernetes configuration to infer \
                         (neither in-cluster nor KUBECONFIG): {e}"
                    )
                })?,
            };
            config.connect_timeout = Some(CONNECT_TIMEOUT);
            config.read_timeout = Some(REVIEW_TIMEOUT);
            let url = config.cluster_url.to_string();
            let client = kube::Client::try_from(config).map_err(|e| {
                anyhow::anyhow!("--kube-cluster {name}: cannot make a client for {url}: {e}")
            })?;
            tracing::info!(cluster = %name, api = %url, "checking Kubernetes tokens with TokenReview");
            clusters.insert(name.clone(), Cluster { client });
        }
        Ok(Self {
            audience: cfg.audience.clone(),
            clusters,
        })
    }

    /// The audience tokens must be for.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Asks `cluster`'s API server about `token` and returns the identity it
    /// grants in `trust_domain`.
    pub async fn review(
        &self,
        cluster: &ClusterName,
        token: &str,
        trust_domain: &TrustDomain,
    ) -> Result<Identity, KubeAuthError> {
        if token.is_empty() {
            return Err(KubeAuthError::Empty);
        }
        let Some(c) = self.clusters.get(cluster) else {
            return Err(KubeAuthError::NoApi(cluster.clone()));
        };
        let api: Api<TokenReview> = Api::all(c.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let unavailable = |reason: String| KubeAuthError::Unavailable {
            cluster: cluster.clone(),
            reason: scrub(&reason, token),
        };
        let params = PostParams::default();
        let call = api.create(&params, &review);
        let answer = match tokio::time::timeout(REVIEW_TIMEOUT, call).await {
            Err(_) => {
                return Err(unavailable(format!(
                    "no answer to the TokenReview within {REVIEW_TIMEOUT:?}"
                )))
            }
            Ok(Err(kube::Error::Api(s))) => return Err(api_error(cluster, &s, token)),
            Ok(Err(e)) => return Err(unavailable(chain(&e))),
            Ok(Ok(r)) => r,
        };
        judge(
            cluster,
            answer.status.unwrap_or_default(),
            &self.audience,
            trust_domain,
        )
        .map_err(|e| match e {
            KubeAuthError::Unauthenticated { cluster, reason } => KubeAuthError::Unauthenticated {
                cluster,
                reason: scrub(&reason, token),
            },
            e => e,
        })
    }
}

/// Decides on a review's status: authenticated, for `audience`, a valid
/// ServiceAccount.
fn judge(
    cluster: &ClusterName,
    status: TokenReviewStatus,
    audience: &str,
    trust_domain: &TrustDomain,
) -> Result<Identity, KubeAuthError> {
    if status.authenticated != Some(true) {
        return Err(KubeAuthError::Unauthenticated {
            cluster: cluster.clone(),
            reason: status
                .error
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "no reason given".into()),
        });
    }
    let got = status.audiences.unwrap_or_default();
    if !got.iter().any(|a| a == audience) {
        return Err(KubeAuthError::WrongAudience {
            audience: audience.into(),
            got,
        });
    }
    let username = status.user.and_then(|u| u.username).unwrap_or_default();
    let Some((ns, sa)) = username
        .strip_prefix(SA_PREFIX)
        .and_then(|rest| rest.split_once(':'))
    else {
        return Err(KubeAuthError::NotServiceAccount { username });
    };
    let bad = |reason: String| KubeAuthError::BadName {
        username: username.clone(),
        reason,
    };
    let namespace = Namespace::new(ns).map_err(|e| bad(e.to_string()))?;
    let service_account = ServiceAccount::new(sa).map_err(|e| bad(e.to_string()))?;
    Ok(Identity {
        trust_domain: trust_domain.clone(),
        namespace,
        service_account,
    })
}

/// An error the API server answered: 401 and 403 are about the
/// federation's own credentials, anything else makes it unavailable.
fn api_error(cluster: &ClusterName, s: &kube::error::Status, token: &str) -> KubeAuthError {
    let reason = if s.reason.is_empty() {
        "error"
    } else {
        &s.reason
    };
    let api = scrub(&format!("{} {reason}: {}", s.code, s.message), token);
    let hint = match s.code {
        401 => {
            "the API server does not accept the federation's own credentials (the token of its \
             kubeconfig or service account)"
        }
        403 => {
            "grant the federation's account create on tokenreviews (bind it to the ClusterRole \
             system:auth-delegator, or see deploy/kubernetes/federation-tokenreview-rbac.yaml)"
        }
        _ => {
            return KubeAuthError::Unavailable {
                cluster: cluster.clone(),
                reason: format!("the TokenReview was answered {api}"),
            }
        }
    };
    KubeAuthError::NoPermission {
        cluster: cluster.clone(),
        api,
        hint,
    }
}

/// The error and its sources, `: `-separated (kube's own words are terse:
/// the cause, e.g. `Connection refused`, is in the sources).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        cur = s.source();
    }
    out
}

/// `msg` with every occurrence of `token` replaced.
fn scrub(msg: &str, token: &str) -> String {
    if token.is_empty() {
        msg.to_string()
    } else {
        msg.replace(token, "<token>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;

    fn status(authenticated: bool, audiences: &[&str], username: &str) -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: Some(audiences.iter().map(ToString::to_string).collect()),
            user: Some(UserInfo {
                username: Some(username.into()),
                ..Default::default()
            }),
            error: None,
        }
    }

    fn judge_(s: TokenReviewStatus) -> Result<Identity, KubeAuthError> {
        judge(
            &ClusterName::new("c1").unwrap(),
            s,
            "fedmesh",
            &TrustDomain::new("cluster.local").unwrap(),
        )
    }

    #[test]
    fn a_service_account_gets_its_spiffe_id() {
        let id = judge_(status(
            true,
            &["other", "fedmesh"],
            "system:serviceaccount:default:reviews",
        ))
        .unwrap();
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/reviews"
        );
    }

    #[test]
    fn refusals() {
        // Not authenticated: the API's reason; none given.
        let mut s = status(false, &[], "");
        s.error = Some("[invalid bearer token]".into());
        let e = judge_(s).unwrap_err();
        assert!(e.to_string().contains("[invalid bearer token]"), "{e}");
        assert_eq!(e.status().code(), tonic::Code::Unauthenticated);
        let e = judge_(TokenReviewStatus::default()).unwrap_err();
        assert!(e.to_string().contains("no reason given"), "{e}");
        // Authenticated for another audience (an audience-unaware
        // authenticator), or with none listed.
        let e = judge_(status(true, &["api"], "system:serviceaccount:a:b")).unwrap_err();
        assert!(matches!(e, KubeAuthError::WrongAudience { .. }), "{e}");
        let mut s = status(true, &[], "system:serviceaccount:a:b");
        s.audiences = None;
        assert!(matches!(
            judge_(s).unwrap_err(),
            KubeAuthError::WrongAudience { .. }
        ));
        // Not a service account; malformed or invalid names.
        for u in [
            "alice@example.com",
            "system:serviceaccount:default",
            "system:node:n1",
            "",
        ] {
            let e = judge_(status(true, &["fedmesh"], u)).unwrap_err();
            assert!(
                matches!(e, KubeAuthError::NotServiceAccount { .. }),
                "{u}: {e}"
            );
            assert_eq!(e.status().code(), tonic::Code::PermissionDenied);
        }
        for u in [
            "system:serviceaccount:Default:reviews",
            "system:serviceaccount:default:a:b",
            "system:serviceaccount::reviews",
        ] {
            let e = judge_(status(true, &["fedmesh"], u)).unwrap_err();
            assert!(matches!(e, KubeAuthError::BadName { .. }), "{u}: {e}");
        }
    }

    #[test]
    fn scrubbing() {
        assert_eq!(
            scrub("bad token abc.def here", "abc.def"),
            "bad token <token> here"
        );
        assert_eq!(scrub("x", ""), "x");
    }
}
