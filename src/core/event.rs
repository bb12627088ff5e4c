//! Login events: the field set and the parser.
//!
//! Producers are sloppy, so the parser is strict about what it must be and
//! lenient about everything else: string fields borrow from the message
//! buffer (no copy unless the JSON escapes a character), fields the event does
//! not define are skipped, and a timestamp may be epoch seconds or
//! milliseconds (integer, float or a string holding either) or RFC 3339.
//! Anything that cannot be an event is an [`InvalidEvent`] with a
//! [`ErrorKind`] and a readable reason that never quotes a field's value, so
//! reasons are safe to log even for pseudonymized fields.

use std::borrow::Cow;
use std::fmt;

use chrono::DateTime;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// The string fields of a login event, in their canonical order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    UserId,
    AppVersion,
    DeviceType,
    Ip,
    Locale,
    DeviceId,
}

/// Number of string fields; column arrays are indexed by [`Field::index`].
pub const FIELD_COUNT: usize = 6;

impl Field {
    pub const ALL: [Field; FIELD_COUNT] = [
        Field::UserId,
        Field::AppVersion,
        Field::DeviceType,
        Field::Ip,
        Field::Locale,
        Field::DeviceId,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Field::UserId => "user_id",
            Field::AppVersion => "app_version",
            Field::DeviceType => "device_type",
            Field::Ip => "ip",
            Field::Locale => "locale",
            Field::DeviceId => "device_id",
        }
    }

    pub fn from_name(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.name() == name)
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The accepted names, for error messages.
    pub fn names() -> String {
        Field::ALL.map(Field::name).join(", ")
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A valid login event, borrowing from the message it was parsed from.
#[derive(Debug, Clone, PartialEq)]
pub struct LoginEvent<'a> {
    /// Indexed by [`Field::index`]; `None` is absent or JSON null.
    pub fields: [Option<Cow<'a, str>>; FIELD_COUNT],
    /// Event time in milliseconds since the epoch, UTC; `None` only when the
    /// timestamp is not required and absent.
    pub timestamp_ms: Option<i64>,
}

impl LoginEvent<'_> {
    pub fn get(&self, field: Field) -> Option<&str> {
        self.fields[field.index()].as_deref()
    }
}

/// Why a message is not a valid event. The names are a public contract: they
/// are the `error.kind` header of dead-letter messages and a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not JSON at all (or empty).
    NotJson,
    /// JSON, but not an object.
    NotObject,
    /// A required field is absent or null.
    MissingField,
    /// The timestamp is of no form this parser knows, or out of range.
    BadTimestamp,
    /// A field has the wrong JSON type (a number where a string belongs, ...).
    WrongType,
    /// Window mode: a valid event whose windows had all closed. Never produced
    /// by the parser, so not in [`ErrorKind::ALL`].
    Late,
}

impl ErrorKind {
    /// The kinds the parser produces.
    pub const ALL: [ErrorKind; 5] = [
        ErrorKind::NotJson,
        ErrorKind::NotObject,
        ErrorKind::MissingField,
        ErrorKind::BadTimestamp,
        ErrorKind::WrongType,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotJson => "not_json",
            ErrorKind::NotObject => "not_object",
            ErrorKind::MissingField => "missing_field",
            ErrorKind::BadTimestamp => "bad_timestamp",
            ErrorKind::WrongType => "wrong_type",
            ErrorKind::Late => "late",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message that is not a valid login event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {reason}")]
pub struct InvalidEvent {
    pub kind: ErrorKind,
    pub reason: String,
}

impl InvalidEvent {
    fn new(kind: ErrorKind, reason: impl Into<String>) -> Self {
        InvalidEvent {
            kind,
            reason: reason.into(),
        }
    }
}

/// What a valid event must carry.
#[derive(Debug, Clone, Default)]
pub struct Requirements {
    pub fields: Vec<Field>,
    pub timestamp: bool,
    /// Latest accepted event time, epoch milliseconds (the wall clock plus
    /// `events.max_future`); `None` accepts any. The caller refreshes it.
    pub not_after_ms: Option<i64>,
}

/// Epoch values at or above this are milliseconds; below, seconds. 1e11 s is
/// the year 5138, 1e11 ms is March 1973: no real login falls in between.
const MILLIS_THRESHOLD: f64 = 1e11;
/// Largest accepted epoch milliseconds (the year 5138); beyond is a unit error.
const MAX_MILLIS: f64 = 1e14;
/// The instants RFC 3339 can write in UTC, the years 0000-9999 in epoch
/// milliseconds: 0000-01-01T00:00:00.000Z and 9999-12-31T23:59:59.999Z.
const RFC3339_MILLIS: std::ops::RangeInclusive<i64> = -62_167_219_200_000..=253_402_300_799_999;

/// Parses one message payload.
pub fn parse<'a>(payload: &'a [u8], req: &Requirements) -> Result<LoginEvent<'a>, InvalidEvent> {
    let raw = match scan(payload) {
        Some(raw) => raw,
        None => read_json(payload)?,
    };
    check(raw, req)
}

