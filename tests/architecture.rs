//! The module graph goes one way: protocol leaves (address, dotstuff,
//! codec, window), then config and the store, then inbound (smtp, pop3) and
//! outbound (relay), then the daemon's wiring and the command line. This
//! test reads `src/` and fails when a new cycle appears between top-level
//! modules (a `crate::x` path in code that is not a test).
//!
//! What the listeners and their sessions share (`Shared`, `Peer`, `Phase`)
//! is in `shared`, below both, so `server` may start sessions without the
//! sessions needing `server`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Modules allowed in a cycle, while one is being taken apart: none.
const STILL_TANGLED: &[&str] = &[];

fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&src).unwrap();
            let top = rel
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_string();
            if top == "main" || top == "lib" {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // Code only: not the tests, not comments.
            let code: String = text
                .split("#[cfg(test)]")
                .next()
                .unwrap_or("")
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            let deps = graph.entry(top.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + 7..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() && name != top {
                    deps.insert(name);
                }
            }
        }
    }
    graph
}

/// The modules reachable from `from`.
fn reach(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_string()];
    while let Some(m) = todo.pop() {
        for d in graph.get(&m).into_iter().flatten() {
            if seen.insert(d.clone()) {
                todo.push(d.clone());
            }
        }
    }
    seen
}

#[test]
fn no_new_cycles_between_top_level_modules() {
    let graph = module_graph();
    assert!(
        graph.contains_key("relay") && graph.contains_key("smtp"),
        "{graph:?}"
    );
    let mut tangled = BTreeSet::new();
    for m in graph.keys() {
        if reach(&graph, m).contains(m) {
            tangled.insert(m.clone());
        }
    }
    let allowed: BTreeSet<String> = STILL_TANGLED.iter().map(|s| s.to_string()).collect();
    let new: Vec<&String> = tangled.difference(&allowed).collect();
    assert!(
        new.is_empty(),
        "modules in a dependency cycle: {new:?} (graph: {graph:#?})"
    );
}

#[test]
fn the_leaves_depend_on_nothing_above_them() {
    let graph = module_graph();
    for (leaf, may) in [
        ("address", &[][..]),
        ("dotstuff", &[][..]),
        ("window", &[][..]),
        ("codec", &[][..]),
        ("config", &["window"][..]),
        ("aliases", &["address", "config"][..]),
        ("metrics", &[][..]),
    ] {
        let deps = graph.get(leaf).cloned().unwrap_or_default();
        let extra: Vec<&String> = deps.iter().filter(|d| !may.contains(&d.as_str())).collect();
        assert!(extra.is_empty(), "{leaf} uses {extra:?}");
    }
}
