//! camera-agent's file configuration (TOML), kept apart from the runtime [`Config`].
//!
//! Flags and environment variables override the file (see `main.rs`);
//! [`FileConfig::resolve`] loads certificates, resolves rendezvous names and names the file
//! and setting of anything wrong.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use peercam_certs::Role;
use peercam_common::tls::{Credentials, DenyList, TlsError, Trust};
use peercam_common::ViewerId;
use serde::Deserialize;

use crate::{Config, RendezvousAddr, SourceSpec};

/// The TOML file, as written by an installer.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Local UDP address (default `0.0.0.0:0`).
    pub bind: Option<SocketAddr>,
    /// Rendezvous servers as `host:port`, tried in order.
    #[serde(default)]
    pub rendezvous: Vec<String>,
    /// The deployment CA certificate.
    pub ca: Option<PathBuf>,
    /// This camera's certificate.
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
    /// Viewer IDs allowed to watch.
    #[serde(default)]
    pub access: Vec<String>,
    /// `stdin`, `file:PATH` or a path to an Annex B file.
    pub source: Option<String>,
    /// Loop a file source.
    #[serde(rename = "loop")]
    pub looped: Option<bool>,
    /// Frame rate of a file source (default: from the stream, else 25).
    pub fps: Option<f64>,
    /// Most viewers at once.
    pub max_viewers: Option<usize>,
    /// Latency budget in milliseconds.
    pub latency_budget_ms: Option<u64>,
    /// Send parity datagrams on lossy links (default on; see `Config::fec`).
    pub fec: Option<bool>,
    /// Revoked identities, as `role/id` (e.g. `viewer/mallory`).
    #[serde(default)]
    pub revoked_ids: Vec<String>,
    /// Revoked certificates, as SHA-256 fingerprints (`certs inspect` prints them).
    #[serde(default)]
    pub revoked_certs: Vec<String>,
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
    /// A setting has a bad value.
    #[error("bad {setting} {value:?}: {why}")]
    Bad {
        /// The setting.
        setting: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        why: String,
    },
    /// Certificates could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl FileConfig {
    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Ok(peercam_common::config::load(path)?)
    }

    /// Parses TOML text (`path` only names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Ok(peercam_common::config::parse(text, path)?)
    }

    /// Loads the camera's identity (with the deny list) and its rendezvous list: enough
    /// for netcheck, and the first half of [`FileConfig::resolve`].
    pub fn identity(&self) -> Result<(Credentials, Trust, Vec<RendezvousAddr>), ConfigError> {
        let ca = self.ca.as_ref().ok_or(ConfigError::Missing("ca"))?;
        let cert = self.cert.as_ref().ok_or(ConfigError::Missing("cert"))?;
        let key = self.key.as_ref().ok_or(ConfigError::Missing("key"))?;
        if self.rendezvous.is_empty() {
            return Err(ConfigError::Missing("rendezvous"));
        }
        let rendezvous = self
            .rendezvous
            .iter()
            .map(|r| parse_rendezvous(r))
            .collect::<Result<Vec<_>, _>>()?;
        let trust = Trust::load(ca)?
            .with_deny_list(DenyList::parse(&self.revoked_ids, &self.revoked_certs)?);
        Ok((
            Credentials::load(cert, key, Role::Camera)?,
            trust,
            rendezvous,
        ))
    }

    /// The access list, validated.
    pub fn access_list(&self) -> Result<Vec<ViewerId>, ConfigError> {
        self.access
            .iter()
            .map(|v| {
                ViewerId::new(v).map_err(|e| ConfigError::Bad {
                    setting: "access",
                    value: v.clone(),
                    why: e.to_string(),
                })
            })
            .collect()
    }

    /// Loads certificates, resolves addresses, builds the runtime configuration.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let (credentials, trust, rendezvous) = self.identity()?;
        let source = parse_source(
            self.source
                .as_deref()
                .ok_or(ConfigError::Missing("source"))?,
            self.looped.unwrap_or(true),
            self.fps,
        )?;
        let mut config = Config::new(credentials, trust, rendezvous, source);
        config.access = self.access_list()?;
        if let Some(bind) = self.bind {
            config.bind = bind;
        }
        if let Some(n) = self.max_viewers {
            config.max_viewers = n;
        }
        if let Some(ms) = self.latency_budget_ms {
            config.latency_budget = Duration::from_millis(ms.max(50));
        }
        if let Some(fec) = self.fec {
            config.fec = fec;
        }
        Ok(config)
    }
}

/// Parses `host:port` into an address and the name its certificate must carry.
pub fn parse_rendezvous(s: &str) -> Result<RendezvousAddr, ConfigError> {
    RendezvousAddr::parse(s).map_err(|e| ConfigError::Bad {
        setting: "rendezvous",
        value: e.value,
        why: e.why,
    })
}

/// Parses a source: `stdin`, `-`, `exec:COMMAND`, `file:PATH` or `PATH`.
pub fn parse_source(s: &str, looped: bool, fps: Option<f64>) -> Result<SourceSpec, ConfigError> {
    if let Some(f) = fps.filter(|f| !(f.is_finite() && *f > 0.0 && *f <= 1000.0)) {
        return Err(ConfigError::Bad {
            setting: "fps",
            value: f.to_string(),
            why: "must be between 0 and 1000".into(),
        });
    }
    if let Some(command) = s.strip_prefix("exec:") {
        if command.trim().is_empty() {
            return Err(ConfigError::Bad {
                setting: "source",
                value: s.to_string(),
                why: "exec: needs a command, e.g. exec:libcamera-vid -t 0 --inline -o -".into(),
            });
        }
        return Ok(SourceSpec::Exec(command.to_string()));
    }
    if s.starts_with("rtsp://") {
        crate::rtsp::parse(s).map_err(|e| ConfigError::Bad {
            setting: "source",
            value: peercam_common::config::redact_url(s),
            why: e.to_string(),
        })?;
        return Ok(SourceSpec::Rtsp(s.to_string()));
    }
    match s {
        "stdin" | "-" => Ok(SourceSpec::Stdin),
        _ if s.contains("://") => Err(ConfigError::Bad {
            setting: "source",
            value: s.to_string(),
            why: "URL sources are not supported yet: use a file, exec:COMMAND, or pipe into stdin"
                .into(),
        }),
        _ => Ok(SourceSpec::File {
            path: PathBuf::from(s.strip_prefix("file:").unwrap_or(s)),
            looped,
            fps,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_named() {
        let err = FileConfig::parse("access = [\"a\"]\nsorce = \"x\"\n", Path::new("cam.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cam.toml") && err.contains("line 2") && err.contains("sorce"),
            "{err}"
        );
        let err = parse_rendezvous("nohost").unwrap_err().to_string();
        assert!(err.contains("host:port"), "{err}");
        assert!(parse_source("x.h264", true, Some(-1.0)).is_err());
        assert_eq!(parse_source("-", true, None).unwrap(), SourceSpec::Stdin);
    }
}
