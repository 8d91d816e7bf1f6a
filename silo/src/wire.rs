//! The envelope protocol spoken between clients and silos: prost messages on one bidirectional gRPC stream.
//!
//! The messages are derived in Rust with prost's derives (no `protoc` at build time). The same schema is published
//! for clients in other languages as `silo/proto/grains.proto` (package `grains.v1`, service `Gateway`, method
//! `Connect`): a test in the `tests` crate (`tests/tests/proto.rs`) compiles it and checks it field for field
//! against the structs below, both ways, and calls a silo through it with a plain gRPC client, so the two cannot
//! drift apart. Each connection carries many calls at once: a request and its response share a
//! `correlation_id`, and responses come back in completion order.
//!
//! A frame that cannot be decoded, or that is larger than the payload limit, is answered with a typed error
//! for its correlation id (read from the frame's first field when possible, else 0) and the stream keeps
//! working. A frame whose header announces more than [`frame_limit`] (the payload limit plus
//! [`ENVELOPE_OVERHEAD`]) ends the stream at the header, before any of it is buffered: the transport cannot
//! skip a frame, and buffering whatever a header announces lets a few streams take the silo's memory.

use bytes::{Buf, Bytes};
use grains::{CallError, GrainId, GrainKey};
use prost::Message;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// The gRPC path of the gateway's one method: a bidirectional stream of [`Envelope`]s.
pub const CONNECT_PATH: &str = "/grains.v1.Gateway/Connect";

/// The largest frame a silo reads from a peer it called (a silo's replies are bounded by its own payload
/// limit). Clients read less: their own `max_payload_bytes` plus envelope overhead, checked on the header.
pub const HARD_FRAME_LIMIT: usize = 256 * 1024 * 1024;

/// Room for an envelope's own fields (target, method, call chain) around its payload.
pub const ENVELOPE_OVERHEAD: usize = 64 * 1024;

/// The largest frame a silo reads with a payload limit of `max_payload_bytes`: frames up to it that exceed the
/// payload limit are answered with [`CallError::PayloadTooLarge`]; a larger one ends the stream at its header.
pub fn frame_limit(max_payload_bytes: usize) -> usize {
    max_payload_bytes.saturating_add(ENVELOPE_OVERHEAD)
}

/// Whether an envelope is a request or a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Kind {
    /// A call to a grain.
    Request = 0,
    /// The answer to a call.
    Response = 1,
    /// The first frame each side sends on a framed TCP connection (see `framed`): the opening side's carries
    /// its credentials in `metadata`; the answer carries `error` when the connection is refused. Not used on a
    /// gRPC stream, which carries credentials in its request metadata.
    Hello = 2,
    /// Asks the other side to show it is alive (framed connections; gRPC streams use HTTP/2 pings).
    Ping = 3,
    /// The answer to a [`Kind::Ping`].
    Pong = 4,
}

