//! Writes the seed corpus of each fuzz target to `fuzz/corpus/<target>/`: a few valid inputs and a few broken
//! ones, named for what they are. Run from the repository root when a target's input format changes:
//!
//! ```sh
//! cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! ```

use std::path::Path;

use grains::{CallError, GrainId, GrainKey, Uuid};
use grains_fuzz::{argument_seeds, framed, methods};
use grains_silo::wire::{CompoundKey, Envelope, Kind, Mode, WireError, WireGrainId, WireKey};
use prost::Message;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let envelopes = envelopes();

    // envelope: limit pick (0: no payload, 3: the default 4 MiB), then one frame's body.
    let mut envelope_seeds: Vec<(String, Vec<u8>)> =
        envelopes.iter().map(|(name, bytes)| (name.to_string(), [&[3u8][..], bytes].concat())).collect();
    let (_, big) = &envelopes[0];
    envelope_seeds.push(("over-payload-limit".into(), [&[0u8][..], big, &[0u8; 1100]].concat()));
    write(&root.join("envelope"), &envelope_seeds)?;

    // grpc_frames: limit pick (x16 bytes), chunking pick, then a whole request body.
    let stream: Vec<u8> = envelopes.iter().take(3).flat_map(|(_, bytes)| framed(bytes)).collect();
    let request = framed(&envelopes[0].1);
    let mut compressed = request.clone();
    compressed[0] = 1;
    let mut bad_flag = request.clone();
    bad_flag[0] = 7;
    let over_frame_limit = [&[0u8, 0x7f, 0xff, 0xff, 0xff][..], &[0u8; 16]].concat();
    let truncated = request[..request.len() - 2].to_vec();
    let grpc_seeds = vec![
        ("three-requests", stream.clone()),
        ("compressed-flag", compressed),
        ("unknown-flag", bad_flag),
        ("header-over-frame-limit", over_frame_limit),
        ("truncated-frame", truncated),
        ("header-only", request[..5].to_vec()),
        ("empty-frame", framed(&[])),
    ];
    let grpc_seeds: Vec<(String, Vec<u8>)> = grpc_seeds
        .into_iter()
        .enumerate()
        .map(|(i, (name, body))| (name.to_string(), [&[255u8, i as u8 * 37][..], &body].concat()))
        .collect();
    write(&root.join("grpc_frames"), &grpc_seeds)?;

    // framed: limit pick (x8 bytes), chunking pick, then a whole framed connection (after its magic).
    let flagged = {
        let mut frame = framed(&envelopes[0].1);
        frame[0] = 1;
        frame
    };
    let framed_seeds = vec![
        ("three-requests", 255u8, stream),
        ("oversized-then-small", 1, [framed(&envelopes[0].1), framed(&envelopes[1].1)].concat()),
        ("flagged", 255, [flagged, framed(&envelopes[1].1)].concat()),
        ("truncated-frame", 255, request[..request.len() - 2].to_vec()),
        ("header-only", 255, request[..5].to_vec()),
        ("empty-frame", 255, framed(&[])),
        ("undecodable", 255, framed(&[0x08, 0x05, 0xff])),
        ("huge-header", 255, vec![0, 0xff, 0xff, 0xff, 0xff, 0x08, 0x80, 0x01]),
    ];
    let framed_seeds: Vec<(String, Vec<u8>)> = framed_seeds
        .into_iter()
        .enumerate()
        .map(|(i, (name, limit, body))| (name.to_string(), [&[limit, (i as u8).wrapping_mul(37)][..], &body].concat()))
        .collect();
    write(&root.join("framed"), &framed_seeds)?;

    // arguments: method pick, then the encoded arguments.
    let mut argument_seeds = argument_seeds();
    for (i, (registration, method)) in methods().iter().enumerate() {
        if registration.type_name != "Shapes" {
            argument_seeds.push((format!("{}-{method}-no-arguments", registration.type_name), vec![i as u8, 0x90]));
        }
    }
    argument_seeds.push(("unknown-method".into(), vec![255, 0x90]));
    write(&root.join("arguments"), &argument_seeds)
}

fn envelopes() -> Vec<(&'static str, Vec<u8>)> {
    let cart = WireGrainId::from(&GrainId::new("Cart", "alice"));
    let request = Envelope {
        correlation_id: 7,
        kind: Kind::Request as i32,
        target: Some(cart.clone()),
        method: "add".into(),
        payload: grains::codec::encode(&("apple", 2u32)).expect("encodes").into(),
        timeout_ms: 5_000,
        deadline_unix_ms: 1_800_000_000_000,
        ..Default::default()
    };
    let keys: [GrainKey; 3] = [GrainKey::Int(-3), GrainKey::Uuid(Uuid::from_u128(9)), (4, "eu").into()];
    let chained = Envelope {
        correlation_id: u64::MAX,
        call_chain: keys.iter().map(|k| WireGrainId::from(&GrainId::new("Peer", k.clone()))).collect(),
        mode: Mode::Placed as i32,
        registration: 99,
        ..request.clone()
    };
    let error = CallError::UnknownMethod { grain_type: "Cart".into(), method: "nope".into() };
    let response = Envelope::response(7, Err(error));
    let answer = Envelope::response(8, Ok(grains::codec::encode(&Ok::<u32, String>(2)).expect("encodes").into()));
    let bad_uuid = Envelope {
        target: Some(WireGrainId { grain_type: "Cart".into(), key: Some(WireKey::Uuid(vec![1, 2, 3])) }),
        ..request.clone()
    };
    let compound = Envelope {
        target: Some(WireGrainId {
            grain_type: "Hello".into(),
            key: Some(WireKey::Compound(CompoundKey { number: 1, extension: "x".into() })),
        }),
        ..request.clone()
    };
    let broken_error = Envelope {
        error: Some(WireError { message: "opaque".into(), detail: vec![0xc1, 0x00].into() }),
        ..Envelope::response(9, Ok(Default::default()))
    };
    let mut truncated = request.encode_to_vec();
    truncated.truncate(truncated.len() - 3);
    vec![
        ("request", request.encode_to_vec()),
        ("request-with-call-chain", chained.encode_to_vec()),
        ("response-error", response.encode_to_vec()),
        ("response-value", answer.encode_to_vec()),
        ("uuid-key-of-3-bytes", bad_uuid.encode_to_vec()),
        ("compound-key", compound.encode_to_vec()),
        ("undecodable-error-detail", broken_error.encode_to_vec()),
        ("truncated", truncated),
        ("garbage", vec![0xff, 0xff, 0xff, 0x0f]),
        ("empty", Vec::new()),
    ]
}

fn write(dir: &Path, seeds: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    for (name, bytes) in seeds {
        std::fs::write(dir.join(name), bytes)?;
    }
    println!("{}: {} seeds", dir.display(), seeds.len());
    Ok(())
}