/// [`parse`] without the fast path: serde_json decides everything. The
/// reference the fast path is tested against.
#[doc(hidden)]
pub fn parse_with_serde<'a>(
    payload: &'a [u8],
    req: &Requirements,
) -> Result<LoginEvent<'a>, InvalidEvent> {
    check(read_json(payload)?, req)
}

/// Reads the payload with serde_json: every form JSON allows, and the
/// classification of what is not an object.
fn read_json(payload: &[u8]) -> Result<RawEvent<'_>, InvalidEvent> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Err(InvalidEvent::new(ErrorKind::NotJson, "empty message"));
    }
    serde_json::from_slice(payload).map_err(|e| {
        if e.is_data() {
            InvalidEvent::new(
                ErrorKind::NotObject,
                format!("expected a JSON object, found {}", json_kind_of(payload)),
            )
        } else {
            InvalidEvent::new(ErrorKind::NotJson, format!("not JSON: {e}"))
        }
    })
}

/// Applies the requirements to what was read.
fn check<'a>(raw: RawEvent<'a>, req: &Requirements) -> Result<LoginEvent<'a>, InvalidEvent> {
    if let Some((field, found)) = raw.wrong_type {
        return Err(InvalidEvent::new(
            ErrorKind::WrongType,
            format!("field `{field}` must be a string or null, found {found}"),
        ));
    }
    for field in &req.fields {
        if raw.fields[field.index()].is_none() {
            return Err(InvalidEvent::new(
                ErrorKind::MissingField,
                format!("required field `{field}` is missing or null"),
            ));
        }
    }
    let timestamp_ms = match raw.timestamp {
        TsValue::Absent if req.timestamp => {
            return Err(InvalidEvent::new(
                ErrorKind::MissingField,
                "required field `timestamp` is missing or null",
            ))
        }
        TsValue::Absent => None,
        other => {
            let ms = normalize_timestamp(&other)
                .map_err(|reason| InvalidEvent::new(ErrorKind::BadTimestamp, reason))?;
            if req.not_after_ms.is_some_and(|limit| ms > limit) {
                return Err(InvalidEvent::new(
                    ErrorKind::BadTimestamp,
                    "timestamp is further in the future than events.max_future allows",
                ));
            }
            Some(ms)
        }
    };
    Ok(LoginEvent {
        fields: raw.fields,
        timestamp_ms,
    })
}

