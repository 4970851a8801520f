//! TLS on rustls: the server's certificate and key (`--tls-cert`/`--tls-key`), and HTTP
//! clients that trust an extra CA (`--ca-cert`). The listener that handshakes is the
//! server's (`server::conn::tls`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};

/// Why TLS could not be set up; every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file (certificate, key, CA certificate).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file holds no usable PEM item of the expected kind.
    #[error("{path} holds no {what} in PEM form")]
    Empty {
        /// What was expected.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The file's PEM could not be decoded.
    #[error("{path} is not valid PEM: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// The decoder's complaint.
        reason: String,
    },
    /// rustls refused the certificate and key (e.g. a key that does not match).
    #[error("the certificate {cert} and key {key} do not make a TLS configuration: {source}")]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// The cause.
        source: rustls::Error,
    },
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Every certificate in a PEM file.
pub fn load_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The server side: a certificate chain and its private key, both PEM.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = load_certificates("certificate", cert)?;
    let key_bytes = read("private key", key)?;
    let private = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::Empty {
            what: "private key",
            path: key.to_path_buf(),
        },
        other => TlsError::Pem {
            path: key.to_path_buf(),
            reason: other.to_string(),
        },
    })?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain, private))
            .map_err(|source| TlsError::Config {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                source,
            })?;
    // HTTP/1.1 only: the server's timeouts and connection cap are HTTP/1's.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The CA certificates of a PEM file, for [`http_client`].
pub fn load_ca(path: &Path) -> Result<Vec<reqwest::Certificate>, TlsError> {
    load_certificates("CA certificate", path)?
        .iter()
        .map(|der| {
            reqwest::Certificate::from_der(der).map_err(|e| TlsError::Pem {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Makes rustls's `ring` provider the process default, once. reqwest is built without a
/// provider of its own (one crypto back-end in the binary, and the faster one to build), so
/// this must run before any `reqwest::Client` is built; every client constructor here calls
/// it, and code that builds its own `reqwest::Client` calls it first.
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Another library may have installed one already; that one serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A plain HTTP client with the crypto provider installed (see [`install_crypto_provider`]):
/// it does not ask for gzip, so what it reads is what is on the wire.
pub fn plain_client() -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::builder()
        .no_gzip()
        .build()
        .expect("a plain client always builds")
}

/// How long a connection may take to open: a server that does not accept within it counts
/// as down, and a client with several servers moves to the next one.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The HTTP client every bootsync client builds on: bounded connects, and `extra_roots`
/// trusted beside the system's roots.
pub fn http_client(
    extra_roots: &[reqwest::Certificate],
    builder: reqwest::ClientBuilder,
) -> Result<reqwest::Client, reqwest::Error> {
    install_crypto_provider();
    builder
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(same_origin_redirects())
        .tls_certs_merge(extra_roots.iter().cloned())
        .build()
}

/// Follows a redirect only to the origin (scheme, host, port) first asked, at most 5 times:
/// a redirect elsewhere would carry the node secret and the registration to a host the
/// operator never named.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let origin = |url: &reqwest::Url| {
            (
                url.scheme().to_string(),
                url.host_str().map(str::to_string),
                url.port_or_known_default(),
            )
        };
        let same = attempt
            .previous()
            .first()
            .is_some_and(|first| origin(first) == origin(attempt.url()));
        if !same {
            let refused = format!(
                "a redirect to another origin ({}) was refused",
                attempt.url()
            );
            attempt.error(refused)
        } else if attempt.previous().len() > 5 {
            attempt.error("more than 5 redirects")
        } else {
            attempt.follow()
        }
    })
}
