//! `weights set|get|explain|clear`, `drain`, `undrain`: global traffic.

use crate::cli::Format;
use crate::cmd::rollout::{self, Wait};
use crate::output::{rfc3339, table};
use crate::Error;
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::traffic_client::TrafficClient;
use mesh_core::name::Namespace;
use mesh_core::service::ServiceKey;
use serde::Serialize;
use std::collections::BTreeMap;

/// `meshctl weights ...`.
#[derive(Debug, clap::Subcommand)]
pub enum WeightsCommand {
    /// Set a service's weights by cluster or region, e.g. `us-east=70,eu-west=30`.
    Set {
        /// The service (`name`, `name.namespace` or `namespace/name`).
        service: String,
        /// `NAME=WEIGHT,...`: cluster or region names with relative weights.
        weights: String,
        /// What the names are; by default, whatever they all are.
        #[arg(long, value_enum)]
        by: Option<By>,
        /// Revert by itself after this long (e.g. `10m`).
        #[arg(long)]
        ttl: Option<String>,
        /// Print the predicted weights (and QPS per cluster); change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Past the guardrails (audited).
        #[arg(long)]
        force: bool,
        /// Only if the current setting is at this revision (`meshctl weights get` shows it).
        #[arg(long)]
        if_revision: Option<i64>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Configured and effective weights, per calling cluster.
    Get {
        /// The service.
        service: String,
    },
    /// Why each weight is what it is.
    Explain {
        /// The service.
        service: String,
    },
    /// Remove the operator weights: the policy's or locality's apply again.
    Clear {
        /// The service.
        service: String,
        #[command(flatten)]
        wait: Wait,
    },
}

/// What weight names are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum By {
    /// Cluster names.
    Cluster,
    /// Region names.
    Region,
}

fn service(s: &str) -> Result<ServiceKey, Error> {
    let default_ns = Namespace::new("default").map_err(|e| Error::Other(e.into()))?;
    ServiceKey::parse_with_default(s, Some(&default_ns)).map_err(|e| Error::Usage(e.to_string()))
}

/// `a=1,b=2` into a map; every bad item named.
fn parse_weights(s: &str) -> Result<BTreeMap<String, u32>, Error> {
    let mut out = BTreeMap::new();
    let mut errs = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => match v.trim().parse::<u32>() {
                Ok(w) => {
                    if out.insert(k.trim().to_string(), w).is_some() {
                        errs.push(format!("{k} is given twice"));
                    }
                }
                Err(_) => errs.push(format!("{item:?}: the weight must be a whole number")),
            },
            _ => errs.push(format!("{item:?}: expected NAME=WEIGHT")),
        }
    }
    if out.is_empty() && errs.is_empty() {
        errs.push("no weights given".into());
    }
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(Error::Usage(format!(
            "invalid weights: {}",
            errs.join("; ")
        )))
    }
}

fn percent(w: u32) -> String {
    format!("{:.1}%", f64::from(w) / 100.0)
}

