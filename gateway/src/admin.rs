//! The operator API (`aquila.admin.v1.Admin`): list, add and drain replicas.
//!
//! Served only on `--admin-listen`, never on the public port: it moves
//! traffic, so it belongs on an address only operators reach. It holds no
//! state of its own; every call is one registry operation.

use std::sync::Arc;

use aquila_proto::admin::v1 as admin;
use aquila_proto::admin::v1::admin_server::Admin;
use tonic::{Request, Response, Status};

use crate::error::GatewayError;
use crate::workers::{Source, WorkerPool};

#[derive(Debug)]
pub struct AdminService {
    pool: Arc<WorkerPool>,
}

impl AdminService {
    pub fn new(pool: Arc<WorkerPool>) -> Self {
        AdminService { pool }
    }

    fn describe(&self, address: &str) -> admin::Replica {
        self.pool
            .list()
            .into_iter()
            .find(|r| r.address == address)
            // Drained and already gone: describe it as such.
            .unwrap_or_else(|| admin::Replica {
                address: address.to_owned(),
                draining: true,
                ..Default::default()
            })
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_replicas(
        &self,
        _request: Request<admin::ListReplicasRequest>,
    ) -> Result<Response<admin::ListReplicasResponse>, Status> {
        Ok(Response::new(admin::ListReplicasResponse {
            replicas: self.pool.list(),
        }))
    }

    async fn add_replica(
        &self,
        request: Request<admin::AddReplicaRequest>,
    ) -> Result<Response<admin::Replica>, Status> {
        let replica = self
            .pool
            .add(&request.into_inner().address, Source::Admin)
            .map_err(invalid_address)?;
        tracing::info!(worker = %replica.address, "replica added through the admin API");
        Ok(Response::new(self.describe(&replica.address)))
    }

    async fn drain_replica(
        &self,
        request: Request<admin::DrainReplicaRequest>,
    ) -> Result<Response<admin::Replica>, Status> {
        let replica = self
            .pool
            .drain(&request.into_inner().address)
            .map_err(invalid_address)?;
        Ok(Response::new(self.describe(&replica.address)))
    }
}

/// An address that does not parse is the caller's mistake here, not a
/// start-up configuration error.
fn invalid_address(error: GatewayError) -> Status {
    match error {
        GatewayError::Config { .. } => Status::invalid_argument(error.to_string()),
        other => other.to_status(),
    }
}
