//! The librdkafka clients: every client configuration the service makes is
//! built here, from one place, so that a property given once — security
//! above all (`kafka.client`: `security.protocol`, `sasl.*`, `ssl.*`) —
//! reaches all of them: the consumer, the producer, the admin client and the
//! checkpoint writer and reader. Also where what librdkafka reports (errors,
//! log lines) is turned into logs and metrics.
//!
//! Layering, last wins: the service's own defaults, `kafka.client`, then
//! `kafka.consumer` or `kafka.producer`, then the properties the service's
//! guarantees rest on (manual offset storage and commits, idempotent acks=all
//! production), which the configuration refuses to override.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::telemetry::KAFKA_ERRORS;
use crate::values::{name, Findings, Properties, MAX_INT};

/// `[kafka]`: the brokers, the topics, delivery, and librdkafka properties.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    pub group_id: String,
    /// The consumer's `group.instance.id` (static group membership); empty:
    /// derived by `run` ([`Membership::of`]).
    pub instance_name: String,
    pub input_topic: String,
    pub output_topic: String,
    /// Empty: invalid messages are counted and logged but not forwarded.
    pub dlq_topic: String,
    pub checkpoint_topic: String,
    pub auto_offset_reset: OffsetReset,
    pub compression: Compression,
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    pub delivery_attempts: u32,
    /// librdkafka properties of every client, security above all.
    pub client: Properties,
    /// librdkafka properties of the consumer, over `client`.
    pub consumer: Properties,
    /// librdkafka properties of the producer, over `client`.
    pub producer: Properties,
}

crate::choice!(OffsetReset { Earliest, Latest });
// zstd needs librdkafka built with libzstd, which this build is not.
crate::choice!(Compression {
    None,
    Gzip,
    Snappy,
    Lz4
});

/// Properties the at-least-once contract rests on, which [`consumer`] and
/// [`producer`] set themselves whatever the configuration says.
const RESERVED: [(&str, &[&str]); 2] = [
    (
        "consumer",
        &["enable.auto.commit", "enable.auto.offset.store", "group.id"],
    ),
    (
        "producer",
        &["enable.idempotence", "acks", "transactional.id"],
    ),
];

impl KafkaSettings {
    /// What is wrong with the `[kafka]` keys.
    pub fn check(&self, f: &mut Findings) {
        let topics = [
            ("kafka.input_topic", &self.input_topic),
            ("kafka.output_topic", &self.output_topic),
            ("kafka.dlq_topic", &self.dlq_topic),
            ("kafka.checkpoint_topic", &self.checkpoint_topic),
        ];
        let named = [
            ("kafka.bootstrap_servers", &self.bootstrap_servers),
            ("kafka.group_id", &self.group_id),
        ];
        for (key, value) in named.iter().chain(&topics) {
            if *key != "kafka.dlq_topic" && value.trim().is_empty() {
                f.add(*key, "must not be empty");
            }
        }
        // One topic in two roles would feed the service its own output.
        for (i, (key, topic)) in topics.iter().enumerate() {
            let clash = topics[..i]
                .iter()
                .find(|(_, t)| !topic.is_empty() && t == topic);
            if let Some((other, _)) = clash {
                f.add(*key, format!("must differ from {other} (`{topic}`)"));
            }
        }
        let tables = [
            ("client", &self.client),
            ("consumer", &self.consumer),
            ("producer", &self.producer),
        ];
        for (table, props) in tables {
            for (name, value) in props.iter() {
                let key = format!("kafka.{table}.{name}");
                let reserved = RESERVED.iter().any(|(t, names)| {
                    (table == *t || table == "client") && names.contains(&name.as_str())
                });
                if reserved || name == "bootstrap.servers" {
                    f.add(
                        key,
                        "is set by login-metrics itself and cannot be overridden",
                    );
                } else if name == "group.instance.id" {
                    // One place for the name, so that `run` can derive it
                    // when none is given and only the group member gets it.
                    f.add(
                        key,
                        "is set by login-metrics from kafka.instance_name; set that instead",
                    );
                } else if name == "group.protocol" && !value.eq_ignore_ascii_case("classic") {
                    // The `consumer` protocol (KIP-848) rebalances incrementally:
                    // a partial revocation would drop the windows of the
                    // partitions kept, which are then never published.
                    f.add(
                        key,
                        "must be \"classic\": the \"consumer\" protocol (KIP-848) rebalances incrementally, which is not supported yet (a partial revocation would drop the open windows of the partitions kept)",
                    );
                } else if name == "partition.assignment.strategy" && value.contains("cooperative") {
                    // A revocation gives up all the partitions' state at once;
                    // incremental rebalancing would keep some partitions without it.
                    f.add(
                        key,
                        "cooperative (incremental) rebalancing is not supported; use range or roundrobin",
                    );
                }
            }
        }
        if let Some(problem) = instance_name_problem(&self.instance_name) {
            f.add("kafka.instance_name", problem);
        }
        f.positive("kafka.delivery_timeout", self.delivery_timeout);
        f.bounded(
            "kafka.delivery_attempts",
            self.delivery_attempts.into(),
            1,
            MAX_INT,
        );
    }
}