fn row(ws: &BTreeMap<String, u32>) -> String {
    let mut v: Vec<(&String, &u32)> = ws.iter().filter(|(_, w)| **w > 0).collect();
    v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|(c, w)| format!("{c}={}", percent(**w)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One calling cluster's weights as meshctl prints them.
#[derive(Debug, Serialize)]
pub struct CallerRow {
    /// Calling cluster.
    pub caller: String,
    /// Its region.
    pub region: String,
    /// Destination cluster to weight (parts of 10000).
    pub weights: BTreeMap<String, u32>,
}

fn callers(cs: Vec<api::CallerWeights>, regions: &BTreeMap<String, String>) -> Vec<CallerRow> {
    let mut rows: Vec<CallerRow> = cs
        .into_iter()
        .map(|c| CallerRow {
            region: regions.get(&c.caller).cloned().unwrap_or_default(),
            caller: c.caller,
            weights: c.weights.into_iter().collect(),
        })
        .collect();
    rows.sort_by(|a, b| a.region.cmp(&b.region).then(a.caller.cmp(&b.caller)));
    rows
}

async fn regions_of(
    url: &crate::client::Fed,
) -> Result<(BTreeMap<String, String>, Vec<String>), Error> {
    let ch = crate::client::connect(url).await?;
    let cs = AdminClient::new(ch)
        .list_clusters(api::ListClustersRequest {})
        .await?
        .into_inner();
    let mut regions = BTreeMap::new();
    for c in cs.clusters {
        if let Some(info) = c.info {
            regions.insert(
                info.name,
                info.locality.map(|l| l.region).unwrap_or_default(),
            );
        }
    }
    let mut names: Vec<String> = regions.values().cloned().collect();
    names.sort();
    names.dedup();
    Ok((regions, names))
}

/// `meshctl weights ...`.
pub async fn run(url: &crate::client::Fed, cmd: &WeightsCommand, fmt: Format) -> Result<(), Error> {
    match cmd {
        WeightsCommand::Set {
            service: s,
            weights,
            by,
            ttl,
            dry_run,
            force,
            if_revision,
            wait,
        } => {
            let svc = service(s)?;
            let weights = parse_weights(weights)?;
            let timeout = if *dry_run { None } else { wait.timeout()? };
            let ttl_seconds = match ttl {
                Some(t) => {
                    let d = mesh_core::duration::parse(t)
                        .map_err(|e| Error::Usage(format!("invalid --ttl: {e}")))?;
                    u32::try_from(d.as_secs())
                        .ok()
                        .filter(|s| *s > 0)
                        .ok_or_else(|| Error::Usage("invalid --ttl: must be 1s or more".into()))?
                }
                None => 0,
            };
            let (cluster_regions, region_names) = regions_of(url).await?;
            let by = match by {
                Some(By::Cluster) => "cluster",
                Some(By::Region) => "region",
                None if weights.keys().all(|k| cluster_regions.contains_key(k)) => "cluster",
                None if weights.keys().all(|k| region_names.contains(k)) => "region",
                None => {
                    let unknown: Vec<&String> = weights
                        .keys()
                        .filter(|k| !cluster_regions.contains_key(*k) && !region_names.contains(k))
                        .collect();
                    return Err(Error::Usage(format!(
                        "{} {} neither a registered cluster nor a region (clusters: {}; regions: {}); or mix the two? give --by",
                        unknown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                        if unknown.len() == 1 { "is" } else { "are" },
                        cluster_regions.keys().cloned().collect::<Vec<_>>().join(", "),
                        region_names.join(", ")
                    )));
                }
            };
            let ch = crate::client::connect(url).await?;
            let r = TrafficClient::new(ch)
                .set_weights(api::SetWeightsRequest {
                    service: Some((&svc).into()),
                    by: by.into(),
                    weights: weights.clone().into_iter().collect(),
                    ttl_seconds,
                    dry_run: *dry_run,
                    force: *force,
                    if_revision: if_revision.unwrap_or(0),
                    actor: "meshctl weights set".into(),
                })
                .await?
                .into_inner();
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            let rows = callers(r.predicted, &cluster_regions);
            let qps: BTreeMap<String, f64> = r.predicted_qps.into_iter().collect();
            if fmt == Format::Json {
                #[derive(Serialize)]
                struct Out {
                    applied: bool,
                    revision: i64,
                    predicted: Vec<CallerRow>,
                    predicted_qps: BTreeMap<String, f64>,
                    #[serde(skip_serializing_if = "Option::is_none")]
                    rollout: Option<rollout::RolloutOut>,
                }
                let rollout = match timeout {
                    Some(t) if r.applied => {
                        Some((rollout::wait(url, Some(&svc), r.revision, t).await?, t))
                    }
                    _ => None,
                };
                let s = serde_json::to_string_pretty(&Out {
                    applied: r.applied,
                    revision: r.revision,
                    predicted: rows,
                    predicted_qps: qps,
                    rollout: rollout.as_ref().map(|(r, _)| r.clone()),
                })
                .map_err(|e| Error::Other(e.into()))?;
                println!("{s}");
                return match rollout {
                    Some((r, t)) => rollout::verdict(&r, t),
                    None => Ok(()),
                };
            }
            if r.applied {
                println!("{svc}: weights set by {by} (revision {})", r.revision);
            } else {
                println!("{svc}: dry run, nothing changed; predicted weights:");
            }
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| vec![r.caller.clone(), r.region.clone(), row(&r.weights)])
                .collect();
            print!(
                "{}",
                table(&["CALLER", "REGION", "PREDICTED WEIGHTS"], &cells)
            );
            if !qps.is_empty() {
                let cells: Vec<Vec<String>> = qps
                    .iter()
                    .map(|(c, q)| vec![c.clone(), format!("{q:.0}")])
                    .collect();
                print!("{}", table(&["CLUSTER", "PREDICTED QPS"], &cells));
            }
            match timeout {
                Some(t) if r.applied => {
                    rollout::wait_and_report(url, Some(&svc), r.revision, t, fmt).await
                }
                _ => Ok(()),
            }
        }
        WeightsCommand::Get { service: s } => {
            let svc = service(s)?;
            let ch = crate::client::connect(url).await?;
            let r = TrafficClient::new(ch)
                .get_weights(api::GetWeightsRequest {
                    service: Some((&svc).into()),
                })
                .await?
                .into_inner();
            let regions: BTreeMap<String, String> = r.regions.into_iter().collect();
            let rows = callers(r.effective, &regions);
            // Whether the latest change of these weights is in effect (not
            // shown by a federation too old to say).
            let applied = rollout::get(crate::client::connect(url).await?, Some(&svc), 0)
                .await
                .ok();
            if fmt == Format::Json {
                #[derive(Serialize)]
                struct Configured {
                    by: String,
                    weights: BTreeMap<String, u32>,
                    set_by: String,
                    set: String,
                    expires: Option<String>,
                    forced: bool,
                    revision: i64,
                }
                #[derive(Serialize)]
                struct Out {
                    service: String,
                    configured: Option<Configured>,
                    effective: Vec<CallerRow>,
                    computed: Option<String>,
                    drained: Vec<String>,
                    rollout: Option<rollout::RolloutOut>,
                }
                let out = Out {
                    service: svc.to_string(),
                    configured: r.configured.map(|c| Configured {
                        by: c.by,
                        weights: c.weights.into_iter().collect(),
                        set_by: c.set_by,
                        set: rfc3339(c.set_unix_ms),
                        expires: (c.expires_unix_ms > 0).then(|| rfc3339(c.expires_unix_ms)),
                        forced: c.forced,
                        revision: c.revision,
                    }),
                    effective: rows,
                    computed: (r.computed_unix_ms > 0).then(|| rfc3339(r.computed_unix_ms)),
                    drained: r.drained,
                    rollout: applied,
                };
                let s = serde_json::to_string_pretty(&out).map_err(|e| Error::Other(e.into()))?;
                println!("{s}");
                return Ok(());
            }
            match &r.configured {
                Some(c) => {
                    let ws: BTreeMap<String, u32> = c.weights.clone().into_iter().collect();
                    println!(
                        "configured  by {}: {} (set by {} at {}{}{}; revision {})",
                        c.by,
                        ws.iter()
                            .map(|(k, w)| format!("{k}={w}"))
                            .collect::<Vec<_>>()
                            .join(","),
                        c.set_by,
                        rfc3339(c.set_unix_ms),
                        if c.expires_unix_ms > 0 {
                            format!(", reverts at {}", rfc3339(c.expires_unix_ms))
                        } else {
                            String::new()
                        },
                        if c.forced { ", forced" } else { "" },
                        c.revision
                    );
                }
                None => println!("configured  none: locality and the service's policy decide"),
            }
            if !r.drained.is_empty() {
                println!("drained     {}", r.drained.join(", "));
            }
            if r.computed_unix_ms > 0 {
                println!("computed    {}", rfc3339(r.computed_unix_ms));
            }
            if let Some(applied) = applied.as_ref().filter(|a| a.revision > 0) {
                println!(
                    "applied     revision {}, {}",
                    applied.revision,
                    applied.summary()
                );
                for c in &applied.clusters {
                    for n in &c.nacked {
                        println!("            NACK {}: {n}", c.cluster);
                    }
                }
            }
            println!();
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| vec![r.caller.clone(), r.region.clone(), row(&r.weights)])
                .collect();
            print!(
                "{}",
                table(&["CALLER", "REGION", "EFFECTIVE WEIGHTS"], &cells)
            );
            Ok(())
        }
        WeightsCommand::Explain { service: s } => {
            let svc = service(s)?;
            let ch = crate::client::connect(url).await?;
            let r = TrafficClient::new(ch)
                .explain_weights(api::GetWeightsRequest {
                    service: Some((&svc).into()),
                })
                .await?
                .into_inner();
            if fmt == Format::Json {
                #[derive(Serialize)]
                struct Out {
                    caller: String,
                    region: String,
                    weights: BTreeMap<String, u32>,
                    why: Vec<String>,
                }
                let out: Vec<Out> = r
                    .callers
                    .into_iter()
                    .map(|c| Out {
                        caller: c.caller,
                        region: c.region,
                        weights: c.weights.into_iter().collect(),
                        why: c.lines,
                    })
                    .collect();
                let s = serde_json::to_string_pretty(&out).map_err(|e| Error::Other(e.into()))?;
                println!("{s}");
                return Ok(());
            }
            for c in r.callers {
                let ws: BTreeMap<String, u32> = c.weights.into_iter().collect();
                println!("from {} ({}): {}", c.caller, c.region, row(&ws));
                for l in c.lines {
                    println!("  {l}");
                }
            }
            Ok(())
        }
        WeightsCommand::Clear { service: s, wait } => {
            let svc = service(s)?;
            let timeout = wait.timeout()?;
            let ch = crate::client::connect(url).await?;
            let r = TrafficClient::new(ch)
                .clear_weights(api::ClearWeightsRequest {
                    service: Some((&svc).into()),
                    actor: "meshctl weights clear".into(),
                })
                .await?
                .into_inner();
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            if r.applied {
                println!("{svc}: operator weights removed (revision {})", r.revision);
            }
            match timeout {
                Some(t) if r.applied => {
                    rollout::wait_and_report(url, Some(&svc), r.revision, t, fmt).await
                }
                _ => Ok(()),
            }
        }
    }
}

