//! The one HTTP/1.1 answer reader, for the REST publisher's keep-alive connection, and one-shot
//! `GET`s (the `/metrics` scrapes, `GET /presence`).

use std::io::{Read, Write};
use std::time::Duration;

use crate::net::Node;
use crate::ws;

/// `GET path` on `node` over a fresh connection (closed after the answer), with `Authorization:
/// Bearer` when a key is given: the status and the body.
pub(crate) fn get(node: &Node, path: &str, bearer: Option<&str>) -> Result<(u16, Vec<u8>), String> {
    let mut s = crate::net::connect_blocking(node.addr, None)
        .map_err(|e| format!("connect to {} for {path} failed: {e}", node.addr))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let auth = bearer
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\n{auth}Connection: close\r\n\r\n",
        node.host
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("{path} request: {e}"))?;
    read_http_response(&mut s, &mut Vec::new())
}

/// Reads one HTTP/1.1 response with a Content-Length body; `buf` keeps bytes of the next one.
pub(crate) fn read_http_response<R: Read>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<(u16, Vec<u8>), String> {
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = ws::find(buf, b"\r\n\r\n") {
            break p;
        }
        if buf.len() > 64 * 1024 {
            return Err("response head over 64 KiB".into());
        }
        let n = r.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("server closed the publish connection".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let (status, len) = parse_head(&head)?;
    if len > 16 << 20 {
        return Err(format!("response body of {len} bytes"));
    }
    let start = head_end + 4;
    while buf.len() < start + len {
        let n = r.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("server closed the publish connection mid-body".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[start..start + len].to_vec();
    buf.drain(..start + len);
    Ok((status, body))
}

/// The status and the Content-Length (0 when absent) of a response head.
fn parse_head(head: &str) -> Result<(u16, usize), String> {
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let mut len = 0usize;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                len = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("bad content-length {v:?}"))?;
            }
        }
    }
    Ok((status, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_responses_are_read_back_to_back() {
        let data = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"offset\":1}HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\n\r\n{}";
        // {"offset":1} is 12 bytes: the first body is cut at 11 on purpose to prove the length rules.
        let mut r = &data[..];
        let mut buf = Vec::new();
        let (s, b) = read_http_response(&mut r, &mut buf).unwrap();
        assert_eq!(s, 200);
        assert_eq!(b, b"{\"offset\":1");
        assert_eq!(buf.first(), Some(&b'}'));
        buf.remove(0);
        let (s, b) = read_http_response(&mut r, &mut buf).unwrap();
        assert_eq!((s, &b[..]), (413, &b"{}"[..]));
        assert!(read_http_response(&mut r, &mut buf).is_err());
    }
}
