//! The README's and the docs' commands, run as a new user would run them against
//! `./dev.sh run`: the same binary, `statefold.toml` and the built reducers. Every `curl`
//! line of the README's Quickstart, then the reducer author's deploy (`curl -X PUT ...`),
//! replay, `statefold deploy`, `versions`, `tail` and `reducer check` from
//! `docs/reducers.md`, in order. Two things differ from a terminal: the server listens on a
//! free port (each `localhost:8080` is rewritten to it), and `HASH` is the hash the previous
//! commands answered. Streams (`curl -N`, `statefold tail`) are read for two seconds. Every
//! other command of an `sh` block of the README or `docs/` is listed in `NOT_RUN_HERE` with
//! the test that runs it instead: a new command is run here or named there.
//!
//! The docs' tables are checked against the code: the limits tables against
//! `Limits::default()`, the error table against the `Code` enum, every `toml` block against
//! `Config::from_file`.

use std::path::{Path, PathBuf};
use std::process::Command;

use statefold_tests::process::Serve;

/// The README and every file of `docs/`, as (path from the root, text).
fn docs() -> Vec<(String, String)> {
    let root = statefold_tests::workspace_root();
    let mut files = vec!["README.md".to_owned()];
    let mut pages: Vec<String> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|entry| format!("docs/{}", entry.unwrap().file_name().to_string_lossy()))
        .filter(|name| name.ends_with(".md"))
        .collect();
    pages.sort();
    files.extend(pages);
    files.into_iter().map(|file| (file.clone(), std::fs::read_to_string(root.join(&file)).unwrap())).collect()
}

/// The text of `file` (from the workspace root).
fn doc(file: &str) -> String {
    std::fs::read_to_string(statefold_tests::workspace_root().join(file)).unwrap()
}

/// The text of section `heading` of a doc (up to the next heading of its level or higher;
/// a `#` comment in a code block is no heading).
fn section(text: &str, heading: &str) -> String {
    let level = heading.chars().take_while(|c| *c == '#').count();
    let mut lines = text.lines().skip_while(|l| *l != heading);
    assert!(lines.next().is_some(), "no section {heading:?}");
    let mut fenced = false;
    let mut out = String::new();
    for line in lines {
        if line.starts_with("```") {
            fenced = !fenced;
        }
        let hashes = line.chars().take_while(|c| *c == '#').count();
        if !fenced && hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
            break;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Lines of the `sh` and `bash` code blocks of `text` (comments and blank lines aside).
fn sh_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        match line.trim() {
            "```sh" | "```bash" => inside = true,
            "```" => inside = false,
            l if inside && !l.is_empty() && !l.starts_with('#') => out.push(l.to_owned()),
            _ => {}
        }
    }
    out
}

/// Inline code spans of `text` that start with `prefix`.
fn spans<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.split('`').skip(1).step_by(2).filter(|s| s.starts_with(prefix)).collect()
}

/// The commands the test below runs, in order: (file, command).
fn commands_run_here() -> Vec<(String, String)> {
    let readme = doc("README.md");
    let reducers = doc("docs/reducers.md");
    let quickstart = sh_lines(&section(&readme, "## Quickstart"));
    let hot_reload = section(&reducers, "## Hot reload");
    let terminal = sh_lines(&section(&reducers, "## From the terminal: deploy, versions, tail"));
    let check = sh_lines(&section(&reducers, "## Write, build and check a reducer"));
    let mut run: Vec<(String, String)> =
        quickstart.into_iter().filter(|l| l.starts_with("curl")).map(|l| ("README.md".into(), l)).collect();
    let reducer_doc = |lines: Vec<String>| lines.into_iter().map(|l| ("docs/reducers.md".to_owned(), l));
    run.extend(reducer_doc(spans(&hot_reload, "curl -X PUT").into_iter().map(str::to_owned).collect()));
    run.extend(reducer_doc(sh_lines(&hot_reload).into_iter().filter(|l| l.starts_with("statefold replay")).collect()));
    run.extend(reducer_doc(terminal.into_iter().filter(|l| l.starts_with("statefold ")).collect()));
    run.extend(reducer_doc(check.into_iter().filter(|l| l.starts_with("./dev.sh run reducer check")).collect()));
    run
}

