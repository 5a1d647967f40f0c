//! Who may talk to the analyzer, and over what.
//!
//! - **Transport.** gRPC over TLS (rustls, through tonic) when the analyzer has a certificate;
//!   with a client CA, agents may present certificates signed by it (mTLS). Plaintext is
//!   allowed only on loopback unless `--insecure` says otherwise, on both sides ([`plaintext_ok`]).
//! - **Tokens.** A token file gives bearer tokens roles ([`Role`]): `agent` streams traces
//!   (Ingest), `read` queries, `control` does everything (Control: plans, cuts, feedback, and
//!   Query). Tokens are compared by SHA-256 digest, so a lookup's time says nothing about how
//!   much of a guess was right.
//! - **The rule** ([`Policy::check`]): with no tokens and no client CA every call is allowed
//!   (a loopback analyzer for one host); with a token file each call needs a token of a role
//!   that covers it; an agent with a verified client certificate may stream without one.
//!
//! Health and reflection are never gated: a load balancer or grpcurl must see them.
#![deny(missing_docs)]

use std::{collections::HashMap, net::IpAddr, path::Path, sync::Arc};

use sha2::{Digest, Sha256};
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    service::Interceptor,
    transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig},
};

/// Why a certificate, key or token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A file could not be read.
    #[error("{what} {path}: {source}")]
    Read {
        /// What the file is for.
        what: &'static str,
        /// Its path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The token file has a bad line.
    #[error("token file {path}, line {line}: {why}")]
    Tokens {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// TLS settings that do not fit together.
    #[error("{0}")]
    Config(String),
    /// Plaintext to or on a non-loopback address without `--insecure`.
    #[error(
        "{0} is not a loopback address: use TLS (--tls-cert/--tls-key on the analyzer, an https:// address and --tls-ca on clients), or --insecure to send in the clear"
    )]
    Plaintext(String),
}

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Stream traces and logs (Ingest).
    Agent,
    /// Read (Query).
    Read,
    /// Everything: Control (plans, cuts, coloring, feedback) and Query.
    Control,
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "agent" => Ok(Role::Agent),
            "read" => Ok(Role::Read),
            "control" => Ok(Role::Control),
            other => Err(format!("unknown role `{other}` (agent, read, control)")),
        }
    }
}

/// The gRPC service a call is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// `afetm.v1.Ingest`.
    Ingest,
    /// `afetm.v1.Query`.
    Query,
    /// `afetm.v1.Control`.
    Control,
}

impl Role {
    /// Whether this role may call `service`.
    pub fn covers(self, service: Service) -> bool {
        matches!((self, service), (Role::Control, _) | (Role::Agent, Service::Ingest) | (Role::Read, Service::Query))
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|source| AuthError::Read { what, path: path.display().to_string(), source })
}

/// Bearer tokens and their roles.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    by_digest: HashMap<[u8; 32], Role>,
}

impl Tokens {
    /// Parses a token file: one `ROLE TOKEN` per line (`#` starts a comment). Tokens must have
    /// at least 16 characters.
    pub fn parse(path: &str, text: &str) -> Result<Tokens, AuthError> {
        let mut by_digest = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: String| AuthError::Tokens { path: path.into(), line: i + 1, why };
            let (role, token) =
                line.split_once(char::is_whitespace).ok_or_else(|| bad("expected `ROLE TOKEN`".into()))?;
            let role: Role = role.parse().map_err(bad)?;
            let token = token.trim();
            if token.len() < 16 || token.contains(char::is_whitespace) {
                return Err(bad("a token has at least 16 characters and no spaces".into()));
            }
            by_digest.insert(digest(token), role);
        }
        if by_digest.is_empty() {
            return Err(AuthError::Tokens { path: path.into(), line: 0, why: "no tokens".into() });
        }
        Ok(Tokens { by_digest })
    }

    /// Reads a token file (see [`Tokens::parse`]).
    pub fn load(path: &Path) -> Result<Tokens, AuthError> {
        let bytes = read("token file", path)?;
        Tokens::parse(&path.display().to_string(), &String::from_utf8_lossy(&bytes))
    }

    /// The role of `token`, if it is one of ours.
    pub fn role(&self, token: &str) -> Option<Role> {
        self.by_digest.get(&digest(token)).copied()
    }
}

