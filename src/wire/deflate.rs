//! permessage-deflate (RFC 7692): the offer a handshake accepts, a publication's broadcast
//! compressed once for every subscriber, and inbound messages inflated under a bound.
//!
//! Both directions run without context takeover, so a message never refers to an earlier one:
//! one compressed publication is valid for every subscriber whatever each was sent before, and
//! a connection keeps no 32 KiB window between messages (its idle memory stays ~2 KB). The
//! compressor and the inflater are per thread (per shard), reset for each message.
//!
//! A subscriber's message is one deflate stream made of a *stored* block holding the prefix and
//! its `seq` (written per subscriber, no compression work), then the publication's compressed
//! suffix, encoded once by a fresh compressor that ends byte-aligned with a sync flush. A fresh
//! compressor makes no back-reference into the stored block, so the splice is valid as is.

use crate::error::close::{INVALID_DATA, TOO_BIG};
use crate::error::Close;
use crate::wire::frame;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::cell::RefCell;

/// The empty stored block a sync flush ends with; RFC 7692 7.2.1 drops it on the wire and the
/// receiver puts it back.
const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The first byte of a compressed text frame: FIN, RSV1 (the "compressed" bit), text.
const FIN_RSV1_TEXT: u8 = 0xC1;

/// An accepted permessage-deflate offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The `server_max_window_bits` the client asked for, if it did.
    pub server_window: Option<u8>,
}

impl Accepted {
    /// Whether broadcasts go compressed. The shared compressed suffix uses a 15-bit window; a
    /// client that limits ours below that gets them uncompressed (RFC 7692 lets any message go
    /// uncompressed) and still sends compressed messages we inflate.
    pub fn compresses(&self) -> bool {
        self.server_window.is_none_or(|w| w == 15)
    }

    /// Appends the `Sec-WebSocket-Extensions` value: no context takeover either way (see the
    /// module's comment), and the client's window limit for us echoed, which accepts it.
    pub fn write_response(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(
            b"permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        );
        if let Some(bits) = self.server_window {
            out.extend_from_slice(b"; server_max_window_bits=");
            out.extend_from_slice(bits.to_string().as_bytes());
        }
    }
}

/// The first offer of permessage-deflate in a `Sec-WebSocket-Extensions` value (every header of
/// the request, joined with `,`) that this server accepts (RFC 7692 5, 7.1); offers with an
/// unknown, repeated or invalid parameter are declined.
pub fn negotiate(offers: &str) -> Option<Accepted> {
    offers.split(',').find_map(|offer| {
        let mut parts = offer.split(';').map(str::trim);
        if parts.next() != Some("permessage-deflate") {
            return None;
        }
        params_accepted(parts)
    })
}

fn params_accepted<'a>(params: impl Iterator<Item = &'a str>) -> Option<Accepted> {
    let mut seen: Vec<&str> = Vec::new();
    let mut accepted = Accepted {
        server_window: None,
    };
    for param in params {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (param, None),
        };
        if seen.contains(&name) {
            return None;
        }
        seen.push(name);
        match name {
            "server_no_context_takeover" | "client_no_context_takeover" if value.is_none() => {}
            // The client's own window: any is fine, the inflater always has 15 bits.
            "client_max_window_bits" if value.is_none_or(|v| window_bits(v).is_some()) => {}
            "server_max_window_bits" => accepted.server_window = Some(window_bits(value?)?),
            _ => return None,
        }
    }
    Some(accepted)
}