/// The `sh` lines of the README and `docs/` that the test does not run, each by the start
/// of the line, with where the same thing is run instead.
const NOT_RUN_HERE: [(&str, &str); 12] = [
    ("./dev.sh run ", "the README's two commands: CI runs `./dev.sh test` from a clean clone (.ci/run)"),
    ("./dev.sh test", "the README's two commands: CI runs it from a clean clone (.ci/run)"),
    ("rustup target add wasm32-wasip2", "dev.sh's setup"),
    ("cargo build --release --target wasm32-wasip2 -p", "dev.sh's build_reducers, and statefold_tests::wasm()"),
    (
        "statefold test NAME.wasm",
        "cli.rs: cli_new_builds_tests_and_deploys_a_*_reducer, on the project `statefold new` writes",
    ),
    ("statefold deploy NAME.wasm", "cli.rs: cli_new_builds_tests_and_deploys_a_*_reducer"),
    ("T=~/.cache/statefold/tools/bin/tansu", "kafka.rs and every Kafka test start Tansu so, on a free port"),
    ("(cd /tmp && $T broker", "statefold_tests::kafka starts the broker so, on a free port"),
    ("for t in counter document workflow; do $T topic create", "statefold_tests::kafka creates topics so"),
    ("statefold verify", "replica_processes.rs and context.rs run `statefold verify` against a broker"),
    ("tansu topic create", "shard_processes.rs creates the sharded topics and starts the servers so"),
    ("curl -s localhost:8081/v1/cluster", "shard_processes.rs reads GET /v1/cluster of each server"),
];

/// A line of a shell loop over several lines: not a command of its own.
fn loop_part(line: &str) -> bool {
    line.starts_with("for i in")
        || line == "done"
        || line.starts_with("statefold serve")
        || line.starts_with("--kafka-brokers")
}

struct Shell {
    url: String,
    cwd: PathBuf,
    binary: PathBuf,
    target: PathBuf,
    hash: Option<String>,
}

impl Shell {
    /// Runs one command of the docs; returns its stdout.
    fn run(&mut self, line: &str) -> String {
        let command = line.split(" # ").next().unwrap().trim();
        let port_free = command.replace("127.0.0.1:8080", &self.url).replace("localhost:8080", &self.url);
        let mut command = match &self.hash {
            Some(hash) => port_free.replace("HASH", hash),
            None => {
                assert!(!port_free.contains("HASH"), "no hash answered before {line:?}");
                port_free
            }
        };
        command = command.replace("target/wasm32-wasip2/", &format!("{}/wasm32-wasip2/", self.target.display()));
        if let Some(rest) = command.strip_prefix("./dev.sh run ") {
            command = format!("{} {rest}", self.binary.display());
        }
        let stream = command.starts_with("curl -N") || command.starts_with("statefold tail");
        if let Some(rest) = command.strip_prefix("statefold ") {
            command = format!("{} {rest}", self.binary.display());
        }
        if stream {
            command = format!("timeout 2 {command}");
        }
        // The `statefold` client commands without `--server` go to STATEFOLD_URL.
        let output = Command::new("bash")
            .arg("-c")
            .arg(&command)
            .env("STATEFOLD_URL", format!("http://{}", self.url))
            .current_dir(&self.cwd)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        // timeout's 124: the stream was cut, as a user's Ctrl-C would.
        let streamed = stream && output.status.code() == Some(124);
        assert!(
            output.status.success() || streamed,
            "a docs command failed: {line}\nran: {command}\nstdout: {stdout}\nstderr: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(!stdout.contains("\"error\""), "a docs command answered an error: {line}\n{stdout}");
        if let Some(hash) = last_hash(&stdout) {
            self.hash = Some(hash);
        }
        stdout
    }
}

