//! The value parsers of configuration: durations, sizes, signals, umasks,
//! `KEY=VALUE` pairs and Python app names, each from the text of one
//! option. They are pure (no environment, no files) and never panic; the
//! error is the problem alone, to which `config.rs` adds the option and
//! the value. Durations and sizes are read as exact decimals (no binary
//! floating point), so `0.1` is one tenth of a second.

use std::time::Duration;

use nix::sys::signal::Signal;

/// `module:attribute`, where both are dotted Python identifiers.
pub(super) fn validate_app(app: &str) -> std::result::Result<(), String> {
    let (module, attr) = app
        .split_once(':')
        .ok_or("expected module:attribute, e.g. app:main")?;
    let dotted = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|part| {
                let mut chars = part.chars();
                matches!(chars.next(), Some(c) if c.is_alphabetic() || c == '_')
                    && chars.all(|c| c.is_alphanumeric() || c == '_')
            })
    };
    if !dotted(module) {
        return Err(format!("'{module}' is not a Python module name"));
    }
    if !dotted(attr) {
        return Err(format!("'{attr}' is not a Python attribute name"));
    }
    Ok(())
}

/// Splits `1.5GiB` into its decimal number and its unit, and reads the
/// number exactly (no binary floating point: `0.1` is one tenth): the
/// value is `whole + frac / 10^digits`, returned as (whole, frac, 10^digits).
fn decimal_and_unit(text: &str) -> Option<(u128, u128, u128, &str)> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if whole.is_empty() && frac.is_empty() {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Digits past the 18th are below a nanosecond of any unit and below a
    // byte; dropping them keeps the arithmetic in range.
    let frac = &frac[..frac.len().min(18)];
    let digits = |d: &str| -> Option<u128> {
        let d = d.trim_start_matches('0');
        if d.is_empty() {
            return Some(0);
        }
        // 30 digits is far past every limit and still fits a u128.
        if d.len() > 30 {
            return Some(u128::from(u64::MAX) * u128::from(u64::MAX));
        }
        d.parse().ok()
    };
    let whole = digits(whole)?;
    let frac_value = digits(frac)?;
    let scale = 10u128.pow(frac.len() as u32);
    Some((whole, frac_value, scale, unit.trim()))
}

/// `(whole + frac/scale) * unit`, rounded down; `None` on overflow.
fn scaled(whole: u128, frac: u128, scale: u128, unit: u128) -> Option<u128> {
    whole
        .checked_mul(unit)?
        .checked_add(frac.checked_mul(unit)? / scale)
}

/// The longest duration procman accepts (about 31 years).
pub(super) const MAX_DURATION_SECS: u64 = 1_000_000_000;

/// Parses `30`, `1.5`, `500ms`, `30s`, `5m`, `6h`, `1d` (a bare number is
/// seconds). Exact to the nanosecond.
pub(super) fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let (whole, frac, scale, unit) = decimal_and_unit(text)
        .ok_or_else(|| "expected a duration such as 30, 30s, 500ms, 5m or 6h".to_string())?;
    let nanos_per: u128 = match unit {
        "" | "s" | "sec" | "secs" => 1_000_000_000,
        "ms" => 1_000_000,
        "m" | "min" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "d" => 86_400_000_000_000,
        other => return Err(format!("unknown unit '{other}' (use ms, s, m, h or d)")),
    };
    let too_large = || "duration is too large".to_string();
    let nanos = scaled(whole, frac, scale, nanos_per).ok_or_else(too_large)?;
    if nanos > u128::from(MAX_DURATION_SECS) * 1_000_000_000 {
        return Err(too_large());
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| too_large())?;
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

/// The largest size procman accepts (1 PB).
const MAX_SIZE: u128 = 1_000_000_000_000_000;

/// Parses `512MiB`, `1G`, `100MB`, `4096` (bytes). Binary units (KiB,
/// MiB, GiB, and the bare K, M, G) are powers of 1024; KB, MB, GB are
/// powers of 1000. Fractions are exact, rounded down to a byte.
pub(super) fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let (whole, frac, scale, unit) = decimal_and_unit(text)
        .ok_or_else(|| "expected a size such as 512MiB, 1G or 1073741824".to_string())?;
    let per: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => {
            return Err(format!(
                "unknown unit '{other}' (use KiB, MiB, GiB, K, M, G, KB, MB or GB)"
            ))
        }
    };
    match scaled(whole, frac, scale, per) {
        Some(bytes) if (1..=MAX_SIZE).contains(&bytes) => {
            u64::try_from(bytes).map_err(|_| "size out of range".to_string())
        }
        _ => Err("size out of range".into()),
    }
}

/// Parses a signal name: `TERM`, `SIGTERM`, `term` or a number.
pub(super) fn parse_signal(text: &str) -> Option<Signal> {
    if let Ok(n) = text.parse::<i32>() {
        return Signal::try_from(n).ok();
    }
    let upper = text.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>().ok()
}

pub(super) fn parse_umask(text: &str) -> Option<u32> {
    let t = text.trim();
    let digits = t
        .strip_prefix("0o")
        .or_else(|| t.strip_prefix("0O"))
        .unwrap_or(t);
    let v = u32::from_str_radix(digits, 8).ok()?;
    (v <= 0o777).then_some(v)
}

