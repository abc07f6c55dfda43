//! Failover drills: scenarios (`scenarios/*.yaml`) of load, faults and SLOs,
//! run against a running topology (`meshctl demo`'s, or `deploy/local`'s).

pub mod report;
pub mod run;
pub mod scenario;
pub mod topology;
