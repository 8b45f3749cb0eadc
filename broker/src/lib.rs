//! Shoal broker library: everything behind the thin `shoal` binary, so
//! integration tests can run a real server on port 0 with
//! [`server::run`].
//!
//! Public: what the binary, the integration tests and the fuzz targets
//! use (configuration, the server entry point, the store and its
//! conformance suite, and the decoders a stranger reaches first: token,
//! WebSocket frames, REST bodies). Everything else is crate-private, so
//! the compiler shows what is unused.

pub mod auth;
pub(crate) mod bus;
pub(crate) mod clock;
pub mod config;
pub mod conn;
pub(crate) mod directory;
pub mod http;
pub(crate) mod httpconn;
pub(crate) mod hub;
pub(crate) mod limiter;
pub(crate) mod metrics;
pub(crate) mod outbound;
pub(crate) mod persist;
pub mod server;
pub(crate) mod session;
pub(crate) mod sio;
pub(crate) mod state;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub(crate) mod tls;
pub(crate) mod webhook;
pub mod wsframe;

pub use config::Config;
