//! The byte stream under HTTP and WebSocket: plain TCP, or TLS (rustls) over TCP.
//!
//! Both are used through `read_some` / `write_all` on a `RefCell<Transport>` shared by a
//! connection's reader and writer; the cell is borrowed only inside a poll, never across an await.

use glommio::net::TcpStream;
use std::cell::RefCell;
use std::future::poll_fn;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

pub enum Transport {
    Tls(Box<Tls>),
    /// A plain TCP socket registered in the shard's epoll set (`poller`) from its accept on:
    /// no armed poll per idle socket; the shard's poller sets its readiness and wakes its tasks.
    Raw(RawSock),
}

/// A plain TCP socket whose readiness comes from the shard's epoll set (edge-triggered: a flag
/// is cleared only by a short read or an EAGAIN, and the next event sets it again).
pub struct RawSock {
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
    pub fn new(fd: std::os::fd::OwnedFd) -> RawSock {
        RawSock {
            fd,
            readable: std::cell::Cell::new(true),
            writable: std::cell::Cell::new(true),
            hup: std::cell::Cell::new(false),
            tx: std::cell::Cell::new(None),
        }
    }

    /// Records readiness from epoll; true when a reader should be woken.
    pub fn ready(&self, events: u32) -> bool {
        if events & crate::poller::WRITABLE != 0 {
            self.writable.set(true);
            if let Some(w) = self.tx.take() {
                w.wake();
            }
        }
        if events & crate::poller::HANGUP != 0 {
            self.hup.set(true);
        }
        if events & crate::poller::READABLE != 0 {
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
        match attempt(&self.readable, || recv_now(self.fd(), buf)) {
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
        match attempt(&self.writable, || send_now(self.fd(), buf)) {
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

/// One non-blocking `send`; a reset peer is an error, not SIGPIPE.
pub fn send_now(fd: std::os::fd::RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for its length; a bad descriptor is an error, not UB.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One non-blocking `recv`.
fn recv_now(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for its length; a bad descriptor is an error, not UB.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A new close-on-exec descriptor for the same open file as `fd`.
pub fn dup_cloexec(fd: std::os::fd::RawFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall; the result is checked before it is owned.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `copy` is a new descriptor nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(copy) })
}

/// Records readiness from the poller on `stream`'s socket; true when its reader should be woken.
///
/// The stream is borrowed only inside polls, never across an await, so the borrow never fails
/// here (the poller runs as its own task); if it did, the event is dropped and the next read or
/// write finds out for itself.
pub fn socket_ready(stream: &RefCell<Transport>, events: u32) -> bool {
    match stream.try_borrow().as_deref() {
        Ok(Transport::Raw(sock)) => sock.ready(events),
        _ => false,
    }
}

/// A socket serving HTTP, before any upgrade: the shard's poller reaches it by id
/// (`Shard::watch`) to set its readiness and wake its task.
pub struct HttpSock {
    pub stream: RefCell<Transport>,
    rx: std::cell::Cell<Option<std::task::Waker>>,
}

impl HttpSock {
    pub fn new(stream: Transport) -> HttpSock {
        HttpSock {
            stream: RefCell::new(stream),
            rx: std::cell::Cell::new(None),
        }
    }

    /// Readiness from the poller.
    pub fn ready(&self, events: u32) {
        if socket_ready(&self.stream, events) {
            if let Some(w) = self.rx.take() {
                w.wake();
            }
        }
    }

    /// Reads what is available into `into`; 0 at end of stream.
    pub async fn read_some(&self, into: &mut Vec<u8>) -> io::Result<usize> {
        read_some(&self.stream, into, &|cx| {
            self.rx.set(Some(cx.waker().clone()));
            None
        })
        .await
    }
}

/// Pending connections a listener queues (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: i32 = 4096;

/// A listening socket of our own, non-blocking, in the shard's epoll set.
///
/// Not glommio's `TcpListener`: its accept turns O_NONBLOCK on and off around every `accept`
/// (three `fcntl` per connection), and each socket it gave had to be copied out of glommio's
/// stream again for the epoll set (`fcntl` + `close`). Accepted sockets inherit TCP_NODELAY
/// from this one on Linux (one `setsockopt` less per connection; a test checks it).
pub struct Listener {
    fd: std::os::fd::OwnedFd,
    /// Edge-triggered: cleared only by EAGAIN.
    ready: std::cell::Cell<bool>,
    waker: std::cell::Cell<Option<std::task::Waker>>,
}

impl Listener {
    /// Binds `addr` with SO_REUSEPORT: every shard has its own listener on the same port.
    pub fn bind(addr: std::net::SocketAddr) -> io::Result<Listener> {
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

    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        socket2::SockRef::from(&self.fd)
            .local_addr()?
            .as_socket()
            .ok_or_else(|| io::Error::other("listener has no IP address"))
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }

    /// The poller saw a connection arrive.
    pub fn ready(&self) {
        self.ready.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// The next connection, in blocking mode as glommio's streams expect (TLS); plain sockets
    /// are only ever used with MSG_DONTWAIT. Errors are those a caller should back off from
    /// (out of descriptors or memory); a connection reset before its accept is skipped.
    pub async fn accept(&self) -> io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::FromRawFd;
        poll_fn(|cx| loop {
            if !self.ready.get() {
                self.waker.set(Some(cx.waker().clone()));
                return Poll::Pending;
            }
            // SAFETY: plain syscall; no address is asked for; the result is checked.
            let fd = unsafe {
                libc::accept4(
                    self.fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: a new descriptor nothing else owns.
                return Poll::Ready(Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }));
            }
            let e = io::Error::last_os_error();
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

pub struct Tls {
    tcp: TcpStream,
    session: rustls::ServerConnection,
}

thread_local! {
    /// One read buffer per shard: an idle connection holds none of its own.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; 64 * 1024]);
}

/// Largest TLS record plus header: what one raw read may need to make progress.
const TLS_READ_BYTES: usize = 18 * 1024;

impl Transport {
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Transport::Tls(t) => t.tcp.as_raw_fd(),
            Transport::Raw(s) => s.fd(),
        }
    }
}

/// Loads the certificate chain and key named by `tls.cert_file` / `tls.key_file`.
pub fn server_config(cert_file: &str, key_file: &str) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| format!("tls.cert_file {cert_file}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.cert_file {cert_file}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("tls.cert_file {cert_file}: no certificate found"));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| format!("tls.key_file {key_file}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("tls.key_file {key_file}: {e}"))?;
    Ok(Arc::new(config))
}

/// Runs the TLS handshake on a fresh connection.
pub async fn accept_tls(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
) -> io::Result<Transport> {
    let session = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
    let stream = RefCell::new(Transport::Tls(Box::new(Tls { tcp, session })));
    loop {
        let (handshaking, wants_write) = match &*stream.borrow() {
            Transport::Tls(t) => (t.session.is_handshaking(), t.session.wants_write()),
            _ => (false, false),
        };
        if wants_write {
            flush_tls(&stream).await?;
            continue;
        }
        if !handshaking {
            return Ok(stream.into_inner());
        }
        if pull_tls(&stream).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Reads raw bytes into the TLS session and processes them. Returns the raw bytes read.
async fn pull_tls(stream: &RefCell<Transport>) -> io::Result<usize> {
    use futures_lite::AsyncRead;
    poll_fn(|cx| {
        let mut guard = stream.borrow_mut();
        let Transport::Tls(t) = &mut *guard else {
            return Poll::Ready(Ok(0));
        };
        let mut raw = [0u8; 4096];
        match Pin::new(&mut t.tcp).poll_read(cx, &mut raw) {
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(0)),
            Poll::Ready(Ok(n)) => {
                let mut input = &raw[..n];
                while !input.is_empty() {
                    t.session.read_tls(&mut input)?;
                }
                t.session.process_new_packets().map_err(io::Error::other)?;
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    })
    .await
}

/// Writes every pending TLS record to the socket.
async fn flush_tls(stream: &RefCell<Transport>) -> io::Result<()> {
    let mut records = Vec::new();
    if let Transport::Tls(t) = &mut *stream.borrow_mut() {
        while t.session.wants_write() {
            t.session.write_tls(&mut records)?;
        }
    }
    write_raw(stream, &records).await
}

async fn write_raw(stream: &RefCell<Transport>, mut buf: &[u8]) -> io::Result<()> {
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
pub async fn write_some(stream: &RefCell<Transport>, buf: &[u8]) -> io::Result<usize> {
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
    flush_tls(stream).await?;
    Ok(buf.len())
}

pub async fn write_all(stream: &RefCell<Transport>, mut buf: &[u8]) -> io::Result<()> {
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
pub async fn read_some(
    stream: &RefCell<Transport>,
    into: &mut Vec<u8>,
    ready: &dyn Fn(&std::task::Context<'_>) -> Option<io::Error>,
) -> io::Result<usize> {
    use futures_lite::AsyncRead;
    loop {
        let got = poll_fn(|cx| {
            if let Some(e) = ready(cx) {
                return Poll::Ready(Err(e));
            }
            let mut guard = stream.borrow_mut();
            match &mut *guard {
                Transport::Raw(sock) => scratch_read(into, |s| sock.poll_recv(s)),
                Transport::Tls(t) => {
                    // Plaintext already decrypted goes first.
                    let before = into.len();
                    match t.session.reader().read_to_end(into) {
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                    if into.len() > before {
                        return Poll::Ready(Ok(Some(into.len() - before)));
                    }
                    let mut raw = [0u8; TLS_READ_BYTES];
                    match Pin::new(&mut t.tcp).poll_read(cx, &mut raw) {
                        Poll::Ready(Ok(0)) => Poll::Ready(Ok(Some(0))),
                        Poll::Ready(Ok(n)) => {
                            let mut input = &raw[..n];
                            while !input.is_empty() {
                                if let Err(e) = t.session.read_tls(&mut input) {
                                    return Poll::Ready(Err(e));
                                }
                            }
                            if let Err(e) = t.session.process_new_packets() {
                                return Poll::Ready(Err(io::Error::other(e)));
                            }
                            // Decrypted bytes (if a whole record came) are read on the next turn.
                            Poll::Ready(Ok(None))
                        }
                        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                        Poll::Pending => Poll::Pending,
                    }
                }
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
                    Box::pin(flush_tls(stream)).await?;
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
pub async fn shutdown_write(stream: &RefCell<Transport>) {
    let tls = if let Transport::Tls(t) = &mut *stream.borrow_mut() {
        t.session.send_close_notify();
        true
    } else {
        false
    };
    if tls {
        let _ = flush_tls(stream).await;
    }
    let fd = stream.borrow().raw_fd();
    // SAFETY: shutdown(2) on a socket this connection owns; failure (already closed) is harmless.
    unsafe {
        libc::shutdown(fd, libc::SHUT_WR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listener sets TCP_NODELAY once for every connection it accepts: if the kernel stops
    /// copying it to accepted sockets, small frames wait for ACKs (Nagle) and this fails.
    #[test]
    fn accepted_sockets_inherit_nodelay_and_stay_blocking() {
        glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
            .io_memory(64 * 1024)
            .make()
            .unwrap()
            .run(async {
                let listener = Listener::bind("127.0.0.1:0".parse().unwrap()).unwrap();
                let addr = listener.local_addr().unwrap();
                assert_ne!(addr.port(), 0);
                let _client = std::net::TcpStream::connect(addr).unwrap();
                let fd = listener.accept().await.unwrap();
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
