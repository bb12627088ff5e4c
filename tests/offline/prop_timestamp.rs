//! Properties of timestamp parsing, through the public parser
//! (`event::parse` on `{"timestamp": ...}`):
//!
//! - every accepted form round-trips: epoch seconds (integer, with
//!   milliseconds, in exponent notation, as a number or in a string with
//!   surrounding spaces) below 1e11, epoch milliseconds from 1e11 below 1e14,
//!   and RFC 3339 with any offset, separator and fraction, over the whole
//!   year range 0000-9999, give the instant they denote, in milliseconds;
//! - nothing outside the years 0000-9999 (UTC) is accepted: RFC 3339 text
//!   whose offset moves it across either end, a leap second at the very end,
//!   years of more than four digits or negative, negative epoch values and
//!   epoch values from 1e14 on are all `bad_timestamp`;
//! - arbitrary strings and numbers never panic, and whatever is accepted is
//!   in range and prints back (RFC 3339, epoch milliseconds) to itself.

use chrono::{DateTime, Datelike, NaiveDate, NaiveDateTime, SecondsFormat, Timelike};
use login_metrics::core::event::{parse, ErrorKind, Requirements};
use proptest::prelude::*;

/// 0000-01-01T00:00:00.000Z, in epoch milliseconds.
const MIN_MS: i64 = -62_167_219_200_000;
/// 9999-12-31T23:59:59.999Z, in epoch milliseconds.
const MAX_MS: i64 = 253_402_300_799_999;
/// Epoch values from here on are milliseconds, below it seconds.
const MILLIS_FROM: i64 = 100_000_000_000;
/// Epoch values from here on are rejected (the year 5138 in milliseconds).
const EPOCH_LIMIT: i64 = 100_000_000_000_000;
/// The largest RFC 3339 offset, in minutes (23:59).
const MAX_OFFSET_MIN: i32 = 23 * 60 + 59;