/// The last `"hash":"…"` of a JSON answer, or `id: …` of an SSE stream.
fn last_hash(stdout: &str) -> Option<String> {
    let json = stdout.rfind("\"hash\":\"").map(|i| stdout[i + 8..i + 8 + 64].to_owned());
    json.filter(|h| h.chars().all(|c| c.is_ascii_hexdigit()))
}

#[test]
fn the_readme_and_docs_commands_run_as_written() {
    let root = statefold_tests::workspace_root();
    let commands = commands_run_here();
    let count = |prefix: &str| commands.iter().filter(|(_, l)| l.starts_with(prefix)).count();
    assert!(count("curl -s") + count("curl -N") >= 10, "the Quickstart's commands: {commands:?}");
    for prefix in [
        "curl -X PUT",
        "statefold replay",
        "statefold deploy",
        "statefold versions",
        "statefold tail",
        "./dev.sh run reducer check",
    ] {
        assert_eq!(count(prefix), 1, "docs/reducers.md's {prefix:?} command: {commands:?}");
    }

    // As `./dev.sh run` starts it: statefold.toml, the built reducers (here, on a free port
    // and a fresh data dir).
    let dir = tempfile::tempdir().unwrap();
    let reducers = statefold_tests::wasm("counter").parent().unwrap().to_owned();
    let config = root.join("statefold.toml");
    let serve = Serve::spawn_args(dir.path(), &args(&config, &reducers, dir.path()));
    let mut shell = Shell {
        url: serve.url.trim_start_matches("http://").to_owned(),
        cwd: reducers.clone(),
        binary: statefold_tests::statefold_binary(),
        target: reducers.parent().unwrap().parent().unwrap().to_owned(),
        hash: None,
    };
    wait_ready(&shell.url);

    let mut outputs = Vec::new();
    for (file, line) in &commands {
        if file == "docs/reducers.md" && outputs.len() == count("curl -s") + count("curl -N") {
            // The reducer author's commands work on the counter `c1` (`statefold tail counter/c1`).
            let create = format!("curl -s -X POST localhost:8080/v1/models/counter -d '{}'", r#"{"id":"c1"}"#);
            shell.run(&create);
            shell.run(&format!(
                "curl -s -X POST 'localhost:8080/v1/models/counter/c1/diffs?wait=applied' -d '{}'",
                r#"{"add":3}"#
            ));
        }
        outputs.push((line.clone(), shell.run(line)));
    }
    let said = |prefix: &str| outputs.iter().find(|(l, _)| l.starts_with(prefix)).map(|(_, o)| o.clone()).unwrap();
    // The stream shows a snapshot and `synced`; the resumed one, what was missed.
    assert!(
        said("curl -N localhost").contains("event: snapshot") && said("curl -N localhost").contains("event: synced")
    );
    assert!(said("curl -s localhost:8080/v1/models/finished").contains("\"status\":\"succeeded\""), "{outputs:#?}");
    assert!(said("curl -X PUT").contains("\"version\""), "{outputs:#?}");
    assert!(said("statefold replay").contains("(finished)"), "{outputs:#?}");
    assert!(said("statefold deploy").contains("counter: deployed: version"), "{outputs:#?}");
    assert!(said("statefold versions").contains("active"), "{outputs:#?}");
    assert!(said("statefold tail").contains("snapshot seq"), "{outputs:#?}");
    assert!(said("./dev.sh run reducer check").contains("counter"), "{outputs:#?}");
    drop(serve);
}

/// Every command of an `sh` block of the README and `docs/` is run above or named in
/// `NOT_RUN_HERE` with the test that runs it instead; no entry there is stale.
#[test]
fn every_docs_command_is_run_by_a_test() {
    let run: Vec<String> = commands_run_here().into_iter().map(|(_, line)| line).collect();
    let mut used = [false; NOT_RUN_HERE.len()];
    let mut unrun = Vec::new();
    for (file, text) in docs() {
        for line in sh_lines(&text) {
            let listed = NOT_RUN_HERE.iter().position(|(prefix, _)| line.starts_with(prefix));
            if let Some(i) = listed {
                used[i] = true;
            } else if !run.contains(&line) && !loop_part(&line) {
                unrun.push(format!("{file}: {line}"));
            }
        }
    }
    assert!(
        unrun.is_empty(),
        "docs commands no test runs (run them in readme.rs or name their test in NOT_RUN_HERE): {unrun:#?}"
    );
    let stale: Vec<&str> = NOT_RUN_HERE.iter().zip(used).filter(|(_, u)| !u).map(|((p, _), _)| *p).collect();
    assert!(stale.is_empty(), "NOT_RUN_HERE names commands no doc has any more: {stale:?}");
}

fn args(config: &Path, reducers: &Path, dir: &Path) -> Vec<String> {
    vec![
        "--config".into(),
        config.display().to_string(),
        "--reducers-dir".into(),
        reducers.display().to_string(),
        "--data-dir".into(),
        dir.join("data").display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ]
}

fn wait_ready(address: &str) {
    for _ in 0..500 {
        let ready = Command::new("curl").args(["-sf", &format!("{address}/readyz")]).output().unwrap();
        if ready.status.success() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("not ready in 10 s");
}

/// A documented default as written: `1 MiB`, `100,000`, `false`.
fn readme_value(text: &str) -> serde_json::Value {
    let text = text.replace(',', "");
    if let Some(mib) = text.strip_suffix(" MiB") {
        return serde_json::json!(mib.parse::<u64>().expect("a number of MiB") << 20);
    }
    if let Some(kib) = text.strip_suffix(" KiB") {
        return serde_json::json!(kib.parse::<u64>().expect("a number of KiB") << 10);
    }
    match text.as_str() {
        "true" => serde_json::json!(true),
        "false" => serde_json::json!(false),
        number => serde_json::json!(number.parse::<u64>().unwrap_or_else(|_| panic!("documented default {text:?}"))),
    }
}

#[test]
fn the_reference_limits_tables_list_every_limit_with_its_default() {
    let limits = section(&doc("docs/reference.md"), "## Limits");
    let limits = limits.as_str();
    let documented: std::collections::BTreeMap<String, serde_json::Value> = limits
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_owned(), readme_value(cells.get(2)?)))
        })
        .collect();
    let defaults = serde_json::to_value(statefold::config::Limits::default()).unwrap();
    let defaults = defaults.as_object().unwrap();
    for (name, value) in defaults {
        assert_eq!(documented.get(name), Some(value), "docs/reference.md's Limits table on {name}");
    }
    for name in documented.keys() {
        assert!(defaults.contains_key(name), "docs/reference.md documents {name}, which is not a limit");
    }
}

