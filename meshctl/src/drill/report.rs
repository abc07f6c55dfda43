//! What a drill measured: requests, the timeline of its faults (injected,
//! first impact, weights moved, traffic shifted, recovered) and its SLOs.

use super::scenario::{Action, Scenario};
use super::topology::Topology;
use serde::Serialize;
use std::collections::BTreeMap;

/// One request of the load.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Calling cluster.
    pub from: String,
    /// Host called.
    pub host: String,
    /// Sent, ms from the start of the drill.
    pub start_ms: f64,
    /// Answered (or given up), ms from the start.
    pub end_ms: f64,
    /// The cluster that answered, on success.
    pub served_by: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

impl Sample {
    fn latency_ms(&self) -> f64 {
        self.end_ms - self.start_ms
    }
}

/// Something that happened, ms from the start.
#[derive(Debug, Clone, Serialize)]
pub struct Stamp {
    /// When.
    pub at_ms: f64,
    /// `step`, `weights-off`, `weights-back`, `abort`, `cleanup`.
    pub kind: String,
    /// What.
    pub what: String,
}

/// One fault and what followed it.
#[derive(Debug, Clone, Serialize)]
pub struct Fault {
    /// The step (`kind target`).
    pub step: String,
    /// When it was applied (ms from the start).
    pub at_ms: f64,
    /// When it was repaired, if the drill did.
    pub repaired_ms: Option<f64>,
    /// From the fault to the first impaired request (failed, or slower
    /// than the impairment threshold).
    pub first_impact_ms: Option<f64>,
    /// From the fault to the federation's weights giving the faulted
    /// clusters nothing.
    pub weights_off_ms: Option<f64>,
    /// From the fault until no calling cluster's requests are impaired by
    /// it any more (the end of the last impaired one): the time to shift.
    /// 0 when none was.
    pub time_to_shift_ms: f64,
    /// Per calling cluster, the same.
    pub time_to_shift_by_caller_ms: BTreeMap<String, f64>,
    /// Requests that failed while it lasted.
    pub failed: u64,
    /// From the repair to the first request the faulted clusters answered.
    pub recovered_ms: Option<f64>,
}

/// Requests by host or by caller.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    /// Sent.
    pub sent: u64,
    /// Failed.
    pub failed: u64,
    /// p99 of the successful ones (ms).
    pub p99_ms: f64,
    /// Answered by each cluster.
    pub served_by: BTreeMap<String, u64>,
}

/// One SLO and whether it held.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What.
    pub slo: String,
    /// The bound.
    pub want: String,
    /// What was measured.
    pub got: String,
    /// Held.
    pub ok: bool,
}

/// The drill's report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario.
    pub name: String,
    /// When the load started (Unix ms).
    pub started_unix_ms: i64,
    /// The trace its timeline was exported as, if it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// `passed`, `failed` (an SLO did not hold) or `aborted`.
    pub outcome: String,
    /// Why it was aborted.
    pub aborted: Option<String>,
    /// How long the load ran (ms).
    pub duration_ms: f64,
    /// Requests sent.
    pub sent: u64,
    /// Requests failed.
    pub failed: u64,
    /// Percent that succeeded.
    pub success_rate: f64,
    /// Latency of the successful requests (ms).
    pub p50_ms: f64,
    /// Latency of the successful requests (ms).
    pub p99_ms: f64,
    /// A request slower than this counted as impaired (ms): three times
    /// the p99 before the first fault, at least 200 ms.
    pub impairment_threshold_ms: f64,
    /// By host.
    pub hosts: BTreeMap<String, Tally>,
    /// By calling cluster.
    pub callers: BTreeMap<String, Tally>,
    /// Each fault.
    pub faults: Vec<Fault>,
    /// Everything that happened, in order.
    pub timeline: Vec<Stamp>,
    /// The SLOs.
    pub checks: Vec<Check>,
    /// What the drill could not undo.
    pub cleanup_errors: Vec<String>,
    /// The most frequent reasons requests failed, with counts.
    pub errors: BTreeMap<String, u64>,
}

