//! Sockets: non-blocking connects from a chosen loopback source address, and the source-address plan
//! that lets one host open more connections than one address has ephemeral ports.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::FromRawFd;

/// A server node: its address and the Host header its requests carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    /// Where to connect.
    pub(crate) addr: SocketAddr,
    /// The Host header (the address as given on the command line).
    pub(crate) host: String,
}

/// The ephemeral port range size from /proc (28,232 with Linux's default 32768-60999).
pub(crate) fn ephemeral_ports() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u32>().ok());
            let lo = it.next()??;
            let hi = it.next()??;
            (hi >= lo).then_some(hi - lo + 1)
        })
        .unwrap_or(28_232)
}

/// Which local address each connection binds before connecting.
#[derive(Debug, Clone)]
pub(crate) struct SourcePlan {
    addrs: Vec<Ipv4Addr>,
}

impl SourcePlan {
    /// No binding: the kernel picks the source (for non-loopback targets).
    pub(crate) fn none() -> Self {
        SourcePlan { addrs: Vec::new() }
    }

    /// Enough loopback addresses from 127.0.0.2 up for `connections` to the same target, keeping
    /// each address under `per_addr_max` connections; at least `min_addrs`.
    pub(crate) fn loopback(connections: usize, per_addr_max: usize, min_addrs: usize) -> Self {
        let per = per_addr_max.max(1);
        let n = connections.div_ceil(per).max(min_addrs).clamp(1, 250);
        SourcePlan {
            addrs: (0..n)
                .map(|i| Ipv4Addr::new(127, 0, 0, 2 + i as u8))
                .collect(),
        }
    }

    /// The source address of connection `i` (round robin), if any.
    pub(crate) fn for_conn(&self, i: usize) -> Option<Ipv4Addr> {
        if self.addrs.is_empty() {
            None
        } else {
            Some(self.addrs[i % self.addrs.len()])
        }
    }

    /// The addresses in use.
    pub(crate) fn addrs(&self) -> &[Ipv4Addr] {
        &self.addrs
    }
}

/// Starts a non-blocking connect to `target` from `source` (port chosen at connect time, so ports
/// are only unique per 4-tuple: IP_BIND_ADDRESS_NO_PORT). Completion shows up as writability.
pub(crate) fn connect_nonblocking(
    target: SocketAddr,
    source: Option<Ipv4Addr>,
) -> std::io::Result<mio::net::TcpStream> {
    let SocketAddr::V4(t) = target else {
        // IPv6 targets: no source binding, mio connects.
        return mio::net::TcpStream::connect(target);
    };
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped.
    unsafe {
        let fd = libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        if let Some(src) = source {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
            let sa = sockaddr_in(SocketAddrV4::new(src, 0));
            if libc::bind(
                fd,
                &sa as *const libc::sockaddr_in as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        let sa = sockaddr_in(t);
        let rc = libc::connect(
            fd,
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(err);
            }
        }
        Ok(mio::net::TcpStream::from_std(stream))
    }
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    }
}

/// A blocking connect from `source` (used by the publisher and the floor scenario).
pub(crate) fn connect_blocking(
    target: SocketAddr,
    source: Option<Ipv4Addr>,
) -> std::io::Result<std::net::TcpStream> {
    let s = connect_nonblocking(target, source)?;
    // SAFETY: into_raw_fd hands over ownership of the descriptor.
    let std_stream = unsafe {
        use std::os::fd::IntoRawFd;
        std::net::TcpStream::from_raw_fd(s.into_raw_fd())
    };
    std_stream.set_nonblocking(false)?;
    // Wait for the connect to finish: a blocking zero-timeout poll loop on writability.
    let fd = {
        use std::os::fd::AsRawFd;
        std_stream.as_raw_fd()
    };
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll on one pollfd we own.
    let rc = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    if rc <= 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        ));
    }
    if let Some(e) = std_stream.take_error()? {
        return Err(e);
    }
    std_stream.set_nodelay(true)?;
    Ok(std_stream)
}

/// A node on a loopback port that answers one HTTP request with 200 and `body`; the join
/// handle gives the request head it read.
#[cfg(test)]
pub(crate) fn answer_once(body: &'static str) -> (Node, std::thread::JoinHandle<String>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let node = Node {
        addr: l.local_addr().expect("addr"),
        host: "x".into(),
    };
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().expect("accept");
        let mut head = [0u8; 1024];
        let n = c.read(&mut head).expect("read");
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        c.write_all(answer.as_bytes()).expect("write");
        String::from_utf8_lossy(&head[..n]).into_owned()
    });
    (node, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_spreads_connections_round_robin() {
        let p = SourcePlan::loopback(100_000, 25_000, 1);
        assert_eq!(p.addrs().len(), 4);
        assert_eq!(p.for_conn(0), Some(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(p.for_conn(5), Some(Ipv4Addr::new(127, 0, 0, 3)));
        assert_eq!(SourcePlan::loopback(10, 25_000, 1).addrs().len(), 1);
        assert_eq!(SourcePlan::loopback(10, 25_000, 3).addrs().len(), 3);
        assert_eq!(SourcePlan::none().for_conn(3), None);
        assert!(ephemeral_ports() > 1000);
    }

    #[test]
    fn connects_from_a_second_loopback_address() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s =
            connect_blocking(l.local_addr().unwrap(), Some(Ipv4Addr::new(127, 0, 0, 3))).unwrap();
        let (_peer, from) = l.accept().unwrap();
        assert_eq!(from.ip(), std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
        assert_eq!(s.local_addr().unwrap().ip(), from.ip());
    }
}
