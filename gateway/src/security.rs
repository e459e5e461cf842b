//! The gateway's security settings: TLS on its public port (optionally
//! requiring client certificates), API keys for `aquila.v1.Generation`,
//! (mutual) TLS to the workers, and the limits a client cannot raise (the
//! size of one request, streams per connection).
//!
//! [`SecurityArgs`] are the flags; [`SecurityArgs::into_config`] reads every
//! file once at start-up. [`ApiKeyCheck`] guards the Generation service only:
//! health and reflection stay open, because Kubernetes' native gRPC probes
//! cannot send headers. Nothing here logs a key or puts one in an error.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use aquila_proto::tls::{self, ClientTlsFiles, ServerTlsArgs};
use tonic::service::Interceptor;
use tonic::transport::{ClientTlsConfig, Endpoint, ServerTlsConfig};
use tonic::{Request, Status};

use crate::config::config_error;
use crate::error::GatewayError;

/// tonic's own default for received messages.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Above what one client needs (the load generator opens a connection per
/// 64 streams); hyper's default is 200.
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 256;

#[derive(Debug, Clone, clap::Args)]
pub struct SecurityArgs {
    #[command(flatten)]
    pub tls: ServerTlsArgs,

    /// File of API keys, one per line (blank lines and lines starting with
    /// '#' are skipped). With any key configured, every Generation call must
    /// send "authorization: Bearer KEY". A file keeps keys out of `ps` and
    /// can be a mounted Kubernetes Secret.
    #[arg(long, env = "AQUILA_GATEWAY_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,

    /// An API key (repeatable; the variable takes a comma-separated list);
    /// adds to --api-key-file.
    #[arg(
        long = "api-key",
        env = "AQUILA_GATEWAY_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// PEM CA certificate that signed the workers' certificates. Set, every
    /// worker is dialed with TLS, an "http://" worker address included;
    /// unset, an "https://" worker address is an error.
    #[arg(long, env = "AQUILA_GATEWAY_WORKER_TLS_CA")]
    pub worker_tls_ca: Option<PathBuf>,

    /// PEM certificate the gateway presents to workers that require client
    /// certificates. Needs --worker-tls-key and --worker-tls-ca.
    #[arg(long, env = "AQUILA_GATEWAY_WORKER_TLS_CERT")]
    pub worker_tls_cert: Option<PathBuf>,

    /// PEM private key of --worker-tls-cert.
    #[arg(long, env = "AQUILA_GATEWAY_WORKER_TLS_KEY")]
    pub worker_tls_key: Option<PathBuf>,

    /// Name every worker's certificate must hold (workers are often dialed by
    /// IP); default: the host of each worker address.
    #[arg(long, env = "AQUILA_GATEWAY_WORKER_TLS_DOMAIN")]
    pub worker_tls_domain: Option<String>,

    /// Largest request message a client may send, in bytes; a larger one is
    /// refused with OUT_OF_RANGE before it is decoded.
    #[arg(long, env = "AQUILA_GATEWAY_MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// Concurrent streams one client connection may open (HTTP/2
    /// SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "AQUILA_GATEWAY_MAX_CONCURRENT_STREAMS_PER_CONNECTION", default_value_t = DEFAULT_MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams_per_connection: u32,
}

impl Default for SecurityArgs {
    /// Plaintext, no keys, default limits.
    fn default() -> Self {
        SecurityArgs {
            tls: ServerTlsArgs::default(),
            api_key_file: None,
            api_keys: Vec::new(),
            worker_tls_ca: None,
            worker_tls_cert: None,
            worker_tls_key: None,
            worker_tls_domain: None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_concurrent_streams_per_connection: DEFAULT_MAX_CONCURRENT_STREAMS,
        }
    }
}

/// The checked security settings `run` serves with.
#[derive(Debug, Clone)]
pub struct SecurityConfig {
    /// `None`: the public port is plaintext.
    pub tls: Option<ServerTlsConfig>,
    pub api_keys: ApiKeyCheck,
    pub worker_tls: WorkerTls,
    pub max_message_bytes: usize,
    pub max_concurrent_streams: u32,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            tls: None,
            api_keys: ApiKeyCheck::default(),
            worker_tls: WorkerTls::default(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
        }
    }
}

