//! The shard's listening sockets: `SO_REUSEPORT`, non-blocking, in the shard's epoll set, so the
//! kernel spreads new connections over the shards and an accept costs one system call.

use std::future::poll_fn;
use std::io;
use std::task::Poll;

/// Pending connections a listener queues (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;

/// A listening socket of our own, non-blocking, in the shard's epoll set.
///
/// Not glommio's `TcpListener`: its accept turns O_NONBLOCK on and off around every `accept`
/// (three `fcntl` per connection), and each socket it gave had to be copied out of glommio's
/// stream again for the epoll set (`fcntl` + `close`). Accepted sockets inherit TCP_NODELAY
/// from this one on Linux (one `setsockopt` less per connection; a test checks it).
pub(crate) struct Listener {
    fd: std::os::fd::OwnedFd,
    /// Edge-triggered: cleared only by EAGAIN.
    ready: std::cell::Cell<bool>,
    waker: std::cell::Cell<Option<std::task::Waker>>,
}

impl Listener {
    /// Binds `addr` with SO_REUSEPORT: every shard has its own listener on the same port.
    pub(crate) fn bind(addr: std::net::SocketAddr) -> io::Result<Listener> {
        use socket2::{Domain, Protocol, Socket, Type};
        let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        sock.set_reuse_port(true)?;
        sock.set_tcp_nodelay(true)?;
        sock.set_nonblocking(true)?;
        sock.bind(&addr.into())?;
        sock.listen(LISTEN_BACKLOG)?;
        Ok(Listener {
            fd: sock.into(),
            ready: std::cell::Cell::new(true),
            waker: std::cell::Cell::new(None),
        })
    }

    pub(crate) fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        socket2::SockRef::from(&self.fd)
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("listener has no IP address"))
    }

    pub(crate) fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }

    /// The poller saw a connection arrive.
    pub(crate) fn ready(&self) {
        self.ready.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// The next connection, in blocking mode as glommio's streams expect (TLS); plain sockets
    /// are only ever used with MSG_DONTWAIT. Errors are those a caller should back off from
    /// (out of descriptors or memory); a connection reset before its accept is skipped.
    pub(crate) async fn accept(&self) -> io::Result<(std::os::fd::OwnedFd, std::net::IpAddr)> {
        poll_fn(|cx| loop {
            if !self.ready.get() {
                self.waker.set(Some(cx.waker().clone()));
                return Poll::Pending;
            }
            let e = match crate::sys::accept(self.fd()) {
                Ok(accepted) => return Poll::Ready(Ok(accepted)),
                Err(e) => e,
            };
            match e.raw_os_error().unwrap_or(0) {
                libc::EAGAIN => self.ready.set(false),
                // accept(2): errors of the connection, not of the listener; take the next.
                libc::EINTR
                | libc::ECONNABORTED
                | libc::EPROTO
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EPERM => {}
                _ => return Poll::Ready(Err(e)),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listener sets TCP_NODELAY once for every connection it accepts: if the kernel stops
    /// copying it to accepted sockets, small frames wait for ACKs (Nagle) and this fails.
    #[test]
    fn accepted_sockets_inherit_nodelay_and_stay_blocking() {
        crate::io::test_executor().run(async {
            let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let addr = listener.local_addr().unwrap();
            assert_ne!(addr.port(), 0);
            let client = std::net::TcpStream::connect(addr).unwrap();
            let (fd, peer) = listener.accept().await.unwrap();
            assert_eq!(peer, client.local_addr().unwrap().ip());
            let sock = socket2::SockRef::from(&fd);
            assert!(sock.tcp_nodelay().unwrap());
            // glommio's streams (TLS) expect blocking mode; plain sockets use MSG_DONTWAIT.
            assert!(!sock.nonblocking().unwrap());
            // Nothing more queued: the next accept waits instead of failing.
            assert!(futures_lite::future::poll_once(listener.accept())
                .await
                .is_none());
            assert!(!listener.ready.get());
        });
    }
}
