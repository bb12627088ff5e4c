//! `config`: the effective configuration, secrets redacted.

use std::process::ExitCode;

use crate::settings::Settings;

/// Prints the effective configuration as TOML that loads again.
pub fn run(s: &Settings) -> ExitCode {
    print!("{}", s.redacted_toml());
    ExitCode::SUCCESS
}
