//! Layered, validated configuration, deserialized into typed sections.
//!
//! Three layers, last wins: the defaults embedded from `config/default.toml`,
//! the file given with `--config`, and environment variables
//! `LOGIN_METRICS__SECTION__KEY`. The `config` crate reads each layer and
//! merges them; serde turns the merged tree into [`Settings`], whose sections
//! deny unknown keys; each section then checks its own keys, and
//! [`Settings::validate`] what spans sections. The sections live with the
//! component they configure (`[kafka]` in [`crate::kafka`], `[batch]` in
//! [`crate::core::grouping::settings`], ...), this module is the reader.
//!
//! Each layer is normalised on its own before the merge: librdkafka property
//! names are written with dots in files and with underscores in variables, so
//! both become the dotted form and the later layer always wins. Variables are
//! strings; each is read as the type of its default (a number, or a list as
//! JSON or comma-separated), so the defaults double as the schema.
//!
//! Loading never stops at the first problem: a key that does not deserialize
//! is reported with its path and put back to its default, an unknown key is
//! reported and dropped, and deserialization runs again, so an operator fixes
//! a configuration in one go.

use std::fmt;
use std::path::Path;
use std::sync::OnceLock;

use config::{Map, Source, Value as CValue, ValueKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_path_to_error::Segment;

pub use crate::core::analysis::AnalysisSettings;
pub use crate::core::event::EventSettings;
pub use crate::core::grouping::settings::{BatchMode, BatchSettings, LateSetting};
pub use crate::core::privacy::PrivacySettings;
pub use crate::kafka::{Compression, KafkaSettings, OffsetReset};
pub use crate::scale::ScaleSettings;
pub use crate::sink::delivery::{DeliverySettings, Guarantee};
pub use crate::sink::metrics_log::MetricsLogSettings;
pub use crate::telemetry::{LogFormat, LogSettings, TelemetrySettings};
use crate::values::Findings;
pub use crate::values::{name, Properties, Secret};

/// The embedded defaults; also the list of accepted keys and their types.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "LOGIN_METRICS";

/// The effective configuration of one process. Each key is documented in
/// `config/default.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub delivery: DeliverySettings,
    pub batch: BatchSettings,
    pub scale: ScaleSettings,
    pub analysis: AnalysisSettings,
    pub events: EventSettings,
    pub metrics_log: MetricsLogSettings,
    pub log: LogSettings,
    pub telemetry: TelemetrySettings,
    pub privacy: PrivacySettings,
}

/// One thing wrong with the configuration, named by its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

/// Every problem found while loading a configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "invalid configuration ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  - {}: {}", p.key, p.message)?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// Records a problem, once per key (the first one found is the cause).
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        let key = key.into();
        if !self.problems.iter().any(|p| p.key == key) {
            let message = message.into();
            self.problems.push(Problem { key, message });
        }
    }
}

const BRACKETED_KEY: &str = "unknown key (no key holds `[` or `]`)";

