//! The code's structure, checked: module dependencies follow the flow drawn
//! in the crate root (`src/lib.rs`, "Module dependencies"), without cycles;
//! every module says its role in a `//!` line; no file in `src/` has more
//! than 500 lines before its unit tests.
//!
//! Dependencies are read from the source text: every `crate::name` path
//! (including `use crate::{a, b::c}` groups), comments left out, the unit
//! test module of each file included. Run `cargo test --test architecture`
//! after moving code between modules.

// A test (or bench) that cannot set up fails, saying why.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Longest part of a file before its `#[cfg(test)]` module, in lines.
const MAX_LINES: usize = 500;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        panic!("cannot list {}", dir.display());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The top-level module a file belongs to (`src/sink/writer.rs` -> `sink`);
/// `None` for the crate root and the binary.
fn module_of(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src()).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_string())
}

/// The text without `//` comments (doc comments included).
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            // A `//` inside a string literal (a URL) is rare in paths; the
            // paths we look for never follow one on the same line.
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Names after `crate::`: `crate::a::b` gives `a`, `crate::{a, b::c}` gives
/// `a` and `b`.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(group) = after.strip_prefix('{') {
            // Top-level names of the group: the first identifier of each
            // comma-separated item at brace depth 0.
            let mut depth = 0;
            let mut item_start = true;
            let mut ident = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => ident.push(c),
                    _ if item_start && !ident.is_empty() => {
                        found.insert(std::mem::take(&mut ident));
                        item_start = false;
                    }
                    _ => {}
                }
            }
            if !ident.is_empty() {
                found.insert(ident);
            }
        } else {
            let ident: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !ident.is_empty() {
                found.insert(ident);
            }
        }
        rest = after;
    }
    found
}

/// Each module's dependencies as the code has them.
fn actual() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(&file) else {
            continue;
        };
        let uses = crate_paths(&without_comments(&read(&file)));
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(uses.into_iter().filter(|u| *u != module));
    }
    graph
}

/// Each module's dependencies as `src/lib.rs` documents them.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let lib = read(&src().join("lib.rs"));
    let mut graph = BTreeMap::new();
    for line in lib.lines() {
        let Some(item) = line.strip_prefix("//! - `") else {
            continue;
        };
        let Some((module, rest)) = item.split_once("` uses ") else {
            continue;
        };
        let uses: BTreeSet<String> = if rest.trim() == "nothing" {
            BTreeSet::new()
        } else {
            rest.split(',').map(|s| s.trim().to_string()).collect()
        };
        graph.insert(module.to_string(), uses);
    }
    graph
}

/// A cycle in `graph`, if there is one, as the path that closes it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn module_dependencies_match_the_crate_root_and_have_no_cycle() {
    let actual = actual();
    assert!(
        actual.contains_key("sink") && actual.contains_key("source"),
        "the scan found the stages: {actual:?}"
    );
    if let Some(cycle) = find_cycle(&actual) {
        panic!("import cycle: {}", cycle.join(" -> "));
    }
    let documented = documented();
    let mut differences = Vec::new();
    for module in actual
        .keys()
        .chain(documented.keys())
        .collect::<BTreeSet<_>>()
    {
        let empty = BTreeSet::new();
        let code = actual.get(module).unwrap_or(&empty);
        let doc = documented.get(module).unwrap_or(&empty);
        if code != doc {
            differences.push(format!(
                "- `{module}` uses {} (src/lib.rs says {})",
                code.iter().cloned().collect::<Vec<_>>().join(", "),
                doc.iter().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "src/lib.rs's module dependencies disagree with the code:\n{}",
        differences.join("\n")
    );
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec![]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(
        crate_paths(
            "use crate::{alerts::Alert, model::{Micros, X}, sink};\nlet x = crate::tls::y;"
        ),
        ["alerts", "model", "sink", "tls"]
            .into_iter()
            .map(String::from)
            .collect()
    );
}

#[test]
fn every_module_says_its_role_and_stays_short() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut problems = Vec::new();
    for file in &files {
        let text = read(file);
        let name = file
            .strip_prefix(src())
            .unwrap_or(file)
            .display()
            .to_string();
        if !text.starts_with("//!") {
            problems.push(format!("{name}: does not open with a `//!` line"));
        }
        let code_lines = text
            .lines()
            .take_while(|l| !l.starts_with("#[cfg(test)]"))
            .count();
        if code_lines > MAX_LINES {
            problems.push(format!(
                "{name}: {code_lines} lines before its tests (at most {MAX_LINES})"
            ));
        }
    }
    assert!(files.len() > 30, "found the sources: {}", files.len());
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
