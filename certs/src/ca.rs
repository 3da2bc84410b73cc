//! The deployment CA: creating it, issuing leaf certificates, signing CSRs.
//!
//! Owns the certificate *profiles* (which extensions a rendezvous, camera or viewer
//! certificate carries). It does not touch files (see `files`) or parse certificates for
//! display (see `inspect`).

use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

use crate::identity::{Identity, Role};
use crate::CertError;

/// Default lifetime of a deployment CA.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Default lifetime of a leaf certificate.
pub const LEAF_VALIDITY_DAYS: i64 = 825;
/// How far back `not_before` is set, so that a peer whose clock lags a little still accepts
/// a certificate issued a moment ago.
const BACKDATE: Duration = Duration::hours(1);

/// What a leaf certificate should say.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    /// Role and ID of the holder.
    pub identity: Identity,
    /// DNS names (rendezvous only: what clients dial).
    pub dns_names: Vec<String>,
    /// IP addresses (rendezvous only).
    pub ips: Vec<IpAddr>,
    /// Start of validity; `None` means one hour ago.
    pub not_before: Option<OffsetDateTime>,
    /// End of validity; `None` means [`LEAF_VALIDITY_DAYS`] from now.
    pub not_after: Option<OffsetDateTime>,
}

impl LeafSpec {
    /// A spec with default validity and no DNS names or IPs.
    pub fn new(identity: Identity) -> Self {
        LeafSpec {
            identity,
            dns_names: Vec::new(),
            ips: Vec::new(),
            not_before: None,
            not_after: None,
        }
    }
}

/// A certificate and its freshly generated private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// The private key (PKCS#8), PEM. Write it with mode 0600.
    pub key_pem: String,
}

/// A deployment CA that can issue certificates.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a new CA with an ECDSA P-256 key.
    pub fn generate(name: &str, validity_days: i64) -> Result<(Ca, String), CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let key_pem = key.serialize_pem();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "peercam deployment CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(validity_days);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok((
            Ca {
                cert_pem,
                issuer: Issuer::new(params, key),
            },
            key_pem,
        ))
    }

    /// Loads a CA from its certificate and private key (PEM), checking that they belong
    /// together.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, CertError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| CertError::Parse(format!("CA key is not a PEM private key: {e}")))?;
        let info = crate::inspect::inspect_pem(cert_pem)?;
        if !info.is_ca {
            return Err(CertError::NotCa);
        }
        if info.public_key != key.der_bytes() {
            return Err(CertError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)
            .map_err(|e| CertError::Parse(format!("CA certificate: {e}")))?;
        Ok(Ca {
            cert_pem: cert_pem.to_string(),
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a leaf certificate with a new ECDSA P-256 key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let cert = leaf_params(spec)?.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a CSR. The certificate names `spec.identity`, whatever the CSR asked for; if the
    /// CSR names a peercam identity, it must be the same one (a mix-up is an error, not a
    /// silent rename). The CSR's signature is checked, proving its holder has the key.
    pub fn sign_csr(&self, csr_pem: &str, spec: &LeafSpec) -> Result<String, CertError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CertError::Parse(format!("not a valid CSR: {e}")))?;
        if let Some(asked) = csr_identity(&csr.params)? {
            if asked != spec.identity {
                return Err(CertError::CsrMismatch {
                    asked: asked.to_string(),
                    given: spec.identity.to_string(),
                });
            }
        }
        let signed = CertificateSigningRequestParams {
            params: leaf_params(spec)?,
            public_key: csr.public_key,
        };
        Ok(signed.signed_by(&self.issuer)?.pem())
    }
}

/// Reads the identity a CSR asks for (from its URI SAN), if any.
pub fn csr_identity_pem(csr_pem: &str) -> Result<Option<Identity>, CertError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| CertError::Parse(format!("not a valid CSR: {e}")))?;
    csr_identity(&csr.params)
}

fn csr_identity(params: &CertificateParams) -> Result<Option<Identity>, CertError> {
    for san in &params.subject_alt_names {
        if let SanType::URI(uri) = san {
            return Identity::from_uri(uri.as_str()).map(Some);
        }
    }
    Ok(None)
}

