//! Tokens: every RPC carries `authorization: Bearer <token>`; servers refuse calls
//! without a known one (UNAUTHENTICATED) before any handler runs. A run may have two:
//! the trainer's (admin) token and a generator token; the check tags each call with its
//! [`Caller`], and handlers that only the trainer may call refuse a generator with
//! PERMISSION_DENIED ([`require_admin`]). [`Credentials`] bundles the tokens with the
//! process's TLS material: what every server and client is built from.

use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Who a call's token says the caller is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The run's (trainer's) token: every call.
    Admin,
    /// The generator token: a generator's calls only.
    Generator,
}

/// Server side: refuses requests whose token is missing or unknown, and tags the rest
/// with their [`Caller`].
#[derive(Clone)]
pub struct RequireToken {
    expected: String,
    generator: Option<String>,
}

impl RequireToken {
    pub fn new(token: &str) -> Self {
        RequireToken {
            expected: format!("Bearer {token}"),
            generator: None,
        }
    }

    /// Also accepts `generator` as the generator token.
    pub fn with_generator(mut self, generator: Option<&str>) -> Self {
        self.generator = generator.map(|g| format!("Bearer {g}"));
        self
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let caller = match req.metadata().get("authorization") {
            Some(v) if constant_time_eq(v.as_bytes(), self.expected.as_bytes()) => Caller::Admin,
            Some(v)
                if self
                    .generator
                    .as_ref()
                    .is_some_and(|g| constant_time_eq(v.as_bytes(), g.as_bytes())) =>
            {
                Caller::Generator
            }
            Some(_) => return Err(Status::unauthenticated("wrong token")),
            None => {
                return Err(Status::unauthenticated(
                    "missing `authorization: Bearer <token>` metadata",
                ))
            }
        };
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// Refuses (PERMISSION_DENIED) a call made with the generator token: `what` is for the
/// trainer only. A call that passed no token check (a server built without one) is
/// let through.
pub fn require_admin<T>(req: &Request<T>, what: &str) -> Result<(), Status> {
    match req.extensions().get::<Caller>() {
        Some(Caller::Generator) => Err(Status::permission_denied(format!(
            "{what} needs the trainer's token; a generator's token cannot"
        ))),
        _ => Ok(()),
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
    /// Servers: the generator token they also accept (a run with split roles).
    generator_token: Option<String>,
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
            generator_token: None,
            with_token: WithToken::new(token)?,
            tls,
        })
    }

    /// A server that also accepts `generator` as the generator token.
    pub fn with_generator_token(mut self, generator: &str) -> Result<Self, String> {
        if generator.is_empty() || generator == self.token {
            return Err("the generator token must be non-empty and differ from the run's".into());
        }
        WithToken::new(generator)?;
        self.generator_token = Some(generator.to_string());
        Ok(self)
    }

    /// The generator token this server accepts, if the run splits roles.
    pub fn generator_token(&self) -> Option<&str> {
        self.generator_token.as_deref()
    }

    /// The server-side token check.
    pub fn require_token(&self) -> RequireToken {
        RequireToken::new(&self.token).with_generator(self.generator_token.as_deref())
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
