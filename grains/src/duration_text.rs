// The duration parser, shared as source: `grains::duration` and `grains-macros` (which cannot depend on
// `grains`) both `include!` this file, so `#[grain(idle_timeout = "...")]` and the silo's configuration accept
// exactly the same text. Plain `const fn`, `core` only.

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