/// What every client shares: the brokers, a client id and `kafka.client`.
/// A client's configuration, later layers winning: the service's
/// `defaults`, `kafka.client`, the client's own `table`, then the `fixed`
/// properties its guarantees rest on (refused in the configuration).
fn layered(
    k: &KafkaSettings,
    defaults: &[(&str, String)],
    table: &Properties,
    fixed: &[(&str, &str)],
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("client.id", "login-metrics");
    for (key, value) in defaults {
        c.set(*key, value);
    }
    for (key, value) in k.client.iter().chain(table.iter()) {
        c.set(key, value);
    }
    c.set("bootstrap.servers", &k.bootstrap_servers);
    for (key, value) in fixed {
        c.set(*key, *value);
    }
    c
}

/// The input consumer: manual offset storage and commits.
pub fn consumer(k: &KafkaSettings) -> ClientConfig {
    let defaults = [
        ("auto.offset.reset", name(&k.auto_offset_reset)),
        ("enable.partition.eof", "false".into()),
        ("statistics.interval.ms", "5000".into()),
        // Larger fetches keep the consumer ahead of the analysis.
        ("fetch.wait.max.ms", "100".into()),
        ("queued.min.messages", "200000".into()),
        // Each partition has a prefetch queue of its own (source::fetch), and
        // these limits apply per queue: 16 MiB keeps a partition ahead of
        // the consumer, while a held partition (window alignment, delivery
        // behind) can hold no more than that however many partitions.
        ("queued.max.messages.kbytes", "16384".into()),
        ("fetch.queue.backoff.ms", "100".into()),
        // Eager rebalancing, which the revocation handling rests on (see
        // `KafkaSettings::check`), whatever a later librdkafka's default.
        ("group.protocol", "classic".into()),
    ];
    let fixed = [
        ("group.id", k.group_id.as_str()),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
    ];
    let mut c = layered(k, &defaults, &k.consumer, &fixed);
    c.set_log_level(RDKafkaLogLevel::Warning);
    c
}

/// The consumer that joins the group: [`consumer`], and static membership
/// under `kafka.instance_name` when it is set (`run` sets it, see
/// [`Membership`]). Only this client carries the name: the others never
/// join, and an offset commit carrying the name of a member they are not
/// would be refused as fenced.
pub fn member(k: &KafkaSettings) -> ClientConfig {
    let mut c = consumer(k);
    if !k.instance_name.is_empty() {
        c.set("group.instance.id", &k.instance_name);
    }
    c
}

