//! `event::parse` on arbitrary bytes, under three sets of requirements.
//!
//! Beyond "never panics", every input checks what must hold of the parser:
//! an accepted event's timestamp lies in the years 0000-9999 (UTC) and not
//! after `not_after_ms`; required fields are present; stricter requirements
//! never accept what looser ones reject, and agree on what they accept; an
//! accepted event's fields are those a plain JSON parse of the payload finds
//! (when it finds any);
//! a rejection has one of the parser's kinds and a reason; and the parser's
//! fast path never changes a result: `parse` equals `parse_with_serde`.

#![no_main]

use std::sync::OnceLock;

use chrono::{NaiveDate, NaiveTime};
use libfuzzer_sys::fuzz_target;
use login_metrics::core::event::{parse, parse_with_serde, ErrorKind, Field, InvalidEvent, LoginEvent, Requirements};
use serde_json::Value;

/// 2023-09-12T00:45:51Z: the latest accepted time of the strictest requirements.
const NOT_AFTER_MS: i64 = 1_694_479_551_000;

struct Limits {
    /// 0000-01-01T00:00:00.000Z and 9999-12-31T23:59:59.999Z.
    min_ms: i64,
    max_ms: i64,
    /// Nothing required / the service's defaults / everything, with a ceiling.
    loose: Requirements,
    default: Requirements,
    strict: Requirements,
}

fn limits() -> &'static Limits {
    static LIMITS: OnceLock<Limits> = OnceLock::new();
    LIMITS.get_or_init(|| {
        let ms = |y, m, d, t: NaiveTime| {
            NaiveDate::from_ymd_opt(y, m, d)
                .unwrap()
                .and_time(t)
                .and_utc()
                .timestamp_millis()
        };
        Limits {
            min_ms: ms(0, 1, 1, NaiveTime::MIN),
            max_ms: ms(
                9999,
                12,
                31,
                NaiveTime::from_hms_milli_opt(23, 59, 59, 999).unwrap(),
            ),
            loose: Requirements {
                fields: vec![],
                timestamp: false,
                not_after_ms: None,
            },
            default: Requirements {
                fields: vec![Field::UserId],
                timestamp: true,
                not_after_ms: None,
            },
            strict: Requirements {
                fields: Field::ALL.to_vec(),
                timestamp: true,
                not_after_ms: Some(NOT_AFTER_MS),
            },
        }
    })
}

fn check_accepted(ev: &LoginEvent<'_>, req: &Requirements, lim: &Limits) {
    if let Some(ts) = ev.timestamp_ms {
        assert!(
            (lim.min_ms..=lim.max_ms).contains(&ts),
            "accepted timestamp {ts} ms is outside the years 0000-9999"
        );
        if let Some(limit) = req.not_after_ms {
            assert!(ts <= limit, "accepted timestamp {ts} ms after {limit}");
        }
    } else {
        assert!(!req.timestamp, "timestamp required but none accepted");
    }
    for f in &req.fields {
        assert!(ev.get(*f).is_some(), "required field {f} missing");
    }
}

fn check_rejected(err: &InvalidEvent) {
    assert!(ErrorKind::ALL.contains(&err.kind), "kind {:?}", err.kind);
    assert!(!err.reason.is_empty(), "{:?} without a reason", err.kind);
}

/// An accepted event carries exactly the string fields a generic JSON parse
/// sees. Only when that parse succeeds: the parser skips the values of fields
/// it does not define without validating them (a string that is not UTF-8, a
/// number beyond f64), as documented.
fn check_against_json(data: &[u8], ev: &LoginEvent<'_>) {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let obj = value.as_object().expect("an accepted event is an object");
    for f in Field::ALL {
        let expected = match obj.get(f.name()) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.as_str()),
            Some(other) => panic!("accepted event with {f} = {other}"),
        };
        assert_eq!(ev.get(f), expected, "field {f}");
    }
    match obj.get("timestamp") {
        None | Some(Value::Null) => assert_eq!(ev.timestamp_ms, None),
        Some(Value::Number(_) | Value::String(_)) => assert!(ev.timestamp_ms.is_some()),
        Some(other) => panic!("accepted event with timestamp = {other}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let lim = limits();
    let loose = parse(data, &lim.loose);
    let default = parse(data, &lim.default);
    let strict = parse(data, &lim.strict);
    for (result, req) in [
        (&loose, &lim.loose),
        (&default, &lim.default),
        (&strict, &lim.strict),
    ] {
        assert_eq!(result, &parse_with_serde(data, req), "the fast path changed a result");
    }
    for (result, req) in [
        (&loose, &lim.loose),
        (&default, &lim.default),
        (&strict, &lim.strict),
    ] {
        match result {
            Ok(ev) => check_accepted(ev, req, lim),
            Err(e) => check_rejected(e),
        }
    }
    // Stricter requirements accept a subset, with the same result.
    if let Ok(ev) = &strict {
        assert_eq!(default.as_ref().ok(), Some(ev));
    }
    if let Ok(ev) = &default {
        assert_eq!(loose.as_ref().ok(), Some(ev));
    }
    // What even the loose requirements reject is no event at all: every
    // requirement rejects it the same way (a bad timestamp may be reported
    // as a missing field first).
    if let Err(e) = &loose {
        for other in [&default, &strict] {
            let other = other.as_ref().expect_err("looser requirements rejected it");
            if e.kind == ErrorKind::BadTimestamp {
                assert!(
                    matches!(
                        other.kind,
                        ErrorKind::BadTimestamp | ErrorKind::MissingField
                    ),
                    "{e} / {other}"
                );
            } else {
                assert_eq!(other, e);
            }
        }
    }
    if let Ok(ev) = &loose {
        check_against_json(data, ev);
    }
});