/// `meshctl drain CLUSTER` / `meshctl undrain CLUSTER`.
pub async fn drain(
    url: &crate::client::Fed,
    cluster: &str,
    undrain: bool,
    force: bool,
    wait: &Wait,
    fmt: Format,
) -> Result<(), Error> {
    let timeout = wait.timeout()?;
    let ch = crate::client::connect(url).await?;
    let r = TrafficClient::new(ch)
        .drain(api::DrainRequest {
            cluster: cluster.into(),
            undrain,
            force,
            actor: if undrain {
                "meshctl undrain"
            } else {
                "meshctl drain"
            }
            .into(),
        })
        .await?
        .into_inner();
    match (undrain, r.changed) {
        (false, true) => println!("{cluster}: drained (revision {})", r.revision),
        (false, false) => println!("{cluster}: already drained"),
        (true, true) => println!(
            "{cluster}: undrained, coming back with slow start (revision {})",
            r.revision
        ),
        (true, false) => println!("{cluster}: was not drained"),
    }
    match timeout {
        // Unchanged: wait for the change that made it so.
        Some(t) => {
            rollout::wait_and_report(url, None, if r.changed { r.revision } else { 0 }, t, fmt)
                .await
        }
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_parse_and_every_bad_item_is_named() {
        let w = parse_weights("us-east=70, eu-west=30").unwrap_or_default();
        assert_eq!(w.get("us-east"), Some(&70));
        assert_eq!(w.get("eu-west"), Some(&30));
        let Err(Error::Usage(e)) = parse_weights("a=x,b,=3,a=1,a=2") else {
            panic!("must be refused");
        };
        for want in [
            "\"a=x\": the weight must be a whole number",
            "\"b\": expected NAME=WEIGHT",
            "\"=3\"",
            "a is given twice",
        ] {
            assert!(e.contains(want), "{want} in {e}");
        }
        assert!(parse_weights("").is_err());
    }
}
