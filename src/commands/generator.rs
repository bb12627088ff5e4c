//! Realistic, seedable login events, shared by `demo`, `generate`, tests and benches.
//!
//! A pool of users, each with a few devices and usual IPs, logs in with
//! Zipf-skewed popularity, so the same user from the same IP or device really
//! repeats within a batch. App versions, locales and device types are skewed
//! too. About 1% of events miss an optional field (absent or null), timestamps
//! come in every accepted form, and about 0.1% of messages are malformed, one
//! of each invalid kind in turn. The same seed gives the same messages.

use std::fmt::Write as _;

use chrono::{DateTime, SecondsFormat, Utc};
use rand::distributions::Distribution;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::Zipf;

use crate::core::event::ErrorKind;

/// Shape of the generated stream.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    pub seed: u64,
    pub users: usize,
    /// Event time of the first event, epoch milliseconds.
    pub start_ms: i64,
    /// Events per second of event time.
    pub events_per_sec: f64,
    /// Fraction of events that miss one optional field.
    pub missing_rate: f64,
    /// Fraction of messages that are malformed.
    pub malformed_rate: f64,
}

impl GeneratorConfig {
    pub fn new(seed: u64) -> GeneratorConfig {
        GeneratorConfig {
            seed,
            users: 100_000,
            start_ms: 1_700_000_000_000,
            events_per_sec: 1_500.0,
            missing_rate: 0.01,
            malformed_rate: 0.001,
        }
    }
}

/// A generated message: key and payload as produced to Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedMessage {
    pub key: Option<String>,
    pub payload: Vec<u8>,
    /// `Some` when the message was generated to be invalid.
    pub malformed: Option<ErrorKind>,
}

struct User {
    id: String,
    devices: Vec<(String, &'static str)>,
    ips: Vec<String>,
    locale: &'static str,
}

const VERSIONS: [&str; 8] = [
    "2.3.0",
    "2.4.1",
    "2.2.9",
    "2.5.0",
    "2.1.4",
    "2.0.0",
    "1.9.7",
    "3.0.0-beta",
];
const LOCALES: [&str; 12] = [
    "US", "DE", "IN", "BR", "GB", "FR", "JP", "RU", "ES", "CA", "MX", "NG",
];
const DEVICE_TYPES: [&str; 3] = ["android", "iOS", "web"];

pub struct Generator {
    cfg: GeneratorConfig,
    rng: ChaCha8Rng,
    users: Vec<User>,
    user_pick: Zipf<f64>,
    version_pick: Zipf<f64>,
    produced: u64,
    malformed_turn: usize,
}

impl Generator {
    pub fn new(cfg: GeneratorConfig) -> Generator {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let locale_pick = Zipf::new(LOCALES.len() as u64, 1.2).expect("valid zipf");
        let users = (0..cfg.users.max(1))
            .map(|_| {
                let devices = (0..rng.gen_range(1..=3))
                    .map(|_| {
                        let kind = DEVICE_TYPES[weighted(&mut rng, &[55, 40, 5])];
                        let id = format!(
                            "{:03}-{:02}-{:04}",
                            rng.gen_range(0..1000),
                            rng.gen_range(0..100),
                            rng.gen_range(0..10000)
                        );
                        (id, kind)
                    })
                    .collect();
                let ips = (0..rng.gen_range(1..=3))
                    .map(|_| random_ip(&mut rng))
                    .collect();
                User {
                    id: uuid_like(&mut rng),
                    devices,
                    ips,
                    locale: LOCALES[locale_pick.sample(&mut rng) as usize - 1],
                }
            })
            .collect::<Vec<_>>();
        Generator {
            user_pick: Zipf::new(users.len() as u64, 0.6).expect("valid zipf"),
            version_pick: Zipf::new(VERSIONS.len() as u64, 1.3).expect("valid zipf"),
            users,
            rng,
            produced: 0,
            malformed_turn: 0,
            cfg,
        }
    }

    /// Event time of the next event: advances at `events_per_sec`, with a
    /// little disorder, as producers deliver out of order.
    fn next_ts_ms(&mut self) -> i64 {
        let base =
            self.cfg.start_ms as f64 + self.produced as f64 * 1000.0 / self.cfg.events_per_sec;
        let jitter = self.rng.gen_range(-500.0..500.0);
        (base + jitter).max(0.0) as i64
    }

