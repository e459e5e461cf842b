//! Security end to end through real processes on 127.0.0.1 port 0: API keys
//! on the Generation service, TLS and client certificates on the gateway's
//! public port, mutual TLS between gateway and worker, the request size
//! limit, and flags naming a missing file. Certificates come from a CA made
//! at test time (rcgen); every refusal is awaited with a bound, never hung on.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use aquila_loadgen::LoadgenArgs;
use aquila_proto::v1::generation_client::GenerationClient;
use aquila_proto::v1::{GenerateRequest, ListModelsRequest, SamplingParams};
use aquila_worker::model::WeightDtype;
use aquila_worker::presets::{GgufType, WeightFormat};
use clap::Parser;
use common::{Proc, is_serving, spawn_gateway, spawn_worker, tiny_model, wait_serving_at};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const PROMPT: &[u32] = &[84, 104, 101, 32, 113, 117, 105, 99, 107];
const NEW_TOKENS: u32 = 12;
/// How long a refused client may take to fail: far above a local handshake.
const REFUSAL_BOUND: Duration = Duration::from_secs(10);

/// A CA, a server certificate for localhost and 127.0.0.1, a client
/// certificate, all signed by the CA, and a second CA that signed nothing
/// here; each written as PEM into a temp folder.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca_pem, issuer) = ca("aquila test CA");
        let (other_pem, _) = ca("some other CA");
        write(dir.path(), "ca.pem", &ca_pem);
        write(dir.path(), "other-ca.pem", &other_pem);
        for (name, sans, usage) in [
            (
                "server",
                vec!["localhost".to_string(), "127.0.0.1".to_string()],
                ExtendedKeyUsagePurpose::ServerAuth,
            ),
            ("client", vec![], ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(sans).expect("params");
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).expect("sign");
            write(dir.path(), &format!("{name}.pem"), &cert.pem());
            write(dir.path(), &format!("{name}.key"), &key.serialize_pem());
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        let path: PathBuf = self.dir.path().join(name);
        path.to_str().expect("utf-8 path").to_owned()
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).expect("read PEM")
    }

    /// A TLS endpoint for `addr` trusting `ca`, verifying "localhost", with
    /// the client certificate when `with_cert`.
    fn endpoint(&self, addr: &str, ca: &str, with_cert: bool) -> Endpoint {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.read(ca)))
            .domain_name("localhost");
        if with_cert {
            tls = tls.identity(Identity::from_pem(
                self.read("client.pem"),
                self.read("client.key"),
            ));
        }
        Endpoint::from_shared(format!("https://{addr}"))
            .expect("uri")
            .tls_config(tls)
            .expect("tls config")
    }
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).expect("self-sign");
    (cert.pem(), Issuer::new(params, key))
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write PEM");
}

