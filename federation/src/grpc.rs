//! The federation's tonic services. Handlers are thin: convert the request
//! into core types (refusing bad input with INVALID_ARGUMENT naming the
//! field), call the registry or read the state, map errors to a status once.

pub mod admin;
pub mod discovery;
pub mod identity;
pub mod registration;
pub mod traffic;

use crate::store;
use mesh_core::convert::FieldError;
use tonic::Status;

/// INVALID_ARGUMENT naming the field.
pub(crate) fn invalid(e: &FieldError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// Parses a cluster name field, naming it on refusal.
pub(crate) fn cluster_field(v: &str, field: &str) -> Result<mesh_core::name::ClusterName, Status> {
    mesh_core::name::ClusterName::new(v)
        .map_err(|e| invalid(&FieldError::new(field, e.to_string())))
}

/// Maps a store error to a status.
pub(crate) fn store_status(e: &store::Error) -> Status {
    match e {
        store::Error::Unavailable(_) => Status::unavailable(format!(
            "{e}; the federation serves its last known state and refuses writes until the registry is back"
        )),
        _ => Status::internal(e.to_string()),
    }
}
