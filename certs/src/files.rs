//! Reading and writing PEM files with clear errors and safe permissions.
//!
//! Private keys are written with mode 0600 and never overwrite an existing file unless the
//! caller asks to.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::CertError;

/// Reads a text file, naming it and what it should hold in any error.
pub fn read_text(path: &Path, what: &'static str) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        what,
        source,
    })
}

/// Writes a private key with mode 0600. Refuses to replace an existing file unless
/// `overwrite`.
pub fn write_private(path: &Path, pem: &str, overwrite: bool) -> Result<(), CertError> {
    write_with_mode(path, pem, 0o600, overwrite)
}

/// Writes a certificate or CSR with mode 0644.
pub fn write_public(path: &Path, pem: &str, overwrite: bool) -> Result<(), CertError> {
    write_with_mode(path, pem, 0o644, overwrite)
}

fn write_with_mode(path: &Path, pem: &str, mode: u32, overwrite: bool) -> Result<(), CertError> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| CertError::Write {
        path: PathBuf::from(path),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut opts = OpenOptions::new();
    opts.write(true).mode(mode);
    if overwrite {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut file = opts.open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists(path.to_path_buf())
        } else {
            err(source)
        }
    })?;
    // `mode` applies only to new files: tighten an existing one too.
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    file.write_all(pem.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)
}

/// Checks that a certificate (PEM) and a private key (PEM) belong together.
pub fn check_key_matches(cert_pem: &str, key_pem: &str) -> Result<(), CertError> {
    use rcgen::PublicKeyData;
    let info = crate::inspect::inspect_pem(cert_pem)?;
    let key = rcgen::KeyPair::from_pem(key_pem)
        .map_err(|e| CertError::Parse(format!("not a PEM private key: {e}")))?;
    if info.public_key != key.der_bytes() {
        return Err(CertError::KeyMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_are_private_and_not_clobbered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/key.pem");
        write_private(&path, "k", false).expect("write");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(
            write_private(&path, "k2", false),
            Err(CertError::Exists(_))
        ));
        assert_eq!(read_text(&path, "key").expect("read"), "k");
        let err = read_text(&dir.path().join("missing"), "CA certificate").unwrap_err();
        assert!(err.to_string().contains("CA certificate"), "{err}");
    }
}
