//! The library's modules form layers: no two top-level modules refer to each other
//! (`crate::a` in b and `crate::b` in a, outside comments). Fronts and backends sit above the
//! model, rows, ids and files; an import cycle would let a lower layer reach back up.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module of a source file: `fused/proj.rs` -> `fused`, `layer.rs` -> `layer`.
fn module_of(rel: &Path) -> String {
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

fn refs(src: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in src.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + 7..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name.chars().next().unwrap().is_ascii_lowercase() {
                out.insert(name);
            }
        }
    }
    out
}

fn walk(dir: &Path, root: &Path, graph: &mut BTreeMap<String, BTreeSet<String>>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            walk(&p, root, graph);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let m = module_of(p.strip_prefix(root).unwrap());
            let src = std::fs::read_to_string(&p).unwrap();
            let r = refs(&src);
            graph
                .entry(m.clone())
                .or_default()
                .extend(r.into_iter().filter(|x| *x != m));
        }
    }
}

#[test]
fn no_two_modules_import_each_other() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    walk(&root, &root, &mut graph);
    assert!(
        graph.contains_key("layer") && graph.contains_key("fused"),
        "{graph:?}"
    );
    let mut cycles = Vec::new();
    for (a, deps) in &graph {
        for b in deps {
            if a < b && graph.get(b).is_some_and(|d| d.contains(a)) {
                cycles.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules that import each other: {cycles:?}"
    );
}
