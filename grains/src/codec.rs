//! The payload codec: how arguments and return values cross a process boundary.
//!
//! Grains encodes with [MessagePack](https://msgpack.org/) through `rmp-serde`: a published, self-describing
//! binary format with libraries in every language, so a client written in another language can speak to a silo.
//!
//! - A **request payload** is the method's arguments as a MessagePack array, in declaration order
//!   (`add(item: String, qty: u32)` → `["apple", 2]`; no arguments → `[]`).
//! - A **response payload** is the method's return value, encoded as serde sees it; a Rust `Result` is a map
//!   with one key, `Ok` or `Err`.
//! - Structs are arrays of their fields in declaration order (rmp-serde's compact form), enums follow serde's
//!   externally tagged form.
//!
//! Calls between grains on the same silo are never encoded: the typed request moves through the mailbox.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A value could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

/// Encodes `value` in the payload codec.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    rmp_serde::to_vec(value).map_err(|e| CodecError(format!("encode: {e}")))
}

/// Decodes a `T` from `bytes` in the payload codec.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    rmp_serde::from_slice(bytes).map_err(|e| CodecError(format!("decode: {e}")))
}

/// Encodes `value` with struct fields as named map entries (used for error details, read by other languages).
pub fn encode_named<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    rmp_serde::to_vec_named(value).map_err(|e| CodecError(format!("encode: {e}")))
}

/// Decodes what [`encode_named`] wrote (or any MessagePack form of `T`).
pub fn decode_named<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip_as_an_array() {
        let bytes = encode(&("apple".to_string(), 2u32)).unwrap();
        assert_eq!(bytes[0], 0x92, "a two-element MessagePack fixarray");
        let back: (String, u32) = decode(&bytes).unwrap();
        assert_eq!(back, ("apple".to_string(), 2));
    }

    #[test]
    fn garbage_is_a_codec_error() {
        assert!(decode::<(String, u32)>(&[0xc1]).is_err());
    }
}
