//! Configuration loading on arbitrary input: the defaults, then a TOML layer,
//! then environment variables, all from the input and none from the process.
//!
//! The input is the TOML text, optionally followed by a NUL byte and lines
//! `SECTION__KEY=VALUE`, each becoming `LOGIN_METRICS__SECTION__KEY`. Loading
//! must never panic; a rejection lists at least one problem, each with a
//! message; an accepted configuration prints (`login-metrics config`) as TOML
//! that loads again to the same configuration.
//!
//! `privacy.key_file` is always overridden with an empty value so that the
//! fuzzer never makes the loader read a file of its choosing.

#![no_main]

use libfuzzer_sys::fuzz_target;
use login_metrics::settings::{ConfigError, ENV_PREFIX};
use login_metrics::Settings;

const KEY_FILE: &str = "PRIVACY__KEY_FILE";

fn env_pairs(text: &str) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .filter(|(k, _)| !k.to_lowercase().contains("key_file"))
        .map(|(k, v)| (format!("{ENV_PREFIX}__{k}"), v.to_string()))
        .collect();
    env.push((format!("{ENV_PREFIX}__{KEY_FILE}"), String::new()));
    env
}

fn check_rejected(err: &ConfigError) {
    assert!(!err.problems.is_empty(), "an error without problems");
    for p in &err.problems {
        assert!(
            !p.message.is_empty(),
            "problem at `{}` without a message",
            p.key
        );
    }
    let _ = err.to_string();
}

fuzz_target!(|data: &[u8]| {
    let (toml, env) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(toml) = std::str::from_utf8(toml) else {
        return;
    };
    let env = env_pairs(&String::from_utf8_lossy(env));
    match Settings::load_from_str(toml, env.clone()) {
        Ok(settings) => {
            // What `login-metrics config` and the start-up log print.
            let printed = settings.redacted_toml();
            let _ = settings.redacted_summary();
            let _ = format!("{settings:?}");
            // Secrets print as "<redacted>", itself a valid value, so the
            // printed configuration is a configuration file that loads to
            // the same printed configuration.
            match Settings::load_from_str(&printed, env_pairs("")) {
                Ok(again) => assert_eq!(again.redacted_toml(), printed),
                Err(e) => panic!("the printed configuration does not load: {e}\n{printed}"),
            }
        }
        Err(e) => check_rejected(&e),
    }
});
