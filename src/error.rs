//! What can go wrong, as clients see it: the error codes of requests (SPEC 4) with the HTTP
//! statuses REST answers them with, and the close codes of connections. Each says what the
//! client should do next.

/// Error codes of SPEC section 4 (gRPC names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The request or a parameter is malformed: fix the request.
    InvalidArgument,
    /// No such method, subscription or endpoint.
    NotFound,
    /// Already subscribed to the channel.
    AlreadyExists,
    /// Not possible in this state (re-auth with another `sub`): open a new connection.
    FailedPrecondition,
    /// The token does not allow it: get a token that does.
    PermissionDenied,
    /// Authenticate first, or with a valid token or API key.
    Unauthenticated,
    /// Over a rate or size limit: slow down or send less.
    ResourceExhausted,
    /// Shutting down, or the cluster broker unreachable: retry, another node if need be.
    Unavailable,
    /// A fault of the server: report it.
    Internal,
}

impl Code {
    /// The code's name, as the protocol writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidArgument => "InvalidArgument",
            Code::NotFound => "NotFound",
            Code::AlreadyExists => "AlreadyExists",
            Code::FailedPrecondition => "FailedPrecondition",
            Code::PermissionDenied => "PermissionDenied",
            Code::Unauthenticated => "Unauthenticated",
            Code::ResourceExhausted => "ResourceExhausted",
            Code::Unavailable => "Unavailable",
            Code::Internal => "Internal",
        }
    }

    /// The code `as_str` names `name`, if it is one of ours (exact spelling): how an access
    /// backend's error code is read (SPEC 15).
    pub fn from_name(name: &str) -> Option<Code> {
        Code::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// The HTTP status REST answers with (SPEC section 3).
    pub fn http_status(self) -> u16 {
        match self {
            Code::InvalidArgument => 400,
            Code::Unauthenticated => 401,
            Code::PermissionDenied => 403,
            Code::NotFound => 404,
            Code::AlreadyExists | Code::FailedPrecondition => 409,
            Code::ResourceExhausted => 413,
            Code::Unavailable => 503,
            Code::Internal => 500,
        }
    }

    /// Every code, in the order metrics label them.
    pub const ALL: [Code; 9] = [
        Code::InvalidArgument,
        Code::NotFound,
        Code::AlreadyExists,
        Code::FailedPrecondition,
        Code::PermissionDenied,
        Code::Unauthenticated,
        Code::ResourceExhausted,
        Code::Unavailable,
        Code::Internal,
    ];
}

#[derive(Debug, Clone, PartialEq, Eq)]
/// An error answer: its code and a message for people.
pub struct Error {
    /// What kind of error, and so what the client should do.
    pub code: Code,
    /// What was wrong, for the person reading it.
    pub message: String,
}

/// An error of `code` saying `message`.
pub fn err(code: Code, message: impl Into<String>) -> Error {
    Error {
        code,
        message: message.into(),
    }
}

/// Close codes this server sends. Each says what the client should do next.
pub mod close {
    /// Normal closure: the client asked to close, or unsubscribed and left.
    pub const NORMAL: u16 = 1000;
    /// Server shutting down: reconnect (to another node) with `since` to recover.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke RFC 6455 (unmasked frame, reserved bits, bad opcode): fix the client.
    pub const PROTOCOL: u16 = 1002;
    /// Text that is not UTF-8: fix the client.
    pub const INVALID_DATA: u16 = 1007;
    /// Message larger than `max_frame_bytes`: send smaller messages.
    pub const TOO_BIG: u16 = 1009;
    /// Not authenticated within `auth_timeout`: send `auth` first.
    pub const AUTH_TIMEOUT: u16 = 4001;
    /// Token expired: get a fresh token, reconnect, and resubscribe with `since`.
    pub const TOKEN_EXPIRED: u16 = 4002;
    /// Slow consumer (send queue over `outbound_buffer_bytes`): reconnect with `since`.
    pub const SLOW_CONSUMER: u16 = 4003;
    /// Far over the request rate: back off before reconnecting.
    pub const TOO_MANY_REQUESTS: u16 = 4004;
    /// Silent past twice the ping interval: reconnect with `since`.
    pub const PING_TIMEOUT: u16 = 4005;
    /// Disconnected by the backend (`POST /disconnect`): reconnect is allowed.
    pub const DISCONNECTED: u16 = 4006;
    /// Token revoked: get a new token; do not retry with this one.
    pub const REVOKED: u16 = 4007;
}

/// Why a connection is closed: the code and a short reason for the close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    /// The close code (`close`).
    pub code: u16,
    /// The close frame's reason text.
    pub reason: &'static str,
}

impl Close {
    pub(crate) const fn new(code: u16, reason: &'static str) -> Close {
        Close { code, reason }
    }
}
