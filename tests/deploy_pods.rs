//! The Helm chart's rendered manifests run as processes: each pod becomes a
//! process started exactly as its manifest says, with what a cluster would
//! provide emulated, and only that (tests/common/pods.rs). The StatefulSet's
//! pods with their init containers, then the gateway, which must find the
//! workers through the headless Service's DNS name, pass its probes and serve
//! through its Service's ports; the same with TLS, API keys and mutual TLS to
//! the workers from mounted Secrets; and a LeaderWorkerSet group of three
//! rank pods, given the three variables its controller injects. Needs
//! AQUILA_HELM, AQUILA_PYTHON and AQUILA_DEMO_MODEL (tests/run.sh).
//! tests/deploy.rs checks the same chart's rendering and schemas.

mod common;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use aquila_proto::admin::v1::ListReplicasRequest;
use aquila_proto::admin::v1::admin_client::AdminClient;
use aquila_proto::v1::generation_client::GenerationClient;
use aquila_proto::v1::{FinishReason, GenerateRequest};
use common::chart::{NAMESPACE, RELEASE, find, tools};
use common::pods::{Cluster, Pod, pod_ip};
use common::prometheus::scrape;
use common::{env_or_skip, eventually, greedy_params, http};
use serde_json::Value;
use tonic::Status;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

async fn replicas(admin: &str) -> Vec<(String, String, bool)> {
    let mut c = AdminClient::connect(admin.to_string())
        .await
        .expect("admin API");
    let mut list: Vec<_> = c
        .list_replicas(ListReplicasRequest {})
        .await
        .expect("ListReplicas")
        .into_inner()
        .replicas
        .into_iter()
        .map(|r| {
            (
                r.address.trim_start_matches("http://").to_string(),
                r.source,
                r.healthy,
            )
        })
        .collect();
    list.sort();
    list
}

/// Polls the admin API until the replicas are `want` (10 s at most).
async fn wait_replicas(admin: &str, want: &[(String, String, bool)]) {
    let what = format!("replicas {want:?}");
    eventually(Duration::from_secs(10), &what, async || {
        let got = replicas(admin).await;
        if got == want { Ok(()) } else { Err(got) }
    })
    .await;
}

async fn generate(gateway: &str, n: u32) -> Vec<u32> {
    let endpoint = Endpoint::from_shared(gateway.to_string()).expect("a URL");
    generate_on(endpoint, None, n).await.expect("Generate")
}

/// `n` greedy tokens through `endpoint`, sending `key` as a bearer token.
async fn generate_on(endpoint: Endpoint, key: Option<&str>, n: u32) -> Result<Vec<u32>, Status> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("connect: {e:?}")))?;
    let mut req = tonic::Request::new(GenerateRequest {
        prompt: "The capital of France is".into(),
        params: Some(greedy_params(n)),
        ..Default::default()
    });
    if let Some(k) = key {
        let value = format!("Bearer {k}").parse().expect("a header value");
        req.metadata_mut().insert("authorization", value);
    }
    let r = GenerationClient::new(channel)
        .generate(req)
        .await?
        .into_inner();
    assert_eq!(r.finish_reason, FinishReason::Length as i32);
    assert_eq!(r.token_ids.len(), n as usize);
    Ok(r.token_ids)
}

