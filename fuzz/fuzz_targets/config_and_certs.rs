//! Operator input: the three TOML config files, and certificates/CSRs in PEM and DER.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let p = Path::new("fuzz.toml");
        let _ = peercam_rendezvous::config::FileConfig::parse(text, p);
        let _ = peercam_camera_agent::config::FileConfig::parse(text, p);
        let _: Result<peercam_viewer::config::FileConfig, _> = toml::from_str(text);
        let _ = peercam_certs::inspect_pem(text);
        let _ = peercam_certs::ca::csr_identity_pem(text);
        let _ = peercam_certs::Identity::from_uri(text);
        let _ = text.parse::<peercam_certs::Fingerprint>();
    }
    let _ = peercam_certs::inspect_der(data);
});
