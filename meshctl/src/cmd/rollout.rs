//! Whether a traffic change is in effect: `--wait` on `weights set|clear`,
//! `drain` and `undrain`, and the APPLIED lines of `weights get` and
//! `status`. The federation says, per calling cluster, how many agents
//! ACKed the config version carrying the change, and which NACKed it.

use crate::cli::Format;
use crate::output::table;
use crate::Error;
use mesh_api::v1 as api;
use mesh_api::v1::traffic_client::TrafficClient;
use mesh_core::service::ServiceKey;
use serde::Serialize;
use std::time::Duration;

/// How long `--wait` with no value waits.
pub const DEFAULT_WAIT: &str = "60s";

/// `--wait[=TIMEOUT]`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Wait {
    /// Wait until every agent runs the change, showing per calling cluster
    /// how many applied it and which refused it (with why); exit 5 if not
    /// all did within TIMEOUT (default 60s).
    #[arg(
        long,
        value_name = "TIMEOUT",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = DEFAULT_WAIT
    )]
    pub wait: Option<String>,
}

impl Wait {
    /// The timeout, if waiting; a bad value is a usage error, found before
    /// anything is changed.
    pub fn timeout(&self) -> Result<Option<Duration>, Error> {
        self.wait
            .as_deref()
            .map(|t| {
                mesh_core::duration::parse(t)
                    .ok()
                    .filter(|d| !d.is_zero() && *d <= Duration::from_secs(3600))
                    .ok_or_else(|| {
                        Error::Usage(format!(
                            "invalid --wait={t}: a duration from 1s to 1h, e.g. 30s"
                        ))
                    })
            })
            .transpose()
    }
}

/// One calling cluster's agents, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterOut {
    /// The calling cluster.
    pub cluster: String,
    /// Its agents.
    pub agents: u32,
    /// How many run the change.
    pub applied: u32,
    /// `node: reason` of each that refused it.
    pub nacked: Vec<String>,
    /// How many have not answered yet.
    pub pending: u32,
}

/// A rollout, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct RolloutOut {
    /// The change's registry revision.
    pub revision: i64,
    /// Weights computed from it.
    pub computed: bool,
    /// The config version carrying them.
    pub version: i64,
    /// Every agent runs it.
    pub complete: bool,
    /// Per calling cluster.
    pub clusters: Vec<ClusterOut>,
}

impl From<api::Rollout> for RolloutOut {
    fn from(r: api::Rollout) -> Self {
        Self {
            revision: r.revision,
            computed: r.computed,
            version: r.version,
            complete: r.complete,
            clusters: r
                .clusters
                .into_iter()
                .map(|c| {
                    let nacked = u32::try_from(c.nacked.len())
                        .unwrap_or(u32::MAX)
                        .saturating_add(c.more_nacked);
                    ClusterOut {
                        pending: c.agents.saturating_sub(c.applied).saturating_sub(nacked),
                        cluster: c.cluster,
                        agents: c.agents,
                        applied: c.applied,
                        nacked: c
                            .nacked
                            .into_iter()
                            .map(|n| format!("{} (v{}): {}", n.node_id, n.version, n.reason))
                            .chain(
                                (c.more_nacked > 0).then(|| format!("and {} more", c.more_nacked)),
                            )
                            .collect(),
                    }
                })
                .collect(),
        }
    }
}

impl RolloutOut {
    /// Has every agent answered (ACK or NACK), with some NACK? Waiting
    /// longer would change nothing.
    fn refused(&self) -> bool {
        self.computed
            && self.clusters.iter().any(|c| !c.nacked.is_empty())
            && self.clusters.iter().all(|c| c.pending == 0)
    }

    /// `c1 3/3, c2 1/2 (1 NACKed)`: one line.
    pub fn summary(&self) -> String {
        if !self.computed {
            return format!(
                "waiting for the leader to compute weights from revision {}",
                self.revision
            );
        }
        if self.clusters.is_empty() {
            return format!("version {}: no agent is subscribed", self.version);
        }
        let per: Vec<String> = self
            .clusters
            .iter()
            .map(|c| {
                let mut s = format!("{} {}/{}", c.cluster, c.applied, c.agents);
                if !c.nacked.is_empty() {
                    s.push_str(&format!(" ({} NACKed)", c.nacked.len()));
                }
                s
            })
            .collect();
        format!("version {}: {} applied", self.version, per.join(", "))
    }

