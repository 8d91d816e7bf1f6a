//! The framed TCP transport: envelopes as length-prefixed prost messages straight over a byte stream, spoken
//! between silos and by the Rust [`crate::Client`] when the connection is plaintext.
//!
//! The gRPC stream (`/grains.v1.Gateway/Connect`) carries the same envelopes for clients in other languages and
//! over TLS; both land in the same serving loop (`gateway::serve_connection`) and, on the calling side, in the
//! same [`crate::connection::Connection`]. What the framed transport saves is the HTTP/2 machinery between a
//! caller and the socket: a caller encodes its request and, when no other write is under way, writes it to the
//! socket itself ([`FrameWriter`]); a reply is read by the connection's reader task and handed to its caller
//! directly. Under contention whoever holds the socket writes everything queued in one go, so writes batch
//! exactly when there is something to batch.
//!
//! # On the wire
//!
//! The opening side sends [`MAGIC`] (8 bytes), then frames. A frame is a 1-byte flag (always 0: no
//! compression) and a 4-byte big-endian length, then that many bytes of an [`Envelope`] — the framing of a gRPC
//! message, so a frame means the same bytes on either transport. The first frame is a [`Kind::Hello`] envelope whose `metadata`
//! carries what a gRPC stream carries in its request metadata (a peer's membership proof, a client's bearer
//! token); the accepting side answers with a `Hello` of its own, with `error` set when it refuses the
//! connection (and then closes it). [`Kind::Ping`] is answered with [`Kind::Pong`]: the opening side pings a
//! connection it has heard nothing on for a while and closes it, failing its calls, when no answer comes.
//!
//! A silo's port tells the transports apart by the first bytes of a connection (the magic cannot begin an
//! HTTP request, an HTTP/2 preface or a TLS handshake). A port serving TLS speaks gRPC only.
//!
//! # Limits
//!
//! A frame whose announced size passes the reader's limit is never buffered: its correlation id is read from
//! its first bytes, the rest is discarded as it arrives, and the frame becomes [`Inbound::TooLarge`] (which
//! fails that one call). Unlike a gRPC stream, the connection goes on after any frame size.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::wire::{Envelope, Inbound, Kind, peek_correlation_id};

/// What the opening side of a framed connection sends first.
pub(crate) const MAGIC: &[u8; 8] = b"grains/1";

/// The size of a frame's header: a flag byte and a 4-byte big-endian length.
const HEADER: usize = 5;

/// The most bytes of a frame read to find its correlation id: field 1's key and a 10-byte varint.
const CORRELATION_PEEK: usize = 11;

/// How much a reader asks of the socket at a time when it needs more.
const READ_CHUNK: usize = 16 * 1024;

/// Appends `envelope` to `out` as one frame.
pub(crate) fn encode_frame(envelope: &Envelope, out: &mut BytesMut) {
    let len = envelope.encoded_len();
    out.reserve(HEADER + len);
    out.put_u8(0);
    out.put_u32(len as u32);
    envelope.encode(out).expect("reserved room for the whole envelope");
}

/// Reads frames off a byte stream. Cancel-safe: every byte read is kept in the reader, so a `next` dropped
/// half-way (a timeout, a `select!`) loses nothing and the next call goes on where it stopped.
///
/// Every frame within the limit becomes an [`Inbound::Envelope`], or [`Inbound::Malformed`] (undecodable, or a
/// flag other than 0); every larger one [`Inbound::TooLarge`], skipped unbuffered. A stream that ends inside a
/// frame is an error.
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    /// Frames larger than this are not decoded: they become [`Inbound::TooLarge`], unbuffered.
    max_frame: usize,
    /// The oversized frame being discarded, if one is.
    skipping: Option<Skip>,
}

#[derive(Debug, Clone, Copy)]
struct Skip {
    correlation_id: u64,
    size: usize,
    left: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader decoding frames of up to `max_frame` bytes.
    pub fn new(io: R, max_frame: usize) -> Self {
        FrameReader { io, buf: BytesMut::with_capacity(READ_CHUNK), max_frame, skipping: None }
    }