/// How this instance belongs to its consumer group.
///
/// A static member (`group.instance.id`) that comes back within
/// `session.timeout.ms` takes its own place in the group again, with its
/// partitions, without a rebalance: a restarted process publishes again in
/// seconds instead of waiting for its killed predecessor's session to time
/// out. The name must be stable across restarts of one instance and
/// distinct between live instances: the broker fences the older of two
/// members with one name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// `kafka.instance_name` as configured.
    Named(String),
    /// Derived: the host name and a hash of the metrics log's canonical
    /// path. An instance holds an exclusive lock on its metrics log, so two
    /// live instances on one host never share the path, and a restart of one
    /// opens the same file again.
    Derived(String),
    /// No name given and no metrics log to derive one from.
    Dynamic,
}

impl Membership {
    /// The membership `run` uses, given the metrics log (`None`: disabled).
    pub fn of(k: &KafkaSettings, metrics_log: Option<&Path>) -> Membership {
        Self::with_host(k, metrics_log, &host_name())
    }

    fn with_host(k: &KafkaSettings, metrics_log: Option<&Path>, host: &str) -> Membership {
        match (k.instance_name.as_str(), metrics_log) {
            ("", None) => Membership::Dynamic,
            ("", Some(path)) => Membership::Derived(derived_name(host, &canonical(path))),
            (name, _) => Membership::Named(name.to_string()),
        }
    }

    /// The `group.instance.id`, for a static member.
    pub fn instance_name(&self) -> Option<&str> {
        match self {
            Membership::Named(n) | Membership::Derived(n) => Some(n),
            Membership::Dynamic => None,
        }
    }
}

impl fmt::Display for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Membership::Named(n) => write!(
                f,
                "static group membership as {n} (kafka.instance_name)"
            ),
            Membership::Derived(n) => write!(
                f,
                "static group membership as {n} (kafka.instance_name derived from the host name and \
                 metrics_log.path; a restart with both unchanged takes this instance's place again)"
            ),
            Membership::Dynamic => write!(
                f,
                "dynamic group membership: kafka.instance_name is empty and the metrics log is \
                 disabled, so there is no stable name to derive; a restart after kill -9 waits for \
                 the killed process's session.timeout.ms before its partitions are read again"
            ),
        }
    }
}

/// Why a `kafka.instance_name` cannot be a `group.instance.id`: the broker
/// accepts ASCII letters, digits, `.`, `_` and `-`, up to 249 of them.
fn instance_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return None;
    }
    if name.len() > MAX_INSTANCE_NAME {
        return Some(format!(
            "must be at most {MAX_INSTANCE_NAME} characters (it has {})",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Some("must not be \".\" or \"..\"".into());
    }
    if !name.bytes().all(instance_name_byte) {
        return Some(
            "may hold only ASCII letters, digits, '.', '_' and '-' (as Kafka's group.instance.id)"
                .into(),
        );
    }
    None
}

/// The longest `group.instance.id` the broker accepts.
const MAX_INSTANCE_NAME: usize = 249;

fn instance_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// The name of an instance on `host` writing the metrics log at the
/// canonical path `log`: the host name (characters Kafka refuses replaced
/// by `-`) and 12 hex digits of the path's SHA-256.
fn derived_name(host: &str, log: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let hash = Sha256::digest(log.as_os_str().as_bytes());
    let mut host: String = host
        .chars()
        .map(|c| match c.is_ascii() && instance_name_byte(c as u8) {
            true => c,
            false => '-',
        })
        .take(MAX_INSTANCE_NAME - 13)
        .collect();
    if host.is_empty() || host == "." || host == ".." {
        host = "login-metrics".into();
    }
    format!("{host}-{}", hex::encode(&hash[..6]))
}

/// `path` absolute, with its directory's symbolic links, `.` and `..`
/// resolved through the part of it that exists: the same file gives the
/// same path whichever working directory or spelling named it, and before
/// the first start (the file, or its directory, not created yet) the same as
/// after. The file's own name is kept, not resolved: the lock is taken on
/// that name.
fn canonical(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let (Some(dir), Some(file)) = (absolute.parent(), absolute.file_name()) else {
        return absolute;
    };
    let mut missing = Vec::new();
    let mut existing = dir;
    loop {
        if let Ok(resolved) = std::fs::canonicalize(existing) {
            let dir = missing.iter().rev().fold(resolved, |d, part| d.join(part));
            return dir.join(file);
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(part)) => {
                missing.push(part.to_os_string());
                existing = parent;
            }
            _ => return absolute,
        }
    }
}

