//! The viewer's file configuration (TOML), kept apart from the runtime [`crate::Config`].
//!
//! Holds what stays the same between runs (rendezvous, identity); what to watch and where
//! to write it come from the command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use peercam_certs::Role;
use peercam_common::net::RendezvousAddr;
use peercam_common::tls::{Credentials, TlsError, Trust};
use peercam_common::CameraId;
use serde::Deserialize;

/// The TOML file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Rendezvous server as `host:port`.
    pub rendezvous: Option<String>,
    /// The deployment CA certificate.
    pub ca: Option<PathBuf>,
    /// This viewer's certificate.
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
    /// Local UDP address (default `0.0.0.0:0`).
    pub bind: Option<SocketAddr>,
}

/// Errors in the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed.
    #[error(transparent)]
    File(#[from] peercam_common::config::FileError),
    /// A required setting is missing.
    #[error("no {0} given: set it in the config file or pass --{0}")]
    Missing(&'static str),
    /// A bad rendezvous address.
    #[error(transparent)]
    Addr(#[from] peercam_common::net::AddrError),
    /// Certificates could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl FileConfig {
    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Ok(peercam_common::config::load(path)?)
    }

    /// Loads the identity and the rendezvous address.
    pub fn identity(&self) -> Result<(Credentials, Trust, RendezvousAddr), ConfigError> {
        let ca = self.ca.as_ref().ok_or(ConfigError::Missing("ca"))?;
        let cert = self.cert.as_ref().ok_or(ConfigError::Missing("cert"))?;
        let key = self.key.as_ref().ok_or(ConfigError::Missing("key"))?;
        let rendezvous = self
            .rendezvous
            .as_deref()
            .ok_or(ConfigError::Missing("rendezvous"))?;
        Ok((
            Credentials::load(cert, key, Role::Viewer)?,
            Trust::load(ca)?,
            RendezvousAddr::parse(rendezvous)?,
        ))
    }

    /// Loads certificates and builds a runtime configuration for watching `camera`.
    pub fn resolve(&self, camera: CameraId) -> Result<crate::Config, ConfigError> {
        let (creds, trust, rendezvous) = self.identity()?;
        let mut config = crate::Config::new(creds, trust, rendezvous, camera);
        if let Some(bind) = self.bind {
            config.bind = bind;
        }
        Ok(config)
    }
}
