//! Every connection's next due time (auth timeout, ping, ping timeout, token expiry, close
//! linger), served by one heap, one task and one glommio timer per shard: a `sleep` raced
//! against each connection's read held ~180 bytes per idle connection.

use futures_lite::future;
use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::poll_fn;
use std::task::{Poll, Waker};
use std::time::Instant;

/// Every connection's next due time (auth timeout, ping, ping timeout, token expiry, close
/// linger), served by one task and one glommio timer per shard.
///
/// A connection remembers the earliest wake it has asked for; asking for a later one changes
/// nothing (it is woken early, finds nothing due and asks again), asking for an earlier one
/// pushes a new entry and leaves the old one stale. An entry fires only if it is still the
/// connection's remembered wake, so stale entries and those of closed connections just expire.
#[derive(Default)]
pub(crate) struct Timers {
    heap: RefCell<BinaryHeap<Reverse<(Instant, u64)>>>,
    poked: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Timers {
    /// Asks for connection `id` to be woken at `due` or before; `armed` is its remembered wake.
    pub(crate) fn arm(&self, id: u64, armed: &Cell<Option<Instant>>, due: Instant) {
        if armed.get().is_some_and(|t| t <= due) {
            return;
        }
        armed.set(Some(due));
        let mut heap = self.heap.borrow_mut();
        let earliest = heap.peek().is_none_or(|Reverse((t, _))| due < *t);
        heap.push(Reverse((due, id)));
        if earliest {
            self.poked.set(true);
            if let Some(w) = self.waker.take() {
                w.wake();
            }
        }
    }

    /// Entries waiting, stale ones included.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.heap.borrow().len()
    }

    /// Calls `fire(id, due)` for every entry whose time has come, for the shard's life.
    pub(crate) async fn run(&self, fire: impl Fn(u64, Instant)) {
        loop {
            let now = Instant::now();
            loop {
                let top = self.heap.borrow().peek().map(|Reverse(e)| *e);
                match top {
                    Some((t, id)) if t <= now => {
                        self.heap.borrow_mut().pop();
                        fire(id, t);
                    }
                    _ => break,
                }
            }
            {
                // A storm of short connections leaves a large, mostly empty heap behind.
                let mut heap = self.heap.borrow_mut();
                if heap.capacity() > 4096 && heap.len() < heap.capacity() / 4 {
                    let keep = heap.len() * 2;
                    heap.shrink_to(keep);
                }
            }
            let next = self.heap.borrow().peek().map(|Reverse((t, _))| *t);
            let poked = poll_fn(|cx| {
                if self.poked.replace(false) {
                    Poll::Ready(())
                } else {
                    self.waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            });
            match next {
                Some(t) => {
                    future::or(poked, async {
                        glommio::timer::sleep(t.saturating_duration_since(now)).await;
                    })
                    .await
                }
                None => poked.await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;
    use std::time::Duration;

    #[test]
    fn timers_fire_in_due_order_and_only_earlier_wakes_are_pushed() {
        crate::io::test_executor().run(async {
            let timers = Rc::new(Timers::default());
            let fired: Rc<RefCell<Vec<(u64, Instant)>>> = Rc::default();
            let task = {
                let (timers, fired) = (timers.clone(), fired.clone());
                glommio::spawn_local(async move {
                    timers
                        .run(|id, due| fired.borrow_mut().push((id, due)))
                        .await
                })
                .detach()
            };
            let t0 = Instant::now();
            let (a, b) = (Cell::new(None), Cell::new(None));
            timers.arm(1, &a, t0 + Duration::from_millis(60));
            // Later than what 1 already waits for: nothing new.
            timers.arm(1, &a, t0 + Duration::from_millis(90));
            assert_eq!(timers.len(), 1);
            timers.arm(2, &b, t0 + Duration::from_millis(40));
            // Earlier: pushed, and the timer task is re-aimed at it.
            timers.arm(1, &a, t0 + Duration::from_millis(20));
            assert_eq!(timers.len(), 3);
            assert_eq!(a.get(), Some(t0 + Duration::from_millis(20)));
            while fired.borrow().len() < 3 {
                assert!(
                    t0.elapsed() < Duration::from_secs(5),
                    "{:?}",
                    fired.borrow()
                );
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            let got: Vec<(u64, u128)> = fired
                .borrow()
                .iter()
                .map(|&(id, due)| (id, (due - t0).as_millis()))
                .collect();
            assert_eq!(got, vec![(1, 20), (2, 40), (1, 60)]);
            // None fired before its time.
            assert!(t0.elapsed() >= Duration::from_millis(60));
            assert_eq!(timers.len(), 0);
            task.cancel();
        });
    }
}
