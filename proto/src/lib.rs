//! Shoal wire protocol: every frame a client or server sends, its two
//! encodings (MessagePack and JSON, chosen by WebSocket subprotocol), their
//! Socket.IO event form (`sio`), the
//! error and close codes, and the naming rules for rooms and users.
//!
//! This crate does no IO. Decoding untrusted bytes returns a typed
//! [`DecodeError`]; it never panics. The full specification for client
//! authors is `proto/PROTOCOL.md`.

pub mod body;
pub mod bus;
pub mod codec;
pub mod codes;
pub mod entry;
pub mod frame;
pub mod names;
pub mod sio;

pub use body::{check_body, BodyError, MAX_BODY_DEPTH};
pub use codec::{DecodeError, EncodeError, Encoding, DEFAULT_MAX_DEPTH};
pub use codes::{CloseCode, ErrorCode};
pub use entry::{EventKind, Meta};
pub use frame::{Body, ClientFrame, MarkState, Receipt, ServerFrame, StoredMsg};
pub use names::{NameError, RoomName};
