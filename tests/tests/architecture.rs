//! The host's layers: the core crate's dependency tree (from `cargo tree`: Cargo holds
//! that line), and the module graph of the `statefold` crate read from its source (which
//! top-level module names which, `crate::MODULE` paths). Fails when a layer reaches where
//! ARCHITECTURE.md says it must not; prints the picture ARCHITECTURE.md shows
//! (`cargo test --release --workspace --test architecture -- --nocapture`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module of each file under `host/server/src` (the crate with the most modules),
/// and the text of its code (comments and doc comments removed: a doc link is not a
/// dependency).
fn sources() -> BTreeMap<String, String> {
    let src = statefold_tests::workspace_root().join("host/server/src");
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for path in statefold_tests::rust_files(&src) {
        out.entry(module_of(&src, &path)).or_default().push_str(&code_of(&path));
    }
    out
}

/// The text of a source file's code: comments and doc comments removed.
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("a source file");
    text.lines().map(|line| line.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("under host/server/src");
    let first = relative.components().next().expect("a path").as_os_str().to_string_lossy().into_owned();
    first.strip_suffix(".rs").unwrap_or(&first).to_owned()
}

/// Module -> the crate's modules it names.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let sources = sources();
    let modules: BTreeSet<String> = sources.keys().cloned().collect();
    sources
        .iter()
        .map(|(module, code)| {
            let uses = code
                .match_indices("crate::")
                .filter_map(|(i, _)| {
                    let name: String =
                        code[i + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    (modules.contains(&name) && &name != module).then_some(name)
                })
                .collect();
            (module.clone(), uses)
        })
        .collect()
}

/// The lines of ARCHITECTURE.md's fenced block ```` ```NAME ````, spaces collapsed.
fn documented_picture(name: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(statefold_tests::workspace_root().join("ARCHITECTURE.md")).unwrap();
    let block = doc
        .split(&format!("```{name}\n"))
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .unwrap_or_else(|| panic!("ARCHITECTURE.md has no ```{name} block"));
    block.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).filter(|l| !l.is_empty()).collect()
}

/// `a -> b, c` lines of a graph.
fn picture(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    graph
        .iter()
        .map(|(node, uses)| format!("{node} -> {}", uses.iter().cloned().collect::<Vec<_>>().join(", ")))
        .map(|line| line.trim_end().to_owned())
        .collect()
}