fn window_bits(v: &str) -> Option<u8> {
    // RFC 7692 7.1.2.1: 1*DIGIT, 8 to 15, no leading zero.
    if v.starts_with('0') || v.len() > 2 {
        return None;
    }
    v.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

thread_local! {
    /// One compressor per shard (miniz's state is ~300 KB): allocated once, reset per use.
    static COMPRESSOR: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
    /// One inflater per shard, reset per message.
    static INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// `suffix` compressed as a fresh raw deflate stream ending in a sync flush, without the
/// flush's last four bytes. None when compression would not make it smaller.
pub fn compress(suffix: &[u8], level: u32) -> Option<Box<[u8]>> {
    COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if !matches!(&*cell, Some((l, _)) if *l == level) {
            *cell = Some((level, Compress::new(Compression::new(level), false)));
        }
        let (_, c) = cell.as_mut()?;
        c.reset();
        let mut out = Vec::with_capacity(suffix.len() / 2 + 64);
        loop {
            let read = c.total_in() as usize;
            c.compress_vec(&suffix[read..], &mut out, FlushCompress::Sync)
                .ok()?;
            // Everything is in and the flush had room: it is complete.
            if c.total_in() as usize == suffix.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if !out.ends_with(&SYNC_TAIL) {
            return None;
        }
        out.truncate(out.len() - SYNC_TAIL.len());
        (out.len() + 16 < suffix.len()).then(|| out.into_boxed_slice())
    })
}

/// Appends one compressed broadcast frame: `prefix` and `seq` in a stored block, then the
/// shared compressed suffix `z` (from `compress`). No compression work per subscriber.
#[inline]
pub fn write_broadcast_frame(out: &mut Vec<u8>, prefix: &[u8], seq: u64, z: &[u8]) {
    let mut digits = itoa::Buffer::new();
    let seq = digits.format(seq).as_bytes();
    // The publication id bounds the prefix far below a stored block's 65,535 bytes.
    let stored = (prefix.len() + seq.len()) as u16;
    let len = 5 + stored as usize + z.len();
    out.reserve(len + 10);
    frame::write_header(out, frame::TEXT, len);
    let at = out.len() - header_len(len);
    out[at] = FIN_RSV1_TEXT;
    // BFINAL 0, BTYPE 00 (stored), then LEN and its complement, little-endian.
    out.push(0);
    out.extend_from_slice(&stored.to_le_bytes());
    out.extend_from_slice(&(!stored).to_le_bytes());
    out.extend_from_slice(prefix);
    out.extend_from_slice(seq);
    out.extend_from_slice(z);
}

/// Whether a compressed frame can carry `prefix` (its stored block is at most 65,535 bytes).
pub fn fits_stored(prefix: &[u8]) -> bool {
    prefix.len() + 20 <= u16::MAX as usize
}

fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Inflates one compressed message (its frames' payloads joined) into `out`, which ends up
/// holding at most `max` bytes: more is a zip bomb or just too big (close 1009); data that is
/// not deflate closes 1007.
pub fn inflate(data: &[u8], max: usize, out: &mut Vec<u8>) -> Result<(), Close> {
    INFLATER.with(|cell| {
        let mut cell = cell.borrow_mut();
        let d = cell.get_or_insert_with(|| Decompress::new(false));
        d.reset(false);
        out.clear();
        // Room for one byte over the limit, so that reaching it is seen.
        let cap = max.saturating_add(1);
        out.reserve((data.len() * 4).max(256).min(cap));
        for input in [data, &SYNC_TAIL[..]] {
            inflate_part(d, input, cap, out)?;
        }
        Ok(())
    })
}

fn inflate_part(
    d: &mut Decompress,
    input: &[u8],
    cap: usize,
    out: &mut Vec<u8>,
) -> Result<(), Close> {
    let bad = || Close::new(INVALID_DATA, "compressed message is not valid deflate data");
    let start = d.total_in();
    loop {
        let read = (d.total_in() - start) as usize;
        let before = (d.total_in(), d.total_out());
        let status = d
            .decompress_vec(&input[read..], out, FlushDecompress::Sync)
            .map_err(|_| bad())?;
        if out.len() >= cap {
            return Err(Close::new(
                TOO_BIG,
                "message larger than max_frame_bytes once inflated",
            ));
        }
        if status == Status::StreamEnd {
            return Ok(());
        }
        // miniz stops at each 32 KiB of its window even with room left and input consumed, so
        // only a call that makes no progress with room left says the part is done.
        if (d.total_in(), d.total_out()) == before && out.len() < out.capacity() {
            let consumed = (d.total_in() - start) as usize == input.len();
            return if consumed { Ok(()) } else { Err(bad()) };
        }
        if out.len() == out.capacity() {
            let more = out.capacity().min(cap - out.len());
            out.reserve_exact(more.max(1));
        }
    }
}

#[cfg(test)]
mod tests;
