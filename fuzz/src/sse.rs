//! The SSE `Last-Event-ID` decoder (SPEC 19, 22.5): a browser sends back whatever id it last
//! saw, and anything in between (a proxy, a hand-made client) may change it.

use arbitrary::{Arbitrary, Unstructured};
use broadcaster::wire::sse::{decode_positions, encode_positions, Position, ENTRY_BYTES_MAX};

/// One position as a generator makes it: an epoch of ASCII letters and digits (or, sometimes,
/// of anything) and an offset.
#[derive(Debug, Arbitrary)]
struct EntrySpec {
    present: bool,
    epoch: Vec<u8>,
    any_bytes: bool,
    offset: u64,
}

pub fn sse_event_id(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(channels) = u.int_in_range(0..=24usize) else {
        return;
    };
    let Ok(structured) = u.arbitrary::<bool>() else {
        return;
    };
    if structured {
        let Ok(specs) = u.arbitrary::<Vec<EntrySpec>>() else {
            return;
        };
        check_structured(&specs, channels);
    } else {
        let rest = u.bytes(u.len()).unwrap_or_default();
        check_text(&String::from_utf8_lossy(rest), channels);
    }
}

/// Any text: decode never panics, answers one position per channel, accepts only ids it
/// would write itself (so encode gives the same text back), and bounds what it accepts.
fn check_text(id: &str, channels: usize) {
    let Ok(positions) = decode_positions(id, channels) else {
        return;
    };
    assert_eq!(positions.len(), channels);
    assert_eq!(encode_positions(&positions), id, "not the canonical form");
    assert!(id.len() <= channels * (ENTRY_BYTES_MAX + 1));
    for p in positions.iter().flatten() {
        assert!(!p.epoch.is_empty() && p.epoch.bytes().all(|b| b.is_ascii_alphanumeric()));
    }
}

/// Ids written by an independent encoder (the format of the module docs) decode to their
/// positions when valid, and are refused when not.
fn check_structured(specs: &[EntrySpec], channels: usize) {
    let mut positions: Vec<Option<Position>> = specs
        .iter()
        .map(|s| {
            s.present.then(|| {
                let epoch: String = if s.any_bytes {
                    String::from_utf8_lossy(&s.epoch).into_owned()
                } else {
                    s.epoch
                        .iter()
                        .map(|b| b"0123456789abcdefABCDEFxyz"[*b as usize % 25] as char)
                        .collect()
                };
                Position {
                    epoch,
                    offset: s.offset,
                }
            })
        })
        .collect();
    while positions.last().is_some_and(Option::is_none) {
        positions.pop();
    }
    let id = positions
        .iter()
        .map(|p| match p {
            Some(p) => format!("{}.{}", p.epoch, p.offset),
            None => String::new(),
        })
        .collect::<Vec<_>>()
        .join("_");
    let valid = positions.len() <= channels
        && positions.iter().flatten().all(|p| {
            !p.epoch.is_empty()
                && p.epoch.len() <= 64
                && p.epoch.bytes().all(|b| b.is_ascii_alphanumeric())
        });
    // An epoch holding a separator makes an id that may read as other, valid positions.
    let ambiguous = positions
        .iter()
        .flatten()
        .any(|p| p.epoch.contains(['.', '_']));
    match decode_positions(&id, channels) {
        Ok(_) if !valid => assert!(ambiguous, "accepted {id:?} for {channels} channels"),
        Ok(decoded) => {
            assert_eq!(&decoded[..positions.len()], &positions[..]);
            assert!(decoded[positions.len()..].iter().all(Option::is_none));
        }
        Err(_) => assert!(!valid, "refused the valid {id:?} for {channels} channels"),
    }
    check_text(&id, channels);
}
