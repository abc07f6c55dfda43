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
    /// requests sent and failed, p99, and its SLOs (exit 1 if one is
    /// missed or the drill aborted).
    Run {
        /// The scenario file.
        file: PathBuf,
        /// The topology file `meshctl demo` (or `deploy/local`) wrote.
        #[arg(long)]
        topology: Option<PathBuf>,
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
pub async fn drill(cmd: &DrillCommand, fmt: Format) -> Result<(), Error> {
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
        DrillCommand::Run { file, topology } => {
            let scenario = read(file)?;
            let path = topology.clone().unwrap_or_else(Topology::default_path);
            let topo = Topology::read(&path).map_err(Error::Usage)?;
            let r = run::run(&topo, &scenario, &run::Options { progress: true }).await?;
            match fmt {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&r).map_err(|e| Error::Other(e.into()))?
                ),
                Format::Table => print!("{}", report::text(&r)),
            }
            if r.passed() {
                Ok(())
            } else {
                Err(Error::Status(format!(
                    "drill {}: {}",
                    r.name,
                    r.aborted.clone().unwrap_or_else(|| {
                        let missed: Vec<String> = r
                            .checks
                            .iter()
                            .filter(|c| !c.ok)
                            .map(|c| format!("{} {} (got {})", c.slo, c.want, c.got))
                            .chain(r.cleanup_errors.iter().cloned())
                            .collect();
                        format!("missed: {}", missed.join("; "))
                    })
                )))
            }
        }
    }
}
