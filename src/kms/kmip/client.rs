//! KMIP transport: mutual-TLS connections with rustls and the failover loop.
//!
//! One connection is opened per provider operation (a handful per mount or
//! rotation) and closed with a TLS close_notify afterwards, so no idle
//! connection is ever held open against the key manager.
//!
//! Failover ([`Client::run`]): the servers are tried in configuration order
//! (primary first). A connection failure, timeout, TLS failure, malformed
//! answer or server-side error makes the loop wait `retry_delay` and try the
//! next server; the list is walked `failover_cycles` times. A server that
//! failed for a reason that cannot heal by itself (certificate verification,
//! KMIP authentication) is not tried again in later cycles. Definitive answers
//! (`PERMISSION_DENIED`, key not found, GCM authentication failure) stop the
//! loop at once. When every attempt has failed, the error lists each server and
//! its last failure on one line.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use zeroize::Zeroizing;

use super::KmipServerConfig;
use super::messages::{self, Credential, Operation, ResponseError, reason};
use super::ttlv::{Ttlv, tag};
use crate::audit::{self, AuditRecord, Outcome};
use crate::credfile;
use crate::crypto::keys::Secret;
use crate::kms::KmsError;

/// Largest response accepted (KMIP answers here are a few hundred bytes).
const MAX_RESPONSE: usize = 1 << 20;

/// One configured key server, with its TLS configuration loaded.
pub(crate) struct ServerEndpoint {
    pub name: String,
    pub host: String,
    pub port: u16,
    client_cert: String,
    tls: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    username: Option<String>,
    password: Option<Secret>,
}

fn cfg_err(msg: String) -> KmsError {
    KmsError::Config(msg)
}

fn read_pem_certs(
    path: &Path,
    what: &str,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, KmsError> {
    let pem = std::fs::read(path)
        .map_err(|e| cfg_err(format!("cannot read {what} {}: {e}", path.display())))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cfg_err(format!("{what} {} is not valid PEM: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(cfg_err(format!(
            "{what} {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

impl ServerEndpoint {
    /// Loads certificates, the client key and the optional password file.
    pub fn load(c: &KmipServerConfig) -> Result<ServerEndpoint, KmsError> {
        let label = format!("key server {} ({}:{})", c.name, c.host, c.port);
        if c.name.trim().is_empty() || c.host.trim().is_empty() {
            return Err(cfg_err(format!("{label}: name and host must not be empty")));
        }
        if c.port == 0 {
            return Err(cfg_err(format!("{label}: port 0 is not valid")));
        }
        let mut roots = RootCertStore::empty();
        // The CA decides whom the client trusts: nobody but root may change it.
        crate::credfile::check_trusted(&c.ca, "CA certificate")
            .map_err(|e| cfg_err(e.to_string()))?;
        for cert in read_pem_certs(&c.ca, "CA certificate")? {
            roots.add(cert).map_err(|e| {
                cfg_err(format!(
                    "{label}: CA certificate {} is not usable: {e}",
                    c.ca.display()
                ))
            })?;
        }
        let chain = read_pem_certs(&c.client_cert, "client certificate")?;
        credfile::check_private(&c.client_key, "KMIP client key")
            .map_err(|e| cfg_err(e.to_string()))?;
        let key_pem = Secret::from_vec(std::fs::read(&c.client_key).map_err(|e| {
            cfg_err(format!(
                "cannot read KMIP client key {}: {e}",
                c.client_key.display()
            ))
        })?);
        let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
            .map_err(|e| {
                cfg_err(format!(
                    "KMIP client key {} is not valid PEM: {e}",
                    c.client_key.display()
                ))
            })?
            .ok_or_else(|| {
                cfg_err(format!(
                    "KMIP client key {} holds no private key",
                    c.client_key.display()
                ))
            })?;
        drop(key_pem);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| cfg_err(format!("{label}: TLS setup failed: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                cfg_err(format!(
                    "{label}: client certificate {} and key {} are not usable together: {e}",
                    c.client_cert.display(),
                    c.client_key.display()
                ))
            })?;
        let server_name = ServerName::try_from(c.host.clone()).map_err(|_| {
            cfg_err(format!(
                "{label}: {:?} is not a valid host name or IP address",
                c.host
            ))
        })?;
        let password = match &c.password_file {
            None => None,
            Some(p) => {
                credfile::check_private(p, "KMIP password file")
                    .map_err(|e| cfg_err(e.to_string()))?;
                let raw = Secret::from_vec(std::fs::read(p).map_err(|e| {
                    cfg_err(format!(
                        "cannot read KMIP password file {}: {e}",
                        p.display()
                    ))
                })?);
                let mut bytes = raw.as_bytes();
                while let [rest @ .., b'\n' | b'\r'] = bytes {
                    bytes = rest;
                }
                if std::str::from_utf8(bytes).is_err() {
                    return Err(cfg_err(format!(
                        "KMIP password file {} is not UTF-8 text",
                        p.display()
                    )));
                }
                Some(Secret::from_slice(bytes))
            }
        };
        if password.is_some() && c.username.is_none() {
            return Err(cfg_err(format!("{label}: password_file needs a username")));
        }
        Ok(ServerEndpoint {
            name: c.name.clone(),
            host: c.host.clone(),
            port: c.port,
            client_cert: c.client_cert.display().to_string(),
            tls: Arc::new(tls),
            server_name,
            username: c.username.clone(),
            password,
        })
    }

    /// `name (host:port)`, used in every message about this server.
    pub fn label(&self) -> String {
        format!("{} ({}:{})", self.name, self.host, self.port)
    }
}

/// Connect and read timeouts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
}

/// Why one attempt on one server failed.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// TCP connect failed or timed out, or name resolution failed.
    Connect(String),
    /// The TLS handshake failed for a reason that will not heal by retrying
    /// (certificate verification, protocol mismatch).
    Tls(String),
    /// The connection broke or timed out after it was established.
    Io(String),
    /// The server's answer was not a valid KMIP response.
    Protocol(String),
    /// The server answered with a failed result.
    Refused {
        op: Operation,
        reason: Option<u32>,
        message: String,
    },
}