impl Settings {
    /// Loads defaults, then `file`, then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given explicitly (tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        if let Some(path) = file.filter(|p| !p.is_file()) {
            let mut e = ConfigError { problems: vec![] };
            e.add(
                "--config",
                format!("{} is not a readable file", path.display()),
            );
            return Err(e);
        }
        let file = file.map(|p| config::File::from(p).format(config::FileFormat::Toml));
        Self::load_layers(
            file.map(|f| (Box::new(f) as Box<dyn Source>, "--config")),
            env,
        )
    }

    /// As [`Settings::load_with_env`], with the `--config` layer given as TOML
    /// text instead of a file, so that no file but `privacy.key_file` is read
    /// and the process environment is untouched (tests, fuzzing).
    pub fn load_from_str(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let file = config::File::from_str(text, config::FileFormat::Toml);
        Self::load_layers(Some((Box::new(file), "the configuration text")), env)
    }

    fn load_layers(
        file: Option<(Box<dyn Source>, &str)>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut errors = ConfigError { problems: vec![] };
        let mut tree = merged(file, env, &mut errors).map_err(|e| {
            let mut errors = ConfigError { problems: vec![] };
            errors.add("--config", e.to_string());
            errors
        })?;
        coerce(&mut tree, defaults());
        let mut settings = deserialize(tree, &mut errors);
        settings.metrics_log.expand_host(&crate::kafka::host_name());
        settings.validate(&mut errors);
        settings.read_key_file(&mut errors);
        match errors.problems.is_empty() {
            true => Ok(settings),
            false => Err(errors),
        }
    }

    /// Each section's checks of its own keys, then what spans sections.
    fn validate(&self, e: &mut ConfigError) {
        let mut f = Findings::default();
        self.kafka.check(&mut f);
        self.batch.check(&mut f);
        self.analysis.check(&mut f);
        self.events.check(&mut f);
        self.metrics_log.check(&mut f);
        self.log.check(&mut f);
        self.telemetry.check(&mut f);
        self.privacy.check(&mut f);
        if self.batch.mode == BatchMode::Window && !self.events.required().1 {
            f.add(
                "events.required",
                "must include \"timestamp\" in window mode (batch.mode = \"window\"): an event without a time has no window",
            );
        }
        if self.delivery.guarantee == Guarantee::ExactlyOnce {
            let txn = crate::kafka::transaction_timeout(&self.kafka);
            if self.kafka.delivery_timeout > txn {
                f.add(
                    "kafka.delivery_timeout",
                    format!(
                        "must not exceed the producer's transaction.timeout.ms ({} ms) with delivery.guarantee = \"exactly_once\": a record may not outlive its transaction",
                        txn.as_millis()
                    ),
                );
            }
        }
        if self.scale.merge {
            if self.batch.mode != BatchMode::Window {
                f.add(
                    "scale.merge",
                    "needs batch.mode = \"window\": arrival batches are what one instance read, not a question about the data that several can answer together",
                );
            }
            if self.delivery.guarantee == Guarantee::ExactlyOnce {
                f.add(
                    "scale.merge",
                    "is not available with delivery.guarantee = \"exactly_once\" in this version: the merge stage commits at least once",
                );
            }
        }
        for (key, message) in f.0 {
            e.add(key, message);
        }
    }

    /// Takes the privacy key from `privacy.key_file` when `privacy.key` is empty.
    fn read_key_file(&mut self, e: &mut ConfigError) {
        let Some(path) = self
            .privacy
            .key_file
            .as_ref()
            .filter(|_| self.privacy.key.is_empty())
        else {
            return;
        };
        match std::fs::read_to_string(path) {
            Ok(s) if !s.trim().is_empty() => self.privacy.key = Secret::new(s.trim()),
            Ok(_) => e.add("privacy.key_file", format!("{} is empty", path.display())),
            Err(err) => e.add(
                "privacy.key_file",
                format!("cannot read {}: {err}", path.display()),
            ),
        }
    }

    /// The settings besides the analysis's that change what a packet holds,
    /// as one line for packet ids ([`crate::core::packet::Identity::with_rules`]).
    pub fn packet_rules(&self) -> String {
        let b = &self.batch;
        let d = |d: std::time::Duration| d.as_millis().to_string();
        format!(
            "mode={};max_events={};max_span={};max_wait={};hop={};grace={};late={};idle={};required={};max_future={}",
            crate::values::name(&b.mode),
            b.max_events,
            d(b.max_span),
            d(b.max_wait),
            b.hop.map(d).unwrap_or_default(),
            d(b.grace),
            crate::values::name(&b.late),
            d(b.idle),
            self.events.required.join("+"),
            d(self.events.max_future),
        ) + if self.scale.merge { ";merge" } else { "" }
    }

    /// The effective configuration as TOML, secrets redacted; it loads again.
    pub fn redacted_toml(&self) -> String {
        toml::to_string_pretty(self).expect("settings as TOML")
    }

    /// The effective configuration on one line, `section.key=value` for
    /// each key (lists as JSON), secrets redacted: for the start-up log.
    pub fn redacted_summary(&self) -> String {
        fn flatten(prefix: &str, v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(map) => map.iter().for_each(|(k, v)| {
                    let key = match prefix {
                        "" => k.clone(),
                        _ => format!("{prefix}.{k}"),
                    };
                    flatten(&key, v, out)
                }),
                Value::String(s) => out.push(format!("{prefix}={s}")),
                other => out.push(format!("{prefix}={other}")),
            }
        }
        let mut out = Vec::new();
        let value = serde_json::to_value(self).expect("settings serialize");
        flatten("", &value, &mut out);
        out.join(" ")
    }
}