fn json_kind_of(payload: &[u8]) -> &'static str {
    match payload.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't') | Some(b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// Turns any accepted timestamp form into epoch milliseconds, UTC.
fn normalize_timestamp(value: &TsValue<'_>) -> Result<i64, String> {
    match value {
        TsValue::Int(n) => epoch_to_millis(*n as f64, "integer"),
        TsValue::Float(f) => epoch_to_millis(*f, "number"),
        TsValue::Str(s) => {
            let t = s.trim();
            if let Ok(n) = t.parse::<i64>() {
                return epoch_to_millis(n as f64, "string");
            }
            if let Ok(f) = t.parse::<f64>() {
                if f.is_finite() {
                    return epoch_to_millis(f, "string");
                }
            }
            let ms = DateTime::parse_from_rfc3339(t)
                .map(|dt| dt.timestamp_millis())
                .map_err(|_| {
                    "timestamp string is neither epoch seconds, epoch milliseconds nor RFC 3339"
                        .to_string()
                })?;
            // An offset (or a leap second) can carry a time written in the
            // years 0000-9999 out of them in UTC.
            if !RFC3339_MILLIS.contains(&ms) {
                return Err("RFC 3339 timestamp is outside the years 0000-9999 in UTC".to_string());
            }
            Ok(ms)
        }
        TsValue::Wrong(found) => Err(format!(
            "timestamp must be a number or a string, found {found}"
        )),
        TsValue::Absent => Err("timestamp is missing".to_string()),
    }
}

fn epoch_to_millis(v: f64, form: &str) -> Result<i64, String> {
    if !(0.0..MAX_MILLIS).contains(&v) {
        return Err(format!(
            "{form} timestamp is out of range for epoch seconds or milliseconds"
        ));
    }
    Ok(if v >= MILLIS_THRESHOLD {
        v.round() as i64
    } else {
        (v * 1000.0).round() as i64
    })
}

/// The event as it appears on the wire, before requirements are checked.
struct RawEvent<'a> {
    fields: [Option<Cow<'a, str>>; FIELD_COUNT],
    timestamp: TsValue<'a>,
    /// The first field that had a type other than string or null.
    wrong_type: Option<(Field, &'static str)>,
}

impl<'a> RawEvent<'a> {
    fn new() -> Self {
        RawEvent {
            fields: Default::default(),
            timestamp: TsValue::Absent,
            wrong_type: None,
        }
    }

    /// A field's value; the last occurrence of a key wins, except that the
    /// first value of a wrong type is what the event is rejected for.
    fn set_field(&mut self, field: Field, value: StrValue<'a>) {
        match value {
            StrValue::Str(s) => self.fields[field.index()] = Some(s),
            StrValue::Null => self.fields[field.index()] = None,
            StrValue::Wrong(found) => {
                self.wrong_type.get_or_insert((field, found));
            }
        }
    }
}

enum TsValue<'a> {
    Absent,
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
    Wrong(&'static str),
}

impl<'de: 'a, 'a> Deserialize<'de> for RawEvent<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(RawEventVisitor(std::marker::PhantomData))
    }
}

struct RawEventVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for RawEventVisitor<'a> {
    type Value = RawEvent<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a login event object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<RawEvent<'a>, M::Error> {
        let mut ev = RawEvent::new();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            if key.0 == "timestamp" {
                ev.timestamp = map.next_value::<TsValue<'de>>()?;
            } else if let Some(field) = Field::from_name(&key.0) {
                let value = map.next_value::<StrValue<'de>>()?;
                ev.set_field(field, value);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(ev)
    }
}

/// The fast path: reads the common shape of an event — one flat object whose
/// keys and strings have no escapes and whose numbers are integers — in one
/// pass over bytes validated as UTF-8 once. Returns `None` for anything else
/// (an escape, a nested value, a fraction or exponent, any syntax error),
/// which serde_json then reads: what this accepts, serde_json reads to the
/// same values (tested against it, property by property and by fuzzing), and
/// nothing it cannot read is ever rejected here.
fn scan(payload: &[u8]) -> Option<RawEvent<'_>> {
    let text = std::str::from_utf8(payload).ok()?;
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    let mut ev = RawEvent::new();
    if b.get(i) == Some(&b'}') {
        return (skip_ws(b, i + 1) == b.len()).then_some(ev);
    }
    loop {
        let (key, next) = scan_str(text, i)?;
        i = skip_ws(b, next);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let (value, next) = scan_value(text, i)?;
        if key == "timestamp" {
            ev.timestamp = match value {
                Any::Str(s) => TsValue::Str(s),
                Any::Null => TsValue::Absent,
                Any::Int(n) => TsValue::Int(n),
                Any::Float(f) => TsValue::Float(f),
                Any::Other(k) => TsValue::Wrong(k),
            };
        } else if let Some(field) = Field::from_name(key) {
            ev.set_field(
                field,
                match value {
                    Any::Str(s) => StrValue::Str(s),
                    Any::Null => StrValue::Null,
                    Any::Int(_) | Any::Float(_) => StrValue::Wrong("a number"),
                    Any::Other(k) => StrValue::Wrong(k),
                },
            );
        }
        i = skip_ws(b, next);
        match b.get(i) {
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => return (skip_ws(b, i + 1) == b.len()).then_some(ev),
            _ => return None,
        }
    }
}