fn greedy_request() -> GenerateRequest {
    GenerateRequest {
        prompt_token_ids: PROMPT.to_vec(),
        params: Some(SamplingParams {
            max_new_tokens: Some(NEW_TOKENS),
            temperature: Some(0.0),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `message` with "authorization: Bearer KEY" when a key is given.
fn keyed<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        let value = format!("Bearer {key}").parse().expect("ascii key");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// The greedy ids of `greedy_request` through `client`, or its status.
async fn generate(
    client: &mut GenerationClient<Channel>,
    key: Option<&str>,
) -> Result<Vec<u32>, tonic::Status> {
    let response = client.generate(keyed(greedy_request(), key)).await?;
    Ok(response.into_inner().token_ids)
}

/// Connects to `endpoint` and sends one greedy request; every failure
/// (connect, handshake, call) as text. Panics if it does not end within
/// `REFUSAL_BOUND`.
async fn try_generate(endpoint: &Endpoint, key: Option<&str>) -> Result<Vec<u32>, String> {
    let attempt = async {
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| chain(e.to_string(), &e))?;
        let mut client = GenerationClient::new(channel);
        generate(&mut client, key)
            .await
            .map_err(|s| chain(format!("{:?}: {}", s.code(), s.message()), &s))
    };
    tokio::time::timeout(REFUSAL_BOUND, attempt)
        .await
        .unwrap_or_else(|_| panic!("{} neither answered nor refused", endpoint.uri()))
}

/// `text` followed by the sources of `error`: why a handshake was refused
/// shows only there.
fn chain(mut text: String, error: &dyn std::error::Error) -> String {
    let mut source = error.source();
    while let Some(e) = source {
        text = format!("{text}: {e}");
        source = e.source();
    }
    text
}

/// The greedy ids the tiny model gives for `PROMPT`, computed in-process.
fn expected_ids(model: &Path) -> Vec<u32> {
    common::local_greedy(model, WeightDtype::F32, PROMPT, NEW_TOKENS as usize).1
}

fn plain(addr: &str) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}")).expect("uri")
}

#[tokio::test]
async fn api_keys_guard_generation_but_not_health() {
    let model = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let keys = tempfile::NamedTempFile::new().expect("key file");
    std::fs::write(keys.path(), "# team a\nkey-from-file\n\n").expect("write keys");
    let worker = spawn_worker(model.path(), &[]);
    let key_file = keys.path().to_str().expect("utf-8 path");
    let gateway = spawn_gateway(
        &[&worker],
        &[
            "--api-key-file",
            key_file,
            "--api-key",
            "key-from-flag",
            "--max-message-bytes",
            "4096",
        ],
    );
    // Health needs no key: wait_serving sends none.
    let endpoint = plain(&gateway.addr);
    wait_serving_at(&endpoint).await;
    assert!(is_serving(&endpoint).await);
    let mut client = GenerationClient::new(endpoint.connect().await.expect("connect"));

    let status = generate(&mut client, None).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("missing API key"), "{status:?}");

    let status = generate(&mut client, Some("guessed-key"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("not valid"), "{status:?}");
    assert!(!status.message().contains("guessed"), "echoes the key");

    let status = client
        .list_models(keyed(ListModelsRequest {}, None))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "every method is guarded"
    );

    let want = expected_ids(model.path());
    for key in ["key-from-file", "key-from-flag"] {
        let ids = generate(&mut client, Some(key)).await.expect(key);
        assert_eq!(ids, want, "with {key}");
    }

    // A request over --max-message-bytes, with a valid key, is refused
    // before decoding, naming the limit.
    let big = GenerateRequest {
        prompt: "a".repeat(8000),
        ..greedy_request()
    };
    let status = client
        .generate(keyed(big, Some("key-from-flag")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("4096"), "{status:?}");
}

#[tokio::test]
async fn tls_gateway_serves_tls_clients_and_refuses_plaintext() {
    let pki = Pki::new();
    let model = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let worker = spawn_worker(model.path(), &[]);
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let gateway = spawn_gateway(
        &[&worker],
        &["--tls-cert", &cert, "--tls-key", &key, "--api-key", "k1"],
    );
    let tls = pki.endpoint(&gateway.addr, "ca.pem", false);
    wait_serving_at(&tls).await;

    let want = expected_ids(model.path());
    assert_eq!(try_generate(&tls, Some("k1")).await, Ok(want.clone()));

    let refused = try_generate(&plain(&gateway.addr), Some("k1")).await;
    // The server answers the HTTP/2 preface with a TLS alert (no HTTP/2
    // frame) and closes: a protocol error or a broken pipe.
    assert!(refused.is_err(), "plaintext got {refused:?}");
    let untrusted = pki.endpoint(&gateway.addr, "other-ca.pem", false);
    let refused = try_generate(&untrusted, Some("k1")).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("UnknownIssuer")),
        "a client trusting another CA got {refused:?}"
    );

    // The command-line clients drive a TLS gateway with a key; an http://
    // address is dialed as https:// once --tls-ca is given.
    let url = format!("http://localhost:{}", port(&gateway));
    let ca = pki.path("ca.pem");
    let out = Command::new(env!("CARGO_BIN_EXE_aquila"))
        .args(["generate", "--gateway", &url, "--tls-ca", &ca])
        .args(["--temperature", "0", "--max-new-tokens", "4", "Hi"])
        .env("AQUILA_API_KEY", "k1")
        .output()
        .expect("run aquila generate");
    assert!(
        out.status.success(),
        "aquila generate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The summary line after the streamed text.
    assert!(String::from_utf8_lossy(&out.stderr).contains(" generated tokens"));

    let https = format!("https://localhost:{}", port(&gateway));
    let config = LoadgenArgs::try_parse_from([
        "bench",
        "--gateway",
        &https,
        "--tls-ca",
        &ca,
        "--api-key",
        "k1",
        "--concurrency",
        "2",
        "--num-requests",
        "4",
        "--output-tokens",
        "4",
        "--vocab-range",
        "100:300",
        "--duration-s",
        "120",
    ])
    .expect("flags parse")
    .into_config()
    .expect("valid config");
    let report = aquila_loadgen::run(config).await.expect("bench run");
    assert_eq!(
        (report.succeeded, report.failed),
        (4, 0),
        "{:?}",
        report.failures
    );
    assert_eq!(report.total_output_tokens, 16);
}

