//! TLS on a glommio TCP stream (rustls): the server configuration, the handshake, and moving
//! records between the socket and the session.

use crate::io::socket::{write_raw, Transport};
use glommio::net::TcpStream;
use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

/// Largest TLS record plus header: what one raw read may need to make progress.
pub(crate) const READ_BYTES: usize = 18 * 1024;

/// A TLS session over its socket.
pub(crate) struct Tls {
    pub(crate) tcp: TcpStream,
    pub(crate) session: rustls::ServerConnection,
}

/// Loads the certificate chain and key named by `tls.cert_file` / `tls.key_file`.
pub(crate) fn server_config(
    cert_file: &str,
    key_file: &str,
) -> Result<Arc<rustls::ServerConfig>, String> {
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
pub(crate) async fn accept_tls(
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
            flush(&stream).await?;
            continue;
        }
        if !handshaking {
            return Ok(stream.into_inner());
        }
        if pull(&stream).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Reads raw bytes into the TLS session and processes them. Returns the raw bytes read.
async fn pull(stream: &RefCell<Transport>) -> io::Result<usize> {
    use futures_lite::AsyncRead;
    poll_fn(|cx| {
        let mut guard = stream.borrow_mut();
        let Transport::Tls(t) = &mut *guard else {
            return Poll::Ready(Ok(0));
        };
        let mut raw = [0u8; 4096];
        match Pin::new(&mut t.tcp).poll_read(cx, &mut raw) {
            Poll::Ready(Ok(n)) => Poll::Ready(ingest(&mut t.session, &raw[..n]).map(|()| n)),
            other => other,
        }
    })
    .await
}

/// Hands raw bytes from the socket to the session and decrypts what they complete.
fn ingest(session: &mut rustls::ServerConnection, mut raw: &[u8]) -> io::Result<()> {
    while !raw.is_empty() {
        session.read_tls(&mut raw)?;
    }
    session.process_new_packets().map_err(io::Error::other)?;
    Ok(())
}

/// One step of a read: plaintext already decrypted goes to `into` first (`Some(n)`); otherwise
/// raw bytes are read and ingested (`None`: read again, a whole record may have come), and 0 is
/// the end of the stream.
pub(crate) fn poll_read(
    t: &mut Tls,
    cx: &mut std::task::Context<'_>,
    into: &mut Vec<u8>,
) -> Poll<io::Result<Option<usize>>> {
    use futures_lite::AsyncRead;
    use std::io::Read;
    let before = into.len();
    match t.session.reader().read_to_end(into) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Poll::Ready(Err(e)),
    }
    if into.len() > before {
        return Poll::Ready(Ok(Some(into.len() - before)));
    }
    let mut raw = [0u8; READ_BYTES];
    match Pin::new(&mut t.tcp).poll_read(cx, &mut raw) {
        Poll::Ready(Ok(0)) => Poll::Ready(Ok(Some(0))),
        Poll::Ready(Ok(n)) => Poll::Ready(ingest(&mut t.session, &raw[..n]).map(|()| None)),
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

/// Writes every pending TLS record to the socket.
pub(crate) async fn flush(stream: &RefCell<Transport>) -> io::Result<()> {
    let mut records = Vec::new();
    if let Transport::Tls(t) = &mut *stream.borrow_mut() {
        while t.session.wants_write() {
            t.session.write_tls(&mut records)?;
        }
    }
    write_raw(stream, &records).await
}
