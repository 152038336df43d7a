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
/// The most CPU an agent may request, in cores (the schema's `1k`).
pub const CPU_MAX_CORES: u64 = 1000;

/// A parsed Kubernetes quantity: its sign and its magnitude in billionths (nano-units) of the base
/// unit, exactly as `resource.ParseQuantity` (k8s.io/apimachinery) leaves it: rounded up to a whole
/// nano-unit, binary-suffixed values capped at 2^63-1. Magnitudes beyond `u128` saturate (they are
/// far above every bound Agentry checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    pub negative: bool,
    pub nanos: u128,
}

const NANOS_PER_UNIT: u128 = 1_000_000_000;

impl Quantity {
    /// The magnitude in whole units, rounded up (what the kubelet takes for bytes).
    pub fn units_ceil(&self) -> u128 {
        self.nanos.div_ceil(NANOS_PER_UNIT)
    }
    /// The magnitude in thousandths, rounded up (what the kubelet takes for CPU millicores).
    pub fn millis_ceil(&self) -> u128 {
        self.nanos.div_ceil(NANOS_PER_UNIT / 1000)
    }
    /// Compares the signed value with `units` whole units.
    pub fn cmp_units(&self, units: u64) -> std::cmp::Ordering {
        if self.negative && self.nanos != 0 {
            return std::cmp::Ordering::Less;
        }
        self.nanos.cmp(&(u128::from(units) * NANOS_PER_UNIT))
    }
}

/// The longest quantity string we parse. The schema allows 32 characters; this only bounds work.
const MAX_QUANTITY_LEN: usize = 256;

/// Parses a Kubernetes quantity the way the apiserver does (`resource.ParseQuantity`, which CEL's
/// `isQuantity()`/`quantity()` use): `<signedNumber><suffix>` with
/// `signedNumber = [+-]? (digits | digits.digits | digits. | .digits)` and suffix a binary SI
/// suffix (`Ki` .. `Ei`), a decimal SI suffix (`n u m "" k M G T P E`) or a decimal exponent
/// (`e`/`E` and a signed integer: `5e8`, `1E-3`). It accepts exactly what the apiserver accepts,
/// quirks included (`.`, `+` and `Mi` are 0; `Pi` alone is refused), never panics, and gives the
/// same value. Cross-checked against k8s.io/apimachinery v0.34 (see the tests).
pub fn parse_quantity(s: &str) -> Result<Quantity, String> {
    let err = || {
        format!(
            "{s:?} is not a Kubernetes quantity (write e.g. 384Mi, 1Gi, 500M, 5e8, 250m or 0.5)"
        )
    };
    if s.is_empty() || s.len() > MAX_QUANTITY_LEN {
        return Err(err());
    }
    if s == "0" {
        return Ok(Quantity {
            negative: false,
            nanos: 0,
        });
    }
    let parts = split_quantity(s.as_bytes()).ok_or_else(err)?;
    let (base, exponent) = interpret_suffix(parts.suffix).ok_or_else(err)?;
    let num = if parts.num.is_empty() {
        &b"0"[..]
    } else {
        parts.num
    };
    let denom_len = parts.denom.len() as i32; // at most MAX_QUANTITY_LEN
    let digits: Vec<u8> = num.iter().chain(parts.denom).map(|d| d - b'0').collect();

    // ParseQuantity's fast path (exact int64 arithmetic) and slow path (inf.Dec) agree on the value
    // except where int32 scale arithmetic wraps, and the slow path refuses a number without digits.
    let (fast, pow10) = if base == 10 {
        let precision = 18 - (num.len() + parts.denom.len()) as i64;
        let scale = exponent.wrapping_sub(denom_len);
        if precision >= 0 && scale >= -9 {
            (true, i64::from(scale))
        } else {
            // inf.Dec: scale = len(denom) + (-exponent), int32 arithmetic; value = unscaled * 10^-scale.
            let inf_scale = denom_len.wrapping_add(exponent.wrapping_neg());
            (false, -i64::from(inf_scale))
        }
    } else {
        let precision = 15 - num.len() as i64 - i64::from(exponent) * 3 / 10 - 1;
        let fits = parts.denom.is_empty() && precision >= 0 && {
            // int64Multiply(value, 1 << exponent) must not overflow.
            let value: u128 = digits.iter().fold(0, |v, &d| v * 10 + u128::from(d));
            value << exponent <= i64::MAX as u128
        };
        (fits, -i64::from(denom_len))
    };
    if !fast && !parts.value_has_digits {
        return Err(err());
    }
    let binary_shift = if base == 2 { exponent as u32 } else { 0 };
    let mut nanos = nanos_ceil(&digits, binary_shift, pow10 + 9);
    if base == 2 {
        // ParseQuantity caps binary-suffixed values at the largest int64.
        nanos = nanos.min(i64::MAX as u128 * NANOS_PER_UNIT);
    }
    Ok(Quantity {
        negative: parts.negative,
        nanos,
    })
}

