//! Envelope decoding: arbitrary bytes as one well-framed gRPC message on a gateway stream, read by
//! `EnvelopeCodec` into an `Inbound`, then parsed as the silo parses a request (target and call-chain ids,
//! mode, kind) and a client parses a response (the typed error in `WireError`).
//!
//! Input: one byte picks the payload limit, the rest is the frame's body.
//! Oracle: no panic; the codec's verdict agrees with prost's own decoding and with the limit; a decoded
//! envelope re-encodes to one that decodes equal.

#![no_main]

use bytes::Bytes;
use grains_fuzz::{StreamEnd, framed, read_frames};
use grains_silo::wire::{Envelope, Inbound, Kind, Mode};
use libfuzzer_sys::fuzz_target;
use prost::Message;

const LIMITS: [usize; 4] = [0, 64, 1024, 4 * 1024 * 1024];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let limit = LIMITS[pick as usize % LIMITS.len()];
    let (mut frames, end) = read_frames(limit, vec![Bytes::from(framed(body))]);
    assert!(matches!(end, StreamEnd::Clean), "one well-framed message within the frame limit: {end:?}");
    assert_eq!(frames.len(), 1);
    match frames.pop().expect("one frame") {
        Inbound::TooLarge { size, .. } => {
            assert_eq!(size, body.len());
            assert!(size > limit, "a frame of {size} bytes is within the limit of {limit}");
        }
        Inbound::Malformed { .. } => assert!(Envelope::decode(body).is_err(), "the codec refused what prost reads"),
        Inbound::Envelope(envelope) => {
            assert!(body.len() <= limit + 1024, "a frame of {} bytes passed a limit of {limit}", body.len());
            let again = Envelope::decode(envelope.encode_to_vec().as_slice()).expect("a decoded envelope re-encodes");
            assert_eq!(again, envelope);
            parse_as_the_silo_does(&envelope);
        }
    }
});

fn parse_as_the_silo_does(envelope: &Envelope) {
    let _ = Kind::try_from(envelope.kind);
    let _ = Mode::try_from(envelope.mode);
    if let Some(target) = &envelope.target {
        if let Ok(id) = target.to_grain_id(None) {
            let _ = id.to_string();
        }
        let _ = target.to_grain_id(Some("Interned"));
    }
    for caller in &envelope.call_chain {
        let _ = caller.to_grain_id(None).map(|id| id.to_string());
    }
    if let Some(error) = &envelope.error {
        let _ = error.to_call_error().to_string();
    }
}
