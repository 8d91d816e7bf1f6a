//! The published schema, `silo/proto/grains.proto`, against the Rust messages it describes and against a real
//! silo: a client in another language generates its stubs from that file, so it must say exactly what the silo
//! speaks.
//!
//! The `.proto` is compiled here in pure Rust (`protox`) and read through dynamic messages (`prost-reflect`):
//! no `protoc`, and nothing generated from it is checked in.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::{Buf, Bytes};
use grains_silo::wire::{CONNECT_PATH, CompoundKey, Envelope, Kind, Mode, WireError, WireGrainId, WireKey};
use grains_silo::{Silo, SiloConfig};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, MapKey, MessageDescriptor, ReflectMessage, Value};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// The package every message of the schema lives in.
const PACKAGE: &str = "grains.v1";

/// The schema, compiled once.
fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../silo/proto");
        let mut compiler = protox::Compiler::new([dir]).expect("the proto directory exists");
        compiler.open_file("grains.proto").unwrap_or_else(|e| panic!("grains.proto does not compile: {e}"));
        compiler.descriptor_pool()
    })
}

fn message(name: &str) -> MessageDescriptor {
    pool().get_message_by_name(&format!("{PACKAGE}.{name}")).unwrap_or_else(|| panic!("no message {name}"))
}

/// Sets field `name` of `message`, failing the test if the schema has no such field or gives it another type.
fn set(message: &mut DynamicMessage, name: &str, value: Value) {
    if let Err(e) = message.try_set_field_by_name(name, value) {
        panic!("{}.{name}: {e}", message.descriptor().full_name());
    }
}

fn enum_number(enumeration: &str, value: &str) -> Value {
    let descriptor = pool().get_enum_by_name(&format!("{PACKAGE}.{enumeration}")).expect("the enum exists");
    let value = descriptor.get_value_by_name(value).unwrap_or_else(|| panic!("no {enumeration}.{value}"));
    Value::EnumNumber(value.number())
}

// The Rust messages as the schema should see them: built field by field, by the Rust field's name, from the
// Rust values. A field whose name, type or number differs between the two makes the test fail.

fn grain_id_as_schema(id: &WireGrainId) -> DynamicMessage {
    let mut m = DynamicMessage::new(message("GrainId"));
    set(&mut m, "grain_type", Value::String(id.grain_type.clone()));
    match &id.key {
        Some(WireKey::Str(s)) => set(&mut m, "str", Value::String(s.clone())),
        Some(WireKey::Int(i)) => set(&mut m, "int", Value::I64(*i)),
        Some(WireKey::Uuid(u)) => set(&mut m, "uuid", Value::Bytes(Bytes::from(u.clone()))),
        Some(WireKey::Compound(c)) => {
            let mut compound = DynamicMessage::new(message("CompoundKey"));
            set(&mut compound, "number", Value::I64(c.number));
            set(&mut compound, "extension", Value::String(c.extension.clone()));
            set(&mut m, "compound", Value::Message(compound));
        }
        None => {}
    }
    m
}

fn envelope_as_schema(e: &Envelope) -> DynamicMessage {
    let kind = match Kind::try_from(e.kind).expect("a known kind") {
        Kind::Request => "KIND_REQUEST",
        Kind::Response => "KIND_RESPONSE",
        Kind::Hello => "KIND_HELLO",
        Kind::Ping => "KIND_PING",
        Kind::Pong => "KIND_PONG",
    };
    let mode = match Mode::try_from(e.mode).expect("a known mode") {
        Mode::Route => "MODE_ROUTE",
        Mode::Cached => "MODE_CACHED",
        Mode::Placed => "MODE_PLACED",
    };
    let mut m = DynamicMessage::new(message("Envelope"));
    set(&mut m, "correlation_id", Value::U64(e.correlation_id));
    set(&mut m, "kind", enum_number("Kind", kind));
    if let Some(target) = &e.target {
        set(&mut m, "target", Value::Message(grain_id_as_schema(target)));
    }
    set(&mut m, "method", Value::String(e.method.clone()));
    set(&mut m, "payload", Value::Bytes(e.payload.clone()));
    set(&mut m, "timeout_ms", Value::U64(e.timeout_ms));
    let chain = e.call_chain.iter().map(|id| Value::Message(grain_id_as_schema(id))).collect();
    set(&mut m, "call_chain", Value::List(chain));
    if let Some(error) = &e.error {
        let mut wire_error = DynamicMessage::new(message("Error"));
        set(&mut wire_error, "message", Value::String(error.message.clone()));
        set(&mut wire_error, "detail", Value::Bytes(error.detail.clone()));
        set(&mut m, "error", Value::Message(wire_error));
    }
    set(&mut m, "mode", enum_number("Mode", mode));
    set(&mut m, "registration", Value::U64(e.registration));
    set(&mut m, "deadline_unix_ms", Value::U64(e.deadline_unix_ms));
    let metadata: HashMap<MapKey, Value> =
        e.metadata.iter().map(|(k, v)| (MapKey::String(k.clone()), Value::String(v.clone()))).collect();
    set(&mut m, "metadata", Value::Map(metadata));
    set(&mut m, "location", Value::String(e.location.clone()));
    m
}

