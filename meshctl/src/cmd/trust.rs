//! `trust status` and `trust rotate`: the mesh's roots and their staged rotation.

use crate::cli::Format;
use crate::output::{emit, rfc3339, table};
use crate::Error;
use mesh_api::v1 as api;
use mesh_api::v1::admin_client::AdminClient;
use serde::Serialize;
use std::time::{Duration, Instant};

/// `meshctl trust ...`.
#[derive(Debug, clap::Subcommand)]
pub enum TrustCommand {
    /// The trusted roots, the signing one, and which workloads are caught up.
    Status,
    /// Rotate the mesh's root: add a new root, reissue every certificate
    /// under it, remove the old root. Each stage waits until every workload
    /// has caught up before the next one starts; a rotation that stopped
    /// half-way resumes where it stands.
    Rotate {
        /// Run one stage only.
        #[arg(long, value_enum)]
        stage: Option<Stage>,
        /// How long each stage may wait for the workloads (e.g. `10m`).
        #[arg(long, default_value = "10m")]
        timeout: String,
        /// Go on although the previous stage has not reached every workload
        /// (audited).
        #[arg(long)]
        force: bool,
    },
}

/// A rotation stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    /// Trust a new root beside the old one.
    Add,
    /// Sign under the new root; workloads renew at once.
    Reissue,
    /// Stop trusting the old root.
    Remove,
}

impl Stage {
    fn api(self) -> api::RotationStage {
        match self {
            Self::Add => api::RotationStage::Add,
            Self::Reissue => api::RotationStage::Reissue,
            Self::Remove => api::RotationStage::Remove,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Add => "add",
            Self::Reissue => "reissue",
            Self::Remove => "remove",
        }
    }

    /// What "done everywhere" means after this stage, for the progress line.
    fn waits_for(self) -> &'static str {
        match self {
            Self::Add => "workloads trusting the new root",
            Self::Reissue => "workloads with a certificate under the new root",
            Self::Remove => "workloads holding the final bundle",
        }
    }
}

/// The stages still to run from where a rotation stands.
fn remaining(stage: &str) -> &'static [Stage] {
    match stage {
        "added" => &[Stage::Reissue, Stage::Remove],
        "reissuing" => &[Stage::Remove],
        _ => &[Stage::Add, Stage::Reissue, Stage::Remove],
    }
}

/// How many of the subscribers are where `stage` needs them, of how many,
/// and the first few that are not.
fn caught_up(st: &api::TrustStatus, stage: Stage) -> (usize, usize, Vec<String>) {
    let mut late = Vec::new();
    for s in &st.subscribers {
        let ok = s.bundle_current
            && (stage != Stage::Reissue
                || s.certificate_root_sha256.is_empty()
                || s.certificate_root_sha256 == st.signing_root_sha256);
        if !ok {
            late.push(s.node_id.clone());
        }
    }
    let n = st.subscribers.len();
    (n - late.len(), n, late)
}

/// One root as meshctl prints it.
#[derive(Debug, Serialize)]
pub struct RootRow {
    /// SHA-256 of the certificate (hex).
    pub sha256: String,
    /// Subject.
    pub subject: String,
    /// Expiry (RFC 3339).
    pub not_after: String,
    /// New certificates chain to it.
    pub signing: bool,
}

/// One workload as meshctl prints it.
#[derive(Debug, Serialize)]
pub struct WorkloadRow {
    /// Node id.
    pub node: String,
    /// Agent or gateway.
    pub kind: String,
    /// Cluster.
    pub cluster: String,
    /// It acknowledged the current bundle.
    pub bundle_current: bool,
    /// The root of its own certificate (SHA-256 hex), if the CA issued it.
    pub certificate_root: String,
    /// The federation replica serving it.
    pub replica: String,
}

/// One cluster's intermediate CA as meshctl prints it.
#[derive(Debug, Serialize)]
pub struct IntermediateRow {
    /// Its cluster.
    pub cluster: String,
    /// The root it chains to (SHA-256 hex).
    pub root: String,
    /// Expiry (RFC 3339).
    pub not_after: String,
    /// When it is replaced by a new one (RFC 3339).
    pub renew_after: String,
}

