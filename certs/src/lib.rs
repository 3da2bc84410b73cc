//! peercam's certificates: the deployment CA, leaf certificates for rendezvous servers,
//! cameras and viewers, CSRs for keys that never leave a device, and reading back what a
//! certificate says.
//!
//! This crate is a leaf: it knows X.509 and PEM, not QUIC or the wire protocol. The
//! identity format (`peercam://<role>/<id>` in a URI SAN) is defined here and nowhere else.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod ca;
pub mod files;
pub mod identity;
pub mod inspect;

use std::path::PathBuf;

pub use ca::{make_csr, Ca, Issued, LeafSpec};
pub use identity::{validate_id, Identity, Role};
pub use inspect::{inspect_der, inspect_pem, CertInfo, Fingerprint};

/// Everything that can go wrong with certificates and their files.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read.
    #[error("cannot read {what} from {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What it should have held.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Refused to overwrite an existing file.
    #[error("{} already exists: move it away or pass --force to replace it", .0.display())]
    Exists(PathBuf),
    /// Input was not the expected PEM/DER/X.509 structure.
    #[error("{0}")]
    Parse(String),
    /// Not one of the three roles.
    #[error("unknown role {0:?}: use rendezvous, camera or viewer")]
    BadRole(String),
    /// An ID that breaks the ID rules.
    #[error("invalid ID {0:?}: use 1-64 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit")]
    BadId(String),
    /// A certificate without a peercam identity where one was needed.
    #[error("certificate names no peercam identity: {0}")]
    NoIdentity(String),
    /// Certificate and key do not belong together.
    #[error("the private key does not match the certificate: check that both files come from the same `certs issue` run")]
    KeyMismatch,
    /// A CA operation on a certificate that is not a CA.
    #[error("this certificate is not a CA certificate: pass the ca.pem made by `certs ca`")]
    NotCa,
    /// A CSR asked for a different identity than the operator gave.
    #[error(
        "the CSR asks for {asked} but you are signing it as {given}: check the --id and --role"
    )]
    CsrMismatch {
        /// What the CSR asked for.
        asked: String,
        /// What the operator asked to issue.
        given: String,
    },
    /// DNS names or IPs requested on a camera or viewer certificate.
    #[error("DNS names and IP addresses belong only on rendezvous certificates")]
    NamesOnlyForRendezvous,
    /// `not_after` is not after `not_before`.
    #[error("the certificate would expire before it becomes valid")]
    BadValidity,
    /// The system random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// rcgen refused to build the certificate.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}
