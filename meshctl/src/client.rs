//! Connecting to the federation: the URL, CA and operator credential come
//! from the `meshctl` configuration's context (`$FEDMESH_CONFIG`, else
//! `$XDG_CONFIG_HOME/fedmesh/config.yaml`, else
//! `~/.config/fedmesh/config.yaml`), `--federation` overriding the URL.

use crate::Error;
use mesh_core::client_config::{ClientConfig, Context};
use mesh_node::fed::FedTls;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

/// How long to wait for the federation to accept a connection. It answers at
/// once when up; 3 s rides out a busy machine without leaving a user staring.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Where a federation is when nothing says otherwise.
pub const DEFAULT_URL: &str = "https://127.0.0.1:15010";

/// A federation and how this operator calls it.
#[derive(Debug, Clone)]
pub struct Fed {
    /// `https://host:port` (or `http://` for `--insecure-plaintext`).
    pub url: String,
    /// The CA and the operator's certificate, for `https://`.
    pub tls: Option<Arc<FedTls>>,
    /// Why there is no usable credential, said when a call needs one.
    pub missing: Option<String>,
    /// The context it came from, and the file holding it (renewal writes
    /// there).
    pub context: Option<(Context, Option<std::path::PathBuf>)>,
}

/// Normalises `host:port` to `https://host:port`.
pub fn normalize(url: &str) -> String {
    if url.contains("://") {
        url.to_string()
    } else {
        format!("https://{url}")
    }
}

impl Fed {
    /// A plain-text federation (`--insecure-plaintext`), or one reached
    /// with `tls`.
    pub fn new(url: &str, tls: Option<Arc<FedTls>>) -> Self {
        Self {
            url: normalize(url),
            tls,
            missing: None,
            context: None,
        }
    }

    /// The same credential for another URL (a drill's topology names the
    /// demo's federation).
    pub fn with_url(&self, url: &str) -> Self {
        Self {
            url: normalize(url),
            ..self.clone()
        }
    }

    /// From a context of the configuration: its CA and credential.
    pub fn from_context(ctx: &Context, url: Option<&str>) -> Self {
        let url = normalize(url.unwrap_or(&ctx.server));
        let mut missing = None;
        let tls = if ctx.certificate_authority_data.is_empty() {
            missing = Some(format!(
                "context {:?} has no certificate-authority-data to check the federation with",
                ctx.name
            ));
            None
        } else {
            match FedTls::new(Some(&ctx.certificate_authority_data), None) {
                Ok(t) => {
                    if ctx.client_certificate_data.is_empty() || ctx.client_key_data.is_empty() {
                        missing = Some(format!("context {:?} holds no credential", ctx.name));
                    } else if let Err(e) =
                        t.set_client_pem(&ctx.client_certificate_data, &ctx.client_key_data)
                    {
                        missing = Some(format!("context {:?}: {e:#}", ctx.name));
                    }
                    Some(t)
                }
                Err(e) => {
                    missing = Some(format!("context {:?}: {e:#}", ctx.name));
                    None
                }
            }
        };
        Self {
            url,
            tls,
            missing,
            context: Some((ctx.clone(), None)),
        }
    }

    /// From the configuration file and the flags: `--context` (else the
    /// current context), `--federation` overriding its server.
    pub fn resolve(context: Option<&str>, url: Option<&str>) -> Result<Self, Error> {
        let path = ClientConfig::default_path();
        let file = match &path {
            Some(p) => ClientConfig::load(p).map_err(Error::Usage)?,
            None => ClientConfig::default(),
        };
        match file.context(context) {
            Some(ctx) => {
                let mut fed = Self::from_context(ctx, url);
                fed.context = Some((ctx.clone(), path));
                Ok(fed)
            }
            None if context.is_some() => Err(Error::Usage(format!(
                "no context {:?} in {}",
                context.unwrap_or_default(),
                path.map_or_else(|| "the configuration".into(), |p| p.display().to_string())
            ))),
            None => {
                let url = normalize(url.unwrap_or(DEFAULT_URL));
                Ok(Self {
                    context: None,
                    missing: url.starts_with("https://").then(|| {
                        format!(
                            "no meshctl configuration{}",
                            path.map(|p| format!(" at {}", p.display()))
                                .unwrap_or_default()
                        )
                    }),
                    url,
                    tls: None,
                })
            }
        }
    }
}