/// One frame on a connection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Envelope {
    /// Matches a response to its request; chosen by the caller, unique per connection.
    #[prost(uint64, tag = "1")]
    pub correlation_id: u64,
    /// Request or response.
    #[prost(enumeration = "Kind", tag = "2")]
    pub kind: i32,
    /// The grain called (requests).
    #[prost(message, optional, tag = "3")]
    pub target: Option<WireGrainId>,
    /// The method called (requests).
    #[prost(string, tag = "4")]
    pub method: String,
    /// Arguments (requests) or return value (responses) in the payload codec (MessagePack).
    #[prost(bytes = "bytes", tag = "5")]
    pub payload: Bytes,
    /// How long the caller waits, in milliseconds, counted from when the frame is received (0: the silo's
    /// default). Relative, like gRPC's timeout header; see also `deadline_unix_ms`.
    #[prost(uint64, tag = "6")]
    pub timeout_ms: u64,
    /// The grains waiting on this call, outermost first (for cycle detection).
    #[prost(message, repeated, tag = "7")]
    pub call_chain: Vec<WireGrainId>,
    /// Set on a response when the call failed.
    #[prost(message, optional, tag = "8")]
    pub error: Option<WireError>,
    /// How the receiving silo treats a request: [`Mode::Route`] (from a client: route it anywhere),
    /// [`Mode::Cached`] or [`Mode::Placed`] (from a silo: deliver here).
    #[prost(enumeration = "Mode", tag = "9")]
    pub mode: i32,
    /// For [`Mode::Placed`]: the id of the directory entry that placed the grain here (diagnostics; the
    /// activation registers under a fresh id of its own).
    #[prost(uint64, tag = "10")]
    pub registration: u64,
    /// The caller's deadline as wall-clock milliseconds since the Unix epoch (0: none). With `timeout_ms` it
    /// makes deadlines absolute across hops: time a request spends queued in sockets — say, at a silo that was
    /// frozen — counts against it, provided the hosts' clocks agree to well within a call timeout (as NTP keeps
    /// them). The earlier of the two deadlines applies.
    #[prost(uint64, tag = "11")]
    pub deadline_unix_ms: u64,
    /// The caller's request metadata (requests): string pairs that flow on to the calls this one makes.
    #[prost(btree_map = "string, string", tag = "12")]
    pub metadata: std::collections::BTreeMap<String, String>,
    /// Set by a gateway on the response to a client's routed request when the grain's activation lives on
    /// another silo: that silo's gateway (`host:port`, as the cluster's gateway list names it). A client may
    /// send the grain's next calls there, saving the gateway's hop; a hint, never needed for correctness.
    #[prost(string, tag = "13")]
    pub location: String,
}

/// Wall-clock milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    crate::sim::unix_ms()
}

impl Envelope {
    /// Stamps a request with its deadline, relative and absolute.
    pub(crate) fn set_deadline(&mut self, deadline: tokio::time::Instant) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        self.timeout_ms = left.as_millis().max(1) as u64;
        self.deadline_unix_ms = unix_ms() + self.timeout_ms;
    }

    /// The local deadline of a received request: the earlier of its relative timeout (counted from now; the
    /// silo's `default` when 0) and its absolute deadline. A request whose absolute deadline has passed already
    /// is refused with [`CallError::Timeout`] before anything runs.
    pub(crate) fn deadline(&self, default: std::time::Duration) -> Result<tokio::time::Instant, CallError> {
        let now = tokio::time::Instant::now();
        let relative = match self.timeout_ms {
            0 => default,
            ms => std::time::Duration::from_millis(ms),
        };
        if self.deadline_unix_ms == 0 {
            return Ok(now + relative);
        }
        let left = self.deadline_unix_ms.saturating_sub(unix_ms());
        if left == 0 {
            return Err(CallError::Timeout(std::time::Duration::ZERO));
        }
        Ok(now + relative.min(std::time::Duration::from_millis(left)))
    }
}

/// How a silo treats a request it receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Mode {
    /// From an external client: the receiving silo routes the call like any of its own.
    Route = 0,
    /// From a silo whose routing cache names this silo: deliver if the grain is active here, else answer
    /// [`CallError::NotHere`].
    Cached = 1,
    /// From a silo the grain's directory owner sent here: deliver, activating the grain if needed.
    Placed = 2,
}

/// The grain type name of silo-to-silo system calls (probes, directory operations, gateway lists).
pub const SYSTEM_TYPE: &str = "$system";

/// A grain id on the wire.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireGrainId {
    /// The grain type name.
    #[prost(string, tag = "1")]
    pub grain_type: String,
    /// The key.
    #[prost(oneof = "WireKey", tags = "2, 3, 4, 5")]
    pub key: Option<WireKey>,
}

/// A grain key on the wire.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum WireKey {
    /// A string key.
    #[prost(string, tag = "2")]
    Str(String),
    /// An integer key.
    #[prost(sint64, tag = "3")]
    Int(i64),
    /// A UUID key, 16 bytes big-endian.
    #[prost(bytes, tag = "4")]
    Uuid(Vec<u8>),
    /// A compound key.
    #[prost(message, tag = "5")]
    Compound(CompoundKey),
}

/// An integer + string key.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CompoundKey {
    /// The integer part.
    #[prost(sint64, tag = "1")]
    pub number: i64,
    /// The string part.
    #[prost(string, tag = "2")]
    pub extension: String,
}

