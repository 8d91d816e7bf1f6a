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
//!
//! Decoding recurses once per level of nesting, on whatever thread decodes (a silo's runtime workers have 2 MiB
//! stacks), so a value nested deeper than [`MAX_DEPTH`] is refused: without a bound, a few kilobytes of
//! nested arrays sent to a method with a recursive argument type overflow the stack and abort the process.

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

/// A decoded value nested this deep (arrays, maps and enum variants inside each other) is refused: serde_json's
/// limit.
pub const MAX_DEPTH: usize = 128;

/// Decodes a `T` from `bytes` in the payload codec.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let mut deserializer = rmp_serde::Deserializer::from_read_ref(bytes);
    deserializer.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut deserializer).map_err(|e| CodecError(format!("decode: {e}")))
}

/// Encodes `value` with struct fields as named map entries (used for error details, read by other languages).
pub fn encode_named<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    rmp_serde::to_vec_named(value).map_err(|e| CodecError(format!("encode: {e}")))
}

/// Decodes what [`encode_named`] wrote (or any MessagePack form of `T`).
pub fn decode_named<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode(bytes)
}

#[doc(hidden)]
/// The codec of one argument or return value of type `T`: obtained through `__private::arg::<T>()` or
/// `__private::ret::<T>()`, whose trait bound is the one place a type that cannot cross the wire is reported.
pub struct ValueCodec<T> {
    encode: fn(&T, &mut Vec<u8>) -> Result<(), CodecError>,
    decode: fn(&mut &[u8]) -> Result<T, CodecError>,
}

#[allow(clippy::new_without_default)]
impl<T> ValueCodec<T> {
    /// The codec of a serializable `T`.
    pub const fn new() -> Self
    where
        T: Serialize + DeserializeOwned,
    {
        Self { encode: encode_value::<T>, decode: decode_value::<T> }
    }

    /// Appends `value` to `out`.
    pub fn encode(&self, value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
        (self.encode)(value, out)
    }

    /// Reads one value from the front of `input`, advancing it.
    pub fn decode(&self, input: &mut &[u8]) -> Result<T, CodecError> {
        (self.decode)(input)
    }
}

fn encode_value<T: Serialize>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    rmp_serde::encode::write(out, value).map_err(|e| CodecError(format!("encode: {e}")))
}

fn decode_value<T: DeserializeOwned>(input: &mut &[u8]) -> Result<T, CodecError> {
    let mut deserializer = rmp_serde::Deserializer::new(input);
    deserializer.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut deserializer).map_err(|e| CodecError(format!("decode: {e}")))
}

#[doc(hidden)]
/// Starts an argument list of `count` values.
pub fn begin_args(out: &mut Vec<u8>, count: u32) -> Result<(), CodecError> {
    rmp::encode::write_array_len(out, count).map(|_| ()).map_err(|e| CodecError(format!("encode: {e}")))
}

#[doc(hidden)]
/// Reads the header of an argument list and checks it holds `count` values (no arguments may also be `nil`).
pub fn read_args(input: &mut &[u8], count: u32) -> Result<(), CodecError> {
    if count == 0 && input.first() == Some(&0xc0) {
        *input = &input[1..];
        return Ok(());
    }
    let found = rmp::decode::read_array_len(input).map_err(|e| CodecError(format!("decode: arguments: {e}")))?;
    if found != count {
        return Err(CodecError(format!("decode: expected {count} arguments, found {found}")));
    }
    Ok(())
}

#[doc(hidden)]
/// Reads the JSON arguments of a method whose arguments are named `names`, in order: a JSON array of exactly
/// that many values, or an object keyed by argument name (a key left out is `null`, which an `Option` argument
/// reads as `None`; an unknown key is refused). A method without arguments also takes an empty body or `null`.
/// JSON nested deeper than 128 levels is refused (serde_json's limit).
pub fn json_args(json: &[u8], names: &[&str]) -> Result<Vec<serde_json::Value>, CodecError> {
    let blank = json.iter().all(u8::is_ascii_whitespace);
    if blank && names.is_empty() {
        return Ok(Vec::new());
    }
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| CodecError(format!("the arguments are not JSON: {e}")))?;
    match value {
        serde_json::Value::Null if names.is_empty() => Ok(Vec::new()),
        serde_json::Value::Array(values) if values.len() == names.len() => Ok(values),
        serde_json::Value::Array(values) => {
            Err(CodecError(format!("expected {} arguments, found {}", names.len(), values.len())))
        }
        serde_json::Value::Object(mut object) => {
            let values = names.iter().map(|name| object.remove(*name).unwrap_or(serde_json::Value::Null)).collect();
            match object.keys().next() {
                Some(unknown) => Err(CodecError(format!(
                    "no argument named `{unknown}`; the arguments are: {}",
                    if names.is_empty() { "(none)".to_owned() } else { names.join(", ") }
                ))),
                None => Ok(values),
            }
        }
        _ => Err(CodecError(format!(
            "the arguments are a JSON array (in order) or an object (by name) of: {}",
            if names.is_empty() { "(none)".to_owned() } else { names.join(", ") }
        ))),
    }
}

