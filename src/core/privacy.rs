//! Keyed pseudonyms for personal data.
//!
//! Counting always runs on raw values, so duplicate counts are exact. Before a
//! value of a pseudonymized field leaves the process (packets, the metrics
//! log, logs, metric labels) it is replaced by HMAC-SHA256(key, value) as hex,
//! truncated to 32 characters (128 bits). Unlike an unkeyed hash, this cannot
//! be reversed by enumerating the IPv4 space; whoever holds the key can still
//! check whether a known value occurs (`login-metrics pseudonym VALUE`).
//!
//! Dead letters leave the process too. With `privacy.dead_letters =
//! "pseudonymized"` (the default) a dead letter's payload is cleaned
//! ([`Pseudonymizer::clean_payload`]) and its key replaced by its pseudonym;
//! `"raw"` keeps the original bytes for reprocessing, and with them the raw
//! values.

use std::borrow::Cow;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::core::event::{Field, FIELD_COUNT};

/// Hex characters kept of the HMAC.
pub const PSEUDONYM_LEN: usize = 32;

/// Replaces the values of configured fields with keyed pseudonyms.
#[derive(Clone)]
pub struct Pseudonymizer {
    /// HMAC state with the key already absorbed; cloned per value.
    mac: Option<Hmac<Sha256>>,
    fields: [bool; FIELD_COUNT],
}

impl std::fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pseudonymizer")
            .field("fields", &self.fields)
            .finish_non_exhaustive()
    }
}

impl Pseudonymizer {
    /// Pseudonymizes `fields` with `key`; with no fields it passes values through.
    pub fn new(key: &[u8], fields: &[Field]) -> Pseudonymizer {
        let mut mask = [false; FIELD_COUNT];
        for f in fields {
            mask[f.index()] = true;
        }
        Pseudonymizer {
            mac: Some(Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length")),
            fields: mask,
        }
    }

    /// Passes every value through unchanged.
    pub fn disabled() -> Pseudonymizer {
        Pseudonymizer {
            mac: None,
            fields: [false; FIELD_COUNT],
        }
    }

    pub fn applies_to(&self, field: Field) -> bool {
        self.mac.is_some() && self.fields[field.index()]
    }

    pub fn is_active(&self) -> bool {
        self.mac.is_some() && self.fields.iter().any(|&f| f)
    }

    /// The pseudonym of `value`, whatever the field.
    pub fn pseudonym(&self, value: &str) -> String {
        self.pseudonym_of_bytes(value.as_bytes())
    }

    /// The pseudonym of bytes that need not be text (a message key); the
    /// same as [`Pseudonymizer::pseudonym`] of the text they spell.
    pub fn pseudonym_of_bytes(&self, value: &[u8]) -> String {
        let mut mac = self.mac.clone().expect("a key is configured");
        mac.update(value);
        let mut hex = hex::encode(mac.finalize().into_bytes());
        hex.truncate(PSEUDONYM_LEN);
        hex
    }

    /// A dead letter's payload as it may leave the process: a JSON object
    /// with the value of every member named after a pseudonymized field
    /// replaced by its pseudonym, at any depth (a producer may nest one),
    /// and the other members and their order kept. A string's pseudonym is
    /// that of its text, as in packets; a number, boolean, array or object
    /// (a `wrong_type` message) is replaced by the pseudonym of its JSON
    /// text; null stays null.
    ///
    /// `None` when the payload is not a JSON object (not JSON, not UTF-8, an
    /// array, a number too large to read, ...): what personal data such
    /// bytes hold, and where, cannot be told, so the caller withholds them.
    /// The result is the same JSON value but for the replaced members:
    /// insignificant whitespace goes, a member given twice keeps the value
    /// the event parser reads (the last), and a number is written as
    /// serde_json writes it.
    pub fn clean_payload(&self, payload: &[u8]) -> Option<Vec<u8>> {
        let mut value: Value = serde_json::from_slice(payload).ok()?;
        if !value.is_object() {
            return None;
        }
        self.clean_value(&mut value);
        serde_json::to_vec(&value).ok()
    }

    fn clean_value(&self, value: &mut Value) {
        match value {
            Value::Object(members) => {
                for (name, v) in members.iter_mut() {
                    match Field::from_name(name) {
                        Some(f) if self.applies_to(f) => self.replace(v),
                        _ => self.clean_value(v),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.clean_value(v)),
            _ => {}
        }
    }

    fn replace(&self, v: &mut Value) {
        let pseudonym = match &*v {
            Value::Null => return,
            Value::String(s) => self.pseudonym(s),
            other => self.pseudonym(&other.to_string()),
        };
        *v = Value::String(pseudonym);
    }

    /// The value as it may leave the process.
    pub fn outward<'a>(&self, field: Field, value: &'a str) -> Cow<'a, str> {
        if self.applies_to(field) {
            Cow::Owned(self.pseudonym(value))
        } else {
            Cow::Borrowed(value)
        }
    }
}

/// `[privacy]`: the fields replaced by pseudonyms, the key, and what dead
/// letters carry.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySettings {
    pub pseudonymize: Vec<Field>,
    /// The HMAC key: `privacy.key`, or else the contents of `privacy.key_file`.
    pub key: crate::values::Secret,
    #[serde(with = "crate::values::optional")]
    pub key_file: Option<std::path::PathBuf>,
    /// Only when `pseudonymize` names fields.
    pub dead_letters: DeadLetters,
}

