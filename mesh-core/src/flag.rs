//! Helpers for validating command-line flags, shared by the binaries so that
//! every one names the flag, the value and the reason the same way.

use std::net::SocketAddr;

/// Parses `IP:PORT`, recording an error naming `flag`.
pub fn parse_addr(flag: &str, s: &str, errs: &mut Vec<String>) -> Option<SocketAddr> {
    s.parse()
        .map_err(|e| errs.push(format!("invalid {flag} {s:?}: {e} (expected IP:PORT)")))
        .ok()
}

/// Parses a duration that must be more than zero (`"500ms"`, `"10s"`),
/// recording an error naming `flag`.
pub fn parse_positive_duration(
    flag: &str,
    s: &str,
    errs: &mut Vec<String>,
) -> Option<std::time::Duration> {
    match crate::duration::parse(s) {
        Ok(d) if d.is_zero() => {
            errs.push(format!("invalid {flag} {s:?}: must be more than 0"));
            None
        }
        Ok(d) => Some(d),
        Err(e) => {
            errs.push(format!("invalid {flag}: {e}"));
            None
        }
    }
}

/// Checks a federation URL given as `--federation`: `http(s)://HOST:PORT`.
pub fn check_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| {
            format!("invalid --federation {s:?}: expected http://HOST:PORT or https://HOST:PORT")
        })?;
    let ok = rest
        .trim_end_matches('/')
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid --federation {s:?}: expected http://HOST:PORT or https://HOST:PORT"
        ))
    }
}

/// `--threads`: the value given, else the cores this process may run on
/// (its CPU affinity and cgroup quota); 1 to 1024, recording an error.
pub fn parse_threads(given: Option<usize>, errs: &mut Vec<String>) -> usize {
    let threads =
        given.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 || threads > 1024 {
        errs.push(format!("invalid --threads {threads}: must be 1 to 1024"));
    }
    threads
}

/// Parses `text`/`json`, recording an error.
pub fn parse_log_format(s: &str, errs: &mut Vec<String>) -> bool {
    match s {
        "text" => false,
        "json" => true,
        other => {
            errs.push(format!(
                "invalid --log-format {other:?}: expected text or json"
            ));
            false
        }
    }
}

/// Prints every configuration error as `BINARY: error` on stderr and returns
/// exit code 64 (EX_USAGE), before anything is bound.
pub fn usage_exit(binary: &str, errs: &[String]) -> std::process::ExitCode {
    for e in errs {
        eprintln!("{binary}: {e}");
    }
    std::process::ExitCode::from(64)
}
