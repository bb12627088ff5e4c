//! The Dockerfile builds from what it copies: its build stage's `COPY` lines
//! are laid out in an empty directory (minus what `.dockerignore` leaves out)
//! and cargo checks the binary there, reading the manifest and every target it
//! declares, as `docker build` would. No Docker engine is needed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions(dockerfile: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

/// `.dockerignore` patterns as the repository uses them: a path from the
/// context's root, or `*.ext`.
fn ignored(patterns: &[String], relative: &Path) -> bool {
    let text = relative.to_string_lossy();
    patterns.iter().any(|p| match p.strip_prefix("*.") {
        Some(ext) => relative.extension().is_some_and(|e| e == ext),
        None => text == p.as_str() || text.starts_with(&format!("{p}/")),
    })
}

fn copy_into(from: &Path, to: &Path, context: &Path, patterns: &[String]) {
    let relative = from.strip_prefix(context).unwrap();
    if ignored(patterns, relative) {
        return;
    }
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            copy_into(
                &entry.path(),
                &to.join(entry.file_name()),
                context,
                patterns,
            );
        }
    } else {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
}

/// Lays out what the build stage's COPY lines copy under `dir` (the stage's
/// WORKDIR) and returns the stage's RUN instructions.
fn lay_out_build_stage(dir: &Path) -> Vec<String> {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let patterns: Vec<String> = std::fs::read_to_string(root().join(".dockerignore"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/').trim_end_matches('/').to_string())
        .collect();
    let mut runs = Vec::new();
    let mut stage = 0;
    for instruction in instructions(&dockerfile) {
        let (word, rest) = instruction.split_once(' ').unwrap_or((&instruction, ""));
        match word.to_ascii_uppercase().as_str() {
            "FROM" => stage += 1,
            "COPY" if stage == 1 => {
                let args: Vec<&str> = rest.split_whitespace().collect();
                assert!(
                    !args.iter().any(|a| a.starts_with("--")),
                    "build stage COPY with options: {instruction}"
                );
                let (dest, sources) = args.split_last().unwrap();
                for source in sources {
                    let from = root().join(source);
                    assert!(
                        from.exists(),
                        "the Dockerfile copies {source}, which does not exist"
                    );
                    let to: PathBuf = if dest.ends_with('/') || sources.len() > 1 {
                        dir.join(dest).join(Path::new(source).file_name().unwrap())
                    } else {
                        dir.join(dest)
                    };
                    copy_into(&from, &to, root(), &patterns);
                }
            }
            "RUN" if stage == 1 => runs.push(rest.to_string()),
            _ => {}
        }
    }
    assert_eq!(stage, 2, "a build stage and a runtime stage");
    runs
}

#[test]
fn the_build_stage_compiles_from_what_it_copies() {
    let dir = tempfile::tempdir().unwrap();
    let runs = lay_out_build_stage(dir.path());
    let build = "cargo build --release --locked --bin login-metrics";
    assert!(
        runs.iter().any(|r| r.contains(build)),
        "the build stage runs `{build}`: {runs:?}"
    );
    // `cargo check` reads the manifest, finds every target it declares and
    // compiles the binary's sources (files they include too) without code
    // generation; the dependencies come from this checkout's target directory.
    let out = Command::new(env!("CARGO"))
        .args(["check", "--locked", "--offline", "--bin", "login-metrics"])
        .env("CARGO_TARGET_DIR", root().join("target"))
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo cannot build the image's binary from what the Dockerfile copies:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_image_carries_a_stripped_binary_and_no_unread_configuration() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let all = instructions(&dockerfile).join("\n");
    assert!(all.contains("CARGO_PROFILE_RELEASE_STRIP=symbols"), "{all}");
    assert!(all.contains("CARGO_PROFILE_RELEASE_DEBUG=false"), "{all}");
    // The defaults are compiled in; a copied config folder would be read by nothing.
    assert!(!all.contains("/etc/login-metrics"), "{all}");
}
