//! A real Socket.IO client for the tests: `web-tests/sio-agent.mjs`
//! (stock socket.io-client) in a Node process, driven one JSON command per
//! line. Installed by `make test-deps` (`npm ci` in web-tests); a missing
//! Node or package fails the test, it never skips it.

use super::*;
use tokio::io::{AsyncBufReadExt, BufReader};

pub struct SioAgent {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl SioAgent {
    pub async fn start() -> SioAgent {
        Self::spawn(false).await
    }

    /// An agent that accepts the self-signed certificate of the tests'
    /// nginx.
    pub async fn start_insecure() -> SioAgent {
        Self::spawn(true).await
    }

    async fn spawn(insecure: bool) -> SioAgent {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../web-tests");
        assert!(
            dir.join("node_modules/socket.io-client").is_dir(),
            "web-tests/node_modules/socket.io-client is missing: run `make test-deps`"
        );
        let mut cmd = tokio::process::Command::new("node");
        if insecure {
            cmd.env("NODE_TLS_REJECT_UNAUTHORIZED", "0");
        }
        let mut child = cmd
            .arg(dir.join("sio-agent.mjs"))
            .current_dir(&dir)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node (run `make test-deps`)");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        SioAgent {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// Run one command; its reply.
    pub async fn call(&mut self, cmd: Value) -> Value {
        let mut line = serde_json::to_vec(&cmd).expect("json");
        line.push(b'\n');
        self.stdin.write_all(&line).await.expect("agent stdin");
        let reply = tokio::time::timeout(Duration::from_secs(30), self.lines.next_line())
            .await
            .expect("agent reply within 30 s")
            .expect("agent stdout")
            .expect("agent alive");
        serde_json::from_str(&reply).expect("agent reply is JSON")
    }

    /// Connect client `name` to `url` (options merged into the command).
    pub async fn connect(&mut self, name: &str, url: &str, token: &str, opts: Value) -> Value {
        let mut cmd = json!({"op": "connect", "as": name, "url": url, "token": token});
        if let (Some(c), Some(o)) = (cmd.as_object_mut(), opts.as_object()) {
            for (k, v) in o {
                c.insert(k.clone(), v.clone());
            }
        }
        self.call(cmd).await
    }

    /// Emit with an ack callback; the ack's payload (or `{"error": ...}`
    /// from the agent on timeout).
    pub async fn ask(&mut self, name: &str, event: &str, args: Value) -> Value {
        let r = self
            .call(json!({"op": "emit", "as": name, "event": event, "args": args, "ack": true}))
            .await;
        match r.get("ack") {
            Some(a) => a.clone(),
            None => r,
        }
    }

    /// Emit without an ack callback.
    pub async fn tell(&mut self, name: &str, event: &str, args: Value) {
        self.call(json!({"op": "emit", "as": name, "event": event, "args": args}))
            .await;
    }

    /// Up to `count` events named `event` (all names if empty), waiting
    /// up to `ms`; removed from the client's record.
    pub async fn events(&mut self, name: &str, event: &str, count: usize, ms: u64) -> Vec<Value> {
        let mut cmd = json!({"op": "events", "as": name, "count": count, "timeout": ms});
        if !event.is_empty() {
            cmd["name"] = json!(event);
        }
        let r = self.call(cmd).await;
        r["events"].as_array().cloned().unwrap_or_default()
    }

    pub async fn status(&mut self, name: &str) -> Value {
        self.call(json!({"op": "status", "as": name})).await
    }

    pub async fn close(&mut self, name: &str) {
        self.call(json!({"op": "close", "as": name})).await;
    }
}

impl Drop for SioAgent {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The seqs of `msg` events (each `[name, payload]`).
pub fn event_seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .filter(|e| e[0] == "msg")
        .filter_map(|e| e[1]["seq"].as_u64())
        .collect()
}
