//! Operators and their credentials (`login`, `operator`, `whoami`), and
//! clusters added by hand (`cluster add`).

use crate::cli::Format;
use crate::client::{connect, dial, Fed};
use crate::output::{emit, rfc3339};
use crate::Error;
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_core::client_config::{ClientConfig, Context};
use serde::Serialize;
use std::path::PathBuf;

/// `meshctl login ...`.
#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// The operator token your admin created (`meshctl operator add`).
    #[arg(long, env = "FEDMESH_OPERATOR_TOKEN")]
    pub token: String,
    /// The federation's CA bundle (PEM); without it, the root hash the
    /// token carries.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// The name of the context saved.
    #[arg(long, default_value = "default")]
    pub name: String,
}

/// `meshctl operator ...`.
#[derive(Debug, clap::Subcommand)]
pub enum OperatorCommand {
    /// Bind roles to an operator (when given) and create the single-use
    /// token they log in with.
    Add {
        /// The operator's name (a-z, 0-9, `-._@`).
        name: String,
        /// A role: viewer, operator, policy-admin, security-admin, admin. Repeatable.
        #[arg(long = "role")]
        roles: Vec<String>,
        /// How long the token may wait to be used.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Set an operator's roles (none: remove every role).
    Bind {
        /// The operator.
        name: String,
        /// A role. Repeatable.
        #[arg(long = "role")]
        roles: Vec<String>,
    },
    /// Operators and their roles.
    List,
}

/// `meshctl cluster ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Add a cluster, or change one's locality, network or gateways.
    Add {
        /// The cluster's name.
        name: String,
        /// Its region.
        #[arg(long)]
        region: String,
        /// Its zone.
        #[arg(long)]
        zone: String,
        /// Its network (clusters on another network are reached through
        /// their gateway).
        #[arg(long)]
        network: String,
        /// Its east-west gateway's address (`HOST:PORT`). Repeatable.
        #[arg(long = "gateway")]
        gateways: Vec<String>,
        /// The SPIFFE trust domain of its workloads.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Its endpoints may have loopback or link-local addresses (a mesh
        /// on one machine); refused otherwise.
        #[arg(long)]
        allow_local_endpoints: bool,
        /// A network (CIDR) its endpoints' addresses must be in. Repeatable.
        #[arg(long = "endpoint-network")]
        endpoint_networks: Vec<String>,
    },
    /// Remove a cluster (refused while it has endpoints or exports, unless
    /// --force, which removes them with it).
    Remove {
        /// The cluster's name.
        name: String,
        /// Also remove its endpoints and exports.
        #[arg(long)]
        force: bool,
    },
}

/// A login as printed.
#[derive(Debug, Serialize)]
pub struct LoginRow {
    /// The context saved.
    pub context: String,
    /// Who.
    pub identity: String,
    /// Until when (RFC 3339).
    pub expires: String,
    /// Where.
    pub config: String,
}

