//! The shared token: every RPC carries `authorization: Bearer <token>`; servers refuse
//! calls without it (UNAUTHENTICATED) before any handler runs.

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

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
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