pub(super) fn parse_env_pair(kv: &str) -> std::result::Result<(String, String), String> {
    let (k, v) = kv.split_once('=').ok_or("expected KEY=VALUE")?;
    let mut chars = k.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!("'{k}' is not a valid variable name"));
    }
    if v.contains('\0') {
        return Err("the value contains a NUL byte".into());
    }
    Ok((k.to_string(), v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_units() {
        let table = [
            ("30", 30_000),
            ("1.5", 1_500),
            ("500ms", 500),
            ("2s", 2_000),
            ("5m", 300_000),
            ("6h", 21_600_000),
        ];
        for (text, ms) in table {
            assert_eq!(
                parse_duration(text).map(|d| d.as_millis()),
                Ok(ms),
                "{text}"
            );
        }
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn sizes_accept_units() {
        let table = [
            ("4096", 4096u64),
            ("512MiB", 512 << 20),
            ("512M", 512 << 20),
            ("1G", 1 << 30),
            ("1.5GiB", 3 << 29),
            ("100MB", 100_000_000),
            ("2k", 2048),
        ];
        for (text, want) in table {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
        for bad in ["", "lots", "12XB", "0", "-5M"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signals_parse_in_every_spelling() {
        assert_eq!(parse_signal("TERM"), Some(Signal::SIGTERM));
        assert_eq!(parse_signal("sigint"), Some(Signal::SIGINT));
        assert_eq!(parse_signal("3"), Some(Signal::SIGQUIT));
        assert_eq!(parse_signal("BOGUS"), None);
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    // The printers below exist for these properties only: a parsed value,
    // printed back, must parse to itself (the parsers are exact).
    /// A duration as [`parse_duration`] reads it: the largest unit that
    /// divides it exactly (`6h`, `90s`, `1500ms`), nanoseconds as a decimal
    /// fraction of a millisecond.
    fn format_duration(d: Duration) -> String {
        let nanos = d.as_nanos();
        if nanos == 0 {
            return "0s".into();
        }
        for (unit, per) in [
            ("d", 86_400_000_000_000u128),
            ("h", 3_600_000_000_000),
            ("m", 60_000_000_000),
            ("s", 1_000_000_000),
            ("ms", 1_000_000),
        ] {
            if nanos % per == 0 {
                return format!("{}{unit}", nanos / per);
            }
        }
        let frac = format!("{:06}", nanos % 1_000_000);
        format!("{}.{}ms", nanos / 1_000_000, frac.trim_end_matches('0'))
    }

    /// A size as [`parse_size`] reads it: the largest binary unit that
    /// divides it exactly (`512MiB`), else bytes.
    fn format_size(bytes: u64) -> String {
        for (unit, per) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if bytes != 0 && bytes % per == 0 {
                return format!("{}{unit}", bytes / per);
            }
        }
        bytes.to_string()
    }

    /// Text shaped like a number with a unit, so that many cases parse.
    fn number_like() -> impl Strategy<Value = String> {
        let unit = prop_oneof![
            prop::sample::select(vec!["", "ms", "s", "m", "h", "d", "KiB", "M", "gb", " s"])
                .prop_map(str::to_string),
            "[a-zA-Z]{0,3}",
        ];
        ("[0-9]{0,25}", prop::option::of("[0-9.]{0,25}"), unit).prop_map(|(w, f, u)| match f {
            Some(f) => format!("{w}.{f}{u}"),
            None => format!("{w}{u}"),
        })
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_cases(512))]

        #[test]
        fn value_parsers_never_panic(text in prop_oneof![any::<String>(), number_like()]) {
            let _ = parse_duration(&text);
            let _ = parse_size(&text);
            let _ = parse_signal(&text);
            let _ = parse_umask(&text);
            let _ = parse_env_pair(&text);
            let _ = validate_app(&text);
        }

        #[test]
        fn durations_print_back_to_themselves(
            secs in 0..=MAX_DURATION_SECS,
            nanos in prop_oneof![Just(0u32), (0u32..1000).prop_map(|ms| ms * 1_000_000), 0u32..1_000_000_000],
        ) {
            let d = Duration::new(secs, nanos).min(Duration::from_secs(MAX_DURATION_SECS));
            let shown = format_duration(d);
            prop_assert_eq!(parse_duration(&shown), Ok(d), "{}", shown);
        }

        #[test]
        fn parsed_durations_print_back_to_the_same_value(text in number_like()) {
            if let Ok(d) = parse_duration(&text) {
                prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{}", text);
            }
        }

        #[test]
        fn sizes_print_back_to_themselves(
            bytes in prop_oneof![1u64..=1_000_000_000_000_000, (1u64..1_000_000).prop_map(|n| n << 20)],
        ) {
            let shown = format_size(bytes);
            prop_assert_eq!(parse_size(&shown), Ok(bytes), "{}", shown);
        }

        #[test]
        fn parsed_sizes_print_back_to_the_same_value(text in number_like()) {
            if let Ok(n) = parse_size(&text) {
                prop_assert_eq!(parse_size(&format_size(n)), Ok(n), "{}", text);
            }
        }

        #[test]
        fn umasks_print_back_to_themselves(mask in 0u32..=0o777) {
            prop_assert_eq!(parse_umask(&format!("{mask:#o}")), Some(mask));
        }

        #[test]
        fn env_pairs_print_back_to_themselves(
            key in "[A-Za-z_][A-Za-z0-9_]{0,10}",
            value in "[^\0]*",
        ) {
            let pair = format!("{key}={value}");
            prop_assert_eq!(parse_env_pair(&pair), Ok((key, value)));
        }
    }

    #[test]
    fn durations_are_exact_decimals() {
        assert_eq!(parse_duration("0.1"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1.234"), Ok(Duration::from_millis(1234)));
        assert_eq!(parse_duration("0.3ms"), Ok(Duration::from_micros(300)));
        assert_eq!(parse_size("1.1KB"), Ok(1100));
        assert!(parse_duration("1.2.3").is_err());
        assert!(parse_duration("1e3").is_err());
        assert!(parse_duration(&"9".repeat(60)).is_err());
        assert!(parse_size(&format!("0.{}", "0".repeat(60))).is_err());
    }
}