/// The index of the first byte at or after `i` that is not JSON whitespace.
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// A string starting at `i` (its opening quote) without escapes or control
/// characters, and the index after its closing quote.
fn scan_str(text: &str, i: usize) -> Option<(&str, usize)> {
    let b = text.as_bytes();
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let start = i + 1;
    let len = memchr::memchr(b'"', &b[start..])?;
    let j = start + len;
    // Without early exit, so that it runs over whole vectors.
    let plain = b[start..j]
        .iter()
        .fold(true, |ok, &c| ok & (c != b'\\') & (c >= 0x20));
    if !plain {
        return None;
    }
    // Both ends are ASCII quotes, so these are character boundaries.
    Some((&text[start..j], j + 1))
}

/// A value at `i` that is a string, null, a boolean or an integer within
/// i64, and the index after it.
fn scan_value(text: &str, i: usize) -> Option<(Any<'_>, usize)> {
    let b = text.as_bytes();
    match *b.get(i)? {
        b'"' => scan_str(text, i).map(|(s, next)| (Any::Str(Cow::Borrowed(s)), next)),
        b'n' => b[i..].starts_with(b"null").then_some((Any::Null, i + 4)),
        b't' => b[i..]
            .starts_with(b"true")
            .then_some((Any::Other("a boolean"), i + 4)),
        b'f' => b[i..]
            .starts_with(b"false")
            .then_some((Any::Other("a boolean"), i + 5)),
        b'-' | b'0'..=b'9' => {
            let negative = b[i] == b'-';
            let start = i + usize::from(negative);
            let mut j = start;
            let mut n: i64 = 0;
            while let Some(&d @ b'0'..=b'9') = b.get(j) {
                // Accumulated negatively so that i64::MIN fits.
                n = n.checked_mul(10)?.checked_sub(i64::from(d - b'0'))?;
                j += 1;
            }
            let digits = j - start;
            // No digits, a leading zero, a fraction or an exponent: serde_json decides.
            if digits == 0
                || (digits > 1 && b[start] == b'0')
                || matches!(b.get(j), Some(b'.' | b'e' | b'E'))
            {
                return None;
            }
            // serde_json reads -0 as a float.
            if negative && n == 0 {
                return None;
            }
            let n = if negative { n } else { n.checked_neg()? };
            Some((Any::Int(n), j))
        }
        _ => None,
    }
}

/// An object key, borrowed when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(CowStrVisitor).map(Key)
    }
}

struct CowStrVisitor;

impl<'de> Visitor<'de> for CowStrVisitor {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// A string field's value: a string, null, or (recorded, not failed) anything else.
enum StrValue<'a> {
    Str(Cow<'a, str>),
    Null,
    Wrong(&'static str),
}

impl<'de: 'a, 'a> Deserialize<'de> for StrValue<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AnyVisitor).map(|v| match v {
            Any::Str(s) => StrValue::Str(s),
            Any::Null => StrValue::Null,
            Any::Int(_) | Any::Float(_) => StrValue::Wrong("a number"),
            Any::Other(k) => StrValue::Wrong(k),
        })
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for TsValue<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(AnyVisitor).map(|v| match v {
            Any::Str(s) => TsValue::Str(s),
            Any::Null => TsValue::Absent,
            Any::Int(i) => TsValue::Int(i),
            Any::Float(f) => TsValue::Float(f),
            Any::Other(k) => TsValue::Wrong(k),
        })
    }
}

/// Any JSON value, keeping only what a field can use; nested values are skipped.
enum Any<'a> {
    Str(Cow<'a, str>),
    Null,
    Int(i64),
    Float(f64),
    Other(&'static str),
}

struct AnyVisitor;

impl<'de> Visitor<'de> for AnyVisitor {
    type Value = Any<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Any::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Any::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Any::Str(Cow::Owned(v)))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Any::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Any::Null)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Any::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(i64::try_from(v).map_or(Any::Float(v as f64), Any::Int))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Any::Float(v))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Any::Other("a boolean"))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Any::Other("an array"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Any::Other("an object"))
    }
}

/// `[events]`: what a valid event must have.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    /// Event fields that must be present and non-null, and `"timestamp"`.
    pub required: Vec<String>,
    /// Timestamps further than this ahead of the wall clock are `bad_timestamp`.
    #[serde(with = "humantime_serde")]
    pub max_future: std::time::Duration,
}

