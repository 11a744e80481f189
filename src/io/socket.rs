//! The byte stream under HTTP and WebSocket: plain TCP, or TLS (rustls) over TCP.
//!
//! Both are used through `read_some` / `write_all` on a `RefCell<Transport>` shared by a
//! connection's reader and writer; the cell is borrowed only inside a poll, never across an await.

use crate::io::tls;
use std::cell::RefCell;
use std::future::poll_fn;
use std::io::{self, Write};
use std::pin::Pin;
use std::task::Poll;

pub(crate) enum Transport {
    Tls(Box<tls::Tls>),
    /// A plain TCP socket registered in the shard's epoll set (`poller`) from its accept on:
    /// no armed poll per idle socket; the shard's poller sets its readiness and wakes its tasks.
    Raw(RawSock),
}

/// A plain TCP socket whose readiness comes from the shard's epoll set (edge-triggered: a flag
/// is cleared only by a short read or an EAGAIN, and the next event sets it again).
pub(crate) struct RawSock {
    fd: std::os::fd::OwnedFd,
    readable: std::cell::Cell<bool>,
    writable: std::cell::Cell<bool>,
    /// The peer closed or the socket failed: reads go on until they say so, since that event
    /// may have come with data a short read left behind.
    hup: std::cell::Cell<bool>,
    /// A write waiting for room.
    tx: std::cell::Cell<Option<std::task::Waker>>,
}

impl RawSock {
    /// A socket just registered in the epoll set: whatever arrived before is read at once.
    pub(crate) fn new(fd: std::os::fd::OwnedFd) -> RawSock {
        RawSock {
            fd,
            readable: std::cell::Cell::new(true),
            writable: std::cell::Cell::new(true),
            hup: std::cell::Cell::new(false),
            tx: std::cell::Cell::new(None),
        }
    }

    /// Records readiness from epoll; true when a reader should be woken.
    pub(crate) fn ready(&self, events: u32) -> bool {
        if events & crate::io::poller::WRITABLE != 0 {
            self.writable.set(true);
            if let Some(w) = self.tx.take() {
                w.wake();
            }
        }
        if events & crate::io::poller::HANGUP != 0 {
            self.hup.set(true);
        }
        if events & crate::io::poller::READABLE != 0 {
            self.readable.set(true);
            return true;
        }
        false
    }

    fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }

    /// Reads into `buf`; `Pending` until epoll says there is more. The caller has registered
    /// the waker that `ready` events lead to.
    fn poll_recv(&self, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match attempt(&self.readable, || {
            crate::sys::recv_nonblocking(self.fd(), buf)
        }) {
            None => Poll::Pending,
            Some(Ok(n)) => {
                // A short read emptied the socket: any later data is a new edge.
                if n > 0 && n < buf.len() && !self.hup.get() {
                    self.readable.set(false);
                }
                Poll::Ready(Ok(n))
            }
            Some(Err(e)) => Poll::Ready(Err(e)),
        }
    }

    fn poll_send(&self, cx: &std::task::Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match attempt(&self.writable, || {
            crate::sys::send_nonblocking(self.fd(), buf)
        }) {
            None => {
                self.tx.set(Some(cx.waker().clone()));
                Poll::Pending
            }
            Some(result) => Poll::Ready(result),
        }
    }
}

/// Runs `op` while `ready` holds: again when interrupted; EAGAIN clears `ready` and gives None
/// (the next readiness event sets it again).
fn attempt(
    ready: &std::cell::Cell<bool>,
    mut op: impl FnMut() -> io::Result<usize>,
) -> Option<io::Result<usize>> {
    while ready.get() {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready.set(false),
            result => return Some(result),
        }
    }
    None
}

/// Records readiness from the poller on `stream`'s socket; true when its reader should be woken.
///
/// The stream is borrowed only inside polls, never across an await, so the borrow never fails
/// here (the poller runs as its own task); if it did, the event is dropped and the next read or
/// write finds out for itself.
pub(crate) fn socket_ready(stream: &RefCell<Transport>, events: u32) -> bool {
    match stream.try_borrow().as_deref() {
        Ok(Transport::Raw(sock)) => sock.ready(events),
        _ => false,
    }
}

/// A socket serving HTTP, before any upgrade: the shard's poller reaches it by id
/// (`Shard::watch`) to set its readiness and wake its task.
pub(crate) struct HttpSock {
    pub stream: RefCell<Transport>,
    rx: std::cell::Cell<Option<std::task::Waker>>,
}

