//! TLS 1.3 configuration for every peercam connection: mutual authentication, always.
//!
//! Owns the certificate checks made during the handshake: the chain must lead to the
//! deployment CA, the certificate must be in its validity period, not on the deny list, and
//! name the role (and, where we know it, the ID) that we expect. It does not decide
//! authorization (access lists): that needs the verified identity, which
//! [`peer_identity`] extracts after the handshake.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use peercam_certs::{inspect_der, Fingerprint, Identity, Role};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};

/// Errors building TLS configuration from files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or is not the expected PEM.
    #[error(transparent)]
    Cert(#[from] peercam_certs::CertError),
    /// A PEM block was missing or malformed.
    #[error("{what} in {path}: no valid PEM {kind} found")]
    Pem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: String,
        /// The PEM block kind.
        kind: &'static str,
    },
    /// The certificate names no peercam identity.
    #[error("{0} names no peercam identity: issue it with `certs issue --role ... --id ...`")]
    NoIdentity(String),
    /// The certificate's role is not the one this program needs.
    #[error("{path} is a {found} certificate, but this program needs a {wanted} certificate")]
    WrongRole {
        /// The file.
        path: String,
        /// Role found.
        found: Role,
        /// Role needed.
        wanted: Role,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA certificate could not be used as a trust anchor.
    #[error("the CA certificate cannot be used as a trust anchor: {0}")]
    BadCa(String),
}

/// The local side's certificate chain, private key and identity.
#[derive(Debug)]
pub struct Credentials {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its private key.
    pub key: PrivateKeyDer<'static>,
    /// Who the leaf names.
    pub identity: Identity,
    /// Leaf's end of validity, seconds since the Unix epoch.
    pub not_after: i64,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Credentials {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            identity: self.identity.clone(),
            not_after: self.not_after,
        }
    }
}

impl Credentials {
    /// Builds credentials from PEM text, checking that key and certificate belong together
    /// and that the certificate has the role `role`.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        role: Role,
        label: &str,
    ) -> Result<Self, TlsError> {
        let chain: Vec<_> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|_| pem_err("certificate", label, "CERTIFICATE"))?;
        let leaf = chain
            .first()
            .ok_or_else(|| pem_err("certificate", label, "CERTIFICATE"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|_| pem_err("private key", label, "PRIVATE KEY"))?;
        peercam_certs::files::check_key_matches(cert_pem, key_pem)?;
        let info = inspect_der(leaf)?;
        let identity = info
            .identity
            .ok_or_else(|| TlsError::NoIdentity(label.to_string()))?;
        if identity.role != role {
            return Err(TlsError::WrongRole {
                path: label.to_string(),
                found: identity.role,
                wanted: role,
            });
        }
        Ok(Credentials {
            chain,
            key,
            identity,
            not_after: info.not_after,
        })
    }

    /// Loads credentials from a certificate file and a key file.
    pub fn load(cert: &Path, key: &Path, role: Role) -> Result<Self, TlsError> {
        let cert_pem = peercam_certs::files::read_text(cert, "the certificate")?;
        let key_pem = peercam_certs::files::read_text(key, "the private key")?;
        Self::from_pem(&cert_pem, &key_pem, role, &cert.display().to_string())
    }
}

fn pem_err(what: &'static str, path: &str, kind: &'static str) -> TlsError {
    TlsError::Pem {
        what,
        path: path.to_string(),
        kind,
    }
}

/// Certificates and IDs refused even though the CA signed them (revocation).
#[derive(Debug, Clone, Default)]
pub struct DenyList {
    /// SHA-256 fingerprints of revoked certificates.
    pub certs: HashSet<Fingerprint>,
    /// Revoked identities (every certificate for them is refused).
    pub identities: HashSet<Identity>,
}

impl DenyList {
    /// Builds a deny list from identities written `role/id` (e.g. `viewer/mallory`) and
    /// certificate SHA-256 fingerprints (as `certs inspect` prints them).
    pub fn parse(ids: &[String], certs: &[String]) -> Result<Self, TlsError> {
        let mut deny = DenyList::default();
        for entry in ids {
            let (role, id) = entry.split_once('/').ok_or_else(|| {
                TlsError::BadCa(format!(
                    "revoked identity {entry:?}: write it as role/id, e.g. viewer/mallory"
                ))
            })?;
            deny.identities.insert(Identity::new(role.parse()?, id)?);
        }
        for fp in certs {
            deny.certs.insert(fp.parse()?);
        }
        Ok(deny)
    }

    fn check(&self, der: &[u8], identity: &Identity) -> Result<(), rustls::Error> {
        if self.certs.contains(&Fingerprint::of(der)) || self.identities.contains(identity) {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Revoked));
        }
        Ok(())
    }
}

/// What a deployment trusts: its CA, and what it has revoked.
#[derive(Debug, Clone)]
pub struct Trust {
    roots: Arc<RootCertStore>,
    deny: Arc<DenyList>,
}

