//! Drill scenarios: `scenarios/*.yaml` (`kind: Drill`, `fedmesh.io/v1`).
//!
//! A scenario is a load profile, timed steps (faults and operator actions)
//! and what must hold (SLOs), with conditions that abort it early. It names
//! clusters and regions, not addresses: [`Scenario::check`] resolves them
//! against the topology it runs on.

use mesh_core::duration;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// A parsed, validated scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Its name (`metadata.name`).
    pub name: String,
    /// What it rehearses.
    pub description: String,
    /// The load it sends while it runs.
    pub load: Load,
    /// Istio or fedmesh policy documents (YAML) applied before the load
    /// starts and deleted after.
    pub policies: String,
    /// Faults and actions, by time.
    pub steps: Vec<Step>,
    /// What must hold.
    pub slo: Slo,
    /// When to stop early (and undo every fault).
    pub abort: Option<Abort>,
}

/// The load of a drill: HTTP requests through each calling cluster's
/// frontend agent to one service.
#[derive(Debug, Clone, PartialEq)]
pub struct Load {
    /// `HOST[:PORT]` of the mesh services the requests go to, in turn.
    pub hosts: Vec<String>,
    /// Calling clusters; empty: every cluster of the topology.
    pub from: Vec<String>,
    /// Requests per second from each calling cluster.
    pub rate: u32,
    /// How long the load runs (the steps happen within it).
    pub duration: Duration,
    /// A request that takes longer has failed.
    pub timeout: Duration,
}

/// One timed step.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// When, from the start of the load.
    pub at: Duration,
    /// What.
    pub action: Action,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Stops a cluster's east-west gateway at once (connections reset).
    KillGateway { cluster: String },
    /// Starts it again, on the same address.
    StartGateway { cluster: String },
    /// Drops everything sent to a cluster's gateway, without a reset.
    BlackholeGateway { cluster: String },
    /// Undoes a black hole (or a kill's relay side).
    RestoreGateway { cluster: String },
    /// Cuts a region's clusters off the federation and the registry.
    Partition { region: String },
    /// Undoes a partition.
    Heal { region: String },
    /// Adds latency (and loss) on the way to a cluster or a region.
    Latency {
        to: String,
        delay: Duration,
        jitter: Duration,
        loss: f64,
    },
    /// Removes it.
    ClearLatency { to: String },
    /// Makes one service fail (HTTP 503) in one cluster.
    FailService { cluster: String, service: String },
    /// Makes it answer again.
    HealService { cluster: String, service: String },
    /// Operator weights for a service (`meshctl weights set`).
    SetWeights {
        service: String,
        weights: BTreeMap<String, u32>,
    },
    /// Clears them.
    ClearWeights { service: String },
    /// `meshctl drain`.
    Drain { cluster: String },
    /// `meshctl undrain`.
    Undrain { cluster: String },
}

