//! JSON oracles and a structured JSON generator for the protocol and REST targets.
//!
//! `is_valid_json` is a strict RFC 8259 grammar check written without recursion, so that it has
//! no depth limit and no number range: it says whether a byte string is one JSON text, nothing
//! more. `raw_members` asks serde_json for the raw text of each member of an object, which is
//! the independent answer to "which bytes are the value of key K".

use arbitrary::{Arbitrary, Result, Unstructured};
use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// RFC 8259: one JSON value, optionally surrounded by whitespace, and nothing else.
pub fn is_valid_json(t: &[u8]) -> bool {
    let mut p = Parser { t, i: 0 };
    p.ws();
    if !p.value() {
        return false;
    }
    p.ws();
    p.i == t.len()
}

struct Parser<'a> {
    t: &'a [u8],
    i: usize,
}

/// What the iterative parser is inside of.
#[derive(Clone, Copy, PartialEq)]
enum Frame {
    Array,
    Object,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.t.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn literal(&mut self, word: &[u8]) -> bool {
        if self.t[self.i..].starts_with(word) {
            self.i += word.len();
            true
        } else {
            false
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.i;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.i += 1;
        }
        self.i - start
    }

    fn number(&mut self) -> bool {
        self.eat(b'-');
        match self.peek() {
            Some(b'0') => self.i += 1,
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return false,
        }
        if self.eat(b'.') && self.digits() == 0 {
            return false;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if self.digits() == 0 {
                return false;
            }
        }
        true
    }

    /// A string starting at the opening quote; its content must be UTF-8 without raw control
    /// characters, and escapes must be the eight of RFC 8259 or `\u` with four hex digits.
    fn string(&mut self) -> bool {
        if !self.eat(b'"') {
            return false;
        }
        let start = self.i;
        loop {
            match self.peek() {
                None => return false,
                Some(b'"') => {
                    let ok = std::str::from_utf8(&self.t[start..self.i]).is_ok();
                    self.i += 1;
                    return ok;
                }
                Some(b'\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => self.i += 1,
                        Some(b'u') => {
                            let hex = self.t.get(self.i + 1..self.i + 5);
                            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                                return false;
                            }
                            self.i += 5;
                        }
                        _ => return false,
                    }
                }
                Some(0..=0x1f) => return false,
                Some(_) => self.i += 1,
            }
        }
    }

    fn scalar(&mut self) -> bool {
        match self.peek() {
            Some(b'"') => self.string(),
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => false,
        }
    }

    fn value(&mut self) -> bool {
        let mut stack: Vec<Frame> = Vec::new();
        // Parse a value, then unwind: after each value, either a ',' and the next element, or
        // the closing bracket of the innermost container.
        'value: loop {
            self.ws();
            match self.peek() {
                Some(b'[') => {
                    self.i += 1;
                    self.ws();
                    if !self.eat(b']') {
                        stack.push(Frame::Array);
                        continue 'value;
                    }
                }
                Some(b'{') => {
                    self.i += 1;
                    self.ws();
                    if !self.eat(b'}') {
                        stack.push(Frame::Object);
                        if !self.member_key() {
                            return false;
                        }
                        continue 'value;
                    }
                }
                _ => {
                    if !self.scalar() {
                        return false;
                    }
                }
            }
            loop {
                let Some(&top) = stack.last() else {
                    return true;
                };
                self.ws();
                if self.eat(b',') {
                    if top == Frame::Object && !self.member_key() {
                        return false;
                    }
                    continue 'value;
                }
                let close = if top == Frame::Array { b']' } else { b'}' };
                if !self.eat(close) {
                    return false;
                }
                stack.pop();
            }
        }
    }

    /// `"key" :` inside an object.
    fn member_key(&mut self) -> bool {
        self.ws();
        if !self.string() {
            return false;
        }
        self.ws();
        self.eat(b':')
    }
}

/// The members of a JSON object with the raw text of each value, in order, duplicates kept.
pub struct Members<'a>(pub Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Members<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Members<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: MapAccess<'de>>(
                self,
                mut m: M,
            ) -> std::result::Result<Self::Value, M::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

impl<'a> Members<'a> {
    /// The raw values of every member named `key`, in order.
    pub fn all(&self, key: &str) -> Vec<&'a str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.get())
            .collect()
    }

    /// The raw value of `key` when it occurs once (with duplicates, which one a parser uses is
    /// its choice; the oracle only asks that it be one of them).
    pub fn unique(&self, key: &str) -> Option<&'a str> {
        match self.all(key).as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
}

/// serde_json's members of `text` when it is an object serde_json accepts.
pub fn raw_members(text: &[u8]) -> Option<Members<'_>> {
    serde_json::from_slice::<Members>(text).ok()
}

/// serde_json parses `t` as one value, except for the two limits serde_json has and RFC 8259
/// does not: nesting deeper than 128 and numbers beyond f64.
pub fn serde_accepts(t: &[u8]) -> Result<(), String> {
    match serde_json::from_slice::<serde::de::IgnoredAny>(t) {
        Ok(_) => Ok(()),
        Err(e) => {
            let m = e.to_string();
            if m.contains("recursion limit") || m.contains("number out of range") {
                Ok(())
            } else {
                Err(m)
            }
        }
    }
}