/// `meshctl login`: a key made here, a CSR signed for the token's operator.
pub async fn login(args: &LoginArgs, url: Option<&str>, fmt: Format) -> Result<(), Error> {
    let url = crate::client::normalize(
        url.ok_or_else(|| Error::Usage("login needs --federation https://HOST:PORT".into()))?,
    );
    let ca = match &args.ca {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| Error::Usage(format!("invalid --ca {}: {e}", p.display())))?,
        ),
        None => None,
    };
    if mesh_core::name::check_dns_name(&args.name).is_err() {
        return Err(Error::Usage(format!(
            "invalid --name {:?}: a context name is a DNS-style name",
            args.name
        )));
    }
    let tls = mesh_node::enroll::trust(ca.as_deref(), Some(args.token.trim()))
        .map_err(|e| Error::Usage(format!("{e:#}")))?;
    let key = rcgen::KeyPair::generate().map_err(|e| Error::Other(e.into()))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|c| c.pem())
        .map_err(|e| Error::Other(e.into()))?;
    let fed = Fed::new(&url, Some(tls));
    let r = api::identity_client::IdentityClient::new(dial(&fed).await?)
        .sign_certificate(api::SignCertificateRequest {
            csr_pem: csr,
            credential: Some(api::sign_certificate_request::Credential::OperatorToken(
                args.token.trim().to_string(),
            )),
            ..Default::default()
        })
        .await?
        .into_inner();
    let path = ClientConfig::default_path().ok_or_else(|| {
        Error::Usage("no place for the configuration: set FEDMESH_CONFIG or HOME".into())
    })?;
    let mut file = ClientConfig::load(&path).map_err(Error::Usage)?;
    file.upsert(Context {
        name: args.name.clone(),
        server: url,
        certificate_authority_data: r.trust_bundle_pem,
        client_certificate_data: r.certificate_chain_pem,
        client_key_data: key.serialize_pem(),
    });
    file.save(&path).map_err(Error::Usage)?;
    let rows = [LoginRow {
        context: args.name.clone(),
        identity: r.identity,
        expires: rfc3339(r.not_after_unix_ms),
        config: path.display().to_string(),
    }];
    emit(
        fmt,
        &rows,
        &["CONTEXT", "IDENTITY", "EXPIRES", "CONFIG"],
        |r| {
            vec![
                r.context.clone(),
                r.identity.clone(),
                r.expires.clone(),
                r.config.clone(),
            ]
        },
    )
}

/// An operator as printed.
#[derive(Debug, Serialize)]
pub struct OperatorRow {
    /// Name.
    pub operator: String,
    /// Roles, comma-separated.
    pub roles: String,
    /// The token to log in with (`operator add`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub token: String,
    /// Who set the roles, or created the token.
    pub by: String,
    /// When (RFC 3339).
    pub at: String,
}

/// `meshctl operator ...`.
pub async fn operator(fed: &Fed, cmd: &OperatorCommand, fmt: Format) -> Result<(), Error> {
    let mut admin = AdminClient::new(connect(fed).await?);
    match cmd {
        OperatorCommand::Add { name, roles, ttl } => {
            let ttl = mesh_core::duration::parse(ttl)
                .map_err(|e| Error::Usage(format!("invalid --ttl: {e}")))?;
            let secs = u32::try_from(ttl.as_secs())
                .ok()
                .filter(|s| *s > 0)
                .ok_or_else(|| Error::Usage("invalid --ttl: at least 1s".into()))?;
            let mut bound = Vec::new();
            if !roles.is_empty() {
                bound = admin
                    .set_role_binding(api::SetRoleBindingRequest {
                        operator: name.clone(),
                        roles: roles.clone(),
                    })
                    .await?
                    .into_inner()
                    .roles;
            }
            let t = admin
                .create_operator_token(api::CreateOperatorTokenRequest {
                    name: name.clone(),
                    ttl_seconds: secs,
                })
                .await?
                .into_inner();
            if fmt == Format::Table {
                eprintln!(
                    "give {name} the token; they run: meshctl login --federation {} --token <TOKEN>",
                    fed.url
                );
            }
            let rows = [OperatorRow {
                operator: name.clone(),
                roles: bound.join(","),
                token: t.token,
                by: String::new(),
                at: rfc3339(t.expires_unix_ms),
            }];
            emit(
                fmt,
                &rows,
                &["OPERATOR", "ROLES", "TOKEN", "EXPIRES"],
                |r| {
                    vec![
                        r.operator.clone(),
                        r.roles.clone(),
                        r.token.clone(),
                        r.at.clone(),
                    ]
                },
            )
        }
        OperatorCommand::Bind { name, roles } => {
            let b = admin
                .set_role_binding(api::SetRoleBindingRequest {
                    operator: name.clone(),
                    roles: roles.clone(),
                })
                .await?
                .into_inner();
            print_bindings(fmt, vec![b])
        }
        OperatorCommand::List => {
            let r = admin
                .list_role_bindings(api::ListRoleBindingsRequest {})
                .await?
                .into_inner();
            print_bindings(fmt, r.bindings)
        }
    }
}