impl Action {
    /// The step's kind, as written in scenarios.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::KillGateway { .. } => "killGateway",
            Self::StartGateway { .. } => "startGateway",
            Self::BlackholeGateway { .. } => "blackholeGateway",
            Self::RestoreGateway { .. } => "restoreGateway",
            Self::Partition { .. } => "partition",
            Self::Heal { .. } => "heal",
            Self::Latency { .. } => "latency",
            Self::ClearLatency { .. } => "clearLatency",
            Self::FailService { .. } => "failService",
            Self::HealService { .. } => "healService",
            Self::SetWeights { .. } => "setWeights",
            Self::ClearWeights { .. } => "clearWeights",
            Self::Drain { .. } => "drain",
            Self::Undrain { .. } => "undrain",
        }
    }

    /// Does it cause a fault (the timeline measures detection and shift
    /// from it)? Operator actions and repairs do not.
    pub fn is_fault(&self) -> bool {
        matches!(
            self,
            Self::KillGateway { .. }
                | Self::BlackholeGateway { .. }
                | Self::Partition { .. }
                | Self::Latency { .. }
                | Self::FailService { .. }
        )
    }

    /// Does it repair a fault (the timeline measures recovery from it)?
    pub fn is_repair(&self) -> bool {
        matches!(
            self,
            Self::StartGateway { .. }
                | Self::RestoreGateway { .. }
                | Self::Heal { .. }
                | Self::ClearLatency { .. }
                | Self::HealService { .. }
        )
    }

    /// The cluster or region it is about, for the report.
    pub fn target(&self) -> String {
        match self {
            Self::KillGateway { cluster }
            | Self::StartGateway { cluster }
            | Self::BlackholeGateway { cluster }
            | Self::RestoreGateway { cluster }
            | Self::Drain { cluster }
            | Self::Undrain { cluster } => cluster.clone(),
            Self::Partition { region } | Self::Heal { region } => region.clone(),
            Self::Latency { to, .. } | Self::ClearLatency { to } => to.clone(),
            Self::FailService { cluster, service } | Self::HealService { cluster, service } => {
                format!("{service} in {cluster}")
            }
            Self::SetWeights { service, weights } => format!(
                "{service}: {}",
                weights
                    .iter()
                    .map(|(c, w)| format!("{c}={w}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Self::ClearWeights { service } => service.clone(),
        }
    }
}

/// What must hold over the whole drill.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Slo {
    /// Least share of requests that succeed, in percent.
    pub success_rate: Option<f64>,
    /// Longest time from a fault until no calling cluster's requests are
    /// impaired by it any more.
    pub time_to_shift: Option<Duration>,
    /// Highest p99 latency of the successful requests.
    pub p99: Option<Duration>,
    /// Most requests that may fail (0: none).
    pub max_failed: Option<u64>,
    /// Hosts (of the load's) whose requests must all succeed, whatever
    /// else fails: a fault of another service leaves them untouched.
    pub untouched: Vec<String>,
}

/// When a drill stops early.
#[derive(Debug, Clone, PartialEq)]
pub struct Abort {
    /// The success rate over `window` fell below this (percent).
    pub success_rate_below: f64,
    /// The window it is measured over.
    pub window: Duration,
}

// ---- the file as written ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct File {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: Spec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    #[serde(default)]
    description: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Spec {
    load: LoadIn,
    #[serde(default)]
    policies: String,
    #[serde(default)]
    steps: Vec<StepIn>,
    #[serde(default)]
    slo: SloIn,
    #[serde(default)]
    abort: Option<AbortIn>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadIn {
    #[serde(default = "default_hosts")]
    hosts: Vec<String>,
    #[serde(default)]
    from: Vec<String>,
    rate: u32,
    duration: String,
    #[serde(default = "default_timeout")]
    timeout: String,
}

fn default_hosts() -> Vec<String> {
    vec!["reviews.default:9080".into()]
}

fn default_timeout() -> String {
    "5s".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct StepIn {
    at: String,
    kill_gateway: Option<ClusterRef>,
    start_gateway: Option<ClusterRef>,
    blackhole_gateway: Option<ClusterRef>,
    restore_gateway: Option<ClusterRef>,
    partition: Option<RegionRef>,
    heal: Option<RegionRef>,
    latency: Option<LatencyIn>,
    clear_latency: Option<ToRef>,
    fail_service: Option<ServiceRef>,
    heal_service: Option<ServiceRef>,
    set_weights: Option<WeightsIn>,
    clear_weights: Option<ServiceOnly>,
    drain: Option<ClusterRef>,
    undrain: Option<ClusterRef>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterRef {
    cluster: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionRef {
    region: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToRef {
    to: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LatencyIn {
    to: String,
    delay: String,
    #[serde(default)]
    jitter: Option<String>,
    #[serde(default)]
    loss: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceRef {
    cluster: String,
    service: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceOnly {
    service: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightsIn {
    service: String,
    weights: BTreeMap<String, u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SloIn {
    success_rate: Option<f64>,
    time_to_shift: Option<String>,
    p99: Option<String>,
    max_failed: Option<u64>,
    #[serde(default)]
    untouched: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AbortIn {
    success_rate_below: f64,
    window: String,
}

fn dur(field: &str, s: &str) -> Result<Duration, String> {
    duration::parse(s).map_err(|e| format!("{field}: {e}"))
}

fn percent(field: &str, v: f64) -> Result<f64, String> {
    if (0.0..=100.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{field}: {v} is not a percentage (0 to 100)"))
    }
}

impl Scenario {
    /// Parses and validates a scenario; every error names its field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let f: File = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        if f.api_version != "fedmesh.io/v1" {
            return Err(format!(
                "apiVersion: {:?} is not fedmesh.io/v1",
                f.api_version
            ));
        }
        if f.kind != "Drill" {
            return Err(format!("kind: {:?} is not Drill", f.kind));
        }
        if f.metadata.name.is_empty() {
            return Err("metadata.name: is required".into());
        }
        let l = f.spec.load;
        if l.rate == 0 {
            return Err("spec.load.rate: must be at least 1 request per second".into());
        }
        if l.hosts.is_empty() {
            return Err("spec.load.hosts: names no service".into());
        }
        let load = Load {
            hosts: l.hosts,
            from: l.from,
            rate: l.rate,
            duration: dur("spec.load.duration", &l.duration)?,
            timeout: dur("spec.load.timeout", &l.timeout)?,
        };
        if load.duration.is_zero() {
            return Err("spec.load.duration: must be more than 0".into());
        }
        if load.timeout.is_zero() {
            return Err("spec.load.timeout: must be more than 0".into());
        }
        let mut steps = Vec::new();
        for (i, s) in f.spec.steps.into_iter().enumerate() {
            let field = format!("spec.steps[{i}]");
            let at = dur(&format!("{field}.at"), &s.at)?;
            if at > load.duration {
                return Err(format!(
                    "{field}.at: {} is after the load ends ({})",
                    s.at, l.duration
                ));
            }
            if steps.last().is_some_and(|p: &Step| p.at > at) {
                return Err(format!("{field}.at: steps must be in time order"));
            }
            steps.push(Step {
                at,
                action: action(&field, s)?,
            });
        }
        let slo = Slo {
            success_rate: f
                .spec
                .slo
                .success_rate
                .map(|v| percent("spec.slo.successRate", v))
                .transpose()?,
            time_to_shift: f
                .spec
                .slo
                .time_to_shift
                .as_deref()
                .map(|s| dur("spec.slo.timeToShift", s))
                .transpose()?,
            p99: f
                .spec
                .slo
                .p99
                .as_deref()
                .map(|s| dur("spec.slo.p99", s))
                .transpose()?,
            max_failed: f.spec.slo.max_failed,
            untouched: f.spec.slo.untouched,
        };
        if let Some(h) = slo.untouched.iter().find(|h| !load.hosts.contains(h)) {
            return Err(format!(
                "spec.slo.untouched: {h:?} is not one of spec.load.hosts"
            ));
        }
        let abort = f
            .spec
            .abort
            .map(|a| -> Result<Abort, String> {
                Ok(Abort {
                    success_rate_below: percent(
                        "spec.abort.successRateBelow",
                        a.success_rate_below,
                    )?,
                    window: dur("spec.abort.window", &a.window)?,
                })
            })
            .transpose()?;
        if !f.spec.policies.trim().is_empty() {
            let ns = mesh_core::name::Namespace::new("default").map_err(|e| e.to_string())?;
            mesh_core::policy::parse_yaml("spec.policies", &f.spec.policies, &ns).map_err(
                |errs| {
                    errs.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                },
            )?;
        }
        Ok(Self {
            name: f.metadata.name,
            description: f.metadata.description,
            load,
            policies: f.spec.policies,
            steps,
            slo,
            abort,
        })
    }

    /// Checks every cluster and region it names against a topology's.
    pub fn check(&self, clusters: &BTreeMap<String, String>) -> Result<(), String> {
        let regions: Vec<&String> = clusters.values().collect();
        let cluster = |field: &str, c: &str| {
            if clusters.contains_key(c) {
                Ok(())
            } else {
                Err(format!(
                    "{field}: no cluster {c:?} in the topology (it has {})",
                    clusters.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            }
        };
        let region = |field: &str, r: &str| {
            if regions.iter().any(|x| *x == r) {
                Ok(())
            } else {
                Err(format!("{field}: no region {r:?} in the topology"))
            }
        };
        for c in &self.load.from {
            cluster("spec.load.from", c)?;
        }
        for (i, s) in self.steps.iter().enumerate() {
            let field = format!("spec.steps[{i}].{}", s.action.kind());
            match &s.action {
                Action::KillGateway { cluster: c }
                | Action::StartGateway { cluster: c }
                | Action::BlackholeGateway { cluster: c }
                | Action::RestoreGateway { cluster: c }
                | Action::Drain { cluster: c }
                | Action::Undrain { cluster: c }
                | Action::FailService { cluster: c, .. }
                | Action::HealService { cluster: c, .. } => cluster(&field, c)?,
                Action::Partition { region: r } | Action::Heal { region: r } => {
                    region(&field, r)?;
                }
                Action::Latency { to, .. } | Action::ClearLatency { to } => {
                    if cluster(&field, to).is_err() {
                        region(&field, to).map_err(|_| {
                            format!("{field}.to: {to:?} is neither a cluster nor a region of the topology")
                        })?;
                    }
                }
                Action::SetWeights { weights, .. } => {
                    for c in weights.keys() {
                        cluster(&format!("{field}.weights"), c)?;
                    }
                }
                Action::ClearWeights { .. } => {}
            }
        }
        Ok(())
    }

    /// The same drill `factor` times shorter (for tests: every time in it
    /// divided, the SLOs' times kept).
    #[must_use]
    pub fn shortened(&self, factor: u32) -> Self {
        let f = factor.max(1);
        let mut s = self.clone();
        s.load.duration /= f;
        for step in &mut s.steps {
            step.at /= f;
        }
        s
    }
}

fn action(field: &str, s: StepIn) -> Result<Action, String> {
    let mut found: Vec<Action> = Vec::new();
    let mut push = |a: Action| found.push(a);
    if let Some(r) = s.kill_gateway {
        push(Action::KillGateway { cluster: r.cluster });
    }
    if let Some(r) = s.start_gateway {
        push(Action::StartGateway { cluster: r.cluster });
    }
    if let Some(r) = s.blackhole_gateway {
        push(Action::BlackholeGateway { cluster: r.cluster });
    }
    if let Some(r) = s.restore_gateway {
        push(Action::RestoreGateway { cluster: r.cluster });
    }
    if let Some(r) = s.partition {
        push(Action::Partition { region: r.region });
    }
    if let Some(r) = s.heal {
        push(Action::Heal { region: r.region });
    }
    if let Some(l) = s.latency {
        if !(0.0..=1.0).contains(&l.loss) {
            return Err(format!(
                "{field}.latency.loss: {} is not a probability (0 to 1)",
                l.loss
            ));
        }
        push(Action::Latency {
            delay: dur(&format!("{field}.latency.delay"), &l.delay)?,
            jitter: l
                .jitter
                .as_deref()
                .map(|j| dur(&format!("{field}.latency.jitter"), j))
                .transpose()?
                .unwrap_or_default(),
            to: l.to,
            loss: l.loss,
        });
    }
    if let Some(r) = s.clear_latency {
        push(Action::ClearLatency { to: r.to });
    }
    if let Some(r) = s.fail_service {
        push(Action::FailService {
            cluster: r.cluster,
            service: r.service,
        });
    }
    if let Some(r) = s.heal_service {
        push(Action::HealService {
            cluster: r.cluster,
            service: r.service,
        });
    }
    if let Some(w) = s.set_weights {
        if w.weights.is_empty() {
            return Err(format!("{field}.setWeights.weights: is empty"));
        }
        push(Action::SetWeights {
            service: w.service,
            weights: w.weights,
        });
    }
    if let Some(r) = s.clear_weights {
        push(Action::ClearWeights { service: r.service });
    }
    if let Some(r) = s.drain {
        push(Action::Drain { cluster: r.cluster });
    }
    if let Some(r) = s.undrain {
        push(Action::Undrain { cluster: r.cluster });
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(format!(
            "{field}: names no action (one of killGateway, startGateway, blackholeGateway, restoreGateway, partition, heal, latency, clearLatency, failService, healService, setWeights, clearWeights, drain, undrain)"
        )),
        _ => Err(format!(
            "{field}: names {} actions ({}); a step does one thing",
            found.len(),
            found.iter().map(Action::kind).collect::<Vec<_>>().join(", ")
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const GOOD: &str = r"
apiVersion: fedmesh.io/v1
kind: Drill
metadata:
  name: t
spec:
  load:
    rate: 10
    duration: 20s
  steps:
    - at: 5s
      blackholeGateway: {cluster: a}
    - at: 15s
      restoreGateway: {cluster: a}
  slo:
    successRate: 99.9
    timeToShift: 5s
";

    fn topo() -> BTreeMap<String, String> {
        [("a", "r1"), ("b", "r2")]
            .into_iter()
            .map(|(c, r)| (c.to_string(), r.to_string()))
            .collect()
    }

    #[test]
    fn a_good_scenario_parses_with_defaults() {
        let s = Scenario::parse(GOOD).unwrap();
        assert_eq!(s.load.hosts, ["reviews.default:9080"]);
        assert_eq!(s.load.timeout, Duration::from_secs(5));
        assert_eq!(s.steps.len(), 2);
        assert!(s.steps[0].action.is_fault());
        assert!(s.steps[1].action.is_repair());
        assert_eq!(s.slo.time_to_shift, Some(Duration::from_secs(5)));
        s.check(&topo()).unwrap();
        let short = s.shortened(4);
        assert_eq!(short.load.duration, Duration::from_secs(5));
        assert_eq!(short.steps[1].at, Duration::from_millis(3750));
    }

    #[test]
    fn refusals_name_the_field() {
        let cases = [
            (GOOD.replace("fedmesh.io/v1", "v2"), "apiVersion"),
            (GOOD.replace("kind: Drill", "kind: Other"), "kind"),
            (GOOD.replace("rate: 10", "rate: 0"), "spec.load.rate"),
            (GOOD.replace("duration: 20s", "duration: soon"), "spec.load.duration"),
            (GOOD.replace("at: 15s", "at: 25s"), "spec.steps[1].at"),
            (GOOD.replace("at: 15s", "at: 1s"), "spec.steps[1].at"),
            (GOOD.replace("successRate: 99.9", "successRate: 120"), "spec.slo.successRate"),
            (
                GOOD.replace("restoreGateway: {cluster: a}", "restoreGateway: {cluster: a}\n      drain: {cluster: a}"),
                "spec.steps[1]: names 2 actions",
            ),
            (GOOD.replace("restoreGateway: {cluster: a}", "teleport: {cluster: a}"), "teleport"),
            (GOOD.replace("    timeToShift: 5s", "    timeToShift: 5s\n    colour: red"), "colour"),
            (GOOD.replace("    timeToShift: 5s", "    timeToShift: 5s\n    untouched: [x:1]"), "spec.slo.untouched"),
            (
                GOOD.replace("  steps:", "  policies: |\n    apiVersion: networking.istio.io/v1\n    kind: VirtualService\n    metadata: {name: x}\n    spec: {hosts: 7}\n  steps:"),
                "spec.policies",
            ),
        ];
        for (text, want) in cases {
            let err = Scenario::parse(&text).unwrap_err();
            assert!(err.contains(want), "{want:?} not in {err:?}");
        }
        let s = Scenario::parse(
            &GOOD.replace("cluster: a}\n    - at: 15s", "cluster: z}\n    - at: 15s"),
        )
        .unwrap();
        let err = s.check(&topo()).unwrap_err();
        assert!(
            err.contains("spec.steps[0].blackholeGateway: no cluster \"z\""),
            "{err}"
        );
    }

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") {
                let text = std::fs::read_to_string(&p).unwrap();
                Scenario::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 5, "{n} scenarios");
    }
}
