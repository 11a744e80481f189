//! The WebSocket opening handshake (RFC 6455 4.2): is a request head a valid upgrade, from an
//! allowed origin; and the 101 answer that accepts it.

use crate::error::{err, Code, Error};
use crate::wire::deflate::Accepted;
use crate::wire::http::Head;

/// Why an upgrade is refused: the HTTP status and the error it answers with. A 426 carries no
/// error body, only `sec-websocket-version: 13` (`http::write_upgrade_required`).
#[derive(Debug)]
pub(crate) struct Refused {
    pub status: u16,
    pub error: Error,
}

fn refused(status: u16, code: Code, message: &str) -> Refused {
    Refused {
        status,
        error: err(code, message),
    }
}

/// Checks an upgrade request: a GET with `Upgrade: websocket` and `Connection: Upgrade`, version
/// 13, a 24-character key, and an allowed `Origin` (`allowed_origins` empty: any; a handshake
/// without `Origin` is allowed, SPEC 13.15; origins compare exactly).
pub(crate) fn check(head: &Head, allowed_origins: &[String]) -> Result<(), Refused> {
    if head.method != "GET" {
        return Err(refused(
            405,
            Code::InvalidArgument,
            "a WebSocket upgrade is a GET",
        ));
    }
    if !head.upgrade_websocket || !head.connection_upgrade {
        let message = "expected Upgrade: websocket and Connection: Upgrade";
        return Err(refused(400, Code::InvalidArgument, message));
    }
    if head.ws_version.as_deref() != Some("13") {
        return Err(refused(
            426,
            Code::InvalidArgument,
            "WebSocket version 13 only",
        ));
    }
    if head.ws_key.as_deref().is_none_or(|k| k.len() != 24) {
        let message = "missing or malformed Sec-WebSocket-Key";
        return Err(refused(400, Code::InvalidArgument, message));
    }
    let allowed = match head.origin.as_deref() {
        _ if allowed_origins.is_empty() => true,
        None => true,
        Some(o) => allowed_origins.iter().any(|a| a == o),
    };
    if !allowed {
        return Err(refused(403, Code::PermissionDenied, "origin not allowed"));
    }
    Ok(())
}

/// Appends the 101 answer that turns the connection into a WebSocket, with permessage-deflate
/// when `deflate` (the client offered it and `compression.enabled`).
pub(crate) fn write_accept(out: &mut Vec<u8>, ws_key: &str, deflate: Option<Accepted>) {
    let accept = tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
    out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: ");
    out.extend_from_slice(accept.as_bytes());
    if let Some(accepted) = deflate {
        out.extend_from_slice(b"\r\nsec-websocket-extensions: ");
        accepted.write_response(out);
    }
    out.extend_from_slice(b"\r\n\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::http::parse_head;

    fn head(extra: &str) -> Head {
        let text = format!("GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n");
        parse_head(text.as_bytes(), 8192).unwrap().unwrap()
    }

    #[test]
    fn upgrades_are_checked_in_order() {
        let v13 = "Sec-WebSocket-Version: 13\r\n";
        assert!(check(&head(v13), &[]).is_ok());
        assert_eq!(check(&head(""), &[]).unwrap_err().status, 426);
        let origins = vec!["https://a.example".to_string()];
        let from = |o: &str| head(&format!("{v13}Origin: {o}\r\n"));
        assert!(check(&from("https://a.example"), &origins).is_ok());
        assert_eq!(
            check(&from("https://b.example"), &origins)
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            check(&from("https://a.example:443"), &origins)
                .unwrap_err()
                .status,
            403
        );
        assert!(
            check(&head(v13), &origins).is_ok(),
            "no Origin: not a browser"
        );
        let mut post = head(v13);
        post.method = "POST".into();
        assert_eq!(check(&post, &[]).unwrap_err().status, 405);
        let mut out = Vec::new();
        write_accept(&mut out, "dGhlIHNhbXBsZSBub25jZQ==", None);
        let text = String::from_utf8(out).unwrap();
        // The sample key and accept value of RFC 6455 section 1.3.
        assert!(text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{text}");
    }
}