/// A call failure on the wire.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WireError {
    /// Human-readable description.
    #[prost(string, tag = "1")]
    pub message: String,
    /// The [`CallError`] in MessagePack with named fields, for clients that match on it.
    #[prost(bytes = "bytes", tag = "2")]
    pub detail: Bytes,
}

impl From<&GrainId> for WireGrainId {
    fn from(id: &GrainId) -> Self {
        let key = match id.key() {
            GrainKey::Str(s) => WireKey::Str(s.to_string()),
            GrainKey::Int(i) => WireKey::Int(*i),
            GrainKey::Uuid(u) => WireKey::Uuid(u.as_bytes().to_vec()),
            GrainKey::Compound(n, s) => WireKey::Compound(CompoundKey { number: *n, extension: s.to_string() }),
        };
        WireGrainId { grain_type: id.grain_type().to_owned(), key: Some(key) }
    }
}

impl WireGrainId {
    /// The grain id, with the type name given as a `'static` string when the caller has one interned.
    pub fn to_grain_id(&self, interned_type: Option<&'static str>) -> Result<GrainId, CallError> {
        let key = match &self.key {
            Some(WireKey::Str(s)) => GrainKey::Str(s.as_str().into()),
            Some(WireKey::Int(i)) => GrainKey::Int(*i),
            Some(WireKey::Uuid(bytes)) => {
                let raw: [u8; 16] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| CallError::Protocol(format!("a UUID key has 16 bytes, not {}", bytes.len())))?;
                GrainKey::Uuid(grains::Uuid::from_bytes(raw))
            }
            Some(WireKey::Compound(c)) => GrainKey::Compound(c.number, c.extension.as_str().into()),
            None => return Err(CallError::Protocol("grain id without a key".to_owned())),
        };
        Ok(match interned_type {
            Some(name) => GrainId::new(name, key),
            None => GrainId::new(self.grain_type.clone(), key),
        })
    }
}

impl WireError {
    /// Encodes a call error.
    pub fn from_call_error(error: &CallError) -> Self {
        WireError { message: error.to_string(), detail: rmp_detail(error) }
    }

    /// Decodes the call error (falls back to [`CallError::Protocol`] with the message).
    pub fn to_call_error(&self) -> CallError {
        grains::codec::decode_named(&self.detail).unwrap_or_else(|_| CallError::Protocol(self.message.clone()))
    }
}

fn rmp_detail(error: &CallError) -> Bytes {
    grains::codec::encode_named(error).map(Bytes::from).unwrap_or_default()
}

impl Envelope {
    /// A response carrying `result` for `correlation_id`.
    pub fn response(correlation_id: u64, result: Result<Bytes, CallError>) -> Self {
        let mut envelope = Envelope { correlation_id, kind: Kind::Response as i32, ..Default::default() };
        match result {
            Ok(payload) => envelope.payload = payload,
            Err(error) => envelope.error = Some(WireError::from_call_error(&error)),
        }
        envelope
    }
}

/// A frame as read from a stream: an envelope, or what went wrong with it.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "almost every frame is an envelope, moved once from the decoder to its handler: boxing it would cost an allocation per frame"
)]
pub enum Inbound {
    /// A well-formed envelope.
    Envelope(Envelope),
    /// A frame that is not a valid envelope.
    Malformed {
        /// The correlation id, if the frame's first field could be read (else 0).
        correlation_id: u64,
        /// The decoder's complaint.
        reason: String,
    },
    /// A frame larger than the payload limit; skipped unread.
    TooLarge {
        /// The correlation id, if the frame's first field could be read (else 0).
        correlation_id: u64,
        /// The frame size in bytes.
        size: usize,
    },
}

/// Reads the `correlation_id` (field 1, varint) from the start of an encoded envelope, if it is there.
pub(crate) fn peek_correlation_id(mut frame: &[u8]) -> u64 {
    match prost::encoding::decode_key(&mut frame) {
        Ok((1, prost::encoding::WireType::Varint)) => prost::encoding::decode_varint(&mut frame).unwrap_or(0),
        _ => 0,
    }
}