/// The merged key tree of the defaults, the file layer and the environment.
fn merged(
    file: Option<(Box<dyn Source>, &str)>,
    env: impl IntoIterator<Item = (String, String)>,
    e: &mut ConfigError,
) -> Result<Value, config::ConfigError> {
    let defaults = config::File::from_str(DEFAULT_TOML, config::FileFormat::Toml);
    let mut builder =
        config::Config::builder().add_source(Layer::of(&defaults, "config/default.toml", e)?);
    if let Some((file, name)) = file {
        builder = builder.add_source(Layer::of(file.as_ref(), name, e)?);
    }
    let prefix = format!("{ENV_PREFIX}__");
    let mut vars = Map::new();
    for (k, v) in env.into_iter().filter(|(k, _)| k.starts_with(&prefix)) {
        match k.contains(['[', ']']) {
            // The variable's name is the only name such a key has.
            true => e.add(k, BRACKETED_KEY),
            false => drop(vars.insert(k, v)),
        }
    }
    let env = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        .source(Some(vars));
    builder = builder.add_source(Layer::of(&env, "the environment", e)?);
    builder.build()?.try_deserialize::<Value>()
}

/// One layer, read and normalised on its own before the `config` crate
/// merges it over the layers below: variables' dotted paths as nested
/// tables, librdkafka property names in dotted form, no bracketed keys.
#[derive(Debug, Clone)]
struct Layer(Map<String, CValue>);

impl Layer {
    fn of(
        source: &dyn Source,
        name: &str,
        e: &mut ConfigError,
    ) -> Result<Layer, config::ConfigError> {
        let mut root = CValue::new(None, Map::<String, CValue>::new());
        for (key, value) in source.collect()? {
            // The config crate reads `a[99999999999]` as a path with an
            // array index and grows an array to that length.
            if key.contains(['[', ']']) {
                e.add(key, BRACKETED_KEY);
                continue;
            }
            let nested = key.rsplit('.').fold(value, |v, part| {
                CValue::new(None, Map::from_iter([(part.to_string(), v)]))
            });
            merge(&mut root, nested);
        }
        let ValueKind::Table(mut root) = root.kind else {
            unreachable!("a table")
        };
        if let Some(ValueKind::Table(kafka)) = root.get_mut("kafka").map(|v| &mut v.kind) {
            for (table, props) in kafka.iter_mut() {
                let ValueKind::Table(props) = &mut props.kind else {
                    continue;
                };
                if !["client", "consumer", "producer"].contains(&table.as_str()) {
                    continue;
                }
                // librdkafka property names never contain underscores, so
                // the mapping is unambiguous; one layer may not use both.
                let mut dotted = Map::new();
                for (k, v) in std::mem::take(props) {
                    if dotted.insert(k.replace('_', "."), v).is_some() {
                        let key = format!("kafka.{table}.{}", k.replace('_', "."));
                        e.add(key, format!("{name} sets this property twice, spelled with dots and with underscores; keep one"));
                    }
                }
                *props = dotted;
            }
        }
        Ok(Layer(root))
    }
}

fn merge(into: &mut CValue, from: CValue) {
    match (&mut into.kind, from.kind) {
        (ValueKind::Table(a), ValueKind::Table(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => drop(a.insert(k, v)),
                }
            }
        }
        (slot, kind) => *slot = kind,
    }
}

impl Source for Layer {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, CValue>, config::ConfigError> {
        Ok(self.0.clone())
    }
}

/// The key tree of the embedded defaults: the types values are read as.
fn defaults() -> &'static Value {
    static DEFAULTS: OnceLock<Value> = OnceLock::new();
    DEFAULTS.get_or_init(|| toml::from_str(DEFAULT_TOML).expect("config/default.toml is valid"))
}

