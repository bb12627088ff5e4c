//! Layered, validated configuration.
//!
//! Three layers, last wins: the defaults embedded from `config/default.toml`,
//! the file given with `--config`, and environment variables
//! `LOGIN_METRICS__SECTION__KEY`. The embedded defaults list every accepted key,
//! so they double as the schema: a key that is not in them (outside the
//! pass-through tables `kafka.consumer` and `kafka.producer`) is rejected.
//!
//! Loading never stops at the first problem: every problem is collected with
//! the dotted path of its key, so an operator fixes a configuration in one go.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::event::Field;

/// The embedded defaults; also the list of accepted keys.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "LOGIN_METRICS";

/// The effective configuration of one process.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub batch: BatchSettings,
    pub analysis: AnalysisSettings,
    pub events: EventSettings,
    pub metrics_log: MetricsLogSettings,
    pub log: LogSettings,
    pub telemetry: TelemetrySettings,
    pub privacy: PrivacySettings,
}

/// `Debug` redacts secret librdkafka properties (see [`is_secret_property`]).
#[derive(Clone, Serialize)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub group_id: String,
    pub input_topic: String,
    pub output_topic: String,
    /// Empty: invalid messages are counted and logged but not forwarded.
    pub dlq_topic: String,
    /// Window mode: where each partition's checkpoint is stored before its commit.
    pub checkpoint_topic: String,
    pub auto_offset_reset: String,
    pub compression: String,
    #[serde(with = "human_duration")]
    pub delivery_timeout: Duration,
    pub delivery_attempts: u32,
    /// librdkafka consumer properties, keys normalised to dotted form.
    pub consumer: BTreeMap<String, String>,
    /// librdkafka producer properties, keys normalised to dotted form.
    pub producer: BTreeMap<String, String>,
}

/// How events are grouped into packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchMode {
    /// Event-time windows closed by watermark: the same input gives the same packets.
    Window,
    /// Whatever arrived together, closed by count, span or wait.
    Arrival,
}

/// The fate of late events in window mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LateSetting {
    Dlq,
    Drop,
}

#[derive(Debug, Clone, Serialize)]
pub struct BatchSettings {
    pub mode: BatchMode,
    pub max_events: usize,
    #[serde(with = "human_duration")]
    pub max_span: Duration,
    #[serde(with = "human_duration")]
    pub max_wait: Duration,
    /// Window mode: distance between window starts; `None` for tumbling windows.
    #[serde(with = "human_duration_opt")]
    pub hop: Option<Duration>,
    #[serde(with = "human_duration")]
    pub grace: Duration,
    #[serde(with = "human_duration")]
    pub idle: Duration,
    pub late: LateSetting,
    pub max_buffered: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct AnalysisSettings {
    pub slices: Vec<Vec<Field>>,
    pub top: usize,
}

#[derive(Debug, Clone)]
pub struct EventSettings {
    /// Event fields that must be present and non-null.
    pub required: Vec<Field>,
    /// Whether the timestamp is required (it is listed in `events.required`).
    pub timestamp_required: bool,
    /// Timestamps further than this ahead of the wall clock are `bad_timestamp`.
    pub max_future: Duration,
}

impl Serialize for EventSettings {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut names: Vec<&str> = self.required.iter().map(|f| f.name()).collect();
        if self.timestamp_required {
            names.push("timestamp");
        }
        let mut st = s.serialize_struct("EventSettings", 2)?;
        st.serialize_field("required", &names)?;
        st.serialize_field(
            "max_future",
            &humantime::format_duration(self.max_future).to_string(),
        )?;
        st.end()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct MetricsLogSettings {
    /// `None` when the metrics log is disabled.
    pub path: Option<PathBuf>,
    pub max_bytes: u64,
    pub keep: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Clone, Serialize)]
pub struct TelemetrySettings {
    /// `None` when the HTTP listener is disabled.
    pub listen: Option<std::net::SocketAddr>,
    #[serde(with = "human_duration")]
    pub progress_interval: Duration,
    /// Bearer token the dashboard (`/`, `/api/*`) requires; empty leaves it
    /// open. A secret: redacted wherever settings are printed.
    #[serde(serialize_with = "redact_str")]
    pub token: String,
}

impl fmt::Debug for TelemetrySettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelemetrySettings")
            .field("listen", &self.listen)
            .field("progress_interval", &self.progress_interval)
            .field("token", &if self.token.is_empty() { "" } else { REDACTED })
            .finish()
    }
}

