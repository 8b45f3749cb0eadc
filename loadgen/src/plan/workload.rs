//! A deployment's workload, read from a TOML file (`--workload`) or one of
//! the examples shipped in `loadgen/workloads/` (`--example`).

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::model::NodeSpec;

/// Rooms of one size and the share of connections in them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoomClass {
    /// Members per room.
    pub size: usize,
    /// Share of connections (and of their messages) in rooms of this size.
    pub share: f64,
}

/// What a deployment must carry at its peak.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// A name for the report.
    pub name: String,
    /// Concurrent connections.
    pub connections: f64,
    /// Messages each connection publishes per minute.
    pub messages_per_connection_per_minute: f64,
    /// Message body size, bytes.
    #[serde(default = "default_payload")]
    pub payload_bytes: usize,
    /// Share of messages in stored namespaces (0..=1).
    #[serde(default)]
    pub stored_share: f64,
    /// Typing indicators per message (each fans out like a message, unstored).
    #[serde(default)]
    pub typing_per_message: f64,
    /// Reconnections per connection per hour (handshakes).
    #[serde(default)]
    pub reconnects_per_connection_per_hour: f64,
    /// Share of connections speaking JSON frames (the rest MessagePack).
    #[serde(default)]
    pub json_share: f64,
    /// Delivery p99 target, ms: latency is not modelled; the report warns
    /// where calibration already exceeded it.
    #[serde(default)]
    pub p99_ms: Option<f64>,
    /// Room sizes and their shares.
    pub rooms: Vec<RoomClass>,
    /// The nodes to run on.
    pub node: NodeSpec,
}

fn default_payload() -> usize {
    100
}

/// The example workloads, by name.
pub const EXAMPLES: [(&str, &str); 3] = [
    ("chat-200k", include_str!("../../workloads/chat-200k.toml")),
    ("live-wide", include_str!("../../workloads/live-wide.toml")),
    (
        "support-stored",
        include_str!("../../workloads/support-stored.toml"),
    ),
];

impl Workload {
    /// Parse and check a workload.
    pub fn parse(text: &str) -> anyhow::Result<Workload> {
        let w: Workload = toml::from_str(text).context("workload file")?;
        w.check()?;
        Ok(w)
    }

    /// An example by name.
    pub fn example(name: &str) -> anyhow::Result<Workload> {
        let (_, text) = EXAMPLES.iter().find(|(n, _)| *n == name).with_context(|| {
            let names: Vec<_> = EXAMPLES.iter().map(|(n, _)| *n).collect();
            format!("no example `{name}`; examples: {}", names.join(", "))
        })?;
        Self::parse(text)
    }

    /// Read a workload file.
    pub fn read(path: &std::path::Path) -> anyhow::Result<Workload> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| path.display().to_string())
    }

    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.connections >= 1.0, "connections must be at least 1");
        anyhow::ensure!(
            self.messages_per_connection_per_minute >= 0.0,
            "messages_per_connection_per_minute must not be negative"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.stored_share),
            "stored_share is a share, 0 to 1"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.json_share),
            "json_share is a share, 0 to 1"
        );
        anyhow::ensure!(!self.rooms.is_empty(), "rooms: at least one size");
        for r in &self.rooms {
            anyhow::ensure!(r.size >= 1, "room size must be at least 1");
            anyhow::ensure!(r.share > 0.0, "room share must be positive");
        }
        let total: f64 = self.rooms.iter().map(|r| r.share).sum();
        anyhow::ensure!(
            (total - 1.0).abs() < 1e-6,
            "room shares add up to {total}, not 1"
        );
        anyhow::ensure!(
            self.node.cores > 0.0 && self.node.memory_gib > 0.0,
            "node needs cores and memory_gib"
        );
        anyhow::ensure!(
            self.node.target_cpu > 0.0 && self.node.target_cpu <= 1.0,
            "node.target_cpu is a share, 0 to 1"
        );
        Ok(())
    }

    /// A scaled-down copy with `connections` connections (the same rates
    /// per connection and shares): what `--verify` runs on this machine.
    pub fn scaled(&self, connections: f64) -> Workload {
        Workload {
            connections,
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_parse() {
        for (name, _) in EXAMPLES {
            let w = Workload::example(name).expect(name);
            assert_eq!(w.name, name);
        }
    }

    #[test]
    fn bad_workloads_are_refused() {
        let good = EXAMPLES[0].1;
        assert!(Workload::parse(&good.replace("share = 0.5", "share = 0.6")).is_err());
        assert!(Workload::parse(&good.replace("stored_share = 0.3", "stored_share = 3")).is_err());
        assert!(Workload::parse(&format!("{good}\nbogus = 1")).is_err());
    }
}