/// Envelopes with every field set to a value other than its default (so that each is on the wire), and between
/// them every shape of grain key.
fn full_envelopes() -> Vec<Envelope> {
    let key = |grain_type: &str, key: WireKey| WireGrainId { grain_type: grain_type.into(), key: Some(key) };
    let compound = WireKey::Compound(CompoundKey { number: -9, extension: "eu".into() });
    let full = Envelope {
        correlation_id: u64::MAX - 3,
        kind: Kind::Response as i32,
        target: Some(key("Cart", WireKey::Str("alice".into()))),
        method: "add_item".into(),
        payload: Bytes::from_static(&[0x92, 0x01, 0xa1, b'x']),
        timeout_ms: 30_000,
        call_chain: vec![
            key("Game", WireKey::Int(-42)),
            key("Player", WireKey::Uuid((1..=16).collect())),
            key("Region", compound.clone()),
        ],
        error: Some(WireError { message: "it failed".into(), detail: Bytes::from_static(&[0x81, 0xa1, b'a', 0x01]) }),
        mode: Mode::Placed as i32,
        registration: 1 << 40,
        deadline_unix_ms: 1_795_000_000_000,
        metadata: BTreeMap::from([("tenant".into(), "acme".into()), ("trace".into(), "00-ab".into())]),
        location: "10.0.0.7:30001".into(),
    };
    let cached = Envelope {
        kind: Kind::Request as i32,
        target: Some(key("Region", compound)),
        mode: Mode::Cached as i32,
        error: None,
        ..full.clone()
    };
    vec![full, cached]
}

/// Adds the full name of every field set in `message` (and in the messages inside it) to `seen`, and fails if
/// any of them holds a field the schema does not know.
fn fields_seen(message: &DynamicMessage, seen: &mut BTreeSet<String>) {
    let unknown: Vec<u32> = message.unknown_fields().map(|f| f.number()).collect();
    assert!(
        unknown.is_empty(),
        "{} has fields numbered {unknown:?} that the schema lacks",
        message.descriptor().full_name()
    );
    for (field, value) in message.fields() {
        seen.insert(field.full_name().to_owned());
        let nested: Vec<&Value> = match value {
            Value::List(items) => items.iter().collect(),
            Value::Map(entries) => entries.values().collect(),
            other => vec![other],
        };
        for value in nested {
            if let Value::Message(inner) = value {
                fields_seen(inner, seen);
            }
        }
    }
}

/// Compares two messages field by field, naming the first difference by its path and field number (a
/// message's own `Debug` prints its whole schema).
fn same_fields(path: &str, decoded: &DynamicMessage, expected: &DynamicMessage) {
    for field in expected.descriptor().fields() {
        let path = format!("{path}.{} (field {})", field.name(), field.number());
        match (&*decoded.get_field(&field), &*expected.get_field(&field)) {
            (Value::Message(decoded), Value::Message(expected)) => same_fields(&path, decoded, expected),
            (Value::List(decoded), Value::List(expected)) => {
                assert_eq!(decoded.len(), expected.len(), "{path}: length");
                for (i, (decoded, expected)) in decoded.iter().zip(expected).enumerate() {
                    match (decoded, expected) {
                        (Value::Message(d), Value::Message(e)) => same_fields(&format!("{path}[{i}]"), d, e),
                        (d, e) => assert_eq!(d, e, "{path}[{i}]"),
                    }
                }
            }
            (decoded, expected) => assert_eq!(decoded, expected, "{path} read from a Rust envelope"),
        }
    }
}