/// The gateway Deployment's one pod, started once the workers are in DNS,
/// and ready: a replica found through DNS is healthy.
/// `secrets` are files (volume, file name, content) the kubelet would have
/// mounted from Secrets.
async fn start_gateway(
    docs: &[Value],
    cluster: &Cluster,
    ip: Ipv4Addr,
    secrets: &[(&str, &str, String)],
) -> Pod {
    let name = format!("{RELEASE}-aquila-serve-gateway");
    let deploy = find(docs, "Deployment", &name);
    assert_eq!(deploy["spec"]["replicas"], 1);
    let mut gateway = Pod::new(format!("{name}-0"), ip, &deploy["spec"]["template"]);
    gateway.mount_secrets(secrets);
    gateway.start(cluster);
    gateway.wait_ready().await;
    gateway
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rendered_manifests_run_as_processes() {
    let Some(tools) = tools() else { return };
    let Some(model) = env_or_skip("AQUILA_DEMO_MODEL", "tests/run.sh") else {
        return;
    };
    // A user's values for a small machine; everything else is the chart's.
    let docs = tools.render(&[
        "worker.replicas=2",
        "worker.threads=1",
        "worker.kvCacheMib=64",
        "gateway.replicas=1",
        "gateway.discoverIntervalMs=200",
    ]);
    let cluster = Cluster::new(PathBuf::from(model));
    let gateway_name = format!("{RELEASE}-aquila-serve-gateway");
    let worker_name = format!("{RELEASE}-aquila-serve-worker");
    let sts = find(&docs, "StatefulSet", &worker_name);
    let headless = find(&docs, "Service", &format!("{worker_name}-headless"));
    assert_eq!(sts["spec"]["serviceName"], headless["metadata"]["name"]);
    assert_eq!(headless["spec"]["clusterIP"], "None");

    // The StatefulSet's pods, NAME-0 and NAME-1, each with its init container.
    let mut workers: Vec<Pod> = (0..sts["spec"]["replicas"].as_u64().expect("replicas"))
        .map(|i| {
            Pod::new(
                format!("{worker_name}-{i}"),
                pod_ip(10 + i as u8),
                &sts["spec"]["template"],
            )
        })
        .collect();
    for w in &mut workers {
        w.start(&cluster);
    }
    for w in &mut workers {
        w.wait_ready().await;
    }
    // The headless Service answers with the ready pods.
    let fqdn = format!(
        "{}.{NAMESPACE}.svc.cluster.local",
        headless["metadata"]["name"].as_str().expect("name")
    );
    let dns = |pods: &[&Pod]| -> Vec<(Ipv4Addr, String)> {
        pods.iter()
            .flat_map(|p| [(p.ip, fqdn.clone()), (p.ip, format!("{}.{fqdn}", p.name))])
            .collect()
    };
    cluster.set_dns(&dns(&workers.iter().collect::<Vec<_>>()));

    let mut gateway = start_gateway(&docs, &cluster, pod_ip(2), &[]).await;
    let admin = gateway.url(&"admin".into());
    let worker_port = workers[0].port(&"grpc".into());
    let entry = |p: &Pod| (format!("{}:{worker_port}", p.ip), "dns".to_string(), true);
    wait_replicas(&admin, &[entry(&workers[0]), entry(&workers[1])]).await;

    // Requests reach the gateway through its Service's ports.
    let service = find(&docs, "Service", &gateway_name);
    let target = |name: &str| -> Value {
        service["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("the gateway Service has no port {name}"))["targetPort"]
            .clone()
    };
    let grpc = gateway.url(&target("grpc"));
    let first = generate(&grpc, 8).await;
    for _ in 0..5 {
        assert_eq!(
            generate(&grpc, 8).await,
            first,
            "greedy differs between replicas"
        );
    }
    let models = http::get(&gateway.addr(&target("http")), "/v1/models").await;
    let body = models.text();
    assert_eq!(models.status, 200, "{body}");
    assert!(body.contains("SmolLM2-135M-Instruct"), "{body}");
    // Both replicas served, as each one's /metrics port (the PodMonitor's) says.
    let mut total = 0.0;
    for w in &workers {
        let served = scrape(&w.addr(&"metrics".into()))
            .await
            .sum("aquila_worker_requests_finished_total", &[]);
        assert!(served >= 1.0, "{} served {served}", w.name);
        total += served;
    }
    assert_eq!(total, 6.0);

    // Scale in: the pod leaves the Service and gets SIGTERM; the gateway
    // drops it at its next lookup and keeps serving from the other.
    cluster.set_dns(&dns(&[&workers[0]]));
    let status = workers[1].terminate().await;
    assert!(status.success(), "worker-1 exited {status}");
    wait_replicas(&admin, &[entry(&workers[0])]).await;
    assert_eq!(generate(&grpc, 8).await, first);

    for pod in [&mut gateway, &mut workers[0]] {
        let status = pod.terminate().await;
        assert!(status.success(), "{} exited {status}", pod.name);
        pod.assert_json_logs();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_worker_set_group_runs_as_processes() {
    let Some(tools) = tools() else { return };
    let Some(model) = env_or_skip("AQUILA_DEMO_MODEL", "tests/run.sh") else {
        return;
    };
    // One tensor-parallel group of three pods, one rank each (the demo
    // model's 9 heads split in 3).
    let docs = tools.render(&[
        "worker.multiNode.enabled=true",
        "worker.multiNode.size=3",
        "worker.replicas=1",
        "model.volume.type=emptyDir",
        "worker.threads=1",
        "worker.kvCacheMib=64",
        "gateway.replicas=1",
        "gateway.discoverIntervalMs=200",
    ]);
    let cluster = Cluster::new(PathBuf::from(model));
    let name = format!("{RELEASE}-aquila-serve-worker");
    let lws = find(&docs, "LeaderWorkerSet", &name);
    let t = &lws["spec"]["leaderWorkerTemplate"];
    assert_eq!(t["size"], 3);
    let headless = find(&docs, "Service", &format!("{name}-headless"));
    assert_eq!(
        headless["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"], "0",
        "only group leaders serve the worker API"
    );

    // What the LeaderWorkerSet controller does: pods NAME-0 (the leader),
    // NAME-0-1 and NAME-0-2, each told the group's size, its index and the
    // leader's address (a name in the controller's own headless Service).
    let leader_address = format!("{name}-0.{name}.{NAMESPACE}");
    let mut leader = Pod::new(format!("{name}-0"), pod_ip(20), &t["leaderTemplate"]);
    let mut followers: Vec<Pod> = (1..3)
        .map(|i| {
            Pod::new(
                format!("{name}-0-{i}"),
                pod_ip(20 + i),
                &t["workerTemplate"],
            )
        })
        .collect();
    for (i, pod) in std::iter::once(&mut leader)
        .chain(&mut followers)
        .enumerate()
    {
        pod.injected = vec![
            ("LWS_LEADER_ADDRESS".into(), leader_address.clone()),
            ("LWS_GROUP_SIZE".into(), "3".into()),
            ("LWS_WORKER_INDEX".into(), i.to_string()),
        ];
        pod.start(&cluster);
    }
    cluster.set_dns(&[(leader.ip, leader_address.clone())]);
    leader.wait_ready().await;
    for f in &mut followers {
        f.wait_ready().await;
    }

    let fqdn = format!("{name}-headless.{NAMESPACE}.svc.cluster.local");
    cluster.set_dns(&[(leader.ip, leader_address), (leader.ip, fqdn)]);
    let mut gateway = start_gateway(&docs, &cluster, pod_ip(3), &[]).await;
    let entry = (
        format!("{}:{}", leader.ip, leader.port(&"grpc".into())),
        "dns".to_string(),
        true,
    );
    wait_replicas(&gateway.url(&"admin".into()), &[entry]).await;
    let grpc = gateway.url(&"grpc".into());
    let tokens = generate(&grpc, 8).await;
    assert_eq!(generate(&grpc, 8).await, tokens);

    // The followers computed their thirds of every step (2 requests of 8
    // tokens: 16 steps). A follower records a step just after the leader
    // has answered, so its count may trail for a moment.
    for f in &followers {
        let what = format!("{} running 16 steps", f.name);
        eventually(Duration::from_secs(5), &what, async || {
            let steps = scrape(&f.addr(&"metrics".into()))
                .await
                .sum("aquila_worker_step_duration_seconds_count", &[]);
            if steps >= 16.0 { Ok(()) } else { Err(steps) }
        })
        .await;
    }

    for pod in [&mut gateway, &mut leader] {
        let status = pod.terminate().await;
        assert!(status.success(), "{} exited {status}", pod.name);
    }
}

/// TLS on the gateway's port, API keys and mutual TLS to the workers, from
/// Secrets as the chart mounts them: gRPC probes cannot speak TLS, so the
/// gateway must pass its HTTP probes and the worker its TCP ones, the
/// gateway must reach the worker with its client certificate (it is not
/// ready otherwise), and a client needs the CA and a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_api_keys_from_secrets_run_as_processes() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let Some(tools) = tools() else { return };
    let Some(model) = env_or_skip("AQUILA_DEMO_MODEL", "tests/run.sh") else {
        return;
    };
    let docs = tools.render(&[
        "worker.replicas=1",
        "worker.threads=1",
        "worker.kvCacheMib=64",
        "gateway.replicas=1",
        "gateway.discoverIntervalMs=200",
        "tls.enabled=true",
        "tls.secretName=gateway-tls",
        "workerTls.enabled=true",
        "workerTls.secretName=worker-mtls",
        "auth.apiKeys={key-one,key-two}",
    ]);
    // The Secrets: a CA; the gateway's certificate; the workers' one, for
    // the name the chart makes the gateway check (workerTls.domain), which
    // both sides present (the gateway as its client certificate).
    let ca_key = KeyPair::generate().expect("key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "cluster CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key).expect("self-sign").pem();
    let issuer = Issuer::new(ca, ca_key);
    let leaf = |name: &str| {
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (gateway_crt, gateway_key) = leaf("localhost");
    let (worker_crt, worker_key) = leaf("aquila-worker");
    let mtls = |volume| {
        [
            (volume, "ca.crt", ca_pem.clone()),
            (volume, "tls.crt", worker_crt.clone()),
            (volume, "tls.key", worker_key.clone()),
        ]
    };
    let keys = find(&docs, "Secret", &format!("{RELEASE}-aquila-serve-api-keys"));
    let keys_file = keys["stringData"]["api-keys"]
        .as_str()
        .expect("the keys")
        .to_string();

    let cluster = Cluster::new(PathBuf::from(model));
    let worker_name = format!("{RELEASE}-aquila-serve-worker");
    let sts = find(&docs, "StatefulSet", &worker_name);
    let mut worker = Pod::new(
        format!("{worker_name}-0"),
        pod_ip(30),
        &sts["spec"]["template"],
    );
    worker.mount_secrets(&mtls("worker-tls"));
    worker.start(&cluster);
    worker.wait_ready().await;
    assert!(worker.app()["readinessProbe"].get("tcpSocket").is_some());
    let fqdn = format!("{worker_name}-headless.{NAMESPACE}.svc.cluster.local");
    cluster.set_dns(&[(worker.ip, fqdn)]);

    let mut secrets = vec![
        ("tls", "tls.crt", gateway_crt),
        ("tls", "tls.key", gateway_key),
        ("api-keys", "api-keys", keys_file),
    ];
    secrets.extend(mtls("worker-tls"));
    // Ready (HTTP /ready) only once the mutual-TLS worker is healthy.
    let mut gateway = start_gateway(&docs, &cluster, pod_ip(31), &secrets).await;
    assert_eq!(gateway.app()["readinessProbe"]["httpGet"]["path"], "/ready");

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca_pem))
        .domain_name("localhost");
    let port = gateway.port(&"grpc".into());
    let endpoint = Endpoint::from_shared(format!("https://{}:{port}", gateway.ip))
        .expect("a URL")
        .tls_config(tls)
        .expect("TLS settings");
    let tokens = generate_on(endpoint.clone(), Some("key-two"), 8)
        .await
        .expect("with a key");
    assert_eq!(tokens.len(), 8);
    let refused = generate_on(endpoint, None, 8)
        .await
        .expect_err("without a key");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let plain = Endpoint::from_shared(format!("http://{}:{port}", gateway.ip)).expect("a URL");
    assert!(
        generate_on(plain, Some("key-two"), 8).await.is_err(),
        "plaintext was served"
    );

    for pod in [&mut gateway, &mut worker] {
        let status = pod.terminate().await;
        assert!(status.success(), "{} exited {status}", pod.name);
    }
}