/// Parses `{"timestamp": <json>}`; the timestamp is required.
fn parse_ts(json: &str) -> Result<i64, ErrorKind> {
    let payload = format!(r#"{{"timestamp":{json}}}"#);
    let req = Requirements {
        fields: vec![],
        timestamp: true,
        not_after_ms: None,
    };
    parse(payload.as_bytes(), &req)
        .map(|ev| ev.timestamp_ms.expect("a required timestamp is present"))
        .map_err(|e| e.kind)
}

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn naive(ms: i64) -> NaiveDateTime {
    DateTime::from_timestamp_millis(ms).unwrap().naive_utc()
}

/// Whitespace the parser trims around a string timestamp.
fn padding() -> impl Strategy<Value = String> {
    "[ \t\n]{0,2}"
}

/// How an RFC 3339 timestamp is written, apart from its instant.
#[derive(Debug, Clone)]
struct Style {
    separator: char,
    /// Fraction digits written: 0 (none) to 12; chrono ignores those past 9.
    digits: usize,
    /// Index into the spellings of a zero offset: Z, z, +00:00, -00:00.
    zero: usize,
    /// A negative offset uses U+2212 MINUS SIGN instead of '-'.
    unicode_minus: bool,
    pad: String,
}

fn style() -> impl Strategy<Value = Style> {
    (
        prop::sample::select(vec!['T', 't', ' ']),
        0usize..=12,
        0usize..4,
        any::<bool>(),
        padding(),
    )
        .prop_map(|(separator, digits, zero, unicode_minus, pad)| Style {
            separator,
            digits,
            zero,
            unicode_minus,
            pad,
        })
}

/// Writes local date and time `local` (nanosecond precision) at `offset_min`
/// east of UTC as RFC 3339, quoted for JSON, and returns it with the instant
/// it denotes: UTC milliseconds of the local time truncated to the digits
/// written, minus the offset.
fn rfc3339(local: NaiveDateTime, offset_min: i32, st: &Style) -> (String, i64) {
    let nanos = local.nanosecond();
    let all_digits = format!("{nanos:09}789");
    let frac = match st.digits {
        0 => String::new(),
        n => format!(".{}", &all_digits[..n]),
    };
    let kept_nanos = if st.digits >= 9 {
        nanos
    } else {
        let unit = 10u32.pow(9 - st.digits as u32);
        nanos / unit * unit
    };
    let offset = if offset_min == 0 {
        ["Z", "z", "+00:00", "-00:00"][st.zero].to_string()
    } else {
        let sign = match (offset_min < 0, st.unicode_minus) {
            (false, _) => "+",
            (true, false) => "-",
            (true, true) => "\u{2212}",
        };
        let a = offset_min.unsigned_abs();
        format!("{sign}{:02}:{:02}", a / 60, a % 60)
    };
    let text = format!(
        "{pad}{:04}-{:02}-{:02}{}{:02}:{:02}:{:02}{frac}{offset}{pad}",
        local.year(),
        local.month(),
        local.day(),
        st.separator,
        local.hour(),
        local.minute(),
        local.second(),
        pad = st.pad,
    );
    let local_ms = local.and_utc().timestamp() * 1000 + i64::from(kept_nanos / 1_000_000);
    (quoted(&text), local_ms - i64::from(offset_min) * 60_000)
}

/// A local time in the years 0000-9999, to the nanosecond.
fn local_time(from_ms: i64, to_ms: i64) -> impl Strategy<Value = NaiveDateTime> {
    (from_ms..=to_ms, 0u32..1_000_000).prop_map(|(ms, sub)| {
        naive(ms)
            .with_nanosecond(naive(ms).nanosecond() + sub)
            .unwrap()
    })
}

fn offset() -> impl Strategy<Value = i32> {
    prop_oneof![
        1 => Just(0),
        4 => -MAX_OFFSET_MIN..=MAX_OFFSET_MIN,
    ]
}

/// The verdict for RFC 3339 text denoting `instant`: the instant when it is
/// in the years 0000-9999 UTC, else `bad_timestamp`.
fn expected(instant: i64) -> Result<i64, ErrorKind> {
    if (MIN_MS..=MAX_MS).contains(&instant) {
        Ok(instant)
    } else {
        Err(ErrorKind::BadTimestamp)
    }
}

/// Whatever is accepted is in range and prints back to itself.
fn check_any(json: &str) -> Result<(), TestCaseError> {
    match parse_ts(json) {
        Ok(ms) => {
            prop_assert!((MIN_MS..=MAX_MS).contains(&ms), "{json} -> {ms}");
            let printed = DateTime::from_timestamp_millis(ms)
                .unwrap()
                .to_rfc3339_opts(SecondsFormat::Millis, true);
            prop_assert_eq!(
                parse_ts(&quoted(&printed)),
                Ok(ms),
                "{} -> {}",
                json,
                printed
            );
            if (MILLIS_FROM..EPOCH_LIMIT).contains(&ms) {
                prop_assert_eq!(parse_ts(&ms.to_string()), Ok(ms));
            }
        }
        Err(kind) => prop_assert_eq!(kind, ErrorKind::BadTimestamp, "{}", json),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn epoch_seconds_round_trip(s in 0..MILLIS_FROM, pad in padding()) {
        let forms = [
            s.to_string(),
            format!("{s}.0"),
            format!("{:e}", s as f64),
            quoted(&s.to_string()),
            quoted(&format!("{pad}{s}{pad}")),
            quoted(&format!("+{s}")),
            quoted(&format!("{pad}{:e}{pad}", s as f64)),
        ];
        for form in forms {
            prop_assert_eq!(parse_ts(&form), Ok(s * 1000), "{}", form);
        }
    }

    #[test]
    fn epoch_seconds_with_milliseconds_round_trip(s in 0..MILLIS_FROM, m in 0i64..1000, pad in padding()) {
        let text = format!("{s}.{m:03}");
        for form in [text.clone(), quoted(&text), quoted(&format!("{pad}{text}{pad}"))] {
            prop_assert_eq!(parse_ts(&form), Ok(s * 1000 + m), "{}", form);
        }
    }

    #[test]
    fn epoch_milliseconds_round_trip(ms in MILLIS_FROM..EPOCH_LIMIT, pad in padding()) {
        let forms = [
            ms.to_string(),
            format!("{ms}.0"),
            format!("{:e}", ms as f64),
            quoted(&ms.to_string()),
            quoted(&format!("{pad}{ms}{pad}")),
            quoted(&format!("{ms}.0")),
        ];
        for form in forms {
            prop_assert_eq!(parse_ts(&form), Ok(ms), "{}", form);
        }
    }

    #[test]
    fn rfc3339_round_trips_over_the_whole_year_range(
        local in local_time(MIN_MS, MAX_MS),
        offset_min in offset(),
        st in style(),
    ) {
        let (json, instant) = rfc3339(local, offset_min, &st);
        prop_assert_eq!(parse_ts(&json), expected(instant), "{}", json);
    }

    /// Local times within two days of either end, with offsets that move
    /// about half of them out of the years 0000-9999.
    #[test]
    fn rfc3339_across_either_end_of_the_year_range(
        from_start in 0i64..2 * 86_400_000,
        at_end in any::<bool>(),
        offset_min in offset(),
        st in style(),
    ) {
        let ms = if at_end { MAX_MS - from_start } else { MIN_MS + from_start };
        let (json, instant) = rfc3339(naive(ms), offset_min, &st);
        prop_assert_eq!(parse_ts(&json), expected(instant), "{}", json);
    }

    #[test]
    fn years_outside_four_digits_are_rejected(
        year in prop_oneof![10_000i64..1_000_000, -999_999i64..0],
        plus in any::<bool>(),
        rest in "-[01][0-9]-[0-3][0-9]T[0-2][0-9]:[0-5][0-9]:[0-5][0-9](\\.[0-9]{1,4})?(Z|[+-][01][0-9]:[0-5][0-9])",
    ) {
        let sign = if year < 0 { "-" } else if plus { "+" } else { "" };
        let text = format!("{sign}{:04}{rest}", year.unsigned_abs());
        prop_assert_eq!(parse_ts(&quoted(&text)), Err(ErrorKind::BadTimestamp), "{}", text);
    }

    #[test]
    fn epoch_values_out_of_range_are_rejected(
        negative in i64::MIN..0,
        negative_f in -1e300f64..-1e-6,
        large in EPOCH_LIMIT as u64..=u64::MAX,
        large_f in 1e14f64..1e300,
    ) {
        let forms = [
            negative.to_string(),
            serde_json::to_string(&negative_f).unwrap(),
            large.to_string(),
            serde_json::to_string(&large_f).unwrap(),
            quoted(&negative.to_string()),
            quoted(&negative_f.to_string()),
            quoted(&large.to_string()),
            quoted(&large_f.to_string()),
        ];
        for form in forms {
            prop_assert_eq!(parse_ts(&form), Err(ErrorKind::BadTimestamp), "{}", form);
        }
    }

    #[test]
    fn arbitrary_numbers_never_panic(
        i in any::<i64>(),
        u in any::<u64>(),
        f in prop::num::f64::NORMAL | prop::num::f64::SUBNORMAL | prop::num::f64::ZERO,
    ) {
        for json in [i.to_string(), u.to_string(), serde_json::to_string(&f).unwrap()] {
            check_any(&json)?;
            check_any(&quoted(&json))?;
        }
    }

    #[test]
    fn arbitrary_strings_never_panic(
        s in prop_oneof![
            any::<String>(),
            "[ +\u{2212}-]?[0-9]{1,6}-[0-9]{1,2}-[0-9]{1,2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{0,12})?([Zz]|[+\u{2212}-][0-9]{2}:?[0-9]{2})? ?",
            "[ 0-9eE.+-]{1,24}",
        ],
    ) {
        check_any(&quoted(&s))?;
    }
}

#[test]
fn the_ends_of_the_year_range() {
    let ok = |text: &str| parse_ts(&quoted(text));
    assert_eq!(ok("0000-01-01T00:00:00Z"), Ok(MIN_MS));
    assert_eq!(ok("9999-12-31T23:59:59.999Z"), Ok(MAX_MS));
    assert_eq!(ok("0000-01-01T00:59:00+00:59"), Ok(MIN_MS));
    assert_eq!(ok("9999-12-31T22:59:59.999-01:00"), Ok(MAX_MS));
    assert_eq!(
        ok("0000-01-01T00:00:00+00:01"),
        Err(ErrorKind::BadTimestamp)
    );
    assert_eq!(
        ok("9999-12-31T23:59:59.999-00:01"),
        Err(ErrorKind::BadTimestamp)
    );
    // A leap second on the last second of 9999 is the year 10000.
    assert_eq!(ok("9999-12-31T23:59:60Z"), Err(ErrorKind::BadTimestamp));
    assert_eq!(
        NaiveDate::from_ymd_opt(0, 1, 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp_millis(),
        MIN_MS
    );
}
