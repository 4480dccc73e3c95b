//! The health of every Tandem process: the gRPC Health service, and the phase a
//! worker reports at `/readyz` (served over HTTP by the binary).

use std::sync::{Arc, Mutex};

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

/// The phase a worker reports at `/readyz`.
#[derive(Clone, Default)]
pub struct Readiness(Arc<Mutex<Phase>>);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    /// Registering with the coordinator, loading the model.
    #[default]
    Starting,
    Ready,
    /// The run is over; the process is draining.
    Stopping,
}

impl Readiness {
    pub fn set(&self, phase: Phase) {
        if let Ok(mut p) = self.0.lock() {
            *p = phase;
        }
    }

    pub fn get(&self) -> Phase {
        self.0.lock().map(|p| *p).unwrap_or(Phase::Stopping)
    }
}