    /// Reads into the buffer; whether the stream has ended.
    async fn fill(&mut self) -> std::io::Result<bool> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_CHUNK);
        }
        Ok(self.io.read_buf(&mut self.buf).await? == 0)
    }

    /// The next frame; `None` when the stream ends between frames. A stream that ends inside a frame is an
    /// error.
    pub async fn next(&mut self) -> std::io::Result<Option<Inbound>> {
        loop {
            if let Some(skip) = &mut self.skipping {
                let n = skip.left.min(self.buf.len());
                self.buf.advance(n);
                skip.left -= n;
                if skip.left == 0 {
                    let Skip { correlation_id, size, .. } = *skip;
                    self.skipping = None;
                    return Ok(Some(Inbound::TooLarge { correlation_id, size }));
                }
            } else if self.buf.len() >= HEADER {
                let size = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if size <= self.max_frame {
                    if self.buf.len() >= HEADER + size {
                        let flag = self.buf[0];
                        self.buf.advance(HEADER);
                        let frame = self.buf.split_to(size).freeze();
                        if flag != 0 {
                            // No compression is agreed on a framed connection: the frame is refused, whole.
                            let correlation_id = peek_correlation_id(&frame);
                            let reason = format!("a frame flagged {flag} (compressed or unknown); only 0 is spoken");
                            return Ok(Some(Inbound::Malformed { correlation_id, reason }));
                        }
                        return Ok(Some(decode(frame)));
                    }
                    self.buf.reserve(HEADER + size - self.buf.len());
                } else {
                    let peek = CORRELATION_PEEK.min(size);
                    if self.buf.len() >= HEADER + peek {
                        let correlation_id = peek_correlation_id(&self.buf[HEADER..HEADER + peek]);
                        tracing::warn!(size, limit = self.max_frame, correlation_id, "frame over the limit; skipped");
                        self.buf.advance(HEADER);
                        self.skipping = Some(Skip { correlation_id, size, left: size });
                        continue;
                    }
                }
            }
            if self.fill().await? {
                if self.buf.is_empty() && self.skipping.is_none() {
                    return Ok(None);
                }
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the stream ended inside a frame"));
            }
        }
    }
}

fn decode(frame: Bytes) -> Inbound {
    let correlation_id = peek_correlation_id(&frame);
    match Envelope::decode(frame) {
        Ok(envelope) => Inbound::Envelope(envelope),
        Err(e) => Inbound::Malformed { correlation_id, reason: e.to_string() },
    }
}

/// The connection is closed: nothing more can be written to it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Closed;

/// The writing side of a framed connection, shared by every task that writes to it.
///
/// [`FrameWriter::send`] queues a frame; [`FrameWriter::flush`] writes the queue to the socket if no other task
/// is writing, and otherwise returns at once, leaving the frame to the writer already at work (which looks at
/// the queue again before it lets go). A caller alone on the connection thus writes its request itself, with no
/// hand-off to another task; while other calls are in flight a flush first lets the tasks ready to run queue
/// their frames, and many callers at once share few writes. A flush cancelled half-way keeps its
/// unwritten bytes for the next one, and hands what is left to a task of its own, so a frame is never cut short
/// and never stranded.
pub(crate) struct FrameWriter {
    queue: Mutex<Queue>,
    side: tokio::sync::Mutex<WriteSide>,
    /// Calls in flight on the connection (see [`FrameWriter::in_flight`]).
    in_flight: AtomicUsize,
    /// Held for as long as the writer lives (a gateway waits for its connections to end).
    _alive: Option<tokio::sync::mpsc::Sender<()>>,
}

struct Queue {
    bytes: BytesMut,
    closed: bool,
}

struct WriteSide {
    io: Box<dyn AsyncWrite + Send + Unpin>,
    /// Taken from the queue and not yet written.
    unwritten: Bytes,
}

impl FrameWriter {
    /// A writer over `io`; `alive` is dropped with the writer.
    pub(crate) fn new(io: Box<dyn AsyncWrite + Send + Unpin>, alive: Option<tokio::sync::mpsc::Sender<()>>) -> Self {
        FrameWriter {
            queue: Mutex::new(Queue { bytes: BytesMut::new(), closed: false }),
            side: tokio::sync::Mutex::new(WriteSide { io, unwritten: Bytes::new() }),
            in_flight: AtomicUsize::new(0),
            _alive: alive,
        }
    }

    /// Queues `envelope`. [`FrameWriter::flush`] writes it.
    pub(crate) fn send(&self, envelope: &Envelope) -> Result<(), Closed> {
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if queue.closed {
            return Err(Closed);
        }
        encode_frame(envelope, &mut queue.bytes);
        Ok(())
    }

