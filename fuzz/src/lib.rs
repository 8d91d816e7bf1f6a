//! What the fuzz targets share: a request body fed from the fuzzer's bytes, the gateway's frame reader run to
//! the end without a runtime, a grain whose methods take every shape of argument, and the seed inputs.
//!
//! The targets call the same code the silo runs on hostile input: tonic's gRPC frame reader with the gateway's
//! frame limit and [`EnvelopeCodec`], and the decoder a grain registration gives the silo for encoded
//! arguments. Each checks an oracle besides "does not panic": an independent reading of the framing, a
//! re-encoding that must decode to the same value.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::FutureExt;
use grains::__private::GrainRegistration;
use grains::Uuid;
use grains::prelude::*;
use grains_silo::wire::{EnvelopeCodec, Inbound, frame_limit};
use tonic::Status;
use tonic::codec::Streaming;

/// Links the example grains, so their registrations are fuzzed too.
pub use grains_examples as examples;

/// Cuts `bytes` into chunks whose sizes cycle through a pattern picked by `seed` (some empty): how the stream
/// targets feed one input to a reader in pieces, as a socket would.
pub fn chunks(bytes: &[u8], seed: u8) -> Vec<Bytes> {
    let sizes = [seed as usize % 7, (seed as usize >> 3) % 5 + 1, 1, (seed as usize) * 3 + 2];
    let mut out = Vec::new();
    let mut rest = bytes;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at((*size).min(rest.len()));
        out.push(Bytes::copy_from_slice(chunk));
        rest = tail;
    }
    out
}

/// A request body that yields the given chunks, then ends: always ready, so a stream over it is read to the
/// end without a runtime.
pub struct ChunkedBody(VecDeque<Bytes>);

impl ChunkedBody {
    /// A body that yields `chunks` in order.
    pub fn new(chunks: impl IntoIterator<Item = Bytes>) -> Self {
        Self(chunks.into_iter().collect())
    }
}

impl http_body::Body for ChunkedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Status>>> {
        Poll::Ready(self.0.pop_front().map(|chunk| Ok(http_body::Frame::data(chunk))))
    }
}

/// How a stream of frames ended.
#[derive(Debug)]
pub enum StreamEnd {
    /// The body ended cleanly after the last frame.
    Clean,
    /// The reader failed (bad header, frame over the limit, truncated frame): the gateway ends the stream.
    Failed(Status),
}

/// Reads `chunks` as the gateway reads a client's request body with a payload limit of `max_payload_bytes`:
/// every frame read, then how the stream ended.
pub fn read_frames(max_payload_bytes: usize, chunks: Vec<Bytes>) -> (Vec<Inbound>, StreamEnd) {
    let mut stream = Streaming::new_request(
        EnvelopeCodec::new(max_payload_bytes),
        ChunkedBody::new(chunks),
        None,
        Some(frame_limit(max_payload_bytes)),
    );
    let mut frames = Vec::new();
    loop {
        let next = stream.message().now_or_never().expect("a body that is always ready never leaves a read pending");
        match next {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, StreamEnd::Clean),
            Err(status) => return (frames, StreamEnd::Failed(status)),
        }
    }
}

/// A byte stream that yields the given chunks (empty ones skipped), then ends: always ready, so a reader over
/// it runs to the end without a runtime.
pub struct ChunkedReader(VecDeque<Bytes>);

impl tokio::io::AsyncRead for ChunkedReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while let Some(chunk) = self.0.front_mut() {
            if chunk.is_empty() {
                self.0.pop_front();
                continue;
            }
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk.split_to(n));
            break;
        }
        Poll::Ready(Ok(()))
    }
}

/// Reads `chunks` as a silo reads a framed connection (the Rust client's and the silos' transport) with frames
/// of up to `max_frame` bytes: every frame read, then whether the stream ended cleanly.
pub fn read_framed(max_frame: usize, chunks: Vec<Bytes>) -> (Vec<Inbound>, std::io::Result<()>) {
    let mut reader = grains_silo::__private::FrameReader::new(ChunkedReader(chunks.into()), max_frame);
    let mut frames = Vec::new();
    loop {
        let next = reader.next().now_or_never().expect("a stream that is always ready never leaves a read pending");
        match next {
            Ok(Some(frame)) => frames.push(frame),
            Ok(None) => return (frames, Ok(())),
            Err(error) => return (frames, Err(error)),
        }
    }
}

/// The 5-byte gRPC header of an uncompressed frame of `len` bytes, followed by `body`.
pub fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A record argument: a struct with an enum inside.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// A name.
    pub name: String,
    /// A quantity.
    pub quantity: u32,
    /// A price.
    pub price: Option<f64>,
    /// A kind.
    pub kind: Kind,
}

/// An enum of every variant shape serde has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Kind {
    /// A unit variant.
    Plain,
    /// A newtype variant.
    Tagged(String),
    /// A tuple variant.
    Pair(i16, bool),
    /// A struct variant.
    Sized {
        /// Width.
        width: u8,
        /// Height.
        height: u8,
    },
}