#[test]
fn rust_envelopes_read_through_the_schema_field_for_field() {
    let mut seen = BTreeSet::new();
    for envelope in full_envelopes() {
        let decoded = DynamicMessage::decode(message("Envelope"), envelope.encode_to_vec().as_slice())
            .expect("the schema decodes what Rust encodes");
        fields_seen(&decoded, &mut seen);
        same_fields("Envelope", &decoded, &envelope_as_schema(&envelope));
    }
    // Every field of every message of the schema was on the wire: the schema has none that Rust lacks.
    let declared: BTreeSet<String> = pool()
        .all_messages()
        .filter(|m| m.package_name() == PACKAGE && !m.is_map_entry())
        .flat_map(|m| m.fields().map(|f| f.full_name().to_owned()).collect::<Vec<_>>())
        .collect();
    let missing: Vec<&String> = declared.difference(&seen).collect();
    assert!(missing.is_empty(), "fields of the schema that Rust never sends: {missing:?}");
}

#[test]
fn envelopes_written_from_the_schema_decode_to_the_same_rust_envelopes() {
    for envelope in full_envelopes() {
        let bytes = envelope_as_schema(&envelope).encode_to_vec();
        assert_eq!(Envelope::decode(bytes.as_slice()).expect("Rust decodes what the schema encodes"), envelope);
    }
}

#[test]
fn the_schema_names_the_same_enum_values_and_method_as_the_silo() {
    for (name, rust) in [
        (
            "Kind",
            vec![
                ("KIND_REQUEST", Kind::Request as i32),
                ("KIND_RESPONSE", Kind::Response as i32),
                ("KIND_HELLO", Kind::Hello as i32),
                ("KIND_PING", Kind::Ping as i32),
                ("KIND_PONG", Kind::Pong as i32),
            ],
        ),
        (
            "Mode",
            vec![
                ("MODE_ROUTE", Mode::Route as i32),
                ("MODE_CACHED", Mode::Cached as i32),
                ("MODE_PLACED", Mode::Placed as i32),
            ],
        ),
    ] {
        let descriptor = pool().get_enum_by_name(&format!("{PACKAGE}.{name}")).expect("the enum exists");
        let schema: Vec<(String, i32)> = descriptor.values().map(|v| (v.name().to_owned(), v.number())).collect();
        let rust: Vec<(String, i32)> = rust.into_iter().map(|(n, v)| (n.to_owned(), v)).collect();
        assert_eq!(schema, rust, "enum {name}");
    }
    // No Rust variant beyond those listed above.
    assert_eq!((0..64).filter(|n| Kind::try_from(*n).is_ok()).count(), 5);
    assert_eq!((0..64).filter(|n| Mode::try_from(*n).is_ok()).count(), 3);

    let service = pool().get_service_by_name(&format!("{PACKAGE}.Gateway")).expect("the service exists");
    let methods: Vec<_> = service.methods().collect();
    assert_eq!(methods.len(), 1, "one method");
    let connect = &methods[0];
    assert_eq!(format!("/{}/{}", service.full_name(), connect.name()), CONNECT_PATH);
    assert!(connect.is_client_streaming() && connect.is_server_streaming(), "a bidirectional stream");
    assert_eq!(connect.input(), message("Envelope"));
    assert_eq!(connect.output(), message("Envelope"));
}

/// A gRPC codec for dynamic messages of one type.
#[derive(Clone)]
struct DynamicCodec(MessageDescriptor);

impl Codec for DynamicCodec {
    type Encode = DynamicMessage;
    type Decode = DynamicMessage;
    type Encoder = DynamicCodec;
    type Decoder = DynamicCodec;

    fn encoder(&mut self) -> DynamicCodec {
        self.clone()
    }

    fn decoder(&mut self) -> DynamicCodec {
        self.clone()
    }
}

impl Encoder for DynamicCodec {
    type Item = DynamicMessage;
    type Error = Status;

    fn encode(&mut self, item: DynamicMessage, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst).map_err(|e| Status::internal(e.to_string()))
    }
}

impl Decoder for DynamicCodec {
    type Item = DynamicMessage;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<DynamicMessage>, Status> {
        let frame = src.copy_to_bytes(src.remaining());
        DynamicMessage::decode(self.0.clone(), frame).map(Some).map_err(|e| Status::internal(e.to_string()))
    }
}

/// A request built from the schema alone, as a client generated from the `.proto` would build it.
fn schema_request(
    correlation_id: u64,
    grain_type: &str,
    key: &str,
    method: &str,
    arguments: Vec<u8>,
) -> DynamicMessage {
    let mut target = DynamicMessage::new(message("GrainId"));
    set(&mut target, "grain_type", Value::String(grain_type.into()));
    set(&mut target, "str", Value::String(key.into()));
    let mut request = DynamicMessage::new(message("Envelope"));
    set(&mut request, "correlation_id", Value::U64(correlation_id));
    set(&mut request, "kind", enum_number("Kind", "KIND_REQUEST"));
    set(&mut request, "target", Value::Message(target));
    set(&mut request, "method", Value::String(method.into()));
    set(&mut request, "payload", Value::Bytes(arguments.into()));
    set(&mut request, "timeout_ms", Value::U64(5_000));
    set(&mut request, "mode", enum_number("Mode", "MODE_ROUTE"));
    request
}

