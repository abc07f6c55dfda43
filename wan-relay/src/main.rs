//! `fedmesh-wan-relay`: relay TCP links between regions with an impairment,
//! changed at runtime through the control API.
//!
//! Prints one line per bound address on stdout, for scripts and tests:
//! `link NAME listening on ADDR -> TARGET` and `control listening on ADDR`.
//! Exits 0 on SIGTERM or SIGINT, 64 on invalid flags, 1 when an address
//! cannot be bound.

use clap::Parser;
use mesh_core::flag::{parse_addr, parse_log_format, usage_exit};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;
use wan_relay::{Change, LinkOptions, LinkSpec, Mode, Relay, RelayConfig};

const BIN: &str = "fedmesh-wan-relay";

/// Command-line flags as given, before validation.
#[derive(Debug, Parser)]
#[command(
    name = "fedmesh-wan-relay",
    version,
    about = "fedmesh WAN relay: TCP links between regions with delay, jitter, loss, rate limit, cut and blackhole"
)]
struct Args {
    /// A link `NAME=LISTEN->TARGET[,from=IP][,proxy-v2]`, e.g. `eu-to-us=198.18.1.1:15443->198.18.2.10:15443`
    /// (repeatable; LISTEN port 0: any free port). Options: `from=IP` connects to the target from
    /// this local address (same family as TARGET); `proxy-v2` starts each connection to the target
    /// with a PROXY protocol v2 header naming the client.
    #[arg(
        long = "link",
        value_name = "NAME=LISTEN->TARGET[,from=IP][,proxy-v2]",
        required = true
    )]
    links: Vec<String>,
    /// Address of the HTTP control API (`GET /links`, `PUT /links/NAME`); none if not given.
    #[arg(long, value_name = "IP:PORT")]
    control: Option<String>,
    /// Initial one-way delay of every link, applied in each direction (`30ms`, `1s`).
    #[arg(long, default_value = "0", allow_hyphen_values = true)]
    delay: String,
    /// Initial jitter: each chunk's delay is uniform in delay ± jitter.
    #[arg(long, default_value = "0", allow_hyphen_values = true)]
    jitter: String,
    /// Initial loss probability in [0, 1]: a lost chunk is delivered one --rto late.
    #[arg(long, default_value = "0", allow_hyphen_values = true)]
    loss: String,
    /// Retransmission timeout a lost chunk costs.
    #[arg(long, default_value = "200ms", allow_hyphen_values = true)]
    rto: String,
    /// Initial bandwidth limit per connection and direction, in Mbit/s (0: none).
    #[arg(long, default_value = "0", allow_hyphen_values = true)]
    rate_mbps: String,
    /// Initial mode: pass, cut or blackhole.
    #[arg(long, default_value = "pass")]
    mode: String,
    /// Most bytes queued per connection and direction before the relay stops reading.
    #[arg(long, default_value_t = LinkOptions::default().max_in_flight)]
    max_in_flight: usize,
    /// Largest single read (chunk size), in bytes.
    #[arg(long, default_value_t = LinkOptions::default().read_buffer)]
    read_buffer: usize,
    /// Time to connect to a target before the client is reset.
    #[arg(long, default_value = "10s")]
    connect_timeout: String,
    /// Log format: `text` or `json` (logs go to stderr).
    #[arg(long, default_value = "text")]
    log_format: String,
}

/// The validated configuration, or every problem at once.
fn config(args: &Args) -> Result<(RelayConfig, bool), Vec<String>> {
    let mut errs = Vec::new();
    let mut links = Vec::new();
    for l in &args.links {
        match l.parse::<LinkSpec>() {
            Ok(s) => {
                if links.iter().any(|o: &LinkSpec| o.name() == s.name()) {
                    errs.push(format!(
                        "invalid --link {l:?}: a link named {:?} is given twice",
                        s.name()
                    ));
                }
                links.push(s);
            }
            Err(e) => errs.push(format!("invalid --link {l:?}: {}", e.reason)),
        }
    }
    let control: Option<SocketAddr> = args
        .control
        .as_deref()
        .and_then(|c| parse_addr("--control", c, &mut errs));
    let mut duration = |flag: &str, s: &str| match mesh_core::duration::parse(s) {
        Ok(d) => Some(d),
        Err(e) => {
            errs.push(format!("invalid {flag}: {e}"));
            None
        }
    };
    let delay = duration("--delay", &args.delay);
    let jitter = duration("--jitter", &args.jitter);
    let rto = duration("--rto", &args.rto);
    let connect_timeout = duration("--connect-timeout", &args.connect_timeout);
    let mut number = |flag: &str, s: &str| match s.parse::<f64>() {
        Ok(f) if f.is_finite() => Some(f),
        _ => {
            errs.push(format!("invalid {flag} {s:?}: expected a number"));
            None
        }
    };
    let loss = number("--loss", &args.loss);
    let rate = number("--rate-mbps", &args.rate_mbps);
    let mode = args
        .mode
        .parse::<Mode>()
        .map_err(|e| errs.push(format!("invalid --mode: {}", e.reason)))
        .ok();
    let log_json = parse_log_format(&args.log_format, &mut errs);
    let mut impairment = wan_relay::Impairment::default();
    for (flag, change) in [
        ("--delay", delay.map(|d| Change::new().delay(d))),
        ("--jitter", jitter.map(|d| Change::new().jitter(d))),
        ("--rto", rto.map(|d| Change::new().rto(d))),
        ("--loss", loss.map(|l| Change::new().loss(l))),
        ("--rate-mbps", rate.map(|r| Change::new().rate_mbps(r))),
        ("--mode", mode.map(|m| Change::new().mode(m))),
    ] {
        if let Some(c) = change {
            match impairment.with(&c) {
                Ok(i) => impairment = i,
                Err(e) => errs.push(format!("invalid {flag}: {}", e.reason)),
            }
        }
    }
    let options = LinkOptions {
        max_in_flight: args.max_in_flight,
        read_buffer: args.read_buffer,
        connect_timeout: connect_timeout.unwrap_or(Duration::from_secs(10)),
    };
    if let Err(e) = options.validate() {
        errs.push(format!("invalid options: {e}"));
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok((
        RelayConfig {
            links,
            control,
            options,
            impairment,
        },
        log_json,
    ))
}

fn main() -> ExitCode {
    let (cfg, log_json) = match config(&Args::parse()) {
        Ok(c) => c,
        Err(errs) => return usage_exit(BIN, &errs),
    };
    mesh_core::log::init("info", log_json);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{BIN}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: RelayConfig) -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed before the addresses are printed, so that a signal sent as
    // soon as they are read is handled (mesh_core::signal::shutdown installs
    // its handlers only when first polled).
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| format!("cannot install the SIGTERM handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| format!("cannot install the SIGINT handler: {e}"))?;
    let relay = Relay::start_with(cfg).await.map_err(|e| e.to_string())?;
    for link in relay.links().values() {
        println!(
            "link {} listening on {} -> {}",
            link.name(),
            link.addr(),
            link.target()
        );
    }
    if let Some(addr) = relay.control_addr() {
        println!("control listening on {addr}");
    }
    let sig = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = sig, "stopping");
    relay.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
