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
    /// This worker's session token once it registered (shared by every clone).
    session: std::sync::Arc<std::sync::RwLock<Option<MetadataValue<tonic::metadata::Ascii>>>>,
}

impl WithToken {
    /// Fails when the token is not printable ASCII (it travels in an HTTP header).
    pub fn new(token: &str) -> Result<Self, String> {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| "the token must be printable ASCII".to_string())?;
        Ok(WithToken {
            value,
            session: Default::default(),
        })
    }
}

impl Interceptor for WithToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut()
            .insert("authorization", self.value.clone());
        if let Some(s) = self.session.read().ok().and_then(|s| s.clone()) {
            req.metadata_mut().insert(SESSION_HEADER, s);
        }
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

    /// Sends `session` (a [`RegisterReply`](crate::v1::RegisterReply)'s) with every
    /// later call of every client made from these credentials.
    pub fn set_session(&self, session: &str) {
        if let (Ok(v), Ok(mut slot)) = (session.parse(), self.with_token.session.write()) {
            *slot = Some(v);
        }
    }

    /// The session token of the last [`Credentials::set_session`] (empty before).
    pub fn session(&self) -> String {
        self.with_token
            .session
            .read()
            .ok()
            .and_then(|s| s.as_ref().and_then(|v| v.to_str().ok().map(String::from)))
            .unwrap_or_default()
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
/// The metadata key of a worker's session token.
pub const SESSION_HEADER: &str = "x-tandem-session";

/// The session token of worker `worker_id` in `role` ("generator", "trainer"):
///
///   session = hex(HMAC-SHA256(key = the run's token, "tandem-session/v1/{role}/{worker_id}"))
///
/// Only the holders of the run's token (the coordinator, the trainer) can make or check
/// one; it needs no table, so it survives a coordinator restart.
pub fn session_token(run_token: &str, worker_id: u64, role: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(run_token.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(format!("tandem-session/v1/{role}/{worker_id}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Refuses a caller holding the generator token whose `session` is not the one of
/// generator `worker_id` (a leaked generator token cannot act for another worker).
/// The run's token may act for anyone.
pub fn check_session(
    caller: Option<Caller>,
    session: &[u8],
    run_token: &str,
    worker_id: u64,
    what: &str,
) -> Result<(), Status> {
    if caller != Some(Caller::Generator) {
        return Ok(());
    }
    let want = session_token(run_token, worker_id, "generator");
    if constant_time_eq(session, want.as_bytes()) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "{what}: the session token is not worker {worker_id}'s (send the `session_token` its Register returned)"
        )))
    }
}

/// [`check_session`] of a unary request: its caller and `x-tandem-session` metadata.
pub fn check_request_session<T>(
    req: &Request<T>,
    run_token: &str,
    worker_id: u64,
    what: &str,
) -> Result<(), Status> {
    let session = req
        .metadata()
        .get(SESSION_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    check_session(
        req.extensions().get::<Caller>().copied(),
        session,
        run_token,
        worker_id,
        what,
    )
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The shortest token a process accepts.
pub const MIN_TOKEN_LEN: usize = 16;

/// Tokens the project ships as placeholders (deploy/k8s/secret.yaml): refused as is.
pub const PLACEHOLDER_TOKENS: &[&str] = &[
    "change-me-to-a-random-secret",
    "change-me-to-another-random-secret",
];

/// Refuses a token shorter than [`MIN_TOKEN_LEN`] or a shipped placeholder; `from`
/// names where it came from (`TANDEM_TOKEN`, `[run] token`), and the error says how to
/// make a good one.
pub fn check_strength(token: &str, from: &str) -> Result<(), String> {
    if PLACEHOLDER_TOKENS.contains(&token) {
        return Err(format!(
            "{from} is the placeholder shipped in deploy/k8s/secret.yaml: replace it with a random secret (openssl rand -hex 32)"
        ));
    }
    let n = token.chars().count();
    if n < MIN_TOKEN_LEN {
        return Err(format!(
            "{from} has {n} characters: a token needs at least {MIN_TOKEN_LEN} (openssl rand -hex 32 makes one)"
        ));
    }
    Ok(())
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

    /// A generator's session is bound to its id: valid for it, refused for another id,
    /// and only the run's token can make one.
    #[test]
    fn sessions_are_bound_to_a_worker() {
        let run = "run-token-0123456789";
        let mut server = RequireToken::new(run).with_generator(Some("gen-token-0123456789"));
        let creds = Credentials::new("gen-token-0123456789", Default::default()).unwrap();
        let s7 = session_token(run, 7, "generator");
        assert_eq!(s7.len(), 64);
        assert_ne!(s7, session_token(run, 8, "generator"));
        assert_ne!(s7, session_token(run, 7, "trainer"));
        assert_ne!(s7, session_token("another-run-token-0000", 7, "generator"));
        let call = |server: &mut RequireToken| {
            server
                .call(creds.with_token().call(Request::new(())).unwrap())
                .unwrap()
        };
        // Before registering: no session, refused.
        let req = call(&mut server);
        assert!(check_request_session(&req, run, 7, "Lease").is_err());
        creds.set_session(&s7);
        assert_eq!(creds.session(), s7);
        let req = call(&mut server);
        assert!(check_request_session(&req, run, 7, "Lease").is_ok());
        let e = check_request_session(&req, run, 8, "Lease").unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("worker 8"), "{e}");
        // The run's token acts for anyone.
        let admin = server
            .call(WithToken::new(run).unwrap().call(Request::new(())).unwrap())
            .unwrap();
        assert!(check_request_session(&admin, run, 8, "Lease").is_ok());
    }

    #[test]
    fn weak_tokens_are_refused_naming_where_they_came_from() {
        let e = check_strength("short", "TANDEM_TOKEN").unwrap_err();
        assert!(
            e.starts_with("TANDEM_TOKEN has 5 characters") && e.contains("at least 16"),
            "{e}"
        );
        let e = check_strength(PLACEHOLDER_TOKENS[1], "[run] token").unwrap_err();
        assert!(e.starts_with("[run] token is the placeholder"), "{e}");
        // Characters, not bytes: 15 two-byte letters are too few.
        assert!(check_strength(&"é".repeat(15), "x").is_err());
        assert_eq!(check_strength(&"é".repeat(16), "x"), Ok(()));
    }
}
