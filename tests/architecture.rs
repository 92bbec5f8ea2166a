//! The layout docs/ARCHITECTURE.md describes, checked against the tree: every workspace crate is
//! documented there and inherits the workspace lints (which deny undocumented `unsafe`), the
//! production crates do not depend on the emulator, the lab or the testkit, and inside each crate the
//! top-level modules import one another without cycles (Cargo already forbids cycles between
//! crates; inside one crate only this test does).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Source directories of the workspace crates: the root package and `crates/*`.
fn crate_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![root()];
    let mut members: Vec<PathBuf> = fs::read_dir(root().join("crates"))
        .expect("crates/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("Cargo.toml").is_file())
        .collect();
    members.sort();
    dirs.extend(members);
    dirs
}

fn package_name(dir: &Path) -> String {
    let toml = fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    let table: toml::Table = toml.parse().unwrap();
    table["package"]["name"].as_str().unwrap().to_string()
}

fn rs_files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        for e in fs::read_dir(p).unwrap() {
            rs_files(&e.unwrap().path(), out);
        }
    } else if p.extension().is_some_and(|e| e == "rs") {
        out.push(p.to_path_buf());
    }
}

/// `crate::NAME` paths in code (comments are skipped: a doc link is not a dependency).
fn crate_paths(file: &Path) -> BTreeSet<String> {
    let text = fs::read_to_string(file).unwrap();
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().last();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // e.g. `kvcrypt_crate::`, not this crate
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// Top-level module → the other top-level modules of the same crate it names.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph = BTreeMap::new();
    for e in fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let name = match p.file_stem().and_then(|s| s.to_str()) {
            Some(n) if p.is_dir() || p.extension().is_some_and(|e| e == "rs") => n.to_string(),
            _ => continue,
        };
        if matches!(name.as_str(), "lib" | "main" | "bin") {
            continue;
        }
        let mut files = Vec::new();
        rs_files(&p, &mut files);
        if p.is_dir() {
            // `foo/` and `foo.rs` are one module.
            let sibling = src.join(format!("{name}.rs"));
            if sibling.is_file() {
                files.push(sibling);
            }
        }
        let deps: BTreeSet<String> = files
            .iter()
            .flat_map(|f| crate_paths(f))
            .filter(|d| *d != name)
            .collect();
        graph.entry(name).or_insert_with(BTreeSet::new).extend(deps);
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for deps in graph.values_mut() {
        deps.retain(|d| modules.contains(d));
    }
    graph
}

/// A cycle in `graph`, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut cycle = path[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for d in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn modules_inside_each_crate_import_one_another_without_cycles() {
    for dir in crate_dirs() {
        let graph = module_graph(&dir.join("src"));
        if let Some(cycle) = find_cycle(&graph) {
            panic!(
                "{}: import cycle {} (graph: {graph:?})",
                package_name(&dir),
                cycle.join(" → ")
            );
        }
    }
}

#[test]
fn the_cycle_check_sees_a_cycle() {
    // The checker itself, on a two-module crate that imports in a circle.
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("a.rs"), "use crate::b::X;\n").unwrap();
    fs::create_dir(dir.path().join("b")).unwrap();
    fs::write(
        dir.path().join("b/mod.rs"),
        "pub fn f() { crate::a::g() }\n",
    )
    .unwrap();
    fs::write(
        dir.path().join("c.rs"),
        "// crate::a in a comment is no edge\n",
    )
    .unwrap();
    let graph = module_graph(dir.path());
    assert_eq!(graph["c"], BTreeSet::new());
    let cycle = find_cycle(&graph).expect("a ↔ b is a cycle");
    assert_eq!(cycle.first(), cycle.last());
}

