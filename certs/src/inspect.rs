//! Reading what a certificate says: identity, validity, fingerprints.
//!
//! Parsing only; trust decisions (chain, expiry against a clock) are made by rustls during
//! the handshake. The programs use [`inspect_der`] to learn who a verified peer is.

use std::fmt;

use ring::digest::{digest, SHA256};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::Identity;
use crate::CertError;

/// What a certificate says about its holder.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// The peercam identity (from the URI SAN); `None` for a CA certificate.
    pub identity: Option<Identity>,
    /// Subject, as text.
    pub subject: String,
    /// Issuer, as text.
    pub issuer: String,
    /// Whether this is a CA certificate.
    pub is_ca: bool,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: i64,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
    /// SHA-256 of the whole certificate (DER).
    pub fingerprint: Fingerprint,
    /// SHA-256 of the subject public key: stays the same when a certificate is re-issued
    /// for the same key.
    pub key_fingerprint: Fingerprint,
    /// The raw subject public key (for EC keys, the uncompressed point).
    pub public_key: Vec<u8>,
    /// DNS names in the SAN.
    pub dns_names: Vec<String>,
    /// IP addresses in the SAN.
    pub ips: Vec<std::net::IpAddr>,
}

/// A SHA-256 digest, shown as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Self {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest(&SHA256, data).as_ref());
        Fingerprint(out)
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = CertError;

    /// Parses 64 hex digits (colons allowed, as `openssl` prints them).
    fn from_str(s: &str) -> Result<Self, CertError> {
        let hex: Vec<u8> = s.bytes().filter(|b| *b != b':').collect();
        let bad = || {
            CertError::Parse(format!(
                "{s:?} is not a SHA-256 fingerprint (64 hex digits)"
            ))
        };
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| bad())?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Parses the first certificate of a PEM text.
pub fn inspect_pem(pem: &str) -> Result<CertInfo, CertError> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| CertError::Parse("no PEM CERTIFICATE block found".into()))?;
    inspect_der(der.as_ref())
}

/// Parses a DER certificate.
pub fn inspect_der(der: &[u8]) -> Result<CertInfo, CertError> {
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| CertError::Parse(format!("not an X.509 certificate: {e}")))?;
    let mut identity = None;
    let mut dns_names = Vec::new();
    let mut ips = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::URI(uri) if identity.is_none() => {
                    identity = Some(Identity::from_uri(uri)?);
                }
                GeneralName::DNSName(n) => dns_names.push(n.to_string()),
                GeneralName::IPAddress(b) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                        ips.push(v4.into());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                        ips.push(v6.into());
                    }
                }
                _ => {}
            }
        }
    }
    let public_key = cert.public_key().subject_public_key.data.to_vec();
    Ok(CertInfo {
        identity,
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        is_ca: cert.is_ca(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        fingerprint: Fingerprint::of(der),
        key_fingerprint: Fingerprint::of(cert.public_key().raw),
        public_key,
        dns_names,
        ips,
    })
}

/// Formats seconds since the Unix epoch as an RFC 3339 UTC date.
pub fn format_time(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{unix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(inspect_pem("hello").is_err());
        assert!(inspect_der(&[0x30, 0x82, 0xff]).is_err());
        assert!(inspect_der(&[]).is_err());
    }

    #[test]
    fn fingerprint_is_hex_and_parses_back() {
        let f = Fingerprint::of(b"");
        assert_eq!(f.to_string().len(), 64);
        assert_eq!(f.to_string().parse::<Fingerprint>().unwrap(), f);
        assert!("abc".parse::<Fingerprint>().is_err());
        assert!("zz".repeat(32).parse::<Fingerprint>().is_err());
    }
}
