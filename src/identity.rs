//! Workload identities.

mod spiffe_id;

pub use spiffe_id::{SpiffeId, SpiffeIdError};