/// The codes of the reference's error table: its first column, and the deploy refusals row's
/// list.
fn documented_error_codes(reference: &str) -> Vec<String> {
    let table = reference
        .lines()
        .skip_while(|line| !line.starts_with("| code | status | when |"))
        .skip(2)
        .take_while(|line| line.starts_with('|'));
    let mut codes = Vec::new();
    for row in table {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let named = if cells[1] == "deploy refusals" { cells[3] } else { cells[1] };
        codes.extend(named.split('`').skip(1).step_by(2).map(str::to_owned));
    }
    codes
}

/// The reference's error table and the OpenAPI document's error codes are the server's one
/// code enum (`statefold::code::Code`): a code added to the enum without a row in docs/reference.md, or
/// a row for a code the server cannot send, fails here.
#[test]
fn the_error_table_and_the_openapi_document_are_the_code_enum() {
    let enum_codes: std::collections::BTreeSet<String> =
        statefold::code::Code::ALL.iter().map(|c| c.as_str().to_owned()).collect();
    let table: std::collections::BTreeSet<String> =
        documented_error_codes(&doc("docs/reference.md")).into_iter().collect();
    let missing: Vec<&String> = enum_codes.difference(&table).collect();
    let extra: Vec<&String> = table.difference(&enum_codes).collect();
    assert!(missing.is_empty(), "codes the server sends with no row in docs/reference.md's error table: {missing:?}");
    assert!(extra.is_empty(), "docs/reference.md has error rows for codes the server never sends: {extra:?}");
    let openapi: serde_json::Value = serde_json::from_str(statefold::api::OPENAPI).unwrap();
    let listed = &openapi["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"];
    let listed: std::collections::BTreeSet<String> =
        listed.as_array().expect("Error.code has an enum").iter().map(|c| c.as_str().unwrap().to_owned()).collect();
    assert_eq!(listed, enum_codes, "openapi.json's Error.code enum is not the server's codes");
}