/// The deepest nesting of arrays and objects in `t`, outside strings (for a valid text).
pub fn depth(t: &[u8]) -> usize {
    let (mut depth, mut deepest, mut i) = (0usize, 0usize, 0);
    while i < t.len() {
        match t[i] {
            b'"' => {
                i += 1;
                while i < t.len() && t[i] != b'"' {
                    i += if t[i] == b'\\' { 2 } else { 1 };
                }
            }
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    deepest
}

// ---- a structured generator: JSON texts that look like requests ----

/// How a string is written: plain, with every character as `\u` escapes, or raw bytes.
#[derive(Debug, Arbitrary)]
pub enum Str {
    Plain(String),
    Escaped(String),
    /// Known names, so that the generator reaches the interesting branches often.
    Known(u8),
    /// Bytes written verbatim between quotes: may be invalid, on purpose.
    Raw(Vec<u8>),
    /// Text around the escape of one UTF-16 surrogate, paired or not: valid JSON that is not
    /// Unicode text unless paired.
    Surrogate(String, u16, bool),
}

const KNOWN: &[&str] = &[
    "id",
    "method",
    "params",
    "channel",
    "channels",
    "event",
    "payload",
    "token",
    "since",
    "offset",
    "epoch",
    "auth",
    "subscribe",
    "unsubscribe",
    "publish",
    "heartbeat",
    "user",
    "code",
    "reason",
    "jti",
    "issuedBefore",
    "2026-12-06T10:00:00Z",
    "2026-12-06T10:00:00.5+02:00",
    "a",
    "c/x",
    "contest/annual-2024/scoreboard",
    "",
    "*",
    "a b",
    "é",
    "\u{85}",
    "\u{3000}",
];

#[derive(Debug, Arbitrary)]
pub enum Num {
    Int(i64),
    Big(u64),
    Float(f64),
    /// Number spellings at the edges of the grammar.
    Text(u8),
}

const NUMBERS: &[&str] = &[
    "0",
    "-0",
    "1e400",
    "-1e-400",
    "1.5E+3",
    "123456789012345678901234567890",
    "0.0",
    "1E2",
    "-9223372036854775808",
    "18446744073709551616",
    "01",
    "1.",
    ".5",
    "+1",
    "0x10",
    "Infinity",
];

#[derive(Debug, Arbitrary)]
pub enum Json {
    Null,
    Bool(bool),
    Num(Num),
    Str(Str),
    Arr(Vec<Json>),
    Obj(Vec<(Str, Json)>),
    /// A request-shaped object: the generator's way to reach deep parser branches quickly.
    Request {
        id: Option<Box<Json>>,
        method: Option<Str>,
        params: Option<Box<Json>>,
        extra: Vec<(Str, Json)>,
        order: u8,
    },
    /// `[[[...]]]` of some depth, for depth limits.
    Deep(u16),
    /// Any bytes, for the paths that reject.
    Garbage(Vec<u8>),
}

/// Whitespace choices between tokens.
const WS: &[&str] = &["", " ", "\n", "\t", "\r\n  ", "   "];

pub struct Writer<'u, 'a> {
    pub out: Vec<u8>,
    u: &'u mut Unstructured<'a>,
    depth: usize,
}

impl<'u, 'a> Writer<'u, 'a> {
    pub fn new(u: &'u mut Unstructured<'a>) -> Self {
        Writer {
            out: Vec::new(),
            u,
            depth: 0,
        }
    }

    fn ws(&mut self) {
        let i: u8 = self.u.arbitrary().unwrap_or(0);
        // Mostly no whitespace; sometimes some.
        let w = if i < 200 {
            ""
        } else {
            WS[i as usize % WS.len()]
        };
        self.out.extend_from_slice(w.as_bytes());
    }

    pub fn str(&mut self, s: &Str) {
        match s {
            Str::Plain(s) => {
                let _ = serde_json::to_writer(&mut self.out, s);
            }
            Str::Escaped(s) => {
                self.out.push(b'"');
                for c in s.chars() {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        self.out
                            .extend_from_slice(format!("\\u{unit:04x}").as_bytes());
                    }
                }
                self.out.push(b'"');
            }
            Str::Known(i) => {
                let s = KNOWN[*i as usize % KNOWN.len()];
                let _ = serde_json::to_writer(&mut self.out, s);
            }
            Str::Raw(b) => {
                self.out.push(b'"');
                self.out.extend_from_slice(b);
                self.out.push(b'"');
            }
            Str::Surrogate(text, unit, paired) => {
                let unit = 0xD800 | (unit & 0x7FF);
                let mut s = serde_json::to_string(text).unwrap_or_default();
                s.pop();
                s.push_str(&format!("\\u{unit:04x}"));
                if *paired && unit < 0xDC00 {
                    s.push_str("\\udc00");
                }
                s.push('"');
                self.out.extend_from_slice(s.as_bytes());
            }
        }
    }

    pub fn value(&mut self, v: &Json) {
        self.depth += 1;
        self.ws();
        match v {
            Json::Null => self.out.extend_from_slice(b"null"),
            Json::Bool(b) => self
                .out
                .extend_from_slice(if *b { b"true" } else { b"false" }),
            Json::Num(Num::Int(i)) => self.out.extend_from_slice(i.to_string().as_bytes()),
            Json::Num(Num::Big(i)) => self.out.extend_from_slice(i.to_string().as_bytes()),
            Json::Num(Num::Float(f)) => {
                if f.is_finite() {
                    self.out.extend_from_slice(format!("{f:e}").as_bytes());
                } else {
                    self.out.extend_from_slice(b"1e999");
                }
            }
            Json::Num(Num::Text(i)) => self
                .out
                .extend_from_slice(NUMBERS[*i as usize % NUMBERS.len()].as_bytes()),
            Json::Str(s) => self.str(s),
            Json::Arr(items) => {
                self.out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        self.out.push(b',');
                    }
                    self.value(item);
                }
                self.ws();
                self.out.push(b']');
            }
            Json::Obj(members) => self.object(members.iter().map(|(k, v)| (k, v))),
            Json::Request {
                id,
                method,
                params,
                extra,
                order,
            } => {
                let id_key = Str::Known(0);
                let method_key = Str::Known(1);
                let params_key = Str::Known(2);
                let method_value = method.as_ref().map(|m| Json::Str(clone_str(m)));
                let mut members: Vec<(&Str, &Json)> = Vec::new();
                if let Some(id) = id {
                    members.push((&id_key, id));
                }
                if let Some(m) = &method_value {
                    members.push((&method_key, m));
                }
                if let Some(p) = params {
                    members.push((&params_key, p));
                }
                for (k, v) in extra {
                    members.push((k, v));
                }
                if !members.is_empty() {
                    let n = members.len();
                    members.rotate_left(*order as usize % n);
                }
                self.object(members.into_iter());
            }
            Json::Deep(n) => {
                let n = *n as usize % 2000;
                self.out.extend(std::iter::repeat_n(b'[', n));
                self.out.extend(std::iter::repeat_n(b']', n));
            }
            Json::Garbage(b) => self.out.extend_from_slice(b),
        }
        self.ws();
        self.depth -= 1;
    }

    fn object<'s>(&mut self, members: impl Iterator<Item = (&'s Str, &'s Json)>) {
        self.out.push(b'{');
        for (i, (k, v)) in members.enumerate() {
            if i > 0 {
                self.out.push(b',');
            }
            self.ws();
            self.str(k);
            self.ws();
            self.out.push(b':');
            self.value(v);
        }
        self.ws();
        self.out.push(b'}');
    }
}

