//! The module layering, checked from the sources: no cycles between the crate's top-level
//! modules, so wiring (`app`, `cli`) stays on top and nothing imports upward; and the
//! client crate stays free of the server.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/store/sqlite.rs` -> `store`).
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).ok()?;
    let first = relative.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" | "bin" => None,
        name => Some(name.trim_end_matches(".rs").to_owned()),
    }
}

/// Which top-level modules each top-level module names through `crate::`.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(&src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(from) = top_module(&src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        let uses = graph.entry(from.clone()).or_default();
        for (index, _) in text.match_indices("crate::") {
            let rest = &text[index + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name != from && modules.contains(&name) {
                uses.insert(name);
            }
        }
        // `use crate::{a, b::c}` groups.
        for (index, _) in text.match_indices("crate::{") {
            let rest = &text[index + "crate::{".len()..];
            let group = &rest[..rest.find('}').unwrap_or(rest.len())];
            for part in group.split(',') {
                let name = part.trim().split("::").next().unwrap_or("").to_owned();
                if name != from && modules.contains(&name) {
                    uses.insert(name);
                }
            }
        }
    }
    graph
}

/// A cycle through `node`, if the depth-first search finds one.
fn find_cycle(
    graph: &BTreeMap<String, BTreeSet<String>>,
    node: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(start) = path.iter().position(|n| n == node) {
        let mut cycle = path[start..].to_vec();
        cycle.push(node.to_owned());
        return Some(cycle);
    }
    if done.contains(node) {
        return None;
    }
    path.push(node.to_owned());
    for next in graph.get(node).into_iter().flatten() {
        if let Some(cycle) = find_cycle(graph, next, path, done) {
            return Some(cycle);
        }
    }
    path.pop();
    done.insert(node.to_owned());
    None
}

#[test]
fn top_level_modules_import_each_other_without_cycles() {
    let graph = module_graph();
    assert!(
        graph.contains_key("app") && graph.contains_key("store"),
        "{graph:?}"
    );
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = find_cycle(&graph, node, &mut Vec::new(), &mut done) {
            panic!(
                "import cycle between top-level modules: {}\nwhole graph: {graph:#?}",
                cycle.join(" -> ")
            );
        }
    }
    // The layering the architecture describes: the domain imports nothing of ours but the
    // clock, and the wiring is imported by nobody but the command line.
    let domain_uses = &graph["domain"];
    assert!(
        domain_uses.iter().all(|m| m == "clock"),
        "domain must stay pure: {domain_uses:?}"
    );
    for (module, uses) in &graph {
        if module != "cli" {
            assert!(!uses.contains("app"), "{module} imports app");
        }
    }
}

/// The client crate (`crates/morag-jobs-client`) is what a worker machine or another Rust
/// program builds: it must not reach into the server, nor bring a database or an HTTP
/// server along.
#[test]
fn the_client_crate_depends_on_nothing_of_the_server() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/morag-jobs-client");
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    assert!(files.len() >= 3, "the client crate's sources: {files:?}");
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        assert!(
            !text.contains("morag_jobs::"),
            "{} names the server crate",
            file.display()
        );
    }
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let dependencies = &manifest[manifest.find("[dependencies]").expect("a dependency table")..];
    let names: Vec<&str> = dependencies
        .lines()
        .skip(1)
        .take_while(|line| !line.starts_with('['))
        .filter_map(|line| line.split_once('=').map(|(name, _)| name.trim()))
        .filter(|name| !name.starts_with('#'))
        .collect();
    assert!(names.contains(&"reqwest"), "{names:?}");
    for server_only in [
        "morag-jobs",
        "rusqlite",
        "tokio-postgres",
        "axum",
        "hyper",
        "mimalloc",
    ] {
        assert!(
            !names.contains(&server_only),
            "the client crate depends on {server_only}: {names:?}"
        );
    }
}
