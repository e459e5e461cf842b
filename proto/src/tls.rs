//! PEM files into tonic's TLS configurations, for every end of a connection:
//! the gateway's public port and the workers' port ([`ServerTlsArgs`]), the
//! gateway's calls to workers and the command-line clients
//! ([`client_config`]). It lives here, next to the contract, so that the
//! gateway, the worker and the clients share it without depending on each
//! other.
//!
//! Everything is read and checked when a process starts, so that a wrong
//! path or a key that does not match its certificate stops it with an error
//! naming the flag and the file, not at the first handshake. Nothing here
//! opens a connection or decides which connections use TLS beyond
//! [`dial_uri`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// A client that opens a connection and never finishes the handshake
/// would otherwise hold it (and a task) forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--{flag} {}: cannot read the file: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file was read but does not hold what the flag needs.
    #[error("--{flag} {}: {reason}", path.display())]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// A flag that is meaningless without another one.
    #[error("--{flag} needs --{needs}")]
    Needs {
        flag: &'static str,
        needs: &'static str,
    },
    /// Each file parsed, but rustls refused them together (say, a key that
    /// does not belong to the certificate).
    #[error("{files}: {reason}")]
    Rejected { files: String, reason: String },
    /// The address does not fit the TLS setting.
    #[error("{address}: {reason}")]
    Address { address: String, reason: String },
}

/// TLS for a server's port: its certificate and key, and optionally the CA
/// that client certificates must be signed by.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsArgs {
    /// PEM certificate chain this server presents; turns TLS on for its port
    /// (plaintext clients are then refused). Needs --tls-key.
    #[arg(long, env = "AQUILA_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "AQUILA_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s): clients must present a certificate signed by
    /// one of them (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "AQUILA_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServerTlsArgs {
    /// The server's TLS configuration, `None` for plaintext. Reads every
    /// file and has rustls check that key and certificate belong together.
    pub fn load(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        let Some(identity) = identity(
            ("tls-cert", self.tls_cert.as_deref()),
            ("tls-key", self.tls_key.as_deref()),
        )?
        else {
            if self.tls_client_ca.is_some() {
                return Err(TlsError::Needs {
                    flag: "tls-client-ca",
                    needs: "tls-cert",
                });
            }
            return Ok(None);
        };
        let mut config = ServerTlsConfig::new()
            .identity(identity)
            .timeout(HANDSHAKE_TIMEOUT);
        if let Some(path) = &self.tls_client_ca {
            config = config.client_ca_root(certificates("tls-client-ca", path)?);
        }
        // Builds the acceptor once now so that its errors come at start-up.
        tonic::transport::Server::builder()
            .tls_config(config.clone())
            .map_err(|e| TlsError::Rejected {
                files: self.describe(),
                reason: chain(&e),
            })?;
        Ok(Some(config))
    }

    fn describe(&self) -> String {
        [
            ("tls-cert", &self.tls_cert),
            ("tls-key", &self.tls_key),
            ("tls-client-ca", &self.tls_client_ca),
        ]
        .iter()
        .filter_map(|(flag, path)| path.as_ref().map(|p| format!("--{flag} {}", p.display())))
        .collect::<Vec<_>>()
        .join(", ")
    }
}

/// TLS for a command-line client of the gateway (`aquila generate`, `chat`,
/// `bench`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsArgs {
    /// PEM CA certificate that signed the gateway's certificate; turns TLS on
    /// (an http:// gateway address is then dialed as https://).
    #[arg(long, env = "AQUILA_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a gateway that requires one
    /// (--tls-client-ca there). Needs --tls-key and --tls-ca.
    #[arg(long, env = "AQUILA_CLIENT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "AQUILA_CLIENT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The endpoint for `address` ("host:port", http:// or https://),
    /// with TLS when --tls-ca is given (see [`dial_uri`]). Connects nothing.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, TlsError> {
        let config = match &self.tls_ca {
            None => {
                for (flag, set) in [
                    ("tls-cert", self.tls_cert.is_some()),
                    ("tls-key", self.tls_key.is_some()),
                ] {
                    if set {
                        return Err(TlsError::Needs {
                            flag,
                            needs: "tls-ca",
                        });
                    }
                }
                None
            }
            Some(ca) => Some(client_config(ClientTlsFiles {
                ca: ("tls-ca", ca),
                cert: ("tls-cert", self.tls_cert.as_deref()),
                key: ("tls-key", self.tls_key.as_deref()),
                domain: None,
            })?),
        };
        let uri = dial_uri(address, config.is_some())?;
        let bad = |e: tonic::transport::Error| TlsError::Address {
            address: address.to_owned(),
            reason: chain(&e),
        };
        let endpoint = Endpoint::from_shared(uri).map_err(bad)?;
        match config {
            None => Ok(endpoint),
            Some(config) => endpoint.tls_config(config).map_err(bad),
        }
    }
}

/// What a TLS client trusts and, for mutual TLS, presents: each a flag name
/// (for errors) and a file.
#[derive(Debug, Clone, Copy)]
pub struct ClientTlsFiles<'a> {
    pub ca: (&'static str, &'a Path),
    pub cert: (&'static str, Option<&'a Path>),
    pub key: (&'static str, Option<&'a Path>),
    /// Name to verify in the server's certificate instead of the host dialed.
    pub domain: Option<&'a str>,
}

