//! Misuse of `#[grain]` fails to compile with one readable, spanned error per mistake.

#[test]
fn grain_misuse_is_refused_at_compile_time() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("ui/*.rs");
}