#[tokio::test]
async fn client_ca_requires_a_client_certificate() {
    let pki = Pki::new();
    let model = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let worker = spawn_worker(model.path(), &[]);
    let (cert, key, ca) = (
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    let gateway = spawn_gateway(
        &[&worker],
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
        ],
    );
    let with_cert = pki.endpoint(&gateway.addr, "ca.pem", true);
    wait_serving_at(&with_cert).await;
    assert_eq!(
        try_generate(&with_cert, None).await,
        Ok(expected_ids(model.path()))
    );

    let without = pki.endpoint(&gateway.addr, "ca.pem", false);
    let refused = try_generate(&without, None).await;
    // The server's "certificate required" alert arrives after the client
    // has sent its request (TLS 1.3), so the call fails, with that alert or
    // a broken connection.
    assert!(
        refused.is_err(),
        "a client without a certificate got {refused:?}"
    );
    assert!(!is_serving(&without).await);
}

#[tokio::test]
async fn gateway_reaches_a_mutual_tls_worker_only_with_its_certificate() {
    let pki = Pki::new();
    let model = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let (cert, key, ca) = (
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    let (client_cert, client_key) = (pki.path("client.pem"), pki.path("client.key"));
    let worker = spawn_worker(
        model.path(),
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
        ],
    );
    let client_flags = [
        "--worker-tls-ca",
        &ca,
        "--worker-tls-cert",
        &client_cert,
        "--worker-tls-key",
        &client_key,
    ];
    // Dialed by IP: the name checked is the address's host, 127.0.0.1.
    let by_ip = spawn_gateway(&[&worker], &client_flags);
    // Named explicitly.
    let mut flags = client_flags.to_vec();
    flags.extend(["--worker-tls-domain", "localhost"]);
    let by_name = spawn_gateway(&[&worker], &flags);
    let refused: Vec<(&str, Proc)> = vec![
        ("plaintext", spawn_gateway(&[&worker], &[])),
        (
            "no client certificate",
            spawn_gateway(&[&worker], &["--worker-tls-ca", &ca]),
        ),
        ("a name the certificate lacks", {
            let mut flags = client_flags.to_vec();
            flags.extend(["--worker-tls-domain", "elsewhere.example"]);
            spawn_gateway(&[&worker], &flags)
        }),
    ];

    let want = expected_ids(model.path());
    for gateway in [&by_ip, &by_name] {
        let endpoint = plain(&gateway.addr);
        wait_serving_at(&endpoint).await;
        assert_eq!(try_generate(&endpoint, None).await, Ok(want.clone()));
    }

    // The good gateways are serving, so the worker is up: the others have
    // had as long, and are given 20 more health intervals, to reach it.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        for (why, gateway) in &refused {
            assert!(
                !is_serving(&plain(&gateway.addr)).await,
                "gateway with {why} became SERVING"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (why, gateway) in &refused {
        let answer = try_generate(&plain(&gateway.addr), None).await;
        assert!(
            answer.as_ref().is_err_and(|e| e.starts_with("Unavailable")),
            "gateway with {why}: {answer:?}"
        );
    }
}

#[tokio::test]
async fn a_missing_certificate_file_stops_gateway_and_worker_at_start() {
    let model = tiny_model(WeightFormat::Safetensors, GgufType::F32);
    let model = model.path().to_str().expect("utf-8 path");
    let runs: [&[&str]; 3] = [
        &[
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--worker",
            "127.0.0.1:1",
            "--tls-cert",
            "/nonexistent/server.pem",
            "--tls-key",
            "/nonexistent/server.key",
        ],
        &[
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--worker",
            "127.0.0.1:1",
            "--worker-tls-ca",
            "/nonexistent/server.pem",
        ],
        &[
            "worker",
            "--model",
            model,
            "--listen",
            "127.0.0.1:0",
            "--tls-client-ca",
            "/nonexistent/server.pem",
            "--tls-cert",
            "/nonexistent/server.pem",
            "--tls-key",
            "/nonexistent/server.key",
        ],
    ];
    for args in runs {
        let out = Command::new(env!("CARGO_BIN_EXE_aquila"))
            .args(args)
            .output()
            .expect("run aquila");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(
            stderr.contains("/nonexistent/server.pem: cannot read the file"),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains("-tls-"), "{args:?} names no flag: {stderr}");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("listening"),
            "{args:?} listened first"
        );
    }
}

fn port(p: &Proc) -> &str {
    p.addr.rsplit(':').next().expect("host:port")
}
