//! The federation under a flood of large requests (issue 15, point 8).
//!
//! `cargo bench -p fedmesh-benches --bench flood`
//! Knobs: FEDMESH_BENCH_FLOOD_CALLS (64 requests in flight),
//! FEDMESH_BENCH_FLOOD_MIB (15 MiB each), FEDMESH_BENCH_ROUNDS (3).
//! `tests/smoke.rs` runs it small.
//!
//! Each round starts a fresh `fedmesh-federation` release binary (memory
//! registry, TLS, default limits, its first admin from `--bootstrap-admin`)
//! and samples its VmRSS every millisecond from `/proc/<pid>/status`
//! through three phases, each `calls` requests at once:
//!
//! * **baseline**: the admin's `Traffic/Drain` of an unknown cluster with a
//!   1 KiB reason: a small call the federation refuses after reading it;
//! * **anonymous flood**: one connection per request (TLS, no client
//!   certificate), `Traffic/Drain` with a reason of `mib` MiB, what the
//!   open API took to 808 MiB with 64 x 15 MiB;
//! * **admin flood**: the admin's `Admin/ApplyPolicies` (the service with
//!   the largest limit, 4 MiB) with one document of `mib` MiB.
//!
//! The figure is the peak resident memory of each phase beside the idle
//! process's, and how each request was answered.

// A benchmark: a failed setup step should stop it loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// The federation child process and its helpers live in the traffic bench.
#[allow(dead_code)]
#[path = "traffic.rs"]
pub(crate) mod traffic;

use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use mesh_api::v1::traffic_client::TrafficClient;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What to run.
pub(crate) struct Opts {
    pub(crate) calls: usize,
    pub(crate) mib: usize,
    pub(crate) rounds: usize,
}

/// One phase of one round.
#[derive(Clone, Debug, Default)]
pub(crate) struct Phase {
    /// Peak VmRSS during the phase, MB.
    pub(crate) peak: f64,
    /// Answers by gRPC code.
    pub(crate) codes: BTreeMap<String, usize>,
}

/// One round: a fresh federation.
#[derive(Clone, Debug, Default)]
pub(crate) struct Round {
    pub(crate) idle: f64,
    pub(crate) baseline: Phase,
    pub(crate) anonymous: Phase,
    pub(crate) admin: Phase,
    /// VmRSS after the floods, MB.
    pub(crate) after: f64,
}

/// The figures and the printed table.
#[allow(dead_code)] // the bench prints `text`; tests/smoke.rs reads the figures
pub(crate) struct Report {
    pub(crate) rounds: Vec<Round>,
    pub(crate) text: String,
}