impl EventSettings {
    /// The required event fields, and whether the timestamp is required.
    pub fn required(&self) -> (Vec<Field>, bool) {
        let fields = self.required.iter().filter_map(|n| Field::from_name(n));
        let timestamp = self.required.iter().any(|n| n == "timestamp");
        (fields.collect(), timestamp)
    }

    pub fn check(&self, f: &mut crate::values::Findings) {
        let known = format!("{}, timestamp", Field::names());
        f.names("events.required", &self.required, &known);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> Requirements {
        Requirements {
            fields: vec![Field::UserId],
            timestamp: true,
            not_after_ms: None,
        }
    }

    fn ok(json: &str) -> LoginEvent<'_> {
        parse(json.as_bytes(), &req()).unwrap()
    }

    fn kind(json: &str) -> ErrorKind {
        parse(json.as_bytes(), &req()).unwrap_err().kind
    }

    #[test]
    fn parses_the_exercise_format_borrowing_strings() {
        let json = r#"{"user_id": "424cdd21", "app_version": "2.3.0", "device_type": "android", "ip": "199.172.111.135", "locale": "RU", "device_id": "593-47-5928", "timestamp":"1694479551"}"#;
        let ev = ok(json);
        assert_eq!(ev.get(Field::UserId), Some("424cdd21"));
        assert_eq!(ev.get(Field::Ip), Some("199.172.111.135"));
        assert!(matches!(
            ev.fields[Field::Locale.index()],
            Some(Cow::Borrowed("RU"))
        ));
        assert_eq!(ev.timestamp_ms, Some(1_694_479_551_000));
    }

