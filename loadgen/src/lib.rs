//! Shoal load generator library: scenarios, the WebSocket client they use,
//! latency statistics and result reports. The `loadgen` binary is a thin
//! clap front end; integration tests call the scenarios directly.
//!
//! Measurement rules (see README "Measuring"): publishers are open-loop and
//! stamp each message with its *intended* send time from a precomputed
//! schedule, so a stalled sender or broker shows up as latency instead of
//! silently lowering the offered load (no coordinated omission).

pub mod capacity;
pub mod client;
pub mod connect;
pub mod fanout;
pub mod floor;
pub mod gate;
pub mod live;
pub mod plan;
pub mod report;
#[cfg(feature = "rest")]
pub mod rest;
pub mod stats;
pub mod sys;
pub mod wire;

use clap::Args;
use serde::Serialize;

/// Connections per source address that `--source-ips` plans for by
/// default (well under the ~14,000 where one address starts to slow
/// connect()).
pub const CONNECTIONS_PER_SOURCE: usize = 10_000;

/// Options shared by every scenario.
#[derive(Debug, Clone, Args, Serialize)]
pub struct CommonOpts {
    /// Broker base URL; repeat for several nodes (clients are spread
    /// round-robin), or give one load balancer address.
    #[arg(long = "url", default_value = "http://127.0.0.1:8080")]
    pub urls: Vec<String>,

    /// HS256 secret used to mint tokens for synthetic users (the broker's
    /// SHOAL_JWT_SECRET). If unset, read from --secret-file.
    #[arg(long, env = "SHOAL_JWT_SECRET", hide_env_values = true)]
    #[serde(skip)]
    pub jwt_secret: Option<String>,

    /// File holding the broker's generated secret (what `make run` writes).
    #[arg(long, default_value = "./data/jwt_secret")]
    pub secret_file: std::path::PathBuf,

    /// Wire encoding: msgpack or json.
    #[arg(long, default_value = "msgpack", value_parser = parse_encoding)]
    #[serde(serialize_with = "ser_encoding")]
    pub encoding: shoal_proto::Encoding,

    /// Server protocol: shoal, socketio (a Socket.IO v4 server with events
    /// join/pub/msg, see scripts/compare/) or pusher (a Pusher protocol 7
    /// server such as sockudo; needs --pusher-key and --pusher-secret).
    #[arg(long, value_enum, default_value = "shoal")]
    pub protocol: crate::wire::Protocol,

    /// Pusher application key (--protocol pusher).
    #[arg(long, default_value = "shoal-key")]
    pub pusher_key: String,

    /// Pusher application secret, signs private channel subscriptions
    /// (--protocol pusher).
    #[arg(long, default_value = "shoal-secret")]
    #[serde(skip)]
    pub pusher_secret: String,

    /// Read each server's CPU and memory from /proc/PID instead of its
    /// /metrics (servers other than Shoal); repeat in --url order.
    #[arg(long = "pid")]
    pub pids: Vec<u32>,

    /// Number of local source addresses (127.0.0.1, .2, ...) to spread client
    /// sockets over. Default: one per 10,000 connections to each loopback
    /// broker address (past ~14,000 connections from one address to one
    /// port, Linux's ephemeral-port search adds ~200 ms to every connect);
    /// 1 for a broker that is not on loopback.
    #[arg(long)]
    pub source_ips: Option<u8>,

    /// Prefix for synthetic user and room names (unique per run by default).
    #[arg(long)]
    pub prefix: Option<String>,

    /// Where to write the JSON result (default results/<scenario>-<time>.json).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,

    /// Do not print the live progress line.
    #[arg(long)]
    pub quiet: bool,

    /// Serve live figures (rates, latency quantiles, gaps, connections) for
    /// Prometheus at `http://ADDR/metrics` while the run lasts.
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

fn parse_encoding(s: &str) -> Result<shoal_proto::Encoding, String> {
    match s {
        "msgpack" => Ok(shoal_proto::Encoding::MsgPack),
        "json" => Ok(shoal_proto::Encoding::Json),
        _ => Err("expected msgpack or json".into()),
    }
}

fn ser_encoding<S: serde::Serializer>(e: &shoal_proto::Encoding, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(e.name())
}

impl CommonOpts {
    /// The signing secret, from the flag/env or the secret file.
    pub fn secret(&self) -> anyhow::Result<Vec<u8>> {
        use anyhow::Context;
        match &self.jwt_secret {
            Some(s) => Ok(s.as_bytes().to_vec()),
            None => std::fs::read(&self.secret_file).with_context(|| {
                format!(
                    "no --jwt-secret and cannot read {} (start the broker with `make run` first, or pass the secret)",
                    self.secret_file.display()
                )
            }),
        }
    }

