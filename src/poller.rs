//! What an idle WebSocket connection waits on, kept per shard instead of per connection: socket
//! readiness (one epoll set) and due times (one heap).
//!
//! Waiting the glommio way costs memory per idle connection: a read arms an io_uring poll whose
//! source is ~500 bytes, and a `sleep` raced against it holds a timer (~180 bytes with its entry
//! in the reactor). Measured with heaptrack at 10,000 idle subscribed connections, those two were
//! 30% of the server's heap. Here a plain-TCP socket is registered once, at its accept,
//! edge-triggered, in the shard's epoll set (the kernel's entry is not in our RSS and needs no
//! re-arming after a read), and so are the listeners; one task per shard turns readiness into
//! wake-ups (`Shard::socket_ready`), and another serves every connection's next due time from
//! one heap.

use futures_lite::{future, AsyncReadExt};
use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Readiness from epoll for the events a socket is registered with.
pub const READABLE: u32 =
    (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
pub const WRITABLE: u32 = (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32;
pub const HANGUP: u32 = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;

/// Events taken per `epoll_wait`.
const BATCH: usize = 256;

/// The shard's epoll set, or the errno of its creation: then every registration fails with
/// it, the listeners' first, so the shard refuses to start saying why.
pub struct Poller {
    epfd: Result<OwnedFd, i32>,
}

impl Poller {
    pub fn new() -> Poller {
        // SAFETY: plain syscall; the result is checked before it is owned.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        let epfd = if fd < 0 {
            Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO))
        } else {
            // SAFETY: `fd` is a new descriptor nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        };
        Poller { epfd }
    }

    /// Registers `fd` (edge-triggered, read and write) under `id`: a connection id (from its
    /// accept on), or a listener's.
    /// Closing the socket removes it.
    pub fn register(&self, fd: RawFd, id: u64) -> io::Result<()> {
        let epfd = match &self.epfd {
            Ok(epfd) => epfd,
            Err(errno) => return Err(io::Error::from_raw_os_error(*errno)),
        };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: id,
        };
        // SAFETY: both descriptors are open; `ev` outlives the call.
        if unsafe { libc::epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Hands every readiness event to `ready(id, events)`, for the shard's life.
    pub async fn run(&self, ready: impl Fn(u64, u32)) {
        let Ok(epfd) = &self.epfd else {
            return;
        };
        let epfd = epfd.as_raw_fd();
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; BATCH];
        loop {
            // SAFETY: `events` has room for BATCH entries; timeout 0 never blocks the shard.
            let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), BATCH as i32, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "epoll_wait failed");
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
                continue;
            }
            for ev in &events[..n as usize] {
                let (id, bits) = (ev.u64, ev.events);
                ready(id, bits);
            }
            if n as usize == BATCH {
                // More may be ready: let the woken connections run first.
                glommio::yield_if_needed().await;
                continue;
            }
            if let Err(e) = wait_readable(epfd).await {
                // No descriptor to spare for the wait (EMFILE): poll instead until one frees.
                tracing::debug!(error = %e, "epoll wait degraded to 1 ms polling");
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

impl Default for Poller {
    fn default() -> Self {
        Poller::new()
    }
}

/// Waits until the epoll set `epfd` has events.
///
/// glommio 0.9 has no public way to wait for an arbitrary descriptor, but a stream built from
/// one arms an io_uring poll for readability at once (`NonBufferedStream::init`), and its first
/// read waits for that poll and then returns what `recv` says: ENOTSOCK on an epoll descriptor.
/// That error is the signal. A stream cannot be re-armed after it, so each wait uses a fresh copy
/// of the descriptor (the copy shares the epoll set; closing it leaves the set alone).
async fn wait_readable(epfd: RawFd) -> io::Result<()> {
    use std::os::fd::IntoRawFd;
    let copy = crate::transport::dup_cloexec(epfd)?.into_raw_fd();
    // SAFETY: `copy` is a new descriptor; the stream owns and closes it.
    let mut stream = unsafe { glommio::net::UnixStream::from_raw_fd(copy) };
    let mut byte = [0u8; 1];
    let _ = stream.read(&mut byte).await;
    Ok(())
}

/// Every connection's next due time (auth timeout, ping, ping timeout, token expiry, close
/// linger), served by one task and one glommio timer per shard.
///
/// A connection remembers the earliest wake it has asked for; asking for a later one changes
/// nothing (it is woken early, finds nothing due and asks again), asking for an earlier one
/// pushes a new entry and leaves the old one stale. An entry fires only if it is still the
/// connection's remembered wake, so stale entries and those of closed connections just expire.
#[derive(Default)]
pub struct Timers {
    heap: RefCell<BinaryHeap<Reverse<(Instant, u64)>>>,
    poked: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Timers {
    /// Asks for connection `id` to be woken at `due` or before; `armed` is its remembered wake.
    pub fn arm(&self, id: u64, armed: &Cell<Option<Instant>>, due: Instant) {
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
    pub async fn run(&self, fire: impl Fn(u64, Instant)) {
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
    use std::io::Write;
    use std::rc::Rc;

    fn executor() -> glommio::LocalExecutor {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(64 * 1024)
            .make()
            .unwrap()
    }

    /// The wait on the epoll set relies on how glommio 0.9 builds a stream: if that changes,
    /// readiness never arrives and this fails.
    #[test]
    fn readiness_reaches_the_callback_each_time() {
        executor().run(async {
            let poller = Rc::new(Poller::new());
            let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            theirs.set_nonblocking(true).unwrap();
            poller.register(theirs.as_raw_fd(), 7).unwrap();
            let seen: Rc<RefCell<Vec<(u64, u32)>>> = Rc::default();
            let task = {
                let (poller, seen) = (poller.clone(), seen.clone());
                glommio::spawn_local(async move {
                    poller.run(|id, ev| seen.borrow_mut().push((id, ev))).await
                })
                .detach()
            };
            // Registration reports the socket writable; then each write is a new edge.
            for round in 0..3 {
                let before = seen.borrow().len();
                ours.write_all(b"x").unwrap();
                let deadline = Instant::now() + Duration::from_secs(5);
                while seen.borrow()[before..]
                    .iter()
                    .all(|&(_, ev)| ev & READABLE == 0)
                {
                    assert!(Instant::now() < deadline, "no readiness in round {round}");
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                assert!(seen.borrow().iter().all(|&(id, _)| id == 7));
                let mut buf = [0u8; 8];
                assert_eq!(std::io::Read::read(&mut &theirs, &mut buf).unwrap(), 1);
            }
            task.cancel();
        });
    }

    #[test]
    fn timers_fire_in_due_order_and_only_earlier_wakes_are_pushed() {
        executor().run(async {
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