/// `trust status` as JSON.
#[derive(Debug, Serialize)]
pub struct StatusView {
    /// steady, added or reissuing.
    pub stage: String,
    /// Where the root key lives.
    pub origin: String,
    /// Registry revision of the bundle.
    pub revision: i64,
    /// The roots.
    pub roots: Vec<RootRow>,
    /// The clusters' intermediates under them.
    pub intermediates: Vec<IntermediateRow>,
    /// Every replica's subscribers.
    pub workloads: Vec<WorkloadRow>,
}

fn kind_name(k: i32) -> &'static str {
    match api::NodeKind::try_from(k) {
        Ok(api::NodeKind::Agent) => "agent",
        Ok(api::NodeKind::Gateway) => "gateway",
        Ok(api::NodeKind::Cli) => "cli",
        _ => "unknown",
    }
}

fn short(sha: &str) -> String {
    sha.get(..16).unwrap_or(sha).to_string()
}

fn view(st: &api::TrustStatus) -> StatusView {
    StatusView {
        stage: st.stage.clone(),
        origin: st.origin.clone(),
        revision: st.revision,
        roots: st
            .roots
            .iter()
            .map(|r| RootRow {
                sha256: r.sha256.clone(),
                subject: r.subject.clone(),
                not_after: rfc3339(r.not_after_unix_ms),
                signing: r.signing,
            })
            .collect(),
        workloads: st
            .subscribers
            .iter()
            .map(|s| WorkloadRow {
                node: s.node_id.clone(),
                kind: kind_name(s.kind).to_string(),
                cluster: s.cluster.clone(),
                bundle_current: s.bundle_current,
                certificate_root: s.certificate_root_sha256.clone(),
                replica: s.replica.clone(),
            })
            .collect(),
        intermediates: st
            .intermediates
            .iter()
            .map(|i| IntermediateRow {
                cluster: i.cluster.clone(),
                root: i.root_sha256.clone(),
                not_after: rfc3339(i.not_after_unix_ms),
                renew_after: rfc3339(i.renew_after_unix_ms),
            })
            .collect(),
    }
}

