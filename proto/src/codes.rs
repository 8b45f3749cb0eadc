//! Error codes carried in `error` frames and WebSocket close codes.
//!
//! Error codes are HTTP-like so that the same vocabulary is used over REST
//! and WebSocket. Close codes in the 4000 range are Shoal's own; each tells
//! the client what to do next (see `PROTOCOL.md`).

/// Code in an `error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Malformed frame, missing or wrong-typed field, invalid name.
    BadRequest = 400,
    /// Not authenticated.
    Unauthorized = 401,
    /// Not allowed (not a member of a DM, publish-only-by-server namespace).
    Forbidden = 403,
    /// Unknown room or user.
    NotFound = 404,
    /// The room is full or a per-connection limit was hit.
    Conflict = 409,
    /// Message larger than the configured limit.
    TooLarge = 413,
    /// Rate limit exceeded; slow down.
    RateLimited = 429,
    /// Internal error.
    Internal = 500,
    /// A dependency (storage, bus) is unavailable; retry later.
    Unavailable = 503,
}

impl ErrorCode {
    /// Numeric value.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// Short machine-readable name, used as a metrics label and REST `error` field.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// WebSocket close code sent by the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// Normal closure.
    Normal = 1000,
    /// The broker is shutting down; reconnect (to another node) with backoff.
    GoingAway = 1001,
    /// Protocol error at the WebSocket layer (bad opcode, bad fragmentation).
    Protocol = 1002,
    /// Invalid UTF-8 in a text message.
    InvalidPayload = 1007,
    /// Policy violation: sustained rate limiting, abuse. Do not reconnect at once.
    Policy = 1008,
    /// A message exceeded the size limit.
    TooBig = 1009,
    /// Unexpected server error.
    Internal = 1011,
    /// The token expired while connected; get a new token and reconnect.
    TokenExpired = 4001,
    /// The token was revoked (logout); do not reconnect with it.
    TokenRevoked = 4002,
    /// The client did not read fast enough and its outbound queue overflowed;
    /// reconnect and recover with `since`.
    SlowConsumer = 4003,
    /// No frame from the client within the idle timeout.
    IdleTimeout = 4004,
    /// The broker is overloaded; reconnect after a randomized backoff.
    TryAgainLater = 4005,
    /// This node lost its cluster bus (Redis) for longer than its grace
    /// period; reconnect (through the load balancer, to another node) and
    /// recover with `since`.
    ClusterLost = 4006,
    /// An operator disconnected this connection (the admin console); do
    /// not reconnect automatically.
    Disconnected = 4007,
}

impl CloseCode {
    /// Numeric value.
    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// Short reason sent in the close frame and used as a metrics label.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::GoingAway => "shutdown",
            CloseCode::Protocol => "protocol error",
            CloseCode::InvalidPayload => "invalid payload",
            CloseCode::Policy => "policy violation",
            CloseCode::TooBig => "message too big",
            CloseCode::Internal => "internal error",
            CloseCode::TokenExpired => "token expired",
            CloseCode::TokenRevoked => "token revoked",
            CloseCode::SlowConsumer => "slow consumer",
            CloseCode::IdleTimeout => "idle timeout",
            CloseCode::TryAgainLater => "try again later",
            CloseCode::ClusterLost => "cluster link lost",
            CloseCode::Disconnected => "disconnected by an operator",
        }
    }

    /// Every close code, for documentation tests and metrics pre-registration.
    pub const ALL: [CloseCode; 14] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::Protocol,
        CloseCode::InvalidPayload,
        CloseCode::Policy,
        CloseCode::TooBig,
        CloseCode::Internal,
        CloseCode::TokenExpired,
        CloseCode::TokenRevoked,
        CloseCode::SlowConsumer,
        CloseCode::IdleTimeout,
        CloseCode::TryAgainLater,
        CloseCode::ClusterLost,
        CloseCode::Disconnected,
    ];
}
