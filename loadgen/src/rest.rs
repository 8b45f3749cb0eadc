//! `rest`: a goose load test of the REST API. Each simulated user registers
//! and logs in once (argon2 makes that deliberately slow), then loops over
//! the read endpoints a chat client calls: the user list, its room list and
//! a history page. Goose measures every request; the report keeps goose's
//! per-request counts and turns its timings into the same percentile table
//! as the other scenarios.

use std::{collections::BTreeMap, sync::OnceLock};

use goose::prelude::*;
use serde::Serialize;

use crate::{
    stats::{self, Percentiles},
    CommonOpts,
};

/// Options of `loadgen rest`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct RestOpts {
    /// Target and output options shared by every scenario.
    #[command(flatten)]
    #[serde(skip)]
    pub common: CommonOpts,

    /// Concurrent simulated users.
    #[arg(long, default_value_t = 20)]
    pub users: usize,

    /// Users started per second.
    #[arg(long, default_value_t = 10)]
    pub hatch_rate: usize,

    /// Seconds to run once every user has started.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
}

/// One endpoint's figures.
#[derive(Debug, Clone, Serialize)]
pub struct RequestStats {
    /// 2xx answers.
    pub ok: usize,
    /// Other answers and transport errors.
    pub failed: usize,
    /// Answers by status code.
    pub status_codes: BTreeMap<u16, usize>,
    /// Response time.
    pub latency: Percentiles,
}

/// Result of a `rest` run.
#[derive(Debug, Clone, Serialize)]
pub struct RestReport {
    /// Scenario name.
    pub scenario: &'static str,
    /// Options used.
    pub opts: RestOpts,
    /// Per "METHOD name" figures, from goose.
    pub requests: BTreeMap<String, RequestStats>,
    /// Requests per second over the whole run.
    pub requests_per_sec: f64,
    /// Failures; empty when the run passed.
    pub failures: Vec<String>,
}

impl RestReport {
    /// Human-readable table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:.0} requests/s\n{}\n",
            self.requests_per_sec,
            Percentiles::header()
        );
        for (name, r) in &self.requests {
            s += &r.latency.row(&format!("{name} ({} failed)", r.failed));
            s += "\n";
        }
        if !self.failures.is_empty() {
            s += &format!("FAILED: {}\n", self.failures.join("; "));
        }
        s
    }
}

static PREFIX: OnceLock<String> = OnceLock::new();
const ROOM: &str = "lobby";

#[derive(Clone)]
struct Session {
    token: String,
}

fn prefix() -> &'static str {
    PREFIX.get().map(String::as_str).unwrap_or("rest")
}

async fn sign_up(user: &mut GooseUser) -> TransactionResult {
    let creds = serde_json::json!({
        "username": format!("{}-{}", prefix(), user.weighted_users_index),
        "password": "load-test-password",
    });
    let _ = user.post_json("/api/register", &creds).await?;
    let login = user.post_json("/api/login", &creds).await?;
    let token = match login.response {
        Ok(r) => r
            .json::<serde_json::Value>()
            .await
            .ok()
            .and_then(|v| v["token"].as_str().map(str::to_string)),
        Err(_) => None,
    };
    match token {
        Some(token) => user.set_session_data(Session { token }),
        None => {
            // Without a token every later request fails; goose counts it.
            user.set_session_data(Session {
                token: String::new(),
            })
        }
    }
    Ok(())
}

async fn get(user: &mut GooseUser, path: &str, name: &str) -> TransactionResult {
    let token = user.get_session_data_unchecked::<Session>().token.clone();
    let rb = user
        .get_request_builder(&GooseMethod::Get, path)?
        .bearer_auth(token);
    let req = GooseRequest::builder()
        .set_request_builder(rb)
        .name(name)
        .build();
    let _ = user.request(req).await?;
    Ok(())
}

async fn list_users(user: &mut GooseUser) -> TransactionResult {
    get(user, "/api/users", "users").await
}

async fn list_rooms(user: &mut GooseUser) -> TransactionResult {
    get(user, "/api/rooms", "rooms").await
}

async fn history(user: &mut GooseUser) -> TransactionResult {
    get(
        user,
        &format!("/api/rooms/{ROOM}/messages?limit=50"),
        "history",
    )
    .await
}

/// Run the scenario.
pub async fn run(opts: &RestOpts) -> anyhow::Result<RestReport> {
    anyhow::ensure!(
        opts.users > 0 && opts.duration > 0,
        "--users and --duration must be positive"
    );
    let url = opts
        .common
        .urls
        .first()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("--url is required"))?;
    let _ = PREFIX.set(opts.common.prefix());
    let args = [
        "--host".to_string(),
        url,
        "--users".into(),
        opts.users.to_string(),
        "--increase-rate".into(),
        opts.hatch_rate.to_string(),
        "--run-time".into(),
        format!("{}s", opts.duration),
        "--no-telnet".into(),
        "--no-websocket".into(),
        "--no-print-metrics".into(),
    ];
    let config = goose::config::GooseConfiguration::parse_args_default(&args)
        .map_err(|e| anyhow::anyhow!("goose configuration: {e:?}"))?;
    let metrics = GooseAttack::initialize_with_config(config)
        .map_err(|e| anyhow::anyhow!("goose: {e:?}"))?
        .register_scenario(
            scenario!("chat-rest")
                .register_transaction(transaction!(sign_up).set_on_start())
                .register_transaction(transaction!(list_users))
                .register_transaction(transaction!(list_rooms))
                .register_transaction(transaction!(history)),
        )
        .execute()
        .await
        .map_err(|e| anyhow::anyhow!("goose: {e:?}"))?;
    let mut requests = BTreeMap::new();
    let mut total = 0usize;
    for (name, agg) in &metrics.requests {
        let mut h = stats::histogram();
        for (us, n) in agg.raw_data.times_us.iter() {
            let _ = h.record_n((*us).max(1), *n as u64);
        }
        total += agg.success_count + agg.fail_count;
        requests.insert(
            name.clone(),
            RequestStats {
                ok: agg.success_count,
                failed: agg.fail_count,
                status_codes: agg
                    .status_code_counts
                    .iter()
                    .map(|(k, v)| (*k, *v))
                    .collect(),
                latency: Percentiles::of(&h),
            },
        );
    }
    let secs = metrics.duration.max(1) as f64;
    let mut failures = Vec::new();
    for (name, r) in &requests {
        if r.failed > 0 {
            failures.push(format!("{name}: {} failed requests", r.failed));
        }
    }
    for want in ["users", "rooms", "history"] {
        if !requests.keys().any(|k| k.ends_with(want)) {
            failures.push(format!("no `{want}` requests were made"));
        }
    }
    Ok(RestReport {
        scenario: "rest",
        opts: opts.clone(),
        requests,
        requests_per_sec: total as f64 / secs,
        failures,
    })
}
