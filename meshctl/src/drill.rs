//! Failover drills: scenarios (`scenarios/*.yaml`) of load, faults and SLOs,
//! run against a running topology (`meshctl demo`'s, or `deploy/local`'s).

pub mod report;
pub mod run;
pub mod scenario;
pub mod topology;
pub mod trace;

/// Now, in Unix milliseconds.
pub fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
