//! `token create` and `audit`: workload identity administration.

use crate::cli::Format;
use crate::output::{emit, rfc3339};
use crate::Error;
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use serde::Serialize;

/// `meshctl token ...`.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Create a join token bound to a cluster, namespace and service account.
    Create {
        /// Cluster whose intermediate CA will sign.
        #[arg(long)]
        cluster: String,
        /// Namespace of the identity.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Service account of the identity.
        #[arg(long, required_unless_present = "gateway")]
        service_account: Option<String>,
        /// A token for the cluster's east-west gateway
        /// (`fedmesh-system/fedmesh-gateway`).
        #[arg(long, conflicts_with_all = ["service_account", "namespace"])]
        gateway: bool,
        /// Lifetime (e.g. `1h`, `10m`); at most the federation's ceiling (24 h by default).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// The token may sign certificates until it expires (by default it
        /// signs one, then is gone).
        #[arg(long)]
        reusable: bool,
    },
}

/// A created token as meshctl prints it.
#[derive(Debug, Serialize)]
pub struct TokenRow {
    /// The secret.
    pub token: String,
    /// The identity it grants.
    pub identity: String,
    /// Expiry (RFC 3339).
    pub expires: String,
}

/// An audit entry as meshctl prints it.
#[derive(Debug, Serialize)]
pub struct AuditRow {
    /// When (RFC 3339).
    pub time: String,
    /// What happened.
    pub action: String,
    /// Who did it (the authenticated principal).
    pub actor: String,
    /// Who or what it concerns.
    pub subject: String,
    /// Details.
    pub detail: String,
}

fn duration(flag: &str, s: &str) -> Result<std::time::Duration, Error> {
    mesh_core::duration::parse(s).map_err(|e| Error::Usage(format!("invalid {flag}: {e}")))
}

/// `meshctl token create ...`.
pub async fn token(url: &crate::client::Fed, cmd: &TokenCommand, fmt: Format) -> Result<(), Error> {
    let TokenCommand::Create {
        cluster,
        namespace,
        service_account,
        gateway,
        ttl,
        reusable,
    } = cmd;
    let (namespace, service_account) = if *gateway {
        ("fedmesh-system".to_string(), "fedmesh-gateway".to_string())
    } else {
        (
            namespace.clone(),
            service_account.clone().unwrap_or_default(),
        )
    };
    let ttl = duration("--ttl", ttl)?;
    let secs = u32::try_from(ttl.as_secs())
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| Error::Usage("invalid --ttl: must be 1s to about 136 years".into()))?;
    let ch = crate::client::connect(url).await?;
    let r = AdminClient::new(ch)
        .create_join_token(api::CreateJoinTokenRequest {
            cluster: cluster.clone(),
            namespace,
            service_account,
            ttl_seconds: secs,
            reusable: *reusable,
            ..Default::default()
        })
        .await?
        .into_inner();
    let rows = [TokenRow {
        token: r.token,
        identity: r.identity,
        expires: rfc3339(r.expires_unix_ms),
    }];
    emit(fmt, &rows, &["TOKEN", "IDENTITY", "EXPIRES"], |r| {
        vec![r.token.clone(), r.identity.clone(), r.expires.clone()]
    })
}

/// `meshctl audit [--since D] [--limit N] [--page-token T]`: one page,
/// oldest first; after a full page, the command for the next on stderr.
pub async fn audit(
    url: &crate::client::Fed,
    since: Option<&str>,
    limit: u32,
    page_token: Option<&str>,
    fmt: Format,
) -> Result<(), Error> {
    if !(1..=1000).contains(&limit) {
        return Err(Error::Usage(format!("invalid --limit {limit}: 1 to 1000")));
    }
    let since_unix_ms = match since {
        Some(s) => {
            let d = duration("--since", s)?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            i64::try_from(now.saturating_sub(d).as_millis()).unwrap_or(0)
        }
        None => 0,
    };
    let ch = crate::client::connect(url).await?;
    let r = AdminClient::new(ch)
        .list_audit(api::ListAuditRequest {
            since_unix_ms,
            limit,
            page_token: page_token.unwrap_or_default().to_string(),
        })
        .await?
        .into_inner();
    let rows: Vec<AuditRow> = r
        .entries
        .into_iter()
        .map(|e| AuditRow {
            time: rfc3339(e.unix_ms),
            action: e.action,
            actor: e.actor,
            subject: e.subject,
            detail: e.detail,
        })
        .collect();
    if !r.next_page_token.is_empty() {
        eprintln!(
            "more entries: meshctl audit --limit {limit} --page-token {}",
            r.next_page_token
        );
    }
    emit(
        fmt,
        &rows,
        &["TIME", "ACTION", "ACTOR", "SUBJECT", "DETAIL"],
        |r| {
            vec![
                r.time.clone(),
                r.action.clone(),
                r.actor.clone(),
                r.subject.clone(),
                r.detail.clone(),
            ]
        },
    )
}
