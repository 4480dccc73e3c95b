//! The Health service every Tandem process serves.

use crate::v1::health_server::Health;
use crate::v1::{HealthRequest, HealthResponse};

/// Answers `Check` with the service's role and the tandem version.
#[derive(Clone)]
pub struct HealthService {
    pub service: &'static str,
}

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        _req: tonic::Request<HealthRequest>,
    ) -> Result<tonic::Response<HealthResponse>, tonic::Status> {
        Ok(tonic::Response::new(HealthResponse {
            service: self.service.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }
}