    /// The protocol to speak, with its credentials.
    pub fn wire(&self) -> anyhow::Result<crate::wire::Wire> {
        use crate::wire::{Protocol, PusherApp, Wire};
        Ok(match self.protocol {
            Protocol::Shoal => Wire::shoal(self.encoding, self.secret()?),
            // Shoal's Socket.IO endpoint needs a token; a peer does not.
            Protocol::Socketio => Wire::socketio(self.secret().ok()),
            Protocol::Pusher => Wire::pusher(PusherApp {
                key: self.pusher_key.clone(),
                secret: self.pusher_secret.clone(),
            }),
        })
    }

    /// Source addresses for `connections` client sockets in all: the
    /// `--source-ips` given, or one per [`CONNECTIONS_PER_SOURCE`]
    /// connections (to all brokers together) when every broker is on
    /// loopback (said in the log when more than one).
    pub fn source_ips_for(&self, connections: usize) -> u8 {
        if let Some(n) = self.source_ips {
            return n.max(1);
        }
        let loopback = self.urls.iter().all(|u| {
            crate::client::host_port(u).starts_with("127.")
                || crate::client::host_port(u).starts_with("localhost")
        });
        // Counted over all brokers, not per broker: a socket bound to a
        // source address before connect() takes its port from that
        // address's one pool (bind() cannot share a port between
        // destinations), so ~28,000 sockets per address in all, and the
        // search slows long before that (make hundred-k: 100,000 sockets
        // over 6 brokers on 2 addresses ramped at a fifth of the rate).
        let n = if loopback {
            connections.div_ceil(CONNECTIONS_PER_SOURCE).clamp(1, 250) as u8
        } else {
            1
        };
        if n > 1 {
            tracing::info!(
                connections,
                source_ips = n,
                "spreading client sockets over 127.0.0.1..127.0.0.{n} (one address slows connect() past ~14,000 connections to one port)"
            );
        }
        n
    }

    /// Run-unique name prefix.
    pub fn prefix(&self) -> String {
        self.prefix
            .clone()
            .unwrap_or_else(|| format!("lg{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(urls: &[&str], source_ips: Option<u8>) -> CommonOpts {
        CommonOpts {
            urls: urls.iter().map(|u| u.to_string()).collect(),
            jwt_secret: None,
            secret_file: "unused".into(),
            encoding: shoal_proto::Encoding::Json,
            protocol: crate::wire::Protocol::Shoal,
            pusher_key: String::new(),
            pusher_secret: String::new(),
            pids: vec![],
            source_ips,
            prefix: None,
            out: None,
            quiet: true,
            metrics_listen: None,
        }
    }

    #[test]
    fn source_addresses_spread_before_one_address_slows_connect() {
        let one = opts(&["http://127.0.0.1:8080"], None);
        assert_eq!(one.source_ips_for(5_000), 1);
        assert_eq!(one.source_ips_for(10_000), 1);
        assert_eq!(one.source_ips_for(10_001), 2);
        assert_eq!(one.source_ips_for(19_000), 2);
        assert_eq!(one.source_ips_for(100_000), 10);
        // Over all brokers: a bound source address has one port pool,
        // whatever the destination.
        let five: Vec<String> = (0..5)
            .map(|i| format!("http://127.0.0.1:{}", 8080 + i))
            .collect();
        let five: Vec<&str> = five.iter().map(String::as_str).collect();
        assert_eq!(opts(&five, None).source_ips_for(100_000), 10);
        // Not loopback: the local addresses would not route there.
        assert_eq!(
            opts(&["http://10.0.0.5:8080"], None).source_ips_for(50_000),
            1
        );
        // Given explicitly: as given.
        assert_eq!(
            opts(&["http://127.0.0.1:8080"], Some(4)).source_ips_for(10),
            4
        );
    }
}