#[test]
fn layers_import_only_what_architecture_md_allows() {
    let graph = graph();
    let actual = picture(&graph);
    println!("host/server/src module graph (module -> modules it uses):\n{}", actual.join("\n"));
    assert_eq!(documented_picture("modules"), actual, "ARCHITECTURE.md's module picture differs from the code");
    // The adapter left in this crate: what it may name besides the crates below it
    // (`chain`, `model`, `fold`, `reducer`, `store`, `source`, re-exported, which every
    // module may use). Everything else (app, hub, deploy, verify, the drivers pipeline/watch/server,
    // main) composes them.
    let allowed: &[(&str, &[&str])] = &[("api", &["app", "auth", "metrics", "hub", "deploy"])];
    let mut wrong = Vec::new();
    for (module, may) in allowed {
        let uses = graph.get(*module).unwrap_or_else(|| panic!("no module {module} in host/server/src"));
        for used in uses {
            if !may.contains(&used.as_str()) {
                wrong.push(format!("{module} uses {used}"));
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken (see ARCHITECTURE.md, \"Dependencies\"): {wrong:?}");
}

/// The packages `cargo tree` lists for `args`, by name.
fn packages(args: &[&str]) -> BTreeSet<String> {
    features(args).iter().filter_map(|line| line.split(' ').next()).map(str::to_owned).collect()
}

/// Whether `package` is one the core must not depend on: the WebAssembly runtime, the
/// store, the log, the async runtime, the HTTP stack.
fn is_io_package(package: &str) -> bool {
    const IO: [&str; 8] = ["wasmtime", "rocksdb", "librocksdb-sys", "rdkafka", "tokio", "axum", "hyper", "reqwest"];
    IO.iter().any(|io| package == *io || package.starts_with(&format!("{io}-")))
}

#[test]
fn the_core_crate_depends_on_no_runtime_store_log_or_server() {
    let core = packages(&["-p", "statefold-core", "-e", "normal,build"]);
    assert!(core.contains("statefold-core") && core.contains("blake3"), "cargo tree of the core: {core:?}");
    let io: Vec<&String> = core.iter().filter(|p| is_io_package(p)).collect();
    assert!(io.is_empty(), "statefold-core depends on {io:?}: the core does no I/O (see ARCHITECTURE.md)");
    // The check itself: the host crate does depend on each of them.
    let host = packages(&["-p", "statefold", "-e", "normal"]);
    for io in ["wasmtime", "rocksdb", "rdkafka", "tokio", "axum", "hyper", "reqwest"] {
        assert!(host.iter().any(|p| is_io_package(p) && p.starts_with(io)), "statefold depends on no {io}?");
    }
}

#[test]
fn the_core_touches_no_file_or_socket() {
    // Cargo cannot see `std`; the core's source must not name its I/O.
    let files = statefold_tests::rust_files(&statefold_tests::workspace_root().join("host/core/src"));
    assert!(files.len() > 10, "the core's files: {files:?}");
    let mut wrong = Vec::new();
    for path in files {
        let code = code_of(&path);
        for io in ["std::fs", "std::net", "std::process"] {
            if code.contains(io) {
                wrong.push(format!("{} names {io}", path.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "the core does no I/O: {wrong:?}");
}

#[test]
fn no_two_modules_import_each_other() {
    // Two modules that import each other can be read (or tested) only together.
    let graph = graph();
    let mut cycles = Vec::new();
    for (a, uses) in &graph {
        for b in uses {
            if a < b && graph.get(b).is_some_and(|back| back.contains(a)) {
                cycles.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(cycles.is_empty(), "modules that import each other: {cycles:?}");
}

/// The host's crates (those under `host/`) -> the host crates each depends on, from
/// `cargo metadata`.
fn crate_graph() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = statefold_tests::workspace_root();
    let host = root.join("host");
    let output = std::process::Command::new(&cargo)
        .args(["metadata", "--offline", "--no-deps", "--format-version", "1"])
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    assert!(output.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&output.stderr));
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).expect("cargo metadata's JSON");
    let packages = metadata["packages"].as_array().expect("packages");
    let in_host = |p: &serde_json::Value| Path::new(p["manifest_path"].as_str().expect("a path")).starts_with(&host);
    let names: BTreeSet<String> =
        packages.iter().filter(|p| in_host(p)).map(|p| p["name"].as_str().expect("a name").to_owned()).collect();
    packages
        .iter()
        .filter(|p| in_host(p))
        .map(|p| {
            let deps = p["dependencies"].as_array().expect("dependencies");
            let uses = deps
                .iter()
                .filter(|d| d["kind"].is_null())
                .filter_map(|d| d["name"].as_str())
                .filter(|name| names.contains(*name))
                .map(str::to_owned)
                .collect();
            (p["name"].as_str().expect("a name").to_owned(), uses)
        })
        .collect()
}

#[test]
fn the_crate_picture_in_architecture_md_is_cargos() {
    let graph = crate_graph();
    assert!(graph.len() >= 2 && graph.contains_key("statefold-core"), "host crates: {graph:?}");
    let actual = picture(&graph);
    println!("host crates (crate -> host crates it depends on):\n{}", actual.join("\n"));
    assert_eq!(documented_picture("crates"), actual, "ARCHITECTURE.md's crate picture differs from cargo metadata");
}

#[test]
fn the_reducer_builds_leave_out_exactly_the_host_crates() {
    // dev.sh and the test helper build every other member for wasm32-wasip2: a host crate
    // left in fails that build (RocksDB and librdkafka are C), one left out too many is a
    // reducer never built.
    let mut expected: BTreeSet<String> = crate_graph().into_keys().collect();
    expected.insert("statefold-tests".into());
    let root = statefold_tests::workspace_root();
    let dev = std::fs::read_to_string(root.join("dev.sh")).unwrap();
    let build = dev.split("build_reducers() {").nth(1).and_then(|b| b.split('}').next()).expect("build_reducers");
    let words: Vec<&str> = build.split_whitespace().collect();
    let excluded: BTreeSet<String> =
        words.windows(2).filter(|w| w[0] == "--exclude").map(|w| w[1].to_owned()).collect();
    assert_eq!(excluded, expected, "dev.sh build_reducers --exclude");
    let helper = std::fs::read_to_string(root.join("tests/src/lib.rs")).unwrap();
    let args: Vec<&str> = helper.split('"').skip(1).step_by(2).collect();
    let excluded: BTreeSet<String> = args.windows(2).filter(|w| w[0] == "--exclude").map(|w| w[1].to_owned()).collect();
    assert_eq!(excluded, expected, "tests/src/lib.rs wasm() --exclude");
}

/// `cargo tree`'s (package, features) lines for `args`.
fn features(args: &[&str]) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = std::process::Command::new(&cargo)
        .args(["tree", "--offline", "--prefix", "none", "-f", "{p} {f}"])
        .args(args)
        .current_dir(statefold_tests::workspace_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo}: {e}"));
    assert!(output.status.success(), "cargo tree: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().map(|l| l.trim_end_matches(" (*)").to_owned()).collect()
}

#[test]
fn the_server_alone_and_the_whole_test_build_resolve_one_feature_set() {
    // `./dev.sh run` builds the host alone, `./dev.sh test` the workspace with its
    // dev-dependencies: every dependency the host uses must get the same features in both,
    // or cargo compiles it twice (wasmtime and RocksDB included).
    let server = features(&["-p", "statefold", "-e", "normal,build"]);
    let tests = features(&["--workspace", "-e", "normal,build,dev"]);
    let only_server: Vec<&String> = server.difference(&tests).collect();
    assert!(only_server.is_empty(), "features the server's build resolves and the tests' do not: {only_server:?}");
}