#[doc(hidden)]
/// Reads argument `name` from its JSON value.
pub fn json_value<T: DeserializeOwned>(value: Option<serde_json::Value>, name: &str) -> Result<T, CodecError> {
    serde_json::from_value(value.unwrap_or(serde_json::Value::Null))
        .map_err(|e| CodecError(format!("argument `{name}`: {e}")))
}

#[doc(hidden)]
/// Writes a return value as JSON.
pub fn json_result<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    serde_json::to_vec(value).map_err(|e| CodecError(format!("the result cannot be written as JSON: {e}")))
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
    fn arguments_written_one_by_one_read_as_a_tuple() {
        let mut out = Vec::new();
        begin_args(&mut out, 2).unwrap();
        ValueCodec::<String>::new().encode(&"apple".to_string(), &mut out).unwrap();
        ValueCodec::<u32>::new().encode(&2, &mut out).unwrap();
        assert_eq!(out, encode(&("apple", 2u32)).unwrap(), "the same bytes as the tuple");
        let mut input = out.as_slice();
        read_args(&mut input, 2).unwrap();
        assert_eq!(ValueCodec::<String>::new().decode(&mut input).unwrap(), "apple");
        assert_eq!(ValueCodec::<u32>::new().decode(&mut input).unwrap(), 2);
        assert!(read_args(&mut [0x92u8].as_slice(), 3).is_err());
    }

    #[test]
    fn nesting_past_max_depth_is_a_codec_error() {
        fn nested(levels: usize) -> Vec<u8> {
            let mut bytes = vec![0x91; levels - 1]; // one-element arrays, each inside the last
            bytes.push(0x90);
            bytes
        }
        #[derive(Debug, serde::Serialize, serde::Deserialize)]
        struct Nest(#[allow(dead_code)] Vec<Nest>);
        assert!(decode::<Nest>(&nested(MAX_DEPTH - 1)).is_ok(), "{} levels decode", MAX_DEPTH - 1);
        let error = decode::<Nest>(&nested(MAX_DEPTH)).unwrap_err();
        assert!(error.0.contains("depth"), "{error}");
        let mut input = &nested(100_000)[..];
        assert!(ValueCodec::<Nest>::new().decode(&mut input).is_err(), "an argument nests no deeper");
    }

    #[test]
    fn json_arguments_are_an_array_in_order_or_an_object_by_name() {
        let names = ["item", "qty"];
        assert_eq!(json_args(br#"["apple", 2]"#, &names).unwrap(), vec![serde_json::json!("apple"), 2.into()]);
        assert_eq!(
            json_args(br#"{"qty": 2, "item": "apple"}"#, &names).unwrap(),
            vec![serde_json::json!("apple"), 2.into()]
        );
        assert_eq!(json_args(br#"{"item": "apple"}"#, &names).unwrap()[1], serde_json::Value::Null);
        assert!(json_args(br#"["apple"]"#, &names).unwrap_err().0.contains("expected 2 arguments, found 1"));
        assert!(json_args(br#"{"item": "a", "qtty": 1}"#, &names).unwrap_err().0.contains("`qtty`"));
        assert!(json_args(b"\"apple\"", &names).is_err(), "a bare value is neither form");
        assert!(json_args(b"[1,", &names).unwrap_err().0.contains("not JSON"));
        assert!(json_args(b"", &[]).unwrap().is_empty() && json_args(b"null", &[]).unwrap().is_empty());
        assert!(json_args(b"", &names).is_err());
        let deep = format!("[{}{}]", "[".repeat(200), "]".repeat(200));
        assert!(json_args(deep.as_bytes(), &["x"]).is_err(), "nesting is bounded");
        let qty: u32 = json_value(Some(2.into()), "qty").unwrap();
        assert_eq!(qty, 2);
        assert!(json_value::<u32>(Some("two".into()), "qty").unwrap_err().0.contains("argument `qty`"));
    }

    #[test]
    fn garbage_is_a_codec_error() {
        assert!(decode::<(String, u32)>(&[0xc1]).is_err());
    }
}
