//! Where things run: a region and a zone within it.

use crate::name::{Region, Zone};
use std::fmt;

/// The region and zone of a cluster or endpoint.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Locality {
    /// Region, e.g. `us-east`.
    pub region: Region,
    /// Zone within the region, e.g. `us-east-1a`.
    pub zone: Zone,
}

impl fmt::Display for Locality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.region, self.zone)
    }
}