struct QuantityParts<'a> {
    negative: bool,
    /// Integer digits without leading zeros (may be empty).
    num: &'a [u8],
    /// Fraction digits (may be empty).
    denom: &'a [u8],
    /// Whether the number before the suffix has a digit (`.` and `+` have none).
    value_has_digits: bool,
    suffix: &'a [u8],
}

/// `parseQuantityString` of k8s.io/apimachinery, byte for byte.
fn split_quantity(s: &[u8]) -> Option<QuantityParts<'_>> {
    let end = s.len();
    let mut pos = 0;
    let mut negative = false;
    match s.first() {
        Some(b'-') => {
            negative = true;
            pos += 1;
        }
        Some(b'+') => pos += 1,
        _ => {}
    }
    let sign_len = pos;
    while pos < end && s[pos] == b'0' {
        pos += 1;
    }
    let zeros_end = pos;
    let mut parts = QuantityParts {
        negative,
        num: &[],
        denom: &[],
        value_has_digits: true,
        suffix: &[],
    };
    if pos == end {
        return Some(parts); // sign and zeros only: 0
    }
    while pos < end && s[pos].is_ascii_digit() {
        pos += 1;
    }
    parts.num = &s[zeros_end..pos];
    if pos == end {
        return Some(parts);
    }
    let mut has_digits = pos > sign_len;
    if s[pos] == b'.' {
        pos += 1;
        let start = pos;
        while pos < end && s[pos].is_ascii_digit() {
            pos += 1;
        }
        parts.denom = &s[start..pos];
        has_digits |= pos > start;
        if pos == end {
            parts.value_has_digits = has_digits;
            return Some(parts);
        }
    }
    parts.value_has_digits = has_digits;
    let suffix_start = pos;
    while pos < end && b"eEinumkKMGTP".contains(&s[pos]) {
        pos += 1;
    }
    if pos < end && (s[pos] == b'-' || s[pos] == b'+') {
        pos += 1;
    }
    while pos < end && s[pos].is_ascii_digit() {
        pos += 1;
    }
    if pos < end {
        return None;
    }
    parts.suffix = &s[suffix_start..];
    Some(parts)
}

/// The suffix's base and exponent, as `suffixHandler.interpret` gives them (the exponent of `e<n>`
/// is parsed as an int64 and then truncated to int32, as the apiserver does).
fn interpret_suffix(suffix: &[u8]) -> Option<(u32, i32)> {
    Some(match suffix {
        b"n" => (10, -9),
        b"u" => (10, -6),
        b"m" => (10, -3),
        b"" => (10, 0),
        b"k" => (10, 3),
        b"M" => (10, 6),
        b"G" => (10, 9),
        b"T" => (10, 12),
        b"P" => (10, 15),
        b"E" => (10, 18),
        b"Ki" => (2, 10),
        b"Mi" => (2, 20),
        b"Gi" => (2, 30),
        b"Ti" => (2, 40),
        b"Pi" => (2, 50),
        b"Ei" => (2, 60),
        [b'e' | b'E', rest @ ..] if !rest.is_empty() => {
            // strconv.ParseInt(rest, 10, 64): optional sign, then at least one digit.
            let text = std::str::from_utf8(rest).ok()?;
            let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let parsed: i64 = text.parse().ok()?;
            (10, parsed as i32)
        }
        _ => return None,
    })
}

/// ceil(digits * 2^shift * 10^pow10), saturating at `u128::MAX`. `shift` is at most 60.
fn nanos_ceil(digits: &[u8], shift: u32, pow10: i64) -> u128 {
    let first = digits.iter().position(|&d| d != 0);
    let Some(first) = first else { return 0 };
    // The product digits * 2^shift, as decimal digits, most significant first.
    let mut product: Vec<u8> = Vec::with_capacity(digits.len() + 20);
    let mut carry: u128 = 0;
    for &d in digits[first..].iter().rev() {
        let v = u128::from(d) * (1u128 << shift) + carry;
        product.push((v % 10) as u8);
        carry = v / 10;
    }
    while carry > 0 {
        product.push((carry % 10) as u8);
        carry /= 10;
    }
    product.reverse();
    let len = product.len() as i64;
    let to_u128 = |ds: &[u8]| -> Option<u128> {
        ds.iter()
            .try_fold(0u128, |v, &d| v.checked_mul(10)?.checked_add(u128::from(d)))
    };
    if pow10 >= 0 {
        if len + pow10 > 40 {
            return u128::MAX;
        }
        let scaled =
            to_u128(&product).and_then(|v| v.checked_mul(10u128.checked_pow(pow10 as u32)?));
        scaled.unwrap_or(u128::MAX)
    } else {
        let drop = -pow10;
        if drop >= len {
            return 1; // a non-zero value below one nano-unit rounds up to one
        }
        let (whole, fraction) = product.split_at((len - drop) as usize);
        let round_up = u128::from(fraction.iter().any(|&d| d != 0));
        to_u128(whole)
            .and_then(|v| v.checked_add(round_up))
            .unwrap_or(u128::MAX)
    }
}