fn print_status(v: &StatusView) {
    println!(
        "stage {} (root key: {}, bundle at revision {})",
        v.stage, v.origin, v.revision
    );
    let roots: Vec<Vec<String>> = v
        .roots
        .iter()
        .map(|r| {
            vec![
                short(&r.sha256),
                r.subject.clone(),
                r.not_after.clone(),
                if r.signing { "yes" } else { "" }.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["ROOT", "SUBJECT", "NOT AFTER", "SIGNING"], &roots)
    );
    if !v.intermediates.is_empty() {
        println!();
        let rows: Vec<Vec<String>> = v
            .intermediates
            .iter()
            .map(|i| {
                vec![
                    i.cluster.clone(),
                    short(&i.root),
                    i.not_after.clone(),
                    i.renew_after.clone(),
                ]
            })
            .collect();
        print!(
            "{}",
            table(
                &["INTERMEDIATE", "ROOT", "NOT AFTER", "RENEWED AFTER"],
                &rows
            )
        );
    }
    if v.workloads.is_empty() {
        println!("no workloads subscribed");
        return;
    }
    println!();
    let rows: Vec<Vec<String>> = v
        .workloads
        .iter()
        .map(|w| {
            vec![
                w.node.clone(),
                w.kind.clone(),
                w.cluster.clone(),
                if w.bundle_current {
                    "current"
                } else {
                    "behind"
                }
                .to_string(),
                if w.certificate_root.is_empty() {
                    "-".to_string()
                } else {
                    short(&w.certificate_root)
                },
                w.replica.clone(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["NODE", "KIND", "CLUSTER", "BUNDLE", "CERT ROOT", "REPLICA"],
            &rows
        )
    );
}

async fn status_of(
    client: &mut AdminClient<tonic::transport::Channel>,
) -> Result<api::TrustStatus, Error> {
    Ok(client
        .get_trust(api::GetTrustRequest {})
        .await?
        .into_inner())
}

/// `meshctl trust status`.
pub async fn status(url: &crate::client::Fed, fmt: Format) -> Result<(), Error> {
    let ch = crate::client::connect(url).await?;
    let st = status_of(&mut AdminClient::new(ch)).await?;
    let v = view(&st);
    match fmt {
        Format::Json => {
            let s = serde_json::to_string_pretty(&v).map_err(|e| Error::Other(e.into()))?;
            println!("{s}");
        }
        Format::Table => print_status(&v),
    }
    Ok(())
}

/// One stage of a rotation as meshctl reports it.
#[derive(Debug, Serialize)]
pub struct StageRow {
    /// Which.
    pub stage: Stage,
    /// Seconds from the request to every workload caught up.
    pub seconds: f64,
    /// Workloads caught up, of how many.
    pub workloads: String,
    /// The signing root after the stage (SHA-256 hex).
    pub signing_root: String,
    /// Roots trusted after the stage.
    pub roots: usize,
}

/// How often the stage's progress is read.
const POLL: Duration = Duration::from_millis(250);

/// `meshctl trust rotate ...`.
pub async fn rotate(
    url: &crate::client::Fed,
    stage: Option<Stage>,
    timeout: &str,
    force: bool,
    fmt: Format,
) -> Result<(), Error> {
    let timeout = mesh_core::duration::parse(timeout)
        .map_err(|e| Error::Usage(format!("invalid --timeout: {e}")))?;
    let mut fed = url.clone();
    let ch = crate::client::connect(&fed).await?;
    let mut client = AdminClient::new(ch);
    let start = status_of(&mut client).await?;
    let stages: Vec<Stage> = match stage {
        Some(s) => vec![s],
        None => remaining(&start.stage).to_vec(),
    };
    let mut done = Vec::new();
    for (i, s) in stages.iter().enumerate() {
        let began = Instant::now();
        eprintln!("[{}/{}] {}: requesting", i + 1, stages.len(), s.name());
        let after = client
            .rotate_trust(api::RotateTrustRequest {
                stage: s.api() as i32,
                force,
                actor: "meshctl trust rotate".into(),
            })
            .await?
            .into_inner();
        eprintln!(
            "[{}/{}] {}: stage {} now, signing root {}",
            i + 1,
            stages.len(),
            s.name(),
            after.stage,
            short(&after.signing_root_sha256)
        );
        let mut last = None;
        let (ok, n) = loop {
            let st = status_of(&mut client).await?;
            let (ok, n, late) = caught_up(&st, *s);
            if last != Some(ok) {
                eprintln!(
                    "[{}/{}] {}: {ok}/{n} {}",
                    i + 1,
                    stages.len(),
                    s.name(),
                    s.waits_for()
                );
                last = Some(ok);
            }
            if ok == n {
                break (ok, n);
            }
            if began.elapsed() > timeout {
                return Err(Error::Status(format!(
                    "stage {} did not reach every workload within {timeout:?}: {} of {n} behind ({}); the rotation stands at stage {}; run `meshctl trust rotate` again to resume",
                    s.name(),
                    n - ok,
                    late.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                    st.stage
                )));
            }
            tokio::time::sleep(POLL).await;
        };
        if matches!(s, Stage::Reissue | Stage::Remove) {
            // The operator's own certificate and CA bundle follow: under the
            // new root before the old one goes, the old one dropped after.
            fed = fed.renew().await?;
            client = AdminClient::new(crate::client::connect(&fed).await?);
            eprintln!(
                "[{}/{}] {}: this operator's certificate renewed under the signing root",
                i + 1,
                stages.len(),
                s.name()
            );
        }
        done.push(StageRow {
            stage: *s,
            seconds: (began.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            workloads: format!("{ok}/{n}"),
            signing_root: after.signing_root_sha256.clone(),
            roots: after.roots.len(),
        });
    }
    emit(
        fmt,
        &done,
        &["STAGE", "SECONDS", "WORKLOADS", "SIGNING ROOT", "ROOTS"],
        |r| {
            vec![
                r.stage.name().to_string(),
                format!("{:.1}", r.seconds),
                r.workloads.clone(),
                short(&r.signing_root),
                r.roots.to_string(),
            ]
        },
    )
}