/// Every error code the reference documents is named (as a string literal) by at least one
/// test: a code no test reaches is a documented promise nobody checks.
#[test]
fn every_documented_error_code_is_named_by_a_test() {
    let root = statefold_tests::workspace_root();
    let codes = documented_error_codes(&doc("docs/reference.md"));
    assert!(codes.len() >= 40, "docs/reference.md's error table: {codes:?}");
    let mut tests = String::new();
    for dir in ["tests/tests", "host/core/src/fold"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            if file.ends_with(".rs") && file != "readme.rs" && (dir == "tests/tests" || file == "tests.rs") {
                tests.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    // Codes no test can bring about on purpose, each with why. Every one must still be a
    // code (a stale entry fails) and must not be named by a test (then it is tested: drop it).
    const UNREACHED: [(&str, &str); 2] = [
        ("internal", "a blocking task that panicked, or a response that cannot be built"),
        ("shutting_down", "a deploy or a wait cut short by the stop, a race a test cannot win each time"),
    ];
    for (code, why) in UNREACHED {
        assert!(codes.contains(&code.to_owned()), "UNREACHED lists {code}, which is no longer a code ({why})");
        assert!(!tests.contains(&format!("\"{code}\"")), "{code} is named by a test now: drop it from UNREACHED");
    }
    let unnamed: Vec<&String> = codes
        .iter()
        .filter(|code| !tests.contains(&format!("\"{code}\"")) && !UNREACHED.iter().any(|(c, _)| c == code))
        .collect();
    assert!(unnamed.is_empty(), "documented error codes that no test names: {unnamed:?}");
}

/// Every `toml` block of the README and `docs/` but a Cargo manifest's is a part of a configuration the
/// server takes: each one, written to a file, is read by `Config::from_file` (unknown keys
/// refused), so a renamed or removed setting cannot stay documented.
#[test]
fn docs_toml_blocks_are_settings_the_server_takes() {
    let mut blocks = Vec::new();
    let mut block: Option<String> = None;
    let docs = docs();
    for line in docs.iter().flat_map(|(_, text)| text.lines()) {
        match (line.trim(), block.as_mut()) {
            ("```toml", None) => block = Some(String::new()),
            ("```", Some(_)) => blocks.extend(block.take().filter(|b| !b.starts_with("[lib]"))),
            (_, Some(text)) => {
                text.push_str(line);
                text.push('\n');
            }
            _ => {}
        }
    }
    assert!(blocks.len() >= 3, "the docs' toml blocks were not found");
    let dir = tempfile::tempdir().unwrap();
    for text in blocks {
        let file = dir.path().join("block.toml");
        std::fs::write(&file, &text).unwrap();
        if let Err(error) = statefold::config::Config::from_file(&file) {
            panic!("a docs toml block is not a configuration the server takes: {error}\n{text}");
        }
    }
}