impl HttpSock {
    pub(crate) fn new(stream: Transport) -> HttpSock {
        HttpSock {
            stream: RefCell::new(stream),
            rx: std::cell::Cell::new(None),
        }
    }

    /// Readiness from the poller.
    pub(crate) fn ready(&self, events: u32) {
        if socket_ready(&self.stream, events) {
            if let Some(w) = self.rx.take() {
                w.wake();
            }
        }
    }

    /// Reads what is available into `into`; 0 at end of stream.
    pub(crate) async fn read_some(&self, into: &mut Vec<u8>) -> io::Result<usize> {
        read_some(&self.stream, into, &|cx| {
            self.rx.set(Some(cx.waker().clone()));
            None
        })
        .await
    }
}

thread_local! {
    /// One read buffer per shard: an idle connection holds none of its own.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; 64 * 1024]);
}

impl Transport {
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Transport::Tls(t) => t.tcp.as_raw_fd(),
            Transport::Raw(s) => s.fd(),
        }
    }
}

/// Writes all of `buf` to the socket as it is (TLS records already made).
pub(crate) async fn write_raw(stream: &RefCell<Transport>, mut buf: &[u8]) -> io::Result<()> {
    use futures_lite::AsyncWrite;
    while !buf.is_empty() {
        let n = poll_fn(|cx| {
            let mut guard = stream.borrow_mut();
            match &mut *guard {
                Transport::Tls(t) => Pin::new(&mut t.tcp).poll_write(cx, buf),
                Transport::Raw(s) => s.poll_send(cx, buf),
            }
        })
        .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// Writes some of `buf` (plain) or all of it (TLS: it is encrypted as one batch of records).
pub(crate) async fn write_some(stream: &RefCell<Transport>, buf: &[u8]) -> io::Result<usize> {
    let tls = matches!(&*stream.borrow(), Transport::Tls(_));
    if !tls {
        return poll_fn(|cx| match &mut *stream.borrow_mut() {
            Transport::Raw(s) => s.poll_send(cx, buf),
            Transport::Tls(_) => Poll::Ready(Err(io::ErrorKind::Unsupported.into())),
        })
        .await;
    }
    if let Transport::Tls(t) = &mut *stream.borrow_mut() {
        t.session.writer().write_all(buf)?;
    }
    tls::flush(stream).await?;
    Ok(buf.len())
}

pub(crate) async fn write_all(stream: &RefCell<Transport>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = write_some(stream, buf).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// Reads what is available into `into`; 0 at end of stream. `ready` is checked first on every
/// poll, so a connection that must stop can end a pending read by waking the task. For a `Raw`
/// socket `ready` must also register the waker that the socket's readiness events wake.
pub(crate) async fn read_some(
    stream: &RefCell<Transport>,
    into: &mut Vec<u8>,
    ready: &dyn Fn(&std::task::Context<'_>) -> Option<io::Error>,
) -> io::Result<usize> {
    loop {
        let got = poll_fn(|cx| {
            if let Some(e) = ready(cx) {
                return Poll::Ready(Err(e));
            }
            let mut guard = stream.borrow_mut();
            match &mut *guard {
                Transport::Raw(sock) => scratch_read(into, |s| sock.poll_recv(s)),
                Transport::Tls(t) => tls::poll_read(t, cx, into),
            }
        })
        .await?;
        match got {
            Some(n) => return Ok(n),
            None => {
                // A TLS record was consumed; answer anything the session must send (key updates).
                let wants =
                    matches!(&*stream.borrow(), Transport::Tls(t) if t.session.wants_write());
                if wants {
                    // Boxed: rare, and an idle connection's read future would otherwise keep
                    // room for it.
                    Box::pin(tls::flush(stream)).await?;
                }
            }
        }
    }
}

/// Reads through the shard's scratch buffer with `read` and appends what came to `into`.
fn scratch_read(
    into: &mut Vec<u8>,
    read: impl FnOnce(&mut [u8]) -> Poll<io::Result<usize>>,
) -> Poll<io::Result<Option<usize>>> {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        read(&mut s).map_ok(|n| {
            into.extend_from_slice(&s[..n]);
            Some(n)
        })
    })
}

/// Sends FIN (after a TLS close_notify): the peer sees the end of our side.
pub(crate) async fn shutdown_write(stream: &RefCell<Transport>) {
    let tls = if let Transport::Tls(t) = &mut *stream.borrow_mut() {
        t.session.send_close_notify();
        true
    } else {
        false
    };
    if tls {
        let _ = tls::flush(stream).await;
    }
    crate::sys::shutdown_write(stream.borrow().raw_fd());
}