impl Failure {
    pub fn describe(&self) -> String {
        match self {
            Failure::Connect(m) | Failure::Tls(m) | Failure::Io(m) => m.clone(),
            Failure::Protocol(m) => format!("protocol error: {m}"),
            Failure::Refused {
                op,
                reason,
                message,
            } => {
                let r = ResponseError::Failed {
                    status: 1,
                    reason: *reason,
                    message: message.clone(),
                };
                let hint = if *reason == Some(reason::AUTHENTICATION_NOT_SUCCESSFUL) {
                    " (check the client certificate: it needs the clientAuth extended key usage, and the KMIP credentials)"
                } else {
                    ""
                };
                format!("{} refused: {r}{hint}", op.name())
            }
        }
    }

    pub fn reason(&self) -> Option<u32> {
        match self {
            Failure::Refused { reason, .. } => *reason,
            _ => None,
        }
    }
}

/// How an operation closure ends an attempt that did not succeed.
pub(crate) enum OpFail {
    /// A failure of this server: the failover loop decides what to do.
    Server(Failure),
    /// A definitive answer: stop and return this error.
    Fatal(KmsError),
}

impl From<Failure> for OpFail {
    fn from(f: Failure) -> Self {
        OpFail::Server(f)
    }
}

fn io_kind_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// A clear description of a TLS-level error from rustls.
fn describe_rustls(e: &rustls::Error, server: &ServerEndpoint) -> String {
    use rustls::{CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer => {
                "TLS: unknown CA: the server certificate is not signed by the configured CA"
                    .to_string()
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => format!(
                "TLS: name mismatch: the server certificate is not valid for {:?}",
                server.host
            ),
            C::Expired | C::ExpiredContext { .. } => {
                "TLS: the server certificate has expired".to_string()
            }
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "TLS: the server certificate is not valid yet (check the clock)".to_string()
            }
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                "TLS: the server certificate is not valid for TLS server authentication".to_string()
            }
            C::BadSignature => "TLS: bad signature on the server certificate".to_string(),
            other => format!("TLS: bad server certificate: {other}"),
        },
        E::AlertReceived(a) => {
            use rustls::AlertDescription as A;
            let cert = &server.client_cert;
            match a {
                A::UnknownCA => format!(
                    "TLS: the server does not trust the CA that signed our client certificate {cert} (alert: unknown CA)"
                ),
                A::UnsupportedCertificate => format!(
                    "TLS: the server refused our client certificate {cert} as unsuitable (alert: unsupported certificate); it needs the clientAuth extended key usage"
                ),
                A::CertificateExpired => {
                    format!("TLS: the server says our client certificate {cert} has expired")
                }
                A::CertificateRevoked => {
                    format!("TLS: the server says our client certificate {cert} is revoked")
                }
                A::BadCertificate | A::CertificateUnknown | A::AccessDenied => {
                    format!("TLS: the server refused our client certificate {cert} (alert: {a:?})")
                }
                A::HandshakeFailure => format!(
                    "TLS: handshake failure (alert from the server): no common cipher suite, or the client certificate {cert} was not accepted"
                ),
                _ => format!("TLS: the server aborted the handshake (alert: {a:?})"),
            }
        }
        E::PeerIncompatible(p) => format!(
            "TLS: no common protocol version or cipher suite with the server ({p:?}); kmfs needs TLS 1.2 or 1.3 with ECDHE and AES-GCM or ChaCha20"
        ),
        other => format!("TLS: {other}"),
    }
}

fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

/// An open, authenticated connection to one server.
pub(crate) struct Conn<'a> {
    pub server: &'a ServerEndpoint,
    pub ip: IpAddr,
    timeouts: Timeouts,
    stream: StreamOwned<ClientConnection, TcpStream>,
}

impl<'a> Conn<'a> {
    /// Resolves, connects (bounded by the connect timeout) and completes the TLS
    /// handshake (bounded by the read timeout). On failure also returns the IP
    /// address tried, if any.
    pub fn open(
        server: &'a ServerEndpoint,
        timeouts: Timeouts,
    ) -> Result<Conn<'a>, (Option<IpAddr>, Failure)> {
        let addrs: Vec<SocketAddr> = (server.host.as_str(), server.port)
            .to_socket_addrs()
            .map_err(|e| {
                (
                    None,
                    Failure::Connect(format!("cannot resolve {}: {e}", server.host)),
                )
            })?
            .collect();
        let mut last = (
            None,
            Failure::Connect(format!("{} has no address", server.host)),
        );
        let mut tcp = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeouts.connect) {
                Ok(s) => {
                    tcp = Some((s, addr.ip()));
                    break;
                }
                Err(e) => {
                    let why = if io_kind_timeout(&e) {
                        format!(
                            "connect timed out after {} ms",
                            timeouts.connect.as_millis()
                        )
                    } else if e.kind() == io::ErrorKind::ConnectionRefused {
                        "connection refused".to_string()
                    } else {
                        format!("connect failed: {e}")
                    };
                    last = (Some(addr.ip()), Failure::Connect(why));
                }
            }
        }
        let Some((mut sock, ip)) = tcp else {
            return Err(last);
        };
        let io_fail = |e: io::Error| {
            (
                Some(ip),
                Failure::Connect(format!("socket setup failed: {e}")),
            )
        };
        sock.set_read_timeout(Some(timeouts.read))
            .map_err(io_fail)?;
        sock.set_write_timeout(Some(timeouts.read))
            .map_err(io_fail)?;
        sock.set_nodelay(true).map_err(io_fail)?;
        let mut tls = ClientConnection::new(server.tls.clone(), server.server_name.clone())
            .map_err(|e| (Some(ip), Failure::Tls(describe_rustls(&e, server))))?;
        let started = Instant::now();
        while tls.is_handshaking() {
            if let Err(e) = tls.complete_io(&mut sock) {
                let f = if let Some(r) = rustls_error(&e) {
                    Failure::Tls(describe_rustls(r, server))
                } else if io_kind_timeout(&e) {
                    Failure::Io(format!(
                        "TLS handshake timed out after {} ms (server not answering)",
                        started.elapsed().as_millis()
                    ))
                } else if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::BrokenPipe
                ) {
                    Failure::Io(format!(
                        "the server closed the connection during the TLS handshake ({e}); it may not accept the client certificate {}",
                        server.client_cert
                    ))
                } else {
                    Failure::Io(format!("TLS handshake failed: {e}"))
                };
                return Err((Some(ip), f));
            }
        }
        Ok(Conn {
            server,
            ip,
            timeouts,
            stream: StreamOwned::new(tls, sock),
        })
    }

    fn io_failure(&self, e: io::Error, during: &str) -> Failure {
        if let Some(r) = rustls_error(&e) {
            return Failure::Tls(describe_rustls(r, self.server));
        }
        if io_kind_timeout(&e) {
            Failure::Io(format!(
                "no answer within {} ms ({during})",
                self.timeouts.read.as_millis()
            ))
        } else if e.kind() == io::ErrorKind::UnexpectedEof {
            Failure::Io(format!("the server closed the connection ({during})"))
        } else {
            Failure::Io(format!("connection failed ({during}): {e}"))
        }
    }

    /// Sends one request and returns the response payload of a successful answer.
    pub fn call(&mut self, op: Operation, payload: Vec<Ttlv>) -> Result<Ttlv, Failure> {
        let cred = self.server.username.as_deref().map(|u| Credential {
            username: u,
            password: self.server.password.as_ref(),
        });
        let req = messages::request(op, payload, cred.as_ref()).to_bytes();
        let during = format!("{} request", op.name());
        self.stream
            .write_all(&req)
            .and_then(|_| self.stream.flush())
            .map_err(|e| self.io_failure(e, &during))?;
        drop(req);
        let mut hdr = [0u8; 8];
        self.stream
            .read_exact(&mut hdr)
            .map_err(|e| self.io_failure(e, &during))?;
        let (t, ty, len) = Ttlv::peek_header(&hdr);
        let len = len as usize;
        if t != tag::RESPONSE_MESSAGE || ty != 0x01 || !len.is_multiple_of(8) || len > MAX_RESPONSE
        {
            return Err(Failure::Protocol(format!(
                "not a KMIP response message (tag 0x{t:06x}, type 0x{ty:02x}, length {len})"
            )));
        }
        let mut buf = Zeroizing::new(vec![0u8; 8 + len]);
        buf[..8].copy_from_slice(&hdr);
        self.stream
            .read_exact(&mut buf[8..])
            .map_err(|e| self.io_failure(e, &during))?;
        let msg = Ttlv::decode(&buf).map_err(|e| Failure::Protocol(e.to_string()))?;
        messages::parse_response(&msg, op).map_err(|e| match e {
            ResponseError::Malformed(m) => Failure::Protocol(m),
            ResponseError::Failed {
                reason, message, ..
            } => Failure::Refused {
                op,
                reason,
                message,
            },
        })
    }

    /// Records one KMIP operation on this connection in the audit trail.
    pub fn audit(&self, op: &str, key: &str, version: Option<u32>, result: Result<&str, &str>) {
        record(op, Some(self.server), Some(self.ip), key, version, result);
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        // Send close_notify without waiting for the server's answer.
        self.stream.conn.send_close_notify();
        while self.stream.conn.wants_write() {
            if self.stream.conn.write_tls(&mut self.stream.sock).is_err() {
                break;
            }
        }
    }
}

