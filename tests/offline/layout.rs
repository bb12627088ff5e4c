//! The pure core stays pure: no module of `src/core` or `src/work.rs`
//! names a Kafka, tokio or HTTP type, directly or through a module of the
//! crate it imports (followed transitively, test modules aside). The core's
//! decisions can then be tested, benchmarked and fuzzed without a runtime or
//! a broker, and the async shell stays thin.

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// Crates whose types must not reach the core.
const FORBIDDEN: [&str; 5] = ["rdkafka", "tokio", "tokio_util", "axum", "hyper"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// A module's code without comments (doc links are not imports) and
/// without its `#[cfg(test)]` module.
fn code(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => &text[..],
    };
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The file of the module `crate::a::b::...` names (its longest prefix that is a module).
fn module_file(path: &[&str]) -> Option<PathBuf> {
    (1..=path.len()).rev().find_map(|n| {
        let rel: PathBuf = path[..n].iter().collect();
        let file = src().join(&rel).with_extension("rs");
        let dir = src().join(&rel).join("mod.rs");
        [file, dir].into_iter().find(|f| f.is_file())
    })
}

/// Every module file the core depends on, itself included.
fn core_closure() -> BTreeSet<PathBuf> {
    let mut queue: VecDeque<PathBuf> = VecDeque::new();
    let mut stack = vec![src().join("core")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("src/core is readable") {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs") {
                queue.push_back(p);
            }
        }
    }
    queue.push_back(src().join("work.rs"));
    let mut seen = BTreeSet::new();
    while let Some(file) = queue.pop_front() {
        if !seen.insert(file.clone()) {
            continue;
        }
        let text = code(&file);
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let path: Vec<&str> = rest
                .split("::")
                .map(|s| {
                    s.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .next()
                        .unwrap_or("")
                })
                .take_while(|s| !s.is_empty() && s.chars().next().is_some_and(|c| c.is_lowercase()))
                .collect();
            if let Some(f) = module_file(&path) {
                queue.push_back(f);
            }
        }
    }
    seen
}

/// The forbidden crates `text` names in code (comments aside).
fn forbidden_in(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| {
            FORBIDDEN
                .iter()
                .any(|c| l.contains(&format!("{c}::")) || l.contains(&format!("use {c}")))
        })
        .map(|l| format!("`{}`", l.trim()))
        .collect()
}

#[test]
fn the_core_depends_on_no_kafka_tokio_or_http_type() {
    let closure = core_closure();
    let core_files = closure
        .iter()
        .filter(|f| f.starts_with(src().join("core")))
        .count();
    assert!(core_files >= 5, "the core was not found: {closure:?}");
    let mut found = Vec::new();
    for file in &closure {
        for line in forbidden_in(&code(file)) {
            found.push(format!(
                "{}: {line}",
                file.strip_prefix(src()).unwrap().display()
            ));
        }
    }
    assert!(
        found.is_empty(),
        "the pure core reaches Kafka, tokio or HTTP types through:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_sees_a_forbidden_import() {
    // The detector itself: a use of each forbidden crate is found, a
    // mention in a comment is not.
    for c in FORBIDDEN {
        assert_eq!(forbidden_in(&format!("use {c}::X;")).len(), 1, "{c}");
        assert!(forbidden_in(&format!("{c}_like::X")).is_empty(), "{c}");
    }
    assert!(module_file(&["core", "grouping", "window", "Windower"]).is_some());
}