impl Report {
    /// Did every SLO hold, with nothing aborted or left broken?
    pub fn passed(&self) -> bool {
        self.outcome == "passed"
    }
}

/// Successful and all requests that ended in `[from, to)` ms.
pub fn window(samples: &[Sample], from: f64, to: f64) -> (u64, u64) {
    let mut ok = 0;
    let mut all = 0;
    for s in samples.iter().filter(|s| s.end_ms >= from && s.end_ms < to) {
        all += 1;
        ok += u64::from(s.error.is_none());
    }
    (ok, all.max(1))
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn tally<'a>(samples: impl Iterator<Item = &'a Sample>) -> Tally {
    let mut t = Tally::default();
    let mut lat = Vec::new();
    for s in samples {
        t.sent += 1;
        match &s.served_by {
            Some(c) if s.error.is_none() => {
                lat.push(s.latency_ms());
                *t.served_by.entry(c.clone()).or_default() += 1;
            }
            _ => t.failed += 1,
        }
    }
    t.p99_ms = quantile(&mut lat, 0.99);
    t
}

/// The clusters a fault is about, and the host it is limited to (a
/// service's failure).
fn scope(a: &Action, topo: &Topology, hosts: &[String]) -> (Vec<String>, Option<String>) {
    let names = |to: &str| -> Vec<String> {
        topo.clusters_of(to)
            .into_iter()
            .map(|c| c.name.clone())
            .collect()
    };
    match a {
        Action::KillGateway { cluster } | Action::BlackholeGateway { cluster } => {
            (vec![cluster.clone()], None)
        }
        Action::Partition { region } => (names(region), None),
        Action::Latency { to, .. } => (names(to), None),
        Action::FailService { cluster, service } => (
            vec![cluster.clone()],
            hosts
                .iter()
                .find(|h| h.split('.').next() == Some(service.as_str()))
                .cloned(),
        ),
        _ => (Vec::new(), None),
    }
}