/// The host's name (empty when it cannot be read).
/// The host name (a container's is its id unless set), or empty.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: a writable buffer of the length given; gethostname writes at
    // most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Why a client stopped for good, when librdkafka raised a fatal error:
/// for the group member above all, fenced by a newer member with its
/// `group.instance.id`.
pub fn fatal<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
) -> Option<String> {
    let (code, reason) = client.fatal_error()?;
    Some(match code {
        RDKafkaErrorCode::FencedInstanceId => format!(
            "fenced out of the consumer group ({reason}): another process joined it with this \
             instance's group.instance.id; give each instance its own kafka.instance_name \
             (or, when derived, its own metrics_log.path)"
        ),
        _ => format!("the Kafka consumer stopped with a fatal error: {reason}"),
    })
}

/// The producer of packets and dead letters: idempotent, acks=all.
pub fn producer(k: &KafkaSettings) -> ClientConfig {
    let defaults = [
        ("compression.type", name(&k.compression)),
        (
            "message.timeout.ms",
            k.delivery_timeout.as_millis().to_string(),
        ),
        ("linger.ms", "5".into()),
    ];
    let fixed = [("enable.idempotence", "true"), ("acks", "all")];
    layered(k, &defaults, &k.producer, &fixed)
}

/// The transactional producer of `delivery.guarantee = "exactly_once"`:
/// the producer's properties and `transactional.id` = `id`
/// ([`transactional_id`]). librdkafka refuses a `message.timeout.ms` above
/// `transaction.timeout.ms`; the configuration check says so first.
pub fn transactional_producer(k: &KafkaSettings, id: &str) -> ClientConfig {
    let mut c = producer(k);
    c.set("transactional.id", id);
    c
}

/// librdkafka's `transaction.timeout.ms` when the configuration does not set it.
pub const TRANSACTION_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);

/// The producer's `transaction.timeout.ms` as configured (`kafka.client` or
/// `kafka.producer`), or librdkafka's default: how long an open transaction
/// may last before the brokers abort it, and so how long a transaction a
/// vanished instance left open holds back `read_committed` readers.
pub fn transaction_timeout(k: &KafkaSettings) -> Duration {
    producer(k)
        .get("transaction.timeout.ms")
        .and_then(|v| v.trim().parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(TRANSACTION_TIMEOUT_DEFAULT)
}

/// The `transactional.id` of an instance: the group and the instance's name
/// (`kafka.instance_name`, derived by `run` when empty), so that a restarted
/// instance takes its predecessor's id, which fences the predecessor and
/// aborts the transaction it left open, and two instances never share one.
/// Without a name (the metrics log disabled too) the id is new at each
/// start: a transaction left open by a killed process then holds back
/// `read_committed` readers until the brokers abort it, after
/// `transaction.timeout.ms`. The second value says whether the id is stable.
pub fn transactional_id(k: &KafkaSettings) -> (String, bool) {
    if !k.instance_name.is_empty() {
        return (format!("{}.{}", k.group_id, k.instance_name), true);
    }
    let seed = format!(
        "{}-{}-{:?}",
        host_name(),
        std::process::id(),
        std::time::SystemTime::now()
    );
    let digest = Sha256::digest(seed.as_bytes());
    let suffix: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    (format!("{}.{suffix}", k.group_id), false)
}

/// The admin client (topic checks and creation): the producer's properties,
/// as it talks to the same brokers for the same service.
pub fn admin(k: &KafkaSettings) -> ClientConfig {
    let mut c = producer(k);
    c.set("client.id", "login-metrics-admin");
    c
}

/// The checkpoint writer: the producer's properties, records sent at once.
pub fn checkpoint_writer(k: &KafkaSettings) -> ClientConfig {
    let mut c = producer(k);
    c.set("linger.ms", "0")
        .set("client.id", "login-metrics-checkpoints");
    c
}

/// The checkpoint reader: the consumer's properties, assigned and never
/// subscribed, so it joins no group and commits nothing.
pub fn checkpoint_reader(k: &KafkaSettings) -> ClientConfig {
    let mut c = consumer(k);
    // Exactly once, a commit's checkpoints are in its transaction: those of
    // an aborted one must never be read, whatever kafka.consumer says.
    c.set("enable.partition.eof", "true")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("client.id", "login-metrics-checkpoints");
    c.set_log_level(RDKafkaLogLevel::Error);
    c
}

/// Why the brokers refuse this service outright — credentials or trust that
/// no retry will change — naming the settings to fix; `None` for errors
/// librdkafka retries with a chance of success (an unreachable broker).
pub fn refusal(error: &KafkaError, reason: &str) -> Option<String> {
    let text = if reason.is_empty() {
        error.to_string()
    } else {
        reason.to_string()
    };
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
            Some(format!(
                "the brokers refused the credentials ({text}): check kafka.client.sasl.mechanism, \
             kafka.client.sasl.username and kafka.client.sasl.password \
             (LOGIN_METRICS__KAFKA__CLIENT__SASL_PASSWORD)"
            ))
        }
        // Only a certificate the CA does not vouch for: a handshake cut
        // short by a restarting broker is reported as SSL too, and passes.
        Some(RDKafkaErrorCode::SSL)
            if text.contains("certificate verify failed")
                || text.contains("verify that ssl.ca.location") =>
        {
            Some(format!(
                "the TLS handshake with the brokers failed ({text}): check \
             kafka.client.ssl.ca.location (the CA that signed the brokers' certificates) \
             and kafka.client.security.protocol"
            ))
        }
        _ => None,
    }
}

