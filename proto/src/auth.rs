//! The shared token: every RPC carries `authorization: Bearer <token>`; servers refuse
//! calls without it (UNAUTHENTICATED) before any handler runs. [`Credentials`] bundles
//! the token with the process's TLS material: what every server and client is built
//! from.

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Server side: refuses requests whose token is missing or different.
#[derive(Clone)]
pub struct RequireToken {
    expected: String,
}

impl RequireToken {
    pub fn new(token: &str) -> Self {
        RequireToken {
            expected: format!("Bearer {token}"),
        }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match req.metadata().get("authorization") {
            Some(v) if constant_time_eq(v.as_bytes(), self.expected.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong token")),
            None => Err(Status::unauthenticated(
                "missing `authorization: Bearer <token>` metadata",
            )),
        }
    }
}

/// Client side: adds the token to every request.
#[derive(Clone)]
pub struct WithToken {
    value: MetadataValue<tonic::metadata::Ascii>,
}

impl WithToken {
    /// Fails when the token is not printable ASCII (it travels in an HTTP header).
    pub fn new(token: &str) -> Result<Self, String> {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the token must be printable ASCII".to_string())?;
        Ok(WithToken { value })
    }
}

impl Interceptor for WithToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert("authorization", self.value.clone());
        Ok(req)
    }
}

/// What a process proves and checks: the run's token and its TLS material.
#[derive(Clone)]
pub struct Credentials {
    token: String,
    with_token: WithToken,
    tls: crate::tls::Tls,
}

impl Credentials {
    /// Fails when the token is empty or not printable ASCII.
    pub fn new(token: &str, tls: crate::tls::Tls) -> Result<Self, String> {
        if token.is_empty() {
            return Err("the token is empty".into());
        }
        Ok(Credentials {
            token: token.to_string(),
            with_token: WithToken::new(token)?,
            tls,
        })
    }

    /// The server-side token check.
    pub fn require_token(&self) -> RequireToken {
        RequireToken::new(&self.token)
    }

    /// The client-side token interceptor.
    pub fn with_token(&self) -> WithToken {
        self.with_token.clone()
    }

    pub fn tls(&self) -> &crate::tls::Tls {
        &self.tls
    }

    /// The run's shared secret (for channels other than gRPC: the weight broadcast).
    pub fn token(&self) -> &str {
        &self.token
    }
}

/// Equality that does not stop at the first differing byte (for secrets).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_checked() {
        let mut server = RequireToken::new("s3cret");
        let mut client = WithToken::new("s3cret").unwrap();
        let req = client.call(Request::new(())).unwrap();
        assert!(server.call(req).is_ok());
        let req = WithToken::new("nope")
            .unwrap()
            .call(Request::new(()))
            .unwrap();
        assert_eq!(
            server.call(req).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            server.call(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(WithToken::new("bad\ntoken").is_err());
    }
}
