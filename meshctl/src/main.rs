//! `meshctl`: parse the command line, run one command, map the outcome to an exit code.

use clap::Parser;
use meshctl::cli::{Cli, Command};
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = Cli::parse();
    mesh_core::log::init("warn", false);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn run(cli: Cli) -> Result<(), meshctl::Error> {
    use meshctl::client::connect;
    use meshctl::cmd::trust::{self, TrustCommand};
    use meshctl::cmd::{demo, identity, list, policy};
    let fmt = cli.output;
    let fed = meshctl::client::Fed::resolve(cli.context.as_deref(), cli.federation.as_deref());
    let url = &match (&cli.command, fed) {
        // These make or need no credential of their own.
        (Command::Login(args), _) => {
            return meshctl::cmd::auth::login(args, cli.federation.as_deref(), fmt).await
        }
        (Command::Validate(files), _) => return policy::validate(files, fmt),
        (Command::Demo(args), _) => return demo::run(args, fmt).await,
        (_, fed) => {
            let fed = fed?;
            if fed.needs_renewal() {
                // Past half its life: renewed and saved, as agents do theirs.
                match fed.renew().await {
                    Ok(renewed) => renewed,
                    Err(e) => {
                        eprintln!("meshctl: the credential is past half its life and could not be renewed: {e}");
                        fed
                    }
                }
            } else {
                fed
            }
        }
    };
    match &cli.command {
        Command::Login(_) | Command::Validate(_) | Command::Demo(_) => Ok(()),
        Command::Operator { command } => meshctl::cmd::auth::operator(url, command, fmt).await,
        Command::Whoami => meshctl::cmd::auth::whoami(url, fmt).await,
        Command::Cluster { command } => meshctl::cmd::auth::cluster(url, command, fmt).await,
        Command::Clusters => list::clusters(connect(url).await?, fmt).await,
        Command::Services => list::services(connect(url).await?, fmt).await,
        Command::Endpoints { service } => list::endpoints(connect(url).await?, fmt, service).await,
        Command::Status => list::status(connect(url).await?, fmt).await,
        Command::Apply { files, dry_run } => policy::apply(url, files, *dry_run, fmt).await,
        Command::Get {
            kind,
            name,
            namespace,
        } => {
            policy::get(
                url,
                fmt,
                kind.as_deref(),
                name.as_deref(),
                namespace.as_deref(),
            )
            .await
        }
        Command::Delete(files) => policy::delete(url, files, fmt).await,
        Command::Token { command } => identity::token(url, command, fmt).await,
        Command::Audit {
            since,
            limit,
            page_token,
        } => identity::audit(url, since.as_deref(), *limit, page_token.as_deref(), fmt).await,
        Command::Trust { command } => match command {
            TrustCommand::Status => trust::status(url, fmt).await,
            TrustCommand::Rotate {
                stage,
                timeout,
                force,
            } => trust::rotate(url, *stage, timeout, *force, fmt).await,
        },
        Command::Weights { command } => meshctl::cmd::weights::run(url, command, fmt).await,
        Command::Drain {
            cluster,
            force,
            wait,
        } => meshctl::cmd::weights::drain(url, cluster, false, *force, wait, fmt).await,
        Command::Undrain { cluster, wait } => {
            meshctl::cmd::weights::drain(url, cluster, true, false, wait, fmt).await
        }
        Command::Drill { command } => meshctl::cmd::drill::drill(command, url, fmt).await,
    }
}
