//! [`Relay`]: a set of named [`Link`]s and, optionally, the HTTP control API.

use crate::control;
use crate::impairment::{Change, Impairment, InvalidChange};
use crate::link::{Link, LinkOptions, Shared};
use crate::spec::LinkSpec;
use crate::Error;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

/// Everything [`Relay::start_with`] needs.
#[derive(Debug, Clone, Default)]
pub struct RelayConfig {
    /// The links.
    pub links: Vec<LinkSpec>,
    /// Where the control API listens; `None`: no control API.
    pub control: Option<SocketAddr>,
    /// Settings of every link.
    pub options: LinkOptions,
    /// The impairment every link starts with.
    pub impairment: Impairment,
}

/// Why [`Relay::set_many`] changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SetError {
    /// The change is invalid.
    #[error(transparent)]
    Invalid(#[from] InvalidChange),
    /// Some names are not links (all of them listed).
    #[error("no link named {}", .0.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", "))]
    UnknownLinks(Vec<String>),
}

/// Applies `change` to every named link, or to none: the change is checked
/// first, then every name.
pub(crate) fn set_many<'a, S: AsRef<str>>(
    lookup: impl Fn(&str) -> Option<&'a Arc<Shared>>,
    names: &[S],
    change: &Change,
) -> Result<Vec<&'a Arc<Shared>>, SetError> {
    change.validate()?;
    let mut found = Vec::with_capacity(names.len());
    let mut unknown = Vec::new();
    for n in names {
        match lookup(n.as_ref()) {
            Some(l) => found.push(l),
            None => unknown.push(n.as_ref().to_string()),
        }
    }
    if !unknown.is_empty() {
        return Err(SetError::UnknownLinks(unknown));
    }
    // Valid for one, valid for all: a change's validity does not depend on
    // the impairment it applies to.
    for l in &found {
        l.set(change)?;
    }
    Ok(found)
}

/// A set of named links and the control API. Dropping it stops everything
/// without waiting; [`Relay::shutdown`] waits.
#[derive(Debug)]
pub struct Relay {
    links: BTreeMap<String, Link>,
    control: Option<control::Server>,
}

impl Relay {
    /// Starts one link per spec, all in [`Mode::Pass`](crate::Mode::Pass)
    /// with default [`LinkOptions`], and the control API on `control` (if
    /// given; port 0 for any free port).
    pub async fn start(
        specs: impl IntoIterator<Item = LinkSpec>,
        control: Option<SocketAddr>,
    ) -> Result<Relay, Error> {
        Self::start_with(RelayConfig {
            links: specs.into_iter().collect(),
            control,
            ..RelayConfig::default()
        })
        .await
    }

    /// Starts the relay `config` describes. Fails, starting nothing, on a
    /// duplicate name, an invalid impairment or options, or an address that
    /// cannot be bound.
    pub async fn start_with(config: RelayConfig) -> Result<Relay, Error> {
        config.impairment.validate()?;
        config.options.validate().map_err(Error::Options)?;
        let mut links = BTreeMap::new();
        for spec in &config.links {
            if links.contains_key(spec.name()) {
                return Err(Error::DuplicateLink(spec.name().to_string()));
            }
            let link = Link::bind(spec, config.options, config.impairment).await?;
            links.insert(spec.name().to_string(), link);
        }
        let control = match config.control {
            Some(addr) => {
                let shared = links
                    .iter()
                    .map(|(n, l)| (n.clone(), l.shared().clone()))
                    .collect();
                Some(control::Server::start(addr, shared).await?)
            }
            None => None,
        };
        Ok(Relay { links, control })
    }

    /// The link named `name`.
    pub fn link(&self, name: &str) -> Option<&Link> {
        self.links.get(name)
    }

    /// Every link, by name.
    pub fn links(&self) -> &BTreeMap<String, Link> {
        &self.links
    }

    /// The address the control API listens on (the bound one), if it runs.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control.as_ref().map(control::Server::addr)
    }

    /// Applies one change to several links, all or nothing: an invalid
    /// change or an unknown name changes nothing.
    pub fn set_many<S: AsRef<str>>(&self, names: &[S], change: &Change) -> Result<(), SetError> {
        set_many(|n| self.links.get(n).map(Link::shared), names, change).map(|_| ())
    }

    /// Applies one change to every link.
    pub fn set_all(&self, change: &Change) -> Result<(), InvalidChange> {
        change.validate()?;
        for l in self.links.values() {
            l.set(change)?;
        }
        Ok(())
    }

    /// Stops the control API, then every link (each closes its connections),
    /// and waits until all of it has stopped.
    pub async fn shutdown(self) {
        if let Some(c) = self.control {
            c.shutdown().await;
        }
        for (_, l) in self.links {
            l.shutdown().await;
        }
    }
}