/// Reads strings (all that variables hold) as the type of their default:
/// a whole number, or a list as JSON or separated by commas. Numbers and
/// booleans become strings where a string is expected, and in the librdkafka
/// property tables, whose keys have no default.
fn coerce(value: &mut Value, default: &Value) {
    match (value, default) {
        (Value::Object(map), Value::Object(schema)) => {
            for (k, v) in map.iter_mut() {
                coerce(v, schema.get(k).unwrap_or(&Value::String(String::new())));
            }
        }
        (v @ Value::String(_), Value::Number(_)) => {
            if let Some(n) = v.as_str().and_then(|s| s.trim().parse::<u64>().ok()) {
                *v = Value::from(n);
            }
        }
        (v @ Value::String(_), Value::Bool(_)) => {
            match v.as_str().map(|s| s.trim().to_ascii_lowercase()).as_deref() {
                Some("true") => *v = Value::Bool(true),
                Some("false") => *v = Value::Bool(false),
                _ => {}
            }
        }
        (v @ Value::String(_), Value::Array(_)) => {
            let s = v.as_str().unwrap_or_default().trim().to_string();
            *v = match s.starts_with('[') {
                true => serde_json::from_str(&s).unwrap_or(Value::String(s)),
                false => s
                    .split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(Value::from)
                    .collect(),
            };
        }
        (v @ (Value::Number(_) | Value::Bool(_)), Value::String(_)) => {
            *v = Value::String(v.to_string())
        }
        // Surrounding spaces are never meant: a group id, a topic or a key
        // with a trailing newline from a secret file would be another one.
        (Value::String(s), Value::String(_)) => *s = s.trim().to_string(),
        (Value::Array(items), Value::Array(d)) => {
            let item = d.first().cloned().unwrap_or(Value::String(String::new()));
            for v in items {
                coerce(v, &item);
            }
        }
        _ => {}
    }
}

