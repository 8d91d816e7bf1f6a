//! The argument codec: arbitrary bytes as the encoded arguments of a call to any method of any grain type
//! linked in (the examples' and `Shapes`, which takes every shape of argument), decoded the way the silo
//! decodes a call before it activates anything: through the registration's `decode_request`.
//!
//! Input: one byte picks the method (past the last one: an unknown method name), the rest is the payload.
//! Oracle: no panic; an unknown method is `UnknownMethod`; a payload that decodes re-encodes to bytes that
//! decode and re-encode to the same bytes.

#![no_main]

use std::sync::LazyLock;

use grains::CallError;
use grains::__private::GrainRegistration;
use libfuzzer_sys::fuzz_target;

static METHODS: LazyLock<Vec<(&'static GrainRegistration, &'static str)>> = LazyLock::new(grains_fuzz::methods);

fuzz_target!(|data: &[u8]| {
    let Some((&pick, payload)) = data.split_first() else { return };
    let Some(&(registration, method)) = METHODS.get(pick as usize) else {
        let registration = METHODS[pick as usize % METHODS.len()].0;
        let outcome = (registration.decode_request)("no such method", payload);
        assert!(matches!(outcome, Err(CallError::UnknownMethod { .. })), "{:?}", outcome.err());
        return;
    };
    let request = match (registration.decode_request)(method, payload) {
        Ok(request) => request,
        Err(CallError::Codec(_)) => return,
        Err(other) => panic!(
            "{}.{method}: a payload that does not decode is a codec error, got {other:?}",
            registration.type_name
        ),
    };
    let encoded = request.encode().expect("a decoded request encodes");
    let again = (registration.decode_request)(method, &encoded)
        .unwrap_or_else(|e| panic!("{}.{method}: its own encoding does not decode: {e:?}", registration.type_name));
    assert_eq!(
        again.encode().expect("encodes"),
        encoded,
        "{}.{method}: re-encoding is not stable",
        registration.type_name
    );
});
