//! Forms of configuration values that the sections share, below every one
//! of them: secrets that are never shown ([`Secret`]), tables of librdkafka
//! properties whose secret values are never shown ([`Properties`]), enum
//! settings written in lowercase ([`choice!`]), optional values written as
//! empty strings, and how an enum value is written ([`name`]).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An enum setting, written in lowercase and read whatever the case, with
/// surrounding spaces ignored.
#[macro_export]
macro_rules! choice {
    ($(#[$doc:meta])* $name:ident { $($variant:ident),+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($variant),+ }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                const ALL: &[$name] = &[$($name::$variant),+];
                let text = <String as serde::Deserialize>::deserialize(d)?;
                let wanted = text.trim().to_lowercase();
                let names = || ALL.iter().map($crate::values::name);
                match ALL.iter().find(|v| $crate::values::name(*v) == wanted) {
                    Some(v) => Ok(*v),
                    None => Err(serde::de::Error::custom(format!(
                        "`{text}` is not one of: {}",
                        names().collect::<Vec<_>>().join(", ")
                    ))),
                }
            }
        }
    };
}

/// How a value of an enum setting is written in configuration.
pub fn name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        _ => String::new(),
    }
}

const REDACTED: &str = "<redacted>";

/// How a secret is shown: `<redacted>`, or nothing when it is empty.
fn redact(value: &str) -> &str {
    if value.is_empty() {
        ""
    } else {
        REDACTED
    }
}

/// A value that is never shown: `Debug` and `Serialize` print it redacted,
/// as they do the secret librdkafka properties of [`Properties`].
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The value itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(redact(&self.0))
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(redact(&self.0))
    }
}

/// A table of librdkafka properties, keys in dotted form. Values of
/// properties whose names mark them as secrets are shown redacted.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Properties(BTreeMap<String, String>);

impl Properties {
    /// Every property as it may be shown.
    fn shown(&self) -> impl Iterator<Item = (&String, &str)> {
        self.0.iter().map(|(k, v)| {
            let secret = ["password", "secret", "key.pem", "token"]
                .iter()
                .any(|s| k.contains(s));
            (k, if secret { redact(v) } else { v.as_str() })
        })
    }
}

impl std::ops::Deref for Properties {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl fmt::Debug for Properties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.shown()).finish()
    }
}

impl Serialize for Properties {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.shown())
    }
}

/// An optional value written as a string; empty means none.
pub mod optional {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::{fmt::Display, str::FromStr};

    pub fn serialize<T: Serialize, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => v.serialize(s),
            None => s.serialize_str(""),
        }
    }

    pub fn deserialize<'de, T: FromStr, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error>
    where
        T::Err: Display,
    {
        match String::deserialize(d)?.trim() {
            "" => Ok(None),
            s => s
                .parse()
                .map(Some)
                .map_err(|e| serde::de::Error::custom(format!("`{s}` is not valid here: {e}"))),
        }
    }
}

/// An optional duration ("500ms", "10s"); empty means none.
pub mod optional_duration {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&v.map_or(String::new(), |d| humantime::format_duration(d).to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let v: Option<humantime::Duration> = super::optional::deserialize(d)?;
        Ok(v.map(Into::into))
    }
}

/// The largest integer setting: the largest TOML integer, so that the
/// printed configuration loads again.
pub const MAX_INT: u64 = i64::MAX as u64;

/// What a section finds wrong with its own keys: each key's path and why.
#[derive(Debug, Default)]
pub struct Findings(pub Vec<(String, String)>);

impl Findings {
    pub fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push((key.into(), message.into()));
    }

    /// A whole number within `min..=max`.
    pub fn bounded(&mut self, key: &str, value: u64, min: u64, max: u64) {
        if value < min {
            self.add(key, format!("must be at least {min}, found {value}"));
        } else if value > max {
            self.add(key, format!("must be at most {max}, found {value}"));
        }
    }

    /// A duration of at least a millisecond (zero would spin).
    pub fn positive(&mut self, key: &str, value: std::time::Duration) {
        if value < std::time::Duration::from_millis(1) {
            self.add(key, "must be at least 1ms");
        }
    }

    /// A list of names, each one of `known` (comma-separated) and none twice.
    pub fn names(&mut self, key: &str, names: &[String], known: &str) {
        let accepted: Vec<&str> = known.split(", ").collect();
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                self.add(key, format!("field `{name}` is listed twice"));
            } else if !accepted.contains(&name.as_str()) {
                self.add(
                    key,
                    format!("`{name}` is not an event field (one of {known})"),
                );
            }
        }
    }
}