fn print_bindings(fmt: Format, b: Vec<api::RoleBinding>) -> Result<(), Error> {
    let rows: Vec<OperatorRow> = b
        .into_iter()
        .map(|b| OperatorRow {
            operator: b.operator,
            roles: b.roles.join(","),
            token: String::new(),
            by: b.set_by,
            at: rfc3339(b.set_unix_ms),
        })
        .collect();
    emit(
        fmt,
        &rows,
        &["OPERATOR", "ROLES", "SET BY", "SET AT"],
        |r| {
            vec![
                r.operator.clone(),
                r.roles.clone(),
                r.by.clone(),
                r.at.clone(),
            ]
        },
    )
}

/// Who the caller is, as printed.
#[derive(Debug, Serialize)]
pub struct WhoRow {
    /// anonymous, workload, gateway, operator, insecure.
    pub kind: String,
    /// Name or SPIFFE ID.
    pub name: String,
    /// A node's cluster.
    pub cluster: String,
    /// Roles, comma-separated.
    pub roles: String,
}

/// `meshctl whoami`.
pub async fn whoami(fed: &Fed, fmt: Format) -> Result<(), Error> {
    let r = AdminClient::new(connect(fed).await?)
        .who_am_i(api::WhoAmIRequest {})
        .await?
        .into_inner();
    let rows = [WhoRow {
        kind: r.kind,
        name: r.name,
        cluster: r.cluster,
        roles: r.roles.join(","),
    }];
    emit(fmt, &rows, &["KIND", "NAME", "CLUSTER", "ROLES"], |r| {
        vec![
            r.kind.clone(),
            r.name.clone(),
            r.cluster.clone(),
            r.roles.clone(),
        ]
    })
}

/// A registered cluster, as printed.
#[derive(Debug, Serialize)]
pub struct ClusterRow {
    /// Name.
    pub cluster: String,
    /// Registry revision of the write.
    pub revision: i64,
}

/// A removed cluster, as printed.
#[derive(Debug, Serialize)]
pub struct RemovedRow {
    /// Name.
    pub cluster: String,
    /// Endpoints removed with it.
    pub endpoints_removed: u32,
    /// Exports removed with it.
    pub exports_removed: u32,
}

/// `meshctl cluster add|remove ...`.
pub async fn cluster(fed: &Fed, cmd: &ClusterCommand, fmt: Format) -> Result<(), Error> {
    let mut reg = api::registration_client::RegistrationClient::new(connect(fed).await?);
    match cmd {
        ClusterCommand::Add {
            name,
            region,
            zone,
            network,
            gateways,
            trust_domain,
            allow_local_endpoints,
            endpoint_networks,
        } => {
            let r = reg
                .register_cluster(api::RegisterClusterRequest {
                    cluster: Some(api::ClusterInfo {
                        name: name.clone(),
                        locality: Some(api::Locality {
                            region: region.clone(),
                            zone: zone.clone(),
                        }),
                        network: network.clone(),
                        gateway_addresses: gateways.clone(),
                        trust_domain: trust_domain.clone(),
                        allow_local_endpoints: *allow_local_endpoints,
                        endpoint_networks: endpoint_networks.clone(),
                    }),
                })
                .await?
                .into_inner();
            let rows = [ClusterRow {
                cluster: name.clone(),
                revision: r.revision,
            }];
            emit(fmt, &rows, &["CLUSTER", "REVISION"], |r| {
                vec![r.cluster.clone(), r.revision.to_string()]
            })
        }
        ClusterCommand::Remove { name, force } => {
            let r = reg
                .remove_cluster(api::RemoveClusterRequest {
                    cluster: name.clone(),
                    force: *force,
                })
                .await?
                .into_inner();
            let rows = [RemovedRow {
                cluster: name.clone(),
                endpoints_removed: r.endpoints_removed,
                exports_removed: r.exports_removed,
            }];
            emit(
                fmt,
                &rows,
                &["CLUSTER", "ENDPOINTS REMOVED", "EXPORTS REMOVED"],
                |r| {
                    vec![
                        r.cluster.clone(),
                        r.endpoints_removed.to_string(),
                        r.exports_removed.to_string(),
                    ]
                },
            )
        }
    }
}