    #[test]
    fn timestamp_forms_normalise_to_the_same_instant() {
        let forms = [
            "1694479551",
            "1694479551.0",
            "1694479551000",
            "\"1694479551\"",
            "\"1694479551000\"",
            "\" 1694479551.000 \"",
            "\"2023-09-12T00:45:51Z\"",
            "\"2023-09-12T02:45:51+02:00\"",
        ];
        for form in forms {
            let json = format!(r#"{{"user_id":"u","timestamp":{form}}}"#);
            assert_eq!(ok(&json).timestamp_ms, Some(1_694_479_551_000), "{form}");
        }
        let frac = ok(r#"{"user_id":"u","timestamp":1694479551.25}"#);
        assert_eq!(frac.timestamp_ms, Some(1_694_479_551_250));
    }

    #[test]
    fn rfc3339_is_accepted_only_within_the_years_0000_to_9999_in_utc() {
        let ts = |text: &str| {
            parse(
                format!(r#"{{"user_id":"u","timestamp":"{text}"}}"#).as_bytes(),
                &req(),
            )
            .map(|ev| ev.timestamp_ms.unwrap())
            .map_err(|e| e.kind)
        };
        assert_eq!(ts("0000-01-01T00:00:00Z"), Ok(-62_167_219_200_000));
        assert_eq!(ts("9999-12-31T23:59:59.999Z"), Ok(253_402_300_799_999));
        assert_eq!(ts("0000-01-01T01:00:00+01:00"), Ok(-62_167_219_200_000));
        // The year -1 and the year 10000 in UTC.
        assert_eq!(
            ts("0000-01-01T00:00:00+01:00"),
            Err(ErrorKind::BadTimestamp)
        );
        assert_eq!(
            ts("9999-12-31T23:30:00-00:31"),
            Err(ErrorKind::BadTimestamp)
        );
        assert_eq!(ts("9999-12-31T23:59:60Z"), Err(ErrorKind::BadTimestamp));
    }

    #[test]
    fn absent_and_null_optional_fields_are_none_and_unknown_fields_ignored() {
        let ev = ok(r#"{"user_id":"u","ip":null,"timestamp":1,"extra":{"a":[1,2]},"v2":true}"#);
        assert_eq!(ev.get(Field::Ip), None);
        assert_eq!(ev.get(Field::Locale), None);
    }

    #[test]
    fn escaped_strings_are_unescaped() {
        let ev = ok(r#"{"user_id":"a\"b\u00e9","timestamp":1}"#);
        assert_eq!(ev.get(Field::UserId), Some("a\"bé"));
    }

    #[test]
    fn every_invalid_kind_is_classified() {
        assert_eq!(kind("not json"), ErrorKind::NotJson);
        assert_eq!(kind(""), ErrorKind::NotJson);
        assert_eq!(kind(r#"{"user_id":"u","#), ErrorKind::NotJson);
        assert_eq!(
            kind(r#"{"user_id":"u","timestamp":1} trailing"#),
            ErrorKind::NotJson
        );
        assert_eq!(kind("[1,2]"), ErrorKind::NotObject);
        assert_eq!(kind("42"), ErrorKind::NotObject);
        assert_eq!(kind(r#""text""#), ErrorKind::NotObject);
        assert_eq!(kind(r#"{"timestamp":1}"#), ErrorKind::MissingField);
        assert_eq!(
            kind(r#"{"user_id":null,"timestamp":1}"#),
            ErrorKind::MissingField
        );
        assert_eq!(kind(r#"{"user_id":"u"}"#), ErrorKind::MissingField);
        assert_eq!(
            kind(r#"{"user_id":"u","timestamp":"yesterday"}"#),
            ErrorKind::BadTimestamp
        );
        assert_eq!(
            kind(r#"{"user_id":"u","timestamp":-5}"#),
            ErrorKind::BadTimestamp
        );
        assert_eq!(
            kind(r#"{"user_id":"u","timestamp":1e20}"#),
            ErrorKind::BadTimestamp
        );
        assert_eq!(
            kind(r#"{"user_id":"u","timestamp":[1]}"#),
            ErrorKind::BadTimestamp
        );
        assert_eq!(kind(r#"{"user_id":7,"timestamp":1}"#), ErrorKind::WrongType);
        assert_eq!(
            kind(r#"{"user_id":"u","ip":{"v4":"1.2.3.4"},"timestamp":1}"#),
            ErrorKind::WrongType
        );
    }

    #[test]
    fn reasons_name_the_field_but_never_its_value() {
        let err = parse(br#"{"user_id":"u","ip":12345678,"timestamp":1}"#, &req()).unwrap_err();
        assert_eq!(
            err.reason,
            "field `ip` must be a string or null, found a number"
        );
        assert!(!err.reason.contains("12345678"));
    }

    #[test]
    fn timestamp_may_be_optional() {
        let req = Requirements {
            fields: vec![],
            timestamp: false,
            not_after_ms: None,
        };
        let ev = parse(br#"{"ip":"1.2.3.4"}"#, &req).unwrap();
        assert_eq!(ev.timestamp_ms, None);
        assert_eq!(ev.get(Field::UserId), None);
    }

    /// Requirement sets the fast path is compared under.
    fn all_reqs() -> [Requirements; 3] {
        [
            Requirements::default(),
            req(),
            Requirements {
                fields: Field::ALL.to_vec(),
                timestamp: true,
                not_after_ms: Some(1_800_000_000_000),
            },
        ]
    }

    fn same_as_serde(payload: &[u8]) {
        for r in all_reqs() {
            assert_eq!(
                parse(payload, &r),
                parse_with_serde(payload, &r),
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn the_common_shape_takes_the_fast_path_and_reads_as_serde_does() {
        for json in [
            r#"{"user_id":"u1","app_version":"2.3.0","device_type":"iOS","ip":"1.2.3.4","locale":"US","device_id":"d-1","timestamp":"1700000000"}"#,
            r#"{"user_id":"u1","timestamp":1700000000123}"#,
            " {\t\"user_id\" :\r\n\"u\" , \"ip\":null,\"timestamp\":-1 }\n",
            r#"{"user_id":"ü","user_id":"last","x":true,"y":false,"z":null,"timestamp":0}"#,
            r#"{"user_id":"u","ip":12,"ip":"1.2.3.4","timestamp":-9223372036854775808}"#,
            r#"{"user_id":"u","timestamp":9223372036854775807}"#,
            r#"{}"#,
        ] {
            assert!(scan(json.as_bytes()).is_some(), "{json}");
            same_as_serde(json.as_bytes());
        }
    }

    #[test]
    fn every_other_shape_is_left_to_serde() {
        for json in [
            r#"{"user_id":"a\"b","timestamp":1}"#,
            r#"{"user\u005fid":"u","timestamp":1}"#,
            r#"{"user_id":"u","timestamp":1.5}"#,
            r#"{"user_id":"u","timestamp":1e3}"#,
            r#"{"user_id":"u","timestamp":-0}"#,
            r#"{"user_id":"u","timestamp":007}"#,
            r#"{"user_id":"u","timestamp":9223372036854775808}"#,
            r#"{"user_id":"u","timestamp":-9223372036854775809}"#,
            r#"{"user_id":"u","x":[1],"timestamp":1}"#,
            r#"{"user_id":"u","x":{"a":1},"timestamp":1}"#,
            "{\"user_id\":\"a\u{1}b\",\"timestamp\":1}",
            "\u{c}{\"user_id\":\"u\",\"timestamp\":1}",
            r#"{"user_id":"u","timestamp":1} x"#,
            r#"{"user_id":"u","timestamp":1,}"#,
            r#"{"user_id":"u" "timestamp":1}"#,
            r#"{"user_id":"u","timestamp":nul}"#,
            r#"{"user_id":"u","timestamp":-}"#,
            r#"["user_id"]"#,
            "",
        ] {
            assert!(scan(json.as_bytes()).is_none(), "{json}");
            same_as_serde(json.as_bytes());
        }
        let not_utf8 = b"{\"user_id\":\"\xff\",\"timestamp\":1}";
        assert!(scan(not_utf8).is_none());
        same_as_serde(not_utf8);
    }

    #[test]
    fn generated_events_read_the_same_either_way() {
        let mut g = crate::commands::generator::Generator::new(
            crate::commands::generator::GeneratorConfig::new(11),
        );
        let mut fast = 0;
        for _ in 0..2000 {
            let m = g.next_message();
            fast += usize::from(scan(&m.payload).is_some());
            same_as_serde(&m.payload);
        }
        // Only float timestamps and the malformed messages take the slow path.
        assert!(fast > 1500, "{fast} of 2000 on the fast path");
    }

    mod differential {
        use super::*;
        use proptest::prelude::*;

        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("user_id".to_string()),
                Just("ip".to_string()),
                Just("locale".to_string()),
                Just("timestamp".to_string()),
                Just("other".to_string()),
                Just("user\\u005fid".to_string()),
                "[a-z_\\\\\"é\u{1}]{0,6}",
            ]
        }

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-zA-Z0-9 .:é\\\\\"\u{1}]{0,8}".prop_map(|s| format!("\"{s}\"")),
                any::<i64>().prop_map(|n| n.to_string()),
                any::<u64>().prop_map(|n| n.to_string()),
                (0i64..2_000_000_000_000).prop_map(|n| n.to_string()),
                (0i64..2_000_000_000).prop_map(|n| format!("\"{n}\"")),
                Just("-0".to_string()),
                Just("007".to_string()),
                Just("1.5e3".to_string()),
                Just("1700000000.5".to_string()),
                Just("\"2023-11-14T22:13:20Z\"".to_string()),
                Just("null".to_string()),
                Just("true".to_string()),
                Just("false".to_string()),
                Just("[1,\"a\"]".to_string()),
                Just("{\"a\":{}}".to_string()),
            ]
        }

        fn ws() -> impl Strategy<Value = String> {
            "[ \t\n\r\u{c}]{0,2}"
        }

        fn object() -> impl Strategy<Value = Vec<u8>> {
            (
                ws(),
                prop::collection::vec((key(), ws(), ws(), value(), ws()), 0..8),
                ws(),
            )
                .prop_map(|(lead, members, tail)| {
                    let body: Vec<String> = members
                        .into_iter()
                        .map(|(k, w1, w2, v, w3)| format!("\"{k}\"{w1}:{w2}{v}{w3}"))
                        .collect();
                    format!("{lead}{{{}}}{tail}", body.join(",")).into_bytes()
                })
        }

        /// An object, sometimes damaged: cut short, or a byte put in.
        fn payload() -> impl Strategy<Value = Vec<u8>> {
            (object(), any::<u8>(), any::<prop::sample::Index>(), 0u8..4).prop_map(
                |(mut p, byte, at, damage)| {
                    let i = at.index(p.len() + 1);
                    match damage {
                        0 => p.truncate(i),
                        1 => p.insert(i, byte),
                        _ => {}
                    }
                    p
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]
            #[test]
            fn the_fast_path_never_changes_a_result(p in payload()) {
                for r in all_reqs() {
                    prop_assert_eq!(parse(&p, &r), parse_with_serde(&p, &r));
                }
            }
        }
    }
}