#[derive(Clone, Serialize)]
pub struct PrivacySettings {
    pub pseudonymize: Vec<Field>,
    /// The HMAC key, loaded from `privacy.key` or `privacy.key_file`.
    #[serde(serialize_with = "redact_bytes")]
    pub key: Vec<u8>,
    pub key_file: Option<PathBuf>,
}

impl fmt::Debug for PrivacySettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivacySettings")
            .field("pseudonymize", &self.pseudonymize)
            .field("key", &if self.key.is_empty() { "" } else { REDACTED })
            .field("key_file", &self.key_file)
            .finish()
    }
}

impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |m: &BTreeMap<String, String>| -> BTreeMap<String, String> {
            m.iter()
                .map(|(k, v)| {
                    let v = if is_secret_property(k) {
                        REDACTED
                    } else {
                        v.as_str()
                    };
                    (k.clone(), v.to_string())
                })
                .collect()
        };
        f.debug_struct("KafkaSettings")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("group_id", &self.group_id)
            .field("input_topic", &self.input_topic)
            .field("output_topic", &self.output_topic)
            .field("dlq_topic", &self.dlq_topic)
            .field("checkpoint_topic", &self.checkpoint_topic)
            .field("auto_offset_reset", &self.auto_offset_reset)
            .field("compression", &self.compression)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("delivery_attempts", &self.delivery_attempts)
            .field("consumer", &redact(&self.consumer))
            .field("producer", &redact(&self.producer))
            .finish()
    }
}

const REDACTED: &str = "<redacted>";

fn redact_bytes<S: serde::Serializer>(key: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if key.is_empty() { "" } else { REDACTED })
}

fn redact_str<S: serde::Serializer>(secret: &str, s: S) -> Result<S::Ok, S::Error> {
    redact_bytes(secret.as_bytes(), s)
}

mod human_duration {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

mod human_duration_opt {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_str(""),
        }
    }
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
        write!(f, "invalid configuration ({} problem", self.problems.len())?;
        if self.problems.len() != 1 {
            write!(f, "s")?;
        }
        write!(f, "):")?;
        for p in &self.problems {
            write!(f, "\n  - {}: {}", p.key, p.message)?;
        }
        Ok(())
    }
}

impl ConfigError {
    fn single(key: &str, message: impl Into<String>) -> Self {
        ConfigError {
            problems: vec![Problem {
                key: key.to_string(),
                message: message.into(),
            }],
        }
    }
}