/// Records one operation in the audit trail.
pub(crate) fn record(
    op: &str,
    server: Option<&ServerEndpoint>,
    ip: Option<IpAddr>,
    key: &str,
    version: Option<u32>,
    result: Result<&str, &str>,
) {
    let reason = match result {
        Ok(r) | Err(r) => r,
    };
    let server_name = server.map_or("", |s| s.name.as_str());
    audit::record(&AuditRecord {
        ip: ip.map(|i| i.to_string()).unwrap_or_default(),
        port: server.map(|s| s.port),
        ..AuditRecord::new(op, server_name, key, version, Outcome::of(&result), reason)
    });
}

/// Failover policy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Policy {
    pub timeouts: Timeouts,
    pub retry_delay: Duration,
    pub cycles: u32,
}

/// All configured servers plus the failover policy.
pub(crate) struct Client {
    pub servers: Vec<ServerEndpoint>,
    pub policy: Policy,
}

/// Failures that will not heal by retrying the same server.
fn permanent(f: &Failure) -> bool {
    matches!(f, Failure::Tls(_)) || f.reason() == Some(reason::AUTHENTICATION_NOT_SUCCESSFUL)
}

impl Client {
    /// Runs `f` on a connection to the first server that works, failing over as
    /// described in the module documentation. `op`, `key` and `version` are for
    /// the audit trail and messages.
    pub fn run<T>(
        &self,
        op: &str,
        key: &str,
        version: Option<u32>,
        mut f: impl FnMut(&mut Conn) -> Result<T, OpFail>,
    ) -> Result<T, KmsError> {
        let n = self.servers.len();
        let mut last: Vec<Option<String>> = vec![None; n];
        let mut skip = vec![false; n];
        let mut auth_only = true;
        let mut first = true;
        let mut attempts = 0u32;
        for cycle in 0..self.policy.cycles.max(1) {
            for (i, server) in self.servers.iter().enumerate() {
                if skip[i] {
                    continue;
                }
                if !first {
                    std::thread::sleep(self.policy.retry_delay);
                }
                first = false;
                attempts += 1;
                let failure = match Conn::open(server, self.policy.timeouts) {
                    Err((ip, failure)) => {
                        record(
                            "connect",
                            Some(server),
                            ip,
                            key,
                            version,
                            Err(&failure.describe()),
                        );
                        (ip, failure)
                    }
                    Ok(mut conn) => {
                        record(
                            "connect",
                            Some(server),
                            Some(conn.ip),
                            key,
                            version,
                            Ok("TLS established"),
                        );
                        match f(&mut conn) {
                            Ok(v) => return Ok(v),
                            Err(OpFail::Fatal(e)) => return Err(e),
                            Err(OpFail::Server(failure)) => match fatal(&failure, server) {
                                Some(e) => return Err(e),
                                None => (Some(conn.ip), failure),
                            },
                        }
                    }
                };
                let (ip, failure) = failure;
                if failure.reason() != Some(reason::AUTHENTICATION_NOT_SUCCESSFUL) {
                    auth_only = false;
                }
                skip[i] = permanent(&failure);
                let why = failure.describe();
                let next = (1..=n)
                    .map(|d| (i + d) % n)
                    .find(|&j| !skip[j] && (j > i || cycle + 1 < self.policy.cycles.max(1)));
                let msg = match next {
                    Some(j) => format!(
                        "{} failed: {why}; trying {}",
                        server.label(),
                        self.servers[j].label()
                    ),
                    None => format!("{} failed: {why}; no server left to try", server.label()),
                };
                record("failover", Some(server), ip, key, version, Err(&msg));
                log::warn!("kmip {op}: {msg}");
                last[i] = Some(why);
            }
            if skip.iter().all(|s| *s) {
                break;
            }
        }
        let list: Vec<String> = self
            .servers
            .iter()
            .zip(&last)
            .map(|(s, why)| format!("{}: {}", s.label(), why.as_deref().unwrap_or("not tried")))
            .collect();
        let msg = format!(
            "{op} failed on all {n} key server(s) after {attempts} attempt(s): {}",
            list.join("; ")
        );
        if auth_only {
            Err(KmsError::AccessDenied(msg))
        } else {
            Err(KmsError::Unreachable(msg))
        }
    }
}

/// KMIP refusals that are definitive answers rather than server trouble.
fn fatal(f: &Failure, server: &ServerEndpoint) -> Option<KmsError> {
    let Failure::Refused {
        reason: Some(r), ..
    } = f
    else {
        return None;
    };
    let msg = format!("{}: {}", server.label(), f.describe());
    match *r {
        reason::PERMISSION_DENIED => Some(KmsError::AccessDenied(msg)),
        reason::ITEM_NOT_FOUND | reason::ILLEGAL_OPERATION => Some(KmsError::KeyNotFound(msg)),
        _ => None,
    }
}
