//! Every call into libc and every CPU intrinsic, each behind a safe function that says why it is
//! sound. The rest of the crate has no `unsafe` but the flush pass's view of its own queued
//! bytes and the io_uring batch (`connection/flush.rs`, `io/send_batch.rs`).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Converts a `-1`-on-error return into the error `errno` holds.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// One non-blocking `send` of `buf` on socket `fd`; a reset peer is an error, not SIGPIPE.
pub(crate) fn send_nonblocking(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
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

/// One non-blocking `recv` into `buf` from socket `fd`.
pub(crate) fn recv_nonblocking(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length; a bad descriptor is an error, not UB.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Sends FIN on socket `fd` (`shutdown(SHUT_WR)`). A socket the peer already reset answers an
/// error, which changes nothing for the caller, so it is not reported.
pub(crate) fn shutdown_write(fd: RawFd) {
    // SAFETY: plain syscall on a descriptor; a bad one is an error, not UB.
    unsafe {
        libc::shutdown(fd, libc::SHUT_WR);
    }
}

/// A new close-on-exec descriptor for the same open file as `fd`.
pub(crate) fn dup_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before it is owned.
    let copy = check(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })?;
    // SAFETY: `copy` is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// The next connection waiting on listening socket `fd` (close-on-exec, blocking mode) and the
/// client's address, which accept4 writes as it accepts (a getpeername would be one more system
/// call per connection).
pub(crate) fn accept(fd: RawFd) -> io::Result<(OwnedFd, std::net::IpAddr)> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `addr` and `len` outlive the call and `len` is the room `addr` has; the result is
    // checked.
    let conn = check(unsafe {
        libc::accept4(
            fd,
            (&mut addr as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_CLOEXEC,
        )
    })?;
    // SAFETY: a new descriptor nothing else owns.
    let conn = unsafe { OwnedFd::from_raw_fd(conn) };
    Ok((conn, ip_of(&addr)))
}

/// The IP address in a socket address the kernel wrote; unspecified for a family other than
/// IPv4 or IPv6.
fn ip_of(addr: &libc::sockaddr_storage) -> std::net::IpAddr {
    let addr: *const libc::sockaddr_storage = addr;
    // SAFETY: `ss_family` says which structure the kernel wrote; each fits in the storage.
    match unsafe { (*addr).ss_family } as libc::c_int {
        libc::AF_INET => {
            // SAFETY: a sockaddr_in, as its family says.
            let v4 = unsafe { *addr.cast::<libc::sockaddr_in>() };
            std::net::IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes())
        }
        libc::AF_INET6 => {
            // SAFETY: a sockaddr_in6, as its family says.
            let v6 = unsafe { *addr.cast::<libc::sockaddr_in6>() };
            std::net::IpAddr::from(v6.sin6_addr.s6_addr)
        }
        _ => std::net::IpAddr::from([0, 0, 0, 0]),
    }
}

/// A new epoll set.
pub(crate) fn epoll_create() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before it is owned.
    let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
    // SAFETY: `fd` is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds `fd` to the epoll set `epfd`, edge-triggered for reads, writes and hang-ups, tagged
/// `id` in its events.
pub(crate) fn epoll_add(epfd: RawFd, fd: RawFd, id: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
        u64: id,
    };
    // SAFETY: `ev` outlives the call; bad descriptors are errors, not UB.
    check(unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) }).map(drop)
}

/// The events ready in the epoll set `epfd` now (never waits), at most `events.len()`.
pub(crate) fn epoll_poll(epfd: RawFd, events: &mut [libc::epoll_event]) -> io::Result<usize> {
    let max = events.len().min(i32::MAX as usize) as i32;
    // SAFETY: `events` has room for `max` entries; timeout 0 never blocks.
    let n = check(unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), max, 0) })?;
    Ok(n as usize)
}

/// A glommio stream over a descriptor this process owns (the stream closes it).
pub(crate) fn glommio_unix_stream(fd: OwnedFd) -> glommio::net::UnixStream {
    use std::os::fd::IntoRawFd;
    // SAFETY: ownership of the open descriptor moves into the stream.
    unsafe { glommio::net::UnixStream::from_raw_fd(fd.into_raw_fd()) }
}

/// A glommio TCP stream over a connected socket this process owns (the stream closes it).
pub(crate) fn glommio_tcp_stream(fd: OwnedFd) -> glommio::net::TcpStream {
    use std::os::fd::IntoRawFd;
    // SAFETY: ownership of the connected socket moves into the stream.
    unsafe { glommio::net::TcpStream::from_raw_fd(fd.into_raw_fd()) }
}

/// The CPUs this process may run on, in order (empty when the kernel will not say).
pub(crate) fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity fills the set we own, of the size we pass.
    let ok =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) }
            == 0;
    if !ok {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: CPU_ISSET reads the set we own, at an index below CPU_SETSIZE.
        .filter(|c| unsafe { libc::CPU_ISSET(*c, &set) })
        .collect()
}

/// Hints the CPU to load `lines` cache lines of the `Rc` allocation whose value is at `value`
/// (its counts sit 16 bytes before it).
#[inline(always)]
pub(crate) fn prefetch<T>(value: *const T, lines: usize) {
    #[cfg(target_arch = "x86_64")]
    for i in 0..lines {
        let p = (value as *const i8).wrapping_sub(16).wrapping_add(i * 64);
        // SAFETY: a prefetch is only a hint: it never faults, whatever the address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (value, lines);
}

/// Clock ticks per second, the unit of CPU times in `/proc` (`sysconf(_SC_CLK_TCK)`).
pub(crate) fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf reads a constant of the system; it has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 {
        n as u64
    } else {
        100
    }
}

/// The size of a memory page, the unit of resident memory in `/proc`.
pub(crate) fn page_size() -> u64 {
    // SAFETY: as above.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// The soft limit on open file descriptors (`RLIMIT_NOFILE`).
pub(crate) fn open_files_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        0
    }
}

/// The kernel's release (`uname -r`), such as `6.1.0-18-amd64`.
pub(crate) fn kernel_release() -> Option<String> {
    // SAFETY: an all-zero utsname is a valid value of the plain C struct uname fills.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes into the struct we own.
    if unsafe { libc::uname(&mut name) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = name
        .release
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What accept4 writes for each family reads back as the address it holds.
    #[test]
    fn socket_addresses_read_back() {
        let v6: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
        // SAFETY: all-zero is a valid sockaddr_storage, and sockaddr_in6 fits in it.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        unsafe {
            let sin6 = (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
            (*sin6).sin6_family = libc::AF_INET6 as libc::sa_family_t;
            (*sin6).sin6_addr.s6_addr = v6.octets();
        }
        assert_eq!(ip_of(&storage), std::net::IpAddr::from(v6));
        // SAFETY: as above, with a sockaddr_in.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        unsafe {
            let sin = (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>();
            (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
            (*sin).sin_addr.s_addr = u32::from_ne_bytes([10, 1, 2, 3]);
        }
        assert_eq!(ip_of(&storage), std::net::IpAddr::from([10, 1, 2, 3]));
        storage.ss_family = libc::AF_UNIX as libc::sa_family_t;
        assert_eq!(ip_of(&storage), std::net::IpAddr::from([0, 0, 0, 0]));
    }
}