    /// Queues `envelope` and writes it (see [`FrameWriter::flush`]).
    pub(crate) async fn write(self: &Arc<Self>, envelope: &Envelope) -> Result<(), Closed> {
        self.send(envelope)?;
        self.flush().await;
        Ok(())
    }

    /// Whether the writer has been closed (a write failed, or [`FrameWriter::close`]).
    pub(crate) fn is_closed(&self) -> bool {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).closed
    }

    /// Refuses further frames, drops what is queued, and shuts the socket's writing side down.
    /// Outside a runtime (a client dropped after its runtime) the socket closes when the writer is dropped.
    pub(crate) fn close(self: &Arc<Self>) {
        self.mark_closed();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let writer = self.clone();
        runtime.spawn(async move {
            let mut side = writer.side.lock().await;
            let _ = side.io.shutdown().await;
        });
    }

    fn mark_closed(&self) {
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        queue.closed = true;
        queue.bytes = BytesMut::new();
    }

    fn take_queued(&self) -> Bytes {
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if queue.bytes.is_empty() {
            return Bytes::new();
        }
        queue.bytes.split().freeze()
    }

    /// Counts a call in flight on the connection until the returned guard is dropped: while others are in
    /// flight, their frames may be about to be written too, and a flush lets them queue first.
    pub(crate) fn in_flight(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn has_queued(&self) -> bool {
        !self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).bytes.is_empty()
    }

    /// Writes what is queued, unless another task is writing (it will write this too).
    pub(crate) async fn flush(self: &Arc<Self>) {
        let mut unfinished = Unfinished(Some(self.clone()));
        self.flush_inner().await;
        unfinished.0 = None;
    }

    async fn flush_inner(&self) {
        loop {
            let Ok(mut side) = self.side.try_lock() else { return };
            if self.in_flight.load(Ordering::Relaxed) > 1 {
                // Other calls are in flight: tasks ready to run now may have frames for this connection. Let
                // them queue them (finding the socket taken, they leave them to this task) and write all in one
                // go. A caller alone on the connection writes at once.
                tokio::task::yield_now().await;
            }
            loop {
                if side.unwritten.is_empty() {
                    let bytes = self.take_queued();
                    if bytes.is_empty() {
                        break;
                    }
                    side.unwritten = bytes;
                }
                let WriteSide { io, unwritten } = &mut *side;
                match io.write(unwritten).await {
                    Ok(n) if n > 0 => unwritten.advance(n),
                    result => {
                        tracing::debug!(?result, "framed connection: write failed; closing");
                        side.unwritten = Bytes::new();
                        self.mark_closed();
                        return;
                    }
                }
            }
            if let Err(error) = side.io.flush().await {
                tracing::debug!(%error, "framed connection: flush failed; closing");
                self.mark_closed();
                return;
            }
            drop(side);
            // A frame queued while this task held the socket, by a task that then found it busy, is this task's
            // to write.
            if !self.has_queued() {
                return;
            }
        }
    }
}

/// A call in flight on a framed connection (see [`FrameWriter::in_flight`]).
pub(crate) struct InFlight(Arc<FrameWriter>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Set while a flush runs: dropped before the flush finished (its future was cancelled), it hands the rest of
/// the work to a task of its own.
struct Unfinished(Option<Arc<FrameWriter>>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(writer) = self.0.take() {
            if writer.is_closed() {
                return;
            }
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { writer.flush_inner().await });
            }
        }
    }
}

/// Reads a connection's first frame (the other side's [`Kind::Hello`]) within `max_frame`.
pub(crate) async fn read_hello<R: AsyncRead + Unpin>(reader: &mut FrameReader<R>) -> Result<Envelope, String> {
    match reader.next().await {
        Ok(Some(Inbound::Envelope(envelope))) if envelope.kind == Kind::Hello as i32 => Ok(envelope),
        Ok(Some(Inbound::Envelope(envelope))) => Err(format!("expected a hello frame, got kind {}", envelope.kind)),
        Ok(Some(Inbound::Malformed { reason, .. })) => Err(format!("malformed hello frame: {reason}")),
        Ok(Some(Inbound::TooLarge { size, .. })) => Err(format!("a hello frame of {size} bytes")),
        Ok(None) => Err("the connection closed before its hello frame".to_owned()),
        Err(error) => Err(error.to_string()),
    }
}