/// A client TLS configuration trusting only the CA file's certificates;
/// checked by building a connector for a placeholder address.
pub fn client_config(files: ClientTlsFiles<'_>) -> Result<ClientTlsConfig, TlsError> {
    let (ca_flag, ca_path) = files.ca;
    let mut config = ClientTlsConfig::new()
        .ca_certificate(certificates(ca_flag, ca_path)?)
        .timeout(HANDSHAKE_TIMEOUT);
    if let Some(identity) = identity(files.cert, files.key)? {
        config = config.identity(identity);
    }
    if let Some(domain) = files.domain {
        config = config.domain_name(domain);
    }
    Endpoint::from_static("https://localhost")
        .tls_config(config.clone())
        .map_err(|e| {
            let mut shown = vec![format!("--{ca_flag} {}", ca_path.display())];
            for (flag, path) in [files.cert, files.key] {
                if let Some(p) = path {
                    shown.push(format!("--{flag} {}", p.display()));
                }
            }
            TlsError::Rejected {
                files: shown.join(", "),
                reason: chain(&e),
            }
        })?;
    Ok(config)
}

/// The URI to dial: TLS is on exactly when a CA to trust is configured, so
/// an `http://` address is dialed as `https://` then (tonic would otherwise
/// send plaintext), and an `https://` address without a CA is refused
/// rather than dialed in plaintext or against unknown roots.
pub fn dial_uri(address: &str, tls: bool) -> Result<String, TlsError> {
    let refuse = |reason: &str| TlsError::Address {
        address: address.to_owned(),
        reason: reason.to_owned(),
    };
    match (address.split_once("://"), tls) {
        (Some(("http", rest)), true) => Ok(format!("https://{rest}")),
        (Some(("https", _)), false) => Err(refuse(
            "https:// needs the CA that signed the server's certificate (a --*tls-ca flag)",
        )),
        (Some(("http" | "https", _)), _) => Ok(address.to_owned()),
        (Some(_), _) => Err(refuse("the scheme must be http:// or https://")),
        (None, true) => Ok(format!("https://{address}")),
        (None, false) => Ok(format!("http://{address}")),
    }
}

/// Both files or neither; a lone one is an error naming the missing flag.
fn identity(
    cert: (&'static str, Option<&Path>),
    key: (&'static str, Option<&Path>),
) -> Result<Option<Identity>, TlsError> {
    match (cert, key) {
        ((_, None), (_, None)) => Ok(None),
        ((cert_flag, Some(_)), (key_flag, None)) => Err(TlsError::Needs {
            flag: cert_flag,
            needs: key_flag,
        }),
        ((cert_flag, None), (key_flag, Some(_))) => Err(TlsError::Needs {
            flag: key_flag,
            needs: cert_flag,
        }),
        ((cert_flag, Some(cert_path)), (key_flag, Some(key_path))) => {
            let cert = certificates(cert_flag, cert_path)?;
            let key = read(key_flag, key_path)?;
            if let Err(e) = PrivateKeyDer::from_pem_slice(&key) {
                return Err(TlsError::Invalid {
                    flag: key_flag,
                    path: key_path.to_owned(),
                    reason: format!("no PEM private key: {e}"),
                });
            }
            Ok(Some(Identity::from_pem(cert.into_inner(), key)))
        }
    }
}

/// A PEM file holding at least one certificate, every one of them parsable.
fn certificates(flag: &'static str, path: &Path) -> Result<Certificate, TlsError> {
    let pem = read(flag, path)?;
    let invalid = |reason: String| TlsError::Invalid {
        flag,
        path: path.to_owned(),
        reason,
    };
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.map_err(|e| invalid(format!("not a PEM certificate: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(invalid("holds no PEM certificate".into()));
    }
    Ok(Certificate::from_pem(pem))
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

/// tonic's transport error says only "transport error"; the reason is in
/// its sources.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_becomes_https_only_with_tls() {
        assert_eq!(dial_uri("w:1", false).unwrap(), "http://w:1");
        assert_eq!(dial_uri("w:1", true).unwrap(), "https://w:1");
        assert_eq!(dial_uri("http://w:1", true).unwrap(), "https://w:1");
        assert_eq!(dial_uri("https://w:1", true).unwrap(), "https://w:1");
        let text = dial_uri("https://w:1", false).unwrap_err().to_string();
        assert!(text.starts_with("https://w:1: "), "{text}");
        assert!(dial_uri("ftp://w:1", true).is_err());
    }

    #[test]
    fn missing_file_names_flag_and_path() {
        let args = ServerTlsArgs {
            tls_cert: Some("/nonexistent/cert.pem".into()),
            tls_key: Some("/nonexistent/key.pem".into()),
            tls_client_ca: None,
        };
        let text = args.load().unwrap_err().to_string();
        assert!(
            text.starts_with("--tls-cert /nonexistent/cert.pem: cannot read"),
            "{text}"
        );
    }

    #[test]
    fn lone_flags_name_the_missing_one() {
        let args = ServerTlsArgs {
            tls_cert: Some("c.pem".into()),
            ..Default::default()
        };
        assert_eq!(
            args.load().unwrap_err().to_string(),
            "--tls-cert needs --tls-key"
        );
        let args = ServerTlsArgs {
            tls_client_ca: Some("ca.pem".into()),
            ..Default::default()
        };
        assert_eq!(
            args.load().unwrap_err().to_string(),
            "--tls-client-ca needs --tls-cert"
        );
        assert!(ServerTlsArgs::default().load().unwrap().is_none());
    }

    #[test]
    fn a_file_without_certificates_is_refused() {
        let dir = std::env::temp_dir().join(format!("aquila-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("empty.pem");
        std::fs::write(&path, "not pem\n").unwrap();
        let files = ClientTlsFiles {
            ca: ("tls-ca", &path),
            cert: ("tls-cert", None),
            key: ("tls-key", None),
            domain: None,
        };
        let text = client_config(files).unwrap_err().to_string();
        assert!(
            text.contains("--tls-ca ") && text.ends_with("holds no PEM certificate"),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
