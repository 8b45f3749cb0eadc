//! A real broker on 127.0.0.1:0 in a temp dir for loadgen's tests (the
//! broker's own test helpers, `shoal_broker::testing`), and the options
//! that point a scenario at it.
#![allow(dead_code)]

use shoal_broker::testing::InProcess;
use shoal_loadgen::CommonOpts;

pub const SECRET: &str = "gate-secret-gate-secret-gate-secret-0123";

/// Start a broker with the test secret and no frame rate limit, ready to
/// serve; `tune` adjusts the config before start.
pub async fn broker(tune: impl FnOnce(&mut shoal_broker::Config)) -> InProcess {
    InProcess::start(|cfg| {
        cfg.auth.jwt_secret = Some(SECRET.into());
        cfg.conn.rate_limit = 100_000.0;
        cfg.conn.rate_burst = 100_000.0;
        tune(cfg);
    })
    .await
    .ready()
    .await
}

/// Scenario options aimed at `url`, quiet, writing no result file.
pub fn common(url: &str) -> CommonOpts {
    CommonOpts {
        urls: vec![url.to_string()],
        jwt_secret: Some(SECRET.into()),
        secret_file: "unused".into(),
        encoding: shoal_proto::Encoding::MsgPack,
        protocol: shoal_loadgen::wire::Protocol::Shoal,
        pusher_key: String::new(),
        pusher_secret: String::new(),
        pids: vec![],
        source_ips: None,
        prefix: None,
        out: None,
        quiet: true,
        metrics_listen: None,
    }
}
