//! Live figures of a run for Prometheus (`--metrics-listen`), so a
//! dashboard shows the load generator's side next to the broker's.
//!
//! Updated once per second by the run's progress task: counters move by
//! that second's deltas; latency quantiles are exact per-second values from
//! the run's hdrhistogram (not estimated from buckets).

use std::{convert::Infallible, net::SocketAddr, sync::atomic::AtomicU64, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn, Response};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

type Quantile = [(&'static str, &'static str); 1];

/// The metrics, registered under the `loadgen_` prefix.
#[derive(Default)]
pub struct Live {
    registry: Registry,
    /// Target publish rate (msgs/s).
    pub offered_rate: Gauge<f64, AtomicU64>,
    /// Publishes sent in the last second.
    pub achieved_rate: Gauge<f64, AtomicU64>,
    /// Publishes sent.
    pub sent: Counter,
    /// Publishes acknowledged.
    pub acked: Counter,
    /// Deliveries received.
    pub deliveries: Counter,
    /// Seqs skipped as seen by receivers (lost unless they arrive late).
    pub gaps: Counter,
    /// Error frames received.
    pub errors: Counter,
    /// Open client connections.
    pub connections: Gauge,
    /// Delivery latency of the last second, by quantile.
    pub latency: Family<Quantile, Gauge<f64, AtomicU64>>,
}

impl Live {
    /// Create and register every metric.
    pub fn new() -> Arc<Live> {
        let mut l = Live {
            registry: Registry::with_prefix("loadgen"),
            ..Default::default()
        };
        let r = &mut l.registry;
        r.register(
            "offered_rate",
            "Target publish rate, messages per second",
            l.offered_rate.clone(),
        );
        r.register(
            "achieved_rate",
            "Publishes sent in the last second",
            l.achieved_rate.clone(),
        );
        r.register("sent", "Publishes sent", l.sent.clone());
        r.register(
            "acked",
            "Publishes acknowledged by the broker",
            l.acked.clone(),
        );
        r.register(
            "deliveries",
            "Messages received by member connections",
            l.deliveries.clone(),
        );
        r.register(
            "gaps",
            "Sequence numbers skipped as seen by receivers",
            l.gaps.clone(),
        );
        r.register("errors", "Error frames received", l.errors.clone());
        r.register(
            "connections",
            "Open client connections",
            l.connections.clone(),
        );
        r.register(
            "latency_seconds",
            "Delivery latency (intended send to receive) of the last second, by quantile",
            l.latency.clone(),
        );
        for q in ["0.5", "0.99", "0.999"] {
            let _ = l.latency.get_or_create(&[("quantile", q)]);
        }
        Arc::new(l)
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let _ = encode(&mut s, &self.registry);
        s
    }

    /// Serve `GET /metrics` on `addr` until the task is dropped.
    pub async fn serve(
        self: Arc<Self>,
        addr: SocketAddr,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        Ok(tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let live = self.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let body = live.render();
                        async move {
                            let mut r = Response::new(Full::new(Bytes::from(body)));
                            r.headers_mut().insert(
                                hyper::header::CONTENT_TYPE,
                                hyper::header::HeaderValue::from_static(
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                ),
                            );
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        }))
    }
}