/// Writes `MAGIC` (when `with_magic`) and `hello` straight to `io`, before the connection has a [`FrameWriter`].
pub(crate) async fn write_hello<W: AsyncWrite + Unpin>(
    io: &mut W,
    with_magic: bool,
    hello: &Envelope,
) -> std::io::Result<()> {
    let mut bytes = BytesMut::new();
    if with_magic {
        bytes.extend_from_slice(MAGIC);
    }
    encode_frame(hello, &mut bytes);
    io.write_all(&bytes).await?;
    io.flush().await
}

/// Request metadata as the string pairs a hello frame carries.
pub(crate) fn metadata_to_pairs(metadata: &tonic::metadata::MetadataMap) -> std::collections::BTreeMap<String, String> {
    metadata
        .iter()
        .filter_map(|entry| match entry {
            tonic::metadata::KeyAndValueRef::Ascii(key, value) => {
                Some((key.as_str().to_owned(), value.to_str().ok()?.to_owned()))
            }
            tonic::metadata::KeyAndValueRef::Binary(..) => None,
        })
        .collect()
}

/// A hello frame's string pairs as request metadata (pairs that are not valid metadata are left out).
pub(crate) fn pairs_to_metadata(pairs: &std::collections::BTreeMap<String, String>) -> tonic::metadata::MetadataMap {
    let mut headers = http::HeaderMap::new();
    for (key, value) in pairs {
        if let (Ok(key), Ok(value)) = (http::HeaderName::from_bytes(key.as_bytes()), http::HeaderValue::from_str(value))
        {
            headers.insert(key, value);
        }
    }
    tonic::metadata::MetadataMap::from_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(envelopes: &[Envelope]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for envelope in envelopes {
            encode_frame(envelope, &mut out);
        }
        out.to_vec()
    }

    fn request(correlation_id: u64, payload_len: usize) -> Envelope {
        Envelope { correlation_id, payload: vec![7u8; payload_len].into(), ..Default::default() }
    }

    /// Feeds `stream` through a reader `chunk` bytes at a time.
    async fn read_all(stream: Vec<u8>, chunk: usize, max_frame: usize) -> (Vec<Inbound>, std::io::Result<()>) {
        let (mut tx, rx) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            for piece in stream.chunks(chunk) {
                tx.write_all(piece).await.unwrap();
            }
        });
        let mut reader = FrameReader::new(rx, max_frame);
        let mut out = Vec::new();
        let end = loop {
            match reader.next().await {
                Ok(Some(frame)) => out.push(frame),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        writer.await.unwrap();
        (out, end)
    }

    #[tokio::test]
    async fn frames_are_read_whole_however_the_bytes_arrive() {
        let envelopes = [request(1, 10), request(2, 0), Envelope::default(), request(300, 5000)];
        for chunk in [1, 2, 5, 7, 64, 100_000] {
            let (frames, end) = read_all(frames(&envelopes), chunk, 1 << 20).await;
            assert!(end.is_ok(), "chunks of {chunk}: {end:?}");
            let ids: Vec<u64> = frames
                .iter()
                .map(|f| match f {
                    Inbound::Envelope(e) => e.correlation_id,
                    other => panic!("chunks of {chunk}: {other:?}"),
                })
                .collect();
            assert_eq!(ids, [1, 2, 0, 300], "chunks of {chunk}");
        }
    }

    #[tokio::test]
    async fn an_oversized_frame_is_skipped_unbuffered_and_the_stream_goes_on() {
        let max = 1024;
        let envelopes = [request(1, 10), request(2, 100_000), request(3, 1000)];
        for chunk in [1, 3, 11, 4096, 1 << 20] {
            let (frames, end) = read_all(frames(&envelopes), chunk, max).await;
            assert!(end.is_ok(), "chunks of {chunk}: {end:?}");
            assert_eq!(frames.len(), 3, "chunks of {chunk}");
            assert!(matches!(&frames[0], Inbound::Envelope(e) if e.correlation_id == 1));
            assert!(
                matches!(&frames[1], Inbound::TooLarge { correlation_id: 2, size } if *size > 100_000),
                "chunks of {chunk}: {:?}",
                frames[1]
            );
            assert!(matches!(&frames[2], Inbound::Envelope(e) if e.correlation_id == 3));
        }
        // A header announcing 4 GiB: nothing of it is buffered while it is skipped.
        let mut reader = FrameReader::new(&[0u8, 0xff, 0xff, 0xff, 0xff, 0x08, 0x05][..], max);
        let end = reader.next().await;
        assert!(end.is_err(), "the stream ended inside the frame");
        assert!(reader.buf.capacity() <= 2 * READ_CHUNK, "nothing reserved for the announced size");
    }

    #[tokio::test]
    async fn a_broken_frame_is_malformed_with_its_correlation_id_and_a_cut_stream_is_an_error() {
        let mut bytes = Envelope { correlation_id: 42, method: "x".into(), ..Default::default() }.encode_to_vec();
        bytes.truncate(bytes.len() - 1);
        let mut stream = vec![0];
        stream.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        stream.extend_from_slice(&bytes);
        stream.extend(frames(&[request(43, 3)]));
        let (frames, end) = read_all(stream.clone(), 4, 1024).await;
        assert!(end.is_ok());
        assert!(matches!(&frames[0], Inbound::Malformed { correlation_id: 42, .. }), "{:?}", frames[0]);
        assert!(matches!(&frames[1], Inbound::Envelope(e) if e.correlation_id == 43));
        stream.truncate(stream.len() - 2);
        let (frames, end) = read_all(stream, 4, 1024).await;
        assert_eq!(frames.len(), 1);
        assert_eq!(end.unwrap_err().kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn a_flagged_frame_is_refused_and_the_stream_goes_on() {
        let mut stream = frames(&[request(5, 3)]);
        stream[0] = 1;
        stream.extend(frames(&[request(6, 3)]));
        let (frames, end) = read_all(stream, 3, 1024).await;
        assert!(end.is_ok());
        assert!(matches!(&frames[0], Inbound::Malformed { correlation_id: 5, .. }), "{:?}", frames[0]);
        assert!(matches!(&frames[1], Inbound::Envelope(e) if e.correlation_id == 6));
    }

    #[tokio::test]
    async fn writes_from_many_tasks_arrive_whole() {
        let (tx, rx) = tokio::io::duplex(256);
        let writer = Arc::new(FrameWriter::new(Box::new(tx), None));
        let mut tasks = Vec::new();
        for task in 0..8u64 {
            let writer = writer.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..200u64 {
                    writer.write(&request(task * 1000 + i, (i % 50) as usize * 37)).await.unwrap();
                }
            }));
        }
        let reading = tokio::spawn(async move {
            let mut reader = FrameReader::new(rx, 1 << 20);
            let mut seen = Vec::new();
            while let Ok(Some(Inbound::Envelope(e))) = reader.next().await {
                assert_eq!(e.payload.len(), (e.correlation_id % 1000 % 50) as usize * 37);
                seen.push(e.correlation_id);
                if seen.len() == 1600 {
                    break;
                }
            }
            seen
        });
        for task in tasks {
            task.await.unwrap();
        }
        let mut seen = reading.await.unwrap();
        seen.sort_unstable();
        let mut expected: Vec<u64> = (0..8u64).flat_map(|t| (0..200).map(move |i| t * 1000 + i)).collect();
        expected.sort_unstable();
        assert_eq!(seen, expected, "every frame, once, whole");
    }

    #[tokio::test]
    async fn a_flush_cancelled_mid_write_is_finished_by_a_task_of_its_own() {
        // A pipe of 16 bytes: a 4000-byte frame takes many writes, each waiting for the reader.
        let (tx, rx) = tokio::io::duplex(16);
        let writer = Arc::new(FrameWriter::new(Box::new(tx), None));
        writer.send(&request(9, 4000)).unwrap();
        let cancelled = tokio::time::timeout(std::time::Duration::from_millis(5), writer.flush()).await;
        assert!(cancelled.is_err(), "the flush could not finish with nobody reading");
        let mut reader = FrameReader::new(rx, 1 << 20);
        let frame = tokio::time::timeout(std::time::Duration::from_secs(5), reader.next()).await.unwrap().unwrap();
        assert!(matches!(frame, Some(Inbound::Envelope(e)) if e.correlation_id == 9 && e.payload.len() == 4000));
    }

    #[test]
    fn hello_metadata_survives_the_round_trip() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        metadata.insert("grains-peer", "127.0.0.1:1".parse().unwrap());
        metadata.insert("authorization", "Bearer abc".parse().unwrap());
        let pairs = metadata_to_pairs(&metadata);
        assert_eq!(pairs.len(), 2);
        let back = pairs_to_metadata(&pairs);
        assert_eq!(back.get("grains-peer").unwrap(), "127.0.0.1:1");
        assert_eq!(back.get("authorization").unwrap(), "Bearer abc");
    }
}