/// The first [`refusal`] any client of the process was told of.
static REFUSED: Mutex<Option<String>> = Mutex::new(None);

/// The first refusal any client was told of: consulted at start-up, where
/// it stops the start instead of leaving librdkafka to retry forever.
pub fn refused() -> Option<String> {
    REFUSED.lock().expect("refusal lock").clone()
}

/// Kinds of Kafka client error logged in the last [`KAFKA_REPEAT`], with how
/// many repeats were kept at DEBUG since.
static KAFKA_LOGGED: std::sync::Mutex<Vec<(String, Instant, u64)>> =
    std::sync::Mutex::new(Vec::new());
/// How often one kind of Kafka client error is logged at WARN.
const KAFKA_REPEAT: Duration = Duration::from_secs(60);

/// Reports an error librdkafka gives a client's error callback.
///
/// librdkafka retries these on its own, and one broker failure reaches every
/// client of the process (consumer, producer, checkpoint store), each more
/// than once: a refused connection, then "all brokers are down". So each
/// kind of error is one WARN line a minute for the whole process, the rest
/// DEBUG, and every report counts in [`KAFKA_ERRORS`].
pub fn report_error(client: &'static str, error: &KafkaError, reason: &str) {
    // The end of a partition, which a reader asked to be told of
    // (`enable.partition.eof`), arrives here when it comes after the reader
    // stopped polling (a checkpoint read that reached its end): no failure.
    if matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::PartitionEOF)
    ) {
        tracing::debug!(client, error = %error, "kafka {client}: {reason}");
        return;
    }
    metrics::counter!(KAFKA_ERRORS, "client" => client).increment(1);
    if let Some(r) = refusal(error, reason) {
        REFUSED.lock().expect("refusal lock").get_or_insert(r);
    }
    let code = error.rdkafka_error_code();
    // Always follows a failure of its own, which is the line that says why.
    if matches!(code, Some(RDKafkaErrorCode::AllBrokersDown)) {
        tracing::debug!(client, error = %error, "kafka {client}: {reason}");
        return;
    }
    let kind = code.map_or_else(|| error.to_string(), |c| format!("{c:?}"));
    let now = Instant::now();
    let repeats = {
        let mut logged = KAFKA_LOGGED.lock().expect("kafka log lock");
        match logged.iter_mut().find(|(k, _, _)| *k == kind) {
            Some((_, at, n)) if now.duration_since(*at) < KAFKA_REPEAT => {
                *n += 1;
                None
            }
            Some((_, at, n)) => {
                *at = now;
                Some(std::mem::take(n))
            }
            None => {
                logged.push((kind, now, 0));
                Some(0)
            }
        }
    };
    match repeats {
        Some(repeats) => tracing::warn!(
            client,
            error = %error,
            repeats,
            "kafka {client}: {reason} (librdkafka retries on its own)"
        ),
        None => tracing::debug!(client, error = %error, "kafka {client}: {reason}"),
    }
}

