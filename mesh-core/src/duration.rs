//! Durations in Go / protobuf JSON form (`"500ms"`, `"1.5s"`, `"1h30m"`), as
//! Istio's YAML and our command-line flags write them.

use std::time::Duration;

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {value:?}: {reason}")]
#[non_exhaustive]
pub struct InvalidDuration {
    /// The refused text.
    pub value: String,
    /// Why.
    pub reason: &'static str,
}

/// Parses a non-negative duration: one or more `<number><unit>` parts, the
/// number possibly fractional, the unit one of `ns us µs ms s m h`.
///
/// ```
/// use mesh_core::duration::parse;
/// use std::time::Duration;
/// assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
/// assert_eq!(parse("1h30m").unwrap(), Duration::from_secs(5400));
/// assert!(parse("10").is_err());
/// assert!(parse("-1s").is_err());
/// ```
pub fn parse(s: &str) -> Result<Duration, InvalidDuration> {
    let err = |reason| InvalidDuration {
        value: s.chars().take(40).collect(),
        reason,
    };
    if s.is_empty() {
        return Err(err("empty"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| err("missing unit (use ns, us, ms, s, m or h)"))?;
        if num_len == 0 {
            return Err(err("expected a number"));
        }
        let (num, tail) = rest.split_at(num_len);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let nanos_per: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(err("unknown unit (use ns, us, ms, s, m or h)")),
        };
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
            return Err(err("malformed number"));
        }
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| err("number too large"))?
        };
        let mut part = int.checked_mul(nanos_per).ok_or_else(|| err("too large"))?;
        let mut scale = nanos_per;
        for d in frac.bytes().take(18) {
            scale /= 10;
            part += u128::from(d - b'0') * scale;
        }
        total = total.checked_add(part).ok_or_else(|| err("too large"))?;
        rest = tail;
    }
    let secs = u64::try_from(total / 1_000_000_000).map_err(|_| err("too large"))?;
    let nanos = u32::try_from(total % 1_000_000_000).unwrap_or(0);
    Ok(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("2m3.5s").unwrap(), Duration::from_millis(123_500));
        assert_eq!(parse(".5s").unwrap(), Duration::from_millis(500));
        assert_eq!(parse("10us").unwrap(), Duration::from_micros(10));
        for bad in [
            "",
            "s",
            "1",
            "1x",
            "1.2.3s",
            "-5s",
            "1s-",
            "ms5",
            " 1s",
            "99999999999999999999999999h",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