impl Fed {
    /// Whether the context's certificate is past half its life (and not
    /// expired): time to renew it, as agents do theirs.
    pub fn needs_renewal(&self) -> bool {
        let Some((ctx, Some(_))) = &self.context else {
            return false;
        };
        let Ok(der) = mesh_node::fed::parse_certs(&ctx.client_certificate_data) else {
            return false;
        };
        let Some(leaf) = der.first() else {
            return false;
        };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
            return false;
        };
        let (from, to) = (
            cert.validity().not_before.timestamp(),
            cert.validity().not_after.timestamp(),
        );
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        )
        .unwrap_or(i64::MAX);
        now >= from + (to - from) / 2 && now < to
    }

    /// A new certificate for the operator's key-to-be, proven with the one
    /// in use (and the CA bundle of the moment); the context is saved with
    /// both where it came from. After a root rotation's reissue stage, so
    /// that the operator keeps access when the old root goes.
    pub async fn renew(&self) -> Result<Fed, Error> {
        use rcgen::SigningKey as _;
        let Some((ctx, path)) = &self.context else {
            return Ok(self.clone());
        };
        let old = rcgen::KeyPair::from_pem(&ctx.client_key_data)
            .map_err(|e| Error::Usage(format!("context {:?}: the key: {e}", ctx.name)))?;
        let key = rcgen::KeyPair::generate().map_err(|e| Error::Other(e.into()))?;
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.serialize_request(&key))
            .and_then(|c| c.pem())
            .map_err(|e| Error::Other(e.into()))?;
        let signature = old
            .sign(csr.as_bytes())
            .map_err(|e| Error::Other(e.into()))?;
        let r = mesh_api::v1::identity_client::IdentityClient::new(connect(self).await?)
            .sign_certificate(mesh_api::v1::SignCertificateRequest {
                csr_pem: csr,
                credential: Some(mesh_api::v1::sign_certificate_request::Credential::Renewal(
                    mesh_api::v1::Renewal {
                        chain_pem: ctx.client_certificate_data.clone(),
                        signature,
                    },
                )),
                ..Default::default()
            })
            .await?
            .into_inner();
        let renewed = Context {
            certificate_authority_data: r.trust_bundle_pem,
            client_certificate_data: r.certificate_chain_pem,
            client_key_data: key.serialize_pem(),
            ..ctx.clone()
        };
        if let Some(p) = path {
            let mut file = ClientConfig::load(p).map_err(Error::Usage)?;
            file.contexts
                .iter_mut()
                .filter(|c| c.name == renewed.name)
                .for_each(|c| *c = renewed.clone());
            file.save(p).map_err(Error::Usage)?;
        }
        let mut next = Self::from_context(&renewed, Some(&self.url));
        next.context = Some((renewed, path.clone()));
        Ok(next)
    }
}

/// Connects with the operator's credential, or explains in one line why not.
pub async fn connect(fed: &Fed) -> Result<Channel, Error> {
    let missing = || {
        fed.missing.as_ref().map(|why| {
            Error::Unauthenticated(format!(
                "{why}: run `meshctl login --federation {} --token TOKEN` with a token from your admin (`meshctl operator add`), or use the context `meshctl demo` wrote",
                fed.url
            ))
        })
    };
    if !fed.url.starts_with("https://") {
        return dial(fed).await;
    }
    // Without a CA nothing can be dialled; with one, an unreachable
    // federation is said first.
    if fed.tls.is_none() {
        return Err(missing().unwrap_or_else(|| Error::Usage("no CA for the federation".into())));
    }
    let ch = dial(fed).await?;
    match missing() {
        Some(e) => Err(e),
        None => Ok(ch),
    }
}

/// Connects without requiring a credential (enrollment).
pub async fn dial(fed: &Fed) -> Result<Channel, Error> {
    mesh_node::fed::channel(&fed.url, fed.tls.as_ref(), |e| {
        e.connect_timeout(CONNECT_TIMEOUT).timeout(REQUEST_TIMEOUT)
    })
    .await
    .map_err(|e| Error::Unreachable {
        url: fed.url.clone(),
        reason: root_cause(e.as_ref()),
    })
}

/// The innermost error message: tonic's outer ones say only "transport error".
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