fn clone_str(s: &Str) -> Str {
    match s {
        Str::Plain(s) => Str::Plain(s.clone()),
        Str::Escaped(s) => Str::Escaped(s.clone()),
        Str::Known(i) => Str::Known(*i),
        Str::Raw(b) => Str::Raw(b.clone()),
        Str::Surrogate(t, u, p) => Str::Surrogate(t.clone(), *u, *p),
    }
}

/// A JSON text from the structured generator (or, on the `Garbage` branch, anything).
pub fn generate(u: &mut Unstructured) -> Result<Vec<u8>> {
    let v: Json = u.arbitrary()?;
    let mut w = Writer::new(u);
    w.value(&v);
    Ok(w.out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grammar_check_agrees_with_serde_json_on_plain_cases() {
        for ok in [
            "0",
            "-0.5e+3",
            "\"\\u00e9\"",
            "[]",
            "{}",
            " {\"a\" : [1, {\"b\":null}] } ",
            "1e400",
        ] {
            assert!(is_valid_json(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "01",
            "1.",
            ".5",
            "+1",
            "[1,]",
            "{\"a\"}",
            "{\"a\":1,}",
            "\"\\x\"",
            "\"\u{1}\"",
            "[",
            "]",
            "{} {}",
            "nul",
            "\"\\u12\"",
            "[1 2]",
            "{1:2}",
        ] {
            assert!(!is_valid_json(bad.as_bytes()), "{bad:?}");
        }
        assert!(!is_valid_json(b"\"\xff\""));
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(is_valid_json(deep.as_bytes()));
    }

    #[test]
    fn depth_counts_containers_outside_strings() {
        assert_eq!(depth(b"1"), 0);
        assert_eq!(depth(b"[[],{\"a\":[1]}]"), 3);
        assert_eq!(depth(b"[\"[[[\\\"[\"]"), 1);
    }

    #[test]
    fn raw_members_keep_value_text() {
        let m = raw_members(br#"{"a": {"x" :1} , "b":"\u0041","a":2}"#).unwrap();
        assert_eq!(m.all("a"), vec![r#"{"x" :1}"#, "2"]);
        assert_eq!(m.unique("a"), None);
        assert_eq!(m.unique("b"), Some(r#""\u0041""#));
        assert_eq!(m.unique("z"), None);
        let m = raw_members(br#"{"p\u0061yload": {"x" :1} }"#).unwrap();
        assert_eq!(m.unique("payload"), Some(r#"{"x" :1}"#));
    }
}
