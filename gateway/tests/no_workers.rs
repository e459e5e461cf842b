//! The real gateway server on 127.0.0.1:0 whose only worker is unreachable:
//! it must start, report NOT_SERVING, answer with clear status codes, list
//! its services through reflection, and stop on shutdown.

use aquila_gateway::{GatewayArgs, run};
use aquila_proto::v1;
use aquila_proto::v1::generation_client::GenerationClient;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn gateway_without_reachable_workers() {
    // Port 1 on localhost refuses connections.
    let mut args = GatewayArgs::with_workers(vec!["127.0.0.1:1".into()]);
    args.health_interval_ms = 50;
    let config = args.into_config().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(listener, config, async {
        let _ = stopped.await;
    }));

    let channel = tonic::transport::Endpoint::from_shared(address)
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "aquila.v1.Generation"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap();
        assert_eq!(response.into_inner().status(), ServingStatus::NotServing);
    }

    let mut generation = GenerationClient::new(channel.clone());
    let status = generation
        .generate(v1::GenerateRequest {
            prompt: "hi".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    let status = generation
        .generate(v1::GenerateRequest {
            model: "nope".into(),
            prompt: "hi".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("\"nope\""));

    let models = generation
        .list_models(v1::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(models.models.is_empty());

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("unexpected reflection answer {answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["aquila.v1.Generation", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{names:?}");
    }

    drop(answers);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