/// Parses a Kubernetes memory quantity into bytes. Fractions are rounded up to whole bytes, as
/// the kubelet does. Negative values are refused. Errors say what was wrong.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let q = parse_quantity(s)?;
    if q.negative && q.nanos != 0 {
        return Err(format!("{s:?} is negative"));
    }
    q.units_ceil()
        .try_into()
        .map_err(|_| format!("{s:?} is too large"))
}

/// Parses a Kubernetes CPU quantity into millicores, rounding up. Negative values are refused.
pub fn parse_cpu_millis(s: &str) -> Result<u64, String> {
    let q = parse_quantity(s)?;
    if q.negative && q.nanos != 0 {
        return Err(format!("{s:?} is negative"));
    }
    q.millis_ceil()
        .try_into()
        .map_err(|_| format!("{s:?} is too large"))
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

/// A Kubernetes object name (DNS-1123 subdomain): at most 253 lowercase letters, digits, '-'
/// and '.', starting and ending with a letter or digit, no empty label.
pub fn is_object_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
        && !name.contains("..")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values as k8s.io/apimachinery v0.34 `resource.ParseQuantity` gives them (nano-units,
    /// rounded up; `None` = refused), taken from a Go program calling it.
    const APIMACHINERY: &[(&str, Option<(bool, u128)>)] = &[
        ("5e8", Some((false, 500_000_000_000_000_000))),
        ("+256Mi", Some((false, 268_435_456_000_000_000))),
        ("0.5Gi", Some((false, 536_870_912_000_000_000))),
        ("1E3", Some((false, 1_000_000_000_000))),
        ("1e+3", Some((false, 1_000_000_000_000))),
        ("1e-12", Some((false, 1))),
        ("1E", Some((false, 1_000_000_000_000_000_000_000_000_000))),
        ("1.", Some((false, 1_000_000_000))),
        ("+.5e1", Some((false, 5_000_000_000))),
        ("-1Ki", Some((true, 1_024_000_000_000))),
        (
            "100Ei",
            Some((false, 9_223_372_036_854_775_807_000_000_000)),
        ),
        ("0.1Ei", Some((false, 115_292_150_460_684_697_600_000_000))),
        ("536870912", Some((false, 536_870_912_000_000_000))),
        ("512.1Mi", Some((false, 536_975_769_600_000_000))),
        ("6e8", Some((false, 600_000_000_000_000_000))),
        ("250m", Some((false, 250_000_000))),
        ("5n", Some((false, 5))),
        ("3u", Some((false, 3_000))),
        (".", Some((false, 0))),
        ("-", Some((true, 0))),
        ("Mi", Some((false, 0))),
        ("Ti", Some((false, 0))),
        ("Pi", None),
        ("+Pi", None),
        ("", None),
        ("1e", None),
        ("1ee3", None),
        ("1e3.5", None),
        ("1K", None),
        ("1ki", None),
        ("1 Mi", None),
        ("1Mi ", None),
        (" 1", None),
        ("1.2.3Mi", None),
        ("12XB", None),
        ("0x10", None),
        ("1_000", None),
        ("ümlaut", None),
        ("1e99999999999999999999", None),
    ];

    #[test]
    fn quantities_parse_like_the_apiserver() {
        for &(input, want) in APIMACHINERY {
            let got = parse_quantity(input).ok().map(|q| (q.negative, q.nanos));
            assert_eq!(got, want, "{input:?}");
        }
        // Huge values saturate instead of overflowing.
        assert_eq!(parse_quantity("9e30").unwrap().nanos, u128::MAX);
        assert_eq!(parse_quantity("1e2147483648").unwrap().nanos, u128::MAX);
        assert_eq!(parse_quantity("1.5e-2147483648").unwrap().nanos, u128::MAX);
        assert_eq!(parse_quantity("1e-2147483647").unwrap().nanos, 1);
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(parse_memory("512Mi").unwrap(), MEMORY_CAP_BYTES);
        assert_eq!(parse_memory("384Mi").unwrap(), 384 << 20);
        assert_eq!(parse_memory("0.5Gi").unwrap(), 512 << 20);
        assert_eq!(parse_memory("+256Mi").unwrap(), 256 << 20);
        assert_eq!(parse_memory("5e8").unwrap(), 500_000_000);
        assert_eq!(parse_memory("5E8").unwrap(), 500_000_000);
        assert_eq!(parse_memory("1E3").unwrap(), 1000);
        assert_eq!(parse_memory("0.5e9").unwrap(), 500_000_000);
        assert_eq!(parse_memory("500M").unwrap(), 500_000_000);
        assert_eq!(parse_memory("1024").unwrap(), 1024);
        assert_eq!(parse_memory("1500m").unwrap(), 2); // 1.5 bytes rounds up
        assert_eq!(parse_memory("1Gi").unwrap(), 1 << 30);
        assert_eq!(parse_memory("536870912").unwrap(), MEMORY_CAP_BYTES);
        // Binary-suffixed values are capped at 2^63-1, as the apiserver does.
        assert_eq!(
            parse_memory("99999999999999999999999Ei").unwrap(),
            i64::MAX as u64
        );
        for bad in ["", "12XB", "1.2.3Mi", "-5Mi", "1 Mi", "Pi", "9e30"] {
            assert!(parse_memory(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn the_cap_is_the_apiserver_cap() {
        use std::cmp::Ordering::*;
        for (s, want) in [
            ("536870912", Equal),
            ("5e8", Less),
            ("0.5Gi", Equal),
            ("512Mi", Equal),
            ("524288Ki", Equal),
            ("536870911.5", Less),
            ("512.1Mi", Greater),
            ("536870912.000000001", Greater),
            ("6e8", Greater),
            ("1e2147483648", Greater),
        ] {
            let q = parse_quantity(s).unwrap();
            assert_eq!(q.cmp_units(MEMORY_CAP_BYTES), want, "{s}");
        }
        // Below the minimum even though it rounds up to it.
        let q = parse_quantity("16777215.5").unwrap();
        assert_eq!(q.cmp_units(MEMORY_MIN_BYTES), Less);
        assert_eq!(q.units_ceil(), u128::from(MEMORY_MIN_BYTES));
        assert_eq!(parse_quantity("-1").unwrap().cmp_units(0), Less);
        assert_eq!(parse_quantity("-0").unwrap().cmp_units(0), Equal);
    }

    #[test]
    fn cpu_quantities() {
        assert_eq!(parse_cpu_millis("250m").unwrap(), 250);
        assert_eq!(parse_cpu_millis("1").unwrap(), 1000);
        assert_eq!(parse_cpu_millis("0.5").unwrap(), 500);
        assert_eq!(parse_cpu_millis("1n").unwrap(), 1);
        assert_eq!(parse_cpu_millis("2e0").unwrap(), 2000);
        assert_eq!(parse_cpu_millis("+1.5").unwrap(), 1500);
        assert!(parse_cpu_millis("half").is_err());
        assert!(parse_cpu_millis("-1").is_err());
    }

    proptest::proptest! {
        #[test]
        fn quantity_parsing_never_panics(s in "\\PC{0,300}") {
            let _ = parse_quantity(&s);
            let _ = parse_memory(&s);
            let _ = parse_cpu_millis(&s);
        }

        #[test]
        fn quantity_like_strings_never_panic(s in "[-+]?[0-9]{0,40}[.]?[0-9]{0,40}([eE][-+]?[0-9]{0,12}|[numkMGTPE]|[KMGTPE]i)?") {
            if let Ok(q) = parse_quantity(&s) {
                let _ = (q.units_ceil(), q.millis_ceil(), q.cmp_units(u64::MAX));
            }
        }
    }

    /// Cross-check against a corpus judged by apimachinery itself: set AGENTRY_QUANTITY_CORPUS to a
    /// file of `input<TAB>verdict` lines (verdict `err`, `[-]sat` or `[-]<nanos>`).
    #[test]
    #[ignore = "needs a corpus produced by a Go program calling resource.ParseQuantity"]
    fn matches_apimachinery_on_a_corpus() {
        let path = std::env::var("AGENTRY_QUANTITY_CORPUS").expect("AGENTRY_QUANTITY_CORPUS");
        let text = std::fs::read_to_string(path).unwrap();
        let mut wrong = Vec::new();
        for line in text.lines() {
            let (input, verdict) = line.rsplit_once('\t').unwrap();
            let got = match parse_quantity(input) {
                Err(_) => "err".to_string(),
                Ok(q) if q.nanos == 0 => "0".to_string(),
                Ok(q) => format!(
                    "{}{}",
                    if q.negative { "-" } else { "" },
                    if q.nanos == u128::MAX {
                        "sat".to_string()
                    } else {
                        q.nanos.to_string()
                    }
                ),
            };
            if got != verdict {
                wrong.push(format!("{input:?}: apimachinery {verdict}, ours {got}"));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} disagreements:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
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
