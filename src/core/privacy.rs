//! Keyed pseudonyms for personal data.
//!
//! Counting always runs on raw values, so duplicate counts are exact. Before a
//! value of a pseudonymized field leaves the process (packets, the metrics
//! log, logs, metric labels) it is replaced by HMAC-SHA256(key, value) as hex,
//! truncated to 32 characters (128 bits). Unlike an unkeyed hash, this cannot
//! be reversed by enumerating the IPv4 space; whoever holds the key can still
//! check whether a known value occurs (`login-metrics pseudonym VALUE`).

use std::borrow::Cow;

use hmac::{Hmac, Mac};
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
        let mut mac = self.mac.clone().expect("a key is configured");
        mac.update(value.as_bytes());
        let mut hex = hex::encode(mac.finalize().into_bytes());
        hex.truncate(PSEUDONYM_LEN);
        hex
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

/// `[privacy]`: the fields replaced by pseudonyms, and the key.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySettings {
    pub pseudonymize: Vec<Field>,
    /// The HMAC key: `privacy.key`, or else the contents of `privacy.key_file`.
    pub key: crate::values::Secret,
    #[serde(with = "crate::values::optional")]
    pub key_file: Option<std::path::PathBuf>,
}

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