/// The analyzer's access rule (see the module doc).
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Tokens, when a token file is configured.
    pub tokens: Option<Arc<Tokens>>,
    /// Whether verified client certificates admit agents (a client CA is configured).
    pub client_certs: bool,
}

impl Policy {
    /// Decides a call to `service` from its metadata and TLS peer certificates.
    pub fn check<T>(&self, service: Service, req: &Request<T>) -> Result<(), Status> {
        let has_cert = self.client_certs && req.peer_certs().is_some_and(|c| !c.is_empty());
        if service == Service::Ingest && has_cert {
            return Ok(());
        }
        let bearer =
            req.metadata().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match (&self.tokens, bearer) {
            (None, _) if !self.client_certs || service != Service::Ingest => Ok(()),
            (None, _) => {
                Err(Status::unauthenticated("Ingest needs a client certificate signed by the analyzer's client CA"))
            }
            (Some(_), None) => Err(Status::unauthenticated("this analyzer needs a bearer token (--token-file)")),
            (Some(t), Some(token)) => match t.role(token) {
                None => Err(Status::unauthenticated("unknown token")),
                Some(role) if role.covers(service) => Ok(()),
                Some(role) => Err(Status::permission_denied(format!("a {role:?} token may not call {service:?}"))),
            },
        }
    }

    /// An interceptor applying [`Policy::check`] for `service`.
    pub fn interceptor(&self, service: Service) -> impl Interceptor + Clone + use<> {
        let policy = self.clone();
        move |req: Request<()>| {
            policy.check(service, &req)?;
            Ok(req)
        }
    }
}

/// The analyzer's TLS: its certificate and key, and optionally the CA its agents' client
/// certificates are signed by (client certificates stay optional: tokens serve the others).
pub fn server_tls(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerTlsConfig, AuthError> {
    let identity = Identity::from_pem(read("certificate", cert)?, read("private key", key)?);
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read("client CA", ca)?)).client_auth_optional(true);
    }
    Ok(tls)
}

/// How a client reaches the analyzer.
#[derive(Clone, Debug, Default)]
pub struct ClientAuth {
    /// The CA that signed the analyzer's certificate (PEM file); needed for `https://`.
    pub ca: Option<std::path::PathBuf>,
    /// This client's certificate and key (mTLS).
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// The bearer token to send.
    pub token: Option<String>,
    /// Allow plaintext to a non-loopback address.
    pub insecure: bool,
}

impl ClientAuth {
    /// The token from a file (first line, trimmed), if one is given.
    pub fn token_from(path: Option<&Path>) -> Result<Option<String>, AuthError> {
        let Some(p) = path else { return Ok(None) };
        let text = String::from_utf8_lossy(&read("token file", p)?).into_owned();
        let token = text.lines().next().unwrap_or("").trim().to_string();
        if token.is_empty() {
            return Err(AuthError::Config(format!("token file {} is empty", p.display())));
        }
        Ok(Some(token))
    }

    /// A connected-on-demand endpoint for `url` with TLS when the URL is `https://`.
    pub fn endpoint(&self, url: &str) -> Result<tonic::transport::Endpoint, AuthError> {
        let parsed = url::Url::parse(url).map_err(|e| AuthError::Config(format!("bad analyzer address {url}: {e}")))?;
        let host = parsed.host_str().unwrap_or("").trim_start_matches('[').trim_end_matches(']').to_string();
        let ep = tonic::transport::Endpoint::from_shared(url.to_string())
            .map_err(|e| AuthError::Config(format!("bad analyzer address {url}: {e}")))?;
        match parsed.scheme() {
            "https" => {
                let mut tls = ClientTlsConfig::new().domain_name(host);
                if let Some(ca) = &self.ca {
                    tls = tls.ca_certificate(Certificate::from_pem(read("CA", ca)?));
                }
                if let Some((cert, key)) = &self.identity {
                    tls = tls.identity(Identity::from_pem(read("certificate", cert)?, read("private key", key)?));
                }
                ep.tls_config(tls).map_err(|e| AuthError::Config(format!("TLS settings: {e}")))
            }
            "http" => {
                if self.ca.is_some() || self.identity.is_some() {
                    return Err(AuthError::Config(format!("TLS files given but {url} is plaintext: use https://")));
                }
                plaintext_ok(&host, self.insecure)?;
                Ok(ep)
            }
            other => Err(AuthError::Config(format!("bad analyzer address {url}: scheme {other} (http or https)"))),
        }
    }

