//! `meshctl drill run FILE`: a failover drill against the running topology.

use crate::cli::Format;
use crate::drill::scenario::Scenario;
use crate::drill::topology::Topology;
use crate::drill::{report, run};
use crate::Error;
use std::path::PathBuf;

/// `meshctl drill ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DrillCommand {
    /// Run a scenario (`scenarios/*.yaml`) and report: the timeline, the
    /// requests sent and failed, p99, and its SLOs (exit 3 if one is
    /// missed, 4 if the drill aborted).
    Run {
        /// The scenario file.
        file: PathBuf,
        /// The topology file `meshctl demo` (or `deploy/local`) wrote.
        #[arg(long)]
        topology: Option<PathBuf>,
        /// Export the drill's timeline as a trace to this OTLP/gRPC
        /// collector (e.g. `http://127.0.0.1:4317`).
        #[arg(long)]
        otlp_endpoint: Option<String>,
    },
    /// Check scenario files without running them.
    Validate {
        /// Scenario files.
        files: Vec<PathBuf>,
    },
}

fn read(file: &PathBuf) -> Result<Scenario, Error> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::Usage(format!("cannot read {}: {e}", file.display())))?;
    Scenario::parse(&text).map_err(|e| Error::Invalid(vec![format!("{}: {e}", file.display())]))
}

/// Runs `meshctl drill ...`.
pub async fn drill(cmd: &DrillCommand, fed: &crate::client::Fed, fmt: Format) -> Result<(), Error> {
    match cmd {
        DrillCommand::Validate { files } => {
            let mut errors = Vec::new();
            for f in files {
                match read(f) {
                    Ok(s) => println!("{}: ok ({}, {} steps)", f.display(), s.name, s.steps.len()),
                    Err(Error::Invalid(e)) => errors.extend(e),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            if errors.is_empty() {
                Ok(())
            } else {
                Err(Error::Invalid(errors))
            }
        }
        DrillCommand::Run {
            file,
            topology,
            otlp_endpoint,
        } => {
            let scenario = read(file)?;
            let path = topology.clone().unwrap_or_else(Topology::default_path);
            let topo = Topology::read(&path).map_err(Error::Usage)?;
            let opts = run::Options {
                progress: true,
                fed: Some(fed.clone()),
            };
            let mut r = run::run(&topo, &scenario, &opts).await?;
            if let Some(url) = otlp_endpoint {
                match crate::drill::trace::export(&r, url).await {
                    Ok(id) => {
                        eprintln!("timeline exported to {url} as trace {id}");
                        r.trace_id = Some(id);
                    }
                    Err(e) => eprintln!("warning: the timeline was not exported: {e}"),
                }
            }
            match fmt {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&r).map_err(|e| Error::Other(e.into()))?
                ),
                Format::Table => print!("{}", report::text(&r)),
            }
            if r.passed() {
                Ok(())
            } else if let Some(why) = &r.aborted {
                Err(Error::DrillAborted(format!(
                    "drill {} ABORTED: {why}",
                    r.name
                )))
            } else {
                let missed: Vec<String> = r
                    .checks
                    .iter()
                    .filter(|c| !c.ok)
                    .map(|c| format!("{} {} (got {})", c.slo, c.want, c.got))
                    .chain(r.cleanup_errors.iter().cloned())
                    .collect();
                Err(Error::DrillFailed(format!(
                    "drill {}: missed: {}",
                    r.name,
                    missed.join("; ")
                )))
            }
        }
    }
}
