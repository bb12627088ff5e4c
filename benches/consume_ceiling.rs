//! The consume-only ceiling: a bare librdkafka consumer with the service's own
//! consumer settings (group join, fetch sizes, `kafka.consumer` overrides from
//! the configuration layers) that reads every message of a preloaded topic and
//! only touches its payload length — in bulk, the way the service fetches
//! ([`login_metrics::source::fetch`]), or one message per `poll`. `scripts/bench-e2e` runs it next to
//! `login-metrics run` against the same topic; what the service reaches is
//! measured against it.
//!
//! Configured by the environment:
//!
//! - `CONSUME_CEILING_BOOTSTRAP`: the brokers (without it the bench is skipped
//!   and exits 0, so a plain `cargo bench` needs no broker);
//! - `CONSUME_CEILING_TOPIC`: the topic (default: `kafka.input_topic`);
//! - `CONSUME_CEILING_MESSAGES`: how many messages the topic holds;
//! - `CONSUME_CEILING_STALL`: seconds without a message before giving up (default 60);
//! - `CONSUME_CEILING_FETCH`: `batch` (default) or `poll`.
//!
//! Prints one human-readable line on stderr and one JSON object on stdout:
//! `messages`, `payload_bytes`, `first_message_s` (from start, group join
//! included), `steady_s` and `steady_per_s` (from the first message to the
//! last), `cpu_s` (user + system, all threads) and `peak_rss_kb`.

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use login_metrics::kafka;
use login_metrics::settings::Settings;
use login_metrics::source::fetch::{FetchQueue, RoutingContext, FETCH_MAX};
use rdkafka::consumer::{BaseConsumer, Consumer};

fn main() -> ExitCode {
    let Ok(bootstrap) = std::env::var("CONSUME_CEILING_BOOTSTRAP") else {
        eprintln!(
            "consume_ceiling: skipped: set CONSUME_CEILING_BOOTSTRAP, CONSUME_CEILING_TOPIC and \
             CONSUME_CEILING_MESSAGES to run it against a broker with a preloaded topic \
             (scripts/bench-e2e does)"
        );
        return ExitCode::SUCCESS;
    };
    match run(&bootstrap) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("consume_ceiling: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(bootstrap: &str) -> Result<(), String> {
    let expected: u64 = std::env::var("CONSUME_CEILING_MESSAGES")
        .map_err(|_| "CONSUME_CEILING_MESSAGES (the number of messages to read) is not set")?
        .parse()
        .map_err(|e| format!("CONSUME_CEILING_MESSAGES: {e}"))?;
    let stall = match std::env::var("CONSUME_CEILING_STALL") {
        Ok(s) => Duration::from_secs(
            s.parse()
                .map_err(|e| format!("CONSUME_CEILING_STALL: {e}"))?,
        ),
        Err(_) => Duration::from_secs(60),
    };
    // The service's configuration layers (defaults, LOGIN_METRICS__* variables),
    // so the consumer is configured exactly as `login-metrics run` configures it.
    let mut settings = Settings::load(None).map_err(|e| e.to_string())?;
    let k = &mut settings.kafka;
    k.bootstrap_servers = bootstrap.to_string();
    if let Ok(topic) = std::env::var("CONSUME_CEILING_TOPIC") {
        k.input_topic = topic;
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    k.group_id = format!("consume-ceiling-{}-{nanos}", std::process::id());

    let started = Instant::now();
    let batch = match std::env::var("CONSUME_CEILING_FETCH").as_deref() {
        Ok("batch") | Err(_) => true,
        Ok("poll") => false,
        Ok(other) => {
            return Err(format!(
                "CONSUME_CEILING_FETCH: `{other}` is neither batch nor poll"
            ))
        }
    };
    let consumer: BaseConsumer<RoutingContext> = kafka::consumer(k)
        .create_with_context(RoutingContext::default())
        .map_err(|e| format!("cannot create the consumer: {e}"))?;
    consumer
        .subscribe(&[&k.input_topic])
        .map_err(|e| format!("cannot subscribe to {}: {e}", k.input_topic))?;

    let (mut messages, mut bytes, mut errors) = (0u64, 0u64, 0u64);
    let mut first: Option<Instant> = None;
    let mut last = started;
    let mut fetch = batch.then(|| FetchQueue::new(&consumer, &consumer.context().routes));
    while messages < expected {
        if let Some(fetch) = fetch.as_mut() {
            // Rebalances and errors; the messages come through `fetch`.
            if let Some(Err(e)) = consumer.poll(Duration::ZERO) {
                errors += 1;
                if errors <= 5 {
                    eprintln!("consume_ceiling: consumer error (librdkafka retries): {e}");
                }
            }
            let fetched = fetch.fetch(Duration::from_millis(100), FETCH_MAX);
            if !fetched.is_empty() {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                for m in fetched.messages() {
                    if m.error().is_none() {
                        messages += 1;
                        bytes += m.payload.len() as u64;
                    }
                }
            }
        } else {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let now = Instant::now();
                    first.get_or_insert(now);
                    last = now;
                    messages += 1;
                    bytes += m.payload_len() as u64;
                }
                Some(Err(e)) => {
                    errors += 1;
                    if errors <= 5 {
                        eprintln!("consume_ceiling: consumer error (librdkafka retries): {e}");
                    }
                }
                None => {}
            }
        }
        if last.elapsed() >= stall {
            return Err(format!(
                "no message for {}s after {messages} of {expected} from {}",
                stall.as_secs(),
                k.input_topic
            ));
        }
    }
    let first = first.unwrap_or(last);
    let steady = last.duration_since(first).as_secs_f64();
    let per_s = if steady > 0.0 {
        (messages - 1) as f64 / steady
    } else {
        f64::NAN
    };
    let (cpu_s, peak_rss_kb) = usage();
    let first_message_s = first.duration_since(started).as_secs_f64();
    eprintln!(
        "consume_ceiling: {messages} messages ({bytes} payload bytes) from {}: first after \
         {first_message_s:.2}s, then {per_s:.0} messages/s over {steady:.2}s; CPU {cpu_s:.2}s, \
         peak RSS {:.0} MB",
        k.input_topic,
        peak_rss_kb as f64 / 1024.0
    );
    println!(
        "{}",
        serde_json::json!({
            "fetch": if batch { "batch" } else { "poll" },
            "messages": messages,
            "payload_bytes": bytes,
            "first_message_s": first_message_s,
            "steady_s": steady,
            "steady_per_s": per_s,
            "cpu_s": cpu_s,
            "peak_rss_kb": peak_rss_kb,
        })
    );
    Ok(())
}

/// CPU seconds (user + system, every thread) and peak RSS in kB of this process.
fn usage() -> (f64, i64) {
    // SAFETY: getrusage only writes the struct it is given.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(ru.ru_utime) + secs(ru.ru_stime), ru.ru_maxrss)
}
