//! The daemon's layers point one way: every `crate::` (and `super::`) path
//! in a module names its own layer or one below it ([`memory_manager::LAYERS`],
//! declared once, lowest first); the modules of one layer import each other
//! without cycles; the lowest layers use no protocol or async crate; and
//! every top-level module is a layer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use memory_manager::LAYERS;

/// Layers that must not depend on the wire protocol or an async runtime.
const NO_PROTOCOL: [(&str, &[&str]); 3] = [
    ("memory", &["faultline_proto", "tokio", "tonic", "prost_types"]),
    ("fault", &["faultline_proto", "tokio", "tonic", "prost_types"]),
    ("observe", &["faultline_proto", "tokio", "tonic", "prost_types"]),
];

/// One source file: its module path under the crate root and its code
/// with comments removed.
struct Module {
    file: PathBuf,
    path: Vec<String>,
    code: Vec<(usize, String)>,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn modules() -> Vec<Module> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("reading src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = src_dir();
    let mut files = Vec::new();
    walk(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .filter_map(|file| {
            let rel = file.strip_prefix(&root).expect("under src").to_path_buf();
            let mut path: Vec<String> =
                rel.iter().map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
            if path.last().is_some_and(|l| l == "mod") {
                path.pop();
            }
            // The crate root and the binary are not in a layer.
            if path == ["lib"] || path == ["main"] {
                return None;
            }
            let text = std::fs::read_to_string(&file).expect("reading a source file");
            Some(Module { file: rel, path, code: strip_comments(&text) })
        })
        .collect()
}

/// Lines with `//` comments (and doc comments) removed, numbered from 1.
fn strip_comments(text: &str) -> Vec<(usize, String)> {
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let code = match line.find("//") {
                Some(at) if !line[..at].contains('"') => &line[..at],
                _ => line,
            };
            (i + 1, code.to_string())
        })
        .collect()
}

/// The module paths (from the crate root) that `code` names through
/// `crate::` or `super::`, as written from module `from`.
fn references(from: &[String], line: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes = line.as_bytes();
    let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < bytes.len() {
        let rest = &line[i..];
        let at_word = i == 0 || !is_ident(bytes[i - 1]);
        let (base, skip) = if at_word && rest.starts_with("crate::") {
            (Vec::new(), "crate::".len())
        } else if at_word && rest.starts_with("super::") {
            // Count the supers; a file's own module is its parent's child.
            let mut base = from.to_vec();
            let mut skip = 0;
            while line[i + skip..].starts_with("super::") {
                base.pop();
                skip += "super::".len();
            }
            (base, skip)
        } else {
            i += 1;
            continue;
        };
        let after = &line[i + skip..];
        for name in first_segments(after) {
            let mut path = base.clone();
            path.push(name);
            out.push(path);
        }
        i += skip;
    }
    out
}

/// The first segment of a path, or of each path in a `{a::b, c}` group.
fn first_segments(after: &str) -> Vec<String> {
    let ident = |s: &str| s.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    match after.strip_prefix('{') {
        Some(group) => {
            let mut depth = 0;
            let mut items = vec![String::new()];
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => items.push(String::new()),
                    _ => {}
                }
                if depth == 0 && c != ',' && c != '{' && c != '}' {
                    items.last_mut().expect("one item at least").push(c);
                }
            }
            items.iter().map(|s| ident(s)).filter(|s| !s.is_empty() && s != "self").collect()
        }
        None => vec![ident(after)].into_iter().filter(|s| !s.is_empty()).collect(),
    }
}

fn layer_index(name: &str) -> Option<usize> {
    LAYERS.iter().position(|&l| l == name)
}

#[test]
fn every_top_level_module_is_a_layer_and_the_order_is_declared_once() {
    let lib = std::fs::read_to_string(src_dir().join("lib.rs")).expect("lib.rs");
    let declared: BTreeSet<String> = strip_comments(&lib)
        .iter()
        .filter_map(|(_, l)| l.trim().strip_prefix("pub mod ").or_else(|| l.trim().strip_prefix("mod ")))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect();
    let layers: BTreeSet<String> = LAYERS.iter().map(|l| l.to_string()).collect();
    assert_eq!(declared, layers, "lib.rs's modules must be exactly the layers");
    for m in modules() {
        assert!(layer_index(&m.path[0]).is_some(), "{} is outside every layer", m.file.display());
    }
}