/// Makes the report.
#[allow(clippy::too_many_arguments, clippy::too_many_lines)]
pub fn build(
    scenario: &Scenario,
    topo: &Topology,
    started_unix_ms: i64,
    samples: Vec<Sample>,
    timeline: Vec<Stamp>,
    ended_ms: f64,
    aborted: Option<String>,
    cleanup_errors: Vec<String>,
) -> Report {
    let all = tally(samples.iter());
    let mut ok_lat: Vec<f64> = samples
        .iter()
        .filter(|s| s.error.is_none())
        .map(Sample::latency_ms)
        .collect();
    let p50 = quantile(&mut ok_lat, 0.5);
    let p99 = quantile(&mut ok_lat, 0.99);
    // Faults in time order, each with its repair.
    let faults_at: Vec<(f64, &Action)> = scenario
        .steps
        .iter()
        .filter(|s| s.action.is_fault())
        .map(|s| (s.at.as_secs_f64() * 1000.0, &s.action))
        .collect();
    let first_fault = faults_at.first().map_or(f64::INFINITY, |f| f.0);
    let mut before: Vec<f64> = samples
        .iter()
        .filter(|s| s.error.is_none() && s.end_ms < first_fault)
        .map(Sample::latency_ms)
        .collect();
    let threshold = (3.0 * quantile(&mut before, 0.99)).max(200.0);
    let step_time = |what: &str, after: f64| {
        timeline
            .iter()
            .find(|t| t.kind == "step" && t.what == what && t.at_ms >= after)
            .map(|t| t.at_ms)
    };
    let mut faults = Vec::new();
    for (planned, action) in &faults_at {
        let step = format!("{} {}", action.kind(), action.target());
        let at = step_time(&step, planned - 1.0).unwrap_or(*planned);
        if at > ended_ms {
            continue; // never applied (aborted before)
        }
        let repair = super::run::undo_of(action)
            .and_then(|u| step_time(&format!("{} {}", u.kind(), u.target()), at));
        let until = repair.unwrap_or(ended_ms);
        let (clusters, host) = scope(action, topo, &scenario.load.hosts);
        let during: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.start_ms >= at && s.start_ms < until)
            .filter(|s| host.as_ref().is_none_or(|h| &s.host == h))
            .collect();
        let impaired: Vec<&&Sample> = during
            .iter()
            .filter(|s| s.error.is_some() || s.latency_ms() > threshold)
            .collect();
        let mut by_caller: BTreeMap<String, f64> = BTreeMap::new();
        for s in &impaired {
            let e = by_caller.entry(s.from.clone()).or_default();
            *e = e.max(s.end_ms - at);
        }
        let weights_off = timeline
            .iter()
            .filter(|t| t.kind == "weights-off" && t.at_ms >= at && t.at_ms < until)
            .filter(|t| {
                clusters
                    .iter()
                    .any(|c| t.what.starts_with(&format!("{c} ")))
            })
            .map(|t| t.at_ms - at)
            .reduce(f64::max)
            .filter(|_| !clusters.is_empty());
        let recovered = repair.and_then(|r| {
            samples
                .iter()
                .filter(|s| s.start_ms >= r && s.error.is_none())
                .filter(|s| s.served_by.as_ref().is_some_and(|c| clusters.contains(c)))
                .map(|s| s.start_ms - r)
                .reduce(f64::min)
        });
        faults.push(Fault {
            step,
            at_ms: at,
            repaired_ms: repair,
            first_impact_ms: impaired.iter().map(|s| s.start_ms - at).reduce(f64::min),
            weights_off_ms: weights_off,
            time_to_shift_ms: by_caller.values().copied().fold(0.0, f64::max),
            time_to_shift_by_caller_ms: by_caller,
            failed: during.iter().filter(|s| s.error.is_some()).count() as u64,
            recovered_ms: recovered,
        });
    }
    let mut hosts = BTreeMap::new();
    for h in &scenario.load.hosts {
        hosts.insert(h.clone(), tally(samples.iter().filter(|s| &s.host == h)));
    }
    let names: std::collections::BTreeSet<&str> = samples.iter().map(|s| s.from.as_str()).collect();
    let callers = names
        .into_iter()
        .map(|c| (c.to_string(), tally(samples.iter().filter(|x| x.from == c))))
        .collect();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for e in samples.iter().filter_map(|s| s.error.as_ref()) {
        *errors.entry(e.clone()).or_default() += 1;
    }
    #[allow(clippy::cast_precision_loss)]
    let success_rate = if all.sent == 0 {
        0.0
    } else {
        (all.sent - all.failed) as f64 * 100.0 / all.sent as f64
    };
    let mut checks = Vec::new();
    let slo = &scenario.slo;
    if let Some(want) = slo.success_rate {
        checks.push(Check {
            slo: "success rate".into(),
            want: format!(">= {want}%"),
            got: format!("{success_rate:.2}%"),
            ok: all.sent > 0 && success_rate >= want,
        });
    }
    if let Some(want) = slo.max_failed {
        checks.push(Check {
            slo: "failed requests".into(),
            want: format!("<= {want}"),
            got: all.failed.to_string(),
            ok: all.sent > 0 && all.failed <= want,
        });
    }
    if let Some(want) = slo.time_to_shift {
        let got = faults
            .iter()
            .map(|f| f.time_to_shift_ms)
            .fold(0.0, f64::max);
        checks.push(Check {
            slo: "time to shift (slowest caller, every fault)".into(),
            want: format!("< {:.1} s", want.as_secs_f64()),
            got: format!("{:.2} s", got / 1000.0),
            ok: !faults.is_empty() && got < want.as_secs_f64() * 1000.0,
        });
    }
    if let Some(want) = slo.p99 {
        checks.push(Check {
            slo: "p99 latency".into(),
            want: format!("< {:.0} ms", want.as_secs_f64() * 1000.0),
            got: format!("{p99:.1} ms"),
            ok: all.sent > all.failed && p99 < want.as_secs_f64() * 1000.0,
        });
    }
    for h in &slo.untouched {
        let t = hosts.get(h).cloned().unwrap_or_default();
        checks.push(Check {
            slo: format!("{h} untouched"),
            want: "0 failed".into(),
            got: format!("{} of {} failed", t.failed, t.sent),
            ok: t.sent > 0 && t.failed == 0,
        });
    }
    let outcome = if aborted.is_some() {
        "aborted"
    } else if checks.iter().all(|c| c.ok) && cleanup_errors.is_empty() {
        "passed"
    } else {
        "failed"
    };
    Report {
        name: scenario.name.clone(),
        started_unix_ms,
        trace_id: None,
        outcome: outcome.into(),
        aborted,
        duration_ms: ended_ms,
        sent: all.sent,
        failed: all.failed,
        success_rate,
        p50_ms: p50,
        p99_ms: p99,
        impairment_threshold_ms: threshold,
        hosts,
        callers,
        faults,
        timeline,
        checks,
        cleanup_errors,
        errors,
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{:.2} s", v / 1000.0))
}

