//! Why the hub refused a request: an error code from the protocol (what
//! the client is told to do) and a message for people. Every refusal in
//! the hub, the connection handler and the REST layer is one of these; the
//! WebSocket side sends it as an `error` frame, REST as the matching HTTP
//! status with a JSON body.

use shoal_proto::ErrorCode;
use thiserror::Error;

/// A request refused by the hub.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{code:?}: {message}")]
pub struct HubError {
    /// What the client should do (see PROTOCOL.md, error codes).
    pub code: ErrorCode,
    /// What happened, for people; never internals.
    pub message: String,
}

impl HubError {
    /// A refusal with `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        HubError {
            code,
            message: message.into(),
        }
    }
}

impl From<(ErrorCode, String)> for HubError {
    fn from((code, message): (ErrorCode, String)) -> Self {
        HubError { code, message }
    }
}
