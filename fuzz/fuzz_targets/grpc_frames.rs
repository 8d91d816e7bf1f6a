//! The gateway's gRPC frame reader: arbitrary bytes as a whole request body (5-byte headers and all), cut
//! into arbitrary chunks, read with the gateway's frame limit by tonic's reader and `EnvelopeCodec`.
//!
//! Input: one byte picks the payload limit, one the chunking, the rest is the body.
//! Oracle: no panic, nothing pending, and the frames read and the way the stream ends agree with an
//! independent reading of the framing: a compressed or unknown flag, a length over the frame limit or a
//! truncated frame ends the stream; frames over the payload limit are `TooLarge`; the rest decode or not as
//! prost says.

#![no_main]

use grains_fuzz::{StreamEnd, chunks, read_frames};
use grains_silo::wire::{Envelope, Inbound, frame_limit};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::Code;

fuzz_target!(|data: &[u8]| {
    let [limit_pick, chunking, body @ ..] = data else { return };
    let limit = *limit_pick as usize * 16;
    let (frames, end) = read_frames(limit, chunks(body, *chunking));
    let (expected, expected_end) = reference_reading(body, limit);
    assert_eq!(frames.len(), expected.len(), "frames read: {frames:?}, expected {expected:?}, end {end:?}");
    for (frame, body) in frames.iter().zip(&expected) {
        match frame {
            Inbound::TooLarge { size, .. } => assert!(*size == body.len() && *size > limit + 1024),
            Inbound::Malformed { .. } => assert!(body.len() <= limit + 1024 && Envelope::decode(*body).is_err()),
            Inbound::Envelope(envelope) => {
                assert!(body.len() <= limit + 1024);
                assert_eq!(Envelope::decode(*body).as_ref(), Ok(envelope));
            }
        }
    }
    match (end, expected_end) {
        (StreamEnd::Clean, None) => {}
        (StreamEnd::Failed(status), Some(code)) => assert_eq!(status.code(), code, "{status:?}"),
        (end, expected) => panic!("the stream ended {end:?}, expected {expected:?}"),
    }
});

/// The gRPC framing read by hand: the frame bodies up to the first error, and that error's code.
fn reference_reading(mut body: &[u8], limit: usize) -> (Vec<&[u8]>, Option<Code>) {
    let mut frames = Vec::new();
    loop {
        if body.is_empty() {
            return (frames, None);
        }
        if body.len() < 5 {
            return (frames, Some(Code::Internal)); // a truncated header
        }
        if body[0] != 0 {
            return (frames, Some(Code::Internal)); // compressed (no encoding agreed) or an unknown flag
        }
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        if len > frame_limit(limit) {
            return (frames, Some(Code::OutOfRange));
        }
        if body.len() - 5 < len {
            // A truncated frame. Tonic checks only for buffered bytes at the end of the body, and has consumed
            // the header: a body that ends right after a header ends the stream as if cleanly (harmless: the
            // frame is dropped unread either way).
            return (frames, (body.len() > 5).then_some(Code::Internal));
        }
        frames.push(&body[5..5 + len]);
        body = &body[5 + len..];
    }
}