impl SecurityArgs {
    /// Reads every certificate, key and key file; errors name the flag and
    /// the file (never a key).
    pub fn into_config(self) -> Result<SecurityConfig, GatewayError> {
        let tls = self.tls.load()?;
        let mut keys = Vec::new();
        if let Some(path) = &self.api_key_file {
            let file_keys = read_key_file(path)?;
            if file_keys.is_empty() {
                // Would silently leave the API open.
                return Err(config_error("api_key_file", path.display(), "holds no key"));
            }
            keys.extend(file_keys);
        }
        for (i, key) in self.api_keys.iter().enumerate() {
            let key = key.trim();
            check_key(key).map_err(|reason| {
                config_error("api_key", format!("(the {} given)", ordinal(i)), reason)
            })?;
            keys.push(key.as_bytes().into());
        }
        let worker_tls = match &self.worker_tls_ca {
            None => {
                for (flag, set) in [
                    ("worker-tls-cert", self.worker_tls_cert.is_some()),
                    ("worker-tls-key", self.worker_tls_key.is_some()),
                    ("worker-tls-domain", self.worker_tls_domain.is_some()),
                ] {
                    if set {
                        return Err(tls::TlsError::Needs {
                            flag,
                            needs: "worker-tls-ca",
                        }
                        .into());
                    }
                }
                WorkerTls(None)
            }
            Some(ca) => WorkerTls(Some(tls::client_config(ClientTlsFiles {
                ca: ("worker-tls-ca", ca),
                cert: ("worker-tls-cert", self.worker_tls_cert.as_deref()),
                key: ("worker-tls-key", self.worker_tls_key.as_deref()),
                domain: self.worker_tls_domain.as_deref(),
            })?)),
        };
        if self.max_message_bytes == 0 {
            return Err(config_error("max_message_bytes", 0, "must be at least 1"));
        }
        if self.max_concurrent_streams_per_connection == 0 {
            return Err(config_error(
                "max_concurrent_streams_per_connection",
                0,
                "must be at least 1",
            ));
        }
        Ok(SecurityConfig {
            tls,
            api_keys: ApiKeyCheck { keys: keys.into() },
            worker_tls,
            max_message_bytes: self.max_message_bytes,
            max_concurrent_streams: self.max_concurrent_streams_per_connection,
        })
    }
}

/// How the gateway dials its workers: `None` is plaintext.
#[derive(Clone, Default)]
pub struct WorkerTls(Option<ClientTlsConfig>);

impl std::fmt::Debug for WorkerTls {
    /// `ClientTlsConfig`'s own Debug would print the private key's bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let on = if self.0.is_some() { "on" } else { "off" };
        write!(f, "WorkerTls({on})")
    }
}

/// The endpoint for the worker at `uri` ("scheme://host:port"): TLS whenever
/// --worker-tls-ca is set, whatever the scheme says (see
/// [`tls::dial_uri`]). Connects nothing.
pub fn worker_endpoint(uri: &str, tls: &WorkerTls) -> Result<Endpoint, GatewayError> {
    let bad = |reason: String| GatewayError::Config {
        field: "worker",
        value: uri.to_owned(),
        reason,
    };
    let dialed = tls::dial_uri(uri, tls.0.is_some()).map_err(|e| bad(e.to_string()))?;
    let endpoint = Endpoint::from_shared(dialed).map_err(|e| bad(e.to_string()))?;
    match &tls.0 {
        None => Ok(endpoint),
        Some(config) => endpoint
            .tls_config(config.clone())
            .map_err(|e| bad(format!("TLS: {e}"))),
    }
}

/// Checks `authorization: Bearer KEY` on every call when keys are
/// configured; lets every call through when none is.
#[derive(Clone, Default)]
pub struct ApiKeyCheck {
    keys: Arc<[Box<[u8]>]>,
}

impl std::fmt::Debug for ApiKeyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeyCheck({} keys)", self.keys.len())
    }
}

impl ApiKeyCheck {
    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    fn check(&self, authorization: Option<&[u8]>) -> Result<(), Status> {
        if self.keys.is_empty() {
            return Ok(());
        }
        let Some(value) = authorization else {
            return Err(Status::unauthenticated(
                "missing API key: send the metadata \"authorization: Bearer <key>\"",
            ));
        };
        let Some(key) = bearer_token(value) else {
            return Err(Status::unauthenticated(
                "the authorization metadata is not of the form \"Bearer <key>\"",
            ));
        };
        // Compared with every key, without stopping at a match, each in
        // constant time for its length: the time taken tells nothing of
        // how much of a key was right.
        let matched = self.keys.iter().fold(false, |found, k| {
            found | constant_time_eq::constant_time_eq(k, key)
        });
        if matched {
            Ok(())
        } else {
            Err(Status::unauthenticated("the API key is not valid"))
        }
    }
}

impl Interceptor for ApiKeyCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let value = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_encoded_bytes());
        self.check(value)?;
        Ok(request)
    }
}

/// The key of "Bearer KEY" (the scheme's case does not matter, RFC 9110).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let key = value[SCHEME.len()..].trim_ascii();
    (!key.is_empty()).then_some(key)
}

/// Keys of a key file; errors give the line, never its text.
fn read_key_file(path: &Path) -> Result<Vec<Box<[u8]>>, GatewayError> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| config_error("api_key_file", &shown, format!("cannot read: {e}")))?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let key = line.trim();
        if key.is_empty() || key.starts_with('#') {
            continue;
        }
        check_key(key).map_err(|reason| {
            config_error("api_key_file", &shown, format!("line {}: {reason}", n + 1))
        })?;
        keys.push(key.as_bytes().into());
    }
    Ok(keys)
}

