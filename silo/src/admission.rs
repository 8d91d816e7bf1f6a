//! The accept loop in front of the gateway: which TCP connections the silo takes, and how long it keeps them.
//!
//! tonic's own listener accepts every connection and keeps it as long as the peer likes. A silo facing
//! untrusted networks needs three bounds, all applied here below HTTP/2:
//!
//! - **`max_connections`**: past it a new connection is closed at once (logged once per burst), so that open
//!   connections cannot exhaust the process's file descriptors.
//! - **running out of file descriptors** (`EMFILE`, `ENFILE`): the loop keeps one descriptor in reserve; when
//!   an accept fails for want of descriptors it closes the reserve, accepts the waiting connection with the
//!   freed descriptor and closes it at once (logged once per burst), then takes the reserve back. Connections
//!   past the descriptor limit are thus closed, not left in the listen backlog until a descriptor frees up,
//!   and the loop never spins on a listener that stays readable. Other accept errors, or a reserve that cannot
//!   be taken back, make the loop sleep briefly.
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
use tracing::Instrument as _;

use crate::sim::{Io, Listener};

/// How long the loop sleeps after an accept error it cannot handle otherwise (out of memory, or out of file
/// descriptors with no reserve to give up).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How often a refusal is logged at most while refusals continue.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Whether an accept failed because the process (`EMFILE`) or the system (`ENFILE`) is out of file descriptors.
fn out_of_descriptors(error: &std::io::Error) -> bool {
    // The same numbers on Linux, the BSDs and macOS.
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    cfg!(unix) && matches!(error.raw_os_error(), Some(ENFILE | EMFILE))
}

/// One file descriptor held back, so that a loop out of descriptors can still accept a waiting connection in
/// order to close it. Not used under a simulator (whose listener never runs out).
struct Reserve(Option<std::fs::File>);

impl Reserve {
    fn new() -> Self {
        Reserve(Self::open())
    }

    fn open() -> Option<std::fs::File> {
        if !cfg!(unix) || crate::sim::is_simulated() {
            return None;
        }
        std::fs::File::open("/dev/null").ok()
    }

    /// Closes the reserve descriptor, if held. Whether one was freed.
    fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// Takes the reserve descriptor back if it is not held. Whether it is held now.
    fn restore(&mut self) -> bool {
        if self.0.is_none() {
            self.0 = Self::open();
        }
        self.0.is_some()
    }
}

/// Logs a kind of refusal at most once per [`REFUSAL_LOG_INTERVAL`], with how many went unlogged before.
#[derive(Default)]
struct RefusalLog {
    last: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    /// Counts one refusal; `log` is called, with the count since the last log, when one is due.
    fn refused(&mut self, log: impl FnOnce(u64)) {
        self.unlogged += 1;
        if self.last.is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL) {
            log(self.unlogged);
            self.last = Some(Instant::now());
            self.unlogged = 0;
        }
    }
}

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
    /// Bytes already read off the stream (to tell its transport), given back first.
    unread: bytes::Bytes,
    info: ConnectionInfo,
    limits: AdmissionLimits,
    deadline: Pin<Box<Sleep>>,
    last_read: Instant,
    _permit: OwnedSemaphorePermit,
}

impl AdmittedStream {
    /// What the gateway knows of the connection.
    pub(crate) fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// Gives `bytes` (read off the stream) back: the next reads return them first.
    pub(crate) fn unread(&mut self, bytes: bytes::Bytes) {
        self.unread = bytes;
    }
}

impl Connected for AdmittedStream {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

impl AsyncRead for AdmittedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        if !self.unread.is_empty() {
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread.split_to(n));
            return Poll::Ready(Ok(()));
        }
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
    let span = match listener.local_addr() {
        Ok(local) => tracing::info_span!("gateway.accept", %local),
        Err(_) => tracing::info_span!("gateway.accept"),
    };
    let accepting = async move {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let mut over_limit = RefusalLog::default();
        let mut out_of_fds = RefusalLog::default();
        let mut failures = RefusalLog::default();
        let mut reserve = Reserve::new();
        // The reserve descriptor was given up to accept a connection past the descriptor limit and close it.
        let mut shedding = false;
        loop {
            let accepted = tokio::select! {
                biased; // no random branch order: a simulated run repeats exactly
                accepted = listener.accept() => accepted,
                _ = stopped.wait_for(|stop| *stop) => return,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) if !shedding && out_of_descriptors(&error) && reserve.release() => {
                    // Accept again at once, with the descriptor just freed, and close what comes.
                    shedding = true;
                    continue;
                }
                Err(error) => {
                    failures.refused(|failed| {
                        tracing::warn!(%error, failed, "accepting connections failed; pausing");
                    });
                    shedding = false;
                    reserve.restore();
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            // Held again as soon as descriptors allow (after shedding, or after a pause that could not take it).
            let reserved = reserve.restore();
            if std::mem::take(&mut shedding) && !reserved {
                // Still out of descriptors: this connection would only wait for one. Closing it frees the
                // descriptor the reserve takes back.
                drop(stream);
                reserve.restore();
                out_of_fds.refused(|refused| {
                    tracing::warn!(
                        refused,
                        %remote,
                        "out of file descriptors; closing new connections until some close"
                    );
                });
                continue;
            }
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                over_limit.refused(|refused| {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        refused,
                        %remote,
                        "connection limit reached; refusing connections"
                    );
                });
                drop(stream);
                continue;
            };
            let info = ConnectionInfo { remote, established: Arc::new(AtomicBool::new(false)) };
            let deadline = Box::pin(tokio::time::sleep(limits.handshake_timeout));
            let stream = AdmittedStream {
                stream,
                unread: bytes::Bytes::new(),
                info,
                limits,
                deadline,
                last_read: Instant::now(),
                _permit: permit,
            };
            if admitted.send(Ok(stream)).await.is_err() {
                return; // the server stopped
            }
        }
    };
    tokio::spawn(accepting.instrument(span));
    incoming
}
