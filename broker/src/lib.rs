//! Shoal broker library: everything behind the thin `shoal` binary, so
//! integration tests can run a real server on port 0 with
//! [`server::run`].

pub mod auth;
pub mod bus;
pub mod clock;
pub mod config;
pub mod conn;
pub mod directory;
pub mod http;
pub mod httpconn;
pub mod hub;
pub mod limiter;
pub mod maskcheck;
pub mod metrics;
pub mod outbound;
pub mod persist;
pub mod server;
pub mod state;
pub mod store;
pub mod tls;
pub mod webhook;

pub use config::Config;