/// A key must fit in an HTTP header after "Bearer ".
fn check_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("an API key is empty");
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("an API key may hold only printable ASCII without spaces");
    }
    Ok(())
}

fn ordinal(i: usize) -> String {
    match i + 1 {
        1 => "1st".into(),
        2 => "2nd".into(),
        3 => "3rd".into(),
        n => format!("{n}th"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn keys(list: &[&str]) -> ApiKeyCheck {
        let keys: Vec<Box<[u8]>> = list.iter().map(|k| k.as_bytes().into()).collect();
        ApiKeyCheck { keys: keys.into() }
    }

    #[test]
    fn bearer_keys_are_checked() {
        let check = keys(&["k1", "second-key"]);
        assert!(check.check(Some(b"Bearer k1")).is_ok());
        assert!(check.check(Some(b"bearer second-key")).is_ok());
        for (sent, says) in [
            (None, "missing API key"),
            (Some(&b"k1"[..]), "not of the form"),
            (Some(b"Basic k1"), "not of the form"),
            (Some(b"Bearer "), "not of the form"),
            (Some(b"Bearer k2"), "not valid"),
            (Some(b"Bearer k1x"), "not valid"),
        ] {
            let status = check.check(sent).unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated);
            assert!(status.message().contains(says), "{}", status.message());
            assert!(!status.message().contains("k2"), "{}", status.message());
        }
        assert!(ApiKeyCheck::default().check(None).is_ok());
    }

    #[test]
    fn key_file_skips_comments_and_blank_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, "# team a\nalpha\n\n  beta  \n#gamma\n").unwrap();
        let args = SecurityArgs {
            api_key_file: Some(path.clone()),
            api_keys: vec!["delta".into()],
            ..Default::default()
        };
        let config = args.into_config().unwrap();
        assert_eq!(format!("{:?}", config.api_keys), "ApiKeyCheck(3 keys)");
        assert!(config.api_keys.check(Some(b"Bearer beta")).is_ok());
        assert!(config.api_keys.check(Some(b"Bearer delta")).is_ok());
        assert!(config.api_keys.check(Some(b"Bearer gamma")).is_err());

        std::fs::write(&path, "# nothing yet\n\n").unwrap();
        let args = SecurityArgs {
            api_key_file: Some(path.clone()),
            ..Default::default()
        };
        let text = args.into_config().unwrap_err().to_string();
        assert!(text.contains("api_key_file = ") && text.ends_with("holds no key"));

        std::fs::write(&path, "good\nhas space\n").unwrap();
        let args = SecurityArgs {
            api_key_file: Some(path),
            ..Default::default()
        };
        let text = args.into_config().unwrap_err().to_string();
        assert!(
            text.contains("line 2:") && !text.contains("has space"),
            "{text}"
        );
    }

    #[test]
    fn missing_files_name_flag_and_path() {
        let args = SecurityArgs {
            tls: ServerTlsArgs {
                tls_cert: Some("/nonexistent/server.pem".into()),
                tls_key: Some("/nonexistent/server.key".into()),
                tls_client_ca: None,
            },
            ..Default::default()
        };
        let text = args.into_config().unwrap_err().to_string();
        assert!(
            text.contains("--tls-cert /nonexistent/server.pem: cannot read"),
            "{text}"
        );

        let args = SecurityArgs {
            worker_tls_ca: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let text = args.into_config().unwrap_err().to_string();
        assert!(
            text.contains("--worker-tls-ca /nonexistent/ca.pem: cannot read"),
            "{text}"
        );

        let args = SecurityArgs {
            api_key_file: Some("/nonexistent/keys".into()),
            ..Default::default()
        };
        let text = args.into_config().unwrap_err().to_string();
        assert!(text.contains("api_key_file = /nonexistent/keys"), "{text}");
    }

    #[test]
    fn worker_flags_need_the_ca_and_https_needs_tls() {
        let args = SecurityArgs {
            worker_tls_domain: Some("worker".into()),
            ..Default::default()
        };
        let text = args.into_config().unwrap_err().to_string();
        assert!(
            text.contains("--worker-tls-domain needs --worker-tls-ca"),
            "{text}"
        );

        let error = worker_endpoint("https://w:1", &WorkerTls(None)).unwrap_err();
        assert!(
            error.to_string().contains("worker = https://w:1"),
            "{error}"
        );
        assert!(worker_endpoint("http://w:1", &WorkerTls(None)).is_ok());
    }

    #[test]
    fn zero_limits_are_refused() {
        let args = SecurityArgs {
            max_message_bytes: 0,
            ..Default::default()
        };
        let text = args.into_config().unwrap_err().to_string();
        assert!(text.contains("max_message_bytes = 0"), "{text}");
    }
}