impl Trust {
    /// Trusts the CA certificate(s) in `ca_pem`.
    pub fn from_pem(ca_pem: &str, label: &str) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        let mut any = false;
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let cert = cert.map_err(|_| pem_err("CA certificate", label, "CERTIFICATE"))?;
            roots
                .add(cert)
                .map_err(|e| TlsError::BadCa(e.to_string()))?;
            any = true;
        }
        if !any {
            return Err(pem_err("CA certificate", label, "CERTIFICATE"));
        }
        Ok(Trust {
            roots: Arc::new(roots),
            deny: Arc::default(),
        })
    }

    /// Loads the CA certificate from a file.
    pub fn load(ca: &Path) -> Result<Self, TlsError> {
        let pem = peercam_certs::files::read_text(ca, "the CA certificate")?;
        Self::from_pem(&pem, &ca.display().to_string())
    }

    /// Replaces the deny list.
    pub fn with_deny_list(mut self, deny: DenyList) -> Self {
        self.deny = Arc::new(deny);
        self
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The default provider with TLS13_AES_128_GCM_SHA256 first. rustls' default prefers
/// TLS13_AES_256_GCM_SHA384, whose SHA-384 (transcript hash, HKDF for every TLS and QUIC
/// key) has no hardware support on x86 (SHA-NI covers SHA-256 only): on the rendezvous it
/// was 9 % of the CPU of a registration (`BENCHMARKS.md`, registration rate). AES-128-GCM
/// is TLS 1.3's mandatory suite; the other suites stay allowed.
fn sha256_first_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Who we expect at the other end of a connection we dial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// A rendezvous server; its certificate must also be valid for the name we dialled.
    Rendezvous,
    /// Exactly this identity.
    Exactly(Identity),
}

#[derive(Debug)]
struct ServerVerifier {
    trust: Trust,
    expect: Expect,
    provider: Arc<CryptoProvider>,
}

fn wrong_peer(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(WrongPeer(
        msg,
    )))))
}

/// The peer's certificate is valid but names someone we did not expect.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WrongPeer(String);

/// Reads the identity from a certificate rustls has already chain-checked.
fn identity_of(der: &[u8]) -> Result<Identity, rustls::Error> {
    inspect_der(der)
        .ok()
        .and_then(|i| i.identity)
        .ok_or_else(|| wrong_peer("certificate names no peercam identity".into()))
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.trust.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let identity = identity_of(end_entity)?;
        self.trust.deny.check(end_entity, &identity)?;
        match &self.expect {
            Expect::Rendezvous => {
                if identity.role != Role::Rendezvous {
                    return Err(wrong_peer(format!(
                        "expected a rendezvous server, the peer is {identity}"
                    )));
                }
                rustls::client::verify_server_name(&parsed, server_name)?;
            }
            Expect::Exactly(want) => {
                if &identity != want {
                    return Err(wrong_peer(format!(
                        "expected {want}, the peer is {identity}"
                    )));
                }
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Wraps rustls' client verifier: chain, validity and clientAuth usage are checked by
/// webpki; we add the deny list and the roles this server accepts.
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    deny: Arc<DenyList>,
    roles: Vec<Role>,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let identity = identity_of(end_entity)?;
        self.deny.check(end_entity, &identity)?;
        if !self.roles.contains(&identity.role) {
            return Err(wrong_peer(format!(
                "{identity} may not connect here (only {:?})",
                self.roles
            )));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A rustls client configuration: TLS 1.3 only, our certificate offered, the server
/// checked against `expect`.
pub fn client_config(
    creds: &Credentials,
    trust: &Trust,
    expect: Expect,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(ServerVerifier {
        trust: trust.clone(),
        expect,
        provider: provider.clone(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous() // not dangerous: our verifier checks the chain with webpki, then more
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// A rustls server configuration: TLS 1.3 only, a client certificate of one of `roles`
/// required.
pub fn server_config(
    creds: &Credentials,
    trust: &Trust,
    roles: &[Role],
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TlsError> {
    server_config_with(provider(), creds, trust, roles, alpn)
}

/// [`server_config`] for a server that handshakes many short or idle connections (the
/// rendezvous): it picks TLS13_AES_128_GCM_SHA256 whatever the client prefers, which
/// costs less CPU per handshake than the default TLS13_AES_256_GCM_SHA384 on x86.
pub fn handshake_server_config(
    creds: &Credentials,
    trust: &Trust,
    roles: &[Role],
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = server_config_with(sha256_first_provider(), creds, trust, roles, alpn)?;
    config.ignore_client_order = true;
    Ok(config)
}

fn server_config_with(
    provider: Arc<CryptoProvider>,
    creds: &Credentials,
    trust: &Trust,
    roles: &[Role],
    alpn: &[u8],
) -> Result<rustls::ServerConfig, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(trust.roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::BadCa(e.to_string()))?;
    let verifier = Arc::new(ClientVerifier {
        inner,
        deny: trust.deny.clone(),
        roles: roles.to_vec(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())?;
    config.alpn_protocols = vec![alpn.to_vec()];
    config.max_early_data_size = 0;
    Ok(config)
}

/// The verified identity of the peer of an established connection, and the fingerprint
/// of its public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Role and ID from the certificate.
    pub identity: Identity,
    /// SHA-256 of the peer's public key.
    pub key: Fingerprint,
}

/// Extracts the peer's identity from a connection whose handshake verified it.
pub fn peer_identity(conn: &quinn::Connection) -> Option<PeerIdentity> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    let info = inspect_der(certs.first()?).ok()?;
    Some(PeerIdentity {
        identity: info.identity?,
        key: info.key_fingerprint,
    })
}