#[test]
fn no_module_imports_from_a_layer_above_its_own() {
    let mut violations = Vec::new();
    for m in modules() {
        let own = layer_index(&m.path[0]).expect("checked by the other test");
        for (line, code) in &m.code {
            for target in references(&m.path, code) {
                let Some(first) = target.first() else { continue };
                match layer_index(first) {
                    Some(layer) if layer > own => violations.push(format!(
                        "{}:{line}: layer `{}` uses `crate::{}` from layer `{first}` above it",
                        m.file.display(),
                        LAYERS[own],
                        target.join("::"),
                    )),
                    Some(_) => {}
                    // Items of the crate root (its re-exports) belong to the top.
                    None if own + 1 < LAYERS.len() => violations.push(format!(
                        "{}:{line}: `crate::{}` is not in a layer",
                        m.file.display(),
                        target.join("::")
                    )),
                    None => {}
                }
            }
        }
    }
    assert!(violations.is_empty(), "back-imports:\n{}", violations.join("\n"));
}

#[test]
fn the_modules_of_a_layer_import_each_other_without_cycles() {
    // Edges between the modules (files) of one layer.
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    let modules = modules();
    let known: BTreeSet<Vec<String>> = modules.iter().map(|m| m.path.clone()).collect();
    for m in &modules {
        let node = edges.entry(m.path.clone()).or_default();
        for (_, code) in &m.code {
            for target in references(&m.path, code) {
                if target.first() != m.path.first() || target.len() < 2 {
                    continue;
                }
                let module = target[..2].to_vec();
                if module != m.path && known.contains(&module) {
                    node.insert(module);
                }
            }
        }
    }
    // Depth-first search for a back edge.
    fn visit(
        node: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, bool>,
        stack: &mut Vec<Vec<String>>,
    ) -> Option<Vec<String>> {
        match state.get(node) {
            Some(true) => return None,
            Some(false) => {
                let start = stack.iter().position(|n| n == node).expect("on the stack");
                return Some(stack[start..].iter().chain([node]).map(|n| n.join("::")).collect());
            }
            None => {}
        }
        state.insert(node.clone(), false);
        stack.push(node.clone());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, edges, state, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        state.insert(node.clone(), true);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if let Some(cycle) = visit(node, &edges, &mut state, &mut Vec::new()) {
            panic!("import cycle: {}", cycle.join(" -> "));
        }
    }
}

#[test]
fn the_memory_model_and_the_pipeline_use_no_protocol_or_runtime() {
    let mut violations = Vec::new();
    for m in modules() {
        let Some((_, banned)) = NO_PROTOCOL.iter().find(|(layer, _)| *layer == m.path[0]) else { continue };
        for (line, code) in &m.code {
            for krate in banned.iter() {
                let used = code.match_indices(krate).any(|(at, _)| {
                    let before = code[..at].chars().last();
                    let after = &code[at + krate.len()..];
                    before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_')) && after.starts_with("::")
                });
                if used {
                    violations.push(format!("{}:{line}: layer `{}` uses `{krate}`", m.file.display(), m.path[0]));
                }
            }
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_path_reader_sees_groups_supers_and_plain_paths() {
    let from: Vec<String> = ["fault", "stages"].iter().map(|s| s.to_string()).collect();
    let refs = references(&from, "use crate::{memory::pin::PinGuard, observe::hub}; use super::plan::X;");
    let firsts: Vec<String> = refs.iter().map(|r| r.join("::")).collect();
    assert_eq!(firsts, ["memory", "observe", "fault::plan"]);
    assert_eq!(references(&from, "let x = super::super::api::y;")[0], ["api"]);
    assert!(references(&from, "let supercrate::x = 1;").is_empty());
}