    pub fn next_message(&mut self) -> GeneratedMessage {
        let ts = self.next_ts_ms();
        self.produced += 1;
        if self.rng.gen_bool(self.cfg.malformed_rate) {
            let kind = ErrorKind::ALL[self.malformed_turn % ErrorKind::ALL.len()];
            self.malformed_turn += 1;
            return GeneratedMessage {
                key: None,
                payload: malformed(kind, ts).into_bytes(),
                malformed: Some(kind),
            };
        }
        let user = &self.users[self.user_pick.sample(&mut self.rng) as usize - 1];
        let device =
            &user.devices[weighted(&mut self.rng, &[80, 15, 5]).min(user.devices.len() - 1)];
        let ip_index = weighted(&mut self.rng, &[75, 15, 10]);
        let fresh_ip;
        let ip: &str = if ip_index < user.ips.len() {
            &user.ips[ip_index]
        } else {
            // Travel or a mobile network: an address seen once.
            fresh_ip = random_ip(&mut self.rng);
            &fresh_ip
        };
        let version = VERSIONS[self.version_pick.sample(&mut self.rng) as usize - 1];
        let locale = if self.rng.gen_bool(0.95) {
            user.locale
        } else {
            LOCALES[self.rng.gen_range(0..LOCALES.len())]
        };
        let missing = if self.rng.gen_bool(self.cfg.missing_rate) {
            Some(self.rng.gen_range(0..5usize))
        } else {
            None
        };
        let null_instead = self.rng.gen_bool(0.5);
        let ts_form = weighted(&mut self.rng, &[55, 25, 10, 10]);

        let mut out = String::with_capacity(200);
        out.push('{');
        write!(out, r#""user_id":"{}""#, user.id).unwrap();
        let optional: [(&str, &str); 5] = [
            ("app_version", version),
            ("device_type", device.1),
            ("ip", ip),
            ("locale", locale),
            ("device_id", &device.0),
        ];
        for (i, (name, value)) in optional.iter().enumerate() {
            if missing == Some(i) {
                if null_instead {
                    write!(out, r#","{name}":null"#).unwrap();
                }
                continue;
            }
            write!(out, r#","{name}":"{value}""#).unwrap();
        }
        match ts_form {
            // The exercise's own producer sends epoch seconds as a string.
            0 => write!(out, r#","timestamp":"{}""#, ts / 1000),
            1 => write!(out, r#","timestamp":{}"#, ts / 1000),
            2 => write!(out, r#","timestamp":{ts}"#),
            _ => write!(
                out,
                r#","timestamp":"{}""#,
                DateTime::<Utc>::from_timestamp_millis(ts)
                    .expect("in range")
                    .to_rfc3339_opts(SecondsFormat::Secs, true)
            ),
        }
        .unwrap();
        out.push('}');
        GeneratedMessage {
            key: Some(user.id.clone()),
            payload: out.into_bytes(),
            malformed: None,
        }
    }
}

impl Iterator for Generator {
    type Item = GeneratedMessage;
    fn next(&mut self) -> Option<GeneratedMessage> {
        Some(self.next_message())
    }
}

fn malformed(kind: ErrorKind, ts_ms: i64) -> String {
    let secs = ts_ms / 1000;
    match kind {
        ErrorKind::NotJson => format!(r#"{{"user_id":"trunc","timestamp":{secs}"#),
        ErrorKind::NotObject => format!(r#"["user_id",{secs}]"#),
        ErrorKind::MissingField => format!(r#"{{"ip":"10.0.0.1","timestamp":{secs}}}"#),
        ErrorKind::BadTimestamp => r#"{"user_id":"u-bad-ts","timestamp":"yesterday"}"#.to_string(),
        ErrorKind::WrongType => {
            format!(r#"{{"user_id":"u-num-ip","ip":167772161,"timestamp":{secs}}}"#)
        }
        ErrorKind::Late => unreachable!("the generator makes parse errors only"),
    }
}

/// Index drawn with the given integer weights.
fn weighted(rng: &mut ChaCha8Rng, weights: &[u32]) -> usize {
    let total: u32 = weights.iter().sum();
    let mut x = rng.gen_range(0..total);
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    weights.len() - 1
}

fn random_ip(rng: &mut ChaCha8Rng) -> String {
    format!(
        "{}.{}.{}.{}",
        rng.gen_range(1..224),
        rng.gen_range(0..256),
        rng.gen_range(0..256),
        rng.gen_range(1..255)
    )
}

fn uuid_like(rng: &mut ChaCha8Rng) -> String {
    let a: u128 = rng.gen();
    let h = format!("{a:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::event::{parse, Field, Requirements};

    #[test]
    fn same_seed_same_stream() {
        let a: Vec<_> = Generator::new(GeneratorConfig::new(7)).take(500).collect();
        let b: Vec<_> = Generator::new(GeneratorConfig::new(7)).take(500).collect();
        let c: Vec<_> = Generator::new(GeneratorConfig::new(8)).take(500).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn valid_messages_parse_and_malformed_ones_fail_as_labelled() {
        let req = Requirements {
            fields: vec![Field::UserId],
            timestamp: true,
            not_after_ms: None,
        };
        let mut cfg = GeneratorConfig::new(1);
        cfg.malformed_rate = 0.05;
        let mut kinds = std::collections::HashSet::new();
        let mut missing = 0;
        for m in Generator::new(cfg).take(20_000) {
            match (parse(&m.payload, &req), m.malformed) {
                (Ok(ev), None) => {
                    if Field::ALL.iter().any(|f| ev.get(*f).is_none()) {
                        missing += 1;
                    }
                }
                (Err(e), Some(kind)) => {
                    assert_eq!(e.kind, kind, "{}", String::from_utf8_lossy(&m.payload));
                    kinds.insert(kind);
                }
                (r, k) => panic!(
                    "{:?} vs {k:?}: {}",
                    r.err(),
                    String::from_utf8_lossy(&m.payload)
                ),
            }
        }
        assert_eq!(kinds.len(), ErrorKind::ALL.len());
        assert!(
            (100..400).contains(&missing),
            "about 1% miss a field: {missing}"
        );
    }

    #[test]
    fn duplicates_really_occur_in_a_batch() {
        let req = Requirements::default();
        let mut pairs = std::collections::HashMap::new();
        for m in Generator::new(GeneratorConfig::new(3)).take(10_000) {
            if let Ok(ev) = parse(&m.payload, &req) {
                let key = (
                    ev.get(Field::UserId).map(str::to_owned),
                    ev.get(Field::Ip).map(str::to_owned),
                );
                *pairs.entry(key).or_insert(0u32) += 1;
            }
        }
        let dup_groups = pairs.values().filter(|&&n| n >= 2).count();
        assert!(
            dup_groups > 100,
            "only {dup_groups} repeated (user_id, ip) pairs"
        );
    }
}
