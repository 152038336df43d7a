//! Parsing of the unit-bearing strings users write in an Agent spec: Kubernetes quantities
//! (`384Mi`, `250m`) and Go-style durations (`1h`, `90m`, `2160h`).
//!
//! The apiserver checks the same strings with CEL (`quantity()`, `duration()`); the controller parses
//! them again so that a spec that slipped past an older CRD still gets a clear condition, not a panic.

use std::time::Duration;

/// The most memory any agent pod may use, across all of its containers.
pub const MEMORY_CAP_BYTES: u64 = 512 * 1024 * 1024;
/// The smallest memory limit we accept: below this no agent process starts.
pub const MEMORY_MIN_BYTES: u64 = 16 * 1024 * 1024;

/// Parses a Kubernetes memory quantity into bytes. Fractions are rounded up to whole bytes, as
/// the kubelet does. Errors say what was wrong.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let millis = parse_quantity_millis(s)?;
    // bytes = ceil(millis / 1000)
    millis
        .div_ceil(1000)
        .try_into()
        .map_err(|_| format!("{s:?} is too large"))
}

/// Parses a Kubernetes CPU quantity into millicores, rounding up.
pub fn parse_cpu_millis(s: &str) -> Result<u64, String> {
    let millis = parse_quantity_millis(s)?;
    millis.try_into().map_err(|_| format!("{s:?} is too large"))
}

/// Parses a Kubernetes quantity (`<number><suffix>`) into thousandths of its base unit.
fn parse_quantity_millis(s: &str) -> Result<u128, String> {
    let err =
        || format!("{s:?} is not a Kubernetes quantity (write e.g. 384Mi, 1Gi, 500M, 250m or 0.5)");
    if s.is_empty() || s.len() > 64 {
        return Err(err());
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() || number.starts_with('.') && number.len() == 1 {
        return Err(err());
    }
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if frac.contains('.') || frac.len() > 9 {
        return Err(err());
    }
    // (multiplier numerator, denominator): value = number * num / den, scaled by 1000 for millis.
    let (num, den): (u128, u128) = match suffix {
        "" => (1, 1),
        "m" => (1, 1000),
        "k" => (1_000, 1),
        "M" => (1_000_000, 1),
        "G" => (1_000_000_000, 1),
        "T" => (1_000_000_000_000, 1),
        "P" => (1_000_000_000_000_000, 1),
        "E" => (1_000_000_000_000_000_000, 1),
        "Ki" => (1 << 10, 1),
        "Mi" => (1 << 20, 1),
        "Gi" => (1 << 30, 1),
        "Ti" => (1 << 40, 1),
        "Pi" => (1 << 50, 1),
        "Ei" => (1 << 60, 1),
        _ => return Err(err()),
    };
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| err())?
    };
    let frac_scale = 10u128.pow(frac.len() as u32);
    let frac_val: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| err())?
    };
    let scaled = whole
        .checked_mul(frac_scale)
        .and_then(|w| w.checked_add(frac_val))
        .and_then(|v| v.checked_mul(num))
        .and_then(|v| v.checked_mul(1000))
        .ok_or_else(err)?;
    Ok(scaled.div_ceil(frac_scale * den))
}

/// Formats bytes the way Kubernetes users read memory: the largest binary suffix that divides evenly.
pub fn format_memory(bytes: u64) -> String {
    for (suffix, shift) in [("Gi", 30), ("Mi", 20), ("Ki", 10)] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Parses a Go duration string (`1h`, `1h30m`, `90s`, `2160h`), the syntax CEL's `duration()` accepts.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err = || format!("{s:?} is not a duration (write e.g. 30m, 1h, 24h or 2160h for 90 days)");
    if s.is_empty() || s.len() > 64 {
        return Err(err());
    }
    let mut rest = s;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if digits == 0 {
            return Err(err());
        }
        let value: f64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(value * seconds_per_unit).map_err(|_| err())?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_quantities() {
        assert_eq!(parse_memory("512Mi").unwrap(), MEMORY_CAP_BYTES);
        assert_eq!(parse_memory("384Mi").unwrap(), 384 << 20);
        assert_eq!(parse_memory("0.5Gi").unwrap(), 512 << 20);
        assert_eq!(parse_memory("500M").unwrap(), 500_000_000);
        assert_eq!(parse_memory("1024").unwrap(), 1024);
        assert_eq!(parse_memory("1500m").unwrap(), 2); // 1.5 bytes rounds up
        assert_eq!(parse_memory("1Gi").unwrap(), 1 << 30);
        for bad in [
            "",
            "Mi",
            "12XB",
            "1.2.3Mi",
            "-5Mi",
            "1 Mi",
            ".",
            "99999999999999999999999Ei",
        ] {
            assert!(parse_memory(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn cpu_quantities() {
        assert_eq!(parse_cpu_millis("250m").unwrap(), 250);
        assert_eq!(parse_cpu_millis("1").unwrap(), 1000);
        assert_eq!(parse_cpu_millis("0.5").unwrap(), 500);
        assert!(parse_cpu_millis("half").is_err());
    }

    #[test]
    fn memory_formatting_round_trips() {
        for s in ["512Mi", "384Mi", "1Gi", "16Mi", "100Ki", "1000"] {
            assert_eq!(format_memory(parse_memory(s).unwrap()), s);
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("2160h").unwrap(),
            Duration::from_secs(90 * 86400)
        );
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        for bad in ["", "1", "h", "1d", "1h-5m", "abc", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad} should be rejected");
        }
    }
}
