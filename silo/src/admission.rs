//! The accept loop in front of the gateway: which TCP connections the silo takes, and how long it keeps them.
//!
//! tonic's own listener accepts every connection and keeps it as long as the peer likes. A silo facing
//! untrusted networks needs three bounds, all applied here below HTTP/2:
//!
//! - **`max_connections`**: past it a new connection is closed at once (logged once per burst), so that open
//!   connections cannot exhaust the process's file descriptors.
//! - **accept errors** (`EMFILE` when descriptors do run out, and the like) make the loop sleep briefly instead
//!   of spinning on a listener that stays readable.
//! - **`handshake_timeout`**: a connection must open its first request (an envelope stream, or `GET /metrics`)
//!   within it; **`connection_idle_timeout`**: after that, a connection that sends nothing for that long is
//!   closed. Both end the connection by failing its next read, which HTTP/2 turns into a closed connection.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::Connected;

use crate::sim::{Io, Listener};

/// How long the loop sleeps after an accept error (out of file descriptors, or memory).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How often a refusal is logged at most while refusals continue.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The bounds the loop applies.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdmissionLimits {
    pub(crate) max_connections: usize,
    pub(crate) handshake_timeout: Duration,
    pub(crate) idle_timeout: Duration,
}

/// What the gateway learns about a connection with each request on it.
#[derive(Debug, Clone)]
pub(crate) struct ConnectionInfo {
    pub(crate) remote: SocketAddr,
    /// Set by the first request: from then on only the idle timeout applies.
    pub(crate) established: Arc<AtomicBool>,
}

/// An admitted connection: the TCP stream, its place among `max_connections`, and its timeouts.
pub(crate) struct AdmittedStream {
    stream: Box<dyn Io>,
    info: ConnectionInfo,
    limits: AdmissionLimits,
    deadline: Pin<Box<Sleep>>,
    last_read: Instant,
    _permit: OwnedSemaphorePermit,
}

impl Connected for AdmittedStream {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for AdmittedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.last_read = Instant::now();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => loop {
                if self.deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let established = self.info.established.load(Ordering::Relaxed);
                if established {
                    // The timer is not moved on every read: when it fires, it is re-armed from the last read.
                    let due = self.last_read + self.limits.idle_timeout;
                    if due > Instant::now() {
                        self.deadline.as_mut().reset(due);
                        continue;
                    }
                }
                let what = if established { "idle timeout" } else { "no request within the handshake timeout" };
                tracing::debug!(remote = %self.info.remote, what, "closing connection");
                return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, what)));
            },
        }
    }
}

impl AsyncWrite for AdmittedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts connections on `listener` within `limits` until `stopped`; the admitted ones come out of the
/// returned channel, for the HTTP/2 server.
pub(crate) fn accept_loop(
    mut listener: Box<dyn Listener>,
    limits: AdmissionLimits,
    mut stopped: watch::Receiver<bool>,
) -> mpsc::Receiver<std::io::Result<AdmittedStream>> {
    let (admitted, incoming) = mpsc::channel(64);
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let mut last_refusal_log: Option<Instant> = None;
        let mut refused_since_log = 0u64;
        let mut last_error_log: Option<Instant> = None;
        loop {
            let accepted = tokio::select! {
                biased; // no random branch order: a simulated run repeats exactly
                accepted = listener.accept() => accepted,
                _ = stopped.wait_for(|stop| *stop) => return,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    if last_error_log.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL) {
                        tracing::warn!(%error, "accepting connections failed; pausing (out of file descriptors?)");
                        last_error_log = Some(Instant::now());
                    }
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                refused_since_log += 1;
                if last_refusal_log.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL) {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        refused = refused_since_log,
                        %remote,
                        "connection limit reached; refusing connections"
                    );
                    last_refusal_log = Some(Instant::now());
                    refused_since_log = 0;
                }
                drop(stream);
                continue;
            };
            let info = ConnectionInfo { remote, established: Arc::new(AtomicBool::new(false)) };
            let deadline = Box::pin(tokio::time::sleep(limits.handshake_timeout));
            let stream = AdmittedStream { stream, info, limits, deadline, last_read: Instant::now(), _permit: permit };
            if admitted.send(Ok(stream)).await.is_err() {
                return; // the server stopped
            }
        }
    });
    incoming
}
