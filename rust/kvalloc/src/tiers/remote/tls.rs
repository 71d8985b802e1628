//! TLS settings: the crypto provider, and the CA and client files a `rediss://` URL uses.

use std::path::Path;

use super::{bad, redact, RemoteConfig};
use crate::error::Error;

/// Makes aws-lc-rs rustls's process-wide crypto provider unless one is installed already (the
/// redis crate asks rustls for the default, and rustls panics where it cannot pick one: two
/// providers linked into one program).
pub(super) fn install_tls_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Refuses TLS files with a plain `redis://` URL: the user asked for TLS and would not get it.
pub(super) fn tls_settings_need_tls(cfg: &RemoteConfig) -> Result<(), Error> {
    let given = [
        ("tls_ca", &cfg.tls_ca),
        ("tls_cert", &cfg.tls_cert),
        ("tls_key", &cfg.tls_key),
    ];
    match given.iter().find(|(_, p)| p.is_some()) {
        Some((what, _)) => Err(bad(
            what,
            format!(
                "TLS settings need a rediss:// URL, not {}",
                redact(&cfg.url)
            ),
        )),
        None => Ok(()),
    }
}

/// The CA and client files of `cfg`, read and checked to hold PEM items.
pub(super) fn tls_certificates(cfg: &RemoteConfig) -> Result<redis::TlsCertificates, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |what: &str, path: &Path| {
        std::fs::read(path).map_err(|e| bad(what, format!("{}: {e}", path.display())))
    };
    let certs = |what: &str, path: &Path| {
        let pem = read(what, path)?;
        let n = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(what, format!("{}: {e}", path.display())))?
            .len();
        if n == 0 {
            return Err(bad(
                what,
                format!("{}: no PEM certificate in it", path.display()),
            ));
        }
        Ok(pem)
    };
    let root_cert = match &cfg.tls_ca {
        Some(p) => Some(certs("tls_ca", p)?),
        None => None,
    };
    let client_tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => {
            let client_key = read("tls_key", key)?;
            let client_cert = certs("tls_cert", cert)?;
            // Loading the pair now reports a key that is not the certificate's at open, not at
            // each connection; it also does the crypto library's one-time set-up (tens of ms)
            // here rather than within the first call's deadline.
            let der = PrivateKeyDer::from_pem_slice(&client_key)
                .map_err(|e| bad("tls_key", format!("{}: {e}", key.display())))?;
            let chain = CertificateDer::pem_slice_iter(&client_cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad("tls_cert", e.to_string()))?;
            rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_client_auth_cert(chain, der)
                .map_err(|e| bad("tls_key", format!("{}: {e}", key.display())))?;
            Some(redis::ClientTlsConfig {
                client_cert,
                client_key,
            })
        }
        (None, None) => None,
        (Some(_), None) => return Err(bad("tls_key", "tls_cert needs its key".into())),
        (None, Some(_)) => return Err(bad("tls_cert", "tls_key needs its certificate".into())),
    };
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert,
    })
}