crate::choice!(
    /// What the dead-letter topic receives when fields are pseudonymized:
    /// the message with their values pseudonymized (a payload that cannot be
    /// cleaned is withheld), or the original bytes and key, raw values
    /// included, for reprocessing.
    DeadLetters { Pseudonymized, Raw }
);

impl PrivacySettings {
    pub fn check(&self, f: &mut crate::values::Findings) {
        let names: Vec<String> = self
            .pseudonymize
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        f.names("privacy.pseudonymize", &names, &Field::names());
        if !names.is_empty() && self.key.is_empty() && self.key_file.is_none() {
            f.add(
                "privacy.key",
                "privacy.pseudonymize names fields but no key is set (privacy.key or privacy.key_file)",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_per_key_different_across_keys() {
        let a = Pseudonymizer::new(b"key-one", &[Field::Ip]);
        let a2 = Pseudonymizer::new(b"key-one", &[Field::Ip]);
        let b = Pseudonymizer::new(b"key-two", &[Field::Ip]);
        let p = a.pseudonym("10.0.0.1");
        assert_eq!(p.len(), PSEUDONYM_LEN);
        assert!(p.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(p, a2.pseudonym("10.0.0.1"));
        assert_ne!(p, b.pseudonym("10.0.0.1"));
        assert_ne!(p, a.pseudonym("10.0.0.2"));
    }

    #[test]
    fn matches_the_published_hmac_test_vector() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let p = Pseudonymizer::new(b"Jefe", &[]);
        assert_eq!(
            p.pseudonym("what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c7"
        );
    }

    fn cleaned(p: &Pseudonymizer, payload: &str) -> Option<String> {
        p.clean_payload(payload.as_bytes())
            .map(|b| String::from_utf8(b).unwrap())
    }

    #[test]
    fn a_dead_letter_object_keeps_all_but_the_pseudonymized_values() {
        let p = Pseudonymizer::new(b"k", &[Field::Ip, Field::DeviceId]);
        let (ip, dev) = (p.pseudonym("10.0.0.1"), p.pseudonym("593-47-5928"));
        // Member order kept; whitespace goes; other fields untouched.
        assert_eq!(
            cleaned(
                &p,
                r#" {"user_id":"u1", "ip": "10.0.0.1","device_id":"593-47-5928","timestamp":1694479551,"locale":null} "#
            )
            .unwrap(),
            format!(r#"{{"user_id":"u1","ip":"{ip}","device_id":"{dev}","timestamp":1694479551,"locale":null}}"#)
        );
        // Written with escapes, it is still the field the parser reads.
        assert_eq!(
            cleaned(&p, r#"{"\u0069p":"10.0.0.\u0031"}"#).unwrap(),
            format!(r#"{{"ip":"{ip}"}}"#)
        );
        // Wrong types: a number as its text, anything else as its JSON text; null kept.
        assert_eq!(
            cleaned(&p, r#"{"ip":1234,"device_id":["593-47-5928"]}"#).unwrap(),
            format!(
                r#"{{"ip":"{}","device_id":"{}"}}"#,
                p.pseudonym("1234"),
                p.pseudonym(r#"["593-47-5928"]"#)
            )
        );
        assert_eq!(cleaned(&p, r#"{"ip":null}"#).unwrap(), r#"{"ip":null}"#);
        // Nested, and given twice: no raw value survives.
        let out = cleaned(
            &p,
            r#"{"ip":"10.0.0.9","meta":{"ip":"10.0.0.1","list":[{"device_id":"593-47-5928"}]},"ip":"10.0.0.1"}"#,
        )
        .unwrap();
        assert_eq!(
            out,
            format!(r#"{{"ip":"{ip}","meta":{{"ip":"{ip}","list":[{{"device_id":"{dev}"}}]}}}}"#)
        );
        // A field not configured is kept.
        let only_ip = Pseudonymizer::new(b"k", &[Field::Ip]);
        assert_eq!(
            cleaned(&only_ip, r#"{"device_id":"593-47-5928"}"#).unwrap(),
            r#"{"device_id":"593-47-5928"}"#
        );
    }

    #[test]
    fn a_dead_letter_that_is_not_a_json_object_cannot_be_cleaned() {
        let p = Pseudonymizer::new(b"k", &[Field::Ip]);
        for payload in [
            &b"{\"ip\":\"10.0.0.1\""[..],
            b"not json 10.0.0.1",
            b"[{\"ip\":\"10.0.0.1\"}]",
            b"\"10.0.0.1\"",
            b"{\"ip\":\"10.0.0.1\"} trailing",
            b"{\"ip\":\"10.0.0.\xff\"}",
            b"{\"ip\":\"10.0.0.1\",\"n\":1e400}",
            b"",
        ] {
            assert_eq!(p.clean_payload(payload), None, "{payload:?}");
        }
    }

    #[test]
    fn a_key_is_pseudonymized_as_bytes() {
        let p = Pseudonymizer::new(b"k", &[Field::UserId]);
        assert_eq!(p.pseudonym_of_bytes(b"u1"), p.pseudonym("u1"));
        assert_eq!(p.pseudonym_of_bytes(b"\xff").len(), PSEUDONYM_LEN);
    }

    #[test]
    fn only_configured_fields_change() {
        let p = Pseudonymizer::new(b"k", &[Field::Ip, Field::DeviceId]);
        assert_ne!(p.outward(Field::Ip, "1.2.3.4"), "1.2.3.4");
        assert_eq!(p.outward(Field::UserId, "u1"), "u1");
        assert_eq!(
            Pseudonymizer::disabled().outward(Field::Ip, "1.2.3.4"),
            "1.2.3.4"
        );
    }
}