#[test]
fn every_crate_is_documented_and_denies_undocumented_unsafe() {
    let arch =
        fs::read_to_string(root().join("docs/ARCHITECTURE.md")).expect("docs/ARCHITECTURE.md");
    let readme = fs::read_to_string(root().join("README.md")).unwrap();
    for dir in crate_dirs() {
        let name = package_name(&dir);
        assert!(
            arch.contains(&format!("`{name}`")),
            "docs/ARCHITECTURE.md does not describe `{name}`"
        );
        assert!(
            readme.contains(&format!("`{name}`")),
            "README §What is where does not list `{name}`"
        );
        let toml: toml::Table = fs::read_to_string(dir.join("Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            toml.get("lints")
                .and_then(|l| l.get("workspace"))
                .and_then(|w| w.as_bool()),
            Some(true),
            "{name}: Cargo.toml must say [lints] workspace = true"
        );
    }
    let ws: toml::Table = fs::read_to_string(root().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        ws["workspace"]["lints"]["clippy"]["undocumented_unsafe_blocks"].as_str(),
        Some("deny")
    );
}

#[test]
fn production_crates_do_not_depend_on_the_emulator_or_the_lab() {
    for dir in crate_dirs() {
        let name = package_name(&dir);
        // The test-only crates: they exist to link the emulator (and one another).
        if matches!(
            name.as_str(),
            "kvcrypt-kv-emulator" | "kvcrypt-lab" | "kvcrypt-testkit"
        ) {
            continue;
        }
        let toml: toml::Table = fs::read_to_string(dir.join("Cargo.toml"))
            .unwrap()
            .parse()
            .unwrap();
        let deps = toml.get("dependencies").and_then(|d| d.as_table());
        for banned in [
            "kvcrypt-kv-emulator",
            "kvcrypt-lab",
            "kvcrypt-testkit",
            "hyper-util",
            "rcgen",
            "rsa",
        ] {
            // The binary wraps and unwraps the customer-held recovery slot itself (RSA-OAEP-256
            // with the customer's key pair, `cli/volume/recovery_key.rs`); no library crate
            // needs RSA, and none may pull it in.
            if banned == "rsa" && name == "kvcrypt" {
                continue;
            }
            assert!(
                !deps.is_some_and(|d| d.contains_key(banned)),
                "{name} depends on {banned}: only tests (dev-dependencies) may"
            );
        }
    }
}

/// The code of every `.rs` file under `dir`, comment lines left out (a doc comment may name what
/// the code must not use). Panics if there are fewer than two files (a wrong path).
fn source_code(dir: &Path) -> String {
    let mut files = Vec::new();
    rs_files(dir, &mut files);
    assert!(files.len() > 1, "no sources under {}", dir.display());
    files
        .iter()
        .flat_map(|f| {
            fs::read_to_string(f)
                .unwrap()
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The whole identifiers (and words of string literals) in `code`.
fn identifiers(code: &str) -> BTreeSet<&str> {
    code.split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .collect()
}

/// The volume state machine's core does no I/O and never touches key material: everything with
/// a side effect, and the unwrapped key, stay in the shell that carries out its effects
/// (`agent/volume/mod.rs`). Checked on the sources of `agent/volume/core/`, because "pure" is a property of what the file
/// may name.
#[test]
fn the_agent_core_does_no_io_and_holds_no_key() {
    let dir = root().join("src/agent/volume/core");
    let code = source_code(&dir);
    let path = dir;
    // Whole identifiers (`PlatformError`, a plain value type, is allowed; `Platform` is not).
    let words = identifiers(&code);
    let forbidden_words = [
        ("async", "async code"),
        ("Platform", "the platform trait"),
        ("VolumeKey", "a volume key"),
        ("unsafe", "unsafe code"),
    ];
    let forbidden_paths = [
        (".await", "an await"),
        ("std::fs", "the file system"),
        ("std::process", "processes"),
        ("tokio::spawn", "a task"),
        ("tokio::time::sleep", "a timer"),
        ("Instant::now", "the clock (time comes with each event)"),
    ];
    let found: Vec<String> = forbidden_words
        .iter()
        .filter(|(w, _)| words.contains(w))
        .chain(forbidden_paths.iter().filter(|(p, _)| code.contains(p)))
        .map(|(needle, what)| format!("`{needle}` ({what})"))
        .collect();
    assert!(
        found.is_empty(),
        "{} must stay pure, but it uses {}",
        path.display(),
        found.join(", ")
    );
}

/// The on-disk format crate does no I/O: it is the fuzz target's only dependency and works on
/// bytes and values (`parse_image` on the header area, `plan_write` returning the writes to
/// make). Opening, reading, writing and syncing the device or a backup file is
/// `kvcrypt-header-io`'s. Checked on the sources of `crates/kvcrypt-format/src/` (whole
/// identifiers, so `std::io::{Read, Write}` is caught as well as `std::io::Read`; `Write` is also
/// `fmt::Write`'s name, but `format!` needs no import) and on its `[dependencies]`, which may
/// only name crates that do no file, process or network I/O for it.
#[test]
fn the_format_crate_does_no_io() {
    let dir = root().join("crates/kvcrypt-format");
    let code = source_code(&dir.join("src"));
    let words = identifiers(&code);
    let forbidden_words = [
        ("fs", "the file system"),
        ("File", "a file"),
        ("OpenOptions", "opening a file"),
        ("OpenOptionsExt", "opening a file"),
        ("FileExt", "positioned file I/O"),
        ("Read", "an I/O trait"),
        ("Write", "an I/O trait"),
        ("Seek", "an I/O trait"),
        ("SeekFrom", "seeking"),
        ("BufReader", "buffered I/O"),
        ("BufWriter", "buffered I/O"),
        ("Command", "processes"),
        ("TcpStream", "the network"),
        ("UnixStream", "a socket"),
        ("unsafe", "unsafe code"),
    ];
    let forbidden_paths = [
        ("std::fs", "the file system"),
        ("std::io::Read", "an I/O trait"),
        ("std::io::Write", "an I/O trait"),
        ("std::io::Seek", "an I/O trait"),
        ("std::io::stdin", "standard input"),
        ("std::io::stdout", "standard output"),
        ("std::os", "OS-specific file and descriptor APIs"),
        ("std::process", "processes"),
        ("std::net", "the network"),
    ];
    let found: Vec<String> = forbidden_words
        .iter()
        .filter(|(w, _)| words.contains(w))
        .chain(forbidden_paths.iter().filter(|(p, _)| code.contains(p)))
        .map(|(needle, what)| format!("`{needle}` ({what})"))
        .collect();
    assert!(
        found.is_empty(),
        "kvcrypt-format must do no I/O (that is kvcrypt-header-io's), but its sources use {}",
        found.join(", ")
    );

    let allowed = [
        "kvcrypt-exit",
        "kvcrypt-crypto",
        "thiserror",
        "serde",
        "serde_json",
        "uuid",
        "base64",
        "sha2",
        "time",
    ];
    let toml: toml::Table = fs::read_to_string(dir.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let mut tables: Vec<(String, &toml::Table)> = Vec::new();
    for section in ["dependencies", "build-dependencies"] {
        if let Some(t) = toml.get(section).and_then(|d| d.as_table()) {
            tables.push((section.to_string(), t));
        }
    }
    // `[target.'cfg(..)'.dependencies]` count too.
    for (cfg, t) in toml
        .get("target")
        .and_then(|t| t.as_table())
        .into_iter()
        .flatten()
    {
        for section in ["dependencies", "build-dependencies"] {
            if let Some(d) = t.get(section).and_then(|d| d.as_table()) {
                tables.push((format!("target.{cfg}.{section}"), d));
            }
        }
    }
    let extra: Vec<String> = tables
        .iter()
        .flat_map(|(section, t)| {
            t.keys()
                .filter(|k| !allowed.contains(&k.as_str()))
                .map(move |k| format!("{k} (in [{section}])"))
        })
        .collect();
    assert!(
        extra.is_empty(),
        "kvcrypt-format may depend only on {}; it also names {}",
        allowed.join(", "),
        extra.join(", ")
    );
    assert!(
        !dir.join("build.rs").exists(),
        "kvcrypt-format must have no build script"
    );
}
