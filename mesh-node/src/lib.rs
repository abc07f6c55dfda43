//! What every fedmesh data-plane node, agent or gateway, runs besides its
//! proxy: the [`discovery`] subscription to the federation and the [`admin`]
//! listener.

pub mod admin;
pub mod discovery;
pub mod dns;
pub mod enroll;
pub mod fed;
pub mod runtime;