/// The report as text: a summary, the timeline, the faults, the SLOs.
pub fn text(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "drill {}: {}{}",
        r.name,
        r.outcome.to_uppercase(),
        r.aborted
            .as_ref()
            .map(|a| format!(" ({a})"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "{} requests in {:.1} s, {} failed ({:.2}% succeeded); p50 {:.1} ms, p99 {:.1} ms\n",
        r.sent,
        r.duration_ms / 1000.0,
        r.failed,
        r.success_rate,
        r.p50_ms,
        r.p99_ms
    );
    let rows: Vec<Vec<String>> = r
        .timeline
        .iter()
        .map(|t| {
            vec![
                format!("{:.2} s", t.at_ms / 1000.0),
                t.kind.clone(),
                t.what.clone(),
            ]
        })
        .collect();
    out.push_str(&crate::output::table(&["T", "EVENT", "WHAT"], &rows));
    if !r.faults.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = r
            .faults
            .iter()
            .map(|f| {
                vec![
                    f.step.clone(),
                    format!("{:.2} s", f.at_ms / 1000.0),
                    ms(f.first_impact_ms),
                    ms(f.weights_off_ms),
                    format!("{:.2} s", f.time_to_shift_ms / 1000.0),
                    f.failed.to_string(),
                    ms(f.recovered_ms),
                ]
            })
            .collect();
        out.push_str(&crate::output::table(
            &[
                "FAULT",
                "AT",
                "FIRST IMPACT",
                "WEIGHTS OFF",
                "SHIFTED",
                "FAILED",
                "RECOVERED",
            ],
            &rows,
        ));
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = r
        .hosts
        .iter()
        .map(|(h, t)| host_row(h, t))
        .chain(
            r.callers
                .iter()
                .map(|(c, t)| host_row(&format!("from {c}"), t)),
        )
        .collect();
    out.push_str(&crate::output::table(
        &["REQUESTS", "SENT", "FAILED", "P99", "SERVED BY"],
        &rows,
    ));
    if !r.checks.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = r
            .checks
            .iter()
            .map(|c| {
                vec![
                    c.slo.clone(),
                    c.want.clone(),
                    c.got.clone(),
                    if c.ok { "ok" } else { "MISSED" }.into(),
                ]
            })
            .collect();
        out.push_str(&crate::output::table(
            &["SLO", "WANT", "GOT", "RESULT"],
            &rows,
        ));
    }
    if !r.errors.is_empty() {
        out.push_str("\nfailures:\n");
        let mut errs: Vec<(&String, &u64)> = r.errors.iter().collect();
        errs.sort_by(|a, b| b.1.cmp(a.1));
        for (e, n) in errs.into_iter().take(5) {
            let _ = writeln!(out, "  {n} x {e}");
        }
    }
    for e in &r.cleanup_errors {
        let _ = writeln!(out, "cleanup failed: {e}");
    }
    out
}

fn host_row(name: &str, t: &Tally) -> Vec<String> {
    #[allow(clippy::cast_precision_loss)]
    let split = t
        .served_by
        .iter()
        .map(|(c, n)| {
            format!(
                "{c} {:.0}%",
                *n as f64 * 100.0 / (t.sent - t.failed).max(1) as f64
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    vec![
        name.to_string(),
        t.sent.to_string(),
        t.failed.to_string(),
        format!("{:.1} ms", t.p99_ms),
        split,
    ]
}
