//! Who a certificate names: its role (rendezvous, camera, viewer) and its ID.
//!
//! This module owns the one place where an identity is written into and read out of an
//! X.509 certificate (a URI SAN `peercam://<role>/<id>`). It does not verify chains or
//! signatures: that is rustls' job at handshake time.

use std::fmt;
use std::str::FromStr;

use crate::CertError;

/// URI scheme carried in every peercam leaf certificate.
pub const URI_SCHEME: &str = "peercam://";

/// Longest ID accepted, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// The part a certificate's holder plays in a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A rendezvous server (cloud).
    Rendezvous,
    /// A camera running camera-agent.
    Camera,
    /// A viewer on a PC.
    Viewer,
}

impl Role {
    /// The role's name as written in certificates and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Rendezvous => "rendezvous",
            Role::Camera => "camera",
            Role::Viewer => "viewer",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = CertError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rendezvous" => Ok(Role::Rendezvous),
            "camera" => Ok(Role::Camera),
            "viewer" => Ok(Role::Viewer),
            other => Err(CertError::BadRole(other.to_string())),
        }
    }
}

/// Checks that `id` is a valid peercam ID: 1–64 bytes of lowercase ASCII letters, digits,
/// `-`, `_` and `.`, starting with a letter or digit.
pub fn validate_id(id: &str) -> Result<(), CertError> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
    let starts_ok = id
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if id.is_empty() || id.len() > MAX_ID_LEN || !starts_ok || !id.chars().all(ok_char) {
        return Err(CertError::BadId(id.chars().take(80).collect()));
    }
    Ok(())
}

/// A role and an ID, as carried by a certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// What the holder is.
    pub role: Role,
    /// Its ID within that role.
    pub id: String,
}

impl Identity {
    /// Builds an identity after validating the ID.
    pub fn new(role: Role, id: &str) -> Result<Self, CertError> {
        validate_id(id)?;
        Ok(Identity {
            role,
            id: id.to_string(),
        })
    }

    /// The URI SAN that names this identity, e.g. `peercam://camera/cam-7`.
    pub fn uri(&self) -> String {
        format!("{URI_SCHEME}{}/{}", self.role, self.id)
    }

    /// Parses a URI SAN of the form `peercam://<role>/<id>`.
    pub fn from_uri(uri: &str) -> Result<Self, CertError> {
        let rest = uri
            .strip_prefix(URI_SCHEME)
            .ok_or_else(|| CertError::NoIdentity(format!("URI {uri:?} is not a peercam URI")))?;
        let (role, id) = rest
            .split_once('/')
            .ok_or_else(|| CertError::NoIdentity(format!("URI {uri:?} has no ID")))?;
        Identity::new(role.parse()?, id)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trip() {
        let id = Identity::new(Role::Camera, "cam-7").expect("valid");
        assert_eq!(id.uri(), "peercam://camera/cam-7");
        assert_eq!(Identity::from_uri(&id.uri()).expect("parses"), id);
    }

    #[test]
    fn bad_ids_are_refused() {
        for bad in ["", "-x", "Cam", "a/b", "a b", &"x".repeat(65), "é"] {
            assert!(validate_id(bad).is_err(), "{bad:?} must be refused");
        }
        for good in ["a", "cam-7", "0.viewer_x", &"x".repeat(64)] {
            assert!(validate_id(good).is_ok(), "{good:?} must be accepted");
        }
    }

    #[test]
    fn bad_uris_are_refused() {
        for bad in [
            "https://camera/x",
            "peercam://camera",
            "peercam://king/x",
            "peercam://camera/",
            "peercam://camera/a/b",
        ] {
            assert!(Identity::from_uri(bad).is_err(), "{bad:?} must be refused");
        }
    }
}