/// Routes librdkafka's own log lines. Its connection failures (facilities
/// `FAIL` and `ERROR`) also reach [`report_error`], which logs them once; so
/// they stay at DEBUG here. Nothing librdkafka logs is fatal to the service
/// (it retries), so nothing is above WARN.
pub fn route_log(client: &'static str, level: RDKafkaLogLevel, fac: &str, message: &str) {
    use RDKafkaLogLevel::*;
    match level {
        Emerg | Alert | Critical | Error if fac == "FAIL" || fac == "ERROR" => {
            tracing::debug!(target: "librdkafka", client, "{fac}: {message}")
        }
        Emerg | Alert | Critical | Error | Warning => {
            tracing::warn!(target: "librdkafka", client, "{fac}: {message}")
        }
        Notice | Info => tracing::info!(target: "librdkafka", client, "{fac}: {message}"),
        Debug => tracing::debug!(target: "librdkafka", client, "{fac}: {message}"),
    }
}

/// The context of a Kafka client with nothing else to do: its errors and log
/// lines go through [`report_error`] and [`route_log`].
pub struct KafkaContext(pub &'static str);

impl rdkafka::client::ClientContext for KafkaContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        route_log(self.0, level, fac, message);
    }
    fn error(&self, error: KafkaError, reason: &str) {
        report_error(self.0, &error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for KafkaContext {}

impl rdkafka::producer::ProducerContext for KafkaContext {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::producer::DeliveryResult<'_>, _: ()) {}
}

/// The high watermark librdkafka last saw for a partition, from its fetch
/// responses (no request is made); `None` before the first.
pub fn cached_high_watermark<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
    partition: i32,
) -> Option<i64> {
    let topic = std::ffi::CString::new(topic).ok()?;
    let (mut low, mut high) = (-1i64, -1i64);
    // SAFETY: a live client handle, a NUL-terminated topic name and two
    // valid out-pointers; librdkafka only reads its own cached state.
    let err = unsafe {
        rdkafka::bindings::rd_kafka_get_watermark_offsets(
            client.native_ptr(),
            topic.as_ptr(),
            partition,
            &mut low,
            &mut high,
        )
    };
    (err == rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0)
        .then_some(high)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;

    fn settings(env: &[(&str, &str)]) -> Settings {
        let env = env
            .iter()
            .map(|(k, v)| (format!("LOGIN_METRICS__{k}"), v.to_string()));
        Settings::load_with_env(None, env).unwrap()
    }

    #[test]
    fn kafka_client_reaches_every_client_over_the_services_defaults() {
        let s = settings(&[
            ("KAFKA__CLIENT__SECURITY_PROTOCOL", "SASL_SSL"),
            ("KAFKA__CLIENT__LINGER_MS", "50"),
            ("KAFKA__CLIENT__FETCH_WAIT_MAX_MS", "250"),
            ("KAFKA__PRODUCER__LINGER_MS", "20"),
        ]);
        let k = &s.kafka;
        for (name, c) in [
            ("consumer", consumer(k)),
            ("producer", producer(k)),
            ("admin", admin(k)),
            ("checkpoint writer", checkpoint_writer(k)),
            ("checkpoint reader", checkpoint_reader(k)),
        ] {
            assert_eq!(c.get("security.protocol"), Some("SASL_SSL"), "{name}");
            assert_eq!(
                c.get("bootstrap.servers"),
                Some(k.bootstrap_servers.as_str())
            );
        }
        // kafka.client over the service's defaults, the client's own table over it.
        assert_eq!(consumer(k).get("fetch.wait.max.ms"), Some("250"));
        assert_eq!(producer(k).get("linger.ms"), Some("20"));
        // What the guarantees rest on stays.
        assert_eq!(consumer(k).get("enable.auto.commit"), Some("false"));
        assert_eq!(producer(k).get("acks"), Some("all"));
        assert_eq!(checkpoint_writer(k).get("linger.ms"), Some("0"));
    }

    #[test]
    fn the_consumer_asks_for_the_classic_protocol_and_only_the_member_carries_the_name() {
        let s = settings(&[("KAFKA__INSTANCE_NAME", "ingest-1")]);
        let k = &s.kafka;
        assert_eq!(consumer(k).get("group.protocol"), Some("classic"));
        assert_eq!(member(k).get("group.protocol"), Some("classic"));
        assert_eq!(member(k).get("group.instance.id"), Some("ingest-1"));
        for (name, c) in [
            ("consumer", consumer(k)),
            ("checkpoint reader", checkpoint_reader(k)),
            ("producer", producer(k)),
        ] {
            assert_eq!(c.get("group.instance.id"), None, "{name}");
        }
        let unnamed = settings(&[]);
        assert_eq!(member(&unnamed.kafka).get("group.instance.id"), None);
    }

    #[test]
    fn a_derived_instance_name_is_stable_for_one_metrics_log_and_distinct_for_another() {
        let k = settings(&[]).kafka;
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let log = real.join("m.log");
        let named = |path: &Path| match Membership::with_host(&k, Some(path), "host-a") {
            Membership::Derived(name) => name,
            other => panic!("derived, not {other:?}"),
        };

        // Before the first start (no file, no directory) as after it, and
        // whichever spelling of the path.
        let nested = real.join("sub/m.log");
        let first = named(&nested);
        std::fs::create_dir(real.join("sub")).unwrap();
        std::fs::write(&nested, "").unwrap();
        assert_eq!(named(&nested), first);
        let before = named(&log);
        std::fs::write(&log, "").unwrap();
        assert_eq!(named(&log), before);
        assert_eq!(named(&dir.path().join("link/m.log")), before);
        assert_eq!(named(&real.join("./sub/../m.log")), before);
        assert!(before.starts_with("host-a-"), "{before}");

        // Another metrics log, or the same path on another host: another name.
        assert_ne!(named(&real.join("other.log")), before);
        assert_ne!(first, before);
        assert_ne!(
            Membership::with_host(&k, Some(&log), "host-b").instance_name(),
            Some(before.as_str())
        );
        // Kafka accepts what is derived, whatever the host is called.
        for host in ["", "..", "db host/été", &"h".repeat(300)] {
            let Membership::Derived(name) = Membership::with_host(&k, Some(&log), host) else {
                panic!("derived");
            };
            assert_eq!(instance_name_problem(&name), None, "{host:?} gave {name}");
        }
    }

    #[test]
    fn a_configured_instance_name_wins_and_without_one_or_a_metrics_log_membership_is_dynamic() {
        let log = Path::new("/var/lib/login-metrics/m.log");
        let named = settings(&[("KAFKA__INSTANCE_NAME", "ingest-1")]).kafka;
        assert_eq!(
            Membership::with_host(&named, Some(log), "host-a"),
            Membership::Named("ingest-1".into())
        );
        assert_eq!(
            Membership::with_host(&named, None, "host-a").instance_name(),
            Some("ingest-1")
        );
        let unnamed = settings(&[]).kafka;
        let dynamic = Membership::with_host(&unnamed, None, "host-a");
        assert_eq!(dynamic, Membership::Dynamic);
        assert_eq!(dynamic.instance_name(), None);
        assert!(dynamic.to_string().contains("dynamic"), "{dynamic}");
    }
}