    /// An interceptor that adds the bearer token (if any) to every call.
    pub fn interceptor(&self) -> TokenInterceptor {
        TokenInterceptor { header: self.token.as_ref().and_then(|t| format!("Bearer {t}").parse().ok()) }
    }
}

/// Adds `authorization: Bearer <token>` to each call.
#[derive(Clone, Debug)]
pub struct TokenInterceptor {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Interceptor for TokenInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

/// A client channel with the token added to every call.
pub type AuthChannel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, TokenInterceptor>;

/// Refuses plaintext on a host that is not loopback (an IP or `localhost`), unless `insecure`.
pub fn plaintext_ok(host: &str, insecure: bool) -> Result<(), AuthError> {
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback || insecure {
        return Ok(());
    }
    Err(AuthError::Plaintext(host.to_string()))
}

/// [`plaintext_ok`] for a listen address (`HOST:PORT`, `[V6]:PORT`).
pub fn plaintext_listen_ok(addr: &str, insecure: bool) -> Result<(), AuthError> {
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr);
    plaintext_ok(host.trim_start_matches('[').trim_end_matches(']'), insecure)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_and_roles() {
        let t = Tokens::parse("t", "# ops\ncontrol 0123456789abcdef-ctl\nread 0123456789abcdef-read  # dashboards\nagent 0123456789abcdef-agent\n").unwrap();
        assert_eq!(t.role("0123456789abcdef-ctl"), Some(Role::Control));
        assert_eq!(t.role("0123456789abcdef-read"), Some(Role::Read));
        assert_eq!(t.role("0123456789abcdef-rea"), None);
        for (text, want) in [
            ("admin 0123456789abcdef", "unknown role"),
            ("read short", "16 characters"),
            ("readonly", "ROLE TOKEN"),
            ("# none\n", "no tokens"),
        ] {
            let e = Tokens::parse("f", text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert!(Role::Control.covers(Service::Ingest) && Role::Control.covers(Service::Control));
        assert!(
            Role::Read.covers(Service::Query)
                && !Role::Read.covers(Service::Control)
                && !Role::Read.covers(Service::Ingest)
        );
        assert!(Role::Agent.covers(Service::Ingest) && !Role::Agent.covers(Service::Query));
    }

    #[test]
    fn plaintext_only_on_loopback() {
        for h in ["127.0.0.1", "::1", "localhost", "127.8.9.1"] {
            assert!(plaintext_ok(h, false).is_ok(), "{h}");
        }
        let e = plaintext_ok("10.0.0.5", false).unwrap_err().to_string();
        assert!(e.contains("10.0.0.5") && e.contains("--insecure"), "{e}");
        assert!(plaintext_ok("10.0.0.5", true).is_ok());
        assert!(plaintext_listen_ok("[::1]:50051", false).is_ok());
        assert!(plaintext_listen_ok("0.0.0.0:50051", false).is_err());
        assert!(ClientAuth::default().endpoint("http://192.0.2.1:50051").is_err());
        assert!(ClientAuth::default().endpoint("http://127.0.0.1:50051").is_ok());
        assert!(ClientAuth::default().endpoint("ftp://127.0.0.1:50051").is_err());
    }

    #[test]
    fn the_policy_decides_by_token_role_and_service() {
        let tokens = Tokens::parse("t", "read 0123456789abcdef-read\nagent 0123456789abcdef-agent\n").unwrap();
        let p = Policy { tokens: Some(Arc::new(tokens)), client_certs: false };
        let with = |t: &str| {
            let mut r = Request::new(());
            r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
            r
        };
        assert_eq!(p.check(Service::Query, &Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
        assert!(p.check(Service::Query, &with("0123456789abcdef-read")).is_ok());
        assert_eq!(
            p.check(Service::Control, &with("0123456789abcdef-read")).unwrap_err().code(),
            tonic::Code::PermissionDenied
        );
        assert!(p.check(Service::Ingest, &with("0123456789abcdef-agent")).is_ok());
        assert_eq!(
            p.check(Service::Query, &with("wrong-token-xxxxxxxx")).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(Policy::default().check(Service::Control, &Request::new(())).is_ok());
        let certs_only = Policy { tokens: None, client_certs: true };
        assert!(certs_only.check(Service::Ingest, &Request::new(())).is_err(), "no certificate, no stream");
        assert!(certs_only.check(Service::Query, &Request::new(())).is_ok());
    }
}
