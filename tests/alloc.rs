//! Fan-out allocates per publication, not per subscriber (issue 4, STYLE rule 7): one
//! publication to N fresh subscribers of a shard makes a number of allocations that does not
//! grow with N (the flush pass's arena and list grow by doubling).

use broadcaster::channel::Asked;
use broadcaster::channel::Channels;
use broadcaster::config::Config;
use broadcaster::connection::Conn;
use broadcaster::node::Node;
use broadcaster::shard::Shard;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the counter is a const thread-local (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(|c| c.get())
}

/// Allocations made by one publication to `subscribers` fresh subscribers.
fn fan_out_allocations(subscribers: usize, sse: bool) -> u64 {
    let mut config = Config::default();
    config.auth.jwt_secret = Some("test".into());
    let shard = Shard::new(0, Arc::new(Node::new(config, 1).unwrap()));
    let conns: Vec<_> = (0..subscribers)
        .map(|i| match sse {
            true => Conn::new_event_stream(i as u64, 1 << 20),
            false => Conn::new(i as u64, 1 << 20),
        })
        .collect();
    for conn in &conns {
        drop(shard.subscribe(conn, None, "alloc/fanout", Asked::live()));
        if sse {
            // The opening is over: broadcasts carry their event id.
            conn.sse_opened();
        }
        conn.discard_queued();
    }
    shard.flusher().discard();
    let rules = broadcaster::rules::Rules::new(&[], 0, Duration::from_secs(1));
    let mut channels = Channels::new(Arc::new(rules));
    let p = channels
        .publish(
            &broadcaster::wire::request::PublishParams {
                channel: "alloc/fanout".into(),
                event: "e".into(),
                payload: br#"{"n":1}"#.to_vec(),
                from: None,
            },
            "id-1",
            "2026-11-22T00:00:00.000Z",
            Instant::now(),
        )
        .0;
    let before = allocations();
    shard.deliver(&p);
    let made = allocations() - before;
    assert_eq!(
        conns
            .iter()
            .map(|c| c.queued_bytes())
            .filter(|&b| b > 0)
            .count(),
        subscribers,
        "every subscriber got the frame"
    );
    made
}

#[test]
fn fan_out_allocations_do_not_grow_with_subscribers() {
    let small = fan_out_allocations(100, false);
    let large = fan_out_allocations(10_000, false);
    eprintln!(
        "allocations for one publication: 100 subscribers {small}, 10,000 subscribers {large}"
    );
    // Doubling growth of the arena and the flush list: a few dozen at most, where a buffer per
    // subscriber would be 10,000.
    assert!(large < 100, "{large} allocations for 10,000 subscribers");
}

/// The SSE form (SPEC 19) is sliced from the same shared parts, its event id written from the
/// subscription: no allocation per subscriber either.
#[test]
fn sse_fan_out_allocations_do_not_grow_with_subscribers() {
    let small = fan_out_allocations(100, true);
    let large = fan_out_allocations(10_000, true);
    eprintln!("SSE, one publication: 100 subscribers {small}, 10,000 subscribers {large}");
    assert!(
        large < 100,
        "{large} allocations for 10,000 SSE subscribers"
    );
}
