//! Durations written as text: `500ms`, `30s`, `10m`, `1h`, `2d`, or a sum like `1h30m`.
//!
//! One parser serves `#[grain(idle_timeout = "10m")]` (evaluated at compile time, so a typo fails the build)
//! and the silo's configuration file and environment.

use std::time::Duration;

/// Parses a duration, in a `const` context too.
pub const fn parse_duration(text: &str) -> Result<Duration, &'static str> {
    let bytes = text.as_bytes();
    if bytes.is_empty() {
        return Err("empty duration: write e.g. \"30s\", \"10m\" or \"1h30m\"");
    }
    let mut i = 0;
    let mut total_ms: u64 = 0;
    while i < bytes.len() {
        let start = i;
        let mut n: u64 = 0;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            n = match n.checked_mul(10) {
                Some(v) => match v.checked_add((bytes[i] - b'0') as u64) {
                    Some(v) => v,
                    None => return Err("duration too large"),
                },
                None => return Err("duration too large"),
            };
            i += 1;
        }
        if i == start {
            return Err("a duration is a number followed by a unit: ms, s, m, h or d (e.g. \"10m\")");
        }
        let unit_ms: u64 = if i + 1 < bytes.len() && bytes[i] == b'm' && bytes[i + 1] == b's' {
            i += 2;
            1
        } else if i < bytes.len() {
            let ms = match bytes[i] {
                b's' => 1_000,
                b'm' => 60_000,
                b'h' => 3_600_000,
                b'd' => 86_400_000,
                _ => return Err("unknown duration unit: use ms, s, m, h or d"),
            };
            i += 1;
            ms
        } else {
            return Err("missing duration unit: use ms, s, m, h or d (e.g. \"30s\")");
        };
        total_ms = match n.checked_mul(unit_ms) {
            Some(v) => match total_ms.checked_add(v) {
                Some(v) => v,
                None => return Err("duration too large"),
            },
            None => return Err("duration too large"),
        };
    }
    Ok(Duration::from_millis(total_ms))
}

/// Parses a duration known to be valid at compile time; an invalid one fails const evaluation.
pub const fn duration_const(text: &str) -> Duration {
    match parse_duration(text) {
        Ok(d) => d,
        Err(e) => panic!("{}", e),
    }
}

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
