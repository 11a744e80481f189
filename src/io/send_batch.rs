//! The flush pass's sends as one io_uring submission: every socket of a pass is written with a
//! single `io_uring_enter` instead of one `send` system call each.

#![allow(unsafe_code)]

use std::io;
use std::time::Instant;

/// Sends submitted per `io_uring_enter`.
const DEPTH: u32 = 256;

pub(crate) struct SendBatch {
    ring: io_uring::IoUring,
}

/// One send: socket, bytes, length.
pub(crate) type Item = (i32, *const u8, usize);

impl SendBatch {
    /// None when io_uring is unavailable (the flush pass then calls `send` per socket).
    pub(crate) fn new() -> Option<SendBatch> {
        // The flags (kernel 6.0 / 5.19) save work when one thread submits and reaps; older
        // kernels refuse them, so try without.
        let ring = io_uring::IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(DEPTH)
            .or_else(|_| io_uring::IoUring::new(DEPTH));
        match ring {
            Ok(ring) => Some(SendBatch { ring }),
            Err(e) => {
                tracing::warn!(error = %e, "no io_uring for the flush pass; one send() per socket");
                None
            }
        }
    }

    /// Sends every item (non-blocking) and reports each result to `done(index, result, now)`,
    /// `now` read once per `io_uring_enter` (not once per socket). An
    /// error means the ring failed: items not reported may or may not have been sent, and the
    /// ring must not be used again (dropping it cancels what it still holds).
    ///
    /// # Safety
    /// Every item's socket must be open and its bytes valid and unchanged until this returns.
    pub(crate) unsafe fn send_all(
        &mut self,
        items: &[Item],
        mut done: impl FnMut(usize, io::Result<usize>, Instant),
    ) -> io::Result<()> {
        for (chunk_no, chunk) in items.chunks(DEPTH as usize).enumerate() {
            let base = chunk_no * DEPTH as usize;
            let mut pushed = 0;
            {
                let mut sq = self.ring.submission();
                for (i, &(fd, ptr, len)) in chunk.iter().enumerate() {
                    let sqe = io_uring::opcode::Send::new(
                        io_uring::types::Fd(fd),
                        ptr,
                        len.min(u32::MAX as usize) as u32,
                    )
                    .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                    .build()
                    .user_data((base + i) as u64);
                    // SAFETY: the caller keeps the bytes valid until the completion is reaped
                    // below; the queue has DEPTH free entries (all completions of the previous
                    // chunk were reaped).
                    if unsafe { sq.push(&sqe) }.is_err() {
                        break;
                    }
                    pushed += 1;
                }
            }
            // Never seen (the queue is empty here), but waiting for completions of sends that
            // were not queued would hang the shard: those go to the writer, as for EAGAIN.
            for i in pushed..chunk.len() {
                done(
                    base + i,
                    Err(io::ErrorKind::WouldBlock.into()),
                    Instant::now(),
                );
            }
            let mut left = pushed;
            let mut failures = 0;
            while left > 0 {
                if let Err(e) = self.ring.submit_and_wait(left) {
                    // Transient (a signal, no memory for a moment) or not: a few tries, then
                    // the caller gives up on the ring.
                    failures += 1;
                    if failures > 3 {
                        return Err(e);
                    }
                    continue;
                }
                let now = Instant::now();
                for cqe in self.ring.completion() {
                    left -= 1;
                    let r = cqe.result();
                    let result = if r < 0 {
                        Err(io::Error::from_raw_os_error(-r))
                    } else {
                        Ok(r as usize)
                    };
                    done(cqe.user_data() as usize, result, now);
                }
            }
        }
        Ok(())
    }
}
