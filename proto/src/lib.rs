//! `tandem-proto`: the only wire contract between Tandem's services. The `.proto`
//! files under `proto/` are the source of truth; this crate is their generated code.

/// Messages and services of package `tandem.v1`.
pub mod v1 {
    tonic::include_proto!("tandem.v1");
}