    /// The per-cluster table, and each NACK with its reason.
    pub fn table(&self) -> String {
        let cells: Vec<Vec<String>> = self
            .clusters
            .iter()
            .map(|c| {
                vec![
                    c.cluster.clone(),
                    c.agents.to_string(),
                    c.applied.to_string(),
                    c.nacked.len().to_string(),
                    c.pending.to_string(),
                ]
            })
            .collect();
        let mut out = table(
            &["CALLER", "AGENTS", "APPLIED", "NACKED", "PENDING"],
            &cells,
        );
        for c in &self.clusters {
            for n in &c.nacked {
                out.push_str(&format!("NACK {}: {n}\n", c.cluster));
            }
        }
        out
    }

    /// Why it is not in effect, for stderr.
    fn shortfall(&self) -> String {
        if !self.computed {
            return format!(
                "the leader has not computed weights from revision {} yet",
                self.revision
            );
        }
        let mut parts = Vec::new();
        for c in &self.clusters {
            if c.applied == c.agents {
                continue;
            }
            let mut s = format!(
                "{}: {} of {} agents applied version {}",
                c.cluster, c.applied, c.agents, self.version
            );
            if !c.nacked.is_empty() {
                s.push_str(&format!("; NACKed by {}", c.nacked.join("; ")));
            }
            parts.push(s);
        }
        parts.join("; ")
    }
}

/// The rollout of the change at `revision` (0: the latest) of `service`
/// (None: of every service).
pub async fn get(
    ch: tonic::transport::Channel,
    service: Option<&ServiceKey>,
    revision: i64,
) -> Result<RolloutOut, Error> {
    let r = TrafficClient::new(ch)
        .get_rollout(api::GetRolloutRequest {
            service: service.map(Into::into),
            revision,
        })
        .await?
        .into_inner();
    Ok(r.into())
}

/// Waits until every agent applied the change at `revision`, refused it,
/// or `timeout` passed, with a progress line on stderr at each change.
pub async fn wait(
    url: &crate::client::Fed,
    service: Option<&ServiceKey>,
    revision: i64,
    timeout: Duration,
) -> Result<RolloutOut, Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    let ch = crate::client::connect(url).await?;
    loop {
        // The change is made: a passing error (a replica restarting) is
        // waited out like the rest, until the deadline.
        let r =
            match tokio::time::timeout(Duration::from_secs(5), get(ch.clone(), service, revision))
                .await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) if tokio::time::Instant::now() < deadline => {
                    if line_changed(&mut last, format!("federation: {e}")) {
                        eprintln!("waiting: federation: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(_) if tokio::time::Instant::now() < deadline => continue,
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(Error::NotInEffect(
                        "not in effect: the federation did not answer before the timeout".into(),
                    ))
                }
            };
        let line = r.summary();
        if line_changed(&mut last, line.clone()) {
            eprintln!("waiting: {line}");
        }
        if r.complete || r.refused() || tokio::time::Instant::now() >= deadline {
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn line_changed(last: &mut String, line: String) -> bool {
    if *last == line {
        return false;
    }
    *last = line;
    true
}

/// In effect everywhere, or [`Error::NotInEffect`] (exit 5) saying where
/// not and why.
pub fn verdict(r: &RolloutOut, timeout: Duration) -> Result<(), Error> {
    if r.complete && r.clusters.is_empty() {
        eprintln!(
            "computed at version {} (revision {}); no agent is subscribed to run it",
            r.version, r.revision
        );
        Ok(())
    } else if r.complete {
        eprintln!(
            "in effect: every agent runs version {} (revision {})",
            r.version, r.revision
        );
        Ok(())
    } else if r.refused() {
        Err(Error::NotInEffect(format!(
            "not in effect: {}",
            r.shortfall()
        )))
    } else {
        Err(Error::NotInEffect(format!(
            "not in effect after {}s: {}",
            timeout.as_secs(),
            r.shortfall()
        )))
    }
}

/// `--wait` after a change: waits, prints the table (or JSON), and says
/// whether the change is in effect.
pub async fn wait_and_report(
    url: &crate::client::Fed,
    service: Option<&ServiceKey>,
    revision: i64,
    timeout: Duration,
    fmt: Format,
) -> Result<(), Error> {
    let r = wait(url, service, revision, timeout).await?;
    match fmt {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&r).map_err(|e| Error::Other(e.into()))?
        ),
        Format::Table => print!("{}", r.table()),
    }
    verdict(&r, timeout)
}