/// Where the layer between the defaults and the environment comes from.
enum FileLayer<'a> {
    /// The file given with `--config`.
    Path(&'a Path),
    /// TOML text in memory.
    Text(&'a str),
}

/// The largest integer setting: the largest TOML integer.
const MAX_INT: u64 = i64::MAX as u64;

/// The most rotated metrics log files kept.
const MAX_KEEP: u64 = 1000;

/// Tables whose keys are librdkafka properties, passed through unchecked.
const PASS_THROUGH: [&str; 2] = ["kafka.consumer", "kafka.producer"];

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
        Self::load_layers(file.map(FileLayer::Path), env)
    }

    /// As [`Settings::load_with_env`], with the `--config` layer given as TOML
    /// text instead of a file, so that no file but `privacy.key_file` is read
    /// and the process environment is untouched (tests, fuzzing).
    pub fn load_from_str(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        Self::load_layers(Some(FileLayer::Text(text)), env)
    }

    fn load_layers(
        file: Option<FileLayer<'_>>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let defaults = defaults();
        let (merged, mut problems) = Self::layers(defaults, file, env)?;
        match Self::from_tree(&merged, defaults) {
            Ok(s) if problems.is_empty() => Ok(s),
            Ok(_) => Err(ConfigError { problems }),
            Err(mut e) => {
                problems.append(&mut e.problems);
                Err(ConfigError { problems })
            }
        }
    }

    /// The merged key tree of the defaults, `file` and the environment, and
    /// the problems found in single layers.
    fn layers(
        defaults: &Value,
        file: Option<FileLayer<'_>>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Value, Vec<Problem>), ConfigError> {
        // Each layer is read on its own and its librdkafka property names are
        // normalised before the layers merge, so the later layer always wins
        // whichever way it spells a property (`compression.level` in a file,
        // `..._COMPRESSION_LEVEL` in the environment).
        let mut problems = Vec::new();
        let mut merged = defaults.clone();
        normalise_properties(&mut merged, "config/default.toml", &mut problems);
        if let Some(file) = file {
            let (layer, name) = match file {
                FileLayer::Path(path) => {
                    if !path.is_file() {
                        return Err(ConfigError::single(
                            "--config",
                            format!("{} is not a readable file", path.display()),
                        ));
                    }
                    if let Ok(text) = std::fs::read_to_string(path) {
                        refuse_bracketed_keys(&text)?;
                    }
                    let layer = tree(config::Config::builder().add_source(
                        config::File::from(path.to_path_buf()).format(config::FileFormat::Toml),
                    ));
                    (layer, path.display().to_string())
                }
                FileLayer::Text(text) => {
                    refuse_bracketed_keys(text)?;
                    let layer = tree(
                        config::Config::builder()
                            .add_source(config::File::from_str(text, config::FileFormat::Toml)),
                    );
                    (layer, "the configuration text".to_string())
                }
            };
            let mut layer = layer.map_err(|e| ConfigError::single("--config", e))?;
            normalise_properties(&mut layer, &name, &mut problems);
            merge(&mut merged, layer);
        }
        let prefix = format!("{ENV_PREFIX}__");
        let mut vars = config::Map::new();
        for (k, v) in env {
            if !k.starts_with(&prefix) {
                continue;
            }
            if k.contains(['[', ']']) {
                problems.push(Problem {
                    key: k,
                    message: BRACKETED_KEY.to_string(),
                });
                continue;
            }
            vars.insert(k, v);
        }
        let mut layer = tree(
            config::Config::builder().add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .source(Some(vars)),
            ),
        )
        .map_err(|e| ConfigError::single("--config", e))?;
        normalise_properties(&mut layer, "the environment", &mut problems);
        merge(&mut merged, layer);
        Ok((merged, problems))
    }

    /// Validates a merged key tree against the defaults' key tree.
    fn from_tree(root: &Value, defaults: &Value) -> Result<Settings, ConfigError> {
        let mut r = Reader {
            root,
            problems: Vec::new(),
        };
        unknown_keys(root, defaults, "", &mut r.problems);

        let kafka = KafkaSettings {
            bootstrap_servers: r.non_empty("kafka.bootstrap_servers"),
            group_id: r.non_empty("kafka.group_id"),
            input_topic: r.non_empty("kafka.input_topic"),
            output_topic: r.non_empty("kafka.output_topic"),
            dlq_topic: r.string("kafka.dlq_topic"),
            checkpoint_topic: r.non_empty("kafka.checkpoint_topic"),
            auto_offset_reset: r.one_of("kafka.auto_offset_reset", &["earliest", "latest"]),
            // zstd needs librdkafka built with libzstd, which this build is not.
            compression: r.one_of("kafka.compression", &["none", "gzip", "snappy", "lz4"]),
            delivery_timeout: r.duration("kafka.delivery_timeout", Duration::from_millis(1)),
            delivery_attempts: r.int_in("kafka.delivery_attempts", 1, u32::MAX.into()) as u32,
            consumer: r.properties(
                "kafka.consumer",
                &[
                    "enable.auto.commit",
                    "enable.auto.offset.store",
                    "group.id",
                    "bootstrap.servers",
                ],
            ),
            producer: r.properties(
                "kafka.producer",
                &["enable.idempotence", "acks", "bootstrap.servers"],
            ),
        };
        // One topic in two roles would feed the service its own output.
        let input = kafka.input_topic.clone();
        for (key, topic) in [
            ("kafka.output_topic", &kafka.output_topic),
            ("kafka.dlq_topic", &kafka.dlq_topic),
            ("kafka.checkpoint_topic", &kafka.checkpoint_topic),
        ] {
            if !input.is_empty() && *topic == input {
                r.problem(
                    key,
                    format!("must differ from kafka.input_topic (`{input}`)"),
                );
            }
        }
        for (key, topic) in [
            ("kafka.dlq_topic", &kafka.dlq_topic),
            ("kafka.checkpoint_topic", &kafka.checkpoint_topic),
        ] {
            if !topic.is_empty() && *topic == kafka.output_topic && topic != &input {
                r.problem(
                    key,
                    format!("must differ from kafka.output_topic (`{topic}`)"),
                );
            }
        }
        if !kafka.checkpoint_topic.is_empty()
            && kafka.checkpoint_topic == kafka.dlq_topic
            && kafka.checkpoint_topic != input
        {
            r.problem(
                "kafka.checkpoint_topic",
                format!("must differ from kafka.dlq_topic (`{}`)", kafka.dlq_topic),
            );
        }
        let mode = match r.one_of("batch.mode", &["window", "arrival"]).as_str() {
            "arrival" => BatchMode::Arrival,
            _ => BatchMode::Window,
        };
        let max_span = r.duration("batch.max_span", Duration::ZERO);
        let hop = match r.string("batch.hop").as_str() {
            "" => None,
            _ => Some(r.duration("batch.hop", Duration::from_millis(1))),
        };
        if mode == BatchMode::Window {
            if max_span < Duration::from_millis(1) {
                r.problem("batch.max_span", "must be at least 1ms in window mode");
            } else if let Some(h) = hop {
                if h > max_span || !max_span.as_millis().is_multiple_of(h.as_millis().max(1)) {
                    r.problem(
                        "batch.hop",
                        format!(
                            "must divide batch.max_span ({})",
                            humantime::format_duration(max_span)
                        ),
                    );
                }
            }
        }
        let batch = BatchSettings {
            mode,
            max_events: r.int("batch.max_events", 1) as usize,
            max_span,
            max_wait: r.duration("batch.max_wait", Duration::from_millis(1)),
            hop,
            grace: r.duration("batch.grace", Duration::ZERO),
            idle: r.duration("batch.idle", Duration::from_millis(1)),
            late: match r.one_of("batch.late", &["dlq", "drop"]).as_str() {
                "drop" => LateSetting::Drop,
                _ => LateSetting::Dlq,
            },
            max_buffered: r.int("batch.max_buffered", 1) as usize,
        };
        let analysis = AnalysisSettings {
            slices: r.slices("analysis.slices"),
            top: r.int("analysis.top", 1) as usize,
        };
        let (required, timestamp_required) = r.required("events.required");
        if mode == BatchMode::Window && !timestamp_required {
            r.problem(
                "events.required",
                "must include \"timestamp\" in window mode (batch.mode = \"window\"): an event without a time has no window",
            );
        }
        let events = EventSettings {
            required,
            timestamp_required,
            max_future: r.duration("events.max_future", Duration::ZERO),
        };
        let log_path = r.string("metrics_log.path");
        let metrics_log = MetricsLogSettings {
            path: (!log_path.is_empty()).then(|| PathBuf::from(log_path)),
            max_bytes: r.int("metrics_log.max_bytes", 1),
            keep: r.int_in("metrics_log.keep", 0, MAX_KEEP) as usize,
        };
        let log = LogSettings {
            format: match r.one_of("log.format", &["text", "json"]).as_str() {
                "json" => LogFormat::Json,
                _ => LogFormat::Text,
            },
            level: r.log_level("log.level"),
        };
        let listen = r.string("telemetry.listen");
        let telemetry = TelemetrySettings {
            listen: if listen.is_empty() {
                None
            } else {
                match listen.parse() {
                    Ok(addr) => Some(addr),
                    Err(_) => {
                        r.problem(
                            "telemetry.listen",
                            format!("`{listen}` is not an address such as 127.0.0.1:9464"),
                        );
                        None
                    }
                }
            },
            progress_interval: r.duration("telemetry.progress_interval", Duration::from_millis(1)),
            token: r.string("telemetry.token"),
        };
        if telemetry
            .token
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            // Never echo the value: it is a secret.
            r.problem(
                "telemetry.token",
                "must not contain spaces or control characters (it travels in an Authorization header)",
            );
        }
        let privacy = r.privacy();

        if r.problems.is_empty() {
            Ok(Settings {
                kafka,
                batch,
                analysis,
                events,
                metrics_log,
                log,
                telemetry,
                privacy,
            })
        } else {
            Err(ConfigError {
                problems: r.problems,
            })
        }
    }

    /// The effective configuration as TOML, with secrets redacted.
    pub fn redacted_toml(&self) -> String {
        let mut value = serde_json::to_value(self).expect("settings serialize");
        for table in ["consumer", "producer"] {
            if let Some(Value::Object(props)) = value["kafka"].get_mut(table) {
                for (k, v) in props.iter_mut() {
                    if is_secret_property(k) {
                        *v = Value::String(REDACTED.into());
                    }
                }
            }
        }
        // TOML has no null; an unset optional key prints as empty, as it is written.
        strip_nulls(&mut value);
        toml::to_string_pretty(&value).expect("settings as TOML")
    }

    /// One line for the start-up log.
    pub fn redacted_summary(&self) -> String {
        let slices: Vec<String> = self
            .analysis
            .slices
            .iter()
            .map(|s| s.iter().map(|f| f.name()).collect::<Vec<_>>().join("+"))
            .collect();
        let props = |m: &BTreeMap<String, String>| {
            m.iter()
                .map(|(k, v)| {
                    let v = if is_secret_property(k) {
                        REDACTED
                    } else {
                        v.as_str()
                    };
                    format!("{k}={v}")
                })
                .collect::<Vec<_>>()
                .join(",")
        };
        format!(
            "brokers={} group={} input={} output={} dlq={} compression={} batch(mode={} max_events={} max_span={} max_wait={} grace={}) slices=[{}] top={} required=[{}] metrics_log={} pseudonymize=[{}] consumer=[{}] producer=[{}]",
            self.kafka.bootstrap_servers,
            self.kafka.group_id,
            self.kafka.input_topic,
            self.kafka.output_topic,
            if self.kafka.dlq_topic.is_empty() { "-" } else { &self.kafka.dlq_topic },
            self.kafka.compression,
            match self.batch.mode {
                BatchMode::Window => "window",
                BatchMode::Arrival => "arrival",
            },
            self.batch.max_events,
            humantime::format_duration(self.batch.max_span),
            humantime::format_duration(self.batch.max_wait),
            humantime::format_duration(self.batch.grace),
            slices.join(" "),
            self.analysis.top,
            self.events
                .required
                .iter()
                .map(|f| f.name())
                .chain(self.events.timestamp_required.then_some("timestamp"))
                .collect::<Vec<_>>()
                .join(","),
            self.metrics_log
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "-".into()),
            self.privacy
                .pseudonymize
                .iter()
                .map(|f| f.name())
                .collect::<Vec<_>>()
                .join(","),
            props(&self.kafka.consumer),
            props(&self.kafka.producer),
        )
    }
}

fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (_, child) in map.iter_mut() {
                if child.is_null() {
                    *child = Value::String(String::new());
                } else {
                    strip_nulls(child);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// librdkafka properties whose values must not be printed.
fn is_secret_property(key: &str) -> bool {
    ["password", "secret", "key.pem", "token"]
        .iter()
        .any(|s| key.contains(s))
}

fn default_source() -> config::File<config::FileSourceString, config::FileFormat> {
    config::File::from_str(DEFAULT_TOML, config::FileFormat::Toml)
}

const BRACKETED_KEY: &str = "unknown key (no key holds `[` or `]`)";

/// Refuses a TOML layer with a top-level key holding `[` or `]`: the config
/// crate reads such a key as a path with an array index (`"a[99999999999]"`)
/// and grows an array to that length. Text that is not TOML passes, for the
/// layer's own parse to report.
fn refuse_bracketed_keys(text: &str) -> Result<(), ConfigError> {
    let Ok(table) = config::Format::parse(&config::FileFormat::Toml, None, text) else {
        return Ok(());
    };
    let problems: Vec<Problem> = table
        .keys()
        .filter(|k| k.contains(['[', ']']))
        .map(|k| Problem {
            key: k.clone(),
            message: BRACKETED_KEY.to_string(),
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ConfigError { problems })
    }
}

/// The key tree of the embedded defaults, parsed once.
fn defaults() -> &'static Value {
    static DEFAULTS: OnceLock<Value> = OnceLock::new();
    DEFAULTS.get_or_init(|| {
        tree(config::Config::builder().add_source(default_source()))
            .expect("the embedded config/default.toml is valid")
    })
}

/// Rewrites the keys of the librdkafka property tables of one layer in their
/// dotted form. Environment variables cannot carry dots and librdkafka
/// property names never contain underscores, so the mapping is unambiguous;
/// a layer that spells one property both ways is rejected.
fn normalise_properties(layer: &mut Value, name: &str, problems: &mut Vec<Problem>) {
    for path in PASS_THROUGH {
        let (section, table) = path.split_once('.').expect("section.table");
        let Some(Value::Object(map)) = layer.get_mut(section).and_then(|v| v.get_mut(table)) else {
            continue;
        };
        let mut out = serde_json::Map::new();
        let mut spelled: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in std::mem::take(map) {
            let dotted = k.replace('_', ".");
            if let Some(first) = spelled.get(&dotted) {
                problems.push(Problem {
                    key: format!("{path}.{dotted}"),
                    message: format!(
                        "{name} sets this property twice, as `{first}` and `{k}`; keep one"
                    ),
                });
                continue;
            }
            spelled.insert(dotted.clone(), k);
            out.insert(dotted, v);
        }
        *map = out;
    }
}

/// Merges a later layer over an earlier one: tables merge key by key, any
/// other value replaces the earlier one.
fn merge(into: &mut Value, later: Value) {
    match (into, later) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

fn tree(builder: config::ConfigBuilder<config::builder::DefaultState>) -> Result<Value, String> {
    builder
        .build()
        .and_then(|c| c.try_deserialize::<Value>())
        .map_err(|e| e.to_string())
}

fn unknown_keys(value: &Value, schema: &Value, prefix: &str, problems: &mut Vec<Problem>) {
    let (Value::Object(map), Value::Object(known)) = (value, schema) else {
        return;
    };
    for (key, child) in map {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match known.get(key) {
            None => problems.push(Problem {
                message: format!(
                    "unknown key (accepted here: {})",
                    known.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
                key: path,
            }),
            Some(sub) if !PASS_THROUGH.contains(&path.as_str()) => {
                unknown_keys(child, sub, &path, problems)
            }
            Some(_) => {}
        }
    }
}

/// Reads typed values from the merged tree, collecting problems.
struct Reader<'a> {
    root: &'a Value,
    problems: Vec<Problem>,
}

impl Reader<'_> {
    fn problem(&mut self, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn get(&self, key: &str) -> Option<&Value> {
        key.split('.').try_fold(self.root, |v, part| v.get(part))
    }

    fn string(&mut self, key: &str) -> String {
        match self.get(key) {
            Some(Value::String(s)) => s.trim().to_string(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            Some(other) => {
                let msg = format!("expected a string, found {}", kind(other));
                self.problem(key, msg);
                String::new()
            }
            None => String::new(),
        }
    }

    fn non_empty(&mut self, key: &str) -> String {
        let s = self.string(key);
        if s.is_empty() {
            self.problem(key, "must not be empty");
        }
        s
    }

    fn one_of(&mut self, key: &str, choices: &[&str]) -> String {
        let s = self.string(key).to_ascii_lowercase();
        if !choices.contains(&s.as_str()) {
            self.problem(key, format!("`{s}` is not one of: {}", choices.join(", ")));
        }
        s
    }

    fn int_in(&mut self, key: &str, min: u64, max: u64) -> u64 {
        let n = self.whole_number(key, min);
        if n > max {
            self.problem(key, format!("must be at most {max}, found {n}"));
            return max;
        }
        n
    }

    /// A whole number no larger than a TOML integer can be, so that the
    /// printed configuration loads again.
    fn int(&mut self, key: &str, min: u64) -> u64 {
        self.int_in(key, min, MAX_INT)
    }

    fn whole_number(&mut self, key: &str, min: u64) -> u64 {
        let parsed = match self.get(key) {
            Some(Value::Number(n)) => n
                .as_u64()
                .ok_or_else(|| format!("`{n}` is not a whole number of at least {min}")),
            Some(Value::String(s)) => s
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("`{s}` is not a whole number of at least {min}")),
            Some(other) => Err(format!("expected a whole number, found {}", kind(other))),
            None => Err("missing".to_string()),
        };
        match parsed {
            Ok(n) if n >= min => n,
            Ok(n) => {
                self.problem(key, format!("must be at least {min}, found {n}"));
                min
            }
            Err(msg) => {
                self.problem(key, msg);
                min
            }
        }
    }

    fn duration(&mut self, key: &str, min: Duration) -> Duration {
        let s = self.string(key);
        match humantime::parse_duration(&s) {
            Ok(d) if d >= min => d,
            Ok(_) => {
                self.problem(
                    key,
                    format!("must be at least {}", humantime::format_duration(min)),
                );
                min
            }
            Err(e) => {
                self.problem(
                    key,
                    format!("`{s}` is not a duration such as \"500ms\", \"10s\" or \"2m\" ({e})"),
                );
                min.max(Duration::from_secs(1))
            }
        }
    }

    /// A list of strings: an array, a JSON array in a string, or a comma-separated string.
    fn string_list(&mut self, key: &str) -> Vec<String> {
        match self.get(key).cloned() {
            Some(Value::Array(items)) => items
                .into_iter()
                .filter_map(|v| match v {
                    Value::String(s) => Some(s),
                    other => {
                        self.problem(key, format!("expected strings, found {}", kind(&other)));
                        None
                    }
                })
                .collect(),
            Some(Value::String(s)) if s.trim_start().starts_with('[') => {
                match serde_json::from_str::<Vec<String>>(&s) {
                    Ok(v) => v,
                    Err(e) => {
                        self.problem(key, format!("not a JSON list of strings: {e}"));
                        Vec::new()
                    }
                }
            }
            Some(Value::String(s)) => s
                .split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect(),
            Some(other) => {
                self.problem(key, format!("expected a list, found {}", kind(&other)));
                Vec::new()
            }
            None => Vec::new(),
        }
    }

    fn fields(&mut self, key: &str, names: &[String]) -> Vec<Field> {
        let mut fields = Vec::new();
        for name in names {
            match Field::from_name(name) {
                Some(f) if fields.contains(&f) => {
                    self.problem(key, format!("field `{name}` is listed twice"))
                }
                Some(f) => fields.push(f),
                None => self.problem(
                    key,
                    format!("`{name}` is not an event field (one of {})", Field::names()),
                ),
            }
        }
        fields
    }

    fn slices(&mut self, key: &str) -> Vec<Vec<Field>> {
        let raw: Vec<Vec<String>> = match self.get(key).cloned() {
            Some(Value::String(s)) => match serde_json::from_str(&s) {
                Ok(v) => v,
                Err(e) => {
                    self.problem(key, format!("not a JSON list of lists of field names: {e}"));
                    return Vec::new();
                }
            },
            Some(v) => match serde_json::from_value(v) {
                Ok(v) => v,
                Err(e) => {
                    self.problem(key, format!("expected a list of lists of field names: {e}"));
                    return Vec::new();
                }
            },
            None => Vec::new(),
        };
        if raw.is_empty() {
            self.problem(key, "at least one slice is needed");
        }
        let mut slices = Vec::new();
        for (i, names) in raw.iter().enumerate() {
            let item_key = format!("{key}[{i}]");
            if names.is_empty() {
                self.problem(&item_key, "a slice names at least one field");
                continue;
            }
            let fields = self.fields(&item_key, names);
            if slices.contains(&fields) {
                self.problem(&item_key, "the same slice is listed twice");
            }
            slices.push(fields);
        }
        slices
    }

    fn required(&mut self, key: &str) -> (Vec<Field>, bool) {
        let names = self.string_list(key);
        let timestamp = names.iter().any(|n| n == "timestamp");
        let rest: Vec<String> = names.into_iter().filter(|n| n != "timestamp").collect();
        (self.fields(key, &rest), timestamp)
    }

    fn properties(&mut self, key: &str, reserved: &[&str]) -> BTreeMap<String, String> {
        let mut props = BTreeMap::new();
        let Some(value) = self.get(key).cloned() else {
            return props;
        };
        let Value::Object(map) = value else {
            self.problem(key, "expected a table of librdkafka properties");
            return props;
        };
        for (k, v) in map {
            // Environment variables cannot carry dots; librdkafka property names never
            // contain underscores, so the mapping back is unambiguous.
            let name = k.replace('_', ".");
            let value = match v {
                Value::String(s) => s,
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => {
                    self.problem(
                        &format!("{key}.{k}"),
                        format!(
                            "expected a string, number or boolean, found {}",
                            kind(&other)
                        ),
                    );
                    continue;
                }
            };
            if reserved.contains(&name.as_str()) {
                self.problem(
                    &format!("{key}.{k}"),
                    "is set by login-metrics itself and cannot be overridden",
                );
                continue;
            }
            // A revocation gives up all the partitions' state at once (open
            // windows, the open batch, paused flows); incremental rebalancing
            // would keep some partitions without it.
            if name == "partition.assignment.strategy" && value.contains("cooperative") {
                self.problem(
                    &format!("{key}.{k}"),
                    "cooperative (incremental) rebalancing is not supported; use range or roundrobin",
                );
                continue;
            }
            props.insert(name, value);
        }
        props
    }

    fn log_level(&mut self, key: &str) -> String {
        let s = self.string(key);
        if tracing_subscriber::EnvFilter::try_new(&s).is_err() || s.is_empty() {
            self.problem(
                key,
                format!("`{s}` is not a level (error, warn, info, debug, trace) or filter"),
            );
        }
        s
    }

    fn privacy(&mut self) -> PrivacySettings {
        let names = self.string_list("privacy.pseudonymize");
        let pseudonymize = self.fields("privacy.pseudonymize", &names);
        let key_text = self.string("privacy.key");
        let key_file = self.string("privacy.key_file");
        let key_file = (!key_file.is_empty()).then(|| PathBuf::from(key_file));
        let key = if !key_text.is_empty() {
            key_text.into_bytes()
        } else if let Some(path) = &key_file {
            match std::fs::read_to_string(path) {
                Ok(s) if !s.trim().is_empty() => s.trim().as_bytes().to_vec(),
                Ok(_) => {
                    self.problem("privacy.key_file", format!("{} is empty", path.display()));
                    Vec::new()
                }
                Err(e) => {
                    self.problem(
                        "privacy.key_file",
                        format!("cannot read {}: {e}", path.display()),
                    );
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        if !pseudonymize.is_empty() && key.is_empty() && key_file.is_none() {
            self.problem(
                "privacy.key",
                "privacy.pseudonymize names fields but no key is set (privacy.key or privacy.key_file)",
            );
        }
        PrivacySettings {
            pseudonymize,
            key,
            key_file,
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a table",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(s.kafka.compression, "gzip");
        assert_eq!(s.batch.max_events, 10_000);
        assert_eq!(s.batch.max_span, Duration::from_secs(10));
        assert_eq!(s.batch.max_wait, Duration::from_secs(10));
        assert_eq!(s.analysis.slices.len(), 7);
        assert_eq!(s.analysis.slices[1], vec![Field::UserId, Field::Ip]);
        assert_eq!(s.analysis.top, 100);
        assert_eq!(s.events.required, vec![Field::UserId]);
        assert!(s.events.timestamp_required);
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
        let defaults = tree(config::Config::builder().add_source(default_source())).unwrap();
        let (merged, problems) = Settings::layers(
            &defaults,
            None,
            env(&[("LOGIN_METRICS__KAFKA__PRODUCER__COMPRESSION_LEVEL", "9")]),
        )
        .unwrap();
        assert!(problems.is_empty());
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
        assert_eq!(s.telemetry.token, "dash-tok3n");
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
}
