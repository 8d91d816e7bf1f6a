//! The framed transport's reader (silos and the Rust client): arbitrary bytes as a whole connection after its
//! magic, cut into arbitrary chunks, read by `FrameReader` with a frame limit.
//!
//! Input: one byte picks the frame limit, one the chunking, the rest is the stream.
//! Oracle: no panic, nothing pending, nothing buffered for a frame over the limit, and the frames read and the
//! way the stream ends agree with an independent reading of the framing: a frame within the limit decodes as
//! prost says (a flag other than 0 makes it malformed); a larger one is `TooLarge` with the correlation id of
//! its first bytes, and the stream goes on; a stream that ends inside a header or a frame is an error.

#![no_main]

use grains_fuzz::{chunks, read_framed};
use grains_silo::wire::{Envelope, Inbound};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let [limit_pick, chunking, stream @ ..] = data else { return };
    let max_frame = *limit_pick as usize * 8;
    let (frames, end) = read_framed(max_frame, chunks(stream, *chunking));
    let (expected, clean) = reference_reading(stream, max_frame);
    assert_eq!(frames.len(), expected.len(), "frames read: {frames:?}, expected {expected:?}, end {end:?}");
    for (frame, expected) in frames.iter().zip(&expected) {
        match (frame, expected) {
            (Inbound::TooLarge { correlation_id, size }, Expected::TooLarge { id, len }) => {
                assert_eq!((*correlation_id, *size), (*id, *len));
            }
            (Inbound::Malformed { correlation_id, .. }, Expected::Flagged { id }) => assert_eq!(correlation_id, id),
            (Inbound::Malformed { .. }, Expected::Frame(body)) => assert!(Envelope::decode(*body).is_err()),
            (Inbound::Envelope(envelope), Expected::Frame(body)) => {
                assert_eq!(Envelope::decode(*body).as_ref(), Ok(envelope));
            }
            (frame, expected) => panic!("read {frame:?}, expected {expected:?}"),
        }
    }
    assert_eq!(end.is_ok(), clean, "the stream ended {end:?}");
});

#[derive(Debug)]
enum Expected<'a> {
    Frame(&'a [u8]),
    Flagged { id: u64 },
    TooLarge { id: u64, len: usize },
}

/// The correlation id (field 1, varint) at the start of `bytes`, or 0, as prost reads it.
fn correlation_id(mut bytes: &[u8]) -> u64 {
    match prost::encoding::decode_key(&mut bytes) {
        Ok((1, prost::encoding::WireType::Varint)) => prost::encoding::decode_varint(&mut bytes).unwrap_or(0),
        _ => 0,
    }
}

/// The framing read by hand: what each frame becomes, and whether the stream ends cleanly.
fn reference_reading(mut stream: &[u8], max_frame: usize) -> (Vec<Expected<'_>>, bool) {
    let mut frames = Vec::new();
    loop {
        if stream.is_empty() {
            return (frames, true);
        }
        if stream.len() < 5 {
            return (frames, false);
        }
        let flag = stream[0];
        let len = u32::from_be_bytes([stream[1], stream[2], stream[3], stream[4]]) as usize;
        let body = &stream[5..];
        if len > max_frame {
            // Named by its first bytes (up to 11: a key and a 10-byte varint), then skipped.
            let peek = len.min(11);
            if body.len() < peek {
                return (frames, false);
            }
            let id = correlation_id(&body[..peek]);
            if body.len() < len {
                return (frames, false);
            }
            frames.push(Expected::TooLarge { id, len });
        } else {
            if body.len() < len {
                return (frames, false);
            }
            frames.push(match flag {
                0 => Expected::Frame(&body[..len]),
                _ => Expected::Flagged { id: correlation_id(&body[..len]) },
            });
        }
        stream = &body[len..];
    }
}