/// The tonic codec for envelope streams: encodes [`Envelope`]s, decodes [`Inbound`] frames.
#[derive(Debug, Clone, Copy)]
pub struct EnvelopeCodec {
    limit: usize,
}

impl EnvelopeCodec {
    /// A codec that refuses frames larger than `limit` bytes (with a typed reply, not a broken stream).
    pub fn new(limit: usize) -> Self {
        Self { limit }
    }
}

impl Codec for EnvelopeCodec {
    type Encode = Envelope;
    type Decode = Inbound;
    type Encoder = EnvelopeCodec;
    type Decoder = EnvelopeCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for EnvelopeCodec {
    type Item = Envelope;
    type Error = Status;

    fn encode(&mut self, item: Envelope, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst).map_err(|e| Status::internal(format!("encode envelope: {e}")))
    }
}

impl Decoder for EnvelopeCodec {
    type Item = Inbound;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Inbound>, Status> {
        let size = src.remaining();
        let correlation_id = peek_correlation_id(src.chunk());
        // The envelope's own fields are small; the limit applies to the frame as a whole.
        if size > self.limit.saturating_add(1024) {
            src.advance(size);
            return Ok(Some(Inbound::TooLarge { correlation_id, size }));
        }
        let frame = src.copy_to_bytes(size);
        Ok(Some(match Envelope::decode(frame) {
            Ok(envelope) => Inbound::Envelope(envelope),
            Err(e) => Inbound::Malformed { correlation_id, reason: e.to_string() },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn time_a_request_spent_queued_counts_against_its_deadline() {
        let default = std::time::Duration::from_secs(30);
        let mut envelope = Envelope::default();
        envelope.set_deadline(tokio::time::Instant::now() + std::time::Duration::from_secs(5));
        let fresh = envelope.deadline(default).unwrap();
        assert!(fresh <= tokio::time::Instant::now() + std::time::Duration::from_secs(5));
        // The same request read 10 s later (it sat in a frozen silo's socket): its relative timeout alone would
        // give it 5 s more; its absolute deadline has passed, so it is refused before anything runs.
        envelope.deadline_unix_ms -= 10_000;
        assert!(matches!(envelope.deadline(default), Err(CallError::Timeout(_))));
        // Read 3 s late: 2 s are left, not 5.
        envelope.deadline_unix_ms += 7_000;
        let left = envelope.deadline(default).unwrap() - tokio::time::Instant::now();
        assert!(left <= std::time::Duration::from_secs(2), "{left:?} left");
        // No absolute deadline (an older caller): the relative timeout, or the default, applies.
        let relative = Envelope { timeout_ms: 1_000, ..Envelope::default() };
        assert!(relative.deadline(default).unwrap() <= tokio::time::Instant::now() + std::time::Duration::from_secs(1));
    }

    #[test]
    fn every_key_shape_survives_the_wire() {
        let keys: [GrainKey; 4] = ["alice".into(), GrainKey::Int(-7), GrainKey::Uuid(uuid_from(3)), (9, "eu").into()];
        for key in keys {
            let id = GrainId::new("Cart", key);
            let wire = WireGrainId::from(&id);
            let decoded = WireGrainId::decode(wire.encode_to_vec().as_slice()).unwrap();
            assert_eq!(decoded.to_grain_id(None).unwrap(), id);
        }
    }

    fn uuid_from(n: u8) -> grains::Uuid {
        grains::Uuid::from_bytes([n; 16])
    }

    #[test]
    fn the_correlation_id_is_read_from_a_broken_frame() {
        let mut bytes = Envelope { correlation_id: 42, method: "x".into(), ..Default::default() }.encode_to_vec();
        bytes.truncate(bytes.len() - 1);
        assert_eq!(peek_correlation_id(&bytes), 42);
        assert!(Envelope::decode(bytes.as_slice()).is_err());
    }

    #[test]
    fn errors_round_trip_as_typed_errors() {
        let error = CallError::UnknownMethod { grain_type: "Cart".into(), method: "nope".into() };
        assert_eq!(WireError::from_call_error(&error).to_call_error(), error);
    }
}
