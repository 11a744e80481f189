//! The writer task: writes what the flush pass could not (TLS records, a socket that is full)
//! until the queue is empty or the close frame is out, then exits, so an idle connection has no
//! writer. A write that makes no progress for `write_timeout` ends the connection (the other
//! slow-consumer exit, beside the queue bound of `send_queue.rs`).

use super::{pool, Conn, Phase};
use crate::io::socket::{self as transport, Transport};
use crate::metrics::ShardMetrics;
use futures_lite::future;
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

impl Conn {
    /// Starts the writer task unless one runs (it loops until the queue is empty).
    pub(super) fn start_writer(self: &Rc<Self>) {
        if self.writer_running.get() || self.is_dead() {
            return;
        }
        let Some((send, stream)) = self
            .io
            .borrow()
            .as_ref()
            .map(|io| (io.send.clone(), io.stream.clone()))
        else {
            return;
        };
        self.writer_running.set(true);
        let conn = self.clone();
        glommio::spawn_local(async move {
            writer(&conn, &stream, send.write_timeout, send.metrics()).await;
            conn.writer_running.set(false);
            if let Some(w) = conn.writer_done.take() {
                w.wake();
            }
        })
        .detach();
    }
}

/// Why a write stopped before the end of its bytes.
enum Stopped {
    /// The socket failed.
    Failed,
    /// No progress within the write timeout.
    TimedOut,
}

async fn writer(
    conn: &Conn,
    stream: &RefCell<Transport>,
    timeout: Duration,
    metrics: &ShardMetrics,
) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if conn.is_dead() {
            return;
        }
        std::mem::swap(&mut buf, &mut *conn.out.borrow_mut());
        if buf.is_empty() {
            // Keep the (empty) queue's buffer where it was.
            std::mem::swap(&mut buf, &mut *conn.out.borrow_mut());
            return;
        }
        conn.inflight.set(buf.len());
        let oldest = conn.oldest.take();
        if let Err(stopped) = write_out(conn, stream, &buf, timeout).await {
            if let Stopped::TimedOut = stopped {
                ShardMetrics::add(&metrics.write_timeouts_total, 1);
                tracing::info!(
                    conn = conn.id,
                    "write made no progress within write_timeout; closed"
                );
            }
            conn.mark_dead();
            return;
        }
        if let Some(t) = oldest {
            metrics.observe_publish_to_write(t.elapsed());
        }
        conn.inflight.set(0);
        pool::give(std::mem::take(&mut buf));
        if conn.phase.get() == Phase::Closing && conn.out.borrow().is_empty() {
            // The close frame is out: send FIN and let the session drain until the peer closes.
            transport::shutdown_write(stream).await;
            // Tell the session, which may be waiting on a far timer (the close came from
            // fan-out or shutdown, not from the session), that its close linger starts now.
            conn.close_is_out();
            return;
        }
    }
}

/// Writes all of `buf`, keeping `inflight` current.
async fn write_out(
    conn: &Conn,
    stream: &RefCell<Transport>,
    buf: &[u8],
    timeout: Duration,
) -> Result<(), Stopped> {
    let mut written = 0;
    while written < buf.len() {
        // Most writes complete at once: try before arming the write timeout, which costs a
        // timer insertion and removal per write.
        let mut write = std::pin::pin!(transport::write_some(stream, &buf[written..]));
        let attempt = match future::poll_once(write.as_mut()).await {
            Some(done) => Some(done),
            // Boxed: only a blocked write needs the timer's state.
            None => {
                Box::pin(future::or(async { Some(write.await) }, async {
                    glommio::timer::sleep(timeout).await;
                    None
                }))
                .await
            }
        };
        match attempt {
            Some(Ok(n)) if n > 0 => {
                written += n;
                conn.inflight.set(buf.len() - written);
            }
            Some(_) => return Err(Stopped::Failed),
            None => return Err(Stopped::TimedOut),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::socket::RawSock;

    /// A writer lives while a socket is full: its future is memory per slow connection.
    #[test]
    fn the_writer_future_stays_small() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tcp = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let stream = RefCell::new(Transport::Raw(RawSock::new(tcp.into())));
        let conn = Conn::new(1, 1 << 20);
        let metrics = ShardMetrics::default();
        let w = std::mem::size_of_val(&writer(&conn, &stream, Duration::from_secs(1), &metrics));
        eprintln!("writer future {w} B");
        assert!(w <= 640, "{w}");
    }
}