/// The `error.message` of a reply, if it has an error.
fn error_message(reply: &DynamicMessage) -> Option<String> {
    let error = reply.get_field_by_name("error")?.as_message()?.clone();
    error.get_field_by_name("message")?.as_str().map(str::to_owned)
}

/// The next reply on the stream and its correlation id.
async fn next_reply(replies: &mut tonic::codec::Streaming<DynamicMessage>) -> (u64, DynamicMessage) {
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.message()).await;
    let reply = reply.expect("a reply within 10 s").expect("the stream is healthy").expect("the stream is open");
    let id = reply.get_field_by_name("correlation_id").and_then(|v| v.as_u64()).expect("a correlation id");
    (id, reply)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_grpc_client_built_from_the_proto_calls_a_grain() {
    let silo: Silo =
        grains_tests::start_silo(SiloConfig { port: 0, gateway: true, ..grains_tests::test_config() }).await;
    let url = format!("http://{}", silo.gateway_addr().expect("gateway runs"));

    // A generic gRPC client: the path and the messages come from the schema, not from the silo's crate.
    let service = pool().get_service_by_name(&format!("{PACKAGE}.Gateway")).expect("the service exists");
    let connect = service.methods().next().expect("a method");
    let path = http::uri::PathAndQuery::try_from(format!("/{}/{}", service.full_name(), connect.name())).unwrap();
    let channel = tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let (requests, outgoing) = tokio::sync::mpsc::unbounded_channel();
    let codec = DynamicCodec(connect.output());
    let response = grpc.streaming(tonic::Request::new(UnboundedReceiverStream::new(outgoing)), path, codec).await;
    let mut replies = response.expect("the silo accepts the stream").into_inner();

    // Arguments are a MessagePack array of the method's arguments; the reply is the return value.
    let one_argument = rmp_serde::to_vec(&(0u64,)).unwrap();
    let no_arguments = vec![0x90]; // `[]`
    let mut replies_by_id = HashMap::new();
    // One call at a time, then two at once (answered in completion order, told apart by correlation id).
    for id in [1, 2] {
        requests.send(schema_request(id, "Counter", "proto-client", "increment_slowly", one_argument.clone())).unwrap();
        let (got, reply) = next_reply(&mut replies).await;
        replies_by_id.insert(got, reply);
    }
    requests.send(schema_request(3, "Peer", "proto-peer", "name", no_arguments.clone())).unwrap();
    requests.send(schema_request(4, "Counter", "proto-client", "no_such_method", no_arguments)).unwrap();
    for _ in 0..2 {
        let (got, reply) = next_reply(&mut replies).await;
        replies_by_id.insert(got, reply);
    }
    assert_eq!(replies_by_id.len(), 4, "one reply per call");

    let payload = |id: u64| -> Bytes {
        let reply = &replies_by_id[&id];
        assert_eq!(
            reply.get_field_by_name("kind").unwrap().as_enum_number(),
            enum_number("Kind", "KIND_RESPONSE").as_enum_number()
        );
        assert!(!reply.has_field_by_name("error"), "call {id} failed: {:?}", error_message(reply));
        reply.get_field_by_name("payload").and_then(|v| v.as_bytes().cloned()).expect("a payload")
    };
    for (id, count) in [(1, 1), (2, 2)] {
        let returned: Result<u64, serde::de::IgnoredAny> = rmp_serde::from_slice(&payload(id)).unwrap();
        assert_eq!(returned.ok(), Some(count), "increment {id}");
    }
    assert_eq!(rmp_serde::from_slice::<String>(&payload(3)).unwrap(), "proto-peer");
    let text = error_message(&replies_by_id[&4]).expect("an error");
    assert!(text.contains("no_such_method"), "the error names the method: {text}");
    let error = replies_by_id[&4].get_field_by_name("error").and_then(|v| v.as_message().cloned()).unwrap();
    assert!(error.get_field_by_name("detail").and_then(|v| v.as_bytes().map(Buf::has_remaining)).unwrap());

    drop(requests);
    silo.shutdown(Duration::from_secs(5)).await;
}
