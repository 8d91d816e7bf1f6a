//! Durations written as text: `500ms`, `30s`, `10m`, `1h`, `2d`, or a sum like `1h30m`.
//!
//! One parser serves `#[grain(idle_timeout = "10m")]` (the macro includes `duration_text.rs` too and checks the
//! text at expansion, so a typo fails the build with an error at the attribute) and the silo's configuration
//! file and environment.

use std::time::Duration;

include!("duration_text.rs");

/// Formats a duration in the same text form (`1h30m`, `250ms`).
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400_000u128), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if ms >= size {
            out.push_str(&format!("{}{unit}", ms / size));
            ms %= size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_sums_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172_800)));
    }

    #[test]
    fn bad_text_is_refused() {
        for bad in ["", "10", "m", "10x", "1h-", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn formatting_round_trips() {
        for text in ["250ms", "30s", "1h30m", "2d", "1m1s"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }
}