/// Samples the VmRSS of `pid` every millisecond; the peak since the last
/// [`Sampler::take`].
struct Sampler {
    peak_kb: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let peak_kb = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak_kb, stop) = (peak_kb.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                    let kb = (traffic::rss(pid).0 * 1024.0) as u64;
                    peak_kb.fetch_max(kb, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        Self {
            peak_kb,
            stop,
            thread: Some(thread),
        }
    }

    /// The peak since the last call, MB; starts over.
    fn take(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let mb = self.peak_kb.swap(0, Ordering::Relaxed) as f64 / 1024.0;
        mb
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn code(r: Result<(), tonic::Status>) -> String {
    match r {
        Ok(()) => "Ok".into(),
        Err(s) => format!("{:?}", s.code()),
    }
}

async fn phase<F, Fut>(sampler: &Sampler, calls: usize, one: F) -> Phase
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send + 'static,
{
    sampler.take();
    let tasks: Vec<_> = (0..calls).map(|i| tokio::spawn(one(i))).collect();
    let mut codes = BTreeMap::new();
    for t in tasks {
        *codes.entry(code(t.await.unwrap())).or_insert(0) += 1;
    }
    // Whatever the answers left behind is freed by now or stays.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Phase {
        peak: sampler.take(),
        codes,
    }
}

async fn round(o: &Opts, child: &traffic::Child) -> anyhow::Result<Round> {
    let pid = child.child.id();
    let admin = mesh_node::fed::Target::from_context(&child.admin)?;
    let anonymous = mesh_node::fed::Target {
        url: admin.url.clone(),
        tls: Some(mesh_node::fed::FedTls::new(
            Some(&child.admin.certificate_authority_data),
            None,
        )?),
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (idle, _) = traffic::rss(pid);
    let sampler = Sampler::start(pid);
    let mut admins = Vec::new();
    for _ in 0..8 {
        admins.push(admin.channel().await?);
    }
    let admins = Arc::new(admins);
    let big: Arc<str> = "x".repeat(o.mib << 20).into();

    let baseline = {
        let admins = admins.clone();
        phase(&sampler, o.calls, move |i| {
            let ch = admins[i % admins.len()].clone();
            async move {
                TrafficClient::new(ch)
                    .drain(api::DrainRequest {
                        cluster: "no-such-cluster".into(),
                        actor: "x".repeat(1024),
                        ..Default::default()
                    })
                    .await
                    .map(drop)
            }
        })
        .await
    };
    let anon = {
        let (anonymous, big) = (anonymous.clone(), big.clone());
        phase(&sampler, o.calls, move |_| {
            let (anonymous, big) = (anonymous.clone(), big.clone());
            async move {
                let ch = anonymous
                    .channel()
                    .await
                    .map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
                TrafficClient::new(ch)
                    .drain(api::DrainRequest {
                        cluster: "us-west-1".into(),
                        force: true,
                        actor: big.to_string(),
                        ..Default::default()
                    })
                    .await
                    .map(drop)
            }
        })
        .await
    };
    let adm = {
        let (admins, big) = (admins.clone(), big.clone());
        phase(&sampler, o.calls, move |i| {
            let (ch, big) = (admins[i % admins.len()].clone(), big.clone());
            async move {
                AdminClient::new(ch)
                    .max_encoding_message_size(usize::MAX)
                    .apply_policies(api::ApplyPoliciesRequest {
                        source: "flood.yaml".into(),
                        documents: vec![api::PolicyDocument {
                            json: big.to_string(),
                            ..Default::default()
                        }],
                        dry_run: false,
                    })
                    .await
                    .map(drop)
            }
        })
        .await
    };
    drop(sampler);
    let (after, _) = traffic::rss(pid);
    Ok(Round {
        idle,
        baseline,
        anonymous: anon,
        admin: adm,
        after,
    })
}

fn codes(p: &Phase) -> String {
    p.codes
        .iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs every round; prints progress to stderr.
pub(crate) fn run(o: &Opts) -> anyhow::Result<Report> {
    let load_before = traffic::loadavg();
    let bin = traffic::workspace_binary("federation", "fedmesh-federation")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut rounds = Vec::new();
    for i in 1..=o.rounds.max(1) {
        // Default limits: nothing but the first admin's file on top.
        let child = traffic::start_child(&bin, &[])?;
        let r = rt.block_on(round(o, &child));
        drop(child);
        let r = r?;
        eprintln!(
            "round {i}: idle {:.1} MB; baseline peak {:.1} MB ({}); anonymous flood peak {:.1} MB ({}); admin flood peak {:.1} MB ({}); after {:.1} MB",
            r.idle,
            r.baseline.peak,
            codes(&r.baseline),
            r.anonymous.peak,
            codes(&r.anonymous),
            r.admin.peak,
            codes(&r.admin),
            r.after
        );
        rounds.push(r);
    }
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# flood bench: {} rounds, each a fresh fedmesh-federation (memory registry, TLS, default limits); {} requests at once per phase, {} MiB each in the floods",
        rounds.len(),
        o.calls,
        o.mib
    );
    let _ = writeln!(
        t,
        "# machine: load average before {load_before}, after {}",
        traffic::loadavg()
    );
    let _ = writeln!(
        t,
        "{:<8} {:>9} {:>15} {:>15} {:>15} {:>9}   answers (anonymous; admin)",
        "round", "idle MB", "baseline peak", "anon peak", "admin peak", "after"
    );
    for (i, r) in rounds.iter().enumerate() {
        let _ = writeln!(
            t,
            "{:<8} {:>9.1} {:>15.1} {:>15.1} {:>15.1} {:>9.1}   {}; {}",
            i + 1,
            r.idle,
            r.baseline.peak,
            r.anonymous.peak,
            r.admin.peak,
            r.after,
            codes(&r.anonymous),
            codes(&r.admin)
        );
    }
    let col = |f: &dyn Fn(&Round) -> f64| {
        fedmesh_benches::median(&rounds.iter().map(f).collect::<Vec<_>>())
    };
    let _ = writeln!(
        t,
        "{:<8} {:>9.1} {:>15.1} {:>15.1} {:>15.1} {:>9.1}",
        "median",
        col(&|r| r.idle),
        col(&|r| r.baseline.peak),
        col(&|r| r.anonymous.peak),
        col(&|r| r.admin.peak),
        col(&|r| r.after)
    );
    let _ = writeln!(
        t,
        "ratios to the baseline phase's peak (medians of per-round ratios): anonymous flood {:.2}, admin flood {:.2}",
        col(&|r| r.anonymous.peak / r.baseline.peak),
        col(&|r| r.admin.peak / r.baseline.peak)
    );
    let spread = |f: &dyn Fn(&Round) -> f64| {
        let v: Vec<f64> = rounds.iter().map(f).collect();
        v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
            - v.iter().copied().fold(f64::INFINITY, f64::min)
    };
    let _ = writeln!(
        t,
        "spread (max - min) of the peaks, MB: baseline {:.1}, anonymous {:.1}, admin {:.1}",
        spread(&|r| r.baseline.peak),
        spread(&|r| r.anonymous.peak),
        spread(&|r| r.admin.peak)
    );
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(Report { rounds, text: t })
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing and
    // must not run the measurement.
    if !std::env::args().any(|a| a == "--bench") {
        println!("flood bench: run with `cargo bench -p fedmesh-benches --bench flood`");
        return Ok(());
    }
    let knob = traffic::knob;
    let o = Opts {
        calls: knob("FEDMESH_BENCH_FLOOD_CALLS", 64).max(1),
        mib: knob("FEDMESH_BENCH_FLOOD_MIB", 15).max(1),
        rounds: knob("FEDMESH_BENCH_ROUNDS", 3).max(1),
    };
    let r = run(&o)?;
    println!();
    print!("{}", r.text);
    fedmesh_benches::write_report("flood", &r.text)?;
    Ok(())
}
