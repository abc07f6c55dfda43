//! The running mesh a drill acts on, as `meshctl demo` (and `deploy/local`)
//! describe it in a topology file: where the federation is, each cluster's
//! frontend agent (where the drill's load enters the mesh), the WAN relay's
//! links in front of its gateway and of its control-plane connection, and
//! the control endpoint that stops, starts and black-holes gateways and
//! breaks applications.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A running topology.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    /// The federation's URL (`http://HOST:PORT`).
    pub federation: String,
    /// The WAN relay's control API.
    pub relay: SocketAddr,
    /// The topology's own control API (gateways, applications).
    pub control: SocketAddr,
    /// Its clusters.
    pub clusters: Vec<Cluster>,
    /// The impairment each relay link has when no drill changes it (the
    /// WAN's own delay and loss); links not listed have none. A drill's
    /// `clearLatency` goes back to it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub baseline: BTreeMap<String, wan_relay::Impairment>,
    /// Each cluster's network namespace, when the topology has them
    /// (`deploy/local`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<BTreeMap<String, String>>,
}

/// One cluster of a topology.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cluster {
    /// Its name.
    pub name: String,
    /// Its region.
    pub region: String,
    /// Its zone.
    pub zone: String,
    /// The outbound listener of its frontend's agent.
    pub frontend: SocketAddr,
    /// The relay links other clusters reach its gateway through (a drill's
    /// `latency` to this cluster changes them).
    pub gateway_links: Vec<String>,
    /// The relay link its proxies reach the federation through.
    pub federation_link: String,
}

impl Topology {
    /// Where `meshctl demo` writes its topology unless told otherwise:
    /// `$XDG_RUNTIME_DIR/fedmesh/topology.json`, else under the temporary
    /// directory.
    pub fn default_path() -> PathBuf {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map_or_else(std::env::temp_dir, PathBuf::from)
            .join("fedmesh")
            .join("topology.json")
    }

    /// Reads a topology file.
    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the topology {}: {e} (is `meshctl demo` running?)",
                path.display()
            )
        })?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a fedmesh topology: {e}", path.display()))
    }

    /// Writes it (the directory is made if needed), readable by its owner
    /// only.
    pub fn write(&self, path: &Path) -> Result<(), String> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
    }

    /// Cluster -> region.
    pub fn regions(&self) -> BTreeMap<String, String> {
        self.clusters
            .iter()
            .map(|c| (c.name.clone(), c.region.clone()))
            .collect()
    }

    /// A cluster by name.
    pub fn cluster(&self, name: &str) -> Option<&Cluster> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// The clusters `to` names: the cluster of that name, else every
    /// cluster of the region of that name.
    pub fn clusters_of(&self, to: &str) -> Vec<&Cluster> {
        match self.cluster(to) {
            Some(c) => vec![c],
            None => self.clusters.iter().filter(|c| c.region == to).collect(),
        }
    }
}
