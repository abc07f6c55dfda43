//! One module per subcommand family.

pub mod auth;
pub mod demo;
pub mod drill;
pub mod identity;
pub mod list;
pub mod policy;
pub mod rollout;
pub mod trust;
pub mod weights;
