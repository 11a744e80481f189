//! What an idle WebSocket connection waits on, kept per shard instead of per connection: socket
//! readiness (one epoll set) and due times (one heap).
//!
//! Waiting the glommio way costs memory per idle connection: a read arms an io_uring poll whose
//! source is ~500 bytes, and a `sleep` raced against it holds a timer (~180 bytes with its entry
//! in the reactor). Measured with heaptrack at 10,000 idle subscribed connections, those two were
//! 30% of the server's heap. Here a plain-TCP socket is registered once, at its accept,
//! edge-triggered, in the shard's epoll set (the kernel's entry is not in our RSS and needs no
//! re-arming after a read), and so are the listeners; one task per shard turns readiness into
//! wake-ups (`Shard::socket_ready`); `timers.rs` does the same for due times.

use futures_lite::AsyncReadExt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Readiness from epoll for the events a socket is registered with.
pub(crate) const READABLE: u32 =
    (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;
pub(crate) const WRITABLE: u32 = (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32;
pub(crate) const HANGUP: u32 = (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32;

/// Events taken per `epoll_wait`.
const BATCH: usize = 256;

/// The shard's epoll set, or the errno of its creation: then every registration fails with
/// it, the listeners' first, so the shard refuses to start saying why.
pub(crate) struct Poller {
    epfd: Result<OwnedFd, i32>,
}

impl Poller {
    pub(crate) fn new() -> Poller {
        let epfd = crate::sys::epoll_create().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO));
        Poller { epfd }
    }

    /// Registers `fd` (edge-triggered, read and write) under `id`: a connection id (from its
    /// accept on), or a listener's. Closing the socket removes it.
    pub(crate) fn register(&self, fd: RawFd, id: u64) -> io::Result<()> {
        match &self.epfd {
            Ok(epfd) => crate::sys::epoll_add(epfd.as_raw_fd(), fd, id),
            Err(errno) => Err(io::Error::from_raw_os_error(*errno)),
        }
    }

    /// Hands every readiness event to `ready(id, events)`, for the shard's life.
    pub(crate) async fn run(&self, ready: impl Fn(u64, u32)) {
        let Ok(epfd) = &self.epfd else {
            return;
        };
        let epfd = epfd.as_raw_fd();
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; BATCH];
        loop {
            let n = match crate::sys::epoll_poll(epfd, &mut events) {
                Ok(n) => n,
                Err(e) => {
                    if e.kind() != io::ErrorKind::Interrupted {
                        tracing::error!(error = %e, "epoll_wait failed");
                        glommio::timer::sleep(Duration::from_millis(10)).await;
                    }
                    continue;
                }
            };
            for ev in &events[..n] {
                let (id, bits) = (ev.u64, ev.events);
                ready(id, bits);
            }
            if n == BATCH {
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
    let mut stream = crate::sys::glommio_unix_stream(crate::sys::dup_cloexec(epfd)?);
    let mut byte = [0u8; 1];
    let _ = stream.read(&mut byte).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::io::Write;
    use std::rc::Rc;
    use std::time::Instant;

    /// The wait on the epoll set relies on how glommio 0.9 builds a stream: if that changes,
    /// readiness never arrives and this fails.
    #[test]
    fn readiness_reaches_the_callback_each_time() {
        crate::io::test_executor().run(async {
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
}
