//! `pseudonym`: the keyed pseudonym of each value, so that whoever holds the
//! key can look for a known value in packets.

use std::process::ExitCode;

use crate::core::privacy::Pseudonymizer;
use crate::settings::Settings;

pub fn run(s: &Settings, values: &[String]) -> ExitCode {
    if s.privacy.key.is_empty() {
        eprintln!(
            "login-metrics: privacy.key: no key is configured (privacy.key or privacy.key_file)"
        );
        return ExitCode::from(2);
    }
    let p = Pseudonymizer::new(s.privacy.key.expose().as_bytes(), &[]);
    for v in values {
        println!("{}\t{v}", p.pseudonym(v));
    }
    ExitCode::SUCCESS
}
