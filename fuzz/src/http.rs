//! A structured generator of HTTP/1.1 request heads, and query strings to decode.

use arbitrary::Arbitrary;

const METHODS: &[&str] = &["GET", "POST", "PUT", "HEAD", "OPTIONS", "get", "G T", ""];
const NAMES: &[&str] = &[
    "Host",
    "Upgrade",
    "Connection",
    "Sec-WebSocket-Key",
    "Sec-WebSocket-Version",
    "Origin",
    "Authorization",
    "Content-Length",
    "Transfer-Encoding",
    "content-length",
    "CONNECTION",
    "X-Forwarded-For",
    "",
    " Host",
    "Host ",
];
const VALUES: &[&str] = &[
    "websocket",
    "Upgrade",
    "keep-alive, Upgrade",
    "close",
    "dGhlIHNhbXBsZSBub25jZQ==",
    "13",
    "8",
    "https://a.example",
    "Bearer k1",
    "bearer  k1  ",
    "Bearer ",
    "Basic YTpi",
    "0",
    "5",
    " 5 ",
    "-1",
    "18446744073709551616",
    "chunked",
    "",
    "\u{e9}",
];
const TARGETS: &[&str] = &[
    "/ws",
    "/publish",
    "/history?channel=a%2Fb&limit=5",
    "/history?channel=%zz",
    "/?",
    "*",
    "http://h/ws?x=1",
    "/ws?a=1?b=2",
];

#[derive(Debug, Arbitrary)]
pub enum Part {
    Known(u8),
    Own(String),
    Bytes(Vec<u8>),
}

impl Part {
    fn write(&self, table: &[&str], out: &mut Vec<u8>) {
        match self {
            Part::Known(i) => out.extend_from_slice(table[*i as usize % table.len()].as_bytes()),
            Part::Own(s) => out.extend_from_slice(s.as_bytes()),
            Part::Bytes(b) => out.extend_from_slice(b),
        }
    }
}

#[derive(Debug, Arbitrary)]
pub struct HeadSpec {
    pub method: Part,
    pub target: Part,
    /// 0: HTTP/1.1, 1: HTTP/1.0, other: as the byte says.
    pub version: u8,
    pub headers: Vec<(Part, Part)>,
    /// Line ends: CRLF mostly, sometimes a bare LF.
    pub lf_only: bool,
    /// Bytes after the head (a body, the next request, frames).
    pub tail: Vec<u8>,
}

impl HeadSpec {
    pub fn encode(&self) -> Vec<u8> {
        let eol: &[u8] = if self.lf_only { b"\n" } else { b"\r\n" };
        let mut out = Vec::new();
        self.method.write(METHODS, &mut out);
        out.push(b' ');
        self.target.write(TARGETS, &mut out);
        out.extend_from_slice(match self.version {
            0 => b" HTTP/1.1",
            1 => b" HTTP/1.0",
            2 => b" HTTP/2.0",
            3 => b"",
            _ => b" HTTP/1.1",
        });
        out.extend_from_slice(eol);
        for (name, value) in &self.headers {
            name.write(NAMES, &mut out);
            out.extend_from_slice(b": ");
            value.write(VALUES, &mut out);
            out.extend_from_slice(eol);
        }
        out.extend_from_slice(eol);
        out.extend_from_slice(&self.tail);
        out
    }
}

/// Percent-encodes every byte that is not ASCII alphanumeric.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