/// A recursive argument: its depth is bounded only by the input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Tree {
    /// No children.
    Leaf(i64),
    /// Two children.
    Node(Box<Tree>, Box<Tree>),
}

/// A grain whose methods take every shape of argument a grain may declare. Never activated: the fuzz target
/// only decodes calls to it.
#[grain]
pub struct Shapes;

#[grain]
impl Shapes {
    /// No arguments.
    pub async fn nothing(&self) {}

    /// Scalars of every width.
    #[allow(clippy::too_many_arguments)]
    pub async fn scalars(&self, a: bool, b: i8, c: u16, d: i32, e: u64, f: f32, g: f64, h: char) -> u8 {
        let _ = (a, b, c, d, e, f, g, h);
        0
    }

    /// Text and bytes.
    pub async fn text(&self, s: String, v: Vec<u8>, o: Option<String>) -> usize {
        s.len() + v.len() + o.map_or(0, |o| o.len())
    }

    /// Collections and a tuple.
    pub async fn collections(
        &self,
        map: BTreeMap<String, Vec<u32>>,
        set: BTreeSet<i64>,
        tuple: (u8, String, Option<bool>),
    ) -> usize {
        map.len() + set.len() + tuple.1.len()
    }

    /// Records with enums.
    pub async fn records(&self, item: Item, items: Vec<Item>, by_kind: BTreeMap<u8, Kind>) -> usize {
        let _ = item;
        items.len() + by_kind.len()
    }

    /// A recursive value.
    pub async fn tree(&self, tree: Tree) -> Tree {
        tree
    }

    /// A UUID and a result.
    pub async fn ids(&self, id: Uuid, outcome: Result<u64, String>) -> Uuid {
        let _ = outcome;
        id
    }
}

/// Seed inputs of the `arguments` target: for each method of [`Shapes`], a valid call and a broken one, as
/// `method index` byte + payload (see the target).
pub fn argument_seeds() -> Vec<(String, Vec<u8>)> {
    let item = Item { name: "apple".into(), quantity: 2, price: Some(1.5), kind: Kind::Sized { width: 3, height: 4 } };
    let tree =
        Tree::Node(Box::new(Tree::Leaf(1)), Box::new(Tree::Node(Box::new(Tree::Leaf(-2)), Box::new(Tree::Leaf(3)))));
    let encode = |value: &dyn erased::Encode| value.encode();
    let calls: Vec<(&str, Vec<u8>)> = vec![
        ("nothing", encode(&())),
        ("scalars", encode(&(true, -3i8, 600u16, -70_000i32, u64::MAX, 1.25f32, -0.5f64, 'ß'))),
        ("text", encode(&("héllo", vec![0u8, 255], Some("x")))),
        (
            "collections",
            encode(&(
                BTreeMap::from([("a".to_string(), vec![1u32, 2])]),
                BTreeSet::from([5i64, -5]),
                (7u8, "t", None::<bool>),
            )),
        ),
        (
            "records",
            encode(&(
                item.clone(),
                vec![
                    Item { kind: Kind::Tagged("x".into()), ..item.clone() },
                    Item { kind: Kind::Pair(-1, true), ..item.clone() },
                ],
                BTreeMap::from([(1u8, Kind::Plain)]),
            )),
        ),
        ("tree", encode(&(tree,))),
        ("ids", encode(&(Uuid::from_u128(7), Err::<u64, _>("no".to_string())))),
    ];
    let mut seeds = Vec::new();
    for (method, payload) in calls {
        let index = method_index(<Shapes as GrainType>::TYPE_NAME, method).expect("a Shapes method");
        let mut valid = vec![index];
        valid.extend_from_slice(&payload);
        let mut cut = valid.clone();
        cut.truncate(valid.len().div_ceil(2));
        seeds.push((format!("{method}-valid"), valid));
        seeds.push((format!("{method}-truncated"), cut));
    }
    seeds
}

/// Every method of every grain type linked in, as (registration, method), in a fixed order.
pub fn methods() -> Vec<(&'static GrainRegistration, &'static str)> {
    let mut registrations: Vec<_> = GrainRegistration::all().collect();
    registrations.sort_by_key(|r| r.type_name);
    registrations.into_iter().flat_map(|r| r.methods.iter().map(move |m| (r, *m))).collect()
}

fn method_index(type_name: &str, method: &str) -> Option<u8> {
    methods().iter().position(|(r, m)| r.type_name == type_name && *m == method).map(|i| i as u8)
}

mod erased {
    /// Encodes a tuple of arguments as the payload codec's argument array.
    pub trait Encode {
        fn encode(&self) -> Vec<u8>;
    }

    impl<T: serde::Serialize> Encode for T {
        fn encode(&self) -> Vec<u8> {
            grains::codec::encode(self).expect("seed arguments encode")
        }
    }
}
