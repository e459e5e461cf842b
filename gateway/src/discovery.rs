//! DNS discovery of worker replicas: `--discover dns:///NAME:PORT`.
//!
//! A Kubernetes headless Service resolves to one address per ready pod, so
//! re-resolving the name every interval follows the StatefulSet as it scales
//! and as pods come and go. Each refresh registers new addresses and drains
//! those gone from the answer (their requests finish first). A failed or
//! empty resolution changes nothing: a DNS outage must not empty the
//! registry. The resolver is a trait so tests can change the answer.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::config::config_error;
use crate::error::GatewayError;
use crate::workers::{Source, WorkerPool};

/// A name to resolve and the port every answer gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    pub host: String,
    pub port: u16,
}

impl DnsTarget {
    /// Parses "dns:///NAME:PORT" (the gRPC name syntax, no authority).
    pub fn parse(uri: &str) -> Result<DnsTarget, GatewayError> {
        let invalid = |reason: &str| config_error("discover", uri, reason.to_owned());
        let rest = uri
            .trim()
            .strip_prefix("dns:///")
            .ok_or_else(|| invalid("expected dns:///NAME:PORT"))?;
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| invalid("the port is missing (dns:///NAME:PORT)"))?;
        let port: u16 = port
            .parse()
            .map_err(|_| invalid("the port is not a number in 1..=65535"))?;
        if host.is_empty() || port == 0 {
            return Err(invalid("expected a name and a port in 1..=65535"));
        }
        Ok(DnsTarget {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
        })
    }

    /// How replicas from this target are tagged in the registry.
    pub fn source(&self) -> Source {
        Source::Dns(self.to_string())
    }
}

impl std::fmt::Display for DnsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dns:///{}:{}", self.host, self.port)
    }
}

pub type Resolved<'a> = Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>>;

pub trait Resolver: Send + Sync + 'static {
    /// Every address `host` has, each with `port`.
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> Resolved<'a>;
}

/// The system's resolver (`getaddrinfo`, which reads /etc/resolv.conf and
/// the cluster DNS search domains).
#[derive(Debug, Default)]
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn resolve<'a>(&'a self, host: &'a str, port: u16) -> Resolved<'a> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// Worker URI of a resolved address.
pub fn address_uri(address: SocketAddr) -> String {
    // SocketAddr's Display brackets IPv6 hosts, as a URI needs.
    format!("http://{address}")
}

/// Follows `target` until the pool is gone: registers what appears, drains
/// what disappears.
pub async fn follow(
    pool: Weak<WorkerPool>,
    target: DnsTarget,
    resolver: Arc<dyn Resolver>,
    interval: Duration,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let answer = resolver.resolve(&target.host, target.port).await;
        let Some(pool) = pool.upgrade() else { return };
        match answer {
            Ok(addresses) if !addresses.is_empty() => apply(&pool, &target, &addresses),
            Ok(_) => {
                tracing::warn!(%target, "DNS answered no address; keeping the current replicas")
            }
            Err(error) => {
                tracing::warn!(%target, %error, "DNS resolution failed; keeping the current replicas")
            }
        }
    }
}

/// Makes the replicas from `target` the `resolved` set.
pub fn apply(pool: &WorkerPool, target: &DnsTarget, resolved: &[SocketAddr]) {
    let source = target.source();
    let wanted: Vec<String> = resolved.iter().map(|a| address_uri(*a)).collect();
    for address in &wanted {
        if let Err(error) = pool.add(address, source.clone()) {
            tracing::warn!(%target, address, %error, "a discovered address is unusable");
        }
    }
    for address in pool.addresses_from(&source) {
        if !wanted.contains(&address) {
            tracing::info!(%target, address, "replica gone from DNS; draining");
            // It is registered: draining cannot fail.
            let _ = pool.drain(&address);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_grpc_dns_syntax() {
        let t = DnsTarget::parse("dns:///worker-headless.ns.svc.cluster.local:50051").unwrap();
        assert_eq!(t.host, "worker-headless.ns.svc.cluster.local");
        assert_eq!(t.port, 50051);
        assert_eq!(
            t.to_string(),
            "dns:///worker-headless.ns.svc.cluster.local:50051"
        );
        let v6 = DnsTarget::parse("dns:///[::1]:7").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 7));
    }

    #[test]
    fn bad_targets_name_the_flag_and_value() {
        for bad in [
            "worker:50051",
            "dns:///worker",
            "dns:///worker:http",
            "dns:///:1",
            "dns:///w:0",
        ] {
            let text = DnsTarget::parse(bad).unwrap_err().to_string();
            assert!(text.contains("discover = "), "{text}");
            assert!(text.contains(bad), "{text}");
        }
    }

    #[test]
    fn ipv6_addresses_become_bracketed_uris() {
        let a: SocketAddr = "[fd00::5]:50051".parse().unwrap();
        assert_eq!(address_uri(a), "http://[fd00::5]:50051");
        let b: SocketAddr = "10.0.0.7:50051".parse().unwrap();
        assert_eq!(address_uri(b), "http://10.0.0.7:50051");
    }
}