/// Creates a key pair and a CSR naming `identity`. The key stays with the caller (the
/// device); only the CSR goes to the CA.
pub fn make_csr(identity: &Identity) -> Result<Issued, CertError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.uri().try_into()?)];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.uri());
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key)?;
    Ok(Issued {
        cert_pem: csr.pem()?,
        key_pem: key.serialize_pem(),
    })
}

fn leaf_params(spec: &LeafSpec) -> Result<CertificateParams, CertError> {
    let id = &spec.identity;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{} {}", id.role, id.id));
    params.distinguished_name = dn;
    params.subject_alt_names = vec![SanType::URI(id.uri().try_into()?)];
    if id.role != Role::Rendezvous && (!spec.dns_names.is_empty() || !spec.ips.is_empty()) {
        return Err(CertError::NamesOnlyForRendezvous);
    }
    for name in &spec.dns_names {
        params
            .subject_alt_names
            .push(SanType::DnsName(name.as_str().try_into()?));
    }
    for ip in &spec.ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match id.role {
        Role::Rendezvous => vec![ExtendedKeyUsagePurpose::ServerAuth],
        // A camera is a client of the rendezvous and a server for viewers; a viewer is a
        // client of both, and a server if a camera ever dials it.
        Role::Camera | Role::Viewer => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
    params.use_authority_key_identifier_extension = true;
    let now = OffsetDateTime::now_utc();
    params.not_before = spec.not_before.unwrap_or(now - BACKDATE);
    params.not_after = spec
        .not_after
        .unwrap_or(now + Duration::days(LEAF_VALIDITY_DAYS));
    if params.not_after <= params.not_before {
        return Err(CertError::BadValidity);
    }
    params.serial_number = Some(random_serial()?);
    Ok(params)
}

fn random_serial() -> Result<SerialNumber, CertError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CertError::Random)?;
    bytes[0] &= 0x7f; // positive INTEGER
    bytes[0] |= 0x01; // and never a shorter encoding
    Ok(SerialNumber::from_slice(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::inspect_pem;

    fn camera(id: &str) -> LeafSpec {
        LeafSpec::new(Identity::new(Role::Camera, id).expect("valid id"))
    }

    #[test]
    fn issued_leaf_names_role_and_id() {
        let (ca, _) = Ca::generate("test", 10).expect("ca");
        let issued = ca.issue(&camera("cam-1")).expect("issue");
        let info = inspect_pem(&issued.cert_pem).expect("inspect");
        assert_eq!(
            info.identity.expect("identity").uri(),
            "peercam://camera/cam-1"
        );
        assert!(!info.is_ca);
        assert!(inspect_pem(ca.cert_pem()).expect("ca").is_ca);
    }

    #[test]
    fn ca_round_trips_through_pem_and_refuses_wrong_key() {
        let (ca, key) = Ca::generate("test", 10).expect("ca");
        assert!(Ca::from_pem(ca.cert_pem(), &key).is_ok());
        let (_, other_key) = Ca::generate("other", 10).expect("ca");
        assert!(matches!(
            Ca::from_pem(ca.cert_pem(), &other_key),
            Err(CertError::KeyMismatch)
        ));
    }

    #[test]
    fn csr_is_signed_and_keeps_device_key() {
        let (ca, _) = Ca::generate("test", 10).expect("ca");
        let id = Identity::new(Role::Camera, "cam-9").expect("valid");
        let csr = make_csr(&id).expect("csr");
        let cert = ca.sign_csr(&csr.cert_pem, &camera("cam-9")).expect("sign");
        let info = inspect_pem(&cert).expect("inspect");
        let key = KeyPair::from_pem(&csr.key_pem).expect("key");
        assert_eq!(info.public_key, key.der_bytes());
        // A CSR asking for another identity is refused.
        let err = ca.sign_csr(&csr.cert_pem, &camera("cam-10")).unwrap_err();
        assert!(matches!(err, CertError::CsrMismatch { .. }), "{err}");
    }

    #[test]
    fn names_only_for_rendezvous() {
        let (ca, _) = Ca::generate("test", 10).expect("ca");
        let mut spec = camera("cam-1");
        spec.dns_names.push("example.org".into());
        assert!(matches!(
            ca.issue(&spec),
            Err(CertError::NamesOnlyForRendezvous)
        ));
    }
}