/// Deserializes the merged tree; each key that fails is reported and put
/// back to its default (an unknown key is dropped) until the rest loads.
fn deserialize(mut tree: Value, e: &mut ConfigError) -> Settings {
    loop {
        let err = match serde_path_to_error::deserialize::<_, Settings>(&tree) {
            Ok(s) => return s,
            Err(err) => err,
        };
        let message = err.inner().to_string();
        let mut path: Vec<Segment> = err.path().iter().cloned().collect();
        let unknown = message
            .strip_prefix("unknown field `")
            .and_then(|m| m.split_once('`'));
        // A problem inside a list is the list item's (a slice, a field).
        if let Some(i) = path.iter().position(|s| matches!(s, Segment::Seq { .. })) {
            path.truncate(i + 1);
        }
        let key = path.iter().fold(String::new(), |key, s| match s {
            Segment::Map { key: k } if key.is_empty() => k.clone(),
            Segment::Map { key: k } => format!("{key}.{k}"),
            Segment::Seq { index } => format!("{key}[{index}]"),
            _ => key,
        });
        let keys: Vec<&str> = path
            .iter()
            .filter_map(|s| match s {
                Segment::Map { key } => Some(key.as_str()),
                _ => None,
            })
            .collect();
        let Some((last, parents)) = keys.split_last() else {
            break;
        };
        let schema = parents.iter().try_fold(defaults(), |v, k| v.get(*k));
        match unknown {
            Some(_) => {
                let accepted = schema
                    .and_then(Value::as_object)
                    .map(|m| m.keys().cloned().collect::<Vec<_>>());
                e.add(
                    key,
                    format!(
                        "unknown key (accepted here: {})",
                        accepted.unwrap_or_default().join(", ")
                    ),
                );
            }
            None => e.add(key, message),
        }
        let default = schema.and_then(|v| v.get(*last)).cloned();
        let Some(Value::Object(parent)) = parents.iter().try_fold(&mut tree, |v, k| v.get_mut(*k))
        else {
            break;
        };
        match default {
            Some(d) if parent.get(*last) != Some(&d) => drop(parent.insert(last.to_string(), d)),
            None if parent.remove(*last).is_some() => {}
            _ => break,
        }
    }
    // Nothing was left to put back, which the defaults underneath prevent.
    toml::from_str(DEFAULT_TOML).expect("the defaults load")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_windows_need_window_mode_and_at_least_once_naming_the_key() {
        let env = |extra: &[(&str, &str)]| -> Vec<(String, String)> {
            extra
                .iter()
                .map(|(k, v)| (format!("LOGIN_METRICS__{k}"), v.to_string()))
                .collect()
        };
        let s = Settings::load_with_env(None, env(&[("SCALE__MERGE", "true")])).unwrap();
        assert!(s.scale.merge, "a boolean from the environment");
        assert!(s.packet_rules().ends_with(";merge"));
        for bad in [
            vec![("SCALE__MERGE", "true"), ("BATCH__MODE", "arrival")],
            vec![
                ("SCALE__MERGE", "true"),
                ("DELIVERY__GUARANTEE", "exactly_once"),
            ],
        ] {
            let e = Settings::load_with_env(None, env(&bad)).unwrap_err();
            assert_eq!(e.problems.len(), 1, "{e}");
            assert_eq!(e.problems[0].key, "scale.merge", "{e}");
        }
        let e = Settings::load_with_env(None, env(&[("SCALE__MERGE", "yes")])).unwrap_err();
        assert_eq!(e.problems[0].key, "scale.merge", "{e}");
    }
    use crate::core::event::Field;
    use std::time::Duration;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn keys(err: ConfigError) -> Vec<String> {
        err.problems.into_iter().map(|p| p.key).collect()
    }

    #[test]
    fn defaults_load() {
        let s = Settings::load_with_env(None, env(&[])).unwrap();
        assert_eq!(s.kafka.bootstrap_servers, "localhost:29092");
        assert_eq!(s.kafka.group_id, "login-metrics");
        assert_eq!(s.kafka.input_topic, "user-login");
        assert_eq!(s.kafka.output_topic, "login-metrics");
        assert_eq!(s.kafka.dlq_topic, "user-login-dlq");
        assert_eq!(s.kafka.compression, Compression::Gzip);
        assert_eq!(s.batch.max_events, 10_000);
        assert_eq!(s.batch.max_span, Duration::from_secs(10));
        assert_eq!(s.batch.max_wait, Duration::from_secs(10));
        assert_eq!(s.analysis.slices.len(), 7);
        assert_eq!(s.analysis.slices[1], vec![Field::UserId, Field::Ip]);
        assert_eq!(s.analysis.top, 100);
        assert_eq!(s.events.required(), (vec![Field::UserId], true));
        assert_eq!(
            s.metrics_log.path.as_deref(),
            Some(Path::new("login-metrics.log"))
        );
        assert_eq!(s.log.format, LogFormat::Text);
    }

    #[test]
    fn environment_overrides_and_maps_property_names() {
        let s = Settings::load_with_env(
            None,
            env(&[
                ("LOGIN_METRICS__KAFKA__BOOTSTRAP_SERVERS", "kafka:9092"),
                ("LOGIN_METRICS__BATCH__MAX_EVENTS", "500"),
                ("LOGIN_METRICS__BATCH__MAX_WAIT", "250ms"),
                (
                    "LOGIN_METRICS__ANALYSIS__SLICES",
                    r#"[["ip"],["locale","device_type"]]"#,
                ),
                (
                    "LOGIN_METRICS__KAFKA__CONSUMER__MAX_POLL_INTERVAL_MS",
                    "10000",
                ),
                ("LOGIN_METRICS__METRICS_LOG__PATH", ""),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(s.kafka.bootstrap_servers, "kafka:9092");
        assert_eq!(s.batch.max_events, 500);
        assert_eq!(s.batch.max_wait, Duration::from_millis(250));
        assert_eq!(
            s.analysis.slices,
            vec![vec![Field::Ip], vec![Field::Locale, Field::DeviceType]]
        );
        assert_eq!(s.kafka.consumer["max.poll.interval.ms"], "10000");
        assert!(s.metrics_log.path.is_none());
    }

    #[test]
    fn file_layer_applies_and_every_problem_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            "[batch]\nmax_events = 0\nmax_span = \"ten seconds\"\nmax_evnts = 3\n[analysis]\nslices = [[\"ip\", \"colour\"]]\n[nope]\nx = 1\n",
        )
        .unwrap();
        let err = Settings::load_with_env(Some(&path), env(&[])).unwrap_err();
        let keys = keys(err.clone());
        for expected in [
            "batch.max_events",
            "batch.max_span",
            "batch.max_evnts",
            "analysis.slices[0]",
            "nope",
        ] {
            assert!(
                keys.contains(&expected.to_string()),
                "{expected} missing in {err}"
            );
        }
        assert!(err
            .to_string()
            .contains("batch.max_events: must be at least 1"));
    }

    #[test]
    fn unknown_environment_key_is_rejected() {
        let err = Settings::load_with_env(None, env(&[("LOGIN_METRICS__KAFKA__TOPIC", "x")]))
            .unwrap_err();
        assert_eq!(keys(err), vec!["kafka.topic"]);
    }

    #[test]
    fn reserved_properties_cannot_be_overridden() {
        let err = Settings::load_with_env(
            None,
            env(&[("LOGIN_METRICS__KAFKA__CONSUMER__ENABLE_AUTO_COMMIT", "true")]),
        )
        .unwrap_err();
        assert_eq!(keys(err), vec!["kafka.consumer.enable.auto.commit"]);
    }

    #[test]
    fn cooperative_rebalancing_is_refused_naming_the_key() {
        let err = Settings::load_with_env(
            None,
            env(&[(
                "LOGIN_METRICS__KAFKA__CONSUMER__PARTITION_ASSIGNMENT_STRATEGY",
                "cooperative-sticky",
            )]),
        )
        .unwrap_err();
        assert_eq!(
            keys(err),
            vec!["kafka.consumer.partition.assignment.strategy"]
        );
    }

    #[test]
    fn the_incremental_consumer_group_protocol_is_refused_naming_the_key() {
        let err = Settings::load_with_env(
            None,
            env(&[
                ("LOGIN_METRICS__KAFKA__CONSUMER__GROUP_PROTOCOL", "consumer"),
                ("LOGIN_METRICS__KAFKA__CLIENT__GROUP_PROTOCOL", "CONSUMER"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("incremental"), "{err}");
        assert_eq!(
            keys(err),
            vec![
                "kafka.client.group.protocol",
                "kafka.consumer.group.protocol"
            ]
        );
        Settings::load_with_env(
            None,
            env(&[("LOGIN_METRICS__KAFKA__CONSUMER__GROUP_PROTOCOL", "classic")]),
        )
        .unwrap();
    }

    #[test]
    fn exactly_once_bounds_the_delivery_timeout_by_the_transaction_timeout() {
        let eo = ("LOGIN_METRICS__DELIVERY__GUARANTEE", "exactly_once");
        let s = Settings::load_with_env(None, env(&[eo])).unwrap();
        assert_eq!(s.delivery.guarantee, Guarantee::ExactlyOnce);
        let long = ("LOGIN_METRICS__KAFKA__DELIVERY_TIMEOUT", "90s");
        let err = Settings::load_with_env(None, env(&[eo, long])).unwrap_err();
        assert!(err.to_string().contains("60000 ms"), "{err}");
        assert_eq!(keys(err), vec!["kafka.delivery_timeout"]);
        // At least once has no transaction to outlive; a longer transaction
        // timeout makes room.
        Settings::load_with_env(None, env(&[long])).unwrap();
        Settings::load_with_env(
            None,
            env(&[
                eo,
                long,
                (
                    "LOGIN_METRICS__KAFKA__PRODUCER__TRANSACTION_TIMEOUT_MS",
                    "120000",
                ),
            ]),
        )
        .unwrap();
    }

    #[test]
    fn the_transactional_id_and_an_unknown_guarantee_are_refused_naming_the_key() {
        let err = Settings::load_with_env(
            None,
            env(&[("LOGIN_METRICS__KAFKA__PRODUCER__TRANSACTIONAL_ID", "x")]),
        )
        .unwrap_err();
        assert_eq!(keys(err), vec!["kafka.producer.transactional.id"]);
        let err = Settings::load_with_env(
            None,
            env(&[("LOGIN_METRICS__DELIVERY__GUARANTEE", "exactly-once")]),
        )
        .unwrap_err();
        assert_eq!(keys(err), vec!["delivery.guarantee"]);
    }

    #[test]
    fn group_instance_id_is_refused_naming_kafka_instance_name() {
        let err = Settings::load_with_env(
            None,
            env(&[("LOGIN_METRICS__KAFKA__CONSUMER__GROUP_INSTANCE_ID", "a")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("kafka.instance_name"), "{err}");
        assert_eq!(keys(err), vec!["kafka.consumer.group.instance.id"]);
    }

    #[test]
    fn an_instance_name_kafka_would_refuse_is_rejected() {
        for bad in ["ingest 1", "..", "ingestér", &"i".repeat(250)] {
            let err =
                Settings::load_with_env(None, env(&[("LOGIN_METRICS__KAFKA__INSTANCE_NAME", bad)]))
                    .unwrap_err();
            assert_eq!(keys(err), vec!["kafka.instance_name"], "{bad:?}");
        }
        let s = Settings::load_with_env(
            None,
            env(&[("LOGIN_METRICS__KAFKA__INSTANCE_NAME", "eu-1.ingest_2")]),
        )
        .unwrap();
        assert_eq!(s.kafka.instance_name, "eu-1.ingest_2");
        assert_eq!(
            Settings::load_with_env(None, env(&[]))
                .unwrap()
                .kafka
                .instance_name,
            ""
        );
    }

    #[test]
    fn an_environment_property_reaches_the_settings_in_dotted_form() {
        let s = Settings::load_with_env(
            None,
            env(&[
                ("LOGIN_METRICS__KAFKA__PRODUCER__COMPRESSION_LEVEL", "9"),
                ("LOGIN_METRICS__KAFKA__CONSUMER__SASL_PASSWORD", "rotated"),
            ]),
        )
        .unwrap();
        assert_eq!(s.kafka.producer["compression.level"], "9");
        assert_eq!(s.kafka.consumer["sasl.password"], "rotated");
    }

    #[test]
    fn layers_merge_one_key_per_property_with_the_later_layer_winning() {
        let mut errors = ConfigError { problems: vec![] };
        let merged = merged(
            None,
            env(&[("LOGIN_METRICS__KAFKA__PRODUCER__COMPRESSION_LEVEL", "9")]),
            &mut errors,
        )
        .unwrap();
        assert!(errors.problems.is_empty());
        assert_eq!(
            merged["kafka"]["producer"],
            serde_json::json!({"compression.level": "9"})
        );
    }

    #[test]
    fn a_layer_spelling_one_property_twice_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[kafka.producer]\n\"linger.ms\" = \"5\"\nlinger_ms = \"50\"\n",
        )
        .unwrap();
        let err = Settings::load_with_env(Some(&path), env(&[])).unwrap_err();
        assert_eq!(keys(err), vec!["kafka.producer.linger.ms"]);
    }

    #[test]
    fn configuration_text_loads_as_a_file_does() {
        let s = Settings::load_from_str(
            "[batch]\nmode = \"arrival\"\nmax_events = 7\n",
            env(&[("LOGIN_METRICS__BATCH__MAX_EVENTS", "8")]),
        )
        .unwrap();
        assert_eq!(s.batch.mode, BatchMode::Arrival);
        assert_eq!(s.batch.max_events, 8);
        let err = Settings::load_from_str("[batch\n", env(&[])).unwrap_err();
        assert_eq!(keys(err), vec!["--config"]);
    }

    #[test]
    fn integers_are_bounded_so_the_printed_configuration_loads() {
        // u32::MAX + 1 attempts once wrapped to 0 attempts.
        let err = Settings::load_with_env(
            None,
            env(&[("LOGIN_METRICS__KAFKA__DELIVERY_ATTEMPTS", "4294967296")]),
        )
        .unwrap_err();
        assert_eq!(keys(err), vec!["kafka.delivery_attempts"]);
        // Beyond the largest TOML integer, the printed configuration did not load.
        let err = Settings::load_with_env(
            None,
            env(&[
                (
                    "LOGIN_METRICS__METRICS_LOG__MAX_BYTES",
                    "9223372036854775808",
                ),
                ("LOGIN_METRICS__BATCH__MAX_EVENTS", "18446744073709551615"),
            ]),
        )
        .unwrap_err();
        assert_eq!(keys(err), vec!["batch.max_events", "metrics_log.max_bytes"]);
        let s = Settings::load_with_env(
            None,
            env(&[(
                "LOGIN_METRICS__METRICS_LOG__MAX_BYTES",
                "9223372036854775807",
            )]),
        )
        .unwrap();
        let again = Settings::load_from_str(&s.redacted_toml(), env(&[])).unwrap();
        assert_eq!(again.metrics_log.max_bytes, i64::MAX as u64);
    }

    #[test]
    fn a_key_with_an_array_index_is_refused_before_it_allocates() {
        // Each would have grown an array to 10^11 elements.
        let err = Settings::load_from_str("\"x[99999999999]\" = 1\n", env(&[])).unwrap_err();
        assert_eq!(keys(err), vec!["x[99999999999]"]);
        let err = Settings::load_with_env(None, env(&[("LOGIN_METRICS__BATCH[99999999999]", "1")]))
            .unwrap_err();
        assert_eq!(keys(err), vec!["LOGIN_METRICS__BATCH[99999999999]"]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "'kafka[-99999999999]' = 1\n").unwrap();
        let err = Settings::load_with_env(Some(&path), env(&[])).unwrap_err();
        assert_eq!(keys(err), vec!["kafka[-99999999999]"]);
    }

    #[test]
    fn metrics_log_keep_is_bounded() {
        let err =
            Settings::load_with_env(None, env(&[("LOGIN_METRICS__METRICS_LOG__KEEP", "100000")]))
                .unwrap_err();
        assert_eq!(keys(err), vec!["metrics_log.keep"]);
    }

    #[test]
    fn a_topic_in_two_roles_is_rejected_naming_the_key() {
        let err = Settings::load_with_env(
            None,
            env(&[
                ("LOGIN_METRICS__KAFKA__OUTPUT_TOPIC", "user-login"),
                ("LOGIN_METRICS__KAFKA__CHECKPOINT_TOPIC", "user-login-dlq"),
            ]),
        )
        .unwrap_err();
        assert_eq!(
            keys(err),
            vec!["kafka.output_topic", "kafka.checkpoint_topic"]
        );
    }

    #[test]
    fn pseudonymize_without_key_names_the_key() {
        let err = Settings::load_with_env(
            None,
            env(&[("LOGIN_METRICS__PRIVACY__PSEUDONYMIZE", "ip,device_id")]),
        )
        .unwrap_err();
        assert_eq!(keys(err), vec!["privacy.key"]);
    }

    #[test]
    fn secrets_are_redacted() {
        let s = Settings::load_with_env(
            None,
            env(&[
                ("LOGIN_METRICS__PRIVACY__PSEUDONYMIZE", "ip"),
                ("LOGIN_METRICS__PRIVACY__KEY", "hunter2-key"),
                ("LOGIN_METRICS__KAFKA__CONSUMER__SASL_PASSWORD", "pw-secret"),
                ("LOGIN_METRICS__TELEMETRY__TOKEN", "dash-tok3n"),
            ]),
        )
        .unwrap();
        assert_eq!(s.telemetry.token.expose(), "dash-tok3n");
        let text = s.redacted_toml();
        assert!(!text.contains("hunter2-key"), "{text}");
        assert!(!text.contains("pw-secret"), "{text}");
        assert!(!text.contains("dash-tok3n"), "{text}");
        assert!(text.contains("<redacted>"));
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("hunter2-key")
                && !debug.contains("pw-secret")
                && !debug.contains("dash-tok3n"),
            "{debug}"
        );
        assert!(debug.contains("sasl.password"), "{debug}");
        let line = s.redacted_summary();
        assert!(line.contains("sasl.password=<redacted>"), "{line}");
        assert!(line.contains("compression.level=1"), "{line}");
        assert!(
            !line.contains("pw-secret")
                && !line.contains("hunter2-key")
                && !line.contains("dash-tok3n"),
            "{line}"
        );
        // The printed configuration is itself a valid configuration file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("effective.toml");
        let unredacted = Settings::load_with_env(None, env(&[]))
            .unwrap()
            .redacted_toml();
        std::fs::write(&path, unredacted).unwrap();
        Settings::load_with_env(Some(&path), env(&[])).unwrap();
    }

    #[test]
    fn values_are_trimmed_and_enum_settings_read_whatever_the_case() {
        let s = Settings::load_with_env(
            None,
            env(&[
                ("LOGIN_METRICS__KAFKA__GROUP_ID", "login-metrics \n"),
                ("LOGIN_METRICS__PRIVACY__PSEUDONYMIZE", " ip "),
                ("LOGIN_METRICS__PRIVACY__KEY", "k\n"),
                ("LOGIN_METRICS__BATCH__MODE", " Arrival"),
                ("LOGIN_METRICS__LOG__FORMAT", "JSON"),
            ]),
        )
        .unwrap();
        assert_eq!(s.kafka.group_id, "login-metrics");
        assert_eq!(s.privacy.key.expose(), "k");
        assert_eq!(s.privacy.pseudonymize, vec![Field::Ip]);
        assert_eq!(s.batch.mode, BatchMode::Arrival);
        assert_eq!(s.log.format, LogFormat::Json);
        let err = Settings::load_with_env(None, env(&[("LOGIN_METRICS__BATCH__MODE", "windw")]))
            .unwrap_err();
        assert_eq!(keys(err.clone()), vec!["batch.mode"]);
        assert!(
            err.to_string().contains("is not one of: window, arrival"),
            "{err}"
        );
    }

    #[test]
    fn the_summary_names_each_key_with_its_section_and_lists_whole() {
        let s = Settings::load_with_env(None, env(&[])).unwrap();
        let line = s.redacted_summary();
        assert!(line.contains("kafka.group_id=login-metrics"), "{line}");
        assert!(
            line.contains(r#"events.required=["user_id","timestamp"]"#),
            "{line}"
        );
        assert!(
            line.contains(r#"analysis.slices=[["ip"],["user_id","ip"]"#),
            "{line}"
        );
    }
}
