//! A client stream to a silo with nothing of the real client in between: the test writes frames as bytes and
//! reads the silo's replies as envelopes. Tests use it to send what a real client never would — malformed or
//! oversized frames, system calls from a connection that proved no membership — and to see exactly what the
//! silo answers.

use std::time::Duration;

use bytes::{BufMut, Bytes};
use grains::{CallError, GrainId};
use grains_silo::wire::{CONNECT_PATH, Envelope, EnvelopeCodec, Inbound, Kind, WireGrainId};
use prost::Message;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder, Streaming};

/// How long [`RawEnvelopeStream::next_reply`] waits for the silo.
const REPLY_WAIT: Duration = Duration::from_secs(10);

/// An open Connect stream whose outgoing frames are raw bytes and whose incoming frames are decoded.
pub struct RawEnvelopeStream {
    tx: mpsc::UnboundedSender<Bytes>,
    replies: Streaming<Inbound>,
    next_id: u64,
}

impl RawEnvelopeStream {
    /// Opens a stream to `url` (`http://host:port`), as any client would (no membership proof).
    pub async fn open(url: &str) -> RawEnvelopeStream {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned()).expect("a valid silo URL");
        let channel = endpoint.connect().await.unwrap_or_else(|e| panic!("connect to {url}: {e}"));
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.expect("the channel is ready");
        let (tx, rx) = mpsc::unbounded_channel();
        let request = tonic::Request::new(UnboundedReceiverStream::new(rx));
        let path = http::uri::PathAndQuery::from_static(CONNECT_PATH);
        let response = grpc.streaming(request, path, RawCodec).await.expect("the silo accepts the stream");
        RawEnvelopeStream { tx, replies: response.into_inner(), next_id: 1 }
    }

    /// Sends `frame` as it is: any bytes, well-formed or not.
    pub fn send_frame(&self, frame: Bytes) {
        self.tx.send(frame).expect("the stream is open");
    }

    /// Sends `envelope`, encoded, as it is (correlation id and kind included).
    pub fn send(&self, envelope: &Envelope) {
        self.send_frame(envelope.encode_to_vec().into());
    }

    /// The silo's next reply. Panics if none comes within 10 s or the frame is not an envelope.
    pub async fn next_reply(&mut self) -> Envelope {
        match tokio::time::timeout(REPLY_WAIT, self.replies.message()).await {
            Ok(Ok(Some(Inbound::Envelope(reply)))) => reply,
            other => panic!("expected a reply envelope, got {other:?}"),
        }
    }

    /// Sends `envelope` as a request with the stream's next correlation id and a 5 s deadline, and returns
    /// the payload or error of its reply.
    pub async fn call(&mut self, mut envelope: Envelope) -> Result<Bytes, CallError> {
        envelope.correlation_id = self.next_id;
        envelope.kind = Kind::Request as i32;
        envelope.timeout_ms = 5_000;
        self.next_id += 1;
        self.send(&envelope);
        let reply = self.next_reply().await;
        assert_eq!(reply.correlation_id, envelope.correlation_id, "replies come in order on an idle stream");
        match reply.error {
            Some(error) => Err(error.to_call_error()),
            None => Ok(reply.payload),
        }
    }

    /// Sends `request` as a system call (the reserved `$system` target), encoded as the silo encodes its own.
    pub async fn system(&mut self, request: &impl Serialize) -> Result<Bytes, CallError> {
        let envelope = Envelope {
            target: Some(WireGrainId::from(&GrainId::new("$system", "system"))),
            method: "system".into(),
            payload: grains::codec::encode_named(request).expect("a system request encodes").into(),
            ..Default::default()
        };
        self.call(envelope).await
    }
}

/// Sends frames as given; decodes replies with the silo's own codec (and no size limit of its own).
#[derive(Clone, Copy)]
struct RawCodec;

struct RawEncoder;

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

struct InboundDecoder(EnvelopeCodec);

impl Decoder for InboundDecoder {
    type Item = Inbound;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Inbound>, tonic::Status> {
        self.0.decode(src)
    }
}

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Inbound;
    type Encoder = RawEncoder;
    type Decoder = InboundDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> InboundDecoder {
        InboundDecoder(EnvelopeCodec::new(usize::MAX / 2))
    }
}

/// An HTTP body fed chunk by chunk through a channel; it ends when the sender is dropped. A test uses it to
/// write gRPC frames byte by byte on either side of a stream (a header announcing a huge frame, then a trickle
/// of its bytes), as no real client or server would.
pub struct ChunkedBody(pub mpsc::Receiver<Bytes>);

impl http_body::Body for ChunkedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        self.0.poll_recv(cx).map(|chunk| chunk.map(|bytes| Ok(http_body::Frame::data(bytes))))
    }
}
